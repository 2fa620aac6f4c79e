"""Statistics of sampled routing against exact distributions, with stated tolerances.

Chi-square tests use fixed seeds and require p > 0.001; a correct sampler fails one with
probability 0.001 per seed, and the seeds are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import naive_routing as naive
import numpy as np
import pytest

from clustersim.routing import Router, dispatch
from clustersim.routing.gating import expert_popularity, max_to_mean_load
from clustersim.spec.schema import MoESpec

EULER_GAMMA = 0.5772156649015329


def test_chi2_sf_matches_tables():
    assert naive.chi2_sf(3.841459, 1) == pytest.approx(0.05, rel=1e-5)
    assert naive.chi2_sf(18.307038, 10) == pytest.approx(0.05, rel=1e-5)
    assert naive.chi2_sf(9.487729, 4) == pytest.approx(0.05, rel=1e-5)
    assert naive.chi2_sf(50.892181, 30) == pytest.approx(0.01, rel=1e-4)


def ordered_counts(experts: np.ndarray) -> dict[tuple[int, ...], int]:
    rows, counts = np.unique(experts, axis=0, return_counts=True)
    return {tuple(r): int(c) for r, c in zip(rows.tolist(), counts.tolist(), strict=True)}


@pytest.mark.parametrize("mode", ["tokens", "counts"])
def test_skew_zero_load_balance_tends_to_100_pct(mode):
    router = Router(MoESpec(num_experts=8, top_k=2), ep=1, seed=0, mode=mode)
    small = router.route(0, 0, np.array([1_000])).load_balance_pct
    large = router.route(0, 1, np.array([1_000_000])).load_balance_pct
    assert large > 99.0  # std of a count is ~0.2% of its mean at T = 1e6
    assert large > small


def test_top1_frequencies_match_popularity():
    popularity = expert_popularity(16, 1.0, seed=4, layer=2)
    draws = 200_000
    rng = np.random.default_rng(0)
    experts, _ = dispatch.sample_topk(popularity, rng.random((draws, 1)))
    observed = dict(enumerate(np.bincount(experts[:, 0], minlength=16).tolist()))
    assert naive.chi_square_p(observed, dict(enumerate(popularity)), draws) > 0.001


@pytest.mark.parametrize(
    ("weights", "k", "max_rejections"),
    [
        ([0.5, 0.25, 0.15, 0.1], 2, 32),  # alias draws with rejection
        ([0.5, 0.25, 0.15, 0.1], 2, 0),  # every duplicate resolved by the exact scan
        ([0.7, 0.1, 0.1, 0.05, 0.05], 2, 32),
        ([0.4, 0.3, 0.2, 0.1], 3, 32),  # k > E/2: pool scans
    ],
)
def test_ordered_picks_match_exact_probabilities(weights, k, max_rejections):
    draws = 200_000
    rng = np.random.default_rng(len(weights) * 10 + k + max_rejections)
    experts, _ = dispatch.sample_topk(
        np.array(weights), rng.random((draws, k)), max_rejections=max_rejections
    )
    expected = naive.ordered_pick_probabilities(weights, k)
    assert naive.chi_square_p(ordered_counts(experts), expected, draws) > 0.001


def test_inclusion_probabilities_match_enumeration():
    weights, k, draws = [0.5, 0.25, 0.15, 0.1], 2, 200_000
    experts, _ = dispatch.sample_topk(
        np.array(weights), np.random.default_rng(1).random((draws, k))
    )
    inclusion = np.zeros(4)
    for order, p in naive.ordered_pick_probabilities(weights, k).items():
        inclusion[list(order)] += p
    frequency = np.bincount(experts.ravel(), minlength=4) / draws
    sigma = np.sqrt(inclusion * (1 - inclusion) / draws)
    assert np.all(np.abs(frequency - inclusion) < 5 * sigma)
    assert inclusion.tolist() != pytest.approx((np.array(weights) * k).tolist(), abs=0.01)


def test_node_limited_picks_match_exact_probabilities():
    weights = [0.3, 0.05, 0.2, 0.1, 0.15, 0.05, 0.1, 0.05]
    node_of = [0, 0, 1, 1, 2, 2, 3, 3]
    draws = 200_000
    rng = np.random.default_rng(7)
    experts, _ = dispatch.sample_topk(
        np.array(weights),
        rng.random((draws, 2)),
        group_of=np.array(node_of),
        group_uniforms=rng.random((draws, 2)),
    )
    expected = naive.node_limited_pick_probabilities(weights, node_of, m=2, k=2)
    assert naive.chi_square_p(ordered_counts(experts), expected, draws) > 0.001


def test_keys_are_distributed_like_explicit_gumbel_top_k():
    """Keys are -exp(-G) for the picks' perturbed logits G; compare G with explicit sampling."""
    weights = np.array([0.4, 0.3, 0.2, 0.1])
    draws, k = 200_000, 2
    rng = np.random.default_rng(3)
    experts, keys = dispatch.sample_topk(weights, rng.random((draws, k)), want_keys=True)
    logits = -np.log(-keys)
    explicit = np.log(weights) + rng.gumbel(size=(draws, 4))
    top = -np.sort(-explicit, axis=1)[:, :k]
    assert logits[:, 0].mean() == pytest.approx(EULER_GAMMA, abs=0.015)  # log(sum w) = 0
    for j in range(k):
        assert logits[:, j].mean() == pytest.approx(top[:, j].mean(), abs=0.02)
        assert logits[:, j].std() == pytest.approx(top[:, j].std(), abs=0.02)
        for q in (0.1, 0.5, 0.9):
            assert np.quantile(logits[:, j], q) == pytest.approx(
                np.quantile(top[:, j], q), abs=0.03
            )
    # The value of the top pick does not depend on which expert it is.
    for e in range(4):
        assert logits[experts[:, 0] == e, 0].mean() == pytest.approx(EULER_GAMMA, abs=0.03)


@pytest.mark.parametrize("mode", ["tokens", "counts"])
@pytest.mark.parametrize("skew", [0.2, 0.5, 1.0])
def test_top1_imbalance_matches_the_skew_law(skew, mode):
    moe = MoESpec(num_experts=64, top_k=1, router_skew=skew)
    router = Router(moe, ep=8, seed=0, mode=mode)
    out = router.route(0, 0, np.full(8, 50_000))
    measured = out.tokens_per_expert.max() / out.tokens_per_expert.mean()
    assert measured == pytest.approx(max_to_mean_load(64, skew), rel=0.03)


@pytest.mark.parametrize("mode", ["tokens", "counts"])
def test_load_balance_falls_as_skew_rises(mode):
    tokens = np.full(8, 20_000)
    balance = [
        Router(MoESpec(num_experts=64, top_k=2, router_skew=s), 8, 0, mode=mode)
        .route(0, 0, tokens)
        .load_balance_pct
        for s in (0.0, 0.2, 0.5, 1.0)
    ]
    assert balance == sorted(balance, reverse=True)
    assert balance[0] > 90 > balance[2]

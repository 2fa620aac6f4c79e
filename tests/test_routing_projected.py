"""Count-level routing for many experts (inclusion probabilities, projected counts, their
Gaussian limit) against exact enumeration and against the exact per-token sampler.

Stated tolerances: means within 5 standard errors; variances of per-expert and per-EP-rank
counts within 10 % of the per-token sampler's (sampling error of a variance ratio from 2,000
draws: ~4.5 %, plus Hajek's approximation, < 1 % here); chi-square homogeneity of binned
counts p > 0.001 (fixed seeds, deterministic).
"""

from __future__ import annotations

import naive_routing as naive
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustersim.routing import Router
from clustersim.routing.dispatch import TopkSampler, count_by_source, token_offsets_of
from clustersim.routing.gating import expert_popularity
from clustersim.routing.inclusion import inclusion_probabilities
from clustersim.routing.projected import ProjectedSampler
from clustersim.routing.subsets import SubsetSampler
from clustersim.spec.schema import MoESpec


@pytest.mark.parametrize(
    ("experts", "k", "skew"),
    [(8, 1, 1.0), (8, 2, 0.3), (8, 2, 2.0), (12, 4, 0.5), (16, 3, 3.0), (10, 9, 0.3)],
)
def test_inclusion_matches_subset_enumeration(experts, k, skew):
    p = expert_popularity(experts, skew, 0, 1)
    subsets = SubsetSampler(p, k)
    exact = subsets.probabilities @ subsets._incidence  # sum over the subsets holding e
    assert np.abs(inclusion_probabilities(p, k) - exact).max() < 1e-10


def test_inclusion_of_uniform_popularity_and_all_experts():
    assert np.allclose(inclusion_probabilities(np.ones(128), 8), 8 / 128, atol=1e-12)
    assert np.array_equal(inclusion_probabilities(np.ones(4), 4), np.ones(4))
    pi = inclusion_probabilities(expert_popularity(256, 1.0, 3, 7), 8)
    assert pi.sum() == pytest.approx(8.0, abs=1e-9) and pi.max() < 1


@pytest.mark.parametrize(
    ("popularity", "k"), [(np.array([1.0, -1.0]), 1), (np.ones(3), 4), (np.ones((2, 2)), 1)]
)
def test_inclusion_rejects_bad_input(popularity, k):
    with pytest.raises(ValueError):
        inclusion_probabilities(popularity, k)


@settings(max_examples=40, deadline=None)
@given(
    experts=st.sampled_from([16, 64, 128]),
    k=st.integers(1, 8),
    skew=st.floats(0.0, 2.0),
    tokens=st.lists(st.integers(0, 5000), min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
def test_projected_counts_keep_totals_and_bounds(experts, k, skew, tokens, seed):
    sampler = ProjectedSampler(expert_popularity(experts, skew, seed % 97, 0), k)
    tokens = np.array(tokens)
    counts = sampler.sample_counts_many(np.random.default_rng(seed), tokens)
    assert counts.shape == (tokens.size, experts)
    assert np.array_equal(counts.sum(axis=1), tokens * k)
    assert counts.min() >= 0 and np.all(counts <= tokens[:, None])
    again = sampler.sample_counts_many(np.random.default_rng(seed), tokens)
    assert np.array_equal(counts, again)


@settings(max_examples=25, deadline=None)
@given(
    ep=st.sampled_from([1, 2, 8]),
    rows=st.integers(1, 5),
    tokens=st.integers(200, 8000),
    skew=st.floats(0.0, 0.6),
    seed=st.integers(0, 2**32 - 1),
)
def test_rank_counts_are_consistent(ep, rows, tokens, skew, seed):
    """Every source's row sums to T k; every EP rank's expert totals to its column."""
    sampler = ProjectedSampler(expert_popularity(128, skew, 1, 0), 8)
    rng = np.random.default_rng(seed)
    per_source = rng.integers(tokens // 2, tokens, size=(rows, ep))
    sent, per_expert = sampler.sample_rank_counts_many(rng, per_source, ep)
    assert sent.shape == (rows, ep, ep) and per_expert.shape == (rows, 128)
    assert np.array_equal(sent.sum(axis=2), per_source * 8)
    assert np.array_equal(sent.sum(axis=1), per_expert.reshape(rows, ep, -1).sum(axis=2))
    assert sent.min() >= 0 and per_expert.min() >= 0
    assert np.all(per_expert <= per_source.sum(axis=1, keepdims=True))


def per_token_counts(popularity, k, sources, tokens, seed):
    """The exact sampler's assignments (sources, E) for ``tokens`` tokens per source."""
    rng = np.random.default_rng(seed)
    experts, _ = TopkSampler.build(popularity).sample(rng.random((sources * tokens, k)))
    offsets = token_offsets_of(np.full(sources, tokens))
    return count_by_source(experts, offsets, popularity.size)


def two_sample_chi2_p(a: np.ndarray, b: np.ndarray, bins: int = 10) -> float:
    """Chi-square homogeneity p-value of two samples binned at the pooled deciles."""
    edges = np.unique(np.quantile(np.concatenate([a, b]), np.linspace(0, 1, bins + 1)[1:-1]))
    table = np.array([np.bincount(np.searchsorted(edges, x, side="right"), minlength=edges.size + 1)
                      for x in (a, b)], dtype=float)  # fmt: skip
    table = table[:, table.sum(axis=0) > 0]
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    return naive.chi2_sf(statistic, table.shape[1] - 1)


DRAWS = 2000
TOKENS = 256
EP = 8


@pytest.fixture(scope="module")
def samples():
    """Per-token and projected counts of 2,000 sources of 256 tokens, E = 128, k = 8, skew 0.3."""
    popularity = expert_popularity(128, 0.3, 5, 2)
    exact = per_token_counts(popularity, 8, DRAWS, TOKENS, seed=11)
    sampler = ProjectedSampler(popularity, 8)
    projected = sampler.sample_counts_many(np.random.default_rng(12), np.full(DRAWS, TOKENS))
    sent, per_expert = sampler.sample_rank_counts_many(
        np.random.default_rng(13), np.full((DRAWS, 1), TOKENS * 16), 1
    )
    return popularity, sampler, exact, projected, per_expert


def test_projected_means_are_exact(samples):
    _, sampler, exact, projected, per_expert = samples
    mean = TOKENS * sampler.inclusion
    stderr = np.sqrt(TOKENS * sampler.inclusion * (1 - sampler.inclusion) / DRAWS)
    assert np.all(np.abs(projected.mean(axis=0) - mean) < 5 * stderr)
    assert np.all(np.abs(exact.mean(axis=0) - mean) < 5 * stderr)  # the sampler it replaces
    assert np.all(np.abs(per_expert.mean(axis=0) - 16 * mean) < 5 * 4 * stderr)


def test_projected_variances_match_per_token(samples):
    _, _, exact, projected, per_expert = samples
    ratio = projected.var(axis=0) / exact.var(axis=0)
    assert 0.97 < np.median(ratio) < 1.03 and ratio.min() > 0.8 and ratio.max() < 1.2
    ranks = projected.reshape(DRAWS, EP, -1).sum(axis=2).var(axis=0)
    exact_ranks = exact.reshape(DRAWS, EP, -1).sum(axis=2).var(axis=0)
    assert np.all(np.abs(ranks / exact_ranks - 1) < 0.15)
    normal = per_expert.var(axis=0) / (16 * exact.var(axis=0))  # 16 x the tokens
    assert 0.95 < np.median(normal) < 1.05


def test_projected_distributions_match_per_token(samples):
    _, _, exact, projected, per_expert = samples
    for e in (0, 31, 64, 127):
        assert two_sample_chi2_p(projected[:, e], exact[:, e]) > 1e-3
    busiest = two_sample_chi2_p(projected.max(axis=1), exact.max(axis=1))
    assert busiest > 1e-3  # the load of the busiest expert, what sets the MoE layer time
    rank = two_sample_chi2_p(projected[:, :16].sum(axis=1), exact[:, :16].sum(axis=1))
    assert rank > 1e-3


def test_router_routes_large_batches_by_rank_counts():
    moe = MoESpec(num_experts=128, top_k=8, router_skew=0.3)
    router = Router(moe, 8, seed=4)
    tokens = np.full((3, 8), 4096)
    out = router.route_many(5, np.arange(3), tokens)
    assert router._normal_fits(5, tokens)
    assert np.array_equal(out.a2a_tokens.sum(axis=2), tokens * 8)
    assert np.array_equal(out.tokens_per_rank, out.tokens_per_expert.reshape(3, 8, -1).sum(2))
    again = Router(moe, 8, seed=4).route_many(5, np.arange(3), tokens)
    assert np.array_equal(out.a2a_tokens, again.a2a_tokens)
    capped = Router(moe.model_copy(update={"capacity_factor": 1.0}), 8, seed=4)
    assert not capped._normal_fits(5, tokens)  # capacity needs per-expert counts per source
    dropped = capped.route_many(5, np.arange(3), tokens).dropped_tokens
    assert np.all(dropped > 0)


def test_node_limited_counts_match_per_token():
    """Node-limited routing (4 nodes of 2 EP ranks, M = 2): rank-level means within 5
    standard errors, variances and the busiest rank's load close to the per-token sampler."""
    moe = MoESpec(num_experts=32, top_k=4, router_skew=0.3, max_nodes_per_token=2)
    rows, tokens = 400, np.full((400, 8), 256)
    counts = Router(moe, 8, 0, gpus_per_node_in_ep=2)
    assert counts._normal_fits(3, tokens)
    a = counts.route_many(3, np.arange(rows), tokens)
    b = Router(moe, 8, 0, gpus_per_node_in_ep=2, mode="tokens").route_many(
        3, np.arange(rows), tokens
    )
    stderr = np.sqrt(b.a2a_tokens.var(axis=0) / rows)
    assert np.all(np.abs(a.a2a_tokens.mean(axis=0) - b.a2a_tokens.mean(axis=0)) < 5 * stderr + 1)
    ratio = a.a2a_tokens.var(axis=0) / b.a2a_tokens.var(axis=0)
    assert 0.9 < np.median(ratio) < 1.1 and ratio.min() > 0.6 and ratio.max() < 1.6
    per_rank = a.tokens_per_rank.var(axis=0) / b.tokens_per_rank.var(axis=0)
    assert np.all(np.abs(per_rank - 1) < 0.3)
    busiest = two_sample_chi2_p(a.tokens_per_rank.max(axis=1), b.tokens_per_rank.max(axis=1))
    assert busiest > 1e-3
    assert np.array_equal(a.a2a_tokens.sum(axis=2), tokens * 4)
    capped = Router(moe.model_copy(update={"capacity_factor": 1.0}), 8, 0, gpus_per_node_in_ep=2)
    assert not capped._by_counts(10**6)  # capacity: per token

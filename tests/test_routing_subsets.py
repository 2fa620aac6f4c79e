"""Count-level routing: k-subset probabilities and multinomial counts."""

from __future__ import annotations

import naive_routing as naive
import numpy as np
import pytest

from clustersim.routing.gating import expert_popularity
from clustersim.routing.subsets import (
    SubsetSampler,
    counts_are_cheaper,
    num_subsets,
    subset_probabilities,
)


def set_probabilities(weights: list[float], k: int) -> dict[tuple[int, ...], float]:
    """P(top-k set) from the enumerated ordered picks."""
    probs: dict[tuple[int, ...], float] = {}
    for order, p in naive.ordered_pick_probabilities(weights, k).items():
        key = tuple(sorted(order))
        probs[key] = probs.get(key, 0.0) + p
    return probs


@pytest.mark.parametrize(
    ("weights", "k"),
    [
        ([0.5, 0.25, 0.15, 0.1], 1),
        ([0.5, 0.25, 0.15, 0.1], 2),
        ([0.5, 0.25, 0.15, 0.1], 3),
        ([0.5, 0.25, 0.15, 0.1], 4),
        ([3.0, 1.0, 1.0, 0.5, 0.2, 0.1], 3),  # unnormalised weights
    ],
)
def test_subset_probabilities_match_enumeration(weights, k):
    sampler = SubsetSampler(np.array(weights), k)
    expected = set_probabilities(weights, k)
    got = {
        tuple(s): p for s, p in zip(sampler.subsets.tolist(), sampler.probabilities, strict=True)
    }
    assert got.keys() == expected.keys()
    for subset, p in expected.items():
        assert got[subset] == pytest.approx(p, rel=1e-12)


def test_subset_probabilities_sum_to_one_for_skewed_popularity():
    popularity = expert_popularity(16, 1.5, seed=0, layer=0)
    subsets = SubsetSampler(popularity, 3).subsets
    assert subset_probabilities(popularity, subsets).sum() == pytest.approx(1.0, abs=1e-12)


def test_sampled_counts_add_up_per_source():
    sampler = SubsetSampler(expert_popularity(8, 0.5, 0, 0), 2)
    tokens = np.array([1000, 0, 37])
    counts = sampler.sample_counts(np.random.default_rng(0), tokens)
    assert counts.shape == (3, 8) and counts.dtype == np.int64
    assert np.array_equal(counts.sum(axis=1), tokens * 2)
    assert np.all(counts <= tokens[:, None])  # a token takes an expert at most once


def test_counts_follow_the_subset_law():
    weights = [0.5, 0.25, 0.15, 0.1]
    sampler = SubsetSampler(np.array(weights), 2)
    expected = set_probabilities(weights, 2)
    draws = 100_000
    per_subset = np.random.default_rng(4).multinomial(draws, sampler.probabilities)
    observed = dict(zip(map(tuple, sampler.subsets.tolist()), per_subset.tolist(), strict=True))
    assert naive.chi_square_p(observed, expected, draws) > 0.001
    # Per-expert counts equal the inclusion probabilities in expectation.
    counts = sampler.sample_counts(np.random.default_rng(5), np.array([draws]))[0]
    inclusion = np.zeros(4)
    for subset, p in expected.items():
        inclusion[list(subset)] += p
    sigma = np.sqrt(draws * inclusion * (1 - inclusion))
    assert np.all(np.abs(counts - draws * inclusion) < 5 * sigma)


def test_when_counts_are_used():
    assert num_subsets(8, 2) == 28 and num_subsets(256, 8) > 10**14
    assert counts_are_cheaper(8, 2, 8, 8 * 2048)  # Mixtral-sized micro-batches
    assert not counts_are_cheaper(8, 2, 8, 16)  # a handful of tokens: sample them
    assert not counts_are_cheaper(256, 8, 8, 10**9)  # too many subsets
    with pytest.raises(ValueError, match="subsets exceed"):
        SubsetSampler(np.ones(256), 8)

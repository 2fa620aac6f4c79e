"""Sequence-length sampling, micro-batch packing and the gating popularity law."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustersim.routing import pack_microbatches, sample_lengths
from clustersim.routing.gating import (
    expert_popularity,
    group_popularity,
    max_to_mean_load,
    zipf_weights,
)
from clustersim.spec.schema import LengthSpec


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_fixed_and_uniform_lengths():
    fixed = sample_lengths(LengthSpec(dist="fixed", value=4096), 5, rng())
    assert fixed.dtype == np.int64 and fixed.tolist() == [4096] * 5
    uniform = sample_lengths(LengthSpec(dist="uniform", min=128, max=131), 4000, rng())
    assert uniform.dtype == np.int64
    assert sorted(set(uniform.tolist())) == [128, 129, 130, 131]  # both ends included
    assert sample_lengths(LengthSpec(dist="uniform", min=7, max=7), 3, rng()).tolist() == [7] * 3


def test_lognormal_mean_and_bounds():
    spec = LengthSpec(dist="lognormal", mean=2000, sigma=0.5, max=100_000)
    lengths = sample_lengths(spec, 200_000, rng(1))
    # sd of the mean: 2000 * sqrt(e^0.25 - 1) / sqrt(2e5) ~ 2.4 tokens; rounding adds < 0.5.
    assert lengths.mean() == pytest.approx(2000, abs=15)
    assert lengths.min() >= 1 and lengths.max() <= 100_000
    clamped = sample_lengths(spec.model_copy(update={"min": 1500, "max": 2500}), 10_000, rng(1))
    assert clamped.min() == 1500 and clamped.max() == 2500


def test_empirical_draws_only_values_from_the_file(tmp_path: Path):
    path = tmp_path / "lengths.csv"
    path.write_text("id,prompt_len\n1,17\n2,300\n3,4096\n4,300\n", encoding="utf-8")
    spec = LengthSpec(dist="empirical", file=str(path), column="prompt_len")
    lengths = sample_lengths(spec, 5000, rng())
    assert set(lengths.tolist()) == {17, 300, 4096}
    assert np.mean(lengths == 300) == pytest.approx(0.5, abs=0.03)  # with replacement
    capped = sample_lengths(spec.model_copy(update={"min": 100, "max": 1000}), 100, rng())
    assert set(capped.tolist()) <= {100, 300, 1000}
    given_values = sample_lengths(spec, 10, rng(), empirical_lengths=np.array([5, 6]))
    assert set(given_values.tolist()) <= {5, 6}


def test_same_generator_state_same_lengths():
    spec = LengthSpec(dist="lognormal", mean=500, sigma=1.0, max=8192)
    assert np.array_equal(sample_lengths(spec, 50, rng(9)), sample_lengths(spec, 50, rng(9)))


def test_bad_sampling_input():
    with pytest.raises(ValueError, match="n must"):
        sample_lengths(LengthSpec(dist="fixed", value=1), -1, rng())
    spec = LengthSpec(dist="empirical", file="x.csv", column="c")
    with pytest.raises(ValueError, match="non-empty"):
        sample_lengths(spec, 3, rng(), empirical_lengths=np.array([], np.int64))


@given(
    lengths=st.lists(st.integers(1, 5000), max_size=60),
    size=st.integers(1, 10),
    budget=st.integers(1, 12_000),
)
@settings(max_examples=100, deadline=None)
def test_packing_conserves_sequences(lengths, size, budget):
    by_count = pack_microbatches(np.array(lengths, dtype=np.int64), micro_batch_size=size)
    assert np.concatenate([[]] + by_count).tolist() == lengths
    assert all(len(mb) == size for mb in by_count[:-1]) and all(len(mb) > 0 for mb in by_count)
    by_tokens = pack_microbatches(np.array(lengths, dtype=np.int64), token_budget=budget)
    assert np.concatenate([[]] + by_tokens).tolist() == lengths
    for i, mb in enumerate(by_tokens):
        assert len(mb) == 1 or mb.sum() <= budget  # only a lone long sequence may exceed
        if i + 1 < len(by_tokens):
            assert mb.sum() + by_tokens[i + 1][0] > budget  # greedy: the next one did not fit


def test_packing_needs_exactly_one_rule():
    with pytest.raises(ValueError, match="exactly one"):
        pack_microbatches(np.array([1, 2]))
    with pytest.raises(ValueError, match="exactly one"):
        pack_microbatches(np.array([1, 2]), micro_batch_size=1, token_budget=3)
    with pytest.raises(ValueError, match=">= 1"):
        pack_microbatches(np.array([1, 2]), token_budget=0)


def test_zipf_law():
    assert zipf_weights(4, 0.0).tolist() == [0.25] * 4
    w = zipf_weights(3, 1.0)
    assert w.tolist() == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    assert max_to_mean_load(8, 0.0) == pytest.approx(1.0)
    assert max_to_mean_load(64, 1.0) == pytest.approx(64 / sum(1 / r for r in range(1, 65)))
    with pytest.raises(ValueError):
        zipf_weights(4, -1.0)


def test_popularity_is_a_per_layer_permutation_of_the_law():
    layers = [expert_popularity(16, 0.8, seed=3, layer=layer) for layer in range(4)]
    for p in layers:
        assert sorted(p.tolist()) == pytest.approx(sorted(zipf_weights(16, 0.8).tolist()))
    hot = {int(np.argmax(p)) for p in layers}
    assert len(hot) > 1  # hot experts differ between layers
    assert np.array_equal(layers[1], expert_popularity(16, 0.8, seed=3, layer=1))
    assert not np.array_equal(layers[1], expert_popularity(16, 0.8, seed=4, layer=1))


def test_group_popularity():
    p = np.array([0.1, 0.2, 0.3, 0.4])
    assert group_popularity(p, 2).tolist() == pytest.approx([0.3, 0.7])
    with pytest.raises(ValueError):
        group_popularity(p, 3)

"""The routing kernels against the pure-Python references in naive_routing.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import naive_routing as naive
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustersim.routing import dispatch

ROOT = Path(__file__).resolve().parent.parent


def random_popularity(rng: np.random.Generator, num_experts: int, skew: float) -> np.ndarray:
    """Positive weights, some much larger than others when skew > 0."""
    return rng.random(num_experts) ** (1 + 4 * skew) + 1e-3


def group_inputs(rng, num_experts, num_tokens, experts_per_group, groups_per_token):
    """group_of, group table and group uniforms for a node-limited draw."""
    group_of = np.arange(num_experts) // experts_per_group
    return group_of, rng.random((num_tokens, groups_per_token))


@pytest.mark.parametrize(
    ("num_experts", "k", "skew", "max_rejections", "groups"),
    [
        (8, 2, 0.0, 32, None),
        (8, 2, 1.0, 32, None),
        (16, 4, 1.0, 0, None),  # every duplicate falls back to the exact scan
        (6, 3, 0.5, 32, None),
        (8, 5, 0.5, 32, None),  # k > E/2: pool scans
        (8, 8, 1.0, 32, None),
        (12, 3, 0.5, 32, (3, 2)),  # node-limited: 4 groups of 3, 2 per token
        (12, 2, 1.0, 1, (2, 3)),
        (8, 6, 0.5, 32, (2, 3)),  # node-limited with pool scans
    ],
)
def test_sample_topk_matches_reference(num_experts, k, skew, max_rejections, groups):
    rng = np.random.default_rng(num_experts * 100 + k)
    popularity = random_popularity(rng, num_experts, skew)
    uniforms = rng.random((300, k))
    group_of, group_uniforms = None, None
    if groups:
        group_of, group_uniforms = group_inputs(rng, num_experts, 300, *groups)
    experts, keys = dispatch.sample_topk(
        popularity,
        uniforms,
        group_of=group_of,
        group_uniforms=group_uniforms,
        max_rejections=max_rejections,
        want_keys=True,
    )
    table = dispatch.sampling_table(popularity)
    group_of_ref = np.zeros(num_experts, np.int64) if group_of is None else group_of
    group_table = dispatch.sampling_table(np.bincount(group_of_ref, weights=naive.widths(table)))
    ref_experts, ref_keys = naive.sample_topk(
        table.tolist(),
        uniforms.tolist(),
        group_of_ref.tolist(),
        group_table.tolist(),
        (np.empty((300, 0)) if group_uniforms is None else group_uniforms).tolist(),
        max_rejections,
    )
    assert experts.tolist() == ref_experts
    np.testing.assert_allclose(keys, ref_keys, rtol=1e-12)
    no_keys_experts, no_keys = dispatch.sample_topk(
        popularity,
        uniforms,
        group_of=group_of,
        group_uniforms=group_uniforms,
        max_rejections=max_rejections,
    )
    assert no_keys is None
    assert np.array_equal(no_keys_experts, experts)


@given(
    weights=st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=40),
)
@settings(max_examples=60, deadline=None)
def test_alias_table_implies_the_weights(weights):
    table = dispatch.sampling_table(np.array(weights))
    implied = naive.alias_probabilities(table.tolist())
    np.testing.assert_allclose(implied, np.array(weights) / sum(weights), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(table[0], np.cumsum(weights), rtol=1e-12)


@given(
    seed=st.integers(0, 2**32 - 1),
    num_experts=st.integers(1, 24),
    data=st.data(),
)
@settings(max_examples=60, deadline=None)
def test_sampled_experts_are_distinct_and_in_range(seed, num_experts, data):
    k = data.draw(st.integers(1, num_experts))
    rng = np.random.default_rng(seed)
    popularity = random_popularity(rng, num_experts, data.draw(st.floats(0, 2)))
    experts, keys = dispatch.sample_topk(popularity, rng.random((50, k)), want_keys=True)
    assert experts.min() >= 0 and experts.max() < num_experts
    assert all(len(set(row)) == k for row in experts.tolist())
    assert np.all(np.diff(keys, axis=1) <= 0)  # later picks arrive later


def test_node_limited_picks_stay_within_m_groups():
    rng = np.random.default_rng(3)
    group_of, group_uniforms = group_inputs(rng, 32, 2000, 4, 2)
    experts, _ = dispatch.sample_topk(
        random_popularity(rng, 32, 1.0),
        rng.random((2000, 4)),
        group_of=group_of,
        group_uniforms=group_uniforms,
    )
    groups_used = [len(set(group_of[row])) for row in experts]
    assert max(groups_used) <= 2


def token_layout(rng, num_sources, max_tokens):
    tokens = rng.integers(0, max_tokens, size=num_sources)
    return tokens, dispatch.token_offsets_of(tokens)


@pytest.mark.parametrize("seed", range(4))
def test_counts_capacity_and_dispatch_match_reference(seed):
    rng = np.random.default_rng(seed)
    num_experts, k, ep = 8, 2, 4
    tokens, offsets = token_layout(rng, ep, 60)
    popularity = random_popularity(rng, num_experts, 1.0)
    experts, keys = dispatch.sample_topk(
        popularity, rng.random((int(tokens.sum()), k)), want_keys=True
    )
    counts = dispatch.count_by_source(experts, offsets, num_experts)
    assert counts.tolist() == naive.count_by_source(experts.tolist(), offsets.tolist(), 8)
    capacity = dispatch.megatron_capacity(tokens, k, num_experts, 0.8)
    first = dispatch.keep_mask(experts, offsets, capacity, policy="position", num_experts=8)
    assert first.tolist() == naive.keep_first(experts.tolist(), offsets.tolist(), capacity)
    highest = dispatch.keep_mask(
        experts, offsets, capacity, policy="probs", num_experts=8, keys=keys
    )
    expected = naive.keep_highest(experts.tolist(), keys.tolist(), offsets.tolist(), capacity)
    assert highest.tolist() == expected
    for kept in (first, highest):  # both keep min(count, capacity) per source and expert
        kept_counts = naive.count_by_source(
            [
                [e for e, ok in zip(row, keep, strict=True) if ok]
                for row, keep in zip(experts.tolist(), kept.tolist(), strict=True)
            ],
            offsets.tolist(),
            8,
        )
        assert np.array_equal(kept_counts, np.minimum(counts, capacity[:, None]))
    matrix = dispatch.dispatch_matrix(counts, ep)
    assert matrix.tolist() == naive.dispatch_matrix(counts.tolist(), ep)


def test_keep_highest_breaks_ties_by_position():
    experts = np.zeros((5, 1), np.int32)
    keys = np.array([[1.0], [2.0], [2.0], [0.5], [2.0]])
    kept = dispatch.keep_mask(
        experts, np.array([0, 5]), np.array([2]), policy="probs", num_experts=1, keys=keys
    )
    assert kept.ravel().tolist() == [False, True, True, False, False]


def test_zero_capacity_drops_everything():
    experts = np.array([[0, 1], [1, 0]], np.int32)
    for policy in ("probs", "position"):
        kept = dispatch.keep_mask(
            experts,
            np.array([0, 2]),
            np.array([0]),
            policy=policy,
            num_experts=2,
            keys=np.ones((2, 2)),
        )
        assert not kept.any()


def test_megatron_capacity_formula():
    assert dispatch.megatron_capacity(4096, 2, 8, 1.25).item() == 1280
    assert dispatch.megatron_capacity(100, 2, 8, 1.25).item() == 32  # ceil(31.25)
    assert dispatch.megatron_capacity(np.array([0, 7]), 1, 64, 1.0).tolist() == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"popularity": np.array([1.0, 0.0])}, "> 0"),
        ({"popularity": np.ones((2, 2))}, "1-D"),
        ({"uniforms": np.full((3, 2), 1.0)}, r"\[0, 1\)"),
        ({"uniforms": np.zeros(3)}, "2-D"),
        ({"uniforms": np.zeros((3, 5))}, "5 distinct experts out of 4"),
        ({"group_of": np.array([0, 0, 2, 2]), "group_uniforms": np.zeros((3, 1))}, "group"),
        ({"group_of": np.array([0, 0, 0, 1]), "group_uniforms": np.zeros((3, 1))}, "fewer"),
        ({"max_rejections": -1}, "max_rejections"),
    ],
)
def test_sample_topk_rejects_bad_input(kwargs, message):
    args = {"popularity": np.ones(4), "uniforms": np.zeros((3, 2)), **kwargs}
    with pytest.raises(ValueError, match=message):
        dispatch.sample_topk(args.pop("popularity"), args.pop("uniforms"), **args)


def test_count_and_keep_reject_bad_input():
    experts = np.zeros((4, 2), np.int32)
    with pytest.raises(ValueError, match="run from 0"):
        dispatch.count_by_source(experts, np.array([0, 3]), 2)
    with pytest.raises(ValueError, match="expert indices"):
        dispatch.count_by_source(experts + 5, np.array([0, 4]), 2)
    with pytest.raises(ValueError, match="needs keys"):
        dispatch.keep_mask(experts, np.array([0, 4]), np.array([1]), policy="probs", num_experts=2)
    with pytest.raises(ValueError, match="policy"):
        dispatch.keep_mask(experts, np.array([0, 4]), np.array([1]), policy="x", num_experts=2)
    with pytest.raises(ValueError, match="capacity"):
        dispatch.keep_mask(
            experts, np.array([0, 4]), np.array([1, 1]), policy="position", num_experts=2
        )
    with pytest.raises(ValueError, match="split"):
        dispatch.dispatch_matrix(np.zeros((2, 6)), 4)


_SCRIPT = """
import json, numpy as np
from clustersim.routing import Router
from clustersim.spec.schema import MoESpec
out = []
for cf, policy, limit in [(None, "probs", None), (0.9, "probs", 1), (1.1, "position", None)]:
    moe = MoESpec(num_experts=8, top_k=2, capacity_factor=cf, drop_policy=policy,
                  router_skew=0.7, max_nodes_per_token=limit)
    router = Router(moe, ep=4, seed=5, gpus_per_node_in_ep=2, mode="tokens")
    o = router.route(1, 2, np.array([40, 0, 25, 31]))
    out.append([o.a2a_tokens.tolist(), o.dropped_tokens, o.fully_dropped_tokens])
print(json.dumps(out))
"""


def run_script(disable_jit: bool) -> list:
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1" if disable_jit else "0"}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def test_kernels_give_the_same_results_without_jit():
    assert run_script(disable_jit=True) == run_script(disable_jit=False)


def test_importing_routing_does_not_import_numba():
    code = "import sys, clustersim.routing; print('numba' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.strip() == "False"

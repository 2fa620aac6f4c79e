"""Router properties: conservation, capacity, determinism, padding, node limits, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from clustersim.routing import (
    Router,
    dropped_tokens_pct,
    load_balance_pct,
    max_to_mean_load,
    uniform_outcome,
)
from clustersim.routing.dispatch import megatron_capacity
from clustersim.routing.subsets import MAX_SUBSETS, num_subsets
from clustersim.spec.schema import MoESpec


@st.composite
def routing_cases(draw):
    """A MoE spec, an EP size, a seed and tokens per source rank."""
    ep = draw(st.sampled_from([1, 2, 4]))
    num_experts = ep * draw(st.integers(1, 4))
    moe = MoESpec(
        num_experts=num_experts,
        top_k=draw(st.integers(1, num_experts)),
        capacity_factor=draw(st.one_of(st.none(), st.floats(0.1, 3.0))),
        router_skew=draw(st.floats(0.0, 2.0)),
        drop_policy=draw(st.sampled_from(["probs", "position"])),
    )
    tokens = np.array(draw(st.lists(st.integers(0, 300), min_size=ep, max_size=ep)))
    return moe, ep, draw(st.integers(0, 2**31)), tokens


MODES = st.sampled_from(["tokens", "counts", "auto"])


def feasible(moe: MoESpec, mode: str) -> bool:
    """Whether ``mode`` can route ``moe`` (counts need few enough k-subsets)."""
    return mode != "counts" or num_subsets(moe.num_experts, moe.top_k) <= MAX_SUBSETS


@given(case=routing_cases(), mode=MODES, layer=st.integers(0, 100), mb=st.integers(0, 100))
@settings(max_examples=120, deadline=None)
def test_routing_conserves_tokens_and_respects_capacity(case, mode, layer, mb):
    moe, ep, seed, tokens = case
    assume(feasible(moe, mode))
    out = Router(moe, ep, seed, mode=mode).route(layer, mb, tokens)
    k = moe.top_k
    assert out.routed_tokens == tokens.sum() * k
    assert out.tokens_per_expert.sum() + out.dropped_tokens == out.routed_tokens  # kept + dropped
    assert out.a2a_tokens.sum() == out.routed_tokens - out.dropped_tokens
    assert np.array_equal(out.a2a_tokens.sum(axis=0), out.tokens_per_rank)
    per_rank = out.tokens_per_expert.reshape(ep, -1).sum(axis=1)
    assert np.array_equal(per_rank, out.tokens_per_rank)
    assert np.all(out.a2a_tokens.sum(axis=1) <= tokens * k)  # a source sends what it keeps
    if mode == "tokens" or out.dropped_tokens == 0:
        assert 0 <= out.fully_dropped_tokens <= tokens.sum()
        assert out.fully_dropped_tokens == 0 or out.dropped_tokens > 0
    if moe.capacity_factor is None:
        assert out.dropped_tokens == 0 and out.capacity is None
        assert np.array_equal(out.a2a_tokens.sum(axis=1), tokens * k)
    else:
        capacity = megatron_capacity(tokens, k, moe.num_experts, moe.capacity_factor)
        assert out.capacity == capacity.max()
        assert np.array_equal(out.capacity_per_source_rank, capacity)
        assert np.all(out.tokens_per_expert <= capacity.sum())  # each source caps each expert
        experts_per_rank = moe.num_experts // ep
        assert np.all(out.a2a_tokens <= capacity[:, None] * experts_per_rank)


@given(case=routing_cases(), cf=st.floats(0.1, 3.0), mode=MODES)
@settings(max_examples=60, deadline=None)
def test_capacity_keeps_min_of_count_and_capacity_per_source(case, cf, mode):
    # Capacity does not change which experts are drawn, so one source rank's capped counts are
    # the dropless counts clipped at the capacity.
    moe, _, seed, tokens = case
    assume(feasible(moe, mode))
    dropless = Router(moe.model_copy(update={"capacity_factor": None}), 1, seed, mode=mode)
    capped = Router(moe.model_copy(update={"capacity_factor": cf}), 1, seed, mode=mode)
    free = dropless.route(3, 4, tokens[:1]).tokens_per_expert
    out = capped.route(3, 4, tokens[:1])
    assert np.array_equal(out.tokens_per_expert, np.minimum(free, out.capacity))
    assert out.dropped_tokens == (free - out.tokens_per_expert).sum()
    assert np.array_equal(out.a2a_tokens.sum(axis=1), [out.tokens_per_expert.sum()])


@given(case=routing_cases(), mode=MODES)
@settings(max_examples=30, deadline=None)
def test_padding_fills_every_expert_to_capacity(case, mode):
    moe, ep, seed, tokens = case
    assume(feasible(moe, mode))
    if moe.capacity_factor is None:
        moe = moe.model_copy(update={"capacity_factor": 1.0})
    padded = moe.model_copy(update={"pad_to_capacity": True})
    plain = Router(moe, ep, seed, mode=mode).route(0, 0, tokens)
    out = Router(padded, ep, seed, mode=mode).route(0, 0, tokens)
    capacity = out.capacity_per_source_rank
    assert np.all(out.tokens_per_expert == capacity.sum())
    assert np.array_equal(
        out.a2a_tokens, np.repeat(capacity[:, None], ep, 1) * (moe.num_experts // ep)
    )
    assert out.dropped_tokens == plain.dropped_tokens  # padding adds compute, not tokens


@pytest.mark.parametrize("mode", ["tokens", "counts"])
def test_same_seed_same_counts_whatever_the_call_order(mode):
    moe = MoESpec(num_experts=16, top_k=2, capacity_factor=1.0, router_skew=0.5)
    tokens = np.array([500, 300, 0, 700])
    calls = [(layer, mb) for layer in range(3) for mb in range(3)]
    first = {c: Router(moe, 4, seed=11, mode=mode).route(*c, tokens) for c in calls}
    router = Router(moe, 4, seed=11, mode=mode)
    for c in reversed(calls):
        again = router.route(*c, tokens)
        assert np.array_equal(again.a2a_tokens, first[c].a2a_tokens)
        assert again.fully_dropped_tokens == first[c].fully_dropped_tokens
    other_seed = Router(moe, 4, seed=12, mode=mode).route(0, 0, tokens)
    assert not np.array_equal(other_seed.tokens_per_expert, first[(0, 0)].tokens_per_expert)
    assert not np.array_equal(first[(0, 1)].tokens_per_expert, first[(0, 0)].tokens_per_expert)


def test_step_zero_is_the_three_part_seed_and_other_steps_differ():
    router = Router(MoESpec(num_experts=8, top_k=2), 2, seed=1)
    tokens = np.array([1000, 1000])
    base = router.route(2, 3, tokens).tokens_per_expert
    assert np.array_equal(router.route(2, 3, tokens, step=0).tokens_per_expert, base)
    assert not np.array_equal(router.route(2, 3, tokens, step=1).tokens_per_expert, base)


def test_chunked_routing_equals_unchunked(monkeypatch):
    from clustersim.routing import router as router_module

    moe = MoESpec(num_experts=8, top_k=2, capacity_factor=1.1, router_skew=0.3)
    tokens = np.array([3000, 2000, 4000, 1000])
    whole = Router(moe, 4, seed=2, mode="tokens").route(0, 0, tokens)
    monkeypatch.setattr(router_module, "_MAX_ASSIGNMENTS_PER_CHUNK", 5000)
    assert list(router_module._source_chunks(tokens, 2)) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    chunked = Router(moe, 4, seed=2, mode="tokens").route(0, 0, tokens)
    # Without a node limit the chunks draw the same uniforms in the same order.
    assert np.array_equal(chunked.a2a_tokens, whole.a2a_tokens)
    assert chunked.fully_dropped_tokens == whole.fully_dropped_tokens


def test_probs_spreads_drops_over_tokens_position_drops_whole_tokens():
    tokens = np.full(4, 20_000)
    fully = {}
    for policy in ("probs", "position"):
        moe = MoESpec(
            num_experts=16, top_k=2, capacity_factor=1.0, router_skew=0.5, drop_policy=policy
        )
        out = Router(moe, 4, seed=0, mode="tokens").route(0, 0, tokens)
        fully[policy] = out.fully_dropped_tokens
        dropped = out.dropped_tokens
    assert fully["position"] > 1.2 * fully["probs"] > 0
    assert dropped > 0


def test_auto_mode_picks_counts_when_cheaper():
    mixtral = MoESpec(num_experts=8, top_k=2, capacity_factor=1.0)
    router = Router(mixtral, 8, 0)
    assert router._by_counts(8 * 4096) and not router._by_counts(8)
    deepseek = Router(MoESpec(num_experts=256, top_k=8), 8, 0)
    assert deepseek._by_counts(10**7)  # C(256, 8) subsets: projected counts
    assert not deepseek._by_counts(8 * 64)  # few tokens: cheaper one by one
    limited = MoESpec(num_experts=256, top_k=8, max_nodes_per_token=4)
    assert Router(limited, 64, 0, gpus_per_node_in_ep=8)._by_counts(10**7)  # batches only
    capped = limited.model_copy(update={"capacity_factor": 1.0})
    assert not Router(capped, 64, 0, gpus_per_node_in_ep=8)._by_counts(10**7)  # per token
    out = router.route(0, 0, np.full(8, 4096))
    assert out.dropped_tokens > 0 and out.fully_dropped_tokens is None  # unknown by counts
    assert Router(mixtral, 8, 0, mode="tokens").route(0, 0, np.full(8, 4096)).fully_dropped_tokens


def test_zero_tokens():
    out = Router(MoESpec(num_experts=4, top_k=2, capacity_factor=1.0), 2, 0).route(0, 0, [0, 0])
    assert out.routed_tokens == 0 and out.dropped_tokens == 0 and out.capacity == 0
    assert out.load_balance_pct == 100.0 and out.dropped_tokens_pct == 0.0


def test_outcome_arrays_are_read_only():
    out = Router(MoESpec(num_experts=4, top_k=1), 2, 0).route(0, 0, [5, 5])
    with pytest.raises(ValueError):
        out.tokens_per_expert[0] = 1


@pytest.mark.parametrize(
    ("gpus_per_node", "limit", "active"),
    [(2, 1, True), (2, 2, True), (2, 4, False), (8, 1, False), (4, 1, True)],
)
def test_node_limit_applies_only_when_it_restricts(gpus_per_node, limit, active):
    moe = MoESpec(num_experts=16, top_k=2, max_nodes_per_token=limit)
    router = Router(moe, 8, 0, gpus_per_node_in_ep=gpus_per_node)
    assert (router._nodes_per_token > 0) == active
    out = router.route(0, 0, np.full(8, 100))
    assert out.tokens_per_expert.sum() == 1600


def test_node_limit_keeps_each_token_on_m_nodes():
    # One token per micro-batch: its experts' ranks must lie on one node (limit 1).
    moe = MoESpec(num_experts=16, top_k=4, max_nodes_per_token=1, router_skew=0.5)
    router = Router(moe, 8, 3, gpus_per_node_in_ep=2)
    for mb in range(50):
        out = router.route(0, mb, np.eye(8, dtype=np.int64)[mb % 8])
        ranks = np.flatnonzero(out.tokens_per_rank)
        assert len(set(ranks // 2)) == 1


@pytest.mark.parametrize(
    ("moe", "ep", "gpus_per_node", "mode", "message"),
    [
        (MoESpec(num_experts=6, top_k=2), 4, None, "auto", "split over ep"),
        (MoESpec(num_experts=8, top_k=2, pad_to_capacity=True), 2, None, "auto", "capacity_f"),
        (MoESpec(num_experts=8, top_k=2, max_nodes_per_token=1), 4, None, "auto", "gpus_per_"),
        (MoESpec(num_experts=12, top_k=2, max_nodes_per_token=1), 6, 4, "auto", "multiple"),
        (MoESpec(num_experts=8, top_k=4, max_nodes_per_token=1), 8, 2, "auto", "fewer than"),
        (MoESpec(num_experts=8, top_k=2, max_nodes_per_token=1), 8, 2, "counts", "node-limit"),
        (MoESpec(num_experts=8, top_k=2), 8, None, "fast", "mode must"),
    ],
)
def test_router_rejects_bad_setups(moe, ep, gpus_per_node, mode, message):
    with pytest.raises(ValueError, match=message):
        Router(moe, ep, 0, gpus_per_node_in_ep=gpus_per_node, mode=mode)


def test_route_rejects_bad_tokens():
    router = Router(MoESpec(num_experts=4, top_k=1), 2, 0)
    with pytest.raises(ValueError, match="shape"):
        router.route(0, 0, [1, 2, 3])
    with pytest.raises(ValueError, match="whole"):
        router.route(0, 0, [1.5, 2])
    with pytest.raises(ValueError, match=">= 0"):
        router.route(-1, 0, [1, 2])


@given(
    ep=st.sampled_from([1, 2, 4, 8]),
    per_rank=st.integers(1, 8),
    data=st.data(),
)
@settings(max_examples=40, deadline=None)
def test_uniform_outcome_is_as_even_as_integers_allow(ep, per_rank, data):
    num_experts = ep * per_rank
    k = data.draw(st.integers(1, num_experts))
    tokens = np.array(data.draw(st.lists(st.integers(0, 1000), min_size=ep, max_size=ep)))
    out = uniform_outcome(num_experts, ep, k, tokens)
    assert out.tokens_per_expert.sum() == tokens.sum() * k == out.routed_tokens
    assert out.tokens_per_expert.max() - out.tokens_per_expert.min() <= 1
    assert np.array_equal(out.a2a_tokens.sum(axis=1), tokens * k)
    assert np.array_equal(out.a2a_tokens.sum(axis=0), out.tokens_per_rank)


def test_metrics():
    assert load_balance_pct(np.array([2, 2, 2, 2])) == 100.0
    assert load_balance_pct(np.array([1, 3])) == pytest.approx(200 / 3)
    assert load_balance_pct(np.zeros(4)) == 100.0
    assert max_to_mean_load(np.array([1, 3])) == pytest.approx(1.5)
    assert dropped_tokens_pct(5, 200) == 2.5 and dropped_tokens_pct(0, 0) == 0.0

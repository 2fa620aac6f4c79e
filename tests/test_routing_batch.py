"""Batched routing (``Router.route_many``, ``dispatch_many``) against single calls and the
per-token sampler: same conservation laws, same distribution, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from clustersim.engine.training.moe import DispatchBatch, EvenSplit, SampledRouting, dispatch_many
from clustersim.routing import Router
from clustersim.spec.schema import MoESpec

MIXTRAL = MoESpec(num_experts=8, top_k=2, router_skew=0.5)


def _tokens(rows: int, ep: int, low: int = 500, high: int = 4000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=(rows, ep))


def _assert_same_loads(batch: np.ndarray, singles: np.ndarray) -> None:
    """Two samples of expert loads (rows, E): the same mean within 5 standard errors, and the
    same spread (a multinomial's variance, not a deterministic split) within 30 %."""
    rows = len(batch)
    se = np.sqrt(batch.var(axis=0) / rows + singles.var(axis=0) / len(singles))
    assert np.all(np.abs(batch.mean(axis=0) - singles.mean(axis=0)) < 5 * se)
    np.testing.assert_allclose(batch.var(axis=0), singles.var(axis=0), rtol=0.3)


@pytest.mark.parametrize(
    ("cf", "pad"), [(None, False), (1.0, False), (1.25, False), (1.0, True), (1.25, True)]
)
def test_batch_conserves_tokens_and_respects_capacity(cf, pad):
    moe = MoESpec(num_experts=8, top_k=2, router_skew=0.5, capacity_factor=cf, pad_to_capacity=pad)
    ep, tokens = 4, _tokens(40, 4)
    out = Router(moe, ep, seed=3).route_many(2, np.arange(40), tokens)
    assert out.routed_tokens.tolist() == (tokens.sum(axis=1) * 2).tolist()
    assert (out.a2a_tokens.sum(axis=1) == out.tokens_per_rank).all()
    assert (out.tokens_per_expert.reshape(40, ep, 2).sum(axis=2) == out.tokens_per_rank).all()
    if cf is None:
        assert (out.dropped_tokens == 0).all()
        assert (out.a2a_tokens.sum(axis=2) == tokens * 2).all()  # every copy leaves its source
    else:
        capacity = np.ceil(tokens * 2 / 8 * cf).astype(np.int64)  # Megatron, per source rank
        per_source = out.a2a_tokens.sum(axis=2)  # copies each source keeps
        if pad:
            assert (per_source == capacity * 8).all()
        else:
            assert (per_source <= capacity * 8).all()
            assert (out.dropped_tokens == tokens.sum(axis=1) * 2 - per_source.sum(axis=1)).all()


def test_batch_is_deterministic_and_keyed():
    router, tokens = Router(MIXTRAL, 8, seed=5), _tokens(16, 8)
    first = router.route_many(1, np.arange(16), tokens)
    again = Router(MIXTRAL, 8, seed=5).route_many(1, np.arange(16), tokens)
    assert np.array_equal(first.tokens_per_expert, again.tokens_per_expert)
    other_keys = router.route_many(1, np.arange(16) + 100, tokens)
    other_layer = router.route_many(2, np.arange(16), tokens)
    other_seed = Router(MIXTRAL, 8, seed=6).route_many(1, np.arange(16), tokens)
    for other in (other_keys, other_layer, other_seed):
        assert not np.array_equal(first.tokens_per_expert, other.tokens_per_expert)


def test_batch_counts_have_the_per_token_distribution():
    """Mean expert loads of batched count-level routing match per-token sampling (an
    independent sampler: the numba top-k kernels) within a few standard errors."""
    rows, ep = 400, 2
    tokens = np.full((rows, ep), 2000)
    batch = Router(MIXTRAL, ep, seed=0, mode="counts").route_many(0, np.arange(rows), tokens)
    per_token = Router(MIXTRAL, ep, seed=0, mode="tokens")  # same popularity
    singles = np.array([per_token.route(0, k, tokens[k]).tokens_per_expert for k in range(rows)])
    _assert_same_loads(batch.tokens_per_expert, singles)


def test_rows_routed_per_token_have_the_single_call_distribution():
    """Rows too small for count-level routing (auto mode) are sampled token by token, all in
    one kernel call: same mean loads and spread as single ``route`` calls, tokens conserved."""
    rows, ep = 400, 8
    tokens = np.full((rows, ep), 40)  # 320 tokens a row: per-token sampling is cheaper
    router = Router(MIXTRAL, ep, seed=2)
    assert not router._by_counts(int(tokens[0].sum()))
    batch = router.route_many(4, np.arange(rows), tokens)
    assert (batch.a2a_tokens.sum(axis=2) == tokens * 2).all()
    singles = np.array([router.route(4, k, tokens[k]).tokens_per_expert for k in range(rows)])
    _assert_same_loads(batch.tokens_per_expert, singles)


def test_node_limited_batch_keeps_tokens_on_their_nodes():
    """One node of two per token: a row's single token sends both its copies to one node."""
    moe = MoESpec(num_experts=8, top_k=2, max_nodes_per_token=1)
    router = Router(moe, 4, seed=0, gpus_per_node_in_ep=2)
    tokens = np.eye(4, dtype=np.int64)[np.arange(12) % 4]  # one token from one source a row
    out = router.route_many(0, np.arange(12), tokens)
    per_node = out.a2a_tokens.reshape(12, 4, 2, 2).sum(axis=3)  # (row, source, node)
    assert ((per_node == 0) | (per_node == 2)).all()
    assert (per_node.sum(axis=(1, 2)) == 2).all()


def test_batch_rejects_bad_input():
    router = Router(MIXTRAL, 4, seed=0)
    with pytest.raises(ValueError, match="shape"):
        router.route_many(0, np.arange(3), np.ones((2, 4)))
    with pytest.raises(ValueError, match="whole numbers"):
        router.route_many(0, np.arange(2), np.full((2, 4), 1.5))
    with pytest.raises(ValueError, match=">= 0"):
        router.route_many(0, np.array([-1, 0]), np.ones((2, 4)))


def test_even_split_batch_equals_single_calls():
    src, tokens = EvenSplit(MIXTRAL, 4), _tokens(5, 4)
    batch = src.dispatch_many(0, np.arange(5), tokens)
    for i in range(5):
        single = src.dispatch(0, i, tokens[i])
        for name in single._fields:
            np.testing.assert_array_equal(getattr(batch.item(i), name), getattr(single, name))


def test_dispatch_many_falls_back_to_single_calls():
    class OneByOne:
        def __init__(self):
            self.calls = []

        def dispatch(self, layer, key, tokens):
            self.calls.append((layer, key))
            return EvenSplit(MIXTRAL, 4).dispatch(layer, key, tokens)

    src, tokens = OneByOne(), _tokens(3, 4)
    batch = dispatch_many(src, 7, np.array([5, 9, 11]), tokens)
    assert src.calls == [(7, 5), (7, 9), (7, 11)]
    assert isinstance(batch, DispatchBatch) and batch.a2a_tokens.shape == (3, 4, 4)
    assert batch.routed_tokens.tolist() == (tokens.sum(axis=1) * 2).tolist()


def test_sampled_routing_batch_matches_router_counts():
    src, tokens = SampledRouting(MIXTRAL, 4, seed=0, gpus_per_node_in_ep=None), _tokens(8, 4)
    batch = src.dispatch_many(0, np.arange(8), tokens)
    out = Router(MIXTRAL, 4, seed=0).route_many(0, np.arange(8), tokens)
    assert np.array_equal(batch.tokens_per_expert, out.tokens_per_expert)
    assert np.array_equal(batch.received_tokens, out.tokens_per_rank)
    assert (
        batch.active_experts == np.count_nonzero(out.tokens_per_expert.reshape(8, 4, 2), axis=2)
    ).all()
    assert src.elapsed_s > 0


def test_batch_per_token_chunks_equal_one_chunk(monkeypatch):
    """Rows are routed per token in chunks of whole rows drawn in order from one stream."""
    from clustersim.routing import router as router_module

    moe, tokens = MoESpec(num_experts=16, top_k=2), _tokens(6, 4, 100, 300)
    whole = Router(moe, 4, seed=2, mode="tokens").route_many(0, np.arange(6), tokens)
    monkeypatch.setattr(router_module, "_MAX_ASSIGNMENTS_PER_CHUNK", 1500)
    chunked = Router(moe, 4, seed=2, mode="tokens").route_many(0, np.arange(6), tokens)
    assert np.array_equal(whole.tokens_per_expert, chunked.tokens_per_expert)
    assert np.array_equal(whole.a2a_tokens, chunked.a2a_tokens)


def test_remembered_routing_routes_each_request_once():
    """A repeated (layer, keys, tokens) request gets the first batch without routing again;
    a different request is routed."""
    from clustersim.engine.training.moe import RememberedRouting

    class Counting:
        def __init__(self):
            self.calls = 0

        def dispatch_many(self, layer, keys, tokens):
            self.calls += 1
            return EvenSplit(MIXTRAL, 4).dispatch_many(layer, keys, tokens)

    inner = Counting()
    src, tokens = RememberedRouting(inner), _tokens(3, 4)
    first = src.dispatch_many(2, np.arange(3), tokens)
    again = src.dispatch_many(2, np.arange(3), tokens.copy())
    assert again is first and inner.calls == 1
    src.dispatch_many(3, np.arange(3), tokens)  # another layer
    src.dispatch_many(2, np.arange(3), tokens + 1)  # other tokens
    assert inner.calls == 3

"""Where the engine gets token counts per expert: one interface, two implementations.

:class:`EvenSplit` spreads every rank's tokens evenly over all experts (no sampling); the
sampled router of ``clustersim.routing`` plugs in through :class:`SampledRouting`. Both return
a :class:`Dispatch` for one EP group, layer and micro-batch, and a :class:`DispatchBatch` for
many at once (``dispatch_many``: the engine routes every EP group and micro-batch of a layer
in one call; :func:`dispatch_many` falls back to one call per row for sources without it).
"""

from __future__ import annotations

import time
from typing import NamedTuple, Protocol

import numpy as np

from clustersim.spec.schema import MoESpec


class Dispatch(NamedTuple):
    """Routing outcome of one EP group for one layer and micro-batch (tokens, not bytes)."""

    a2a_tokens: np.ndarray  # (n, n) token copies sent from member i to member j
    received_tokens: np.ndarray  # (n,) token copies each member's experts compute
    active_experts: np.ndarray  # (n,) experts with at least one token on each member
    tokens_per_expert: np.ndarray  # (E,)
    dropped_tokens: float
    routed_tokens: float


class DispatchBatch(NamedTuple):
    """Routing outcomes of ``B`` calls, stacked along a first axis (the fields of
    :class:`Dispatch`)."""

    a2a_tokens: np.ndarray  # (B, n, n)
    received_tokens: np.ndarray  # (B, n)
    active_experts: np.ndarray  # (B, n)
    tokens_per_expert: np.ndarray  # (B, E)
    dropped_tokens: np.ndarray  # (B,)
    routed_tokens: np.ndarray  # (B,)

    def item(self, i: int) -> Dispatch:
        """Row ``i`` as a :class:`Dispatch`."""
        return Dispatch(
            self.a2a_tokens[i],
            self.received_tokens[i],
            self.active_experts[i],
            self.tokens_per_expert[i],
            float(self.dropped_tokens[i]),
            float(self.routed_tokens[i]),
        )

    @classmethod
    def stack(cls, items: list[Dispatch]) -> DispatchBatch:
        """A batch of single outcomes."""
        return cls(
            *(np.array([getattr(d, f) for d in items], dtype=np.float64) for f in Dispatch._fields)
        )


def dispatch_many(
    source: RoutingSource, layer: int, keys: np.ndarray, tokens: np.ndarray
) -> DispatchBatch:
    """Route ``tokens[i]`` (per member) under ``keys[i]`` for every row, in one call where the
    source can (``dispatch_many``), else one call per row."""
    many = getattr(source, "dispatch_many", None)
    if many is not None:
        return many(layer, keys, tokens)
    return DispatchBatch.stack(
        [source.dispatch(layer, int(k), t) for k, t in zip(keys, tokens, strict=True)]
    )


def dispatch_one(source, layer: int, key: int, tokens_per_member: np.ndarray) -> Dispatch:
    """One outcome of a source that routes batches (``dispatch_many`` with one row)."""
    one = np.asarray(tokens_per_member)[None]
    return source.dispatch_many(layer, np.array([key]), one).item(0)


class RoutingSource(Protocol):
    """Anything that can route one EP group's tokens.

    The engine routes through :func:`dispatch_many` (many EP groups and micro-batches of one
    layer in one call): it calls the source's own ``dispatch_many(layer, keys, tokens)`` when
    the source has one (the samplers and the trace recorder do; replay's recorded routing not)
    falls back to this one required method, row by row."""

    def dispatch(self, layer: int, key: int, tokens_per_member: np.ndarray) -> Dispatch:
        """Route ``tokens_per_member[i]`` tokens of each member; ``key`` is unique per call site."""
        ...


class RememberedRouting:
    """A source that routes each (layer, keys, tokens) request once: a repeated request gets
    the wrapped source's earlier batch. Every source is a pure function of that request (the
    samplers draw from streams seeded by it), so a second pass over the same workload, e.g.
    the one after the shared-link solve, sees identical routing without sampling it again.
    The engine only reads the batches it is given."""

    def __init__(self, inner: RoutingSource):
        self.inner = inner
        self._seen: dict[tuple[int, bytes, bytes], DispatchBatch] = {}

    @property
    def elapsed_s(self) -> float:
        """Wall time the wrapped source spent routing."""
        return getattr(self.inner, "elapsed_s", 0.0)

    def dispatch(self, layer: int, key: int, tokens_per_member: np.ndarray) -> Dispatch:
        """One outcome (through :meth:`dispatch_many`)."""
        return dispatch_one(self, layer, key, tokens_per_member)

    def dispatch_many(self, layer: int, keys: np.ndarray, tokens: np.ndarray) -> DispatchBatch:
        """The wrapped source's batch for this request, routed at its first occurrence."""
        keys, tokens = np.asarray(keys), np.asarray(tokens)
        request = (layer, keys.tobytes(), tokens.tobytes())
        batch = self._seen.get(request)
        if batch is None:
            batch = self._seen[request] = dispatch_many(self.inner, layer, keys, tokens)
        return batch


class EvenSplit:
    """Every token's k copies spread evenly over the E experts (perfect balance, no drops)."""

    def __init__(self, moe: MoESpec, ep: int):
        self.moe, self.ep = moe, ep

    def dispatch(self, layer: int, key: int, tokens_per_member: np.ndarray) -> Dispatch:
        """Even split: member i sends T_i * k / ep copies to every member."""
        return dispatch_one(self, layer, key, tokens_per_member)

    def dispatch_many(self, layer: int, keys: np.ndarray, tokens: np.ndarray) -> DispatchBatch:
        """The even split of every row of ``tokens`` (B, ep)."""
        k, ep, experts = self.moe.top_k, self.ep, self.moe.num_experts
        copies = np.asarray(tokens, dtype=np.float64) * k
        a2a = np.repeat((copies / ep)[:, :, None], ep, axis=2)
        total = copies.sum(axis=1)
        per_expert = np.repeat((total / experts)[:, None], experts, axis=1)
        active = np.where(total > 0, experts // ep, 0)[:, None].repeat(ep, axis=1)
        return DispatchBatch(a2a, a2a.sum(axis=1), active, per_expert, np.zeros(len(total)), total)


class SampledRouting:
    """Token-level sampled routing (``clustersim.routing.Router``): per-layer skewed expert
    popularity, top-k without replacement, capacity and drops."""

    def __init__(self, moe: MoESpec, ep: int, seed: int, gpus_per_node_in_ep: int | None):
        from clustersim.routing.router import Router

        self.router = Router(moe, ep, seed, gpus_per_node_in_ep, mode=moe.routing_sampler)
        self.ep = ep
        self.elapsed_s = 0.0  # wall time spent routing (for the benchmark's routing share)

    def dispatch(self, layer: int, key: int, tokens_per_member: np.ndarray) -> Dispatch:
        """Route by sampling; ``key`` selects the random stream (with the plan's seed)."""
        started = time.perf_counter()
        out = self.router.route(layer, key, tokens_per_member)
        batch = self._batch(
            out.tokens_per_expert[None],
            out.a2a_tokens[None],
            out.tokens_per_rank[None],
            [out.dropped_tokens],
            [out.routed_tokens],
        )
        self.elapsed_s += time.perf_counter() - started
        return batch.item(0)

    def dispatch_many(self, layer: int, keys: np.ndarray, tokens: np.ndarray) -> DispatchBatch:
        """Route a batch (``Router.route_many``: one stream for the rows routed by counts)."""
        started = time.perf_counter()
        out = self.router.route_many(layer, keys, tokens)
        batch = self._batch(
            out.tokens_per_expert,
            out.a2a_tokens,
            out.tokens_per_rank,
            out.dropped_tokens,
            out.routed_tokens,
        )
        self.elapsed_s += time.perf_counter() - started
        return batch

    def _batch(self, tokens_per_expert, a2a_tokens, tokens_per_rank, dropped, routed):
        """The router's integer counts as the engine's float batch (active experts per rank:
        the rank's experts with at least one token)."""
        per_rank = np.asarray(tokens_per_expert).reshape(len(tokens_per_expert), self.ep, -1)
        return DispatchBatch(
            np.asarray(a2a_tokens, dtype=np.float64),
            np.asarray(tokens_per_rank, dtype=np.float64),
            np.count_nonzero(per_rank, axis=2),
            tokens_per_expert,
            np.asarray(dropped, dtype=np.float64),
            np.asarray(routed, dtype=np.float64),
        )

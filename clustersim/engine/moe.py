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
        return Dispatch(self.a2a_tokens[i], self.received_tokens[i], self.active_experts[i],
                        self.tokens_per_expert[i], float(self.dropped_tokens[i]),
                        float(self.routed_tokens[i]))  # fmt: skip

    @classmethod
    def stack(cls, items: list[Dispatch]) -> DispatchBatch:
        """A batch of single outcomes."""
        return cls(*(np.array([getattr(d, f) for d in items], dtype=np.float64)
                     for f in Dispatch._fields))  # fmt: skip


def dispatch_many(
    source: RoutingSource, layer: int, keys: np.ndarray, tokens: np.ndarray
) -> DispatchBatch:
    """Route ``tokens[i]`` (per member) under ``keys[i]`` for every row, in one call where the
    source can (``dispatch_many``), else one call per row."""
    many = getattr(source, "dispatch_many", None)
    if many is not None:
        return many(layer, keys, tokens)
    return DispatchBatch.stack([source.dispatch(layer, int(k), t)
                                for k, t in zip(keys, tokens, strict=True)])  # fmt: skip


class RoutingSource(Protocol):
    """Anything that can route one EP group's tokens."""

    def dispatch(self, layer: int, key: int, tokens_per_member: np.ndarray) -> Dispatch:
        """Route ``tokens_per_member[i]`` tokens of each member; ``key`` is unique per call site."""
        ...


class EvenSplit:
    """Every token's k copies spread evenly over the E experts (perfect balance, no drops)."""

    def __init__(self, moe: MoESpec, ep: int):
        self.moe, self.ep = moe, ep

    def dispatch(self, layer: int, key: int, tokens_per_member: np.ndarray) -> Dispatch:
        """Even split: member i sends T_i * k / ep copies to every member."""
        k, ep, experts = self.moe.top_k, self.ep, self.moe.num_experts
        copies = tokens_per_member.astype(np.float64) * k
        a2a = np.repeat((copies / ep)[:, None], ep, axis=1)
        received = a2a.sum(axis=0)
        per_expert = np.full(experts, copies.sum() / experts)
        active = np.full(ep, experts // ep if copies.sum() > 0 else 0)
        return Dispatch(a2a, received, active, per_expert, 0.0, float(copies.sum()))

    def dispatch_many(self, layer: int, keys: np.ndarray, tokens: np.ndarray) -> DispatchBatch:
        """:meth:`dispatch` for every row of ``tokens`` (B, ep)."""
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

        self.router = Router(moe, ep, seed, gpus_per_node_in_ep)
        self.ep = ep
        self.elapsed_s = 0.0  # wall time spent routing (for the benchmark's routing share)

    def dispatch(self, layer: int, key: int, tokens_per_member: np.ndarray) -> Dispatch:
        """Route by sampling; ``key`` selects the random stream (with the plan's seed)."""
        started = time.perf_counter()
        out = self.router.route(layer, key, tokens_per_member)
        self.elapsed_s += time.perf_counter() - started
        per_rank = out.tokens_per_expert.reshape(self.ep, -1)
        return Dispatch(
            out.a2a_tokens.astype(np.float64),
            out.tokens_per_rank.astype(np.float64),
            np.count_nonzero(per_rank, axis=1),
            out.tokens_per_expert,
            float(out.dropped_tokens),
            float(out.routed_tokens),
        )

    def dispatch_many(self, layer: int, keys: np.ndarray, tokens: np.ndarray) -> DispatchBatch:
        """Route a batch (``Router.route_many``: one stream for the rows routed by counts)."""
        started = time.perf_counter()
        out = self.router.route_many(layer, keys, tokens)
        per_rank = out.tokens_per_expert.reshape(len(keys), self.ep, -1)
        batch = DispatchBatch(
            out.a2a_tokens.astype(np.float64),
            out.tokens_per_rank.astype(np.float64),
            np.count_nonzero(per_rank, axis=2),
            out.tokens_per_expert,
            out.dropped_tokens.astype(np.float64),
            out.routed_tokens.astype(np.float64),
        )
        self.elapsed_s += time.perf_counter() - started
        return batch

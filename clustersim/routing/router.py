"""Routing one MoE layer's tokens for one micro-batch: the interface the engine calls.

:class:`Router` samples each token's experts (gating law in :mod:`clustersim.routing.gating`),
applies Megatron's capacity per expert and per source rank (dropless when
``capacity_factor`` is None), optionally pads every expert to capacity, and returns the counts
the engine needs as a :class:`RoutingOutcome`: tokens each expert and each EP rank computes and
the source-rank x destination-rank all-to-all matrix. :func:`uniform_outcome` is the same
outcome for a perfectly even split, without sampling.

Determinism: ``route(layer, microbatch, tokens, step=s)`` draws from
``SeedSequence([seed, layer, microbatch, s])``; ``step=0`` is the same stream as
``SeedSequence([seed, layer, microbatch])``. The result depends on nothing else, so calls may
come in any order.

Ways to sample: per token (``mode="tokens"``: each token's k experts drawn by the numba
kernels, see :mod:`clustersim.routing.kernels`; exact) or per source rank (``mode="counts"``,
which tokens a capacity drops entirely is then unknown): multinomial counts of
the k-subsets of experts when C(E, k) <= 8192 (:mod:`clustersim.routing.subsets`; exactly the
distribution of per-token sampling), else projected binomial counts with exact means and
Hajek's covariance, or their Gaussian limit for the engine's batches when every count is large
(:mod:`clustersim.routing.projected`; cost independent of the tokens); node-limited routing
only in batches, dropless, from the exact node-set multinomial and that Gaussian limit
(:mod:`clustersim.routing.node_limited`). ``mode="auto"``
(default) takes counts when that is possible and cheaper (Mixtral's E = 8, k = 2; Qwen3's
E = 128, k = 8 with thousands of tokens per rank), tokens otherwise. Different modes draw
different samples from the same seed.

Batches: ``route_many(layer, keys, tokens)`` routes many calls of one layer at once (the
engine routes every micro-batch of every EP group of a layer in one call). Rows routed by
counts are drawn together from one stream, ``SeedSequence([seed, layer, BATCH_STREAM,
*keys])``; rows routed by tokens together from ``SeedSequence([seed, layer, BATCH_STREAM,
TOKEN_STREAM, *keys])``, every (row, source rank) a source of one kernel call (per-token
capacity bookkeeping, which the counts do not need, is skipped). The result depends on the
layer, the keys and the tokens only.

Memory: tokens are routed in chunks of whole source ranks of at most ~4M token-expert
assignments, drawing their uniforms in order from the one generator.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from clustersim.routing import metrics
from clustersim.routing.dispatch import (
    DEFAULT_MAX_REJECTIONS,
    TopkSampler,
    count_by_source,
    dispatch_matrix,
    keep_mask,
    megatron_capacity,
    token_offsets_of,
)
from clustersim.routing.gating import expert_popularity
from clustersim.routing.node_limited import NodeLimitedSampler, node_sets_fit
from clustersim.routing.projected import ProjectedSampler
from clustersim.routing.subsets import (
    MAX_SUBSETS,
    SubsetSampler,
    counts_are_cheaper,
    num_subsets,
    projected_is_cheaper,
)
from clustersim.spec.schema import MoESpec

_MAX_ASSIGNMENTS_PER_CHUNK = 1 << 22
BATCH_STREAM = 2**32 - 1  # marks the batch streams apart from route()'s [seed, layer, mb, step]
TOKEN_STREAM = 1  # within a batch: the rows routed per token


@dataclass(frozen=True, eq=False)
class BatchOutcome:
    """Counts of ``B`` routing calls of one layer, stacked along a first axis (int64):
    ``tokens_per_expert`` (B, E), ``tokens_per_rank`` (B, ep), ``a2a_tokens`` (B, ep, ep),
    ``dropped_tokens`` and ``routed_tokens`` (B,) — per row as in :class:`RoutingOutcome`."""

    tokens_per_expert: np.ndarray
    tokens_per_rank: np.ndarray
    a2a_tokens: np.ndarray
    dropped_tokens: np.ndarray
    routed_tokens: np.ndarray


@dataclass(frozen=True, eq=False)
class RoutingOutcome:
    """Counts of one (layer, micro-batch) after routing; arrays are read-only int64.

    ``tokens_per_expert`` (E,): tokens each expert computes (after drops, padding included).
    ``tokens_per_rank`` (ep,): tokens the experts of each EP rank compute.
    ``a2a_tokens`` (ep, ep): ``[src, dst]`` token-expert assignments sent from source rank
    ``src`` to the rank holding the expert; the diagonal stays on its rank. Row sums are the
    assignments each source rank keeps (plus padding), column sums are ``tokens_per_rank``.
    ``dropped_tokens``: assignments dropped by capacity; ``routed_tokens``: T_total x k.
    ``capacity``: per expert per source rank (the largest over source ranks), None = dropless;
    ``capacity_per_source_rank`` (ep,) the capacity of each source rank.
    ``fully_dropped_tokens``: tokens that lost all k assignments (depends on the drop policy);
    None when routed by counts and a capacity dropped something (per-token data unknown).
    """

    tokens_per_expert: np.ndarray
    tokens_per_rank: np.ndarray
    a2a_tokens: np.ndarray
    dropped_tokens: int
    routed_tokens: int
    capacity: int | None
    capacity_per_source_rank: np.ndarray | None = None
    fully_dropped_tokens: int | None = 0

    def __post_init__(self) -> None:
        for name in ("tokens_per_expert", "tokens_per_rank", "a2a_tokens"):
            getattr(self, name).setflags(write=False)
        if self.capacity_per_source_rank is not None:
            self.capacity_per_source_rank.setflags(write=False)

    @property
    def load_balance_pct(self) -> float:
        """Mean / max tokens per expert x 100."""
        return metrics.load_balance_pct(self.tokens_per_expert)

    @property
    def max_to_mean_load(self) -> float:
        """Max / mean tokens per expert (the busiest expert's slowdown over a balanced one)."""
        return metrics.max_to_mean_load(self.tokens_per_expert)

    @property
    def dropped_tokens_pct(self) -> float:
        """Dropped assignments as a share of routed ones, in %."""
        return metrics.dropped_tokens_pct(self.dropped_tokens, self.routed_tokens)


def _as_token_counts(
    tokens_per_source_rank: np.ndarray, ep: int, rows: int | None = None
) -> np.ndarray:
    tokens = np.asarray(tokens_per_source_rank)
    shape = (ep,) if rows is None else (rows, ep)
    if tokens.shape != shape:
        raise ValueError(f"tokens_per_source_rank must have shape {shape}, got {tokens.shape}")
    whole = tokens.dtype.kind in "iu" or bool(np.all(tokens == np.floor(tokens)))
    if not whole or (tokens.size and tokens.min() < 0):
        raise ValueError("tokens_per_source_rank must hold whole numbers >= 0")
    return tokens.astype(np.int64)


def _outcome(
    counts: np.ndarray, capacity: np.ndarray | None, pad: bool, fully_dropped: int | None
) -> RoutingOutcome:
    """Outcome from assignments per (source rank, expert) and each source rank's capacity."""
    computed, dropped = _apply_capacity(counts, capacity, pad)
    a2a = dispatch_matrix(computed, counts.shape[0])
    return RoutingOutcome(
        tokens_per_expert=computed.sum(axis=0),
        tokens_per_rank=a2a.sum(axis=0),
        a2a_tokens=a2a,
        dropped_tokens=int(dropped),
        routed_tokens=int(counts.sum()),
        capacity=None if capacity is None else int(capacity.max(initial=0)),
        capacity_per_source_rank=capacity,
        fully_dropped_tokens=fully_dropped,
    )


def _apply_capacity(
    counts: np.ndarray, capacity: np.ndarray | None, pad: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Assignments computed (..., S, E) and dropped (...) under each source rank's capacity
    (..., S): Megatron drops locally, per source rank and expert; padding fills to capacity."""
    if capacity is None:
        return counts, np.zeros(counts.shape[:-2], np.int64)
    kept = np.minimum(counts, capacity[..., None])
    dropped = counts.sum(axis=(-2, -1)) - kept.sum(axis=(-2, -1))
    return (np.broadcast_to(capacity[..., None], counts.shape) if pad else kept), dropped


def uniform_outcome(
    num_experts: int, ep: int, top_k: int, tokens_per_source_rank: np.ndarray
) -> RoutingOutcome:
    """Perfectly even routing without sampling or capacity (a baseline for tests and plans).

    Each source rank's ``T_s * k`` assignments are split over the experts as evenly as
    possible; remainders go round-robin, continuing where the previous source rank stopped.
    """
    if num_experts % ep or not 1 <= top_k <= num_experts:
        raise ValueError(f"need ep | E and 1 <= k <= E, got E={num_experts} ep={ep} k={top_k}")
    tokens = _as_token_counts(tokens_per_source_rank, ep)
    counts = np.empty((ep, num_experts), np.int64)
    start = 0
    for s, assignments in enumerate(tokens * top_k):
        base, rest = divmod(int(assignments), num_experts)
        counts[s] = base
        counts[s, (start + np.arange(rest)) % num_experts] += 1
        start = (start + rest) % num_experts
    return _outcome(counts, None, False, 0)


def _source_chunks(tokens: np.ndarray, top_k: int, align: int = 1) -> Iterator[tuple[int, int]]:
    """Consecutive source-rank ranges [lo, hi) of at most the chunk size (or one block of
    ``align`` ranks), cut only at multiples of ``align``."""
    if tokens.sum() * top_k <= _MAX_ASSIGNMENTS_PER_CHUNK:
        yield 0, tokens.size
        return
    lo, size = 0, 0
    blocks = tokens.reshape(-1, align).sum(axis=1) * top_k
    for b, count in enumerate(blocks.tolist()):
        if b * align > lo and size + count > _MAX_ASSIGNMENTS_PER_CHUNK:
            yield lo, b * align
            lo, size = b * align, 0
        size += int(count)
    yield lo, tokens.size


class Router:
    """Samples token-to-expert routing for an EP group of ``ep`` ranks.

    ``moe`` gives E, k, capacity factor, drop policy, padding, skew and node limit.
    ``gpus_per_node_in_ep``: EP ranks per node, needed for ``max_nodes_per_token``; ranks
    ``[n*g, (n+1)*g)`` form node n. ``seed`` drives every draw and ``mode`` picks per-token or
    count-level sampling (see the module docstring).
    """

    def __init__(
        self,
        moe: MoESpec,
        ep: int,
        seed: int,
        gpus_per_node_in_ep: int | None = None,
        *,
        max_rejections: int = DEFAULT_MAX_REJECTIONS,
        mode: Literal["auto", "tokens", "counts"] = "auto",
    ) -> None:
        if ep < 1 or moe.num_experts % ep:
            raise ValueError(f"num_experts ({moe.num_experts}) must split over ep = {ep} ranks")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if moe.pad_to_capacity and moe.capacity_factor is None:
            raise ValueError("pad_to_capacity needs a capacity_factor (as in Megatron)")
        self.moe = moe
        self.ep = ep
        self.seed = seed
        self.max_rejections = max_rejections
        self.experts_per_rank = moe.num_experts // ep
        self._group_of, self._nodes_per_token = self._node_groups(gpus_per_node_in_ep)
        self.mode = self._check_mode(mode)
        self._samplers: dict[int, TopkSampler] = {}
        self._subset_samplers: dict[int, SubsetSampler] = {}
        self._projected_samplers: dict[int, ProjectedSampler] = {}
        self._node_samplers: dict[int, NodeLimitedSampler] = {}
        self._exact_counts = num_subsets(moe.num_experts, moe.top_k) <= MAX_SUBSETS

    def _check_mode(self, mode: str) -> str:
        if mode not in ("auto", "tokens", "counts"):
            raise ValueError(f"mode must be 'auto', 'tokens' or 'counts', got {mode!r}")
        if mode == "counts" and self._nodes_per_token:
            raise ValueError("mode 'counts' does not model node-limited routing; use 'tokens'")
        return mode

    def _by_counts(self, num_tokens: int | np.ndarray) -> bool | np.ndarray:
        """Whether a call of ``num_tokens`` tokens (or each of an array of calls) samples
        counts rather than tokens."""
        if self.mode != "auto":
            return self.mode == "counts"
        moe = self.moe
        if self._nodes_per_token:  # batches only, when every count is large (route_many)
            groups = int(self._group_of.max()) + 1
            if not node_sets_fit(groups, self._nodes_per_token) or moe.capacity_factor:
                return False
            return projected_is_cheaper(moe.num_experts, moe.top_k, self.ep, num_tokens)
        if self._exact_counts:
            return counts_are_cheaper(moe.num_experts, moe.top_k, self.ep, num_tokens)
        return projected_is_cheaper(moe.num_experts, moe.top_k, self.ep, num_tokens)

    def _node_groups(self, gpus_per_node: int | None) -> tuple[np.ndarray | None, int]:
        """Expert -> node map and nodes per token, or (None, 0) when no limit applies."""
        limit = self.moe.max_nodes_per_token
        if limit is None:
            return None, 0
        if gpus_per_node is None or gpus_per_node < 1:
            raise ValueError("max_nodes_per_token needs gpus_per_node_in_ep (EP ranks per node)")
        if gpus_per_node >= self.ep:
            return None, 0
        if self.ep % gpus_per_node:
            raise ValueError(f"ep ({self.ep}) is not a multiple of {gpus_per_node} ranks per node")
        experts_per_node = self.experts_per_rank * gpus_per_node
        if limit >= self.ep // gpus_per_node:
            return None, 0
        if limit * experts_per_node < self.moe.top_k:
            raise ValueError(
                f"max_nodes_per_token = {limit} nodes hold {limit * experts_per_node} experts, "
                f"fewer than top_k = {self.moe.top_k}"
            )
        return np.arange(self.moe.num_experts) // experts_per_node, limit

    def popularity(self, layer: int) -> np.ndarray:
        """Expert popularity (E,) of ``layer`` (see :mod:`clustersim.routing.gating`)."""
        return expert_popularity(self.moe.num_experts, self.moe.router_skew, self.seed, layer)

    def _sampler(self, layer: int) -> TopkSampler:
        """The sampling tables of ``layer``, built on first use."""
        if layer not in self._samplers:
            self._samplers[layer] = TopkSampler.build(self.popularity(layer), self._group_of)
        return self._samplers[layer]

    def _subset_sampler(self, layer: int) -> SubsetSampler:
        """The k-subset probabilities of ``layer``, built on first use."""
        if layer not in self._subset_samplers:
            sampler = SubsetSampler(self.popularity(layer), self.moe.top_k)
            self._subset_samplers[layer] = sampler
        return self._subset_samplers[layer]

    def _projected_sampler(self, layer: int) -> ProjectedSampler:
        """The inclusion probabilities of ``layer``, built on first use."""
        if layer not in self._projected_samplers:
            sampler = ProjectedSampler(self.popularity(layer), self.moe.top_k)
            self._projected_samplers[layer] = sampler
        return self._projected_samplers[layer]

    def _count_sampler(self, layer: int) -> SubsetSampler | ProjectedSampler:
        """Exact subset counts when C(E, k) allows, else projected counts."""
        if self._exact_counts:
            return self._subset_sampler(layer)
        return self._projected_sampler(layer)

    def route(
        self, layer: int, microbatch: int, tokens_per_source_rank: np.ndarray, *, step: int = 0
    ) -> RoutingOutcome:
        """Route the tokens of each source rank of the EP group for (layer, micro-batch, step)."""
        if min(layer, microbatch, step) < 0:
            raise ValueError("layer, microbatch and step must be >= 0")
        tokens = _as_token_counts(tokens_per_source_rank, self.ep)
        moe = self.moe
        seq = np.random.SeedSequence([self.seed, layer, microbatch, step])
        rng = np.random.default_rng(seq)
        capacity = None
        if moe.capacity_factor is not None:
            capacity = megatron_capacity(tokens, moe.top_k, moe.num_experts, moe.capacity_factor)
        if self._by_counts(int(tokens.sum())) and not self._nodes_per_token:
            counts = self._count_sampler(layer).sample_counts_many(rng, tokens[None])[0]
            binding = capacity is not None and np.any(counts > capacity[:, None])
            return _outcome(counts, capacity, moe.pad_to_capacity, None if binding else 0)
        counts = np.zeros((self.ep, moe.num_experts), np.int64)
        fully_dropped = 0
        for lo, hi in _source_chunks(tokens, moe.top_k):
            chunk_capacity = None if capacity is None else capacity[lo:hi]
            counts[lo:hi], dropped = self._route_chunk(
                self._sampler(layer), rng, tokens[lo:hi], chunk_capacity
            )
            fully_dropped += dropped
        return _outcome(counts, capacity, moe.pad_to_capacity, fully_dropped)

    def route_many(self, layer: int, keys: np.ndarray, tokens: np.ndarray) -> BatchOutcome:
        """Route ``B`` calls of ``layer`` at once: ``keys`` (B,) distinct call keys (as the
        ``microbatch`` argument of :meth:`route`), ``tokens`` (B, ep) tokens per source rank."""
        keys = np.asarray(keys, dtype=np.int64)
        if layer < 0 or (keys.size and keys.min() < 0):
            raise ValueError("layer and keys must be >= 0")
        tokens = _as_token_counts(tokens, self.ep, rows=keys.size)
        moe, experts = self.moe, self.moe.num_experts
        by_counts = np.broadcast_to(self._by_counts(tokens.sum(axis=1)), keys.shape).astype(bool)
        if self._nodes_per_token and not (by_counts.all() and self._normal_fits(layer, tokens)):
            by_counts = np.zeros(keys.shape, bool)  # node-limited counts: whole batches only
        counts = np.zeros((keys.size, self.ep, experts), np.int64)
        if by_counts.any():
            seq = np.random.SeedSequence(
                [self.seed, layer, BATCH_STREAM, *keys[by_counts].tolist()]
            )
            rng = np.random.default_rng(seq)
            if by_counts.all() and self._normal_fits(layer, tokens):
                return self._normal_batch(layer, rng, tokens)
            counts[by_counts] = self._count_sampler(layer).sample_counts_many(
                rng, tokens[by_counts]
            )
        if not by_counts.all():  # the other rows per token, all their sources as one chunk
            rows = np.flatnonzero(~by_counts)
            seq = np.random.SeedSequence(
                [self.seed, layer, BATCH_STREAM, TOKEN_STREAM, *keys[rows].tolist()]
            )
            counts[rows] = self._token_counts(layer, np.random.default_rng(seq), tokens[rows])
        capacity = None
        if moe.capacity_factor is not None:
            capacity = megatron_capacity(tokens, moe.top_k, experts, moe.capacity_factor)
        computed, dropped = _apply_capacity(counts, capacity, moe.pad_to_capacity)
        a2a = dispatch_matrix(computed, self.ep)
        return BatchOutcome(computed.sum(axis=1), a2a.sum(axis=1), a2a, dropped,
                            counts.sum(axis=(1, 2)))  # fmt: skip

    def _normal_fits(self, layer: int, tokens: np.ndarray) -> bool:
        """Whether these rows (all of them) may take the Gaussian rank-level counts: no exact
        subset sampler, no capacity, every count large (``ProjectedSampler.normal_fits``)."""
        exact = self._exact_counts and not self._nodes_per_token
        if exact or self.moe.capacity_factor is not None or self.mode == "tokens":
            return False
        return self._normal_sampler(layer).normal_fits(tokens, self.ep)

    def _normal_sampler(self, layer: int) -> ProjectedSampler | NodeLimitedSampler:
        """The Gaussian rank-level sampler of ``layer``: node-limited when a limit applies."""
        if not self._nodes_per_token:
            return self._projected_sampler(layer)
        if layer not in self._node_samplers:
            self._node_samplers[layer] = NodeLimitedSampler(
                self.popularity(layer), self.moe.top_k, self._group_of, self._nodes_per_token
            )
        return self._node_samplers[layer]

    def _normal_batch(
        self, layer: int, rng: np.random.Generator, tokens: np.ndarray
    ) -> BatchOutcome:
        """Every row from the Gaussian limit of the projected counts (dropless)."""
        sent, per_expert = self._normal_sampler(layer).sample_rank_counts_many(rng, tokens, self.ep)
        routed = tokens.sum(axis=1) * self.moe.top_k
        return BatchOutcome(per_expert, sent.sum(axis=1), sent, np.zeros_like(routed), routed)

    def _token_counts(self, layer: int, rng: np.random.Generator, tokens: np.ndarray) -> np.ndarray:
        """Assignments (R, ep, E) of rows ``tokens`` (R, ep) sampled token by token, every
        (row, source rank) a source of the numba kernels, in chunks of whole rows."""
        moe, sampler = self.moe, self._sampler(layer)
        flat = tokens.reshape(-1)
        counts = np.zeros((flat.size, moe.num_experts), np.int64)
        for lo, hi in _source_chunks(flat, moe.top_k, align=self.ep):
            counts[lo:hi] = self._sample_chunk(sampler, rng, flat[lo:hi], want_keys=False)[3]
        return counts.reshape(tokens.shape[0], self.ep, moe.num_experts)

    def _sample_chunk(
        self, sampler: TopkSampler, rng: np.random.Generator, tokens: np.ndarray, want_keys: bool
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        """Each token's experts for a chunk of source ranks (``tokens`` per rank): experts
        (T, k), priority keys (or None), token offsets per rank, counts (S, E)."""
        moe = self.moe
        num_tokens = int(tokens.sum())
        offsets = token_offsets_of(tokens)
        group_uniforms = None
        if self._nodes_per_token:
            group_uniforms = rng.random((num_tokens, self._nodes_per_token))
        experts, keys = sampler.sample(
            rng.random((num_tokens, moe.top_k)),
            group_uniforms,
            max_rejections=self.max_rejections,
            want_keys=want_keys,
        )
        return experts, keys, offsets, count_by_source(experts, offsets, moe.num_experts)

    def _route_chunk(
        self,
        sampler: TopkSampler,
        rng: np.random.Generator,
        tokens: np.ndarray,
        capacity: np.ndarray | None,
    ) -> tuple[np.ndarray, int]:
        """Counts (S, E) of a chunk of source ranks and its tokens that lost every expert."""
        moe = self.moe
        want_keys = capacity is not None and moe.drop_policy == "probs"
        experts, keys, offsets, counts = self._sample_chunk(sampler, rng, tokens, want_keys)
        num_tokens = len(experts)
        if capacity is None or not np.any(counts > capacity[:, None]):
            return counts, 0
        kept = keep_mask(
            experts,
            offsets,
            capacity,
            policy=moe.drop_policy,
            num_experts=moe.num_experts,
            keys=keys,
            counts=counts,
        )
        survives = kept[:, 0].copy()
        for j in range(1, moe.top_k):  # column by column: 10x faster than kept.any(axis=1)
            survives |= kept[:, j]
        return counts, num_tokens - int(np.count_nonzero(survives))

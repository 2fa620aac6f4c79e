"""Validating wrappers of the routing kernels: top-k sampling, counting, capacity and drops.

Each public function checks shapes, dtypes and ranges, allocates the outputs and calls one
kernel of :mod:`clustersim.routing.kernels`, which is imported inside the function so that
importing this module does not import numba. The wrappers work unchanged under
``NUMBA_DISABLE_JIT=1`` (the kernels then run as plain Python).

Conventions: ``T`` tokens, each routed to ``k`` experts out of ``E``; the tokens of source rank
``s`` are the rows ``token_offsets[s]:token_offsets[s + 1]``; expert ``e`` lives on EP rank
``e // (E / ep)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

DEFAULT_MAX_REJECTIONS = 32


def _as_2d_float(name: str, values: np.ndarray) -> np.ndarray:
    values = np.ascontiguousarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"{name} must be 2-D (tokens, draws), got shape {values.shape}")
    if values.size and not (np.all(values >= 0.0) and np.all(values < 1.0)):
        raise ValueError(f"{name} must lie in [0, 1)")
    return values


def _check_weights(name: str, weights: np.ndarray) -> np.ndarray:
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if weights.ndim != 1 or weights.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {weights.shape}")
    if not np.all(np.isfinite(weights)) or not np.all(weights > 0):
        raise ValueError(f"{name} must be finite and > 0")
    return weights


def sampling_table(weights: np.ndarray) -> np.ndarray:
    """Sampling table (3, n) of positive weights: cumulative sums, alias thresholds, aliases."""
    weights = _check_weights("weights", weights)
    table = np.empty((3, weights.size), np.float64)
    from clustersim.routing import kernels

    kernels._build_table(weights, table)
    return table


def _groups(group_of: np.ndarray | None, num_experts: int) -> tuple[np.ndarray, int]:
    if group_of is None:
        return np.zeros(num_experts, np.int64), 1
    group_of = np.ascontiguousarray(group_of, dtype=np.int64)
    if group_of.shape != (num_experts,) or group_of.min() < 0:
        raise ValueError(f"group_of must be ({num_experts},) non-negative group indices")
    num_groups = int(group_of.max()) + 1
    if np.any(np.bincount(group_of, minlength=num_groups) == 0):
        raise ValueError("every group index below the largest must hold an expert")
    return group_of, num_groups


@dataclass(frozen=True, eq=False)
class TopkSampler:
    """Validated sampling tables of one popularity vector, for many calls of :meth:`sample`.

    Build it with :meth:`build`; ``group_of`` (E,) names each expert's group (node) for
    node-limited routing.
    """

    table: np.ndarray
    group_of: np.ndarray
    group_table: np.ndarray

    @classmethod
    def build(cls, popularity: np.ndarray, group_of: np.ndarray | None = None) -> TopkSampler:
        """Tables of ``popularity`` (E,) > 0 and of the groups' total popularity."""
        table = sampling_table(popularity)
        group_of, _ = _groups(group_of, table.shape[1])
        group_mass = np.bincount(group_of, weights=np.diff(table[0], prepend=0.0))
        return cls(table, group_of, sampling_table(group_mass))

    def sample(
        self,
        uniforms: np.ndarray,
        group_uniforms: np.ndarray | None = None,
        *,
        max_rejections: int = DEFAULT_MAX_REJECTIONS,
        want_keys: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """k distinct experts per token; see :func:`sample_topk`."""
        uniforms = _as_2d_float("uniforms", uniforms)
        num_tokens, k = uniforms.shape
        num_experts, num_groups = self.table.shape[1], self.group_table.shape[1]
        if k > num_experts:
            raise ValueError(f"cannot pick {k} distinct experts out of {num_experts}")
        if max_rejections < 0:
            raise ValueError(f"max_rejections must be >= 0, got {max_rejections}")
        if group_uniforms is None:
            group_uniforms = np.empty((num_tokens, 0))
        group_uniforms = _as_2d_float("group_uniforms", group_uniforms)
        if group_uniforms.shape[0] != num_tokens or group_uniforms.shape[1] > num_groups:
            raise ValueError(
                f"group_uniforms must be ({num_tokens}, M) with M <= {num_groups} groups, "
                f"got {group_uniforms.shape}"
            )
        _check_groups_hold_k(self.group_of, num_groups, group_uniforms.shape[1], k)
        experts = np.empty((num_tokens, k), np.int32)
        keys = np.empty((num_tokens, k) if want_keys else (0, 0), np.float64)
        from clustersim.routing import kernels

        kernels._sample_topk(
            self.table,
            uniforms,
            self.group_of,
            self.group_table,
            group_uniforms,
            int(max_rejections),
            bool(want_keys),
            experts,
            keys,
        )
        return experts, (keys if want_keys else None)


def sample_topk(
    popularity: np.ndarray,
    uniforms: np.ndarray,
    *,
    group_of: np.ndarray | None = None,
    group_uniforms: np.ndarray | None = None,
    max_rejections: int = DEFAULT_MAX_REJECTIONS,
    want_keys: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """k distinct experts per token, sampled without replacement in proportion to popularity.

    ``uniforms`` (T, k) in [0, 1) gives one uniform per pick. For node-limited routing,
    ``group_of`` (E,) names each expert's group and ``group_uniforms`` (T, M) picks M groups per
    token first. Returns ``experts`` (T, k) int32 in pick order and, if ``want_keys``, priority
    keys (T, k) float64: ``-exp(-G)`` for the picks' Gumbel-perturbed log-popularities ``G``,
    decreasing along each row; else None. The method and its exactness are described in
    :mod:`clustersim.routing.kernels`. (:class:`TopkSampler` keeps the tables between calls.)
    """
    sampler = TopkSampler.build(popularity, group_of)
    return sampler.sample(
        uniforms, group_uniforms, max_rejections=max_rejections, want_keys=want_keys
    )


def _check_groups_hold_k(group_of: np.ndarray, num_groups: int, m: int, k: int) -> None:
    if m == 0:
        return
    smallest = np.sort(np.bincount(group_of, minlength=num_groups))[:m].sum()
    if smallest < k:
        raise ValueError(f"{m} groups may hold only {smallest} experts, fewer than top_k = {k}")


def _as_experts(experts: np.ndarray) -> np.ndarray:
    experts = np.ascontiguousarray(experts, dtype=np.int32)
    if experts.ndim != 2:
        raise ValueError(f"experts must be 2-D (tokens, k), got shape {experts.shape}")
    return experts


def _as_offsets(token_offsets: np.ndarray, num_tokens: int) -> np.ndarray:
    token_offsets = np.ascontiguousarray(token_offsets, dtype=np.int64)
    if token_offsets.ndim != 1 or token_offsets.size < 2:
        raise ValueError("token_offsets must be 1-D with at least two entries")
    if token_offsets[0] != 0 or token_offsets[-1] != num_tokens:
        raise ValueError(f"token_offsets must run from 0 to the {num_tokens} tokens")
    if np.any(np.diff(token_offsets) < 0):
        raise ValueError("token_offsets must not decrease")
    return token_offsets


def token_offsets_of(tokens_per_source_rank: np.ndarray) -> np.ndarray:
    """Row offsets (S + 1,) of each source rank's tokens: ``[0, T_0, T_0 + T_1, ...]``."""
    return np.concatenate(([0], np.cumsum(tokens_per_source_rank, dtype=np.int64)))


def count_by_source(experts: np.ndarray, token_offsets: np.ndarray, num_experts: int) -> np.ndarray:
    """Assignments (S, E) int64 from each source rank's tokens to each expert."""
    experts = _as_experts(experts)
    token_offsets = _as_offsets(token_offsets, experts.shape[0])
    if experts.size and (experts.min() < 0 or experts.max() >= num_experts):
        raise ValueError(f"expert indices must lie in [0, {num_experts})")
    counts = np.zeros((token_offsets.size - 1, num_experts), np.int64)
    from clustersim.routing import kernels

    kernels._count_by_source(experts, token_offsets, counts)
    return counts


MAX_CAPACITY = 2**62
"""Largest capacity :func:`megatron_capacity` returns (far inside int64)."""


def megatron_capacity(
    tokens: np.ndarray | int, top_k: int, num_experts: int, capacity_factor: float
) -> np.ndarray:
    """Megatron ``get_capacity``: ``ceil(T * k / E * cf)`` per source rank (int64).

    Computed in float64 and capped at ``MAX_CAPACITY`` (2**62) before the cast, so that a huge
    capacity factor never wraps around to a negative int64 capacity (which would drop every
    token); a capacity that large never binds, padding aside. ValueError for a capacity factor
    that is not a finite positive number."""
    if not (np.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor}")
    tokens = np.asarray(tokens, dtype=np.int64)
    capacity = np.ceil(tokens * (top_k / num_experts * float(capacity_factor)))
    return np.minimum(capacity, float(MAX_CAPACITY)).astype(np.int64)


def keep_mask(
    experts: np.ndarray,
    token_offsets: np.ndarray,
    capacity: np.ndarray,
    *,
    policy: Literal["probs", "position"],
    num_experts: int,
    keys: np.ndarray | None = None,
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """Which assignments (T, k) survive the capacity of each expert on each source rank.

    ``capacity`` (S,) is per expert, per source rank (Megatron drops locally). Policy
    "position" keeps each expert's earliest tokens; "probs" keeps its highest ``keys`` (the
    priority keys of :func:`sample_topk`, ordered like the perturbed logits; ties keep the
    earlier token). ``counts`` may pass :func:`count_by_source` of the same arguments.
    """
    experts = _as_experts(experts)
    token_offsets = _as_offsets(token_offsets, experts.shape[0])
    capacity = np.ascontiguousarray(capacity, dtype=np.int64)
    if capacity.shape != (token_offsets.size - 1,) or np.any(capacity < 0):
        raise ValueError(f"capacity must be ({token_offsets.size - 1},) and >= 0")
    kept = np.empty(experts.shape, np.bool_)
    from clustersim.routing import kernels

    if policy == "position":
        kernels._keep_first(experts, token_offsets, capacity, int(num_experts), kept)
    elif policy == "probs":
        if keys is None or np.shape(keys) != experts.shape:
            raise ValueError(f"policy 'probs' needs keys of shape {experts.shape}")
        keys = np.ascontiguousarray(keys, dtype=np.float64)
        if counts is None:
            counts = count_by_source(experts, token_offsets, num_experts)
        counts = np.ascontiguousarray(counts, dtype=np.int64)
        if counts.shape != (token_offsets.size - 1, num_experts):
            raise ValueError(f"counts must have shape ({token_offsets.size - 1}, {num_experts})")
        kernels._keep_highest(experts, keys, token_offsets, counts, capacity, kept)
    else:
        raise ValueError(f"policy must be 'probs' or 'position', got {policy!r}")
    return kept


def dispatch_matrix(counts_by_source: np.ndarray, ep: int) -> np.ndarray:
    """All-to-all assignments (S, ep) int64: ``[s, r]`` = sum of counts to the experts of rank r
    (any leading batch axes are kept: (..., S, E) -> (..., S, ep))."""
    counts_by_source = np.asarray(counts_by_source, dtype=np.int64)
    num_experts = counts_by_source.shape[-1]
    if ep < 1 or num_experts % ep:
        raise ValueError(f"{num_experts} experts do not split over ep = {ep} ranks")
    shape = counts_by_source.shape[:-1] + (ep, num_experts // ep)
    return counts_by_source.reshape(shape).sum(axis=-1)

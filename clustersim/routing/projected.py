"""Count-level routing for many experts: projected binomial counts (cost independent of tokens).

When C(E, k) is too large for :mod:`clustersim.routing.subsets` (Qwen3: C(128, 8) ~ 1.4e12),
the assignments of ``T`` tokens of one source rank to each expert are drawn in O(E), without
drawing tokens:

1. Every token takes expert e with probability ``pi_e``, the exact inclusion probability of
   top-k routing (:mod:`clustersim.routing.inclusion`), independently across tokens, so the
   per-token count ``C_e`` of expert e is exactly ``Binomial(T, pi_e)``. Draw
   ``Y_e ~ Binomial(T, pi_e)`` independently for every expert.
2. The ``Y_e`` ignore that each token takes exactly k experts: their total misses ``T k`` by
   ``D = sum(Y) - T k``. Remove ``D`` in proportion to ``v_e = pi_e (1 - pi_e)``:
   ``C = Y - D v / sum(v)``, the integer split of ``D`` drawn by systematic sampling (each
   expert's share rounded down or up, unbiasedly, the total exact).

Properties (tested against the per-token sampler in ``tests/test_routing_projected.py``):

- ``sum(C) = T k`` exactly and ``0 <= C_e <= T``.
- Means exact: ``E[C_e] = T pi_e`` (D has mean 0 and the split is unbiased), except when a
  bound is hit: a count pushed below 0 or above T is clipped and the excess moved to the
  other experts (only when ``T pi_e`` is a few tokens; ``mode="auto"`` routes such sources
  token by token).
- Covariance: ``T (diag(v) - v v^T / sum(v))`` plus the rounding of the split (< 1/4 per
  expert). This is Hajek's approximation of the covariance of high-entropy fixed-size
  designs, to which sampling without replacement in proportion to p belongs: the variance of
  ``C_e`` is low by the factor ``1 - v_e / sum(v)`` (0.8 % for E = 128, k = 8), and the
  covariances of pairs are the rank-one term instead of the exact ``pi_ef - pi_e pi_f``. The
  per-token sampler (``mode="tokens"``) stays exact.

Faster still, when only what the engine needs is wanted (no capacity): the assignments each
source rank sends to each EP rank (S x ep) and the row's total per expert (E), drawn from the
Gaussian with the same mean and covariance as the projected counts, which is their
large-count limit: ``S ep + E`` normal draws per row instead of ``S E`` binomials
(:meth:`ProjectedSampler.sample_rank_counts_many`). Per source rank s and EP rank r
(``V_r = sum of v_e`` over r's experts, ``d = sum(v)``)::

    x_sr = T_s Pi_r + b_sr - V_r sum_r' b_sr' / d,      b_sr ~ N(0, T_s V_r)

and the per-expert totals of the row given the ``b`` (``T`` the row's tokens, ``h_e ~ N(0, 1)``,
``z_e = sqrt(T v_e) h_e``, ``Z_r`` and ``B_r`` the sums of ``z`` and ``b`` over r)::

    y_e = T pi_e + B_r v_e / V_r + z_e - v_e Z_r / V_r - v_e sum(b) / d

This is exactly the joint law of (rank sums per source, expert sums) of the Gaussian
``T_s pi + sqrt(T_s) (diag(v) - v v^T / d)^(1/2) g_s``. Both are rounded keeping the sums
(systematic rounding, unbiased): every source's row sums to ``T_s k`` and every EP rank's
expert totals to its column of the all-to-all. ``mode="auto"`` uses it only when every
standard deviation involved is at least ``MIN_NORMAL_SD`` tokens (a Gaussian count 5 standard
deviations from 0 is clipped with probability < 3e-7); the error against the projected
binomials is then that of the normal approximation of a binomial of that variance.
"""

from __future__ import annotations

import numpy as np

from clustersim.routing.inclusion import inclusion_probabilities

MIN_NORMAL_SD = 5.0  # tokens: smallest standard deviation sampled as a Gaussian


class ProjectedSampler:
    """Projected binomial counts of one popularity vector (see the module docstring)."""

    def __init__(self, popularity: np.ndarray, top_k: int) -> None:
        self.top_k = int(top_k)
        self.inclusion = inclusion_probabilities(popularity, top_k)
        variance = self.inclusion * (1.0 - self.inclusion)
        total = variance.sum()
        self._share = variance / total if total > 0 else np.full(variance.size, 1 / variance.size)

    def sample_counts_many(self, rng: np.random.Generator, tokens: np.ndarray) -> np.ndarray:
        """Assignments (..., E) int64 for ``tokens`` (...) tokens per source rank."""
        tokens = np.asarray(tokens, dtype=np.int64)
        flat = tokens.reshape(-1)
        drawn = rng.binomial(flat[:, None], self.inclusion[None, :])  # (N, E)
        excess = drawn.sum(axis=1) - flat * self.top_k  # (N,)
        split = _systematic_split(np.abs(excess), self._share, rng.random(flat.size))
        counts = drawn - np.sign(excess)[:, None] * split
        bad = np.flatnonzero(((counts < 0) | (counts > flat[:, None])).any(axis=1))
        for row in bad.tolist():  # rare: small counts pushed past a bound
            counts[row] = _repair(counts[row], int(flat[row]), self._share)
        return counts.reshape(*tokens.shape, -1)

    def normal_fits(self, tokens: np.ndarray, ep: int) -> bool:
        """Whether every standard deviation of :meth:`sample_rank_counts_many` for ``tokens``
        (B, S) is at least ``MIN_NORMAL_SD`` tokens (and no count is certain)."""
        tokens = np.asarray(tokens)
        if tokens.size == 0 or self.inclusion.max() >= 1.0:
            return False
        per_rank = self._variance.reshape(ep, -1).sum(axis=1)
        smallest_source = float(tokens.min()) * float(per_rank.min())
        smallest_row = float(tokens.sum(axis=1).min()) * float(self._variance.min())
        return min(smallest_source, smallest_row) >= MIN_NORMAL_SD**2

    def sample_rank_counts_many(
        self, rng: np.random.Generator, tokens: np.ndarray, ep: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Assignments (B, S, ep) from each source rank to each EP rank and per expert (B, E),
        for ``tokens`` (B, S), from the Gaussian limit (see the module docstring)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        mean = tokens[..., None] * self.inclusion
        variance = tokens[..., None] * self._variance
        return gaussian_rank_counts(rng, mean, variance, tokens, ep, self.top_k)

    @property
    def _variance(self) -> np.ndarray:
        return self.inclusion * (1.0 - self.inclusion)


def gaussian_rank_counts(
    rng: np.random.Generator,
    mean: np.ndarray,
    variance: np.ndarray,
    tokens: np.ndarray,
    ep: int,
    top_k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank-level counts (B, S, ep) and expert totals (B, E) of the Gaussian with per-source
    means ``mean`` (B, S, E), variances ``variance`` (B, S, E) = ``a`` and covariance
    ``diag(a) - a a^T / sum(a)`` per source (sources independent), rounded keeping every
    source's total ``tokens * top_k`` and every EP rank's column. The expert totals given the
    rank sums use the row's summed variances for the within-rank split (exact when every
    source's ``a`` is proportional to the same vector, as without a node limit)."""
    rows, sources, experts = mean.shape
    per = experts // ep
    a_rank = variance.reshape(rows, sources, ep, per).sum(axis=3)  # (B, S, ep)
    m_rank = mean.reshape(rows, sources, ep, per).sum(axis=3)
    d = a_rank.sum(axis=2, keepdims=True)
    b = rng.standard_normal((rows, sources, ep)) * np.sqrt(a_rank)
    proj = np.divide(b.sum(axis=2, keepdims=True), d, out=np.zeros_like(d), where=d > 0)
    x = m_rank + b - a_rank * proj
    upper = tokens[..., None] * min(top_k, per)
    sent = _round_keeping_sum(x, tokens * top_k, rng.random((rows, sources)), upper)
    a_of_rank = np.repeat(a_rank, per, axis=2)
    within = np.divide(variance, a_of_rank, out=np.zeros_like(variance), where=a_of_rank > 0)
    y = mean.sum(axis=1) + (np.repeat(b, per, axis=2) * within).sum(axis=1)
    y -= (variance * proj).sum(axis=1)  # (B, E)
    a_row = variance.sum(axis=1)  # (B, E)
    a_row_rank = np.repeat(a_row.reshape(rows, ep, per).sum(axis=2), per, axis=1)
    share = np.divide(a_row, a_row_rank, out=np.zeros_like(a_row), where=a_row_rank > 0)
    z = rng.standard_normal((rows, experts)) * np.sqrt(a_row)
    y += z - share * np.repeat(z.reshape(rows, ep, per).sum(axis=2), per, axis=1)
    received = sent.sum(axis=1)  # (B, ep): the rank totals the experts must add up to
    y += share * np.repeat(received - x.sum(axis=1), per, axis=1)
    total = tokens.sum(axis=1)
    per_expert = _round_keeping_sum(
        y.reshape(rows, ep, per),
        received,
        rng.random((rows, ep)),
        np.broadcast_to(total[:, None, None], (rows, ep, per)),
    ).reshape(rows, -1)
    return sent, per_expert


def _systematic_split(amount: np.ndarray, share: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Integer split (N, E) of ``amount`` (N,) in proportion to ``share`` (E,, summing to 1):
    points ``start + j`` (j < amount) on the cumulative shares scaled by the amount; each part
    is the floor or the ceiling of ``amount * share`` and its mean is exactly that."""
    edges = np.cumsum(share)
    edges[-1] = 1.0
    scaled = amount[:, None] * edges[None, :]  # (N, E)
    below = np.maximum(np.ceil(scaled - start[:, None]), 0.0).astype(np.int64)
    below[:, -1] = amount
    return np.diff(below, axis=1, prepend=0)


def _round_keeping_sum(
    x: np.ndarray, total: np.ndarray, start: np.ndarray, upper: np.ndarray
) -> np.ndarray:
    """Integers (..., n) near ``x`` with last-axis sums ``total`` (...): floors plus one unit to
    parts picked by systematic sampling on the fractional parts (unbiased), clipped into
    ``[0, upper]`` with the excess moved to parts with room (rare)."""
    x = np.clip(x, 0.0, upper)
    base = np.floor(x)
    frac = x - base
    missing = total - base.sum(axis=-1).astype(np.int64)  # units to hand out
    weight = frac.sum(axis=-1, keepdims=True)
    edges = np.cumsum(frac, axis=-1) * np.divide(
        missing[..., None], weight, out=np.zeros_like(weight), where=weight > 0
    )
    edges[..., -1] = np.maximum(missing, 0)
    below = np.maximum(np.ceil(edges - start[..., None]), 0.0)
    out = base.astype(np.int64) + np.diff(below, axis=-1, prepend=0.0).astype(np.int64)
    flat_out = out.reshape(-1, out.shape[-1])
    flat_total = np.broadcast_to(total, out.shape[:-1]).reshape(-1)
    flat_upper = np.broadcast_to(upper, out.shape).reshape(-1, out.shape[-1])
    wrong = (flat_out.sum(axis=1) != flat_total) | (flat_out > flat_upper).any(axis=1)
    for i in np.flatnonzero(wrong).tolist():
        flat_out[i] = _fix_total(flat_out[i], int(flat_total[i]), flat_upper[i])
    return flat_out.reshape(out.shape)


def _fix_total(counts: np.ndarray, total: int, upper: np.ndarray) -> np.ndarray:
    """Counts clipped into [0, upper], then moved one by one towards ``total`` (largest room
    first)."""
    counts = np.clip(counts, 0, upper)
    gap = total - int(counts.sum())
    while gap != 0:
        room = (upper - counts) if gap > 0 else counts
        i = int(np.argmax(room))
        step = int(np.sign(gap)) * min(abs(gap), int(room[i]))
        if step == 0:
            raise ArithmeticError("counts cannot reach the total within their bounds")
        counts[i] += step
        gap -= step
    return counts


def _repair(counts: np.ndarray, tokens: int, share: np.ndarray) -> np.ndarray:
    """Clip counts into [0, tokens] and move the clipped excess to the experts with room, in
    proportion to ``share`` (the total is kept)."""
    counts = counts.copy()
    for _ in range(counts.size):
        low = np.minimum(counts, 0).sum()  # negative: assignments owed back
        high = np.maximum(counts - tokens, 0).sum()
        counts = np.clip(counts, 0, tokens)
        move = int(high + low)  # > 0: add to experts below T; < 0: take from experts above 0
        if move == 0:
            break
        room = (counts < tokens) if move > 0 else (counts > 0)
        weights = np.where(room, share, 0.0)
        target = np.floor(abs(move) * weights / weights.sum()).astype(np.int64)
        rest = abs(move) - int(target.sum())
        target[np.argsort(-weights, kind="stable")[:rest]] += 1
        counts += np.sign(move) * target
    return counts

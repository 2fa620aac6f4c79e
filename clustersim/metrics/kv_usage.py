"""Time-weighted statistics of KV-cache use (the segments of
:mod:`clustersim.engine.serving.kv_usage`).

The distribution is that of one replica's utilisation (blocks in use / its blocks, %) at a
moment drawn uniformly from the run's window (first arrival to last completion) and a replica
drawn uniformly: within a segment the utilisation moves linearly from its start to its end
value, and the window time of a replica not covered by a segment (its engine idle) counts at
0 %. Its mean is ``kv_cache_utilization_pct`` (the engine's ``kv_area``, the same integral).

* ``kv_cache_utilization_pct_p50`` (``_p90``, ``_p99``): the smallest utilisation ``u`` such
  that the replicas spent at least that share of the window at or below ``u`` (exact for the
  piecewise-linear curves: no sampling, no binning);
* disaggregated runs, per pool (``prefill_``, ``decode_``): the mean, p99 and peak over that
  pool's replicas only (:func:`pool_kv_metrics`).
"""

from __future__ import annotations

import numpy as np

from clustersim.engine.serving.kv_usage import KVUsage

KV_PERCENTILES = (50, 90, 99)
KV_PERCENTILE_KEYS = tuple(f"kv_cache_utilization_pct_p{p}" for p in KV_PERCENTILES)


def kv_usage_metrics(usage: KVUsage | None, window_ms: float) -> dict[str, float | None]:
    """The percentile keys (module docstring); null without segments or window."""
    if usage is None or window_ms <= 0:
        return dict.fromkeys(KV_PERCENTILE_KEYS)
    start, end = usage.utilization_pct()
    duration = usage.end_ms - usage.start_ms
    total = usage.blocks.size * window_ms
    idle = max(0.0, total - float(duration.sum()))
    return {
        key: time_weighted_quantile(start, end, duration, idle, p / 100)
        for key, p in zip(KV_PERCENTILE_KEYS, KV_PERCENTILES, strict=True)
    }


def pool_kv_metrics(pools, kv_area, kv_peak, usage: KVUsage | None, window_ms: float) -> dict:
    """Per pool of a disaggregated run (``pools``: its ``PoolResult`` list, ``kv_area`` and
    ``kv_peak`` per replica): ``<role>_kv_cache_utilization_pct`` (time-weighted mean over the
    pool's replicas and the window), ``_pct_p99`` (the module's percentile, over the pool's
    replicas) and ``_peak_pct``; null without a window (the p99 also without segments)."""
    out: dict[str, float | None] = {}
    for p in pools:
        role, blocks = p.role, p.kv.num_blocks
        mine = slice(p.first_replica, p.first_replica + p.replicas)
        area = float(np.asarray(kv_area[mine], dtype=np.float64).sum())
        ok = window_ms > 0
        out[f"{role}_kv_cache_utilization_pct"] = (
            100 * area / (blocks * p.replicas * window_ms) if ok else None
        )
        out[f"{role}_kv_cache_utilization_peak_pct"] = 100 * float(max(kv_peak[mine])) / blocks
        p99 = None
        if usage is not None and ok:
            sel = (usage.replica >= mine.start) & (usage.replica < mine.stop)
            start, end = usage.utilization_pct()
            duration = (usage.end_ms - usage.start_ms)[sel]
            idle = max(0.0, p.replicas * window_ms - float(duration.sum()))
            p99 = time_weighted_quantile(start[sel], end[sel], duration, idle, 0.99)
        out[f"{role}_kv_cache_utilization_pct_p99"] = p99
    return out


def time_weighted_mean(usage: KVUsage, window_ms: float) -> float:
    """Mean utilisation (%) over the replicas and the window (module docstring)."""
    start, end = usage.utilization_pct()
    area = float((0.5 * (start + end) * (usage.end_ms - usage.start_ms)).sum())
    return area / (usage.blocks.size * window_ms)


def time_weighted_quantile(
    start: np.ndarray, end: np.ndarray, duration: np.ndarray, zero_weight: float, q: float
) -> float:
    """The smallest ``x`` with at least a share ``q`` (0 < q <= 1) of the weight at or below
    ``x``, for segments whose value moves linearly from ``start`` to ``end`` over
    ``duration`` (its weight) plus an atom of ``zero_weight`` at 0.

    The cumulative weight ``F(x)`` is evaluated exactly at every breakpoint (the segments'
    ends, the atoms); between two breakpoints it is linear, so the quantile is interpolated
    there. Flat segments (``start == end``) are atoms of their duration."""
    keep = duration > 0
    start, end, duration = start[keep], end[keep], duration[keep]
    flat = start == end
    atoms = np.concatenate(([0.0], start[flat]))
    atom_w = np.concatenate(([zero_weight], duration[flat]))
    lo = np.minimum(start, end)[~flat]
    hi = np.maximum(start, end)[~flat]
    d = duration[~flat]
    total = float(atom_w.sum() + d.sum())
    if total <= 0:
        return 0.0
    target = q * total
    slope = d / (hi - lo)

    order_a = np.argsort(atoms, kind="stable")
    atoms, cum_a = atoms[order_a], np.cumsum(atom_w[order_a])
    order_lo, order_hi = np.argsort(lo, kind="stable"), np.argsort(hi, kind="stable")
    lo_sorted, hi_sorted = lo[order_lo], hi[order_hi]
    s_lo = np.cumsum(slope[order_lo])
    l_lo = np.cumsum((slope * lo)[order_lo])
    s_hi = np.cumsum(slope[order_hi])
    l_hi = np.cumsum((slope * lo)[order_hi])
    d_hi = np.cumsum(d[order_hi])

    def cum(cums: np.ndarray, count: np.ndarray) -> np.ndarray:
        """Sum of the first ``count`` sorted terms (0 for none)."""
        padded = np.concatenate(([0.0], cums))
        return padded[count]

    points = np.unique(np.concatenate((atoms, lo, hi)))
    n_atoms = np.searchsorted(atoms, points, side="right")
    n_lo = np.searchsorted(lo_sorted, points, side="right")
    n_hi = np.searchsorted(hi_sorted, points, side="right")
    ramps = (points * cum(s_lo, n_lo) - cum(l_lo, n_lo)) - (
        points * cum(s_hi, n_hi) - cum(l_hi, n_hi) - cum(d_hi, n_hi)
    )
    at = np.maximum.accumulate(cum(cum_a, n_atoms) + ramps)  # F(points), right-continuous
    k = int(np.searchsorted(at, target * (1 - 1e-12), side="left"))
    k = min(k, points.size - 1)
    if k == 0:
        return float(points[0])
    left = int(np.searchsorted(atoms, points[k], side="left"))
    jump = float(cum(cum_a, n_atoms[k]) - cum(cum_a, left))  # atoms exactly at points[k]
    below = at[k] - jump  # F just below points[k]
    if target >= below or below <= at[k - 1]:
        return float(points[k])
    share = (target - at[k - 1]) / (below - at[k - 1])
    return float(points[k - 1] + share * (points[k] - points[k - 1]))

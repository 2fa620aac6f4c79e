"""Metrics of a simulated training iteration, computed from the engine's event rows.

Definitions (all means are over GPUs; every GPU of a lane shares its timeline except for the
per-rank expert GEMM time):

* ``gpu_utilization_pct``: compute-busy time / iteration time;
* ``comm_overhead_pct``: communication time not hidden behind compute on the same GPU
  (|compute ∪ comm| − |compute|) / iteration time;
* ``comm_to_compute_pct``: all communication time / all compute time (durations summed,
  a collective counted from a GPU's arrival to its release);
* ``bubble_pct``: idle time of the compute stream (neither computing nor in a blocking
  collective) inside the pipeline phase [0, end of the last backward] / that phase;
* ``mfu_pct``: model FLOPs (no recompute; Korthikanti Eq. 7 / Megatron's MoE count) /
  (iteration time x GPUs x peak);
* ``load_balance_pct``: mean over routed (group, layer, micro-batch) of mean / max expert
  load x 100; ``dropped_tokens_pct``: dropped / routed token copies x 100;
* ``gpu_utilization_pct_min``: the least busy GPU's compute-busy time / iteration time;
* ``expert_utilization_pct``: share of (MoE layer, expert) pairs that receive tokens;
* ``roofline_throughput_tokens_per_ms``, ``roofline_ratio_pct``: the bound of
  :mod:`clustersim.metrics.bounds` and simulated / bound.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from clustersim.costs.compute import model_flops_per_iteration
from clustersim.engine.recorder import Kind, Op, Recorder
from clustersim.engine.training.sim import SimResult
from clustersim.metrics.bounds import bound_metrics, training_roofline
from clustersim.spec.schema import Plan


def union_length_by_lane(
    lanes: np.ndarray, starts: np.ndarray, ends: np.ndarray, num_lanes: int
) -> np.ndarray:
    """Length of the union of intervals, per lane (vectorised sweep)."""
    if len(lanes) == 0:
        return np.zeros(num_lanes)
    order = _lane_time_order(lanes, starts, ends)
    return _sorted_union_by_lane(lanes[order], starts[order], ends[order], num_lanes)


def _lane_time_order(lanes: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Row order by lane, then start (stable)."""
    span = float(max(ends.max(), 0.0)) + 1.0
    return np.argsort(starts + lanes.astype(np.float64) * span, kind="stable")


def _sorted_union_by_lane(
    lanes: np.ndarray, starts: np.ndarray, ends: np.ndarray, num_lanes: int
) -> np.ndarray:
    """:func:`union_length_by_lane` of rows already ordered by lane, then start."""
    if len(lanes) == 0:
        return np.zeros(num_lanes)
    span = float(max(ends.max(), 0.0)) + 1.0
    offset = lanes.astype(np.float64) * span  # lanes occupy disjoint ranges of one axis
    s, e = starts + offset, ends + offset
    reach = np.maximum.accumulate(e)
    before = np.concatenate(([-np.inf], reach[:-1]))
    gained = np.maximum(0.0, e - np.maximum(s, before))
    return np.bincount(lanes, weights=gained, minlength=num_lanes)


def training_metrics(plan: Plan, rec: Recorder, res: SimResult) -> dict[str, Any]:
    """The output contract's ``metrics`` for a training iteration."""
    cols = rec.columns()
    lanes, kind = cols["lane"], cols["kind"]
    start, end = cols["start_ms"], cols["end_ms"]
    n, wall = len(res.lanes), res.iteration_time_ms
    comp, comm = kind == Kind.COMPUTE, kind != Kind.COMPUTE
    # One sort serves all three unions: a subset of sorted rows stays sorted, and clipping the
    # times at the pipeline's end keeps their order.
    order = _lane_time_order(lanes, start, end) if len(lanes) else np.empty(0, np.int64)
    lanes_o, start_o, end_o, kind_o = lanes[order], start[order], end[order], kind[order]
    comp_o = kind_o == Kind.COMPUTE
    compute_union = _sorted_union_by_lane(lanes_o[comp_o], start_o[comp_o], end_o[comp_o], n)
    all_union = _sorted_union_by_lane(lanes_o, start_o, end_o, n)
    exposed = all_union - compute_union
    stream = kind_o != Kind.COMM_ASYNC
    t_pipe = res.pipeline_end_ms or wall
    busy_pipe = _sorted_union_by_lane(
        lanes_o[stream], np.minimum(start_o[stream], t_pipe), np.minimum(end_o[stream], t_pipe), n
    )
    rank_busy = np.repeat(compute_union, plan.parallel.tp) - _idle_by_lane_rank(rec, res)
    durations = end - start
    compute_total, comm_total = durations[comp].sum(), durations[comm].sum()
    routed = float(sum(d.routed_tokens.sum() for d in res.dispatches))
    throughput = res.tokens / wall
    return {
        "iteration_time_ms": wall,
        "latency_ms": wall,
        "latency_ms_p99": None,
        "ttft_ms_p50": None,
        "ttft_ms_p99": None,
        "tpot_ms_p50": None,
        "throughput_tokens_per_ms": throughput,
        "throughput_tokens_per_s": res.tokens / wall * 1e3,
        "mfu_pct": mfu_pct(plan, res),
        "comm_overhead_pct": 100 * float(exposed.mean()) / wall,
        "comm_to_compute_pct": 100 * comm_total / compute_total if compute_total else 0.0,
        "bubble_pct": 100 * float((t_pipe - busy_pipe).mean()) / t_pipe,
        "gpu_utilization_pct": 100 * float(rank_busy.mean()) / wall,
        "load_balance_pct": load_balance_pct(res) if res.dispatches else None,
        "dropped_tokens_pct": (
            100 * float(sum(d.dropped_tokens.sum() for d in res.dispatches)) / routed
            if routed
            else None
        ),
        "gpu_utilization_pct_min": 100 * float(rank_busy.min()) / wall,
        "expert_utilization_pct": expert_utilization_pct(res) if res.dispatches else None,
        **bound_metrics(training_roofline(plan, res.tokens, _lengths(res)), throughput),
    }


def _lengths(res: SimResult) -> dict[int, int]:
    """Sequences of the iteration by length."""
    lengths = np.concatenate([np.concatenate(mbs) for mbs in res.seq_lens])
    values, counts = np.unique(lengths, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


def expert_utilization_pct(res: SimResult) -> float:
    """Share of the (MoE layer, expert) pairs that receive at least one token in the
    iteration, in %."""
    loads = np.concatenate([d.tokens_per_expert for d in res.dispatches]).astype(np.float64)
    layers = np.repeat(res.dispatch_layers, [len(d.tokens_per_expert) for d in res.dispatches])
    active = [(loads[layers == layer].sum(axis=0) > 0).mean() for layer in np.unique(layers)]
    return 100 * float(np.mean(active))


def _idle_by_lane_rank(rec: Recorder, res: SimResult) -> np.ndarray:
    """Per-rank expert idle time, in lane order (lane 0's ranks, lane 1's ranks, ...)."""
    return np.concatenate([rec.rank_idle_ms[lane.ranks] for lane in res.lanes])


def _max_to_mean(res: SimResult) -> tuple[np.ndarray, np.ndarray]:
    """Max / mean expert load of every routed (group, layer, micro-batch) with tokens, and
    its layer."""
    if not res.dispatches:
        return np.empty(0), np.empty(0, dtype=np.int64)
    loads = np.concatenate([d.tokens_per_expert for d in res.dispatches]).astype(np.float64)
    layers = np.repeat(res.dispatch_layers, [len(d.tokens_per_expert) for d in res.dispatches])
    top = loads.max(axis=1)
    routed = top > 0
    return top[routed] / loads[routed].mean(axis=1), layers[routed]


def load_balance_pct(res: SimResult) -> float:
    """Mean over routed (group, layer, micro-batch) of mean / max expert load, in %."""
    ratios, _ = _max_to_mean(res)
    return 100 * float(np.mean(1 / ratios)) if ratios.size else 100.0


def mfu_pct(plan: Plan, res: SimResult) -> float:
    """Model FLOPs utilisation of the iteration (recompute not counted)."""
    lengths = np.concatenate([np.concatenate(mbs) for mbs in res.seq_lens])
    values, counts = np.unique(lengths, return_counts=True)
    flops = sum(
        model_flops_per_iteration(plan.model, int(c), int(s))
        for s, c in zip(values.tolist(), counts.tolist(), strict=True)
    )
    peak = plan.hardware.peak_tflops * 1e12 * plan.parallel.world_size
    return 100 * flops / (res.iteration_time_ms / 1e3 * peak)


def time_breakdown(rec: Recorder, res: SimResult) -> dict[str, float]:
    """Mean time per lane spent in each op (ms), for reports."""
    cols = rec.columns()
    durations = cols["end_ms"] - cols["start_ms"]
    sums = np.bincount(cols["op"], weights=durations, minlength=len(Op))
    lanes = max(len(res.lanes), 1)
    return {op.name.lower(): float(sums[op]) / lanes for op in Op if sums[op] > 0}


def expert_load_by_layer(res: SimResult) -> list[dict[str, float]]:
    """Per MoE layer: mean and worst max/mean expert load over its routed micro-batches and
    EP groups, and the mean load balance (mean / max x 100)."""
    ratios, layers = _max_to_mean(res)
    out = []
    for layer in np.unique(layers).tolist():
        r = ratios[layers == layer]
        out.append(
            {
                "layer": layer,
                "max_to_mean_mean": float(r.mean()),
                "max_to_mean_worst": float(r.max()),
                "load_balance_pct": 100 * float(np.mean(1 / r)),
            }
        )
    return out

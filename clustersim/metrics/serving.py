"""Serving metrics: request latencies, throughput, goodput, KV cache, utilisation.

:func:`simulate_serving` is the library entry point for ``workload.mode: inference`` (the
counterpart of :func:`clustersim.run.simulate.simulate` for training): audit, build the
requests, run :class:`clustersim.engine.serving.sim.ServingSim`, compute the metrics, judge the
targets and claims.

Metric definitions (times in ms; the window is from the first arrival to the last completion):

* per request: TTFT = first token - arrival; end-to-end latency = last token - arrival;
  TPOT = (last token - first token) / (output tokens - 1), for requests of 2+ output tokens;
  ``latency_ms`` is the p50 end-to-end latency (the output contract), with p90 and p99, and
  the same percentiles of TTFT and TPOT;
* ``throughput_tokens_per_ms``: prompt + output tokens of completed requests / window (as in
  training, every token processed); ``output_tokens_per_ms``: output tokens only;
* a request is *good* when it completed and meets every per-request limit the plan sets:
  ``targets.ttft_ms_p99_max`` and ``ttft_ms_max`` on its TTFT, ``tpot_ms_p99_max`` and
  ``tpot_ms_max`` on its TPOT, ``latency_ms_max`` on its end-to-end latency (the p50 limits
  ``ttft_ms_p50_max``, ``tpot_ms_p50_max`` bound the medians, not each request);
  ``goodput_req_per_s``: good requests per second of window, ``goodput_req_per_s_per_gpu``
  the same per GPU of the deployment, ``goodput_pct``: their share of all requests (rejected
  ones fail); all null without per-request limits. ``goodput_requests_per_s`` and
  ``slo_attainment_pct`` are the older names of ``goodput_req_per_s`` and ``goodput_pct``;
* ``queue_ms_p50`` (p90, p99, mean): queueing delay, from arrival to the start of the first
  step that schedules the request (a preempted request's later re-admissions not counted);
* ``prefill_batch_size_p50`` (p99, mean): requests with prompt tokens to compute in a step of
  a replica, over the steps that have any; ``decode_batch_size_p50`` (p99, mean): requests
  generating a token on top of their first one, over the steps that have any (a run of
  decode steps counts step by step); percentiles of the step distribution (the smallest size
  with at least p% of the steps at or below it);
* ``kv_cache_utilization_pct``: time-weighted blocks in use / blocks, mean over replicas
  (within a run of decode steps the use grows linearly; the mean of its ends is taken);
  ``kv_cache_utilization_pct_p50`` (p90, p99): time-weighted percentiles of the same use
  over replicas and window (:mod:`clustersim.metrics.kv_usage`; null when the run did not
  record its KV-cache segments); disaggregated, ``prefill_`` / ``decode_`` +
  ``kv_cache_utilization_pct``, ``_pct_p99``, ``_peak_pct``: the same over one pool;
* ``gpu_utilization_pct``: compute time of a stage (its step work minus communication) /
  window, mean over stages and replicas (replicas of one engine share its timeline);
  ``comm_overhead_pct``: communication inside steps (TP all-reduces, all-to-alls, ETP
  collectives, pipeline sends; none overlaps compute in this model) / window, same mean;
  ``comm_step_share_pct``: that communication / the steps' time (compute + communication):
  the share of step time spent communicating;
* ``roofline_throughput_tokens_per_ms``, ``roofline_ratio_pct``: the bound of
  :mod:`clustersim.metrics.bounds` and simulated / bound;
  ``bubble_pct``: idle stage time inside rounds / round time (pipeline only);
* ``mfu_pct``: model FLOPs (2 x active parameters per token, causal attention, logits of the
  sampled rows) / (window x GPUs x peak);
* ``load_balance_pct``, ``dropped_tokens_pct``: mean over routed tokens of the sampled
  routing's mean / max expert load and dropped share;
* ``mean_requests_in_system``: time average of waiting + running requests, integrated by the
  engine (Little's law: = arrival rate x mean latency in steady state).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from clustersim.engine.serving.sim import ServingResult
from clustersim.metrics.bounds import bound_metrics, serving_roofline
from clustersim.metrics.kv_usage import kv_usage_metrics, pool_kv_metrics
from clustersim.spec.schema import Plan

PERCENTILES = (50, 90, 99)


def request_columns(res: ServingResult) -> dict[str, np.ndarray]:
    """Per-request columns: arrival, first scheduled, first token, finish (ms), tokens,
    replica, preemptions."""
    book = res.book
    scheduled = getattr(book, "first_scheduled_ms", None)
    return {
        "arrival_ms": res.arrival_ms,
        "first_scheduled_ms": (
            np.full(res.arrival_ms.size, np.nan) if scheduled is None else np.array(scheduled)
        ),
        "first_token_ms": np.array(book.first_token_ms),
        "finish_ms": np.array(book.finish_ms),
        "prompt_tokens": np.array(book.prompt, dtype=np.int64),
        "output_tokens": np.array(book.output, dtype=np.int64),
        "replica": np.array(book.replica, dtype=np.int32),
        "preemptions": np.array(book.preemptions, dtype=np.int32),
        "rejected": res.rejected,
    }


def _percentiles(name: str, values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {f"{name}_p{p}": None for p in PERCENTILES}
    found = np.percentile(values, PERCENTILES)
    return {f"{name}_p{p}": float(v) for p, v in zip(PERCENTILES, found, strict=True)}


def window_ms(res: ServingResult) -> float:
    """From the first arrival to the last completion (0 when nothing completed)."""
    if res.rejected.all():
        return 0.0
    return float(np.nanmax(res.book.finish_ms)) - float(res.arrival_ms.min())


def serving_metrics(plan: Plan, res: ServingResult) -> dict[str, Any]:
    """The output contract's ``metrics`` for a serving run (module docstring)."""
    cols = request_columns(res)
    done = ~res.rejected
    window = window_ms(res)
    metrics: dict[str, Any] = {"iteration_time_ms": None}
    latencies = _latencies(cols, done)
    metrics.update(latencies.pop("percentiles"))
    metrics.update(_throughput(cols, done, window))
    metrics.update(_goodput(plan, latencies, done.size, window))
    metrics.update(_queueing(res, done))
    metrics.update(_batch_sizes(res))
    if _pools(res):
        metrics.update(_pool_utilisation(plan, res, window))
    else:
        metrics.update(_utilisation(plan, res, window))
    metrics.update(_routing(res))
    if _pools(res):
        blocks = np.concatenate([np.full(p.replicas, p.kv.num_blocks) for p in res.pools])
        metrics["kv_cache_utilization_pct"] = (
            100 * float((res.kv_area / blocks).mean()) / window if window > 0 else None
        )
        metrics["kv_cache_utilization_peak_pct"] = 100 * float((res.kv_peak / blocks).max())
    else:
        blocks = res.kv.num_blocks
        metrics["kv_cache_utilization_pct"] = (
            100 * float(res.kv_area.mean()) / (blocks * window) if window > 0 else None
        )
        metrics["kv_cache_utilization_peak_pct"] = 100 * float(res.kv_peak.max()) / blocks
    metrics.update(kv_usage_metrics(getattr(res, "kv_usage", None), window))
    if _pools(res):
        usage = getattr(res, "kv_usage", None)
        metrics.update(pool_kv_metrics(res.pools, res.kv_area, res.kv_peak, usage, window))
    metrics.update(_kv_transfer(res, done))
    metrics["preemptions"] = res.preemptions
    metrics["rejected_requests"] = int(res.rejected.sum())
    metrics["completed_requests"] = int(done.sum())
    metrics["mean_requests_in_system"] = res.in_system_area / window if window > 0 else None
    metrics["window_ms"] = window
    metrics.update(bound_metrics(serving_roofline(plan), metrics["throughput_tokens_per_ms"]))
    return metrics


def _latencies(cols: dict[str, np.ndarray], done: np.ndarray) -> dict[str, Any]:
    """Per completed request: TTFT, TPOT (0 for one output token: such a request meets any
    TPOT target, but stays out of the TPOT percentiles), end-to-end; and their percentiles."""
    arrival, first, finish = cols["arrival_ms"], cols["first_token_ms"], cols["finish_ms"]
    output = cols["output_tokens"]
    e2e = (finish - arrival)[done]
    ttft = (first - arrival)[done]
    tpot = np.where(output > 1, (finish - first) / np.maximum(output - 1, 1), 0.0)[done]
    out: dict[str, Any] = {}
    e2e_pct = _percentiles("latency_ms", e2e)
    out["latency_ms"] = e2e_pct.pop("latency_ms_p50")
    out.update(e2e_pct)
    out.update(_percentiles("ttft_ms", ttft))
    out.update(_percentiles("tpot_ms", tpot[output[done] > 1]))
    out["latency_ms_mean"] = float(e2e.mean()) if e2e.size else None
    out["ttft_ms_mean"] = float(ttft.mean()) if ttft.size else None
    return {"percentiles": out, "ttft": ttft, "tpot": tpot, "e2e": e2e}


def _throughput(cols: dict[str, np.ndarray], done: np.ndarray, window: float) -> dict[str, Any]:
    """Tokens (all, output) and requests of completed requests per unit of window."""
    keys = (
        "throughput_tokens_per_ms",
        "throughput_tokens_per_s",
        "output_tokens_per_ms",
        "output_tokens_per_s",
        "requests_per_s",
    )
    if window <= 0:
        return dict.fromkeys(keys)
    out_tokens = float(cols["output_tokens"][done].sum())
    all_tokens = out_tokens + float(cols["prompt_tokens"][done].sum())
    values = (
        all_tokens / window,
        all_tokens / window * 1e3,
        out_tokens / window,
        out_tokens / window * 1e3,
        float(done.sum()) / window * 1e3,
    )
    return dict(zip(keys, values, strict=True))


def good_requests(plan: Plan, lat: dict[str, Any]) -> np.ndarray | None:
    """Per completed request: whether it meets every per-request limit (module docstring);
    None when the plan sets none."""
    targets = plan.targets
    limits = [
        (lat["ttft"], targets.ttft_ms_max),
        (lat["ttft"], targets.ttft_ms_p99_max),
        (lat["tpot"], targets.tpot_ms_max),
        (lat["tpot"], targets.tpot_ms_p99_max),
        (lat["e2e"], targets.latency_ms_max),
    ]
    if all(limit is None for _, limit in limits):
        return None
    ok = np.ones(lat["e2e"].size, dtype=bool)
    for values, limit in limits:
        if limit is not None:
            ok &= values <= limit
    return ok


def _goodput(plan: Plan, lat: dict[str, Any], num_requests: int, window: float):
    """Good requests per second (total and per GPU) and as a share of all requests."""
    ok = good_requests(plan, lat)
    keys = ("goodput_req_per_s", "goodput_req_per_s_per_gpu", "goodput_pct")
    if ok is None or window <= 0:
        out = dict.fromkeys(keys)
    else:
        good = int(ok.sum())
        rate = good / window * 1e3
        out = {
            "goodput_req_per_s": rate,
            "goodput_req_per_s_per_gpu": rate / plan.parallel.world_size,
            "goodput_pct": 100 * good / num_requests,
        }
    out["goodput_requests_per_s"] = out["goodput_req_per_s"]
    out["slo_attainment_pct"] = out["goodput_pct"]
    return out


def _queueing(res: ServingResult, done: np.ndarray) -> dict[str, float | None]:
    """Arrival to first schedule of the completed requests: percentiles and mean."""
    first = getattr(res.book, "first_scheduled_ms", None)
    if first is None:
        return {**_percentiles("queue_ms", np.empty(0)), "queue_ms_mean": None}
    wait = (np.asarray(first, dtype=np.float64) - res.arrival_ms)[done]
    out = _percentiles("queue_ms", wait)
    out["queue_ms_mean"] = float(wait.mean()) if wait.size else None
    return out


def step_percentile(counts: np.ndarray, pct: float) -> int:
    """The smallest size with at least ``pct`` % of the steps at or below it (``counts[b]``:
    steps of size ``b``; at least one step)."""
    cum = np.cumsum(counts)
    return int(np.searchsorted(cum, pct / 100 * cum[-1], side="left"))


def _batch_sizes(res: ServingResult) -> dict[str, float | None]:
    """Prefill and decode batch sizes over the steps that have any (module docstring)."""
    out: dict[str, float | None] = {}
    for kind, counts in (("prefill", res.prefill_batches), ("decode", res.decode_batches)):
        keys = [f"{kind}_batch_size_p50", f"{kind}_batch_size_p99", f"{kind}_batch_size_mean"]
        if counts is None or counts[1:].sum() == 0:
            out.update(dict.fromkeys(keys))
            continue
        steps = np.asarray(counts, dtype=np.int64).copy()
        steps[0] = 0
        sizes = np.arange(steps.size)
        out[keys[0]] = step_percentile(steps, 50)
        out[keys[1]] = step_percentile(steps, 99)
        out[keys[2]] = float((steps * sizes).sum() / steps.sum())
    return out


# The metrics of :func:`_utilisation` (null when the run has no time window).
_UTILISATION_KEYS = (
    "gpu_utilization_pct",
    "comm_overhead_pct",
    "comm_to_compute_pct",
    "comm_step_share_pct",
    "bubble_pct",
    "mfu_pct",
)


def _utilisation(plan: Plan, res: ServingResult, window: float) -> dict[str, float | None]:
    """GPU utilisation, exposed communication, bubble and MFU (module docstring)."""
    stages = plan.parallel.pp
    if window <= 0:
        return dict.fromkeys(_UTILISATION_KEYS)
    compute = comm = busy = work = flops = 0.0
    for members, stats in zip(res.engines, res.engine_stats, strict=True):
        compute += stats.work_ms - stats.comm_ms
        comm += stats.comm_ms
        busy += len(members) * stats.busy_ms
        work += stats.work_ms
        flops += stats.flops
    replicas = res.num_replicas
    peak = plan.hardware.peak_tflops * 1e12 * plan.parallel.world_size
    return {
        "gpu_utilization_pct": 100 * compute / (stages * replicas * window),
        "comm_overhead_pct": 100 * comm / (stages * replicas * window),
        "comm_to_compute_pct": 100 * comm / compute if compute > 0 else None,
        "comm_step_share_pct": 100 * comm / work if work > 0 else None,
        "bubble_pct": 100 * (stages * busy - work) / (stages * busy) if busy > 0 else None,
        "mfu_pct": 100 * flops / (window / 1e3 * peak),
    }


def _pools(res: ServingResult) -> list | None:
    """The pools of a disaggregated run; None when colocated (or a result without them)."""
    return getattr(res, "pools", None)


def _kv_transfer(res: ServingResult, done: np.ndarray) -> dict[str, Any]:
    """KV-cache transfers of a disaggregated run (completed requests that made one): time
    percentiles and mean, and bytes per request (mean); null when colocated or none."""
    ms = getattr(res, "kv_transfer_ms", None)
    moved = np.zeros(done.size, dtype=bool) if ms is None else done & ~np.isnan(ms)
    values = ms[moved] if ms is not None else np.empty(0)
    out: dict[str, Any] = _percentiles("kv_transfer_ms", values)
    out["kv_transfer_ms_mean"] = float(values.mean()) if values.size else None
    size = getattr(res, "kv_transfer_bytes", None)
    sizes = size[moved] if size is not None else np.empty(0)
    out["kv_transfer_bytes_mean"] = float(sizes.mean()) if sizes.size else None
    return out


def _pool_utilisation(plan: Plan, res: ServingResult, window: float) -> dict[str, Any]:
    """:func:`_utilisation` of a disaggregated run: every GPU of both pools counted (a
    pool's stages x replicas), plus each pool's GPUs and GPU utilisation."""
    keys = _UTILISATION_KEYS
    out: dict[str, Any] = {}
    for p in res.pools:
        out[f"{p.role}_gpus"] = p.gpus
        out[f"{p.role}_replicas"] = p.replicas
        out[f"{p.role}_gpu_utilization_pct"] = None
    if window <= 0:
        return {**out, **dict.fromkeys(keys)}
    compute = comm = work = flops = slots = busy_slots = 0.0
    for p in res.pools:
        own = 0.0
        for i in p.engines:
            stats, members = res.engine_stats[i], len(res.engines[i])
            own += stats.work_ms - stats.comm_ms
            comm += stats.comm_ms
            work += stats.work_ms
            flops += stats.flops
            busy_slots += p.stages * members * stats.busy_ms
        compute += own
        slots += p.stages * p.replicas
        out[f"{p.role}_gpu_utilization_pct"] = 100 * own / (p.stages * p.replicas * window)
    peak = plan.hardware.peak_tflops * 1e12 * plan.parallel.world_size
    out.update(
        {
            "gpu_utilization_pct": 100 * compute / (slots * window),
            "comm_overhead_pct": 100 * comm / (slots * window),
            "comm_to_compute_pct": 100 * comm / compute if compute > 0 else None,
            "comm_step_share_pct": 100 * comm / work if work > 0 else None,
            "bubble_pct": 100 * (busy_slots - work) / busy_slots if busy_slots > 0 else None,
            "mfu_pct": 100 * flops / (window / 1e3 * peak),
        }
    )
    return out


def _routing(res: ServingResult) -> dict[str, float | None]:
    tokens = sum(s.moe_tokens for s in res.engine_stats)
    if tokens <= 0:
        return {"load_balance_pct": None, "dropped_tokens_pct": None}
    balance = sum(s.balance_weighted for s in res.engine_stats) / tokens
    dropped = sum(s.dropped_weighted for s in res.engine_stats) / tokens
    return {"load_balance_pct": balance, "dropped_tokens_pct": dropped}


def breakdown(plan: Plan, res: ServingResult) -> dict[str, float]:
    """Mean time per GPU (ms) computing, communicating, in pipeline bubbles and idle."""
    stages, window = plan.parallel.pp, window_ms(res)
    if _pools(res):  # every GPU of both pools; a replica's rounds weigh by its stages
        per_gpu = sum(p.stages * p.replicas for p in res.pools)
        busy = (
            sum(
                p.stages * len(res.engines[i]) * res.engine_stats[i].busy_ms
                for p in res.pools
                for i in p.engines
            )
            / per_gpu
        )
    else:
        per_gpu = stages * res.num_replicas
        busy = (
            sum(len(m) * s.busy_ms for m, s in zip(res.engines, res.engine_stats, strict=True))
            / res.num_replicas
        )
    compute = sum(s.work_ms - s.comm_ms for s in res.engine_stats) / per_gpu
    comm = sum(s.comm_ms for s in res.engine_stats) / per_gpu
    return {
        "compute": compute,
        "communication": comm,
        "pipeline_bubble": max(0.0, busy - compute - comm),
        "idle": max(0.0, window - busy),
    }

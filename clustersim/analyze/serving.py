"""Serving traces: the request lifecycle of a ``workload.mode: inference`` run, written to and
read back from the Arrow trace format (``docs/trace-format.md``, "Serving traces").

* ``run.record.write_serving_trace`` writes a simulated run: three ``request`` rows per
  request (``prefill``: arrival to first token, ``decode``: first token to finish, ``request_done``:
  arrival to finish, with the engine's exact times in ms), then ``summary`` rows with the
  per-engine and per-replica accumulators the metrics need (KV-cache area and peak, step work,
  communication, FLOPs, routing balance) and the run totals. Atomic, like training traces.
* :func:`analyze_serving` recomputes the metrics ``clustersim run`` printed, with the same
  functions (:func:`clustersim.metrics.serving.serving_metrics`), so they are equal exactly,
  plus a per-replica summary. :func:`clustersim.analyze.analyze` calls it for serving traces.
* ``run.replay.replay_serving`` simulates the recorded request stream (arrival times, prompt
  and output tokens) again under the recorded plan (identical metrics) or a changed one: more
  replicas, other TP/PP/EP, other scheduler settings, other hardware, even another model (the
  stream is counted in tokens, whatever the model). Changes that would draw another stream
  (``STREAM_FIELDS``) are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa

from clustersim.costs.serving import KVCapacity
from clustersim.engine.serving.requests import Requests
from clustersim.engine.serving.sim import EngineStats, ServingResult
from clustersim.metrics.serving import breakdown, request_columns, serving_metrics, window_ms
from clustersim.spec.schema import Plan
from clustersim.trace import schema as S
from clustersim.trace.reader import TraceError, TraceReader

ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineStats))
"""Order of the ``values`` of a ``serving_engine`` summary row."""
REPLICA_FIELDS = ("kv_area_block_ms", "kv_peak_blocks")
"""Order of the ``values`` of a ``serving_replica`` summary row."""
RUN_FIELDS = ("in_system_area_request_ms", "events", "preemptions", "routing_s")
"""Order of the ``values`` of the ``serving_run`` summary row."""


def is_serving_trace(path: str | Path) -> bool:
    """Whether ``path`` is a trace of a serving run (raises :class:`TraceError` when unusable)."""
    with TraceReader(path) as reader:
        return reader.metadata["run"].get("mode") == "inference"


# ---- reading ---------------------------------------------------------------------------------
def _op_codes(batch: pa.RecordBatch, column: str, names: tuple[str, ...]) -> np.ndarray:
    """The codes of ``column`` (``kind`` or ``op``) in ``names``' numbering (-1: unknown)."""
    col = batch.column(column)
    code = {n: i for i, n in enumerate(names)}
    lut = np.array([code.get(n, -1) for n in col.dictionary.to_pylist()] or [-1], dtype=np.int64)
    return lut[col.indices.to_numpy(zero_copy_only=False)]


def read_serving_result(reader: TraceReader) -> tuple[Plan, Requests, ServingResult]:
    """The recorded plan, request stream and run (as the engine returned it) of a serving
    trace. Raises :class:`TraceError` for a training trace or missing rows."""
    run = reader.metadata["run"]
    path = reader.path
    if run.get("mode") != "inference":
        raise TraceError(f"{path}: not a serving trace (mode {run.get('mode')!r})")
    plan = reader.plan()
    n = int(run["num_requests"])
    prompt, output = np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    times = np.full((n, 4), np.nan)  # arrival, first token, finish, first scheduled
    replica, preempt = np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    seen = np.zeros((3, n), dtype=np.int64)
    has_scheduled = True
    ops = (S.OP_CODE["prefill"], S.OP_CODE["decode"], S.OP_CODE["request_done"])
    for batch in reader.batches():
        is_request = _op_codes(batch, "kind", S.KINDS) == S.KIND_CODE["request"]
        if not is_request.any():
            continue
        op = _op_codes(batch, "op", S.OPS)
        rid = batch.column("microbatch").to_numpy()
        value = batch.column("value").to_numpy(zero_copy_only=False)
        if rid.size and (rid[is_request].min() < 0 or rid[is_request].max() >= n):
            raise TraceError(f"{path}: damaged trace (request index out of range)")
        for k, code in enumerate(ops):
            rows = np.flatnonzero(is_request & (op == code))
            ids = rid[rows]
            np.add.at(seen[k], ids, 1)
            if k == 0:
                prompt[ids] = value[rows]
            elif k == 1:
                output[ids] = value[rows]
            else:
                preempt[ids] = value[rows]
                replica[ids] = batch.column("replica").to_numpy()[rows]
                lists = batch.column("values").take(pa.array(rows))
                flat = lists.flatten().to_numpy(zero_copy_only=False)
                width = flat.size // rows.size if rows.size else 3
                if lists.null_count or width not in (3, 4) or flat.size != width * rows.size:
                    raise TraceError(f"{path}: damaged trace (request_done rows without times)")
                times[ids, :width] = flat.reshape(-1, width)
                has_scheduled = has_scheduled and width == 4
    if not (seen == 1).all():
        raise TraceError(f"{path}: damaged trace (request rows missing or repeated)")
    arrival, first, finish = times[:, 0].copy(), times[:, 1].copy(), times[:, 2].copy()
    scheduled = times[:, 3].copy() if has_scheduled else None  # older traces lack it
    rejected = np.isnan(finish)
    result = ServingResult(
        book=SimpleNamespace(
            prompt=prompt,
            output=output,
            first_token_ms=first,
            finish_ms=finish,
            first_scheduled_ms=scheduled,
            replica=replica,
            preemptions=preempt,
        ),
        arrival_ms=arrival,
        rejected=rejected,
        kv=_kv(run, path),
        num_replicas=int(run["replicas"]),
        engines=[list(m) for m in run["engines"]],
        engine_stats=_engine_stats(reader, run),
        kv_area=np.zeros(int(run["replicas"])),
        kv_peak=np.zeros(int(run["replicas"]), dtype=np.int64),
        in_system_area=0.0,
        events=0,
        preemptions=0,
    )
    for row in reader.summary_rows("serving_replica"):
        r = int(row["replica"])
        result.kv_area[r], result.kv_peak[r] = row["values"][0], int(row["values"][1])
    for row in reader.summary_rows("serving_batches"):
        counts = np.asarray(row["values"], dtype=np.int64)
        if int(row["value"]) == 0:
            result.prefill_batches = counts
        else:
            result.decode_batches = counts
    totals = reader.summary_rows("serving_run")
    if not totals:
        raise TraceError(f"{path}: damaged trace (no serving_run summary row)")
    area, events, preemptions, routing_s = totals[0]["values"]
    result.in_system_area, result.events = area, int(events)
    result.preemptions, result.routing_s = int(preemptions), routing_s
    return plan, Requests(arrival, prompt, output), result


def _kv(run: dict[str, Any], path: Path) -> KVCapacity:
    try:
        kv = run["kv_cache"]
        return KVCapacity(**{k: tuple(v) if isinstance(v, list) else v for k, v in kv.items()})
    except (KeyError, TypeError):
        raise TraceError(f"{path}: damaged trace (no KV-cache description)") from None


def _engine_stats(reader: TraceReader, run: dict[str, Any]) -> list[EngineStats]:
    names = run.get("engine_fields", list(ENGINE_FIELDS))
    rows = sorted(reader.summary_rows("serving_engine"), key=lambda r: r["group"])
    if len(rows) != len(run["engines"]):
        raise TraceError(f"{reader.path}: damaged trace (serving_engine rows missing)")
    out = []
    for row in rows:
        found = dict(zip(names, row["values"], strict=True))
        stats = EngineStats(**{k: found[k] for k in ENGINE_FIELDS if k in found})
        stats.steps = int(stats.steps)
        out.append(stats)
    return out


# ---- analyze ---------------------------------------------------------------------------------
@dataclass
class ServingTraceAnalysis:
    """What ``clustersim analyze`` reports about a serving trace (times in ms)."""

    path: str
    plan_name: str
    seed: int
    rows: int
    metrics: dict[str, Any]
    breakdown: dict[str, float]
    serving: dict[str, Any]
    replicas: list[dict[str, Any]]
    mode: str = "inference"
    requests: dict[str, np.ndarray] | None = None  # request_columns, for --plot / --perfetto

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``clustersim analyze --json`` for a serving trace."""
        return {
            "trace": {"path": self.path, "rows": self.rows, "mode": self.mode},
            "plan": self.plan_name,
            "seed": self.seed,
            "metrics": self.metrics,
            "breakdown_ms": self.breakdown,
            "serving": self.serving,
            "replicas": self.replicas,
        }


def analyze_serving(
    path: str | Path, progress: Callable[[float], None] | None = None
) -> ServingTraceAnalysis:
    """The serving metrics of a trace (equal to those of the run that wrote it), the deployment
    and one summary per replica."""
    with TraceReader(path) as reader:
        plan, _requests, res = read_serving_result(reader)
        rows = sum(reader.batch(i, ["kind"]).num_rows for i in range(reader.num_batches))
        rows += reader.summary.num_rows
    metrics = serving_metrics(plan, res)
    serving = {
        "replicas": res.num_replicas,
        "engines": res.engines,
        "kv_cache_blocks_per_replica": res.kv.num_blocks,
        "kv_block_size": res.kv.block_size,
        "kv_cache_tokens_per_replica": res.kv.tokens,
        "kv_cache_gib_per_gpu": res.kv.kv_cache_gib,
        "events": res.events,
    }
    out = ServingTraceAnalysis(
        str(path),
        plan.name,
        plan.seed,
        rows,
        metrics,
        breakdown(plan, res),
        serving,
        replica_rows(res),
        requests=request_columns(res),
    )
    if progress is not None:
        progress(1.0)
    return out


def in_system_steps(cols: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step curves over time (ms) of the requests in prefill (waiting included: arrival to first
    token) and in decode (first token to finish), i.e. the continuous batch: (times, prefill,
    decode) with the counts holding from each time to the next."""
    done = ~cols["rejected"]
    arrival, first, finish = (cols[k][done] for k in ("arrival_ms", "first_token_ms", "finish_ms"))
    times = np.concatenate([arrival, first, finish])
    d_pre = np.concatenate([np.ones_like(arrival), -np.ones_like(first), np.zeros_like(finish)])
    d_dec = np.concatenate([np.zeros_like(arrival), np.ones_like(first), -np.ones_like(finish)])
    order = np.argsort(times, kind="stable")
    return times[order], np.cumsum(d_pre[order]), np.cumsum(d_dec[order])


def _p50(values: np.ndarray) -> float | None:
    return float(np.percentile(values, 50)) if values.size else None


def replica_rows(res: ServingResult) -> list[dict[str, Any]]:
    """Per replica: requests dispatched, completed, rejected, preemptions, tokens, TTFT / TPOT
    / end-to-end p50 and KV-cache use (mean over the run's window, and peak)."""
    cols = request_columns(res)
    window = window_ms(res)
    engine_of = {m: e for e, members in enumerate(res.engines) for m in members}
    done = ~cols["rejected"]
    out = []
    for r in range(res.num_replicas):
        mine = cols["replica"] == r
        ok = mine & done
        arrival, first, finish = (
            cols[k][ok] for k in ("arrival_ms", "first_token_ms", "finish_ms")
        )
        n_out = cols["output_tokens"][ok]
        multi = n_out > 1
        tpot = (finish - first)[multi] / (n_out[multi] - 1)
        blocks = res.kv.num_blocks
        out.append(
            {
                "replica": r,
                "engine": engine_of.get(r),
                "requests": int(mine.sum()),
                "completed": int(ok.sum()),
                "rejected": int((mine & ~done).sum()),
                "preemptions": int(cols["preemptions"][mine].sum()),
                "prompt_tokens": int(cols["prompt_tokens"][ok].sum()),
                "output_tokens": int(n_out.sum()),
                "ttft_ms_p50": _p50(first - arrival),
                "tpot_ms_p50": _p50(tpot),
                "latency_ms_p50": _p50(finish - arrival),
                "kv_cache_utilization_pct": (
                    100 * float(res.kv_area[r]) / (blocks * window) if window > 0 else None
                ),
                "kv_cache_utilization_peak_pct": 100 * float(res.kv_peak[r]) / blocks,
            }
        )
    return out

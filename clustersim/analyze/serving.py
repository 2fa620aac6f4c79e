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
from clustersim.engine.serving.kv_usage import KVUsage
from clustersim.engine.serving.requests import Requests
from clustersim.engine.serving.sim import EngineStats, PoolResult, ServingResult
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
    timeline = _TimelineRows(n)
    for batch in reader.batches():
        kinds = _op_codes(batch, "kind", S.KINDS)
        if (kinds == S.KIND_CODE["serving"]).any():
            timeline.add(batch, kinds == S.KIND_CODE["serving"], path)
        is_request = kinds == S.KIND_CODE["request"]
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
    if "pools" in run:
        result.pools = _pools(run, path)
        result.kv = result.pools[-1].kv  # the decode pool's, as the engine reports it
    timeline.fill(result, prompt, path)
    return plan, Requests(arrival, prompt, output), result


class _TimelineRows:
    """The ``serving`` rows of a trace (``kv_usage``, ``kv_transfer``), gathered batch by
    batch (older traces have none: the result keeps ``kv_usage`` and transfers unset)."""

    def __init__(self, num_requests: int):
        self.n = num_requests
        self.usage: list[np.ndarray] = []  # per batch: (rows, 6) replica, blocks, values
        self.transfers: list[np.ndarray] = []  # per batch: (rows, 5) rid, src, values, bytes

    @staticmethod
    def _values(batch: pa.RecordBatch, rows: np.ndarray, width: int, path: Path) -> np.ndarray:
        lists = batch.column("values").take(pa.array(rows))
        flat = lists.flatten().to_numpy(zero_copy_only=False)
        if lists.null_count or flat.size != width * rows.size:
            raise TraceError(f"{path}: damaged trace (serving rows without their values)")
        return flat.reshape(-1, width)

    def add(self, batch: pa.RecordBatch, is_serving: np.ndarray, path: Path) -> None:
        op = _op_codes(batch, "op", S.OPS)
        replica = batch.column("replica").to_numpy()
        rows = np.flatnonzero(is_serving & (op == S.OP_CODE["kv_usage"]))
        if rows.size:
            value = batch.column("value").to_numpy(zero_copy_only=False)[rows]
            self.usage.append(
                np.column_stack((replica[rows], value, self._values(batch, rows, 4, path)))
            )
        rows = np.flatnonzero(is_serving & (op == S.OP_CODE["kv_transfer"]))
        if rows.size:
            rid = batch.column("microbatch").to_numpy()[rows]
            nbytes = batch.column("bytes").to_numpy()[rows]
            self.transfers.append(
                np.column_stack((rid, replica[rows], self._values(batch, rows, 3, path), nbytes))
            )

    def fill(self, result: ServingResult, prompt: np.ndarray, path: Path) -> None:
        """Set the result's ``kv_usage`` and KV transfers from the rows gathered."""
        if self.usage:
            rows = np.concatenate(self.usage)
            replica = rows[:, 0].astype(np.int32)
            if result.pools:
                blocks = np.concatenate(
                    [np.full(p.replicas, p.kv.num_blocks, dtype=np.int64) for p in result.pools]
                )
            else:
                blocks = np.full(result.num_replicas, result.kv.num_blocks, dtype=np.int64)
            if blocks.size != result.num_replicas:
                raise TraceError(f"{path}: damaged trace metadata (pools)")
            result.kv_usage = KVUsage(
                replica,
                rows[:, 2].copy(),
                rows[:, 3].copy(),
                rows[:, 4].astype(np.int64),
                rows[:, 5].astype(np.int64),
                blocks,
            )
        if self.transfers:
            rows = np.concatenate(self.transfers)
            rid = rows[:, 0].astype(np.int64)
            if rid.min() < 0 or rid.max() >= self.n or np.unique(rid).size != rid.size:
                raise TraceError(f"{path}: damaged trace (kv_transfer request index)")
            result.kv_transfer_ms = np.full(self.n, np.nan)
            result.kv_transfer_ms[rid] = rows[:, 3]
            result.kv_transfer_bytes = np.full(self.n, np.nan)
            result.kv_transfer_bytes[rid] = rows[:, 5]
            result.decode_replica = np.full(self.n, -1, dtype=np.int32)
            result.decode_replica[rid] = rows[:, 4].astype(np.int32)
        elif result.pools:  # a disaggregated run in which no request was transferred
            result.kv_transfer_ms = np.full(self.n, np.nan)
            result.kv_transfer_bytes = np.full(self.n, np.nan)
            result.decode_replica = np.full(self.n, -1, dtype=np.int32)


def _pools(run: dict[str, Any], path: Path) -> list[PoolResult]:
    """The pools of a disaggregated run from the trace metadata."""
    try:
        return [
            PoolResult(
                str(p["role"]),
                int(p["gpus"]),
                int(p["stages"]),
                int(p["replicas"]),
                int(p["first_replica"]),
                [int(e) for e in p["engines"]],
                _kv({"kv_cache": p["kv_cache"]}, path),
            )
            for p in run["pools"]
        ]
    except (KeyError, TypeError, ValueError):
        raise TraceError(f"{path}: damaged trace metadata (pools)") from None


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
    kv_usage: KVUsage | None = None  # the KV-cache segments, for --plot (None: not recorded)

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
        kv_usage=res.kv_usage,
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
    replica_blocks = [res.kv.num_blocks] * res.num_replicas
    for p in res.pools or []:  # disaggregated: each pool's own cache
        replica_blocks[p.first_replica : p.first_replica + p.replicas] = [
            p.kv.num_blocks
        ] * p.replicas
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
        blocks = replica_blocks[r]
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


def kv_usage_curves(
    usage: KVUsage, max_replicas: int = 16
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per replica (the first ``max_replicas``): the points (time ms, use %) of its KV-cache
    use over time, linear within a segment, dropping to 0 where its engine idled."""
    start_pct, end_pct = usage.utilization_pct()
    out = []
    for r in np.unique(usage.replica)[:max_replicas]:
        mine = np.flatnonzero(usage.replica == r)
        t0, t1 = usage.start_ms[mine], usage.end_ms[mine]
        u0, u1 = start_pct[mine], end_pct[mine]
        gap = np.append(t0[1:] > t1[:-1], False)  # idle after this segment
        times = np.column_stack((t0, t1, np.where(gap, t1, np.nan), np.append(t0[1:], np.nan)))
        use = np.column_stack((u0, u1, np.zeros(mine.size), np.zeros(mine.size)))
        keep = np.column_stack((np.ones((mine.size, 2), bool), gap, gap)).ravel()
        out.append((int(r), times.ravel()[keep], use.ravel()[keep]))
    return out

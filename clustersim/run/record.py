"""Recording a simulated iteration as a trace: the glue between the engine and the trace format.

:class:`TraceSink` turns the recorder's column chunks into trace rows (engine op codes to trace
op names, the lane's first GPU, the process group of each collective) and writes the workload
(sequence lengths), every routing outcome and the run summary. :class:`RecordingRouting` wraps
the plan's routing source so that every (layer, micro-batch, EP group) routed is recorded.

Serving runs are recorded by :func:`write_serving_trace` (every request's lifecycle, the
per-engine and per-replica accumulators, the plan).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from clustersim import __version__
from clustersim.analyze.serving import ENGINE_FIELDS, REPLICA_FIELDS, RUN_FIELDS
from clustersim.engine.network import KINDS as NETWORK_KINDS
from clustersim.engine.network import Network, NetworkReport
from clustersim.engine.recorder import Kind, Op, Recorder
from clustersim.engine.serving.sim import ServingResult
from clustersim.engine.training.moe import (
    Dispatch,
    DispatchBatch,
    RoutingSource,
    dispatch_many,
    dispatch_one,
)
from clustersim.engine.training.sim import Lane, SimResult, TrainingSim, make_lanes
from clustersim.layout import Layout
from clustersim.spec.schema import Plan
from clustersim.trace import schema as S
from clustersim.trace.writer import TraceWriter

# The process group each collective runs over (the ``group`` column indexes
# ``Layout.groups(kind)``); p2p sends name the pipeline group of the sender.
OP_GROUP_KIND = {
    "tp_comm": "tp",
    "a2a_dispatch": "ep",
    "a2a_combine": "ep",
    "etp_comm": "etp",
    "p2p_send": "pp",
    "grad_reduce": "dp",
    "expert_grad_reduce": "edp",
    "param_gather": "dp",
    "cp_comm": "cp",
}
KIND_TO_TRACE = np.array([S.KIND_CODE[k.name.lower()] for k in Kind], dtype=np.int8)
OP_TO_TRACE = np.array([S.OP_CODE[o.name.lower()] for o in Op], dtype=np.int8)


def default_trace_path(plan: Plan, root: Path | None = None) -> Path:
    """``traces/<plan name>-seed<seed>.arrow`` under ``root`` (default: the working directory)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in plan.name)
    return (root or Path.cwd()) / "traces" / f"{safe}-seed{plan.seed}.arrow"


def group_table(layout: Layout, lanes: list[Lane]) -> np.ndarray:
    """``table[engine op, lane]``: index of the op's process group holding the lane's first
    GPU in ``layout.groups(kind)``; -1 for ops that are not collectives."""
    table = np.full((len(Op), max(len(lanes), 1)), -1, dtype=np.int32)
    for op in Op:
        kind = OP_GROUP_KIND.get(op.name.lower())
        if kind is None:
            continue
        where = {r: i for i, grp in enumerate(layout.groups(kind)) for r in grp}
        for lane in lanes:
            table[op, lane.index] = where.get(lane.ranks[0], -1)
    return table


BUSY_LINKS = 64
"""Links whose busy intervals a trace keeps (the most contended, then the busiest)."""


def run_metadata(plan: Plan, layout: Layout, lanes: list[Lane], symmetric: bool) -> dict:
    """The ``clustersim.run`` metadata: lanes, the lane (and TP slot) each GPU follows."""
    # With context parallelism every (DP, CP) pair is a replica slot of its own: lanes are
    # stored with "dp" = dp * cp + their CP rank, and "simulated_dp" counts those slots.
    cp = plan.parallel.cp
    simulated_dp = (1 if symmetric else plan.parallel.dp) * cp
    lane_at = {(ln.stage, ln.dp * cp + ln.cp): ln.index for ln in lanes}
    gpu_lane, gpu_slot = [], []
    for rank in range(layout.world_size):
        c = layout.coords(rank)
        slot = c.dp * cp + c.cp
        gpu_lane.append(lane_at[(c.pp, slot if slot < simulated_dp else c.cp)])
        gpu_slot.append(c.tp)
    ep_groups = layout.groups("ep") if plan.model.moe else []
    return {
        "mode": "training",
        "time_unit": "s",
        "symmetric": symmetric,
        "simulated_dp": simulated_dp,
        "lanes": [
            {"index": ln.index, "stage": ln.stage, "dp": ln.dp * cp + ln.cp, "ranks": ln.ranks}
            for ln in lanes
        ],
        "gpu_lane": gpu_lane,
        "gpu_slot": gpu_slot,
        "num_ep_groups": len(ep_groups),
        "ep_groups_per_stage": len(ep_groups) // plan.parallel.pp,
        "op_groups": OP_GROUP_KIND,
        "clustersim_version": __version__,
        "created_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


class TraceSink:
    """Writes one simulated iteration into an open :class:`TraceWriter`."""

    def __init__(self, writer: TraceWriter, layout: Layout, lanes: list[Lane]):
        self.writer = writer
        self._gpu = np.array([ln.ranks[0] for ln in lanes], dtype=np.int32)
        self._replica = np.array([ln.dp for ln in lanes], dtype=np.int32)
        self._group = group_table(layout, lanes)

    def events(self, chunk: dict[str, np.ndarray]) -> None:
        """A recorder chunk as one record batch (the recorder's ``sink``)."""
        lane, op = chunk["lane"], chunk["op"]
        ints = {
            "lane": lane,
            "gpu": self._gpu[lane],
            "group": self._group[op, lane],
            "replica": self._replica[lane],
            "layer": chunk["layer"],
            "microbatch": chunk["microbatch"],
        }
        self.writer.write_events(
            KIND_TO_TRACE[chunk["kind"]],
            OP_TO_TRACE[op],
            chunk["start_ms"] / 1e3,
            chunk["end_ms"] / 1e3,
            ints,
            chunk["bytes"],
        )

    def workload(self, seq_lens: list[list[np.ndarray]]) -> None:
        """The sequence lengths of every micro-batch of every replica."""
        lens = np.array(seq_lens, dtype=np.float64)  # (replicas, micro-batches, sequences)
        replicas, mbs = lens.shape[:2]
        self.writer.add_rows(
            "workload",
            "seq_lens",
            layer=np.full(replicas * mbs, -1),
            microbatch=np.tile(np.arange(mbs), replicas),
            group=np.full(replicas * mbs, -1),
            replica=np.repeat(np.arange(replicas), mbs),
            value=lens.sum(axis=2).ravel(),
            values=lens.reshape(replicas * mbs, -1),
        )

    def route_batch(
        self, layer: int, mbs: np.ndarray, groups: np.ndarray, tokens: np.ndarray, d: DispatchBatch
    ) -> None:
        """A batch of routing outcomes (rows ``i``: micro-batch ``mbs[i]``, EP group
        ``groups[i]``, global index), one row per outcome and quantity, written column-wise."""
        n = len(mbs)
        where = {"layer": np.full(n, layer), "microbatch": mbs, "group": groups}
        add = self.writer.add_rows
        add("route", "member_tokens", values=tokens, **where)
        add("route", "a2a_tokens", values=d.a2a_tokens.reshape(n, -1), **where)
        add("route", "received_tokens", values=d.received_tokens, **where)
        add("route", "active_experts", values=d.active_experts, **where)
        add("route", "expert_tokens", values=d.tokens_per_expert, **where)
        add("route", "dropped_tokens", value=d.dropped_tokens, **where)
        add("route", "routed_tokens", value=d.routed_tokens, **where)

    def summary(self, result: SimResult, rank_idle_ms: np.ndarray) -> None:
        """Whole-run figures: iteration end, pipeline end, per-GPU expert idle time (s)."""
        add = self.writer.add_row
        add("summary", "iteration", start_s=0.0, end_s=result.iteration_time_ms / 1e3)
        add("summary", "pipeline", start_s=0.0, end_s=result.pipeline_end_ms / 1e3)
        add("summary", "expert_idle", values=np.asarray(rank_idle_ms) / 1e3)

    def network(self, report: NetworkReport) -> None:
        """The shared links (format v3): contention, every used link, and the busy intervals
        of the ``BUSY_LINKS`` most contended (then busiest) links."""
        add = self.writer.add_row
        by_kind = [report.by_kind_ms[k] for k in NETWORK_KINDS]
        add("summary", "contention", value=report.contention_ms, values=by_kind)
        ranked = sorted(
            range(len(report.links)),
            key=lambda i: (-report.links[i].contention_ms, -report.links[i].busy_ms, i),
        )
        for i, link in enumerate(report.links):
            add("summary", "link", group=i, nbytes=link.bytes, value=link.contention_ms,
                values=[link.busy_ms])  # fmt: skip
        for i in ranked[:BUSY_LINKS]:
            for start_ms, end_ms in report.links[i].intervals.tolist():
                add("summary", "link_busy", group=i, start_s=start_ms / 1e3, end_s=end_ms / 1e3)


class RecordingRouting:
    """A routing source that records every outcome it hands out (the engine routes every
    layer, micro-batch and EP group through it)."""

    def __init__(self, inner: RoutingSource, num_groups: int, sink: TraceSink | None = None):
        self.inner, self.num_groups, self.sink = inner, num_groups, sink

    @property
    def elapsed_s(self) -> float:
        """Wall time the wrapped source spent routing."""
        return getattr(self.inner, "elapsed_s", 0.0)

    def dispatch(self, layer: int, key: int, tokens_per_member: np.ndarray) -> Dispatch:
        """Route one outcome through the wrapped source and record it."""
        return dispatch_one(self, layer, key, tokens_per_member)

    def dispatch_many(self, layer: int, keys: np.ndarray, tokens: np.ndarray) -> DispatchBatch:
        """Route a batch through the wrapped source and record every row."""
        out = dispatch_many(self.inner, layer, keys, tokens)
        mbs, groups = np.divmod(np.asarray(keys), self.num_groups)
        self.sink.route_batch(layer, mbs, groups, np.asarray(tokens), out)
        return out


def simulate_traced(
    plan: Plan,
    seq_lens: list[list[np.ndarray]],
    routing: RoutingSource | None,
    symmetric: bool,
    progress: Callable[[float], None] | None,
    path: Path,
    network: Network | None = None,
    reuse: TrainingSim | None = None,
) -> tuple[SimResult, Recorder, dict]:
    """Run the engine with every row streamed into a trace at ``path`` (written atomically;
    ``reuse``: an earlier pass whose tables the engine reads, ``TrainingSim``). Returns the
    result, the recorder of its rows and ``{"path", "rows", "bytes"}`` of the trace."""
    layout = Layout(plan)
    num_groups = len(layout.groups("ep")) if plan.model.moe else 0
    lanes = make_lanes(layout, 1 if symmetric else plan.parallel.dp)
    run = run_metadata(plan, layout, lanes, symmetric)
    report = network.report if network is not None else None
    if report is not None:
        run["network"] = {
            "kinds": list(NETWORK_KINDS),
            "links": [[link.name, link.kind] for link in report.links],
        }
    meta = S.encode_metadata(plan.model_dump(mode="json"), plan.seed, run)
    with TraceWriter(path, meta) as writer:
        sink = TraceSink(writer, layout, lanes)
        sink.workload(seq_lens)
        recording = RecordingRouting(routing, num_groups, sink) if routing is not None else None
        rec = Recorder(plan.parallel.world_size, sink=sink.events)
        sim = TrainingSim(plan, rec, seq_lens, recording, symmetric, progress, network, reuse)
        result = sim.run()
        rec.flush()  # the last rows reach the trace; nothing is recorded after the run
        sink.summary(result, rec.rank_idle_ms)
        if report is not None:
            sink.network(report)
    return (
        result,
        rec,
        {"path": str(path), "rows": writer.rows_written, "bytes": writer.bytes_written},
    )


# ---- writing ---------------------------------------------------------------------------------
def serving_run_metadata(plan: Plan, result: ServingResult) -> dict[str, Any]:
    """The ``clustersim.run`` metadata of a serving trace."""
    out = {
        "mode": "inference",
        "time_unit": "s",
        "num_requests": int(result.arrival_ms.size),
        "replicas": result.num_replicas,
        "engines": [list(m) for m in result.engines],
        "kv_cache": dataclasses.asdict(result.kv),
        "engine_fields": list(ENGINE_FIELDS),
        "replica_fields": list(REPLICA_FIELDS),
        "run_fields": list(RUN_FIELDS),
        "clustersim_version": __version__,
        "created_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if result.pools:  # disaggregated: what the metrics need to count each pool's GPUs
        out["pools"] = [
            {
                "role": p.role,
                "gpus": p.gpus,
                "stages": p.stages,
                "replicas": p.replicas,
                "first_replica": p.first_replica,
                "engines": list(p.engines),
                "kv_cache": dataclasses.asdict(p.kv),
            }
            for p in result.pools
        ]
    return out


def _s(ms: float) -> float | None:
    return None if math.isnan(ms) else ms / 1e3


def write_serving_trace(path: Path, plan: Plan, result: ServingResult) -> dict[str, Any]:
    """Write ``result`` (a finished serving run of ``plan``) to ``path`` atomically. Returns
    ``{"path", "rows", "bytes"}``."""
    meta = S.encode_metadata(
        plan.model_dump(mode="json"), plan.seed, serving_run_metadata(plan, result)
    )
    book = result.book
    arrival = result.arrival_ms.tolist()
    rejected = result.rejected.tolist()
    with TraceWriter(path, meta) as writer:
        add = writer.add_row
        for i, (t0, rej) in enumerate(zip(arrival, rejected, strict=True)):
            first, finish = book.first_token_ms[i], book.finish_ms[i]
            if rej:
                first = finish = math.nan
            replica, arr_s, first_s, finish_s = book.replica[i], t0 / 1e3, _s(first), _s(finish)
            add(
                "request",
                "prefill",
                replica=replica,
                microbatch=i,
                start_s=arr_s,
                end_s=first_s,
                value=float(book.prompt[i]),
            )
            add(
                "request",
                "decode",
                replica=replica,
                microbatch=i,
                start_s=first_s,
                end_s=finish_s,
                value=float(book.output[i]),
            )
            add(
                "request",
                "request_done",
                replica=replica,
                microbatch=i,
                start_s=arr_s,
                end_s=finish_s,
                value=float(book.preemptions[i]),
                values=np.array([t0, first, finish, book.first_scheduled_ms[i]]),
            )
        write_kv_rows(writer, result)
        for e, stats in enumerate(result.engine_stats):
            add(
                "summary",
                "serving_engine",
                group=e,
                values=np.array([float(getattr(stats, f)) for f in ENGINE_FIELDS]),
            )
        for r in range(result.num_replicas):
            add(
                "summary",
                "serving_replica",
                replica=r,
                values=np.array([float(result.kv_area[r]), float(result.kv_peak[r])]),
            )
        for kind, counts in enumerate((result.prefill_batches, result.decode_batches)):
            if counts is not None:
                values = counts.astype(np.float64)
                add("summary", "serving_batches", value=float(kind), values=values)
        done = ~result.rejected
        first_s = float(result.arrival_ms.min()) / 1e3 if arrival else 0.0
        last_s = float(np.nanmax(result.book.finish_ms)) / 1e3 if done.any() else first_s
        add(
            "summary",
            "serving_run",
            start_s=first_s,
            end_s=last_s,
            value=float(result.arrival_ms.size),
            values=np.array(
                [
                    float(result.in_system_area),
                    float(result.events),
                    float(result.preemptions),
                    0.0,  # was the wall-clock routing time: kept out so traces are reproducible
                ]
            ),
        )
    return {"path": str(path), "rows": writer.rows_written, "bytes": writer.bytes_written}


def write_kv_rows(writer: TraceWriter, result: ServingResult) -> None:
    """The ``serving`` rows of a run: its KV-cache segments (``kv_usage``, when recorded) and
    its KV transfers (``kv_transfer``, disaggregated runs), in batches of the writer's size."""
    usage, step = result.kv_usage, 1 << 16
    if usage is not None:
        for i in range(0, usage.num_segments, step):
            part = slice(i, i + step)
            n = usage.replica[part].size
            minus_one = np.full(n, -1)
            writer.add_rows(
                "serving",
                "kv_usage",
                layer=minus_one,
                microbatch=minus_one,
                group=minus_one,
                replica=usage.replica[part],
                value=usage.blocks[usage.replica[part]].astype(np.float64),
                values=np.column_stack(
                    (
                        usage.start_ms[part],
                        usage.end_ms[part],
                        usage.used_start[part],
                        usage.used_end[part],
                    )
                ),
                start_s=usage.start_ms[part] / 1e3,
                end_s=usage.end_ms[part] / 1e3,
            )
    if result.kv_transfer_ms is None:
        return
    rids = np.flatnonzero(~np.isnan(result.kv_transfer_ms))
    for i in range(0, rids.size, step):
        ids = rids[i : i + step]
        start = np.asarray(result.book.first_token_ms, dtype=np.float64)[ids]
        ms = result.kv_transfer_ms[ids]
        minus_one = np.full(ids.size, -1)
        writer.add_rows(
            "serving",
            "kv_transfer",
            layer=minus_one,
            microbatch=ids,
            group=minus_one,
            replica=np.asarray(result.book.replica, dtype=np.int64)[ids],
            values=np.column_stack((start, ms, result.decode_replica[ids])),
            start_s=start / 1e3,
            end_s=(start + ms) / 1e3,
            nbytes=result.kv_transfer_bytes[ids],
        )

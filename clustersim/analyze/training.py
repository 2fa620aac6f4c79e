"""``clustersim analyze``: what happened in a recorded run, computed from its trace alone.

One streaming pass over the trace in time order (``analysis.trace_stream``) feeds numba
kernels (``analysis.trace_kernels``) whose state is bounded by the plan (lanes, ops, groups,
layers, experts), never by the number of rows. It computes:

* the run's ``metrics`` with the definitions of ``analysis.metrics`` (same numbers as
  ``clustersim run`` printed, to rounding): utilisation, exposed communication, bubble,
  communication / compute, MFU, throughput, load balance, dropped tokens;
* per GPU: compute-busy time and utilisation, communication time, exposed communication,
  bubble (GPUs of a lane share its timeline except for their own expert GEMM time; replicas
  that mirror a simulated one, in replica-symmetric runs, share its numbers);
* communication by collective (op, with its process-group kind) and by group;
* the critical path of the iteration (see ``trace_kernels``): time per op on it, waits, hops;
* expert load per MoE layer from the recorded routing.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa

from clustersim.analyze import kernels as K
from clustersim.analyze.network import LinkFacts, read_links
from clustersim.analyze.stream import time_ordered
from clustersim.layout import Layout
from clustersim.metrics.bounds import bound_metrics, training_roofline
from clustersim.metrics.training import mfu_pct
from clustersim.trace import schema as S
from clustersim.trace.reader import TraceError, TraceReader

RENDEZVOUS_OPS = ("a2a_dispatch", "a2a_combine", "grad_reduce", "expert_grad_reduce")
MAX_WINDOW_ROWS = 200_000
_N_OPS = len(S.OPS)
_N_EVENT_OPS = len(S.ENGINE_OPS)  # event rows use the first op codes


def op_flags() -> np.ndarray:
    """Per trace op code: how the critical path treats it (``trace_kernels.F_*``)."""
    flags = np.zeros(_N_OPS, dtype=np.int8)
    for name in RENDEZVOUS_OPS:
        flags[S.OP_CODE[name]] |= K.F_RENDEZVOUS
    flags[S.OP_CODE["p2p_send"]] |= K.F_P2P
    flags[S.OP_CODE["optimizer"]] |= K.F_OPTIMIZER
    flags[S.OP_CODE["attn_bwd"]] |= K.F_BWD_END
    return flags


class RunFacts:
    """What the trace's metadata says about the run: plan, lanes, which lane each GPU follows."""

    def __init__(self, reader: TraceReader):
        run = reader.metadata["run"]
        if run.get("mode") != "training":
            raise TraceError(
                f"{reader.path}: trace of mode {run.get('mode')!r} without engine "
                f"events (the timeline, Perfetto export and critical path need a "
                f"training trace)"
            )
        self.plan = reader.plan()
        self.layout = Layout(self.plan)
        lanes = run["lanes"]
        self.num_lanes = len(lanes)
        self.lane_stage = np.array([ln["stage"] for ln in lanes], dtype=np.int64)
        self.lane_dp = np.array([ln["dp"] for ln in lanes], dtype=np.int64)
        self.lane_ranks = [ln["ranks"] for ln in lanes]
        self.gpu_lane = np.array(run["gpu_lane"], dtype=np.int64)
        self.gpu_slot = np.array(run["gpu_slot"], dtype=np.int64)
        self.simulated_dp = int(run["simulated_dp"])
        self.op_groups = run.get("op_groups", {})
        self.lane_at = np.full((self.plan.parallel.pp, self.simulated_dp), -1, dtype=np.int64)
        self.lane_at[self.lane_stage, self.lane_dp] = np.arange(self.num_lanes)
        self.world_size = len(self.gpu_lane)


@dataclass
class TraceAnalysis:
    """Everything ``clustersim analyze`` reports about one trace (times in ms)."""

    path: str
    plan_name: str
    seed: int
    rows: int
    events: int
    metrics: dict[str, Any]
    breakdown: dict[str, float]
    gpus: list[dict[str, Any]]
    comm_by_op: list[dict[str, Any]]
    comm_by_group: list[dict[str, Any]]
    exposed_comm_ms: float
    critical_path: dict[str, Any]
    expert_load: list[dict[str, float]]
    expert_tokens: np.ndarray | None = None  # (MoE layers, experts) tokens summed
    moe_layers: list[int] = field(default_factory=list)
    window_rows: dict[str, np.ndarray] | None = None
    window_ms: tuple[float, float] | None = None
    network: LinkFacts = field(default_factory=LinkFacts)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``clustersim analyze --json``."""
        return {
            "trace": {"path": self.path, "rows": self.rows, "events": self.events},
            "plan": self.plan_name,
            "seed": self.seed,
            "metrics": self.metrics,
            "breakdown_ms": self.breakdown,
            "exposed_comm_ms": self.exposed_comm_ms,
            "communication": {"by_op": self.comm_by_op, "by_group": self.comm_by_group},
            "critical_path": self.critical_path,
            "expert_load_by_layer": self.expert_load,
            "gpus": self.gpus,
            "links": self.network.links,
        }


class _Workload:
    """Workload and routing rows: sequence lengths, expert load per layer, drops."""

    def __init__(self):
        self.seq_lens: dict[tuple[int, int], np.ndarray] = {}
        self.ratio_sum, self.ratio_count = 0.0, 0
        self.dropped, self.routed = 0.0, 0.0
        self.by_layer: dict[int, list[float]] = {}  # layer -> [sum r, max r, sum 1/r, count]
        self.expert_sum: dict[int, np.ndarray] = {}
        self.rows = 0

    def feed(self, batch: pa.RecordBatch, kinds: np.ndarray, ops: np.ndarray) -> None:
        self.rows += batch.num_rows
        layer = batch.column("layer").to_numpy()
        for code, handler in (
            (S.OP_CODE["seq_lens"], self._seq_lens),
            (S.OP_CODE["expert_tokens"], self._expert_tokens),
        ):
            rows = np.flatnonzero(ops == code)
            if rows.size:
                handler(batch.take(pa.array(rows)), layer[rows])
        value = batch.column("value").to_numpy(zero_copy_only=False)
        self.dropped += float(np.nansum(value[ops == S.OP_CODE["dropped_tokens"]]))
        self.routed += float(np.nansum(value[ops == S.OP_CODE["routed_tokens"]]))

    def _seq_lens(self, rows: pa.RecordBatch, _layer: np.ndarray) -> None:
        replica, mb = rows.column("replica").to_numpy(), rows.column("microbatch").to_numpy()
        for i, lens in enumerate(rows.column("values").to_numpy(zero_copy_only=False)):
            self.seq_lens[(int(replica[i]), int(mb[i]))] = np.asarray(lens).astype(np.int64)

    def _expert_tokens(self, rows: pa.RecordBatch, layer: np.ndarray) -> None:
        column = rows.column("values")
        offsets = column.offsets.to_numpy()
        width = int(offsets[1] - offsets[0])
        if width <= 0 or not (np.diff(offsets) == width).all():
            raise TraceError("damaged trace: expert_tokens rows of different lengths")
        flat = column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
        tokens = flat.reshape(-1, width)
        top, mean = tokens.max(axis=1), tokens.mean(axis=1)
        used = top > 0
        tokens, top, mean, layer = tokens[used], top[used], mean[used], layer[used]
        ratio = top / mean
        self.ratio_sum += float((mean / top).sum())
        self.ratio_count += int(used.sum())
        for lay in np.unique(layer):
            sel = layer == lay
            stats = self.by_layer.setdefault(int(lay), [0.0, 0.0, 0.0, 0])
            stats[0] += float(ratio[sel].sum())
            stats[1] = max(stats[1], float(ratio[sel].max()))
            stats[2] += float((1 / ratio[sel]).sum())
            stats[3] += int(sel.sum())
            acc = self.expert_sum.setdefault(int(lay), np.zeros(width))
            acc += tokens[sel].sum(axis=0)

    def lengths(self, dp: int, num_mb: int) -> list[list[np.ndarray]]:
        try:
            return [[self.seq_lens[(d, m)] for m in range(num_mb)] for d in range(dp)]
        except KeyError as exc:
            raise TraceError(f"workload rows missing for replica/micro-batch {exc}") from None

    def expert_load(self) -> list[dict[str, float]]:
        return [
            {
                "layer": layer,
                "max_to_mean_mean": s[0] / s[3],
                "max_to_mean_worst": s[1],
                "load_balance_pct": 100 * s[2] / s[3],
            }
            for layer, s in sorted(self.by_layer.items())
        ]


class _EventState:
    """State of the kernels over the event rows (bounded by the plan, not by the rows)."""

    def __init__(self, facts: RunFacts, t_pipe_s: float, eps_s: float):
        n_lanes, n_gpu = facts.num_lanes, facts.world_size
        num_mb = facts.plan.parallel.num_microbatches
        self.t_pipe = t_pipe_s
        self.reach = np.full((3, n_lanes), -np.inf)
        self.unions = np.zeros((3, n_lanes))
        self.lane_kind = np.zeros((3, n_lanes))
        self.op_stats = np.zeros((3, _N_OPS))
        self.op_group = np.zeros((_N_OPS, max(n_gpu, 1)))
        n_cat = _N_EVENT_OPS + 2  # time per engine op, wait, hops
        self.flags = op_flags()
        self.facts = facts
        self.free = np.zeros((2, n_lanes))
        self.chain = np.zeros((2, n_lanes, n_cat))
        self.pend = np.full((2, n_lanes), -1, dtype=np.int64)  # collective joined (pool slot)
        self.last_op = np.full(n_lanes, -1, dtype=np.int64)
        self.arr_slot = np.full((n_lanes, num_mb), -1, dtype=np.int64)
        pool = min(n_lanes * num_mb, 16 * n_lanes + 1024)
        self.arr_t = np.zeros(pool)
        self.arr_chain = np.zeros((pool, n_cat))
        self.stack = np.arange(pool, dtype=np.int64)
        size = 1 << int(np.ceil(np.log2(16 * n_lanes + 256)))
        # collective instances: hash buckets (key, pool slot) and the pool (trace_kernels)
        self.table = (
            np.zeros((size, 5), dtype=np.int64),
            np.full(size, -1, dtype=np.int64),
            np.zeros((size, 4), dtype=np.int64),
            np.zeros((size, 2)),
            np.zeros((size, n_cat)),
            np.arange(size, dtype=np.int64),
        )
        self.counters = np.array([pool, 0, 0, size], dtype=np.int64)
        self.fstate = np.array([0.0, 0.0, eps_s, -1.0])
        self.bchain = np.zeros(n_cat)
        self.events = 0
        # Both kernels run on worker threads, overlapping each other and the reading of the
        # next batch: they release the GIL and touch disjoint state; each kernel still takes
        # the batches in order (a batch waits for that kernel's previous one).
        self._pool = ThreadPoolExecutor(max_workers=2)
        self._pending: dict[str, Future] = {}

    def _submit(self, name: str, kernel, *args) -> None:
        previous = self._pending.pop(name, None)
        if previous is not None:
            previous.result()  # re-raises a kernel error here
        self._pending[name] = self._pool.submit(kernel, *args)

    def close(self) -> None:
        """Finish the kernels still running and stop their threads."""
        try:
            for name in list(self._pending):
                self._pending.pop(name).result()
        finally:
            self._pool.shutdown(wait=True)

    def feed(self, c: dict[str, np.ndarray]) -> None:
        lane, op, kind, group = c["lane"], c["op"], c["kind"], c["group"]
        start, end = c["start_s"], c["end_s"]
        if op.max() >= _N_EVENT_OPS or lane.min() < 0 or lane.max() >= self.facts.num_lanes:
            raise TraceError("damaged trace: an event row names an unknown op or lane")
        self.events += lane.size
        self._submit(
            "totals",
            K._scan_totals,
            lane,
            kind,
            op,
            group,
            start,
            end,
            c["bytes"],
            self.t_pipe,
            self.reach,
            self.unions,
            self.lane_kind,
            self.op_stats,
            self.op_group,
        )
        f = self.facts
        self._submit(
            "critical",
            K._scan_critical,
            lane,
            kind,
            op,
            group,
            c["layer"],
            c["microbatch"],
            start,
            end,
            np.ascontiguousarray(end).view(np.int64),
            self.flags,
            f.lane_stage,
            f.lane_dp,
            f.lane_at,
            self.free,
            self.chain,
            self.pend,
            self.last_op,
            self.arr_slot,
            self.arr_t,
            self.arr_chain,
            self.stack,
            *self.table,
            self.counters,
            self.fstate,
            self.bchain,
        )

    def critical_path(self) -> dict[str, Any]:
        self.close()
        end_s, chain, lane = K._finish_critical(
            self.free, self.chain, self.pend, *self.table, self.counters
        )
        by_op = {S.OPS[i]: 1e3 * float(v) for i, v in enumerate(chain[:_N_EVENT_OPS]) if v > 0}
        compute = sum(v for k, v in by_op.items() if k not in _COMM_OPS)
        return {
            "length_ms": 1e3 * float(end_s),
            "end_lane": int(lane),
            "end_gpus": self.facts.lane_ranks[lane] if self.facts.num_lanes else [],
            "compute_ms": compute,
            "comm_ms": sum(v for k, v in by_op.items() if k in _COMM_OPS),
            "wait_ms": 1e3 * float(chain[_N_EVENT_OPS]),
            "hops": int(chain[_N_EVENT_OPS + 1]),
            "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "approximate": bool(self.counters[2]),
        }


_COMM_OPS = frozenset(
    (
        "tp_comm",
        "a2a_dispatch",
        "a2a_combine",
        "etp_comm",
        "p2p_send",
        "grad_reduce",
        "expert_grad_reduce",
        "param_gather",
        "cp_comm",
    )
)


def _summary_s(reader: TraceReader, op: str) -> float:
    rows = reader.summary_rows(op)
    if not rows or rows[0]["end_s"] is None:
        raise TraceError(f"{reader.path}: damaged trace (no '{op}' summary row)")
    return float(rows[0]["end_s"])


def analyze_training(
    path: str | Path,
    window_ms: tuple[float, float] | None = None,
    progress: Callable[[float], None] | None = None,
) -> TraceAnalysis:
    """Analyse a training trace in one streaming pass. ``window_ms`` keeps the event rows that
    overlap that interval (at most ``MAX_WINDOW_ROWS``) for a timeline plot."""
    with TraceReader(path) as reader:
        facts = RunFacts(reader)
        wall_s = _summary_s(reader, "iteration")
        t_pipe_s = _summary_s(reader, "pipeline") or wall_s
        idle_rows = reader.summary_rows("expert_idle")
        rank_idle_s = np.asarray(idle_rows[0]["values"] if idle_rows else np.zeros(0))
        state = _EventState(facts, t_pipe_s, eps_s=1e-9 * wall_s + 1e-15)
        work = _Workload()
        window = _Window(window_ms) if window_ms else None
        try:
            for b, chunk in enumerate(time_ordered(reader, work.feed)):
                state.feed(chunk)
                if window is not None:
                    window.feed(chunk)
                if progress is not None:
                    progress(min(1.0, (b + 1) / max(reader.num_batches, 1)))
        finally:
            state.close()
        rows = state.events + work.rows + reader.summary.num_rows
        network = read_links(reader, wall_s * 1e3)
    out = _assemble(str(path), facts, state, work, wall_s, t_pipe_s, rank_idle_s, rows, window)
    out.network = network
    out.metrics["comm_contention_ms"] = network.contention_ms
    if network.present:
        out.metrics["comm_contention_by_kind_ms"] = dict(network.by_kind_ms)
    return out


class _Window:
    """Event rows overlapping a time window (for the timeline plot)."""

    def __init__(self, window_ms: tuple[float, float]):
        self.lo, self.hi = window_ms[0] / 1e3, window_ms[1] / 1e3
        self.parts: list[dict[str, np.ndarray]] = []
        self.count = 0
        self.truncated = False

    def feed(self, c: dict[str, np.ndarray]) -> None:
        if self.count >= MAX_WINDOW_ROWS:
            self.truncated = True
            return
        keep = (c["start_s"] < self.hi) & (c["end_s"] > self.lo)
        if keep.any():
            part = {n: v[keep] for n, v in c.items() if n != "key"}
            self.parts.append(part)
            self.count += int(keep.sum())

    def rows(self) -> dict[str, np.ndarray] | None:
        if not self.parts:
            return None
        return {
            n: np.concatenate([p[n] for p in self.parts])[:MAX_WINDOW_ROWS] for n in self.parts[0]
        }


def _assemble(
    path,
    facts: RunFacts,
    st: _EventState,
    work: _Workload,
    wall_s,
    t_pipe_s,
    rank_idle_s,
    rows,
    window,
) -> TraceAnalysis:
    plan, n_lanes = facts.plan, facts.num_lanes
    compute_u, all_u, busy_pipe = st.unions
    exposed = all_u - compute_u
    tp = plan.parallel.tp
    idle = np.concatenate([rank_idle_s[r] for r in facts.lane_ranks]) if len(rank_idle_s) else 0
    rank_busy = np.repeat(compute_u, tp) - idle
    kind_s = st.lane_kind.sum(axis=1)
    compute_s, comm_s = kind_s[S.KIND_CODE["compute"]], kind_s[1] + kind_s[2]
    par = plan.parallel
    seq_lens = work.lengths(par.dp, par.num_microbatches)
    tokens = int(sum(int(x.sum()) for mbs in seq_lens for x in mbs))
    wall_ms = wall_s * 1e3
    metrics = {
        "iteration_time_ms": wall_ms,
        "latency_ms": wall_ms,
        "latency_ms_p99": None,
        "ttft_ms_p50": None,
        "ttft_ms_p99": None,
        "tpot_ms_p50": None,
        "throughput_tokens_per_ms": tokens / wall_ms,
        "throughput_tokens_per_s": tokens / wall_ms * 1e3,
        "mfu_pct": mfu_pct(plan, SimpleNamespace(seq_lens=seq_lens, iteration_time_ms=wall_ms)),
        "comm_overhead_pct": 100 * float(exposed.mean()) / wall_s,
        "comm_to_compute_pct": 100 * comm_s / compute_s if compute_s else 0.0,
        "bubble_pct": 100 * float((t_pipe_s - busy_pipe).mean()) / t_pipe_s,
        "gpu_utilization_pct": 100 * float(rank_busy.mean()) / wall_s,
        "load_balance_pct": (
            100 * work.ratio_sum / work.ratio_count
            if work.ratio_count
            else (100.0 if plan.model.moe else None)
        ),
        "dropped_tokens_pct": 100 * work.dropped / work.routed if work.routed else None,
    }
    if plan.model.moe is None:
        metrics["load_balance_pct"] = None
    # issue 17's metrics, as metrics.training computes them
    active = [float((acc > 0).mean()) for acc in work.expert_sum.values()]
    lengths = np.concatenate([np.concatenate(mbs) for mbs in seq_lens])
    values, counts = np.unique(lengths, return_counts=True)
    bound = training_roofline(
        plan, tokens, dict(zip(values.tolist(), counts.tolist(), strict=True))
    )
    metrics["gpu_utilization_pct_min"] = 100 * float(rank_busy.min()) / wall_s
    metrics["expert_utilization_pct"] = 100 * float(np.mean(active)) if active else None
    metrics.update(bound_metrics(bound, metrics["throughput_tokens_per_ms"]))
    op_ms = st.op_stats[0] * 1e3
    breakdown = {S.OPS[o]: float(op_ms[o]) / max(n_lanes, 1) for o in range(_N_OPS) if op_ms[o] > 0}
    gpus = _gpu_rows(facts, st, rank_idle_s, wall_s, t_pipe_s)
    comm_by_op, comm_by_group = _comm_tables(facts, st)
    layers = sorted(work.expert_sum)
    experts = np.array([work.expert_sum[x] for x in layers]) if layers else None
    return TraceAnalysis(
        path,
        plan.name,
        plan.seed,
        rows,
        st.events,
        metrics,
        breakdown,
        gpus,
        comm_by_op,
        comm_by_group,
        1e3 * float(exposed.mean()),
        st.critical_path(),
        work.expert_load(),
        experts,
        layers,
        window.rows() if window else None,
        (window.lo * 1e3, window.hi * 1e3) if window else None,
    )


def _gpu_rows(
    facts: RunFacts, st: _EventState, rank_idle_s, wall_s: float, t_pipe_s: float
) -> list[dict[str, Any]]:
    compute_u, all_u, busy_pipe = st.unions
    gpn = facts.plan.hardware.gpus_per_node
    rows = []
    for gpu in range(facts.world_size):
        lane = int(facts.gpu_lane[gpu])
        own = facts.lane_ranks[lane][int(facts.gpu_slot[gpu])]
        idle = float(rank_idle_s[own]) if len(rank_idle_s) else 0.0
        busy = float(compute_u[lane]) - idle
        rows.append(
            {
                "gpu": gpu,
                "node": gpu // gpn,
                "lane": lane,
                "stage": int(facts.lane_stage[lane]),
                "mirrors": own if own != gpu else None,
                "compute_ms": 1e3 * busy,
                "comm_ms": 1e3 * float(st.lane_kind[1, lane] + st.lane_kind[2, lane]),
                "exposed_comm_ms": 1e3 * float(all_u[lane] - compute_u[lane]),
                "bubble_ms": 1e3 * float(t_pipe_s - busy_pipe[lane]),
                "utilization_pct": 100 * busy / wall_s,
            }
        )
    return rows


def _comm_tables(facts: RunFacts, st: _EventState) -> tuple[list[dict], list[dict]]:
    by_op, by_group = [], []
    n_lanes = max(facts.num_lanes, 1)
    for name in _COMM_OPS:
        o = S.OP_CODE[name]
        if st.op_stats[1, o] == 0:
            continue
        kind = facts.op_groups.get(name, "")
        by_op.append(
            {
                "op": name,
                "group_kind": kind,
                "total_ms": 1e3 * st.op_stats[0, o],
                "per_gpu_ms": 1e3 * st.op_stats[0, o] / n_lanes,
                "count": int(st.op_stats[1, o]),
                "bytes": float(st.op_stats[2, o]),
            }
        )
        groups = facts.layout.groups(kind) if kind else []
        for g in np.flatnonzero(st.op_group[o]):
            by_group.append(
                {
                    "op": name,
                    "group_kind": kind,
                    "group": int(g),
                    "gpus": groups[g] if g < len(groups) else None,
                    "total_ms": 1e3 * float(st.op_group[o, g]),
                }
            )
    by_op.sort(key=lambda r: -r["total_ms"])
    by_group.sort(key=lambda r: -r["total_ms"])
    return by_op, by_group

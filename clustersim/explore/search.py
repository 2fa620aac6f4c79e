"""Search the parallel layouts of a plan for the best one, and propose fixes for broken plans.

:func:`search` enumerates candidates around a base plan on ``gpus`` GPUs (TP, PP, DP, EP, ETP,
micro-batch size and count, schedule with valid virtual stages, recompute), discards those the
auditor rejects (invalid layouts, out of memory, the memory target) before simulating, skips
recompute levels that a lighter level already makes fit (more recompute only adds work),
simulates the rest in parallel (``search_backends``), ranks them by the objective with the
plan's targets as constraints, marks the Pareto front, and keeps every candidate with its
parameters and metrics in a Parquet table that is rewritten atomically as results arrive, so
an interrupted search resumes from it (``resume=True``; candidates are keyed by a stable id).

Objectives: ``throughput`` (max tokens/ms), ``latency`` (min ms: the iteration time in training,
p50 end-to-end latency in serving), ``cost`` (min GPU-ms per token = GPUs x time / tokens =
world size / throughput).

:func:`nearest_valid_plan` is the fix ``clustersim check`` proposes: the valid plan with the
fewest changed ``parallel`` fields that meets the static targets, from a bounded, static-only
search (the auditor, no simulation).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustersim.audit.checks import METRIC_KEYS, audit
from clustersim.audit.fixes import RECOMPUTE_ORDER, with_parallel
from clustersim.explore.backends import default_workers, run_tasks
from clustersim.spec.outputs import atomic_output, check_output
from clustersim.spec.schema import ClaimsSpec, Plan

OBJECTIVES = {
    "throughput": ("throughput_tokens_per_ms", "max"),
    "latency": ("latency_ms", "min"),
    "cost": ("cost_gpu_ms_per_token", "min"),
}
PARETO_AXES = {"latency": ("latency_ms", "min"), "memory": ("memory_per_gpu_gib", "min")}
MEMORY_NODES = ("hardware.memory_gib", "targets.memory_per_gpu_gib_max")
PARAM_KEYS = (
    "tp",
    "pp",
    "dp",
    "ep",
    "etp",
    "micro_batch_size",
    "num_microbatches",
    "schedule",
    "virtual_stages",
    "recompute",
)
DONE = ("simulated", "unsupported", "failed")  # statuses a resumed search does not redo
SCHEMA_VERSION = "1"


class SearchError(ValueError):
    """A search cannot run as asked (bad space, a table from another base plan, ...)."""


# ---- the space ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSpace:
    """Values to try per field; None = a small default derived from the base plan."""

    gpus: int
    tp: tuple[int, ...] | None = None
    pp: tuple[int, ...] | None = None
    ep: tuple[int, ...] | None = None
    micro_batch_size: tuple[int, ...] | None = None
    schedules: tuple[str, ...] = ("1f1b", "interleaved")
    virtual_stages: tuple[int, ...] = (2,)
    recompute: tuple[str, ...] = RECOMPUTE_ORDER
    prune_recompute: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (stored in the table's metadata)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _pow2_upto(n: int) -> tuple[int, ...]:
    return tuple(2**i for i in range(int(math.log2(max(n, 1))) + 1))


def cluster_plan(base: Plan, gpus: int, seed: int | None = None) -> Plan:
    """The base plan on a cluster of ``gpus`` GPUs (nodes of the base's size, or one node of
    ``gpus`` when smaller), without claims (they describe the base layout), seed overridden."""
    if gpus < 1:
        raise SearchError(f"--gpus must be positive, got {gpus}")
    gpn = base.hardware.gpus_per_node
    if gpus <= gpn:
        hw = {"num_nodes": 1, "gpus_per_node": gpus}
    elif gpus % gpn == 0:
        hw = {"num_nodes": gpus // gpn}
    else:
        raise SearchError(f"--gpus {gpus} is not a whole number of nodes of {gpn} GPUs")
    update: dict[str, Any] = {
        "hardware": base.hardware.model_copy(update=hw),
        "claims": ClaimsSpec(),
    }
    if seed is not None:
        update["seed"] = seed
    return base.model_copy(update=update)


def candidate_id(params: dict[str, Any]) -> str:
    """A stable id of a candidate's parameters (independent of order and of the base plan)."""
    text = json.dumps({k: params[k] for k in PARAM_KEYS}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def enumerate_candidates(base: Plan, space: SearchSpace) -> list[dict[str, Any]]:
    """Every candidate's parallel parameters, in a deterministic order (with ``id``, ``index``).

    The grid is plain (the auditor discards what does not divide or fit), except that DP is
    derived (world = ``space.gpus``), ETP is 1 or TP, interleaving is listed only with PP >= 2 and
    a valid number of virtual stages, and the micro-batch count keeps the base plan's global
    batch (DP x micro-batch size x micro-batches) where that divides.
    """
    par, model, gpus = base.parallel, base.model, space.gpus
    gpn = min(base.hardware.gpus_per_node, gpus)
    training = base.workload.mode == "training"
    tps = space.tp or tuple(t for t in _pow2_upto(gpn) if gpus % t == 0)
    pps = space.pp or tuple(p for p in _pow2_upto(min(model.num_layers, 8)) if gpus % p == 0)
    experts = model.moe.num_experts if model.moe else 1
    eps = space.ep or tuple(e for e in _pow2_upto(min(experts, gpus)))
    global_batch = par.dp * par.micro_batch_size * par.num_microbatches
    mbss = space.micro_batch_size or tuple(sorted({1, 2, 4, par.micro_batch_size}))
    out: list[dict[str, Any]] = []
    for tp, pp, ep in itertools.product(tps, pps, eps):
        if gpus % (tp * pp):
            continue
        dp = gpus // (tp * pp)
        for etp in sorted({1, tp}) if model.moe else [None]:
            for mbs, m in _batches(dp, mbss, global_batch, par, training):
                for sched, v in _schedules(pp, m, model.num_layers, space, par, training):
                    for rc in space.recompute if training else (par.recompute,):
                        params = {
                            "tp": tp,
                            "pp": pp,
                            "dp": dp,
                            "ep": ep,
                            "etp": etp,
                            "micro_batch_size": mbs,
                            "num_microbatches": m,
                            "schedule": sched,
                            "virtual_stages": v,
                            "recompute": rc,
                        }
                        out.append(params)
    seen: set[str] = set()
    unique = []
    for params in out:
        cid = candidate_id(params)
        if cid not in seen:
            seen.add(cid)
            unique.append({**params, "id": cid, "index": len(unique)})
    return unique


def _batches(dp, mbss, global_batch, par, training):
    if not training:
        return [(par.micro_batch_size, par.num_microbatches)]
    exact = [(mbs, global_batch // (dp * mbs)) for mbs in mbss if global_batch % (dp * mbs) == 0]
    if exact:
        return exact
    # the global batch cannot be kept: the base micro-batch size, the nearest count
    return [(par.micro_batch_size, max(1, round(global_batch / (dp * par.micro_batch_size))))]


def _schedules(pp, m, num_layers, space, par, training):
    if not training:
        return [(par.schedule if pp > 1 else "1f1b", 1)]
    if pp == 1:
        return [("1f1b", 1)]
    out = []
    for sched in space.schedules:
        if sched == "interleaved":
            out += [
                ("interleaved", v)
                for v in space.virtual_stages
                if v >= 2 and num_layers % (pp * v) == 0 and m % pp == 0
            ]
        elif sched == "dualpipe":  # DualPipe's own rule: pp even, m even and >= 2 pp
            if pp % 2 == 0 and m % 2 == 0 and m >= 2 * pp:
                out.append(("dualpipe", 1))
        else:
            out.append((sched, 1))
    return out


def candidate_plan(base: Plan, params: dict[str, Any]) -> Plan:
    """The plan of one candidate (``base`` as returned by :func:`cluster_plan`)."""
    changes = {k: params[k] for k in PARAM_KEYS}
    changes["layers_per_stage"] = None
    if params["tp"] > 1 and base.model.moe is not None:
        changes["sequence_parallel"] = True  # Megatron requires it for MoE with TP
    plan = with_parallel(base, **changes)
    return plan.model_copy(update={"name": f"{base.name}-{params['id']}"})


# ---- static pruning -------------------------------------------------------------------------
def static_row(base: Plan, params: dict[str, Any]) -> dict[str, Any]:
    """A candidate's row after the audit: status pending (to simulate), invalid or oom."""
    plan = candidate_plan(base, params)
    report = audit(plan)
    errors = report.errors
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(
        {k: params[k] for k in PARAM_KEYS},
        candidate_id=params["id"],
        index=params["index"],
        world_size=plan.parallel.world_size,
        global_batch=params["dp"] * params["micro_batch_size"] * params["num_microbatches"],
        pareto=False,
    )
    if report.memory is not None:
        row["memory_per_gpu_gib"] = round(report.memory.memory_per_gpu_gib, 6)
    if not errors:
        row["status"] = "pending"
    elif all(f.node in MEMORY_NODES for f in errors):
        row["status"], row["reason"] = "oom", errors[0].message[:300]
    else:
        row["status"] = "invalid"
        row["reason"] = "; ".join(f"{f.node}: {f.message}" for f in errors)[:300]
    return row


def prune_recompute(rows: list[dict[str, Any]]) -> None:
    """Mark a valid candidate ``dominated`` when the same candidate with less recompute is valid
    too (recompute adds work and only saves memory)."""
    lightest: dict[tuple, str] = {}
    for row in rows:
        if row["status"] != "pending":
            continue
        key = tuple(row[k] for k in PARAM_KEYS if k != "recompute")
        lighter = lightest.get(key)
        level = RECOMPUTE_ORDER.index(row["recompute"])
        if lighter is None or RECOMPUTE_ORDER.index(lighter) > level:
            lightest[key] = row["recompute"]
    for row in rows:
        if row["status"] != "pending":
            continue
        key = tuple(row[k] for k in PARAM_KEYS if k != "recompute")
        if lightest[key] != row["recompute"]:
            row["status"] = "dominated"
            row["reason"] = f"recompute {lightest[key]} already fits"


# ---- the table ------------------------------------------------------------------------------
COLUMNS = (
    "index",
    "candidate_id",
    "status",
    "reason",
    *PARAM_KEYS,
    "global_batch",
    "world_size",
    "memory_per_gpu_gib",
    *METRIC_KEYS,
    "cost_gpu_ms_per_token",
    "meets_targets",
    "failed_targets",
    "exit_code",
    "events",
    "objective",
    "rank",
    "pareto",
)


_INT = {
    "index",
    "tp",
    "pp",
    "dp",
    "ep",
    "etp",
    "micro_batch_size",
    "num_microbatches",
    "virtual_stages",
    "global_batch",
    "world_size",
    "events",
    "exit_code",
    "rank",
}


_STR = {"candidate_id", "status", "reason", "schedule", "recompute", "failed_targets"}


_BOOL = {"meets_targets", "pareto"}


def _schema():
    import pyarrow as pa

    def typ(c):
        if c in _INT:
            return pa.int64()
        if c in _STR:
            return pa.string()
        if c in _BOOL:
            return pa.bool_()
        return pa.float64()

    return pa.schema([(c, typ(c)) for c in COLUMNS])


def write_table(
    path: Path,
    rows: Iterable[dict[str, Any]],
    meta: dict[str, str],
    inputs: Iterable[Path | str | None] = (),
) -> None:
    """Write rows as Parquet atomically (``spec.outputs.atomic_output``: a unique temporary
    file renamed over ``path``; never over one of ``inputs``)."""
    write_rows(path, rows, _schema(), meta, inputs)


def write_rows(path: Path, rows: Iterable[dict[str, Any]], schema, meta: dict[str, str],
               inputs: Iterable[Path | str | None] = ()) -> None:  # fmt: skip
    """Rows (the columns of ``schema``, ``meta`` as its metadata) as Parquet, written
    atomically: the training and the serving search tables."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = schema.with_metadata({k.encode(): v.encode() for k, v in meta.items()})
    columns = schema.names
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows], schema=schema)
    with atomic_output(path, inputs) as tmp:
        pq.write_table(table, tmp)


def read_table(path: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Rows and metadata of a search table."""
    table = read_parquet(path)
    missing = [c for c in ("candidate_id", *_SIM_FIELDS) if c not in table.column_names]
    if missing:
        raise SearchError(
            f"{path}: not a search table of this version (missing column(s) "
            f"{', '.join(missing)}); drop --resume to start over, or use another --output"
        )
    return table.to_pylist(), table_metadata(path, table)


def read_parquet(path: Path):
    """The Parquet table at ``path`` (:class:`SearchError` when it cannot be read)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same message
        raise SearchError(f"{path}: not a readable search table ({exc})") from None


def table_metadata(path: Path, table) -> dict[str, str]:
    """A search table's metadata as text (:class:`SearchError` when it is not UTF-8)."""
    try:
        return {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    except UnicodeDecodeError:
        raise SearchError(f"{path}: unreadable metadata (not UTF-8)") from None


def base_fingerprint(base: Plan) -> str:
    """What a resumed table must have been computed from: the base plan minus its name."""
    data = base.model_dump(mode="json", exclude={"name"})
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ---- ranking --------------------------------------------------------------------------------
def finish_rows(rows: list[dict[str, Any]], objective: str, pareto_axis: str) -> None:
    """Fill cost, objective, rank (simulated candidates, those meeting the targets first) and
    the Pareto front (throughput vs ``pareto_axis`` among those meeting the targets)."""
    metric, sense = OBJECTIVES[objective]
    sim = []
    for row in rows:
        row["rank"], row["pareto"], row["objective"] = None, False, None
        tput = row.get("throughput_tokens_per_ms")
        row["cost_gpu_ms_per_token"] = (row["world_size"] / tput) if tput else None
        if row["status"] == "simulated" and row.get(metric) is not None:
            row["objective"] = row[metric]
            sim.append(row)
    sign = -1 if sense == "max" else 1
    sim.sort(key=lambda r: (not r["meets_targets"], sign * r["objective"], r["index"]))
    for i, row in enumerate(sim, 1):
        row["rank"] = i
    axis, axis_sense = PARETO_AXES[pareto_axis]
    feasible = [
        r
        for r in sim
        if r["meets_targets"]
        and r.get(axis) is not None
        and r.get("throughput_tokens_per_ms") is not None
    ]
    for row in feasible:
        row["pareto"] = not any(_dominates(o, row, axis) for o in feasible if o is not row)


def _dominates(a: dict[str, Any], b: dict[str, Any], axis: str) -> bool:
    ta, tb = a["throughput_tokens_per_ms"], b["throughput_tokens_per_ms"]
    xa, xb = a[axis], b[axis]
    return ta >= tb and xa <= xb and (ta > tb or xa < xb)


# ---- the search -----------------------------------------------------------------------------
@dataclass
class SearchResult:
    """Every candidate's row (in enumeration order), and what this run did."""

    base: Plan
    rows: list[dict[str, Any]]
    objective: str
    pareto_axis: str
    path: Path | None
    simulated_now: int = 0
    resumed: int = 0
    wall_s: float = 0.0
    complete: bool = True
    workers: int = 1
    backend: str = "local"
    counts: dict[str, int] = field(default_factory=dict)

    def ranked(self, feasible_only: bool = True) -> list[dict[str, Any]]:
        """Simulated candidates by rank (only those meeting the targets by default)."""
        rows = [
            r
            for r in self.rows
            if r["rank"] is not None and (r["meets_targets"] or not feasible_only)
        ]
        return sorted(rows, key=lambda r: r["rank"])

    def pareto(self) -> list[dict[str, Any]]:
        """The Pareto front, by throughput (best first)."""
        front = [r for r in self.rows if r["pareto"]]
        return sorted(front, key=lambda r: (-r["throughput_tokens_per_ms"], r["index"]))

    def best(self) -> dict[str, Any] | None:
        """The best candidate meeting the targets, or None."""
        ranked = self.ranked()
        return ranked[0] if ranked else None

    def plan_for(self, row: dict[str, Any]) -> Plan:
        """The plan of a result row."""
        return candidate_plan(
            self.base, {**{k: row[k] for k in PARAM_KEYS}, "id": row["candidate_id"]}
        )

    def summary(self) -> dict[str, Any]:
        """Counts and the fraction discarded statically."""
        total = len(self.rows)
        static = self.counts.get("invalid", 0) + self.counts.get("oom", 0)
        return {
            "candidates": total,
            **self.counts,
            "discarded_statically_pct": 100 * static / total if total else 0.0,
            "simulated_now": self.simulated_now,
            "resumed": self.resumed,
            "complete": self.complete,
            "wall_s": self.wall_s,
            "workers": self.workers,
            "backend": self.backend,
        }

    def to_dict(self, top: int = 10) -> dict[str, Any]:
        """JSON-ready: summary, the best candidates, the Pareto front, the best plan's block."""
        best = self.best()
        return {
            "base": self.base.name,
            "gpus": self.base.hardware.num_gpus,
            "objective": self.objective,
            "pareto_axis": self.pareto_axis,
            "table": str(self.path) if self.path else None,
            "summary": self.summary(),
            "ranking": self.ranked()[:top],
            "pareto": self.pareto(),
            "best_parallel": self.plan_for(best).parallel.model_dump(mode="json") if best else None,
        }


ProgressFn = Callable[[int, int], None]


def search(
    base: Plan,
    gpus: int | None = None,
    objective: str = "throughput",
    *,
    space: SearchSpace | None = None,
    workers: int | None = None,
    out: Path | str | None = None,
    resume: bool = False,
    limit: int | None = None,
    seed: int | None = None,
    pareto_axis: str = "auto",
    backend: str = "local",
    progress: ProgressFn | None = None,
    flush_s: float = 2.0,
    inputs: Iterable[Path | str | None] = (),
) -> SearchResult:
    """Search the layouts of ``base`` on ``gpus`` GPUs (default: the base cluster's) for the
    best by ``objective`` under the base plan's targets (see the module docstring).

    ``limit`` bounds the candidates simulated by this call (the rest stay ``pending`` in the
    table and a later ``resume=True`` call simulates them). ``out`` must be a regular file
    (or absent) and none of ``inputs`` (the command's input files). Raises
    :class:`SearchError` (or ``spec.outputs.OutputError`` for an unusable ``out``).
    """
    if objective not in OBJECTIVES:
        raise SearchError(f"objective {objective!r}: choose from {', '.join(OBJECTIVES)}")
    if pareto_axis == "auto":  # a training global batch is fixed: throughput ~ 1 / latency
        pareto_axis = "memory" if base.workload.mode == "training" else "latency"
    if pareto_axis not in PARETO_AXES:
        raise SearchError(f"pareto axis {pareto_axis!r}: choose from {', '.join(PARETO_AXES)}")
    started = time.perf_counter()
    gpus = gpus or base.hardware.num_gpus
    space = space or SearchSpace(gpus=gpus)
    if space.gpus != gpus:
        space = SearchSpace(**{**space.__dict__, "gpus": gpus})
    base = cluster_plan(base, gpus, seed)
    workers = workers or default_workers()
    path = check_output(out, inputs) if out is not None else None
    inputs = tuple(inputs)
    meta = {
        "clustersim_search": SCHEMA_VERSION,
        "base_fingerprint": base_fingerprint(base),
        "base_plan": base.model_dump_json(),
        "space": json.dumps(space.to_dict()),
    }

    params = enumerate_candidates(base, space)
    rows = [static_row(base, p) for p in params]
    if space.prune_recompute:
        prune_recompute(rows)
    by_id = {r["candidate_id"]: r for r in rows}
    resumed = 0
    if resume and path is not None and path.exists():
        old_rows, old_meta = read_table(path)
        if old_meta.get("base_fingerprint") != meta["base_fingerprint"]:
            raise SearchError(
                f"{path} was written for another base plan, cluster or seed; "
                "drop --resume to start over, or use another --output"
            )
        for old in old_rows:
            row = by_id.get(old["candidate_id"])
            if row is not None and row["status"] == "pending" and old["status"] in DONE:
                row.update({k: old[k] for k in _SIM_FIELDS})
                resumed += 1
    elif path is not None and path.exists() and not resume:
        path.unlink()

    todo = [r for r in rows if r["status"] == "pending"]
    if limit is not None:
        todo = todo[: max(0, limit)]
    tasks = [
        (
            r["candidate_id"],
            candidate_plan(
                base, {**{k: r[k] for k in PARAM_KEYS}, "id": r["candidate_id"]}
            ).model_dump(mode="json"),
        )
        for r in todo
    ]

    def save() -> None:
        if path is not None:
            finish_rows(rows, objective, pareto_axis)
            write_table(path, rows, meta, inputs)

    done = 0
    last_flush = time.perf_counter()
    save()
    results = run_tasks(tasks, workers, backend)
    try:
        for cid, result in results:
            by_id[cid].update(result)
            done += 1
            if progress is not None:
                progress(done, len(tasks))
            if time.perf_counter() - last_flush >= flush_s:
                save()
                last_flush = time.perf_counter()
    finally:
        results.close()
        save()
    finish_rows(rows, objective, pareto_axis)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return SearchResult(
        base,
        rows,
        objective,
        pareto_axis,
        path,
        done,
        resumed,
        time.perf_counter() - started,
        "pending" not in counts,
        workers,
        backend,
        counts,
    )


_SIM_FIELDS = (
    "status",
    "reason",
    *METRIC_KEYS,
    "meets_targets",
    "failed_targets",
    "exit_code",
    "events",
)


__all__ = [
    "OBJECTIVES",
    "SearchError",
    "SearchResult",
    "SearchSpace",
    "candidate_id",
    "cluster_plan",
    "enumerate_candidates",
    "search",
]

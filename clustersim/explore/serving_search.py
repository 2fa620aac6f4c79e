"""Search the deployments of a serving plan for the most capacity (or goodput) per GPU.

The space is serving knobs only, on ``gpus`` GPUs: TP, PP, EP (and ETP 1 or TP) with the
data-parallel replicas derived (``dp = gpus / (tp x pp)``; with EP spanning replicas this is
attention data parallelism), ``workload.requests.max_batch_size``,
``max_num_batched_tokens`` and ``chunked_prefill``. For a disaggregated base plan
(``parallel.prefill`` and ``parallel.decode``) it also covers the prefill:decode split: the
prefill pool gets each of ``prefill_gpus`` (default every eighth of the GPUs), the decode
pool the rest, and each pool its own TP (PP) with EP inside a replica or across the whole pool
(:func:`enumerate_disaggregated`); rows carry the decode pool's degrees under the plain keys,
the prefill pool's under ``prefill_*`` and the split as ``xPyD`` (replicas). A candidate the
auditor rejects (it does not divide, or does not fit in memory with room for one longest
request in the KV cache) is discarded before simulating.

Objectives:

* ``capacity``: the highest request rate at which the plan's SLOs hold
  (:mod:`clustersim.explore.capacity`), per GPU;
* ``goodput``: good requests per second per GPU at the plan's own request rate.

The SLOs are the constraints: a candidate is *feasible* when, at its capacity (``capacity``)
or at the plan's rate (``goodput``), the verdict that ``check`` prints has no error (its
targets met, its layout valid). Feasible candidates are ranked by the objective (ties: fewer
GPUs per replica, then enumeration order); the Pareto front is capacity per GPU vs TTFT p99
and TPOT p99 at that rate.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustersim.audit.checks import audit
from clustersim.audit.fixes import with_parallel
from clustersim.explore.backends import default_workers, run_tasks
from clustersim.explore.capacity import NoSlo, find_capacity
from clustersim.explore.search import (
    DONE,
    SearchError,
    base_fingerprint,
    cluster_plan,
    read_parquet,
    table_metadata,
    write_rows,
)
from clustersim.run.evaluate import evaluate
from clustersim.spec.schema import ParallelSpec, Plan

OBJECTIVES = ("capacity", "goodput")
PARALLEL_KEYS = ("tp", "pp", "dp", "ep", "etp")
REQUEST_KEYS = ("max_batch_size", "max_num_batched_tokens", "chunked_prefill")
# disaggregated plans: the prefill pool's knobs and the split (the plain keys: decode pool)
PREFILL_KEYS = ("prefill_tp", "prefill_pp", "prefill_dp", "prefill_ep", "prefill_etp")
SPLIT_KEYS = ("split", "prefill_gpus", "decode_gpus")
PARAM_KEYS = PARALLEL_KEYS + REQUEST_KEYS + PREFILL_KEYS + SPLIT_KEYS
RESULT_KEYS = (
    "capacity_req_per_s",
    "capacity_req_per_s_per_gpu",
    "goodput_req_per_s",
    "goodput_req_per_s_per_gpu",
    "goodput_pct",
    "ttft_ms_p99",
    "tpot_ms_p99",
    "limiting_slo",
    "probes",
)
# what a candidate's simulation adds to its row: a resumed search takes them from the table
SIM_FIELDS = ("status", "reason", *RESULT_KEYS, "feasible", "errors")
TABLE_KEYS = ("index", "candidate_id", "status", "reason", *PARAM_KEYS, *RESULT_KEYS,
              "feasible", "errors", "rank", "pareto")  # fmt: skip
TABLE_VERSION = "1"  # metadata ``clustersim_serving_search`` of the table


@dataclass(frozen=True)
class ServingSpace:
    """Values to try per knob; None = a default derived from the base plan."""

    gpus: int
    tp: tuple[int, ...] | None = None
    pp: tuple[int, ...] | None = None
    ep: tuple[int, ...] | None = None
    max_batch_size: tuple[int, ...] | None = None
    max_num_batched_tokens: tuple[int, ...] | None = None
    chunked_prefill: tuple[bool, ...] = (True, False)
    prefill_gpus: tuple[int, ...] | None = None  # disaggregated: GPUs of the prefill pool


def _pow2_upto(n: int) -> tuple[int, ...]:
    return tuple(2**i for i in range(int(math.log2(max(n, 1))) + 1))


def _pool_layouts(base: Plan, space: ServingSpace, gpus: int) -> list[dict[str, Any]]:
    """(tp, pp, dp, ep, etp) of one pool of ``gpus`` GPUs: TP and PP as for a colocated
    deployment (PP 1 unless ``space.pp``), EP inside a replica (= TP) or across every GPU of
    the pool (attention DP + EP, the large-EP style) unless ``space.ep``; ETP 1."""
    model = base.model
    gpn = min(base.hardware.gpus_per_node, gpus)
    tps = space.tp or tuple(t for t in _pow2_upto(gpn) if gpus % t == 0)
    out = []
    for tp, pp in itertools.product(tps, space.pp or (1,)):
        if gpus % (tp * pp):
            continue
        dp = gpus // (tp * pp)
        if model.moe is None:
            out.append({"tp": tp, "pp": pp, "dp": dp, "ep": 1, "etp": None})
            continue
        experts = model.moe.num_experts
        eps = space.ep or tuple(sorted({tp, tp * dp}))
        for ep in eps:
            if experts % ep == 0:
                out.append({"tp": tp, "pp": pp, "dp": dp, "ep": ep, "etp": 1})
    return out


def _prefill_splits(space: ServingSpace) -> tuple[int, ...]:
    """GPUs of the prefill pool to try: ``space.prefill_gpus``, else eighths of the budget
    (every split of up to 8 GPUs), the decode pool getting the rest."""
    gpus = space.gpus
    if space.prefill_gpus:
        return tuple(p for p in space.prefill_gpus if 0 < p < gpus)
    step = gpus // 8 if gpus % 8 == 0 and gpus > 8 else 1
    return tuple(range(step, gpus, step))


def enumerate_disaggregated(base: Plan, space: ServingSpace) -> list[dict[str, Any]]:
    """Every candidate of a disaggregated plan: each prefill:decode split of the GPUs, each
    pool's layout (:func:`_pool_layouts`) and the request knobs, in a deterministic order."""
    req = base.workload.requests
    mbss = space.max_batch_size or (req.max_batch_size,)
    budgets = space.max_num_batched_tokens or (req.max_num_batched_tokens,)
    out: list[dict[str, Any]] = []
    for p_gpus in _prefill_splits(space):
        d_gpus = space.gpus - p_gpus
        for pre, dec in itertools.product(
            _pool_layouts(base, space, p_gpus), _pool_layouts(base, space, d_gpus)
        ):
            for mbs, budget, chunked in itertools.product(mbss, budgets, space.chunked_prefill):
                params = {
                    **dec,
                    **{f"prefill_{k}": v for k, v in pre.items()},
                    "split": f"{pre['dp']}P{dec['dp']}D",
                    "prefill_gpus": p_gpus,
                    "decode_gpus": d_gpus,
                    "max_batch_size": mbs,
                    "max_num_batched_tokens": budget,
                    "chunked_prefill": chunked,
                }
                out.append({**params, "index": len(out)})
    return out


def enumerate_serving(base: Plan, space: ServingSpace) -> list[dict[str, Any]]:
    """Every candidate's knobs, in a deterministic order (with ``index``)."""
    if base.parallel.disaggregated:
        return enumerate_disaggregated(base, space)
    gpus, model, req = space.gpus, base.model, base.workload.requests
    gpn = min(base.hardware.gpus_per_node, gpus)
    tps = space.tp or tuple(t for t in _pow2_upto(gpn) if gpus % t == 0)
    pps = space.pp or tuple(p for p in (1, 2) if gpus % p == 0)
    experts = model.moe.num_experts if model.moe else 1
    eps = space.ep or (_pow2_upto(min(experts, gpus)) if model.moe else (1,))
    mbss = space.max_batch_size or (req.max_batch_size,)
    budgets = space.max_num_batched_tokens or (req.max_num_batched_tokens,)
    out: list[dict[str, Any]] = []
    for tp, pp, ep in itertools.product(tps, pps, eps):
        if gpus % (tp * pp):
            continue
        dp = gpus // (tp * pp)
        for etp in sorted({1, tp}) if model.moe else [None]:
            for mbs, budget, chunked in itertools.product(mbss, budgets, space.chunked_prefill):
                params = {
                    "tp": tp,
                    "pp": pp,
                    "dp": dp,
                    "ep": ep if model.moe else 1,
                    "etp": etp,
                    "max_batch_size": mbs,
                    "max_num_batched_tokens": budget,
                    "chunked_prefill": chunked,
                }
                out.append({**params, "index": len(out)})
    return out


def _disaggregated_plan(base: Plan, params: dict[str, Any]) -> Plan:
    """The disaggregated plan of one candidate: each pool's block of ``base`` with the
    candidate's degrees (no explicit layer split)."""
    blocks = {}
    for pool, prefix in (("prefill", "prefill_"), ("decode", "")):
        block = getattr(base.parallel, pool).model_dump(exclude={"prefill", "decode"})
        block.update({k: params[prefix + k] for k in PARALLEL_KEYS}, layers_per_stage=None)
        if base.model.moe is None:
            block.update(ep=1, etp=None)
        blocks[pool] = block
    parallel = ParallelSpec.model_validate(blocks)
    spec = base.workload.requests.model_copy(update={k: params[k] for k in REQUEST_KEYS})
    workload = base.workload.model_copy(update={"requests": spec})
    p, d = blocks["prefill"], blocks["decode"]
    name = (
        f"{base.name}-{params['split']}-p{p['tp']}x{p['pp']}ep{p['ep']}"
        f"-d{d['tp']}x{d['pp']}ep{d['ep']}-{params['index']}"
    )
    return base.model_copy(update={"parallel": parallel, "workload": workload, "name": name})


def serving_candidate_plan(base: Plan, params: dict[str, Any]) -> Plan:
    """The plan of one candidate (``base`` as returned by ``cluster_plan``)."""
    if base.parallel.disaggregated:
        return _disaggregated_plan(base, params)
    changes: dict[str, Any] = {k: params[k] for k in PARALLEL_KEYS if params[k] is not None}
    changes["layers_per_stage"] = None
    if base.model.moe is None:
        changes.pop("ep", None)
    plan = with_parallel(base, **changes)
    spec = plan.workload.requests.model_copy(update={k: params[k] for k in REQUEST_KEYS})
    workload = plan.workload.model_copy(update={"requests": spec})
    name = f"{base.name}-tp{params['tp']}pp{params['pp']}dp{params['dp']}ep{params['ep']}"
    return plan.model_copy(update={"workload": workload, "name": f"{name}-{params['index']}"})


def evaluate_serving_candidate(task: dict[str, Any]) -> dict[str, Any]:
    """One candidate (``task``: ``plan`` as a dict, ``objective``, ``attain``): its capacity
    or goodput and the verdict at that rate, as result-row fields."""
    try:
        plan = Plan.model_validate(task["plan"])
        if task["objective"] == "capacity":
            return _capacity_row(plan, task["attain"])
        return _goodput_row(plan)
    except (NoSlo, ValueError) as exc:
        return {"status": "unsupported", "reason": str(exc)[:300]}
    except Exception as exc:  # noqa: BLE001 - one bad candidate must not end the search
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300]}


def _verdict_fields(plan: Plan) -> dict[str, Any]:
    verdict = evaluate(plan)
    if verdict.run is None:
        return {"status": "unsupported", "reason": verdict.note[:300]}
    m = verdict.metrics
    errors = sorted({f.node for f in verdict.findings if f.severity == "error"})
    return {
        "status": "simulated",
        "reason": None,
        "goodput_req_per_s": m.get("goodput_req_per_s"),
        "goodput_req_per_s_per_gpu": m.get("goodput_req_per_s_per_gpu"),
        "goodput_pct": m.get("goodput_pct"),
        "ttft_ms_p99": m.get("ttft_ms_p99"),
        "tpot_ms_p99": m.get("tpot_ms_p99"),
        "feasible": not errors,
        "errors": ",".join(errors) or None,
        "exit_code": verdict.exit_code,
    }


def _capacity_row(plan: Plan, attain: float) -> dict[str, Any]:
    cap = find_capacity(plan, attain)
    rate = cap.capacity_req_per_s
    row: dict[str, Any] = {"probes": len(cap.probes), "limiting_slo": cap.limiting_slo}
    if rate is None:
        return {**row, "status": "simulated", "reason": "the SLOs fail at every rate probed",
                "feasible": False, "capacity_req_per_s": None}  # fmt: skip
    spec = plan.workload.requests.model_copy(update={"rate_per_s": rate})
    at = plan.model_copy(update={"workload": plan.workload.model_copy(update={"requests": spec})})
    row.update(_verdict_fields(at))
    row["capacity_req_per_s"] = rate
    row["capacity_req_per_s_per_gpu"] = rate / plan.parallel.world_size
    return row


def _goodput_row(plan: Plan) -> dict[str, Any]:
    row = _verdict_fields(plan)
    if row.get("goodput_req_per_s") is None and row["status"] == "simulated":
        raise NoSlo("targets: the plan sets no per-request SLO, so it has no goodput")
    return row


@dataclass
class ServingSearchResult:
    """Every candidate's row (enumeration order), ranked, with the Pareto front."""

    base: Plan
    objective: str
    attain: float
    rows: list[dict[str, Any]]
    wall_s: float = 0.0
    workers: int = 1
    counts: dict[str, int] = field(default_factory=dict)
    resumed: int = 0  # candidates taken from the table of an earlier search (resume)
    table: str | None = None  # the Parquet table written (``out``)

    @property
    def metric(self) -> str:
        """The row field ranked on."""
        return (
            "capacity_req_per_s_per_gpu"
            if self.objective == "capacity"
            else "goodput_req_per_s_per_gpu"
        )

    def ranked(self) -> list[dict[str, Any]]:
        """Feasible candidates, best first."""
        return sorted((r for r in self.rows if r.get("rank") is not None), key=lambda r: r["rank"])

    def best(self) -> dict[str, Any] | None:
        """The best feasible candidate, or None."""
        ranked = self.ranked()
        return ranked[0] if ranked else None

    def pareto(self) -> list[dict[str, Any]]:
        """The Pareto front (capacity or goodput per GPU vs TTFT p99 and TPOT p99)."""
        return sorted((r for r in self.rows if r.get("pareto")), key=lambda r: r["rank"])

    def plan_for(self, row: dict[str, Any]) -> Plan:
        """The plan of a result row (at the base plan's request rate)."""
        return serving_candidate_plan(self.base, row)

    def to_dict(self, top: int = 10) -> dict[str, Any]:
        """JSON-ready: summary, ranking, Pareto front, the best deployment's blocks."""
        best = self.best()
        best_plan = self.plan_for(best) if best else None
        return {
            "base": self.base.name,
            "gpus": self.base.hardware.num_gpus,
            "objective": self.objective,
            "attain": self.attain,
            "summary": {
                "candidates": len(self.rows),
                **self.counts,
                "resumed": self.resumed,
                "wall_s": self.wall_s,
                "workers": self.workers,
            },  # fmt: skip
            "ranking": [_public(r) for r in self.ranked()[:top]],
            "pareto": [_public(r) for r in self.pareto()],
            "best_parallel": _parallel_block(best_plan) if best else None,
            "best_requests": {k: best[k] for k in REQUEST_KEYS} if best else None,
        }


def _parallel_block(plan: Plan) -> dict[str, Any]:
    """A plan's searched ``parallel`` degrees, as in a plan file (both pools when
    disaggregated)."""
    par = plan.parallel
    if par.disaggregated:
        return {
            pool: {k: getattr(getattr(par, pool), k) for k in PARALLEL_KEYS}
            for pool in ("prefill", "decode")
        }
    return {k: getattr(par, k) for k in PARALLEL_KEYS}


def _public(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("rank", "index", *PARAM_KEYS, *RESULT_KEYS, "pareto")
    return {k: row.get(k) for k in keys}


def _rank(rows: list[dict[str, Any]], metric: str) -> None:
    feasible = [r for r in rows if r.get("feasible") and r.get(metric) is not None]
    feasible.sort(key=lambda r: (-r[metric], r["tp"] * r["pp"], r["index"]))
    for i, row in enumerate(feasible, 1):
        row["rank"] = i
    for row in feasible:
        row["pareto"] = not any(_dominates(o, row, metric) for o in feasible if o is not row)


def _dominates(a: dict[str, Any], b: dict[str, Any], metric: str) -> bool:
    keys = [(metric, 1)] + [(k, -1) for k in ("ttft_ms_p99", "tpot_ms_p99")]
    if any(a.get(k) is None or b.get(k) is None for k, _ in keys):
        return False
    better_or_equal = all(s * a[k] >= s * b[k] for k, s in keys)
    return better_or_equal and any(s * a[k] > s * b[k] for k, s in keys)


def serving_search(
    base: Plan,
    gpus: int | None = None,
    objective: str = "capacity",
    *,
    attain: float = 0.99,
    space: ServingSpace | None = None,
    workers: int | None = None,
    limit: int | None = None,
    seed: int | None = None,
    backend: str = "local",
    progress: Callable[[int, int], None] | None = None,
    out: Path | str | None = None,
    resume: bool = False,
    inputs=(),
    flush_s: float = 2.0,
) -> ServingSearchResult:
    """Search the deployments of serving plan ``base`` on ``gpus`` GPUs (module docstring).

    With ``out``, every candidate's row goes to that Parquet table (:func:`write_serving_table`),
    rewritten atomically as results arrive (at most every ``flush_s`` seconds, and at the end,
    also when interrupted). ``limit`` bounds the candidates simulated by this call (the rest
    stay ``pending``); ``resume=True`` takes the finished candidates of an existing ``out``
    (matched by ``candidate_id``, a hash of the knobs) instead of simulating them again, as the
    training search does: the table ends up the same as one uninterrupted search's. The table
    must have been written for the same base plan (cluster, seed), objective and ``attain``.
    Raises :class:`SearchError` for a bad objective, a plan without per-request SLOs or a
    table of another search (``spec.outputs.OutputError`` for an unusable ``out``)."""
    if objective not in OBJECTIVES:
        raise SearchError(
            f"objective {objective!r}: a serving search ranks by {' or '.join(OBJECTIVES)}"
        )
    if base.workload.mode != "inference":
        raise SearchError("serving search needs workload.mode: inference")
    from clustersim.explore.capacity import slo_limits

    if not slo_limits(base):
        raise SearchError(
            "targets: the plan sets no per-request SLO (targets.ttft_ms_p99_max, "
            "tpot_ms_p99_max, ...): there is no capacity or goodput to search for"
        )
    started = time.perf_counter()
    gpus = gpus or base.hardware.num_gpus
    space = space or ServingSpace(gpus=gpus)
    if space.gpus != gpus:
        space = ServingSpace(**{**space.__dict__, "gpus": gpus})
    base = cluster_plan(base, gpus, seed)
    workers = workers or default_workers()
    path = None
    if out is not None:
        from clustersim.spec.outputs import check_output

        path = check_output(out, inputs)
    meta = {
        "clustersim_serving_search": TABLE_VERSION,
        "base_fingerprint": base_fingerprint(base),
        "objective": objective,
        "attain": repr(float(attain)),
    }
    rows = []
    for params in enumerate_serving(base, space):
        plan = serving_candidate_plan(base, params)
        report = audit(plan)
        row = {**params, "candidate_id": serving_candidate_id(params), "rank": None,
               "pareto": False, "feasible": False}  # fmt: skip
        errors = [f for f in report.findings if f.severity == "error"]
        if errors:
            row["status"] = "invalid"
            row["reason"] = "; ".join(f"{f.node}: {f.message}" for f in errors)[:300]
        else:
            row["status"] = "pending"
        rows.append(row)
    resumed = 0
    if resume and path is not None and path.exists():
        resumed = _resume_rows(path, rows, meta)
    todo = [r for r in rows if r["status"] == "pending"]
    if limit is not None:
        todo = todo[: max(0, limit)]
    tasks = [
        (
            str(r["index"]),
            {
                "plan": serving_candidate_plan(base, r).model_dump(mode="json"),
                "objective": objective,
                "attain": attain,
            },
        )
        for r in todo
    ]
    by_index = {str(r["index"]): r for r in rows}
    result = ServingSearchResult(base, objective, attain, rows, workers=workers)

    def save() -> None:
        if path is not None:
            _rank(rows, result.metric)
            write_serving_table(path, result, inputs, meta)

    save()
    last_flush = time.perf_counter()
    results = run_tasks(tasks, workers, backend, evaluate_serving_candidate)
    try:
        for done, (key, found) in enumerate(results, 1):
            by_index[key].update(found)
            if progress is not None:
                progress(done, len(tasks))
            if time.perf_counter() - last_flush >= flush_s:
                save()
                last_flush = time.perf_counter()
    finally:
        results.close()
        save()
    _rank(rows, result.metric)
    for row in rows:
        result.counts[row["status"]] = result.counts.get(row["status"], 0) + 1
    result.resumed = resumed
    result.table = None if path is None else str(path)
    result.wall_s = time.perf_counter() - started
    return result


def serving_candidate_id(params: dict[str, Any]) -> str:
    """A stable id of a candidate's knobs (independent of enumeration order and base plan)."""
    text = json.dumps({k: params.get(k) for k in PARAM_KEYS}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _resume_rows(path: Path, rows: list[dict[str, Any]], meta: dict[str, str]) -> int:
    """Copy the finished candidates of the table at ``path`` into ``rows`` (still pending
    there); returns how many. :class:`SearchError` for a table of another search."""
    old_rows, old_meta = read_serving_table(path)
    for key, what in (
        ("base_fingerprint", "base plan, cluster or seed"),
        ("objective", "objective"),
        ("attain", "--attain"),
    ):
        if old_meta.get(key) != meta[key]:
            raise SearchError(
                f"{path} was written for another {what}; drop --resume to start over, or use "
                "another --output"
            )
    by_id = {r["candidate_id"]: r for r in rows}
    resumed = 0
    for old in old_rows:
        row = by_id.get(old["candidate_id"])
        if row is not None and row["status"] == "pending" and old["status"] in DONE:
            row.update({k: old.get(k) for k in SIM_FIELDS})
            resumed += 1
    return resumed


def read_serving_table(path: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Rows and metadata of a serving search table."""
    table = read_parquet(path)
    meta = table_metadata(path, table)
    missing = [c for c in TABLE_KEYS if c not in table.column_names]
    if meta.get("clustersim_serving_search") != TABLE_VERSION or missing:
        raise SearchError(
            f"{path}: not a serving search table of this version; drop --resume to start "
            "over, or use another --output"
        )
    return table.to_pylist(), meta


def _table_schema():
    import pyarrow as pa

    strings = {"candidate_id", "status", "reason", "split", "limiting_slo", "errors"}
    bools = {"chunked_prefill", "feasible", "pareto"}
    floats = {k for k in RESULT_KEYS if k not in ("limiting_slo", "probes")}

    def typ(key: str):
        if key in strings:
            return pa.string()
        if key in bools:
            return pa.bool_()
        return pa.float64() if key in floats else pa.int64()

    return pa.schema([(k, typ(k)) for k in TABLE_KEYS])


def write_serving_table(path, result: ServingSearchResult, inputs=(), meta=None) -> None:
    """Every candidate's row (``candidate_id``, knobs, status, capacity or goodput,
    latencies, rank; pending ones too) as a Parquet table with ``meta`` as its metadata,
    written atomically (:func:`clustersim.explore.search.write_rows`)."""
    write_rows(path, result.rows, _table_schema(), meta or {}, inputs)

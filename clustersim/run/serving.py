"""Simulate a serving plan: audit, build the requests, run the serving engine, compute the
metrics (:mod:`clustersim.metrics.serving`), judge the targets and claims.

:func:`simulate_serving` is the serving half of :func:`clustersim.run.evaluate.evaluate`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clustersim.audit.checks import AuditReport, audit
from clustersim.audit.findings import Finding
from clustersim.audit.judge import SERVING_FIX, judge, report_dict, still_unchecked
from clustersim.costs.serving import step_costs
from clustersim.engine.serving.disagg import POOLS, DisaggregatedSim
from clustersim.engine.serving.kv_usage import collect_kv_usage, record_kv_usage
from clustersim.engine.serving.moe_table import MoEStepTable
from clustersim.engine.serving.requests import Requests, make_requests
from clustersim.engine.serving.sim import (
    LatencyLimits,
    ServingResult,
    ServingSim,
    check_serving_supported,
)
from clustersim.engine.serving.step_timer import StepTimer
from clustersim.layout import Layout
from clustersim.metrics.serving import breakdown, request_columns, serving_metrics
from clustersim.spec.schema import Plan


@dataclass
class ServingReport:
    """An audited and simulated serving plan."""

    audit: AuditReport
    metrics: dict[str, Any]
    breakdown: dict[str, float]
    result: ServingResult
    findings: list[Finding] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    events: int = 0
    wall_s: float = 0.0
    routing_s: float = 0.0
    trace: dict[str, Any] | None = None  # {"path", "rows", "bytes"} when a trace was written

    @property
    def has_errors(self) -> bool:
        """Whether the plan fails a constraint, a claim or a target."""
        return any(f.severity == "error" for f in self.findings)

    def requests(self) -> dict[str, np.ndarray]:
        """Every request's lifecycle as columns (ms; NaN where it never happened)."""
        return request_columns(self.result)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the output contract, plus the serving deployment."""
        out = report_dict(self)
        res = self.result
        out["serving"] = {
            "replicas": res.num_replicas,
            "engines": res.engines,
            "kv_cache_blocks_per_replica": res.kv.num_blocks,
            "kv_block_size": res.kv.block_size,
            "kv_cache_tokens_per_replica": res.kv.tokens,
            "kv_cache_gib_per_gpu": res.kv.kv_cache_gib,
        }
        if res.pools:  # disaggregated: the figures above are the decode pool's
            out["serving"]["pools"] = {
                p.role: {
                    "gpus": p.gpus,
                    "replicas": p.replicas,
                    "first_replica": p.first_replica,
                    "engines": [res.engines[i] for i in p.engines],
                    "kv_cache_blocks_per_replica": p.kv.num_blocks,
                    "kv_cache_tokens_per_replica": p.kv.tokens,
                    "kv_cache_gib_per_gpu": p.kv.kv_cache_gib,
                }
                for p in res.pools
            }
        out["simulation"] = {
            "events": self.events,
            "wall_s": self.wall_s,
            "routing_s": self.routing_s,
            "steps": sum(s.steps for s in res.engine_stats),
            "trace": self.trace,
        }
        return out


def moe_tables(plan: Plan) -> MoEStepTable | dict[str, MoEStepTable | None] | None:
    """The MoE step tables of a deployment (none for a dense model; one per pool when
    disaggregated), which runs of it at several request rates may share
    (``simulate_serving(table=...)``)."""
    if plan.model.moe is None:
        return None
    if plan.parallel.disaggregated:
        return {name: MoEStepTable(plan.pool(name), Layout(plan.pool(name))) for name in POOLS}
    return MoEStepTable(plan, Layout(plan))


def step_timer(plan: Plan, table: MoEStepTable | None) -> StepTimer | None:
    """The step timer of a colocated deployment with MoE step table ``table``
    (:func:`moe_tables`), which runs of it at several request rates may share with the
    step constants it memoises (``simulate_serving(timer=...)``); None when disaggregated."""
    if plan.parallel.disaggregated:
        return None
    return StepTimer(plan, step_costs(plan, Layout(plan)), table)


def simulate_serving(
    plan: Plan,
    progress: Callable[[float], None] | None = None,
    trace: Path | None = None,
    *,
    requests: Requests | None = None,
    table: MoEStepTable | dict[str, MoEStepTable | None] | None = None,
    limits: LatencyLimits | None = None,
    compiled_engine: bool | None = None,
    timer: StepTimer | None = None,
) -> ServingReport:
    """Audit and simulate serving ``plan``'s request stream.

    With ``trace``, also write every request's lifecycle, the per-engine and per-replica
    accumulators and the plan to that Arrow file, atomically (``docs/trace-format.md``,
    :mod:`clustersim.analyze.serving`). ``requests`` replaces the plan's request stream
    (``clustersim replay`` of a serving trace). ``table`` and ``limits``: see
    :class:`~clustersim.engine.serving.sim.ServingSim` (``limits`` may raise
    :class:`~clustersim.engine.serving.sim.Overloaded`). ``compiled_engine``: see
    ``ServingSim.compiled_engine`` (colocated deployments; None lets the engine decide).
    ``timer``: a step timer of the deployment to reuse (:func:`step_timer`; colocated).

    Raises :class:`EngineError` when the plan cannot be simulated (not an inference plan,
    context parallelism, an expert layout that does not fold, no memory left for the KV
    cache), ValueError for an unreadable request trace and OSError when the trace cannot be
    written.
    """
    report = audit(plan)
    if requests is None:
        requests = make_requests(plan)
    started = time.perf_counter()
    if plan.parallel.disaggregated:  # each pool checks itself (engine/serving/disagg.py)
        tables = table if isinstance(table, dict) else None
        sim: ServingSim = DisaggregatedSim(plan, requests, progress, tables=tables, limits=limits)
    else:
        check_serving_supported(plan, report.layout)
        sim = ServingSim(plan, requests, progress, table=table, limits=limits, timer=timer)
        sim.compiled_engine = compiled_engine
    record_kv_usage(sim)
    result = sim.run()
    result.kv_usage = collect_kv_usage(sim)
    wall_s = time.perf_counter() - started
    metrics = serving_metrics(plan, result)
    findings = list(report.findings) + judge(plan, metrics, SERVING_FIX)
    unchecked = [u for u in report.unchecked if still_unchecked(u, metrics)]
    trace_info = None
    if trace is not None:  # imported here: pyarrow is not needed (nor loaded) without a trace
        from clustersim.run.record import write_serving_trace

        trace_info = write_serving_trace(Path(trace), plan, result)
    return ServingReport(
        report,
        metrics,
        breakdown(plan, result),
        result,
        findings,
        unchecked,
        result.events,
        wall_s,
        result.routing_s,
        trace_info,
    )

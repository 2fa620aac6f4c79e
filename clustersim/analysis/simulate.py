"""Run a plan through the engine and judge the result: metrics, targets, simulated claims.

This is the library entry point behind ``clustersim run`` (and the simulated part of
``clustersim check``): audit, sample the workload, simulate, compute metrics, compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clustersim.analysis.audit import AuditReport, audit
from clustersim.analysis.findings import Finding
from clustersim.analysis.metrics import expert_load_by_layer, time_breakdown, training_metrics
from clustersim.analysis.suggest import folding_fix
from clustersim.engine.moe import EvenSplit, RoutingSource, SampledRouting
from clustersim.engine.recorder import Recorder
from clustersim.engine.training import EngineError, TrainingSim, check_supported
from clustersim.engine.workload import microbatch_lengths
from clustersim.layout import Layout
from clustersim.spec.schema import Plan

# Simulated claims: relative tolerance for times and rates, absolute points for percentages.
CLAIM_TOLERANCE_REL = 0.10
CLAIM_TOLERANCE_PCT_POINTS = 5.0
# target field -> (metric, "max" or "min")
TARGETS = {
    "latency_ms_max": ("latency_ms", "max"),
    "ttft_ms_max": ("ttft_ms_p50", "max"),
    "tpot_ms_max": ("tpot_ms_p50", "max"),
    "throughput_tokens_per_ms_min": ("throughput_tokens_per_ms", "min"),
    "comm_overhead_pct_max": ("comm_overhead_pct", "max"),
    "load_balance_pct_min": ("load_balance_pct", "min"),
    "gpu_utilization_pct_min": ("gpu_utilization_pct", "min"),
}
CLAIMS = {
    "latency_ms": "latency_ms",
    "ttft_ms": "ttft_ms_p50",
    "tpot_ms": "tpot_ms_p50",
    "throughput_tokens_per_ms": "throughput_tokens_per_ms",
    "comm_overhead_pct": "comm_overhead_pct",
    "load_balance_pct": "load_balance_pct",
    "gpu_utilization_pct": "gpu_utilization_pct",
}


@dataclass
class RunReport:
    """An audited and simulated plan."""

    audit: AuditReport
    metrics: dict[str, Any]
    breakdown: dict[str, float]
    findings: list[Finding] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    events: int = 0
    wall_s: float = 0.0
    routing_s: float = 0.0
    expert_load: list[dict[str, float]] = field(default_factory=list)
    recorder: Recorder | None = None
    trace: dict[str, Any] | None = None  # {"path", "rows", "bytes"} when a trace was written

    @property
    def has_errors(self) -> bool:
        """Whether the plan fails a constraint, a claim or a target."""
        return any(f.severity == "error" for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the output contract."""
        out = self.audit.to_dict()
        out["metrics"] = self.metrics
        out["findings"] = [f.to_dict() for f in self.findings]
        out["unchecked"] = self.unchecked
        out["breakdown_ms"] = self.breakdown
        out["expert_load_by_layer"] = self.expert_load
        out["simulation"] = {"events": self.events, "wall_s": self.wall_s,
                             "routing_s": self.routing_s, "trace": self.trace}  # fmt: skip
        return out


def routing_for(plan: Plan) -> tuple[RoutingSource | None, bool]:
    """The routing source for a plan and whether it is deterministic (replica-symmetric)."""
    moe = plan.model.moe
    if moe is None:
        return None, True
    if moe.routing == "even":
        return EvenSplit(moe, plan.parallel.ep), True
    return SampledRouting(moe, plan.parallel.ep, plan.seed, _ep_ranks_per_node(plan)), False


def _ep_ranks_per_node(plan: Plan) -> int | None:
    """EP ranks of one group per node when groups are node-contiguous blocks (for node-limited
    routing), else None."""
    group = Layout(plan).groups("ep")[0]
    gpn = plan.hardware.gpus_per_node
    first_node = [r for r in group if r // gpn == group[0] // gpn]
    per_node = len(first_node)
    contiguous = all(group.index(r) // per_node == r // gpn - group[0] // gpn for r in group)
    return per_node if contiguous and len(group) % per_node == 0 else None


def simulate(
    plan: Plan, progress: Callable[[float], None] | None = None, trace: Path | None = None
) -> RunReport:
    """Audit and simulate one training iteration of ``plan``; with ``trace``, also write every
    event, the workload and the routing to that Arrow file (``clustersim.trace``).

    Raises :class:`EngineError` when the plan cannot be simulated (the audit says why).
    """
    report = audit(plan)
    if plan.workload.mode != "training":
        raise EngineError("only training plans are simulated so far (workload.mode: training)")
    check_supported(plan, report.layout)
    rng = np.random.default_rng([plan.seed, 1])
    seq_lens = microbatch_lengths(plan, rng)
    routing, deterministic = routing_for(plan)
    symmetric = deterministic and plan.workload.seq_len.dist == "fixed"
    return simulate_workload(plan, report, seq_lens, routing, symmetric, progress, trace)


def simulate_workload(
    plan: Plan,
    report: AuditReport,
    seq_lens: list[list[np.ndarray]],
    routing: RoutingSource | None,
    symmetric: bool,
    progress: Callable[[float], None] | None = None,
    trace: Path | None = None,
) -> RunReport:
    """Simulate a given workload (sampled by :func:`simulate`, or read back from a trace by
    ``analysis.replay``) and judge the result."""
    rec = Recorder(plan.parallel.world_size)
    started = time.perf_counter()
    trace_info = None
    if trace is None:
        result = TrainingSim(plan, rec, seq_lens, routing, symmetric, progress).run()
    else:  # imported here: pyarrow is not needed (nor loaded) without a trace
        from clustersim.analysis.tracing import simulate_traced

        result, trace_info = simulate_traced(plan, rec, seq_lens, routing, symmetric, progress,
                                             Path(trace))  # fmt: skip
    wall_s = time.perf_counter() - started
    metrics = training_metrics(plan, rec, result)
    findings = list(report.findings) + judge(plan, metrics)
    unchecked = [u for u in report.unchecked if _still_unchecked(u, metrics)]
    routing_s = getattr(routing, "elapsed_s", 0.0)
    return RunReport(report, metrics, time_breakdown(rec, result), findings, unchecked,
                     result.events, wall_s, routing_s, expert_load_by_layer(result),
                     rec, trace_info)  # fmt: skip


def judge(plan: Plan, metrics: dict[str, Any]) -> list[Finding]:
    """Findings for the targets and simulated claims that the metrics decide."""
    out = []
    for target, (metric, sense) in TARGETS.items():
        limit, value = getattr(plan.targets, target), metrics.get(metric)
        if limit is None or value is None:
            continue
        if (value > limit) if sense == "max" else (value < limit):
            word = "above the maximum" if sense == "max" else "below the minimum"
            out.append(Finding(f"targets.{target}", "error",
                               f"simulated {metric} is {value:.4g}, {word} of {limit:g}",
                               "change the plan (parallel degrees, micro-batches, overlap, "
                               "recompute) or relax the target", limit,
                               round(value, 4)))  # fmt: skip
    for claim, metric in CLAIMS.items():
        claimed, value = getattr(plan.claims, claim), metrics.get(metric)
        if claimed is None or value is None:
            continue
        if metric.endswith("_pct"):
            ok = abs(claimed - value) <= CLAIM_TOLERANCE_PCT_POINTS
            tol = f"{CLAIM_TOLERANCE_PCT_POINTS:g} points"
        else:
            ok = abs(claimed - value) <= CLAIM_TOLERANCE_REL * abs(value)
            tol = f"{100 * CLAIM_TOLERANCE_REL:g}%"
        if not ok:
            out.append(Finding(f"claims.{claim}", "error",
                               f"simulated {metric} is {value:.4g}, not {claimed:g} (more than "
                               f"{tol} apart)", f"set claims.{claim}: {value:.4g}", claimed,
                               round(value, 4)))  # fmt: skip
    return out


def _still_unchecked(item: str, metrics: dict[str, Any]) -> bool:
    section, name = item.split(".", 1)
    metric = TARGETS[name][0] if section == "targets" else CLAIMS[name]
    return metrics.get(metric) is None


def check_plan(
    plan: Plan, simulate_claims: bool = True, progress: Callable[[float], None] | None = None
) -> AuditReport:
    """The audit, plus the simulated claims and targets when the plan has some and the engine
    can run it (``clustersim check``)."""
    report = audit(plan)
    if not simulate_claims or not report.unchecked:
        return report
    target, note = plan, ""
    repaired = folding_fix(plan)
    if not report.layout.expert_folding_ok and repaired is not None:
        target, note = repaired, "simulated with parallel.etp: 1"
    try:
        run = simulate(target, progress)
    except EngineError as exc:
        report.simulation_note = f"not simulated: {exc}"
        return report
    judged = [f for f in run.findings if f.node.startswith(("claims.", "targets."))]
    static_nodes = {(f.node, f.message) for f in report.findings}
    report.findings += [f for f in judged if (f.node, f.message) not in static_nodes]
    report.unchecked, report.metrics, report.simulation_note = run.unchecked, run.metrics, note
    return report

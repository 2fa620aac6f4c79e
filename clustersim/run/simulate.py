"""Run a plan through the engine and judge the result: metrics, targets, simulated claims.

The training half of :func:`clustersim.run.evaluate.evaluate` (the one path behind every
verb): audit, sample the workload, simulate, compute metrics, judge.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clustersim.audit.checks import AuditReport, audit
from clustersim.audit.findings import Finding
from clustersim.audit.judge import TRAINING_FIX, judge, report_dict, still_unchecked
from clustersim.engine.errors import EngineError
from clustersim.engine.network import Network
from clustersim.engine.recorder import Recorder, Tally
from clustersim.engine.training.moe import (
    EvenSplit,
    RememberedRouting,
    RoutingSource,
    SampledRouting,
)
from clustersim.engine.training.sim import TrainingSim, check_supported
from clustersim.engine.training.workload import microbatch_lengths
from clustersim.layout import Layout
from clustersim.metrics.training import expert_load_by_layer, time_breakdown, training_metrics
from clustersim.spec.schema import Plan


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
        out = report_dict(self)
        out["expert_load_by_layer"] = self.expert_load
        out["simulation"] = {
            "events": self.events,
            "wall_s": self.wall_s,
            "routing_s": self.routing_s,
            "trace": self.trace,
        }
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
    topology = plan.hardware.topology
    if topology is not None and topology.kind != "non_blocking":
        # uplinks carry every replica's traffic: all replicas go on the links
        symmetric = False
    return simulate_workload(plan, report, seq_lens, routing, symmetric, progress, trace)


def network_delays(
    plan: Plan,
    seq_lens: list[list[np.ndarray]],
    routing: RoutingSource | None,
    symmetric: bool,
    progress: Callable[[float], None] | None = None,
) -> tuple[Network | None, TrainingSim | None]:
    """With ``hardware.topology``: a first pass of the iteration that records every
    collective as a flow, solved on the shared links; the returned network holds each
    collective's delay for the pass that counts (``engine.network``), and the first pass's
    engine its tables for that pass (``TrainingSim(reuse=...)``). (None, None) without one."""
    if plan.hardware.topology is None:
        return None, None
    net = Network(plan.hardware, plan.parallel.world_size)
    scratch = Tally(plan.parallel.world_size)  # its rows are never read
    half = (lambda f: progress(f / 2)) if progress else None
    sim = TrainingSim(plan, scratch, seq_lens, routing, symmetric, half, net)
    first = sim.run()
    net.solve(len(first.lanes), first.iteration_time_ms)
    return net, sim


def contention_metrics(net: Network | None) -> dict[str, Any]:
    """``comm_contention_ms`` (lane mean, summed over the iteration's collectives) and its
    split by collective kind; zero without a topology."""
    if net is None or net.report is None:
        return {"comm_contention_ms": 0.0}
    report = net.report
    return {
        "comm_contention_ms": report.contention_ms,
        "comm_contention_by_kind_ms": dict(report.by_kind_ms),
    }


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
    started = time.perf_counter()
    trace_info = None
    if plan.hardware.topology is not None and routing is not None:
        routing = RememberedRouting(routing)  # both passes route the same workload: once
    net, first = network_delays(plan, seq_lens, routing, symmetric, progress)
    if trace is None:
        rec = Recorder(plan.parallel.world_size)
        sim = TrainingSim(plan, rec, seq_lens, routing, symmetric, progress, net, reuse=first)
        result = sim.run()
    else:  # imported here: pyarrow is not needed (nor loaded) without a trace
        from clustersim.run.record import simulate_traced

        result, rec, trace_info = simulate_traced(
            plan, seq_lens, routing, symmetric, progress, Path(trace), net, reuse=first
        )
    wall_s = time.perf_counter() - started
    metrics = training_metrics(plan, rec, result)
    metrics.update(contention_metrics(net))
    findings = list(report.findings) + judge(plan, metrics, TRAINING_FIX)
    unchecked = [u for u in report.unchecked if still_unchecked(u, metrics)]
    routing_s = getattr(routing, "elapsed_s", 0.0)
    return RunReport(
        report,
        metrics,
        time_breakdown(rec, result),
        findings,
        unchecked,
        result.events,
        wall_s,
        routing_s,
        expert_load_by_layer(result),
        rec,
        trace_info,
    )

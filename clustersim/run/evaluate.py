"""One verdict for a plan: the single evaluation path behind check, run, compare, search, replay.

:func:`evaluate` audits the plan and, unless ``static``, simulates it (training or serving).
A plan whose expert layout does not fold (EP x ETP) only because of ETP is simulated with the
nearest valid folding (``parallel.etp: 1``): the folding error stays a finding, and the
folding is listed among the :class:`Verdict`'s assumptions. Targets and simulated claims are
judged by :func:`clustersim.audit.judge.judge` on the plan as written; claims that neither
the audit nor the simulation decides are listed in ``unchecked``. Every verdict lists the
assumptions it used that the plan did not state (arrival process and rate, request count,
lengths, routing skew, ETP folding, the calibration data set).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from clustersim.audit.checks import METRIC_KEYS, AuditReport, audit
from clustersim.audit.findings import Finding
from clustersim.audit.fixes import divisors, folding_fix, with_parallel
from clustersim.audit.judge import (
    SERVING_FIX,
    TRAINING_FIX,
    judge,
    still_unchecked,
    target_table,
)
from clustersim.engine.errors import EngineError
from clustersim.layout import Layout
from clustersim.run.serving import simulate_serving
from clustersim.run.simulate import simulate
from clustersim.spec.schema import Plan

FOLDING_NOTE = "simulated with parallel.etp: 1"


@dataclass(frozen=True)
class Assumption:
    """A value the verdict used that the plan did not state: where, what, and why it matters."""

    field: str
    value: Any
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"field": self.field, "value": self.value, "note": self.note}

    def text(self) -> str:
        """One line for a table or a document."""
        note = f" ({self.note})" if self.note else ""
        return f"{self.field}: {_show(self.value)}{note}"


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items() if v is not None)
    return str(value)


@dataclass
class Verdict:
    """The one result of evaluating a plan.

    ``report`` is the audit as shown (its findings, undecided items, metrics and notes are the
    verdict's; its layout is the one the metrics came from), ``run`` the simulation report
    (training ``RunReport`` or ``ServingReport``; None when static or not simulable).
    """

    plan: Plan
    report: AuditReport
    run: Any = None
    simulated_plan: Plan | None = None

    @property
    def assumptions(self) -> list[Assumption]:
        """What the verdict used that the plan did not state."""
        return self.report.assumptions

    @property
    def findings(self) -> list[Finding]:
        """Constraints, claims and targets, static and simulated."""
        return self.report.findings

    @property
    def unchecked(self) -> list[str]:
        """Claims and targets nothing decided."""
        return self.report.unchecked

    @property
    def metrics(self) -> dict[str, Any] | None:
        """Simulated metrics (None when not simulated)."""
        return self.report.metrics

    @property
    def layout(self) -> Layout:
        """The layout the memory and metrics came from."""
        return self.report.layout

    @property
    def note(self) -> str:
        """How the plan was (or was not) simulated."""
        return self.report.simulation_note

    @property
    def errors(self) -> int:
        """Error findings."""
        return sum(f.severity == "error" for f in self.findings)

    @property
    def has_errors(self) -> bool:
        """Whether the plan needs modification."""
        return self.errors > 0

    @property
    def exit_code(self) -> int:
        """0: no errors; 1: the plan needs modification."""
        return 1 if self.has_errors else 0

    def targets(self) -> dict[str, dict[str, Any]]:
        """Every target the plan sets: limit, value, passed (None = undecided)."""
        return target_table(self.plan, self.metrics, self.report.memory)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the output contract (the same for every verb)."""
        out = self.report.to_dict()
        out["metrics"] = self.metrics or dict.fromkeys(METRIC_KEYS)
        out["targets"] = self.targets()
        out["errors"] = self.errors
        out["exit_code"] = self.exit_code
        if self.run is not None:
            out.update({k: v for k, v in self.run.to_dict().items() if k not in out})
        return out


def evaluate(
    plan: Plan,
    static: bool = False,
    progress: Callable[[float], None] | None = None,
    trace: Path | None = None,
    simulator: Callable[..., Any] | None = None,
) -> Verdict:
    """Audit ``plan`` and, unless ``static``, simulate it; the one verdict every verb prints.

    ``trace`` also writes the simulation's Arrow trace. ``simulator(plan, progress, trace)``
    replaces :func:`simulate_any` (``replay`` simulates a recorded workload). Raises OSError
    when the trace cannot be written; a plan the engine cannot simulate keeps null metrics and
    says why.
    """
    report = audit(plan)
    repair = simulation_repair(plan, report.layout, whole=not static)
    repaired = repair.plan if repair.changes else None
    target = repaired or plan
    shown = replace(report, findings=list(report.findings), unchecked=list(report.unchecked))
    if repair.parallel:  # the layout the metrics come from, on the plan's own cluster
        shown.layout = Layout(plan.model_copy(update={"parallel": target.parallel}))
    shown.assumptions = assumptions_for(plan, static, repaired, repair)
    verdict = Verdict(plan, shown)
    if static:
        shown.simulation_note = "not simulated (--static)"
        return verdict
    try:
        run = (simulator or simulate_any)(target, progress, trace)
    except (EngineError, ValueError) as exc:
        shown.simulation_note = f"not simulated: {exc}"
        return verdict
    static_keys = {(f.node, f.message) for f in shown.findings}
    if repaired is not None:
        nodes = {f.node for f in shown.findings}
        # counts that exist only once the layout folds (EP groups, with EP as written), and
        # memory claims when the plan's own memory could not be computed
        importable = set(FOLDING_CLAIMS) if "ep" not in repair.parallel else set()
        if report.memory is None:
            importable |= MEMORY_CLAIMS
        shown.findings += [
            f for f in run.audit.findings if f.node in importable and f.node not in nodes
        ]
        if shown.memory is None and run.audit.memory is not None:
            shown.memory = run.audit.memory
            shown.memory_note = "computed on the plan simulated: " + repair.text()
        shown.unchecked = [u for u in shown.unchecked if u not in importable]
        shown.simulation_note = repair.note()
    fix = SERVING_FIX if plan.workload.mode == "inference" else TRAINING_FIX
    shown.findings += [
        f for f in judge(plan, run.metrics, fix) if (f.node, f.message) not in static_keys
    ]
    shown.unchecked = [
        u for u in shown.unchecked if u in FOLDING_CLAIMS or still_unchecked(u, run.metrics)
    ]
    shown.metrics = run.metrics
    run.audit, run.findings, run.unchecked = shown, shown.findings, shown.unchecked
    verdict.run, verdict.simulated_plan = run, target
    return verdict


@dataclass
class Repair:
    """How a plan that cannot run as written is simulated: the plan simulated, and what
    changed (``parallel`` fields; ``num_nodes`` when the plan needs more GPUs than it has)."""

    plan: Plan
    parallel: dict[str, tuple[Any, Any]]
    num_nodes: tuple[int, int] | None = None

    @property
    def changes(self) -> bool:
        """Whether anything was changed."""
        return bool(self.parallel) or self.num_nodes is not None

    def text(self) -> str:
        """The changes, as in a plan file."""
        parts = [f"parallel.{k}: {new}" for k, (_old, new) in self.parallel.items()]
        if self.num_nodes is not None:
            hw = self.plan.hardware
            parts.append(f"hardware.num_nodes: {self.num_nodes[1]} ({hw.num_gpus} GPUs)")
        return ", ".join(parts)

    def note(self) -> str:
        """The simulation note: ``simulated with parallel.etp: 1`` and the cluster used."""
        if list(self.parallel) == ["etp"] and self.num_nodes is None:
            return FOLDING_NOTE
        parts = [f"parallel.{k}: {new}" for k, (_old, new) in self.parallel.items()]
        text = "simulated" + (" with " + ", ".join(parts) if parts else "")
        if self.num_nodes is not None:
            hw, old = self.plan.hardware, self.num_nodes[0]
            text += (
                f" on {hw.num_gpus} GPUs ({self.num_nodes[1]} nodes of {hw.gpus_per_node}); "
                f"the cluster has {old * hw.gpus_per_node}"
            )
        return text


def simulation_repair(plan: Plan, layout: Layout, whole: bool = True) -> Repair:
    """The plan the engine simulates when ``plan`` cannot run as written (the findings stay):

    * an expert layout that does not fold (EP x ETP must divide the ranks of a stage) uses
      ``etp: 1`` when that is enough, else the largest EP that divides both the experts and
      the ranks of a stage (with ``etp: 1``);
    * a plan needing more GPUs than its cluster has runs on the cluster it would need: the same
      node type, ``num_nodes`` raised to hold TP x CP x DP x PP GPUs.

    ``whole`` False (a static audit): only the ETP folding, whose memory the audit shows.
    """
    par, hw, moe = plan.parallel, plan.hardware, plan.model.moe
    changes: dict[str, tuple[Any, Any]] = {}
    if moe is not None and not layout.expert_folding_ok and not par.disaggregated:
        fixed = folding_fix(plan)
        if fixed is not None:
            changes["etp"] = (par.expert_tp, 1)
        elif whole:
            ranks = par.tp * par.cp * par.dp
            fits = [d for d in divisors(moe.num_experts) if ranks % d == 0 and d <= par.ep]
            if fits and fits[-1] != par.ep:
                changes["ep"] = (par.ep, fits[-1])
                if par.expert_tp != 1:
                    changes["etp"] = (par.expert_tp, 1)
    target = plan
    if changes:
        target = with_parallel(plan, **{k: new for k, (_old, new) in changes.items()})
    nodes = None
    if whole and par.world_size > hw.num_gpus:
        need = -(-par.world_size // hw.gpus_per_node)
        nodes = (hw.num_nodes, need)
        target = target.model_copy(
            update={"hardware": target.hardware.model_copy(update={"num_nodes": need})}
        )
    return Repair(target, changes, nodes)


# claims the audit can only count on a layout that folds
FOLDING_CLAIMS = ("claims.ep_groups",)
# claims decided by memory, which the audit computes only on a layout that folds
MEMORY_CLAIMS = {
    "claims.memory_per_gpu_gib",
    "claims.params_gib",
    "claims.optimizer_gib",
    "claims.activations_gib",
    "targets.memory_per_gpu_gib_max",
}


def simulate_any(
    plan: Plan, progress: Callable[[float], None] | None = None, trace: Path | None = None
):
    """Simulate a training iteration or, for ``workload.mode: inference``, the request stream.
    Here the training/serving choice is made once."""
    if plan.workload.mode == "inference":
        return simulate_serving(plan, progress, trace)
    return simulate(plan, progress, trace)


def assumptions_for(
    plan: Plan, static: bool, repaired: Plan | None, repair: Repair | None = None
) -> list[Assumption]:
    """The values a verdict uses that the plan does not state."""
    out: list[Assumption] = []
    wl = plan.workload
    par = plan.parallel
    for path, how in plan.derived.items():  # fields the loader derived (spec.load)
        section, name = path.split(".", 1)
        value = getattr(getattr(plan, section), name)
        out.append(Assumption(path, value, f"not given: {how}"))
    if repair is not None and "ep" in repair.parallel:
        ranks = par.tp * par.cp * par.dp
        out.append(
            Assumption(
                "parallel.ep",
                repair.parallel["ep"][1],
                f"EP {par.ep} cannot be formed from the {ranks} ranks of a pipeline stage: "
                "simulated with the largest EP that can, with parallel.etp: 1",
            )
        )
    if repair is not None and repair.num_nodes is not None:
        hw = plan.hardware
        out.append(
            Assumption(
                "hardware.num_nodes",
                repair.num_nodes[1],
                f"simulated on {par.world_size} GPUs; the cluster has {hw.num_gpus}",
            )
        )
    if repaired is not None and (repair is None or list(repair.parallel) == ["etp"]):
        out.append(
            Assumption(
                "parallel.etp",
                1,
                f"EP {plan.parallel.ep} x ETP {plan.parallel.expert_tp} does not fold: memory"
                + ("" if static else ", layout and metrics")
                + " use the nearest valid folding",
            )
        )
    elif par.disaggregated and plan.model.moe is not None:
        for name in ("prefill", "decode"):
            pool = getattr(par, name)
            if "etp" not in pool.model_fields_set:
                out.append(Assumption(f"parallel.{name}.etp", pool.expert_tp, "default: = tp"))
    elif (
        plan.model.moe is not None
        and "etp" not in plan.parallel.model_fields_set
        and (repair is None or "etp" not in repair.parallel)
    ):
        out.append(Assumption("parallel.etp", plan.parallel.expert_tp, "default: = tp"))
    if wl.mode == "inference":
        req = wl.requests
        given = req.model_fields_set if "requests" in wl.model_fields_set else set()
        if req.arrival != "trace":
            if not static:
                for name, note in (
                    ("arrival", "arrival process"),
                    ("rate_per_s", "requests per second"),
                    ("num", "requests simulated"),
                ):
                    if name not in given:
                        value = getattr(req, name)
                        out.append(Assumption(f"workload.requests.{name}", value, note))
            for name in ("prompt_len", "output_len"):
                if name not in given:
                    spec = getattr(req, name).model_dump(exclude_none=True)
                    out.append(Assumption(f"workload.requests.{name}", spec, "default length"))
    elif "seq_len" not in wl.model_fields_set:
        out.append(
            Assumption(
                "workload.seq_len", wl.seq_len.model_dump(exclude_none=True), "default length"
            )
        )
    moe = plan.model.moe
    sampled = moe is not None and moe.routing == "sampled"
    if not static and sampled and "router_skew" not in moe.model_fields_set:
        out.append(Assumption("model.moe.router_skew", moe.router_skew, "routing skew"))
    cal = plan.hardware.calibration
    out.append(
        Assumption(
            "hardware.calibration",
            {"generation": cal.generation, "source": cal.source or None},
            "calibration data set of the cost model",
        )
    )
    return out


__all__ = [
    "Assumption",
    "Repair",
    "Verdict",
    "assumptions_for",
    "evaluate",
    "simulate_any",
    "simulation_repair",
]

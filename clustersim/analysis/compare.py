"""Compare plans side by side: layout, memory, every metric, every target, the differences.

:func:`compare` audits and simulates each plan (a plan whose expert layout folds only with
``etp: 1`` is simulated with that fix, as ``clustersim check`` does; a plan the engine cannot
run keeps null metrics and says why) and returns a :class:`Comparison`, which renders as rows
(for a terminal table), Markdown, or one JSON object.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from clustersim.analysis.audit import METRIC_KEYS, AuditReport, audit
from clustersim.analysis.judge import TARGETS
from clustersim.analysis.render import fmt_value
from clustersim.analysis.suggest import folding_fix
from clustersim.spec.schema import Plan

LAYOUT_KEYS = (
    "world_size",
    "cluster_gpus",
    "tp",
    "pp",
    "dp",
    "ep",
    "etp",
    "edp",
    "layers_per_stage",
    "experts_per_gpu",
    "experts_per_gpu_per_layer",
    "ep_groups",
)
MEMORY_KEYS = (
    "memory_per_gpu_gib",
    "params_gib",
    "grads_gib",
    "optimizer_gib",
    "activations_gib",
    "kv_cache_gib",
    "buffers_gib",
    "fits",
)
# metrics where a larger value is better (the rest: smaller is better, or neutral)
HIGHER_IS_BETTER = {
    "throughput_tokens_per_ms",
    "throughput_tokens_per_s",
    "mfu_pct",
    "gpu_utilization_pct",
    "load_balance_pct",
    "goodput_requests_per_s",
    "slo_attainment_pct",
    "output_tokens_per_ms",
}


@dataclass
class PlanResult:
    """One plan of a comparison: its audit, metrics (None when not simulated) and targets."""

    plan: Plan
    audit: AuditReport
    metrics: dict[str, Any] | None
    note: str = ""
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        """Error findings (constraints, claims and, when simulated, targets)."""
        return sum(f.severity == "error" for f in self.audit.findings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        out = self.audit.to_dict()
        out["metrics"] = self.metrics or dict.fromkeys(METRIC_KEYS)
        out["simulation_note"] = self.note or None
        out["targets"] = self.targets
        out["errors"] = self.errors
        return out


@dataclass
class Comparison:
    """The plans, in the order given, and the fields where they differ."""

    results: list[PlanResult]
    differences: list[dict[str, Any]]

    @property
    def names(self) -> list[str]:
        """Column headers: plan names, made unique."""
        names: list[str] = []
        for r in self.results:
            name = r.plan.name
            while name in names:
                name += "'"
            names.append(name)
        return names

    def metric_keys(self) -> list[str]:
        """Every metric any plan has: the contract's first, then the rest in first-seen order."""
        keys = list(METRIC_KEYS)
        for r in self.results:
            keys += [k for k in (r.metrics or {}) if k not in keys]
        return keys

    def sections(self) -> list[tuple[str, list[list[Any]]]]:
        """(title, rows) per section; a row is [label, value per plan...]."""
        res = self.results
        plan_rows = [[d["field"], *d["values"]] for d in self.differences]
        layout = [[k, *(r.audit.layout_dict().get(k) for r in res)] for k in LAYOUT_KEYS]
        memory = [
            [k, *((r.audit.memory.to_dict().get(k) if r.audit.memory else None) for r in res)]
            for k in MEMORY_KEYS
        ]
        metrics = []
        for k in self.metric_keys():
            values = [(r.metrics or {}).get(k) for r in res]
            if any(v is not None for v in values):
                metrics.append([k, *values])
        targets = []
        names = sorted({t for r in res for t in r.targets})
        for t in names:
            targets.append([t, *(_target_text(r.targets.get(t)) for r in res)])
        verdict = [
            ["errors", *(r.errors for r in res)],
            [
                "simulation",
                *(
                    (r.note or "simulated")
                    if r.metrics is not None
                    else (r.note or "not simulated")
                    for r in res
                ),
            ],
        ]
        return [
            ("plan differences", plan_rows),
            ("layout", layout),
            ("memory (GiB)", memory),
            ("metrics", metrics),
            ("targets", targets),
            ("verdict", verdict),
        ]

    def to_dict(self) -> dict[str, Any]:
        """One JSON object: every plan, and the differences."""
        return {
            "plans": self.names,
            "results": [r.to_dict() for r in self.results],
            "differences": self.differences,
            "metric_differences": self.metric_differences(),
        }

    def metric_differences(self) -> list[dict[str, Any]]:
        """Each metric relative to the first plan (the baseline): value, delta and delta %."""
        out = []
        base = self.results[0].metrics or {}
        for k in self.metric_keys():
            b = base.get(k)
            for name, r in zip(self.names[1:], self.results[1:], strict=True):
                v = (r.metrics or {}).get(k)
                if not isinstance(b, int | float) or not isinstance(v, int | float):
                    continue
                delta = v - b
                out.append(
                    {
                        "metric": k,
                        "plan": name,
                        "baseline": b,
                        "value": v,
                        "delta": delta,
                        "delta_pct": 100 * delta / b if b else None,
                        "better": _better(k, delta),
                    }
                )
        return out

    def markdown(self) -> str:
        """A Markdown document: one table per section."""
        lines = [f"# Comparison: {', '.join(self.names)}", ""]
        header = "| | " + " | ".join(self.names) + " |"
        rule = "|---" * (len(self.names) + 1) + "|"
        for title, rows in self.sections():
            if not rows:
                continue
            lines += [f"## {title}", "", header, rule]
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        return "\n".join(lines)


def _target_text(t: dict[str, Any] | None) -> str:
    if t is None:
        return "-"
    verdict = {True: "pass", False: "FAIL", None: "undecided"}[t["passed"]]
    value = "-" if t["value"] is None else f"{t['value']:.4g}"
    return f"{verdict} ({value} vs {t['sense']} {t['limit']:g})"


def _better(metric: str, delta: float) -> bool | None:
    """Whether a change of ``delta`` in ``metric`` is an improvement (None: no change)."""
    if delta == 0:
        return None
    return (delta > 0) == (metric in HIGHER_IS_BETTER)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return fmt_value(value).replace("|", "\\|")


def judge_targets(
    plan: Plan, audit_report: AuditReport, metrics: dict[str, Any] | None
) -> dict[str, dict[str, Any]]:
    """Every target the plan sets: limit, metric value, and passed (None = undecided)."""
    out: dict[str, dict[str, Any]] = {}
    mapping = dict(TARGETS)
    mapping["memory_per_gpu_gib_max"] = ("memory_per_gpu_gib", "max")
    for name, (metric, sense) in mapping.items():
        limit = getattr(plan.targets, name)
        if limit is None:
            continue
        if metric == "memory_per_gpu_gib":
            mem = audit_report.memory
            value = mem.memory_per_gpu_gib if mem is not None else None
        else:
            value = (metrics or {}).get(metric)
        passed = None if value is None else (value <= limit if sense == "max" else value >= limit)
        out[name] = {
            "metric": metric,
            "sense": sense,
            "limit": limit,
            "value": value,
            "passed": passed,
        }
    return out


def evaluate(
    plan: Plan, simulate: bool = True, progress: Callable[[float], None] | None = None
) -> PlanResult:
    """Audit a plan and, unless ``simulate`` is false, simulate it (with ``etp: 1`` when only
    that makes its expert layout possible)."""
    from clustersim.analysis.simulate import simulate_any
    from clustersim.engine.training import EngineError

    report = audit(plan)
    metrics, note = None, ""
    if simulate:
        target = plan
        if not report.layout.expert_folding_ok and plan.model.moe is not None:
            repaired = folding_fix(plan)
            if repaired is not None:
                target, note = repaired, "simulated with parallel.etp: 1"
        try:
            run = simulate_any(target, progress)
        except (EngineError, ValueError) as exc:
            note = f"not simulated: {exc}"
        else:
            metrics = run.metrics
            static = {(f.node, f.message) for f in report.findings}
            report.findings += [
                f
                for f in run.findings
                if f.node.startswith("targets.") and (f.node, f.message) not in static
            ]
            report.metrics = metrics
    else:
        note = "not simulated (--static)"
    return PlanResult(plan, report, metrics, note, judge_targets(plan, report, metrics))


def plan_differences(plans: Sequence[Plan]) -> list[dict[str, Any]]:
    """Input fields (dotted paths) whose values differ between the plans."""
    flats = [_flatten(p.model_dump(mode="json", exclude_none=False)) for p in plans]
    keys: list[str] = []
    for flat in flats:
        keys += [k for k in flat if k not in keys]
    out = []
    for k in keys:
        values = [flat.get(k) for flat in flats]
        if any(v != values[0] for v in values[1:]):
            out.append({"field": k, "values": values})
    return out


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def compare(
    plans: Sequence[Plan], simulate: bool = True, progress: Callable[[float], None] | None = None
) -> Comparison:
    """Evaluate every plan and collect their differences."""
    if len(plans) < 2:
        raise ValueError("compare needs at least two plans")
    results = []
    for i, plan in enumerate(plans):
        step = (lambda f, i=i: progress((i + f) / len(plans))) if progress else None
        results.append(evaluate(plan, simulate, step))
    return Comparison(results, plan_differences(plans))


__all__ = ["Comparison", "PlanResult", "compare", "evaluate", "judge_targets", "plan_differences"]

"""Compare plans side by side: layout, memory, every metric, every target, the differences.

:func:`compare` evaluates each plan with :func:`clustersim.run.evaluate.evaluate` (the
path every verb shares: the same findings, metrics, assumptions and exit code as ``check`` and
``run``) and returns a :class:`Comparison`, which renders as rows (for a terminal table),
Markdown, or one JSON object.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from clustersim.audit.checks import METRIC_KEYS
from clustersim.audit.markdown import fmt_value
from clustersim.audit.plans import plan_differences
from clustersim.run.evaluate import Verdict, evaluate
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
class Comparison:
    """The plans, in the order given, and the fields where they differ."""

    results: list[Verdict]
    differences: list[dict[str, Any]]

    @property
    def exit_code(self) -> int:
        """1 when any plan has an error (as ``check`` of that plan would), else 0."""
        return max(r.exit_code for r in self.results)

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
        layout = [[k, *(r.report.layout_dict().get(k) for r in res)] for k in LAYOUT_KEYS]
        memory = [
            [k, *((r.report.memory.to_dict().get(k) if r.report.memory else None) for r in res)]
            for k in MEMORY_KEYS
        ]
        metrics = []
        for k in self.metric_keys():
            values = [(r.metrics or {}).get(k) for r in res]
            if any(v is not None for v in values):
                metrics.append([k, *values])
        tables = [r.targets() for r in res]
        targets = [
            [t, *(_target_text(table.get(t)) for table in tables)]
            for t in sorted({t for table in tables for t in table})
        ]
        fields = list(dict.fromkeys(a.field for r in res for a in r.assumptions))
        assumptions = [[f, *(_assumed(r, f) for r in res)] for f in fields]
        verdict = [
            ["errors", *(r.errors for r in res)],
            ["exit code", *(r.exit_code for r in res)],
            ["simulation", *(r.note or "simulated" for r in res)],
            ["undecided", *(", ".join(r.unchecked) or "-" for r in res)],
        ]
        return [
            ("plan differences", plan_rows),
            ("layout", layout),
            ("memory (GiB)", memory),
            ("metrics", metrics),
            ("targets", targets),
            ("assumptions (not stated by the plan)", assumptions),
            ("verdict", verdict),
        ]

    def to_dict(self) -> dict[str, Any]:
        """One JSON object: every plan, and the differences."""
        return {
            "plans": self.names,
            "results": [r.to_dict() for r in self.results],
            "exit_code": self.exit_code,
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


def _assumed(verdict: Verdict, name: str) -> str:
    found = [a.text().split(": ", 1)[1] for a in verdict.assumptions if a.field == name]
    return found[0] if found else "-"


def _better(metric: str, delta: float) -> bool | None:
    """Whether a change of ``delta`` in ``metric`` is an improvement (None: no change)."""
    if delta == 0:
        return None
    return (delta > 0) == (metric in HIGHER_IS_BETTER)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return fmt_value(value).replace("|", "\\|")


def compare(
    plans: Sequence[Plan], simulate: bool = True, progress: Callable[[float], None] | None = None
) -> Comparison:
    """Evaluate every plan and collect their differences."""
    if len(plans) < 2:
        raise ValueError("compare needs at least two plans")
    results = []
    for i, plan in enumerate(plans):
        step = (lambda f, i=i: progress((i + f) / len(plans))) if progress else None
        results.append(evaluate(plan, static=not simulate, progress=step))
    return Comparison(results, plan_differences(plans))


__all__ = ["Comparison", "compare", "plan_differences"]

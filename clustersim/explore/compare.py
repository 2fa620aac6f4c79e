"""Compare plans side by side: layout, memory, every metric, every target, the differences.

:func:`compare` evaluates each plan with :func:`clustersim.run.evaluate.evaluate` (the
path every verb shares: the same findings, metrics, assumptions and exit code as ``check`` and
``run``) and returns a :class:`Comparison`, which renders as rows (for a terminal table),
Markdown, or one JSON object.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from clustersim.audit.checks import METRIC_KEYS
from clustersim.audit.judge import judge_relative
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
    "goodput_req_per_s",
    "goodput_req_per_s_per_gpu",
    "goodput_pct",
    "output_tokens_per_ms",
    "roofline_ratio_pct",
    "gpu_utilization_pct_min",
    "expert_utilization_pct",
}


# metrics an attribution reports (those of the two plans that are numbers, in this order first)
ATTRIBUTED = (
    "latency_ms",
    "iteration_time_ms",
    "throughput_tokens_per_ms",
    "mfu_pct",
    "comm_overhead_pct",
    "bubble_pct",
    "gpu_utilization_pct",
    "load_balance_pct",
    "ttft_ms_p50",
    "tpot_ms_p50",
)
# fields that say what a plan claims or requires, not what it does: never attributed
NOT_ATTRIBUTED = ("name", "claims.", "targets.")


@dataclass
class Comparison:
    """The plans, in the order given, and the fields where they differ; for two simulated
    plans, ``attribution`` (what each changed field does, :func:`attribute`)."""

    results: list[Verdict]
    differences: list[dict[str, Any]]
    attribution: dict[str, Any] | None = None

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
            *self._attribution_sections(),
            ("layout", layout),
            ("memory (GiB)", memory),
            ("metrics", metrics),
            ("targets", targets),
            ("assumptions (not stated by the plan)", assumptions),
            ("verdict", verdict),
        ]

    def _attribution_sections(self) -> list[tuple[str, list[list[Any]]]]:
        if not self.attribution:
            return []
        out = []
        for key, title in (
            ("single", "what each change does alone (applied to the first plan)"),
            ("sequence", "changes applied one after another (largest throughput change first)"),
        ):
            rows = [
                [f"{a['field']}: {fmt_value(a['from'])} -> {fmt_value(a['to'])}", "-", _deltas(a)]
                for a in self.attribution[key]
            ]
            out.append((title, rows))
        return out

    def to_dict(self) -> dict[str, Any]:
        """One JSON object: every plan, the differences and, for two plans, the attribution
        (``attribution``: each changed field applied alone to the first plan; and
        ``attribution_sequence``: applied one after another)."""
        out = {
            "plans": self.names,
            "results": [r.to_dict() for r in self.results],
            "exit_code": self.exit_code,
            "differences": self.differences,
            "metric_differences": self.metric_differences(),
        }
        if self.attribution is not None:
            out["attribution"] = self.attribution["single"]
            out["attribution_sequence"] = self.attribution["sequence"]
        return out

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


def _deltas(entry: dict[str, Any]) -> str:
    if entry["status"] != "simulated":
        return f"{entry['status']}: {entry['note']}"
    shown = [f"{k} {v:+.4g}" for k, v in entry["deltas"].items() if k in ATTRIBUTED[:3] or v != 0]
    text = ", ".join(shown[:6]) or "no change"
    return f"{text} ({entry['note']})" if entry["note"] else text


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
    plans: Sequence[Plan],
    simulate: bool = True,
    progress: Callable[[float], None] | None = None,
    attribution: bool | None = None,
) -> Comparison:
    """Evaluate every plan and collect their differences; ``attribution`` (default: for two
    simulated plans) also attributes their metric differences to each changed field."""
    if len(plans) < 2:
        raise ValueError("compare needs at least two plans")
    results = []
    for i, plan in enumerate(plans):
        step = (lambda f, i=i: progress((i + f) / len(plans))) if progress else None
        results.append(evaluate(plan, static=not simulate, progress=step))
    names = Comparison(results, []).names
    for i, verdict in enumerate(results):
        other = 1 if i == 0 else 0  # the first plan is every other plan's baseline
        judge_against(verdict, results[other], names[other])
    differences = plan_differences(plans)
    if attribution is None:
        attribution = simulate and len(plans) == 2
    found = None
    if attribution and len(plans) == 2 and results[0].metrics is not None:
        found = attribute(plans[0], plans[1], results[0])
    return Comparison(results, differences, found)


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    for key in keys[:-1]:
        if not isinstance(tree.get(key), dict):
            tree[key] = {}
        tree = tree[key]
    tree[keys[-1]] = value


def _variant(base: dict[str, Any], changes: Sequence[dict[str, Any]]) -> Plan:
    data = copy.deepcopy(base)
    for change in changes:
        _set(data, change["field"], change["to"])
    return Plan.model_validate(data)


def _entry(change: dict[str, Any], verdict: Verdict | None, before: dict, error: str = ""):
    """One attribution row: the change, and the metric deltas against ``before``."""
    entry = {"field": change["field"], "from": change["from"], "to": change["to"]}
    if verdict is None:
        return {**entry, "status": "invalid", "note": error, "deltas": {}}
    if verdict.metrics is None:
        return {**entry, "status": "not simulated", "note": verdict.note, "deltas": {}}
    after = verdict.metrics
    keys = [k for k in ATTRIBUTED if k in after] + [k for k in after if k not in ATTRIBUTED]
    deltas = {
        k: after[k] - before[k]
        for k in keys
        if isinstance(after.get(k), int | float)
        and isinstance(before.get(k), int | float)
        and not isinstance(after[k], bool)
    }
    note = verdict.note if verdict.simulated_plan is not verdict.plan else ""
    return {**entry, "status": "simulated", "note": note, "errors": verdict.errors,
            "deltas": deltas}  # fmt: skip


def attribute(first: Plan, second: Plan, base: Verdict) -> dict[str, list[dict[str, Any]]]:
    """What each field changed from ``first`` to ``second`` does to the metrics.

    ``single``: every changed field applied alone to ``first`` (one at a time), deltas against
    ``first``'s metrics (``base``); a change that makes no valid plan on its own is
    ``invalid``, with the reason. ``sequence``: the fields applied one after another, the one
    whose single change moves throughput most first (the order that explains the most), each
    step's deltas against the step before; the steps add up to ``second`` - ``first`` for
    every metric. Claims, targets and the name are not attributed.
    """
    changes = [
        {"field": d["field"], "from": d["values"][0], "to": d["values"][1]}
        for d in plan_differences([first, second])
        if not d["field"].startswith(NOT_ATTRIBUTED)
    ]
    start = first.model_dump(mode="json")
    before = base.metrics or {}
    single = []
    for change in changes:
        try:
            variant = _variant(start, [change])
        except ValueError as exc:
            single.append(_entry(change, None, before, _first_error(exc)))
            continue
        single.append(_entry(change, evaluate(variant), before))
    key = "throughput_tokens_per_ms"
    order = sorted(
        range(len(changes)), key=lambda i: -abs(single[i]["deltas"].get(key, 0.0))
    )  # stable: ties keep the plan's field order
    sequence, applied, previous = [], [], before
    for i in order:
        applied.append(changes[i])
        try:
            verdict = evaluate(_variant(start, applied))
        except ValueError as exc:
            sequence.append(_entry(changes[i], None, previous, _first_error(exc)))
            continue
        sequence.append(_entry(changes[i], verdict, previous))
        if verdict.metrics is not None:
            previous = verdict.metrics
    return {"single": single, "sequence": sequence}


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"{where}: {first.get('msg', '')}".strip(": ")
    return str(exc).splitlines()[0]


def judge_against(verdict: Verdict, other: Verdict, other_name: str) -> None:
    """Decide ``verdict``'s relative claims (``claims.relative.*``) against ``other``, the plan
    it is compared with: the findings join its verdict, the claims leave its undecided list."""
    found, decided = judge_relative(verdict.plan, verdict.metrics, other.metrics, other_name)
    if not decided:
        return
    verdict.report.findings += found
    verdict.report.unchecked = [u for u in verdict.report.unchecked if u not in decided]
    if verdict.run is not None:
        verdict.run.unchecked = verdict.report.unchecked


__all__ = ["Comparison", "attribute", "compare", "plan_differences"]

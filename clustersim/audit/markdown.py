"""Text renderings of audit results and layouts (Markdown and plain rows; no terminal I/O)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clustersim.audit.checks import AuditReport
    from clustersim.layout import Layout

MAX_GPU_ROWS = 64


def fmt_value(value: Any) -> str:
    """A claimed/computed value as short text ('-' when absent)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def audit_markdown(report: AuditReport) -> str:
    """A "nodes that need modification" document, like the review documents users write."""
    plan, lay = report.plan, report.layout
    lines = [f"# Nodes that need modification: {plan.name}", ""]
    verdict = (
        f"**{len(report.errors)} error(s)**, {len(report.findings) - len(report.errors)} warning(s)"
        if report.findings
        else "**No findings**: the plan is consistent."
    )
    lines += [verdict, ""]
    lines += [
        "## Plan as computed",
        "",
        f"- GPUs used: {lay.world_size} of {lay.cluster_gpus} "
        f"(TP {lay.tp} x PP {lay.pp} x DP {lay.dp}"
        + (f" x CP {lay.cp}" if lay.cp > 1 else "")
        + ")",
        f"- Layers per stage: {lay.layers_per_stage}",
    ]
    if plan.model.moe is not None:
        lines.append(
            f"- Experts per GPU: {fmt_value(lay.experts_per_gpu)} "
            f"({fmt_value(lay.experts_per_gpu_per_layer)} per MoE layer; EP {lay.ep}, "
            f"ETP {lay.etp}, EDP {fmt_value(lay.edp)})"
        )
    if report.memory is not None:
        mem = report.memory
        note = f" ({report.memory_note})" if report.memory_note else ""
        lines.append(
            f"- Peak memory per GPU: {mem.memory_per_gpu_gib:.1f} GiB of "
            f"{mem.capacity_gib:g} GiB{note}"
        )
    lines.append("")
    for i, f in enumerate(report.findings, 1):
        lines += [
            f"## {i}. `{f.node}` ({f.severity.upper()})",
            "",
            f"- **Current**: {fmt_value(f.claimed)}",
            f"- **Computed**: {fmt_value(f.computed)}",
            f"- **Why**: {f.message}",
            f"- **Fix**: {f.fix or '-'}",
            "",
        ]
    if report.assumptions:
        lines += ["## Assumptions (not stated by the plan)", ""]
        lines += [f"- {a.text()}" for a in report.assumptions]
        lines.append("")
    if report.simulation_note and not report.unchecked:
        lines += [f"Simulation: {report.simulation_note}.", ""]
    if report.unchecked:
        why = f" ({report.simulation_note})" if report.simulation_note else ""
        lines += [
            "## Not decided",
            "",
            f"These need a simulation of a valid plan{why}: "
            + ", ".join(f"`{u}`" for u in report.unchecked),
            "",
        ]
    return "\n".join(lines)


def gpu_rows(layout: Layout) -> list[dict[str, Any]]:
    """One row per GPU: node, stage, every parallel coordinate, its layers and experts."""
    rows = []
    for rank in range(layout.world_size):
        c = layout.coords(rank)
        layers = layout.stage_layers[c.pp]
        experts = layout.experts_of(rank)
        rows.append(
            {
                "gpu": rank,
                "node": c.node,
                "pp": c.pp,
                "tp": c.tp,
                "dp": c.dp,
                "ep": c.ep,
                "etp": c.etp,
                "edp": c.edp,
                "layers": _span(layers),
                "experts": _span(list(experts)) if experts else "-",
            }
        )
    return rows


def stage_rows(layout: Layout) -> list[dict[str, Any]]:
    """One row per pipeline stage: its GPUs, nodes, layers and experts per GPU (large layouts)."""
    per_stage = layout.world_size // layout.pp
    rows = []
    for stage in range(layout.pp):
        first, last = stage * per_stage, (stage + 1) * per_stage - 1
        rows.append(
            {
                "stage": stage,
                "gpus": f"{first}-{last}",
                "nodes": _span(
                    list(range(first // layout.gpus_per_node, last // layout.gpus_per_node + 1))
                ),
                "layers": _span(layout.stage_layers[stage]),
                "experts_per_gpu": fmt_value(layout.experts_per_gpu_by_stage[stage]),
            }
        )
    return rows


def group_rows(layout: Layout) -> list[dict[str, Any]]:
    """One row per group kind: size, count, an example, whether any group crosses nodes."""
    rows = []
    for kind in ("tp", "cp", "dp", "pp", "ep", "etp", "edp"):
        groups = layout.groups(kind)
        if not groups:
            rows.append(
                {
                    "group": kind.upper(),
                    "size": "-",
                    "count": 0,
                    "example": "invalid",
                    "crosses_nodes": "-",
                }
            )
            continue
        rows.append(
            {
                "group": kind.upper(),
                "size": len(groups[0]),
                "count": len(groups),
                "example": _short_list(groups[0]),
                "crosses_nodes": "yes" if layout.crosses_nodes(kind) else "no",
            }
        )
    return rows


def _span(items: list[int]) -> str:
    """Compact text for a sorted list of ints: '0-3', '0-3,8-11'."""
    if not items:
        return "-"
    parts, start, prev = [], items[0], items[0]
    for x in [*items[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(parts)


def _short_list(items: list[int], keep: int = 8) -> str:
    if len(items) <= keep:
        return "[" + ", ".join(map(str, items)) + "]"
    head = ", ".join(map(str, items[: keep - 1]))
    return f"[{head}, ..., {items[-1]}] ({len(items)})"

"""Rich tables for the terminal (used by the CLI only; the library never prints)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from clustersim.analysis.audit import AuditReport
from clustersim.analysis.render import fmt_value, gpu_rows, group_rows, stage_rows
from clustersim.layout import Layout


def _table(title: str, rows: list[dict], **kw) -> Table:
    table = Table(title=title, title_justify="left", **kw)
    for key in rows[0] if rows else []:
        table.add_column(key)
    for row in rows:
        table.add_row(*(fmt_value(v) for v in row.values()))
    return table


def print_audit(report: AuditReport) -> None:
    """The audit as a summary line plus a findings table."""
    console = Console(width=max(Console().width, 120))
    lay, mem = report.layout, report.memory
    console.print(f"[bold]{report.plan.name}[/bold]: {lay.world_size} of {lay.cluster_gpus} GPUs, "
                  f"TP {lay.tp} PP {lay.pp} DP {lay.dp} EP {lay.ep} ETP {lay.etp}; "
                  f"layers per stage {lay.layers_per_stage}; "
                  f"experts per GPU {fmt_value(lay.experts_per_gpu)}")
    if mem is not None:
        note = f" ({report.memory_note})" if report.memory_note else ""
        console.print(f"memory per GPU {mem.memory_per_gpu_gib:.1f} GiB of {mem.capacity_gib:g} "
                      f"(params {mem.params_gib:.1f}, grads {mem.grads_gib:.1f}, optimizer "
                      f"{mem.optimizer_gib:.1f}, activations {mem.activations_gib:.1f}, "
                      f"KV {mem.kv_cache_gib:.1f}, buffers {mem.buffers_gib:.1f}){note}")
    if not report.findings:
        console.print("[green]no findings: the plan is consistent[/green]")
    else:
        table = Table(show_lines=True)
        for col in ("node", "severity", "claimed", "computed", "why", "fix"):
            table.add_column(col, overflow="fold")
        for f in report.findings:
            style = "red" if f.severity == "error" else "yellow"
            table.add_row(f.node, f"[{style}]{f.severity}[/{style}]", fmt_value(f.claimed),
                          fmt_value(f.computed), f.message, f.fix)
        console.print(table)
        console.print(f"{len(report.errors)} error(s), "
                      f"{len(report.findings) - len(report.errors)} warning(s)")
    if report.unchecked:
        console.print("needs simulation (clustersim run): " + ", ".join(report.unchecked))


def print_layout(layout: Layout, full: bool) -> None:
    """The GPU map (every GPU, or per stage when large) and the process groups."""
    console = Console(width=max(Console().width, 100))
    console.print(f"{layout.world_size} GPUs on {-(-layout.world_size // layout.gpus_per_node)} "
                  f"nodes of {layout.gpus_per_node}; rank order tp-cp-ep-dp-pp")
    if full:
        console.print(_table("GPU map", gpu_rows(layout)))
    else:
        console.print(_table("Pipeline stages (use --all for every GPU)", stage_rows(layout)))
    console.print(_table("Process groups", group_rows(layout)))

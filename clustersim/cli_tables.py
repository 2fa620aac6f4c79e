"""Rich tables for the terminal (used by the CLI only; the library never prints)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clustersim.audit.checks import AuditReport
from clustersim.audit.markdown import fmt_value, gpu_rows, group_rows, stage_rows
from clustersim.layout import Layout


def _table(title: str, rows: list[dict], **kw) -> Table:
    table = Table(title=escape(title), title_justify="left", **kw)
    for key in rows[0] if rows else []:
        table.add_column(escape(str(key)))
    for row in rows:
        table.add_row(*(escape(fmt_value(v)) for v in row.values()))
    return table


def print_audit(report: AuditReport) -> None:
    """The audit as a summary line plus a findings table."""
    console = Console(width=max(Console().width, 120))
    lay, mem = report.layout, report.memory
    if report.pools:  # disaggregated: one line per pool
        console.print(
            f"[bold]{escape(report.plan.name)}[/bold]: {lay.world_size} of {lay.cluster_gpus} "
            "GPUs, disaggregated"
        )
        for name, pool in report.pools.items():
            p, pm = pool.layout, pool.memory
            memory = f"; memory per GPU {pm.memory_per_gpu_gib:.1f} GiB" if pm else ""
            console.print(
                f"  {name} pool: {p.world_size} GPUs from rank "
                f"{report.plan.pool_first_rank(name)}, TP {p.tp} PP {p.pp} DP {p.dp} EP {p.ep} "
                f"ETP {p.etp}; experts per GPU {fmt_value(p.experts_per_gpu)}{memory}"
            )
    else:
        console.print(
            f"[bold]{escape(report.plan.name)}[/bold]: {lay.world_size} of {lay.cluster_gpus} "
            f"GPUs, TP {lay.tp} PP {lay.pp} DP {lay.dp} EP {lay.ep} ETP {lay.etp}; "
            f"layers per stage {lay.layers_per_stage}; "
            f"experts per GPU {fmt_value(lay.experts_per_gpu)}"
        )
    if mem is not None:
        note = f" ({report.memory_note})" if report.memory_note else ""
        console.print(
            f"memory per GPU {mem.memory_per_gpu_gib:.1f} GiB of {mem.capacity_gib:g} "
            f"(params {mem.params_gib:.1f}, grads {mem.grads_gib:.1f}, optimizer "
            f"{mem.optimizer_gib:.1f}, activations {mem.activations_gib:.1f}, "
            f"KV {mem.kv_cache_gib:.1f}, buffers {mem.buffers_gib:.1f}){note}"
        )
    if not report.findings:
        console.print("[green]no findings: the plan is consistent[/green]")
    else:
        console.print(_findings_table(report.findings))
        console.print(
            f"{len(report.errors)} error(s), {len(report.findings) - len(report.errors)} warning(s)"
        )
    if report.simulation_note:
        console.print(report.simulation_note, markup=False)
    if report.unchecked:
        console.print(escape("not decided (needs a simulation): " + ", ".join(report.unchecked)))
    print_assumptions(report.assumptions, console)


def print_assumptions(assumptions, console: Console | None = None) -> None:
    """What the verdict used that the plan did not state."""
    if not assumptions:
        return
    console = console or Console(width=max(Console().width, 120))
    console.print("assumed (not stated by the plan):")
    for a in assumptions:
        console.print(f"  {a.text()}", markup=False, highlight=False)


def print_verdict(verdict) -> None:
    """``run``: the simulated metrics (training or serving), or the audit when the plan could
    not be simulated."""
    run = verdict.run
    if run is None:
        print_audit(verdict.report)
    elif verdict.plan.workload.mode == "inference":
        print_serving(run)
        if run.trace:
            Console().print(f"trace: {escape(str(run.trace['path']))} ({run.trace['rows']} rows)")
    else:
        print_run(run)


def print_layout(layout: Layout, full: bool) -> None:
    """The GPU map (every GPU, or per stage when large) and the process groups."""
    console = Console(width=max(Console().width, 100))
    console.print(
        f"{layout.world_size} GPUs on {-(-layout.world_size // layout.gpus_per_node)} "
        f"nodes of {layout.gpus_per_node}; rank order tp-cp-ep-dp-pp"
    )
    if full:
        console.print(_table("GPU map", gpu_rows(layout)))
    else:
        console.print(_table("Pipeline stages (use --all for every GPU)", stage_rows(layout)))
    console.print(_table("Process groups", group_rows(layout)))


class ProgressBar:
    """A progress bar on stderr that appears only once a run has taken more than a second."""

    def __init__(self, label: str, delay_s: float = 1.0):
        self.label, self.delay_s = label, delay_s
        self._progress = None
        self._task = None
        self._started = 0.0

    def __enter__(self) -> ProgressBar:
        import time

        self._started = time.perf_counter()
        return self

    def update(self, fraction: float) -> None:
        """Report progress in [0, 1]."""
        import time

        if self._progress is None:
            if time.perf_counter() - self._started < self.delay_s:
                return
            from rich.progress import Progress

            self._progress = Progress(console=Console(stderr=True), transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=1.0)
        self._progress.update(self._task, completed=fraction)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()


METRIC_ROWS = (
    ("iteration_time_ms", "iteration time", "ms", "latency_ms_max", "latency_ms"),
    (
        "throughput_tokens_per_ms",
        "throughput",
        "tokens/ms",
        "throughput_tokens_per_ms_min",
        "throughput_tokens_per_ms",
    ),
    ("mfu_pct", "MFU", "%", None, None),
    (
        "comm_overhead_pct",
        "communication overhead (exposed)",
        "%",
        "comm_overhead_pct_max",
        "comm_overhead_pct",
    ),
    ("comm_to_compute_pct", "communication / compute", "%", None, None),
    ("bubble_pct", "pipeline bubble", "%", None, None),
    (
        "gpu_utilization_pct",
        "GPU utilisation",
        "%",
        "gpu_utilization_pct_min",
        "gpu_utilization_pct",
    ),
    ("load_balance_pct", "expert load balance", "%", "load_balance_pct_min", "load_balance_pct"),
    ("dropped_tokens_pct", "dropped tokens", "%", None, None),
)


def _metrics_table(title: str, metrics: dict, rows, plan=None, skip_missing=False) -> Table:
    """Metric, value, unit (and the plan's target and claim when ``plan`` is given) for each
    of ``rows`` (key, label, unit, target field, claim field)."""
    table = Table(title=escape(title), title_justify="left")
    cols = ("metric", "value", "unit") + (("target", "claimed") if plan is not None else ())
    for col in cols:
        table.add_column(col)
    for key, label, unit, target, claim in rows:
        # skip_missing: rows a plan cannot have (absent, or null with nothing to compare
        # against, such as KV transfers of a colocated deployment) are left out
        if skip_missing and metrics.get(key) is None and not _target_set(plan, target):
            continue
        value = metrics.get(key)
        cells = [label, "-" if value is None else f"{value:.4g}", unit]
        if plan is not None:
            cells += [
                _target_cell(plan, target),
                escape(fmt_value(getattr(plan.claims, claim))) if claim else "",
            ]
        table.add_row(*cells)
    return table


def _target_set(plan, target) -> bool:
    """Whether ``plan`` sets any of a row's target field(s)."""
    if plan is None or not target:
        return False
    fields = (target,) if isinstance(target, str) else target
    return any(getattr(plan.targets, f) is not None for f in fields)


def _target_cell(plan, target) -> str:
    """The plan's target(s) on a row: one field name, or a tuple of them (the set ones)."""
    if not target:
        return ""
    fields = (target,) if isinstance(target, str) else target
    values = [getattr(plan.targets, f) for f in fields]
    shown = [fmt_value(v) for v in values if v is not None]
    if not shown:
        return fmt_value(None)  # the row takes a target; the plan sets none
    return escape(", ".join(shown))


def print_run(report) -> None:
    """Metrics table (with targets and claims), time breakdown, then the findings."""
    console = Console(width=max(Console().width, 120))
    plan = report.audit.plan
    targets, claims = plan.targets, plan.claims
    table = _metrics_table(
        f"{plan.name}: one training iteration (seed {plan.seed})", report.metrics, METRIC_ROWS, plan
    )
    mem = report.audit.memory
    if mem is not None:
        table.add_row(
            "memory per GPU (peak)",
            f"{mem.memory_per_gpu_gib:.4g}",
            "GiB",
            fmt_value(targets.memory_per_gpu_gib_max),
            fmt_value(claims.memory_per_gpu_gib),
        )
    console.print(table)
    parts = ", ".join(
        f"{k} {v:.1f}" for k, v in sorted(report.breakdown.items(), key=lambda kv: -kv[1])
    )
    console.print(f"time per GPU by op (ms, summed over the iteration): {parts}")
    if report.expert_load:
        rows = report.expert_load
        worst = max(rows, key=lambda row: row["max_to_mean_mean"])
        single = max(r["max_to_mean_worst"] for r in rows)
        console.print(
            f"expert load: busiest expert / mean, averaged per layer, from "
            f"{min(r['max_to_mean_mean'] for r in rows):.2f} to "
            f"{worst['max_to_mean_mean']:.2f} (layer {worst['layer']}); worst "
            f"single micro-batch {single:.2f}"
        )
    console.print(f"{report.events} events simulated in {report.wall_s:.2f} s")
    if report.trace:
        console.print(
            f"trace: {escape(str(report.trace['path']))} ({report.trace['rows']} rows, "
            f"{report.trace['bytes'] / 2**20:.1f} MiB)"
        )
    _print_findings(console, report)


def print_analysis(result) -> None:
    """``clustersim analyze``: metrics, communication, critical path, GPUs, expert load."""
    console = Console(width=max(Console().width, 120))
    console.print(
        f"[bold]{escape(str(result.plan_name))}[/bold] (seed {result.seed}): "
        f"{escape(str(result.path))}, "
        f"{result.events} events of {result.rows} rows"
    )
    console.print(
        _metrics_table("metrics (as `clustersim run` computes them)", result.metrics, METRIC_ROWS)
    )
    comm = Table(title="communication by collective (ms, summed over lanes)", title_justify="left")
    for col in ("op", "group", "total ms", "per lane ms", "count", "GiB"):
        comm.add_column(col, justify="left" if col in ("op", "group") else "right")
    for row in result.comm_by_op:
        comm.add_row(
            row["op"],
            row["group_kind"],
            f"{row['total_ms']:.1f}",
            f"{row['per_gpu_ms']:.2f}",
            str(row["count"]),
            f"{row['bytes'] / 2**30:.2f}",
        )
    console.print(comm)
    busiest = result.comm_by_group[:3]
    if busiest:
        console.print(
            "busiest groups: "
            + "; ".join(
                f"{g['op']} {g['group_kind']} group {g['group']} {g['total_ms']:.1f} ms"
                for g in busiest
            )
        )
    console.print(f"exposed communication per GPU (mean): {result.exposed_comm_ms:.1f} ms")
    _print_links(console, result.network)
    cp = result.critical_path
    top = ", ".join(f"{k} {v:.1f}" for k, v in list(cp["by_op_ms"].items())[:6])
    console.print(
        f"critical path: {cp['length_ms']:.1f} ms, ends on GPUs {cp['end_gpus']}; "
        f"compute {cp['compute_ms']:.1f} ms, communication {cp['comm_ms']:.1f} ms, "
        f"unexplained wait {cp['wait_ms']:.1f} ms, {cp['hops']} hops between lanes; "
        f"by op (ms): {top}"
    )
    util = [g["utilization_pct"] for g in result.gpus]
    if util:
        worst = min(result.gpus, key=lambda g: g["utilization_pct"])
        console.print(
            f"GPU utilisation: mean {sum(util) / len(util):.1f}%, min "
            f"{worst['utilization_pct']:.1f}% (GPU {worst['gpu']}, stage "
            f"{worst['stage']}), max {max(util):.1f}% over {len(util)} GPUs "
            f"(--json lists every GPU)"
        )
    if result.expert_load:
        rows = result.expert_load
        worst = max(rows, key=lambda r: r["max_to_mean_mean"])
        console.print(
            f"expert load: busiest expert / mean per layer from "
            f"{min(r['max_to_mean_mean'] for r in rows):.2f} to "
            f"{worst['max_to_mean_mean']:.2f} (layer {worst['layer']})"
        )


LINK_ROWS = 8
"""Links the ``analyze`` table shows (``--json`` lists every one)."""


def _print_links(console: Console, network) -> None:
    """Shared links (runs with ``hardware.topology``): contention by kind, the most contended
    links."""
    if not network.present:
        return
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in network.by_kind_ms.items())
    console.print(f"time lost to shared links per lane: {network.contention_ms:.2f} ms ({kinds})")
    table = Table(title="links (most contended, then busiest)", title_justify="left")
    for col in ("link", "kind", "GiB", "busy %", "contention ms"):
        table.add_column(col, justify="left" if col in ("link", "kind") else "right")
    for row in network.links[:LINK_ROWS]:
        table.add_row(
            escape(row["link"]),
            row["kind"],
            f"{row['bytes'] / 2**30:.2f}",
            f"{row['busy_pct']:.1f}",
            f"{row['contention_ms']:.3f}",
        )
    console.print(table)
    console.print(f"({len(network.links)} links carried bytes; --json lists every one)")


def print_replay(result, rows=None, what: str = "recorded workload") -> None:
    """``clustersim replay``: recorded vs replayed metrics (``rows`` as in :data:`METRIC_ROWS`;
    metrics neither run has are left out), then the replayed run's findings."""
    console = Console(width=max(Console().width, 120))
    changes = result.changes
    console.print(
        "plan changes: "
        + (", ".join(f"{c['field']} {c['recorded']} -> {c['new']}" for c in changes) or "none")
    )
    table = Table(
        title=escape(f"{result.report.audit.plan.name}: {what} replayed"), title_justify="left"
    )
    for col in ("metric", "recorded", "replayed", "change", "unit"):
        table.add_column(col)
    recorded, replayed = result.recorded_metrics, result.report.metrics
    for key, label, unit, _target, _claim in rows or METRIC_ROWS:
        if key not in recorded and key not in replayed:
            continue
        old, new = recorded.get(key), replayed.get(key)
        delta = "" if old is None or new is None else _delta(old, new)
        table.add_row(
            label,
            "-" if old is None else f"{old:.4g}",
            "-" if new is None else f"{new:.4g}",
            delta,
            unit,
        )
    console.print(table)
    findings = result.report.findings
    if findings:
        console.print(
            f"{len(findings)} finding(s) for the replayed plan: "
            + "; ".join(f"{f.node} ({f.severity}): {f.message}" for f in findings)
        )


def _delta(old: float, new: float) -> str:
    """``new - old``, or 0 when they differ only by rounding."""
    diff = new - old
    return "0" if abs(diff) <= 1e-9 * max(abs(old), 1.0) else f"{diff:+.4g}"


SERVING_ROWS = (
    ("ttft_ms_p50", "TTFT p50", "ms", ("ttft_ms_max", "ttft_ms_p50_max"), "ttft_ms"),
    ("ttft_ms_p99", "TTFT p99", "ms", "ttft_ms_p99_max", None),
    ("tpot_ms_p50", "TPOT p50", "ms", ("tpot_ms_max", "tpot_ms_p50_max"), "tpot_ms"),
    ("tpot_ms_p99", "TPOT p99", "ms", "tpot_ms_p99_max", None),
    ("latency_ms", "end-to-end latency p50", "ms", "latency_ms_max", "latency_ms"),
    ("latency_ms_p99", "end-to-end latency p99", "ms", None, None),
    ("queue_ms_p50", "queueing delay p50 (arrival to first step)", "ms", None, None),
    ("queue_ms_p99", "queueing delay p99", "ms", None, None),
    (
        "throughput_tokens_per_ms",
        "throughput (prompt + output)",
        "tokens/ms",
        "throughput_tokens_per_ms_min",
        "throughput_tokens_per_ms",
    ),
    ("output_tokens_per_ms", "output throughput", "tokens/ms", None, None),
    ("requests_per_s", "completed requests per second", "requests/s", None, None),
    ("goodput_req_per_s", "goodput (requests meeting the SLOs)", "requests/s", None, None),
    ("goodput_req_per_s_per_gpu", "goodput per GPU", "requests/s", None, None),
    ("goodput_pct", "good requests", "%", None, None),
    (
        "gpu_utilization_pct",
        "GPU utilisation",
        "%",
        "gpu_utilization_pct_min",
        "gpu_utilization_pct",
    ),
    ("prefill_gpu_utilization_pct", "prefill pool GPU utilisation", "%", None, None),
    ("decode_gpu_utilization_pct", "decode pool GPU utilisation", "%", None, None),
    ("kv_transfer_ms_p50", "KV transfer p50 (prefill to decode pool)", "ms", None, None),
    ("kv_transfer_ms_p99", "KV transfer p99", "ms", None, None),
    ("prefill_batch_size_p50", "prefill batch p50 (requests per step)", "", None, None),
    ("prefill_batch_size_p99", "prefill batch p99", "", None, None),
    ("decode_batch_size_p50", "decode batch p50 (requests per step)", "", None, None),
    ("decode_batch_size_p99", "decode batch p99", "", None, None),
    ("kv_cache_utilization_pct", "KV cache use (mean)", "%", None, None),
    ("kv_cache_utilization_pct_p50", "KV cache use p50 (over time)", "%", None, None),
    ("kv_cache_utilization_pct_p99", "KV cache use p99 (over time)", "%", None, None),
    ("kv_cache_utilization_peak_pct", "KV cache use (peak)", "%", None, None),
    ("prefill_kv_cache_utilization_pct", "prefill pool KV cache use (mean)", "%", None, None),
    ("decode_kv_cache_utilization_pct", "decode pool KV cache use (mean)", "%", None, None),
    ("decode_kv_cache_utilization_pct_p99", "decode pool KV cache use p99", "%", None, None),
    ("preemptions", "preemptions", "", None, None),
    ("load_balance_pct", "expert load balance", "%", "load_balance_pct_min", "load_balance_pct"),
)


def print_serving(report) -> None:
    """Serving metrics (with targets and claims), then the findings."""
    console = Console(width=max(Console().width, 120))
    plan = report.audit.plan
    done = report.metrics.get("completed_requests")
    console.print(
        _metrics_table(
            f"{plan.name}: serving {done} requests (seed {plan.seed})",
            report.metrics,
            SERVING_ROWS,
            plan,
            skip_missing=True,
        )
    )
    serving = report.to_dict()["serving"]
    for name, pool in serving.get("pools", {}).items():
        console.print(
            f"{name} pool: {pool['gpus']} GPUs, {pool['replicas']} replicas; KV cache "
            f"{pool['kv_cache_gib_per_gpu']:.1f} GiB per GPU "
            f"({pool['kv_cache_tokens_per_replica']} tokens per replica)"
        )
    if "pools" not in serving:
        console.print(
            f"{serving['replicas']} replicas; KV cache {serving['kv_cache_gib_per_gpu']:.1f} "
            f"GiB per GPU ({serving['kv_cache_tokens_per_replica']} tokens per replica)"
        )
    console.print(f"{report.events} events simulated in {report.wall_s:.2f} s")
    _print_findings(console, report)


def _findings_table(findings) -> Table:
    """Findings as a table: node, severity, claimed, computed, why, fix."""
    table = Table(show_lines=True)
    for col in ("node", "severity", "claimed", "computed", "why", "fix"):
        table.add_column(col, overflow="fold")
    for f in findings:
        style = "red" if f.severity == "error" else "yellow"
        table.add_row(
            escape(f.node),
            f"[{style}]{f.severity}[/{style}]",
            escape(fmt_value(f.claimed)),
            escape(fmt_value(f.computed)),
            escape(f.message),
            escape(f.fix or ""),
        )
    return table


def _print_findings(console: Console, report) -> None:
    if report.findings:
        console.print(_findings_table(report.findings))
    else:
        console.print(
            "[green]no findings: the plan meets its constraints, targets and claims[/green]"
        )
    if report.unchecked:
        console.print(escape("not decided by this simulation: " + ", ".join(report.unchecked)))
    note = report.audit.simulation_note
    if note:
        console.print(note, markup=False)
    print_assumptions(report.audit.assumptions, console)


def print_suggestion(suggestion) -> None:
    """``check``: the nearest valid plan, as a ``parallel:`` block."""
    console = Console(width=max(Console().width, 120))
    changed = ", ".join(f"parallel.{k} {a} -> {b}" for k, (a, b) in suggestion.changes.items())
    console.print(
        f"[bold]suggested fix[/bold] (nearest valid plan, {len(suggestion.changes)} "
        f"field(s) changed: {changed}; peak {suggestion.memory_per_gpu_gib:g} GiB per "
        f"GPU on {suggestion.plan.parallel.world_size} GPUs):"
    )
    console.print(suggestion.parallel_yaml(), markup=False, highlight=False)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(fmt_value(value))


def print_compare(result) -> None:
    """``compare``: one table per section, a column per plan."""
    console = Console(width=max(Console().width, 120))
    for title, rows in result.sections():
        if not rows:
            continue
        table = Table(title=title, title_justify="left")
        table.add_column("")
        for name in result.names:
            table.add_column(escape(str(name)), overflow="fold")
        for row in rows:
            cells = [_cell(c) for c in row]
            if title == "targets":
                cells = [cells[0]] + [
                    f"[red]{c}[/red]" if c.startswith("FAIL") else c for c in cells[1:]
                ]
            table.add_row(*cells)
        console.print(table)


SEARCH_COLS = (
    ("rank", "rank"),
    ("tp", "TP"),
    ("pp", "PP"),
    ("dp", "DP"),
    ("ep", "EP"),
    ("etp", "ETP"),
    ("micro_batch_size", "mbs"),
    ("num_microbatches", "m"),
    ("schedule", "schedule"),
    ("virtual_stages", "v"),
    ("recompute", "recompute"),
    ("throughput_tokens_per_ms", "tokens/ms"),
    ("latency_ms", "latency ms"),
    ("cost_gpu_ms_per_token", "GPU-ms/token"),
    ("memory_per_gpu_gib", "GiB/GPU"),
    ("candidate_id", "id"),
)


def _search_table(title: str, rows) -> Table:
    table = Table(title=title, title_justify="left")
    for _key, label in SEARCH_COLS:
        table.add_column(label, justify="right")
    for row in rows:
        table.add_row(*(_cell(row.get(k)) for k, _label in SEARCH_COLS))
    return table


def print_search(result, top: int = 10) -> None:
    """``search``: counts, the ranking, the Pareto front, the best plan's ``parallel:`` block."""
    console = Console(width=max(Console().width, 140))
    s = result.summary()
    console.print(
        f"[bold]{escape(result.base.name)}[/bold] on {result.base.hardware.num_gpus} GPUs, "
        f"objective {result.objective}: {s['candidates']} candidates; discarded "
        f"statically {s.get('invalid', 0)} invalid + {s.get('oom', 0)} out of memory "
        f"({s['discarded_statically_pct']:.0f}%), {s.get('dominated', 0)} dominated "
        f"(lighter recompute fits); simulated {s.get('simulated', 0)} "
        f"({s['simulated_now']} now, {s['resumed']} from the table, {s['workers']} "
        f"workers, {result.backend}) in {s['wall_s']:.1f} s"
    )
    if not result.complete:
        console.print(
            f"[yellow]{s.get('pending', 0)} candidates still pending: continue with "
            "--resume[/yellow]"
        )
    failing = [r for r in result.rows if r["status"] == "simulated" and not r["meets_targets"]]
    if failing:
        console.print(f"{len(failing)} simulated candidates miss a target")
    ranked = result.ranked()
    if not ranked:
        console.print("[red]no candidate meets the plan's targets[/red]")
    else:
        console.print(
            _search_table(f"best {min(top, len(ranked))} by {result.objective}", ranked[:top])
        )
        console.print(
            _search_table(f"Pareto front: throughput vs {result.pareto_axis}", result.pareto())
        )
        best = result.plan_for(ranked[0])
        import yaml

        block = yaml.safe_dump(
            {"parallel": best.parallel.model_dump(mode="json", exclude_none=True)}, sort_keys=False
        ).rstrip()
        console.print("best plan:", markup=False)
        console.print(block, markup=False, highlight=False)
    if result.path is not None:
        console.print(f"every candidate: {result.path}")


SERVING_TRACE_ROWS = SERVING_ROWS + (
    ("completed_requests", "completed requests", "", None, None),
    ("rejected_requests", "rejected requests", "", None, None),
)


def print_serving_analysis(result) -> None:
    """``clustersim analyze`` of a serving trace: the serving metrics (as `run` printed them),
    the deployment, then one row per replica."""
    console = Console(width=max(Console().width, 120))
    console.print(
        f"[bold]{escape(str(result.plan_name))}[/bold] (seed {result.seed}): "
        f"{escape(str(result.path))}, "
        f"serving trace of {result.rows} rows"
    )
    console.print(
        _metrics_table(
            "metrics (as `clustersim run` computes them)",
            result.metrics,
            SERVING_TRACE_ROWS,
            skip_missing=True,
        )
    )
    s = result.serving
    console.print(
        f"{s['replicas']} replicas in {len(s['engines'])} engine(s); KV cache "
        f"{s['kv_cache_gib_per_gpu']:.1f} GiB per GPU "
        f"({s['kv_cache_tokens_per_replica']} tokens per replica)"
    )
    replicas = Table(title="replicas", title_justify="left")
    cols = (
        "replica",
        "requests",
        "rejected",
        "preemptions",
        "output tokens",
        "TTFT p50 ms",
        "TPOT p50 ms",
        "latency p50 ms",
        "KV use %",
        "KV peak %",
    )
    for col in cols:
        replicas.add_column(col, justify="right")
    for r in result.replicas:
        replicas.add_row(
            str(r["replica"]),
            str(r["requests"]),
            str(r["rejected"]),
            str(r["preemptions"]),
            str(r["output_tokens"]),
            *(
                _cell(r[k])
                for k in (
                    "ttft_ms_p50",
                    "tpot_ms_p50",
                    "latency_ms_p50",
                    "kv_cache_utilization_pct",
                    "kv_cache_utilization_peak_pct",
                )
            ),
        )
    console.print(replicas)


def print_serving_replay(result) -> None:
    """``clustersim replay`` of a serving trace: the recorded request stream replayed."""
    print_replay(result, SERVING_TRACE_ROWS, "recorded request stream")


def print_capacity(result) -> None:
    """``clustersim capacity``: the capacity, then the latency-vs-rate curve it measured."""
    console = Console(width=max(Console().width, 120))
    d = result.to_dict()
    table = Table(
        title=escape(
            f"{d['plan']}: request rate vs SLOs (seed {d['seed']}, at least "
            f"{100 * d['attain']:g}% of requests good)"
        ),
        title_justify="left",
    )
    for col in ("rate (req/s)", "TTFT p99 (ms)", "TPOT p99 (ms)", "good %", "SLOs"):
        table.add_column(col)
    for p in d["curve"]:
        verdict = "hold" if p["holds"] else "missed"
        if p["stopped_early"]:
            verdict += " (stopped early)"
        table.add_row(
            f"{p['rate_req_per_s']:.4g}",
            "-" if p["ttft_ms_p99"] is None else f"{p['ttft_ms_p99']:.4g}",
            "-" if p["tpot_ms_p99"] is None else f"{p['tpot_ms_p99']:.4g}",
            "-" if p["goodput_pct"] is None else f"{p['goodput_pct']:.4g}",
            verdict,
        )
    console.print(table)
    if d["audit_errors"]:
        console.print(
            "[yellow]the plan fails its audit (`clustersim check`): "
            + escape("; ".join(d["audit_errors"]))
            + "[/yellow]"
        )
    cap = d["capacity_req_per_s"]
    if cap is None:
        console.print(
            f"[red]no capacity: the SLOs fail even at {d['curve'][0]['rate_req_per_s']:.4g} "
            "requests/s[/red]"
        )
        return
    if d["limited_by_requests"]:
        console.print(
            "[yellow]above this rate the requests arrive in less than twice their p99 latency "
            "(a burst, not a sustained load): raise workload.requests.num to measure "
            "further[/yellow]"
        )
    console.print(
        f"[bold]capacity {cap:.4g} requests/s[/bold] ({d['capacity_req_per_s_per_gpu']:.4g} per "
        f"GPU on {d['gpus']} GPUs); goodput {d['goodput_req_per_s']:.4g} requests/s; limiting "
        f"SLO {d['limiting_slo']}; {d['probes']} rates simulated"
    )


SERVING_SEARCH_COLS = (
    ("rank", "#"),
    ("tp", "TP"),
    ("pp", "PP"),
    ("dp", "DP"),
    ("ep", "EP"),
    ("etp", "ETP"),
    ("max_batch_size", "max batch"),
    ("max_num_batched_tokens", "token budget"),
    ("chunked_prefill", "chunked"),
    ("capacity_req_per_s", "capacity req/s"),
    ("capacity_req_per_s_per_gpu", "per GPU"),
    ("goodput_req_per_s_per_gpu", "good/GPU"),
    ("ttft_ms_p99", "TTFT p99 ms"),
    ("tpot_ms_p99", "TPOT p99 ms"),
    ("limiting_slo", "limiting SLO"),
)


# disaggregated candidates: the split and the prefill pool's degrees before the decode pool's
DISAGGREGATED_COLS = (
    ("split", "split"),
    ("prefill_gpus", "P GPUs"),
    ("prefill_tp", "P TP"),
    ("prefill_ep", "P EP"),
    ("tp", "D TP"),
    ("ep", "D EP"),
)


def _serving_search_table(title: str, rows, objective: str) -> Table:
    capacity_only = ("capacity_req_per_s", "capacity_req_per_s_per_gpu", "limiting_slo")
    cols = [c for c in SERVING_SEARCH_COLS if objective == "capacity" or c[0] not in capacity_only]
    if any(row.get("split") for row in rows):  # the plain degrees are the decode pool's
        plain = ("tp", "pp", "dp", "ep", "etp")  # in the split and DISAGGREGATED_COLS
        cols = [cols[0], *DISAGGREGATED_COLS] + [c for c in cols[1:] if c[0] not in plain]
    table = Table(title=title, title_justify="left")
    for _key, label in cols:
        table.add_column(label, justify="right")
    for row in rows:
        cells = []
        for key, _label in cols:
            value = row.get(key)
            if key == "limiting_slo" and value:  # ttft_ms_p99_max -> ttft p99
                value = value.removesuffix("_max").replace("_ms", "").replace("_", " ")
            cells.append(escape(_cell(value)))
        table.add_row(*cells)
    return table


def print_serving_search(result, top: int = 10, path=None) -> None:
    """``search`` of a serving plan: counts, ranking, Pareto front, the best deployment."""
    console = Console(width=max(Console().width, 140))
    c = result.counts
    console.print(
        f"[bold]{escape(result.base.name)}[/bold] on {result.base.hardware.num_gpus} GPUs, "
        f"objective {result.objective} per GPU (SLOs: at least {100 * result.attain:g}% of "
        f"requests good): {len(result.rows)} deployments; {c.get('invalid', 0)} discarded by "
        f"the audit, {c.get('simulated', 0)} simulated"
        + (f" ({result.resumed} of them taken from the table)" if result.resumed else "")
        + f", {c.get('pending', 0)} left (--resume), "
        f"{c.get('unsupported', 0) + c.get('failed', 0)} not simulable "
        f"({result.workers} workers) in {result.wall_s:.1f} s"
    )
    ranked = result.ranked()
    if not ranked:
        console.print("[red]no deployment meets the plan's SLOs and targets[/red]")
    else:
        title = f"best {min(top, len(ranked))} by {result.objective} per GPU"
        console.print(_serving_search_table(title, ranked[:top], result.objective))
        console.print(
            _serving_search_table(
                f"Pareto front: {result.objective} per GPU vs TTFT p99 and TPOT p99",
                result.pareto(),
                result.objective,
            )
        )
        import yaml

        d = result.to_dict(top)
        block = yaml.safe_dump(
            {"parallel": d["best_parallel"], "workload": {"requests": d["best_requests"]}},
            sort_keys=False,
        ).rstrip()
        console.print("best deployment:", markup=False)
        console.print(block, markup=False, highlight=False)
    if path is not None:
        console.print(f"every candidate: {path}")

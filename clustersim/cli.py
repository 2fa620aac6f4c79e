"""Command line: thin typer commands over the library (parse, call one function, print).

Library modules are imported inside the commands so that ``clustersim --help`` starts fast.
Unusable input (PlanError) prints one message and exits with code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help=(
        "Audit and simulate parallel deployment plans (TP / EP / PP / DP) of Mixture-of-Experts "
        "models on GPU clusters.\n\nGive a plan file (YAML or JSON); without one, commands use "
        "the embedded default plan (Mixtral-8x7B on 16 x H100-SXM). Start with "
        "`clustersim check PLAN` and `clustersim plan layout PLAN`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
plan_app = typer.Typer(help="Inspect plan files: resolved values, GPU layout, JSON Schema.")
app.add_typer(plan_app, name="plan")

PlanArg = Annotated[
    Path | None,
    typer.Argument(help="Plan file (.yaml/.yml/.json). Omit for the embedded default plan."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a field: --set parallel.tp=4 (repeatable)."),
]
DEFAULT_VALIDATION_CSV = (
    Path(__file__).resolve().parent.parent / "configs" / "validation" / "narayanan2021_table1.csv"
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]


class CheckFormat(StrEnum):
    """Output formats of ``check``."""

    table = "table"
    markdown = "markdown"
    json = "json"


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def _load(path: Path | None, overrides: list[str] | None):
    from clustersim.spec import PlanError, load_plan

    try:
        return load_plan(path, overrides or ())
    except PlanError as exc:
        raise _fail(exc.render()) from None


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@app.command(help="Audit a plan: GPU count, divisibility, layers per stage, experts per GPU, "
             "memory per GPU, and every number in its `claims` section; claims and targets "
             "that need timing (latency, throughput, overheads, load balance) are settled by "
             "simulating the plan unless --static. Exit code 0: no errors; 1: the plan needs "
             "modification; 2: the input is unusable.")
def check(
    plan_file: PlanArg = None,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
    fmt: Annotated[
        CheckFormat,
        typer.Option("--format", "-f", help="table, markdown (a review document) or json."),
    ] = CheckFormat.table,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the report to this file.")
    ] = None,
    static: Annotated[
        bool, typer.Option("--static", help="Audit only; do not simulate claims and targets.")
    ] = False,
) -> None:
    """Audit a plan and print its findings."""
    from clustersim.analysis.render import audit_markdown
    from clustersim.analysis.simulate import check_plan
    from clustersim.cli_tables import ProgressBar

    plan = _load(plan_file, set_)
    with ProgressBar("simulating claims and targets") as bar:
        report = check_plan(plan, simulate_claims=not static, progress=bar.update)
    if json_out:
        fmt = CheckFormat.json
    if fmt is CheckFormat.json:
        text = json.dumps(report.to_dict(), indent=2, default=str)
    elif fmt is CheckFormat.markdown:
        text = audit_markdown(report)
    else:
        text = None
    if output is not None:
        if text is None:
            text = audit_markdown(report)
        output.write_text(text + "\n")
        typer.echo(f"wrote {output}", err=True)
    elif text is not None:
        typer.echo(text)
    else:
        from clustersim.cli_tables import print_audit

        print_audit(report)
    raise typer.Exit(code=1 if report.has_errors else 0)


@app.command(
    help="Simulate one training iteration of a plan (SimPy engine: every GPU, link and pipeline "
    "stage) and print latency, throughput, communication overhead, bubble, utilisation, MFU, "
    "expert load balance and memory, with the plan's targets and claims checked. --trace also "
    "writes every event, the workload and the routing to an Arrow file for `clustersim analyze` "
    "and `clustersim replay`. Exit code 0: no errors; 1: the plan fails a constraint, target or "
    "claim; 2: unusable input."
)
def run(
    plan_file: PlanArg = None,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
    trace: Annotated[
        bool,
        typer.Option("--trace", help="Write an Arrow event trace to "
                     "traces/<plan name>-seed<seed>.arrow (or --trace-file)."),
    ] = False,
    trace_file: Annotated[
        Path | None,
        typer.Option("--trace-file", help="Write the trace to this file (implies --trace)."),
    ] = None,
) -> None:
    """Simulate a plan and print its metrics."""
    from clustersim.analysis.simulate import simulate
    from clustersim.cli_tables import ProgressBar, print_run
    from clustersim.engine.training import EngineError

    plan = _load(plan_file, set_)
    serving = plan.workload.mode == "inference"
    if serving and (trace or trace_file):
        raise _fail("--trace: traces of serving runs are not written yet (training only)")
    if trace and trace_file is None:
        from clustersim.analysis.tracing import default_trace_path

        trace_file = default_trace_path(plan)
    try:
        with ProgressBar("simulating") as bar:
            if serving:
                from clustersim.analysis.serving import simulate_serving

                report = simulate_serving(plan, progress=bar.update)
            else:
                report = simulate(plan, progress=bar.update, trace=trace_file)
    except (EngineError, ValueError) as exc:
        from clustersim.analysis.audit import audit

        findings = audit(plan)
        if findings.has_errors and not json_out:
            from clustersim.cli_tables import print_audit

            print_audit(findings)
        raise _fail(f"cannot simulate {plan_file or 'the default plan'}: {exc}") from None
    except OSError as exc:
        raise _fail(f"cannot write the trace {trace_file}: {exc.strerror or exc}") from None
    if json_out:
        _print_json(report.to_dict())
    elif serving:
        from clustersim.cli_tables import print_serving

        print_serving(report)
    else:
        print_run(report)
    raise typer.Exit(code=1 if report.has_errors else 0)


TraceArg = Annotated[Path, typer.Argument(help="Trace file (.arrow) written by run --trace.")]


def _window(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    lo, sep, hi = text.partition(":")
    try:
        window = (float(lo), float(hi))
    except ValueError:
        window = None
    if not sep or window is None or not window[0] < window[1]:
        raise _fail(f"--window: expected START_MS:END_MS with START < END, got {text!r}")
    return window


@app.command(
    help="Analyse a trace written by `run --trace`: per-GPU utilisation, communication time by "
    "collective and group, exposed communication, bubble, the critical path of the iteration, "
    "expert load per layer (the same metrics `run` printed). Streams the file, so traces "
    "larger than memory work. --perfetto writes Chrome/Perfetto trace JSON (ui.perfetto.dev); "
    "--plot draws a timeline of --window, an expert-load heatmap and utilisation bars "
    "(needs matplotlib: pip install 'clustersim[plot]'). Exit code 2: unusable trace."
)
def analyze(
    trace_file: TraceArg,
    json_out: JsonOpt = False,
    perfetto: Annotated[
        Path | None, typer.Option("--perfetto", help="Write Chrome/Perfetto trace JSON here.")
    ] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG here.")] = None,
    window: Annotated[
        str | None,
        typer.Option("--window", help="START_MS:END_MS for --plot and --perfetto "
                     "(default: the whole iteration)."),
    ] = None,
) -> None:
    """Analyse a trace and print (or export) what happened."""
    from clustersim.analysis.analyze import analyze as analyse_trace
    from clustersim.cli_tables import ProgressBar, print_analysis
    from clustersim.trace import TraceError

    span = _window(window)
    if plot is not None:
        from clustersim.analysis.plots import PlotError, _pyplot

        try:
            _pyplot()
        except PlotError as exc:
            raise _fail(str(exc)) from None
    try:
        with ProgressBar("analysing") as bar:
            result = analyse_trace(trace_file, (span or (0.0, float("inf"))) if plot else None,
                                   progress=bar.update)  # fmt: skip
        if perfetto is not None:
            from clustersim.analysis.perfetto import export_perfetto

            count = export_perfetto(trace_file, perfetto, span)
            typer.echo(f"wrote {perfetto} ({count} events)", err=True)
        if plot is not None:
            from clustersim.analysis.plots import plot_analysis

            plot_analysis(result, plot)
            typer.echo(f"wrote {plot}", err=True)
    except TraceError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot write {exc.filename or 'output'}: {exc.strerror or exc}") from None
    if json_out:
        _print_json(result.to_dict())
    else:
        print_analysis(result)


@app.command(
    help="Simulate the workload recorded in a trace (sequence lengths, routing) again, under "
    "the trace's own plan or a changed one: --set hardware.inter_node.bandwidth_gbps=100 "
    "changes the recorded plan, --plan PLAN replaces it. Changes that make the recorded "
    "workload meaningless (experts, layers, DP size, micro-batches, EP/TP grouping, routing "
    "settings, sequence lengths, seed) are refused. Exit code 2: unusable trace or change."
)
def replay(
    trace_file: TraceArg,
    plan_file: Annotated[
        Path | None, typer.Option("--plan", help="Replay under this plan instead.")
    ] = None,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Re-simulate a recorded workload and print the metrics, recorded vs replayed."""
    from clustersim.analysis.replay import ReplayError, recorded_plan
    from clustersim.analysis.replay import replay as replay_trace
    from clustersim.cli_tables import ProgressBar, print_replay
    from clustersim.engine.training import EngineError
    from clustersim.spec import PlanError
    from clustersim.trace import TraceError

    try:
        plan = _load(plan_file, set_) if plan_file else recorded_plan(trace_file, set_ or [])
        with ProgressBar("replaying") as bar:
            result = replay_trace(trace_file, plan, progress=bar.update)
    except PlanError as exc:
        raise _fail(exc.render()) from None
    except (TraceError, ReplayError, EngineError) as exc:
        raise _fail(str(exc)) from None
    if json_out:
        _print_json(result.to_dict())
    else:
        print_replay(result)
    raise typer.Exit(code=1 if result.report.has_errors else 0)


@app.command(
    help="Calibration check: simulate every row of Narayanan et al. 2021 Table 1 (Megatron-LM "
    "GPT 1.7B-1T on up to 3072 A100s) and print predicted vs published TFLOP/s per GPU and "
    "the error per row. --set overrides apply to every row (e.g. hardware.compute_efficiency=0.6)."
)
def validate(
    csv_file: Annotated[
        Path | None, typer.Argument(help="Table to simulate (default: the shipped copy).")
    ] = None,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Simulate the published measurements and report the error per row."""
    from clustersim.analysis.validation import validate as run_validation
    from clustersim.cli_tables import print_validation
    from clustersim.spec.load import apply_overrides

    path = csv_file or DEFAULT_VALIDATION_CSV
    if not path.is_file():
        raise _fail(f"{path}: file not found")
    overrides = _flat_overrides(apply_overrides({}, set_ or [], "--set"))
    rows = list(run_validation(path, overrides))
    if json_out:
        _print_json([r.to_dict() for r in rows])
    else:
        print_validation(rows)


def _flat_overrides(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and prefix == "":
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@plan_app.command("show")
def plan_show(plan_file: PlanArg = None, set_: SetOpt = None, json_out: JsonOpt = False) -> None:
    """Print the fully resolved plan: presets merged, defaults filled in (YAML, or --json)."""
    plan = _load(plan_file, set_)
    data = plan.model_dump(mode="json")
    if json_out:
        _print_json(data)
        return
    import yaml

    typer.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


@plan_app.command(
    "layout",
    help="Print the GPU map: each GPU's node, pipeline stage, TP/DP/EP ranks, layers and experts, "
    "and every process group with whether it crosses node boundaries. Large layouts are "
    "summarised per stage (use --all for every GPU).",
)
def plan_layout(
    plan_file: PlanArg = None,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
    all_gpus: Annotated[
        bool, typer.Option("--all", help="List every GPU even when large.")
    ] = False,
) -> None:
    """Print the GPU map of a plan."""
    from clustersim.analysis.render import MAX_GPU_ROWS, gpu_rows, group_rows, stage_rows
    from clustersim.layout import Layout

    layout = Layout(_load(plan_file, set_))
    full = all_gpus or layout.world_size <= MAX_GPU_ROWS
    if json_out:
        out = {"groups": group_rows(layout), "stages": stage_rows(layout)}
        out["gpus"] = gpu_rows(layout) if full else None
        _print_json(out)
        return
    from clustersim.cli_tables import print_layout

    print_layout(layout, full)


@plan_app.command("schema")
def plan_schema() -> None:
    """Print the JSON Schema of plan files (for editor completion and validation)."""
    from clustersim.spec.schema import Plan

    schema = Plan.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "clustersim plan"
    _print_json(schema)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()

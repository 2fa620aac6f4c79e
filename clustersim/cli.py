"""Command line: thin typer commands over the library (parse, call one function, print).

Library modules are imported inside the commands so that ``clustersim --help`` starts fast.
Unusable input (PlanError) prints one message and exits with code 2, never a traceback.

Exit codes: 0 fine; 1 the plan needs modification (a finding); 2 unusable input or output;
3 an internal error (a bug: one line, ``--debug`` or CLUSTERSIM_DEBUG=1 for the traceback);
130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Every output file is written through
``clustersim.spec.outputs`` (regular files only, never an input, atomic).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
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
        "`clustersim check PLAN` and `clustersim plan layout PLAN`.\n\nExit codes: 0 fine; "
        "1 the plan needs modification; 2 unusable input or output; 3 internal error (please "
        "report; --debug or CLUSTERSIM_DEBUG=1 shows the traceback); 130 interrupted (Ctrl-C; "
        "143 on SIGTERM)."
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
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json", help="Print one JSON object for scripts (strict JSON: NaN and infinities null)."
    ),
]
MaxEventsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-events",
        help="Simulate plans up to this many estimated events (default 2,000,000, about a "
        "minute); larger plans are refused with their estimate.",
        min=1,
    ),
]
MAX_GPUS = 2**24
"""Largest --gpus accepted (the plan schema bounds a plan's own cluster likewise)."""

_debug = False


@app.callback()
def _root(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help="Show the traceback of an internal error (also CLUSTERSIM_DEBUG=1).",
        ),
    ] = False,
) -> None:
    global _debug
    _debug = _debug or debug


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


def _check_output(path: Path | None, inputs: list[Any] | tuple[Any, ...] = ()) -> None:
    """Refuse (exit 2) an output that is not a regular file or is one of ``inputs``, before
    any work is done."""
    from clustersim.spec.outputs import OutputError, check_output

    if path is not None:
        try:
            check_output(path, inputs)
        except OutputError as exc:
            raise _fail(str(exc)) from None


def _inputs(paths: list[Path | None] | tuple[Path | None, ...], *plans: Any) -> list[Any]:
    """The input files of a command: its plan or trace files and the files its plans read."""
    out: list[Any] = [p for p in paths if p is not None]
    for plan in plans:
        req = plan.workload.requests
        out += [s.file for s in (plan.workload.seq_len, req.prompt_len, req.output_len) if s.file]
        out += [req.trace] if req.trace else []
    return out


def _emit(text: str | None, output: Path | None, inputs: list[Any] | None = None) -> bool:
    """Write ``text`` to ``output``, or print it; False when there is no text (print a table)."""
    from clustersim.spec.outputs import OutputError, write_text_atomic

    if text is None:
        return False
    if output is not None:
        try:
            write_text_atomic(output, text + "\n", inputs or ())
        except OutputError as exc:
            raise _fail(str(exc)) from None
        except OSError as exc:
            raise _fail(f"cannot write {output}: {exc.strerror or exc}") from None
        typer.echo(f"wrote {output}", err=True)
    else:
        typer.echo(text)
    return True


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if type(obj).__module__ == "numpy":  # numpy scalars and arrays
        tolist = getattr(obj, "tolist", None)
        if tolist is not None:
            return _finite(tolist())
    return obj


def _json_text(obj: Any) -> str:
    """The one JSON printer: strict JSON (``allow_nan=False``), non-finite numbers as null."""
    return json.dumps(_finite(obj), indent=2, default=str, allow_nan=False)


def _print_json(obj: Any) -> None:
    typer.echo(_json_text(obj))


def _check_work(plans: list[Any], max_events: int | None) -> None:
    """Refuse (exit 2) plans whose simulation is estimated above ``max_events``."""
    from clustersim.run.workload import estimate_work

    for plan in plans:
        estimate = estimate_work(plan)
        if estimate.too_large(max_events):
            name = f"{plan.name}: " if len(plans) > 1 else ""
            raise _fail(name + estimate.refusal(max_events))


@app.command(
    help="Audit a plan: GPU count, divisibility, layers per stage, experts per GPU, "
    "memory per GPU, and every number in its `claims` section; claims and targets "
    "that need timing (latency, throughput, overheads, load balance) are settled by "
    "simulating the plan unless --static. Exit code 0: no errors; 1: the plan needs "
    "modification; 2: the input is unusable."
)
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
    max_events: MaxEventsOpt = None,
) -> None:
    """Audit a plan and print its findings."""
    from clustersim.audit.markdown import audit_markdown
    from clustersim.audit.nearest import suggest_fix, suggestion_markdown
    from clustersim.cli_tables import ProgressBar
    from clustersim.run.evaluate import evaluate

    plan = _load(plan_file, set_)
    inputs = _inputs([plan_file], plan)
    _check_output(output, inputs)
    if not static:
        _check_work([plan], max_events)
    with ProgressBar("simulating claims and targets") as bar:
        verdict = evaluate(plan, static=static, progress=bar.update)
    report = verdict.report
    suggestion = suggest_fix(plan, report)
    if json_out:
        fmt = CheckFormat.json
    if fmt is CheckFormat.json:
        data = verdict.to_dict()
        data["suggestion"] = suggestion.to_dict() if suggestion is not None else None
        text = _json_text(data)
    elif fmt is CheckFormat.markdown or output is not None:
        text = audit_markdown(report) + suggestion_markdown(suggestion)
    else:
        text = None
    if not _emit(text, output, inputs):
        from clustersim.cli_tables import print_audit, print_suggestion

        print_audit(report)
        if suggestion is not None:
            print_suggestion(suggestion)
    raise typer.Exit(code=verdict.exit_code)


@app.command(
    help="Simulate one training iteration of a plan (SimPy engine: every GPU, link and pipeline "
    "stage) and print latency, throughput, communication overhead, bubble, utilisation, MFU, "
    "expert load balance and memory, with the plan's targets and claims checked. --trace also "
    "writes every event, the workload and the routing to an Arrow file for `clustersim analyze` "
    "and `clustersim replay`. Exit code 0: no errors; 1: the plan fails a constraint, target or "
    "claim; 2: unusable input. A plan whose EP x ETP does not fold is simulated with the "
    "nearest valid folding (etp: 1), listed among the assumptions, as in check and compare."
)
def run(
    plan_file: PlanArg = None,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
    trace: Annotated[
        bool,
        typer.Option(
            "--trace",
            help="Write an Arrow event trace to "
            "traces/<plan name>-seed<seed>.arrow (or --trace-file).",
        ),
    ] = False,
    trace_file: Annotated[
        Path | None,
        typer.Option("--trace-file", help="Write the trace to this file (implies --trace)."),
    ] = None,
    max_events: MaxEventsOpt = None,
) -> None:
    """Simulate a plan and print its metrics."""
    from clustersim.cli_tables import ProgressBar, print_verdict
    from clustersim.run.evaluate import evaluate

    plan = _load(plan_file, set_)
    if trace and trace_file is None:
        from clustersim.run.record import default_trace_path

        trace_file = default_trace_path(plan)
    _check_output(trace_file, _inputs([plan_file], plan))
    _check_work([plan], max_events)
    from clustersim.spec.outputs import OutputError

    try:
        with ProgressBar("simulating") as bar:
            verdict = evaluate(plan, progress=bar.update, trace=trace_file)
    except OutputError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot write the trace {trace_file}: {exc.strerror or exc}") from None
    if json_out:
        _print_json(verdict.to_dict())
    else:
        print_verdict(verdict)
    raise typer.Exit(code=verdict.exit_code)


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
    "--plot draws a timeline of --window, an expert-load heatmap and utilisation bars (serving: "
    "every request and the continuous batch over time) "
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
        typer.Option(
            "--window",
            help="START_MS:END_MS for --plot and --perfetto (default: the whole iteration).",
        ),
    ] = None,
) -> None:
    """Analyse a trace and print (or export) what happened."""
    from clustersim.analyze import analyze as analyse_trace
    from clustersim.cli_tables import ProgressBar, print_analysis
    from clustersim.spec.outputs import OutputError
    from clustersim.trace import TraceError

    span = _window(window)
    for out in (perfetto, plot):
        _check_output(out, [trace_file])
    if perfetto is not None and plot is not None:
        _check_output(plot, [trace_file, perfetto])
    if plot is not None:
        from clustersim.analyze.plots import PlotError, require_pyplot

        try:
            require_pyplot()
        except PlotError as exc:
            raise _fail(str(exc)) from None
    try:
        with ProgressBar("analysing") as bar:
            result = analyse_trace(
                trace_file, (span or (0.0, float("inf"))) if plot else None, progress=bar.update
            )
        if perfetto is not None:
            from clustersim.analyze.perfetto import export_perfetto

            count = export_perfetto(trace_file, perfetto, span)
            typer.echo(f"wrote {perfetto} ({count} events)", err=True)
        if plot is not None:
            from clustersim.analyze.plots import plot_analysis, plot_serving

            if getattr(result, "mode", None) == "inference":
                plot_serving(result, plot, span)
            else:
                plot_analysis(result, plot)
            typer.echo(f"wrote {plot}", err=True)
    except (TraceError, OutputError) as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot write {exc.filename or 'output'}: {exc.strerror or exc}") from None
    if json_out:
        _print_json(result.to_dict())
    elif getattr(result, "mode", None) == "inference":
        from clustersim.cli_tables import print_serving_analysis

        print_serving_analysis(result)
    else:
        print_analysis(result)


@app.command(
    help="Simulate the workload recorded in a trace (sequence lengths, routing) again, under "
    "the trace's own plan or a changed one (training traces; serving traces replay their "
    "request stream): --set hardware.inter_node.bandwidth_gbps=100 "
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
    max_events: MaxEventsOpt = None,
) -> None:
    """Re-simulate a recorded workload and print the metrics, recorded vs replayed."""
    from clustersim.cli_tables import ProgressBar, print_replay
    from clustersim.engine.errors import EngineError
    from clustersim.run.replay import ReplayError, recorded_plan
    from clustersim.run.replay import replay as replay_trace
    from clustersim.spec import PlanError
    from clustersim.trace import TraceError

    try:
        plan = _load(plan_file, set_) if plan_file else recorded_plan(trace_file, set_ or [])
        _check_work([plan], max_events)
        with ProgressBar("replaying") as bar:
            result = replay_trace(trace_file, plan, progress=bar.update)
    except PlanError as exc:
        raise _fail(exc.render()) from None
    except (TraceError, ReplayError, EngineError) as exc:
        raise _fail(str(exc)) from None
    if json_out:
        _print_json(result.to_dict())
    elif result.report.audit.plan.workload.mode == "inference":
        from clustersim.cli_tables import print_serving_replay

        print_serving_replay(result)
    else:
        print_replay(result)
    raise typer.Exit(code=result.verdict.exit_code)


@app.command(
    help="Validation against published measurements, per data set: dense training (Narayanan "
    "2021), MoE training (Parallel Folding, ModelZoo), serving (TensorRT-LLM, gpt-fast, SGLang, "
    "metaseq), kernels (Vidur, FlashAttention), collectives (NCCL, DeepEP; the alpha-beta model) "
    "and the same collectives as flows over shared links. Prints published "
    "vs predicted in sample and out of sample (end-to-end parameters refitted without the row), "
    "mean and worst |error| per set, the fitted parameters and the rows not expressible."
)
def validate(
    set_name: Annotated[
        list[str] | None,
        typer.Option(
            "--set-name",
            help="Set to run (repeatable): dense, moe, fsdp, serving, kernels, "
            "collectives, flows. Default: all.",
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Leave out the largest training rows (faster).")
    ] = False,
    markdown_out: Annotated[
        bool,
        typer.Option("--markdown", help="Print the per-set tables as Markdown (VALIDATION.md)."),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Validate the cost model against the packaged published measurements."""
    from clustersim.calibration.report import markdown
    from clustersim.calibration.validate import SETS, print_results, progress_bar, run_validation

    sets = set_name or list(SETS)
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        raise _fail(f"unknown set {', '.join(unknown)} (have: {', '.join(SETS)})")
    from clustersim.spec import PlanError

    try:
        with progress_bar() as progress:
            results = run_validation(sets, quick=quick, progress=progress)
    except PlanError as exc:
        raise _fail(f"unusable measurements: {exc.render()}") from None
    except (KeyError, ValueError, TypeError, IndexError) as exc:  # a malformed data file
        raise _fail(
            f"unusable measurements: {type(exc).__name__}: {exc} (a malformed CSV row or "
            "column in the measurement files?)"
        ) from None
    if json_out:
        _print_json([r.to_dict() for r in results])
    elif markdown_out:
        typer.echo(markdown([r.to_dict() for r in results]))
    else:
        print_results(results)


@app.command(
    help="Fit the cost model's kernel, attention and communication parameters to the "
    "packaged measurements (Vidur kernel profiles, FlashAttention papers, collective "
    "benchmarks) and print the values and their fit errors per GPU generation. --write "
    "rewrites the packaged data files (clustersim/spec/calibration/*.yaml); --out DIR writes "
    "them to DIR. Exit code 2: unusable measurements."
)
def calibrate(
    generation: Annotated[
        list[str] | None,
        typer.Option("--generation", "-g", help="Generation to fit (repeatable; default all)."),
    ] = None,
    measurements: Annotated[
        Path | None,
        typer.Option(
            "--measurements",
            help="Folder of CSVs in the packaged formats "
            "(clustersim/calibration/measurements/README.md) to fit instead.",
        ),
    ] = None,
    write: Annotated[
        bool, typer.Option("--write", help="Rewrite the packaged data files.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the data files into this folder.")
    ] = None,
    end_to_end: Annotated[
        bool,
        typer.Option(
            "--end-to-end",
            help="Also fit the host-side kernel times (framework, launch, CUDA-graph launch) "
            "and the L2 re-read rate of per-query-head decode attention on the dense-training "
            "and serving rows (about a minute).",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Fit the calibration parameters and print (or write) them."""
    from clustersim.calibration.calibrate import apply_end_to_end, fit_end_to_end, print_results
    from clustersim.calibration.calibrate import calibrate as run_calibration
    from clustersim.calibration.calibrate import write as write_files
    from clustersim.spec import PlanError
    from clustersim.spec.calibration_data import reload

    if write and out is not None:
        raise _fail("--write and --out exclude each other")
    try:
        results = run_calibration(generation, measurements)
    except PlanError as exc:
        raise _fail(exc.render()) from None
    from clustersim.spec.outputs import OutputError

    try:
        paths = write_files(results, out) if write or out is not None else []
        if end_to_end:  # on the component fits just written (or the packaged ones)
            reload()
            apply_end_to_end(results, fit_end_to_end())
            paths = write_files(results, out) if write or out is not None else []
            reload()
    except OutputError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot write {exc.filename or out}: {exc.strerror or exc}") from None
    if json_out:
        _print_json(
            {"generations": [r.to_dict() for r in results], "written": [str(p) for p in paths]}
        )
    else:
        print_results(results)
    for path in paths:
        typer.echo(f"wrote {path}", err=True)


@app.command(
    help="Compare plans side by side: layout, memory, every metric, every target passed or "
    "failed, and the fields where the plans differ (e.g. a review's current vs required plan). "
    "Each plan is audited and simulated (with etp: 1 when only that makes its expert layout "
    "possible, as every verb does; --static: audit only). Exit code 0: no plan has an error; "
    "1: some plan needs modification (as `check` of it would say); 2: unusable input."
)
def compare(
    plan_files: Annotated[list[Path], typer.Argument(help="Two or more plan files.")],
    set_: SetOpt = None,
    json_out: JsonOpt = False,
    fmt: Annotated[
        CheckFormat, typer.Option("--format", "-f", help="table, markdown or json.")
    ] = CheckFormat.table,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the comparison to this file.")
    ] = None,
    static: Annotated[bool, typer.Option("--static", help="Audit only; do not simulate.")] = False,
    max_events: MaxEventsOpt = None,
) -> None:
    """Compare plans side by side."""
    from clustersim.cli_tables import ProgressBar
    from clustersim.explore.compare import compare as compare_plans

    if len(plan_files) < 2:
        raise _fail("compare needs at least two plan files")
    plans = [_load(path, set_) for path in plan_files]
    inputs = _inputs(plan_files, *plans)
    _check_output(output, inputs)
    if not static:
        _check_work(plans, max_events)
    with ProgressBar("simulating plans") as bar:
        result = compare_plans(plans, simulate=not static, progress=bar.update)
    if json_out:
        fmt = CheckFormat.json
    text = None
    if fmt is CheckFormat.json:
        text = _json_text(result.to_dict())
    elif fmt is CheckFormat.markdown or output is not None:
        text = result.markdown()
    if not _emit(text, output, inputs):
        from clustersim.cli_tables import print_compare

        print_compare(result)
    raise typer.Exit(code=result.exit_code)


@app.command(
    help="Find the capacity of a serving plan: the highest request rate "
    "(workload.requests.rate_per_s; a trace is scaled in time) at which its SLOs hold, i.e. at "
    "least --attain of the requests meet every per-request limit of `targets` "
    "(ttft_ms_p99_max, tpot_ms_p99_max, ttft_ms_max, tpot_ms_max, latency_ms_max) and the "
    "median targets (ttft_ms_p50_max, tpot_ms_p50_max) are met. Deterministic: doubling or "
    "halving to bracket it, then bisection to 2%, then a check that 1.1 x the capacity fails; "
    "a probe stops as soon as too many requests missed their limits. Prints the capacity, "
    "per GPU, the goodput there, the limiting SLO and the latency-vs-rate curve (--plot: a "
    "PNG). Exit code 0: a rate meets the SLOs; 1: even the lowest rate probed fails them; 2: "
    "unusable input (not a serving plan, no per-request SLO)."
)
def capacity(
    plan_file: PlanArg = None,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
    attain: Annotated[
        float,
        typer.Option(
            "--attain",
            help="Share of requests that must be good (meet every per-request limit).",
            min=0.5,
            max=1.0,
        ),
    ] = 0.99,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Draw the latency-vs-rate curve to this PNG."),
    ] = None,
    max_events: MaxEventsOpt = None,
) -> None:
    """Find the highest request rate at which a serving plan meets its SLOs."""
    from clustersim.cli_tables import ProgressBar
    from clustersim.engine.errors import EngineError
    from clustersim.explore.capacity import NoSlo, find_capacity, slo_limits

    plan = _load(plan_file, set_)
    if plan.workload.mode != "inference":
        raise _fail(
            f"workload.mode: {plan.workload.mode!r}: capacity needs a serving plan "
            "(workload.mode: inference)"
        )
    inputs = _inputs([plan_file], plan)
    _check_output(plot, inputs)
    if plot is not None:
        from clustersim.analyze.plots import PlotError, require_pyplot

        try:
            require_pyplot()
        except PlotError as exc:
            raise _fail(str(exc)) from None
    _check_work([plan], max_events)
    try:
        with ProgressBar("probing request rates") as bar:
            result = find_capacity(plan, attain, progress=bar.update)
    except NoSlo as exc:
        raise _fail(str(exc)) from None
    except (EngineError, ValueError) as exc:
        raise _fail(f"{plan.name}: cannot simulate: {exc}") from None
    if plot is not None:
        from clustersim.analyze.plots import PlotError, plot_capacity
        from clustersim.spec.outputs import OutputError

        limits = {**slo_limits(plan)}
        try:
            plot_capacity(
                f"{plan.name}: latency vs request rate",
                result.curve(),
                limits,
                result.capacity_req_per_s,
                plot,
            )
        except (PlotError, OutputError) as exc:
            raise _fail(str(exc)) from None
        except OSError as exc:
            raise _fail(f"cannot write {plot}: {exc.strerror or exc}") from None
        typer.echo(f"wrote {plot}", err=True)
    if json_out:
        _print_json(result.to_dict())
    else:
        from clustersim.cli_tables import print_capacity

        print_capacity(result)
    raise typer.Exit(code=0 if result.capacity_req_per_s is not None else 1)


class Objective(StrEnum):
    """Search objectives (training: throughput, latency, cost; serving: capacity, goodput)."""

    throughput = "throughput"
    latency = "latency"
    cost = "cost"
    capacity = "capacity"
    goodput = "goodput"


class ParetoAxis(StrEnum):
    """The second axis of the Pareto front (the first is throughput)."""

    auto = "auto"
    latency = "latency"
    memory = "memory"


class Backend(StrEnum):
    """Where search candidates are simulated."""

    local = "local"
    ray = "ray"


def _int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise _fail(f"{option}: expected positive integers separated by commas, got {text!r}")
    return values


def _str_list(text: str | None, option: str, valid: tuple[str, ...]) -> tuple[str, ...] | None:
    if text is None:
        return None
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [v for v in values if v not in valid]
    if bad or not values:
        raise _fail(f"{option}: {', '.join(bad) or repr(text)} is not one of {', '.join(valid)}")
    return values


def _search_table(
    plan, plan_file: Path | None, output: Path | None, backend: Backend
) -> tuple[Path, list[Any]]:
    """The Parquet table a search writes and the inputs it must never overwrite (checked
    here); the Ray backend must be installed before any candidate runs."""
    out = output or Path(f"{plan.name}-search.parquet")
    inputs = _inputs([plan_file], plan)
    _check_output(out, inputs)
    if backend is Backend.ray:
        from clustersim.explore.backends import BackendError, require_ray

        try:
            require_ray()
        except BackendError as exc:
            raise _fail(str(exc)) from None
    return out, inputs


@app.command(
    help="Search the parallel layouts of a plan on --gpus GPUs for the best by --objective "
    "(throughput, latency, or cost = GPUs x time / tokens), with the plan's targets as "
    "constraints: TP, PP, DP, EP, ETP, micro-batch size and count (keeping the plan's global "
    "batch where it divides), schedule (interleaved with valid virtual stages) and recompute. "
    "Candidates the auditor rejects (invalid, out of memory) are discarded before simulating; "
    "the rest are simulated in parallel (--workers) and ranked, with the Pareto front of "
    "throughput vs --pareto. Every candidate goes to a Parquet table (--output), rewritten as "
    "results arrive; --resume continues an interrupted search from it. Exit code 1: no "
    "candidate meets the targets; 2: unusable input."
)
def search(
    plan_file: PlanArg = None,
    gpus: Annotated[
        int | None, typer.Option("--gpus", "-g", help="GPUs to use (default: the plan's cluster).")
    ] = None,
    objective: Annotated[
        Objective | None,
        typer.Option(
            "--objective",
            help="Training: throughput (default), latency or cost. Serving: capacity (default; "
            "the highest request rate meeting the SLOs, per GPU) or goodput (per GPU at the "
            "plan's rate).",
        ),
    ] = None,
    set_: SetOpt = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-w", help="Parallel simulations (default: all cores).", min=1),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Parquet table of every candidate (default: <plan name>-search.parquet).",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip candidates already in --output.")
    ] = False,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            help="Simulate at most this many candidates now (the rest stay pending for --resume).",
            min=0,
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Override the plan's seed.")] = None,
    pareto: Annotated[
        ParetoAxis,
        typer.Option(
            "--pareto",
            help="Pareto front of throughput vs latency or "
            "memory (auto: memory in training, latency in serving).",
        ),
    ] = ParetoAxis.auto,
    tp: Annotated[str | None, typer.Option("--tp", help="TP values, e.g. 1,2,4.")] = None,
    pp: Annotated[str | None, typer.Option("--pp", help="PP values.")] = None,
    ep: Annotated[str | None, typer.Option("--ep", help="EP values.")] = None,
    mbs: Annotated[str | None, typer.Option("--mbs", help="Micro-batch sizes.")] = None,
    schedules: Annotated[
        str | None,
        typer.Option(
            "--schedules",
            help="gpipe,1f1b,interleaved,dualpipe (default 1f1b,interleaved; dualpipe only "
            "where pp is even and the micro-batches even and >= 2 x pp).",
        ),
    ] = None,
    recompute: Annotated[
        str | None, typer.Option("--recompute", help="none,selective,full (default: all).")
    ] = None,
    all_recompute: Annotated[
        bool,
        typer.Option(
            "--all-recompute",
            help="Simulate heavier recompute levels even when a lighter one fits.",
        ),
    ] = False,
    top: Annotated[int, typer.Option("--top", help="Rows of the ranking to print.")] = 10,
    max_batch_size: Annotated[
        str | None,
        typer.Option("--max-batch-size", help="Serving: max_batch_size values, e.g. 64,256."),
    ] = None,
    max_batched_tokens: Annotated[
        str | None,
        typer.Option(
            "--max-batched-tokens", help="Serving: max_num_batched_tokens values, e.g. 2048,8192."
        ),
    ] = None,
    chunked: Annotated[
        str | None,
        typer.Option("--chunked", help="Serving: chunked_prefill values (default true,false)."),
    ] = None,
    attain: Annotated[
        float,
        typer.Option(
            "--attain", help="Serving: share of requests that must be good.", min=0.5, max=1.0
        ),
    ] = 0.99,
    prefill_gpus: Annotated[
        str | None,
        typer.Option(
            "--prefill-gpus",
            help="Serving, disaggregated plans (parallel.prefill + parallel.decode): GPUs of "
            "the prefill pool to try, the decode pool getting the rest, e.g. 2,4,6 (default: "
            "every eighth of the GPUs).",
        ),
    ] = None,
    backend: Annotated[
        Backend,
        typer.Option("--backend", help="local (process pool) or ray (needs the ray extra)."),
    ] = Backend.local,
    json_out: JsonOpt = False,
) -> None:
    """Search for the best parallel layout of a plan."""
    from concurrent.futures.process import BrokenProcessPool

    from clustersim.cli_tables import ProgressBar
    from clustersim.explore.backends import BackendError
    from clustersim.explore.search import SearchError, SearchSpace
    from clustersim.explore.search import search as run_search
    from clustersim.spec.outputs import OutputError

    if gpus is not None and not 1 <= gpus <= MAX_GPUS:
        raise _fail(f"--gpus: expected 1 to {MAX_GPUS:,} GPUs, got {gpus}")
    if seed is not None and not 0 <= seed < 2**32:
        raise _fail(f"--seed: expected 0 to {2**32 - 1}, got {seed}")
    plan = _load(plan_file, set_)
    n = gpus or plan.hardware.num_gpus
    serving = plan.workload.mode == "inference"
    if objective is None:
        objective = Objective.capacity if serving else Objective.throughput
    serving_objectives = (Objective.capacity, Objective.goodput)
    if serving != (objective in serving_objectives):
        valid = "capacity or goodput" if serving else "throughput, latency or cost"
        kind = "a serving" if serving else "a training"
        raise _fail(f"--objective {objective.value}: {kind} plan is searched by {valid}")
    if prefill_gpus is not None and not plan.parallel.disaggregated:
        raise _fail("--prefill-gpus: the plan is not disaggregated (set parallel.prefill and "
                    "parallel.decode)")  # fmt: skip
    if serving:
        _search_serving(plan, plan_file, n, objective.value, tp, pp, ep, max_batch_size,
                        max_batched_tokens, chunked, attain, workers, limit, seed, backend,
                        output, resume, top, json_out, prefill_gpus)  # fmt: skip
    space = SearchSpace(
        gpus=n,
        tp=_int_list(tp, "--tp"),
        pp=_int_list(pp, "--pp"),
        ep=_int_list(ep, "--ep"),
        micro_batch_size=_int_list(mbs, "--mbs"),
        schedules=_str_list(schedules, "--schedules", ("gpipe", "1f1b", "interleaved", "dualpipe"))
        or ("1f1b", "interleaved"),
        recompute=_str_list(recompute, "--recompute", ("none", "selective", "full"))
        or ("none", "selective", "full"),
        prune_recompute=not all_recompute,
    )
    out, inputs = _search_table(plan, plan_file, output, backend)
    try:
        with ProgressBar("simulating candidates", delay_s=0.5) as bar:
            result = run_search(
                plan,
                n,
                objective.value,
                space=space,
                workers=workers,
                out=out,
                resume=resume,
                limit=limit,
                seed=seed,
                pareto_axis=pareto.value,
                backend=backend.value,
                progress=lambda done, total: bar.update(done / max(total, 1)),
                inputs=inputs,
            )
    except (SearchError, BackendError, OutputError) as exc:
        raise _fail(str(exc)) from None
    except BrokenProcessPool:
        typer.echo(
            "error: a search worker died (killed, or out of memory); results so far are in "
            f"{out}; continue with --resume (fewer --workers if memory is short)",
            err=True,
        )
        raise typer.Exit(code=3) from None
    except (KeyboardInterrupt, Terminated) as exc:
        typer.echo(f"interrupted: results so far are in {out}; continue with --resume", err=True)
        raise typer.Exit(code=143 if isinstance(exc, Terminated) else 130) from None
    except OSError as exc:
        raise _fail(f"cannot write {out}: {exc.strerror or exc}") from None
    if json_out:
        _print_json(result.to_dict(top))
    else:
        from clustersim.cli_tables import print_search

        print_search(result, top)
    raise typer.Exit(code=0 if result.best() is not None or not result.complete else 1)


def _search_serving(plan, plan_file, n, objective, tp, pp, ep, max_batch_size,
                    max_batched_tokens, chunked, attain, workers, limit, seed, backend,
                    output, resume, top, json_out, prefill_gpus=None) -> None:  # fmt: skip
    """``search`` of a serving plan (:mod:`clustersim.explore.serving_search`)."""
    from concurrent.futures.process import BrokenProcessPool

    from clustersim.cli_tables import ProgressBar, print_serving_search
    from clustersim.explore.backends import BackendError
    from clustersim.explore.search import SearchError
    from clustersim.explore.serving_search import ServingSpace, serving_search
    from clustersim.spec.outputs import OutputError

    flags = _str_list(chunked, "--chunked", ("true", "false"))
    space = ServingSpace(
        gpus=n,
        tp=_int_list(tp, "--tp"),
        pp=_int_list(pp, "--pp"),
        ep=_int_list(ep, "--ep"),
        max_batch_size=_int_list(max_batch_size, "--max-batch-size"),
        max_num_batched_tokens=_int_list(max_batched_tokens, "--max-batched-tokens"),
        chunked_prefill=tuple(f == "true" for f in flags) if flags else (True, False),
        prefill_gpus=_int_list(prefill_gpus, "--prefill-gpus"),
    )
    out, inputs = _search_table(plan, plan_file, output, backend)
    try:
        with ProgressBar("finding each deployment's capacity", delay_s=0.5) as bar:
            result = serving_search(
                plan,
                n,
                objective,
                attain=attain,
                space=space,
                workers=workers,
                limit=limit,
                seed=seed,
                backend=backend.value,
                progress=lambda done, total: bar.update(done / max(total, 1)),
                out=out,
                resume=resume,
                inputs=inputs,
            )
    except (SearchError, BackendError, OutputError) as exc:
        raise _fail(str(exc)) from None
    except BrokenProcessPool:
        typer.echo(
            "error: a search worker died (killed, or out of memory); results so far are in "
            f"{out}; continue with --resume (fewer --workers if memory is short)",
            err=True,
        )
        raise typer.Exit(code=3) from None
    except (KeyboardInterrupt, Terminated) as exc:
        typer.echo(f"interrupted: results so far are in {out}; continue with --resume", err=True)
        raise typer.Exit(code=143 if isinstance(exc, Terminated) else 130) from None
    except OSError as exc:
        raise _fail(f"cannot write {out}: {exc.strerror or exc}") from None
    if json_out:
        data = result.to_dict(top)
        data["table"] = str(out)
        _print_json(data)
    else:
        print_serving_search(result, top, out)
    raise typer.Exit(code=0 if result.best() is not None else 1)


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
    from clustersim.audit.markdown import MAX_GPU_ROWS, gpu_rows, group_rows, stage_rows
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


class Terminated(BaseException):  # noqa: N818 - named after the signal, like KeyboardInterrupt
    """Raised in the main thread on SIGTERM, so that the cleanup Ctrl-C runs (temporary output
    files removed, search workers ended) runs too."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _debugging() -> bool:
    return _debug or os.environ.get("CLUSTERSIM_DEBUG", "") not in ("", "0")


def main() -> None:
    """Console-script entry point: the one error boundary (see the module docstring)."""
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 terminal never crashes a print
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors="backslashreplace")
    with contextlib.suppress(ValueError):  # ValueError: not the main thread
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except SystemExit:
        raise
    except Terminated:
        typer.echo("terminated", err=True)
        sys.exit(143)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the boundary: a bug is exit 3, never 1
        if _debugging():
            import traceback

            traceback.print_exc()
        message = " ".join(str(exc).split())[:500]
        typer.echo(
            f"internal error: {type(exc).__name__}: {message} "
            "(please report; rerun with --debug for the traceback)",
            err=True,
        )
        sys.exit(3)


if __name__ == "__main__":
    main()

"""`clustersim analyze`: the numbers equal what `run` computed, the critical path explains the
iteration, exports (Perfetto JSON, plots) are well formed, and a documented polars / DuckDB
query on the raw file reproduces an analyze figure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clustersim.analyze import analyze
from clustersim.cli import app
from clustersim.run.simulate import simulate
from clustersim.spec import load_plan

PLANS = {
    "default": [],
    "symmetric": ["model.moe.routing=even", "workload.seq_len={dist: fixed, value: 1024}"],
    "dense-gpipe": ["model.moe=null", "parallel.schedule=gpipe"],
    "interleaved": ["parallel.schedule=interleaved", "parallel.virtual_stages=2"],
    "no-overlap": ["parallel.overlap_communication=false", "parallel.tp=1", "parallel.dp=8"],
}


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """name -> (run report, trace path) for every plan in PLANS."""
    root = tmp_path_factory.mktemp("traces")
    out = {}
    for name, overrides in PLANS.items():
        path = root / f"{name}.arrow"
        out[name] = (simulate(load_plan(None, overrides), trace=path), path)
    return out


def test_tracing_does_not_change_the_run(traced):
    plain = simulate(load_plan(None))
    assert plain.metrics == traced["default"][0].metrics
    assert plain.breakdown == traced["default"][0].breakdown


@pytest.mark.parametrize("name", list(PLANS))
def test_analyze_equals_run(traced, name):
    run, path = traced[name]
    result = analyze(path)
    assert result.events == run.events
    for key, value in run.metrics.items():
        if value is None:
            assert result.metrics[key] is None, key
        else:
            assert result.metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert result.breakdown.keys() == run.breakdown.keys()
    for op, ms in run.breakdown.items():
        assert result.breakdown[op] == pytest.approx(ms, rel=1e-9)
    assert len(result.expert_load) == len(run.expert_load)
    for mine, theirs in zip(result.expert_load, run.expert_load, strict=True):
        assert mine == pytest.approx(theirs, rel=1e-9)


def _rewrite_unsorted(src: Path, dst: Path, rows_per_batch: int = 700) -> None:
    """``src`` again as another writer might write it: event batches out of time order inside
    (every other one reversed), overlapping in time, and one batch that mixes event rows with
    workload/routing rows."""
    import pyarrow as pa

    from clustersim.trace.reader import TraceReader
    from clustersim.trace.writer import TraceWriter

    with TraceReader(src) as reader:
        meta = reader._reader.schema.metadata
        table = pa.Table.from_batches([reader.batch(b) for b in range(reader.num_batches)])
        summary = reader.summary
    kind = table.column("kind").combine_chunks().indices.to_numpy()
    events = table.filter(pa.array(kind <= 2))
    others = table.filter(pa.array(kind > 2)).combine_chunks().to_batches()[0]
    rng = np.random.default_rng(7)
    jitter = rng.normal(0.0, 2e-3, events.num_rows)
    order = np.argsort(events.column("start_s").to_numpy() + jitter, kind="stable")
    with TraceWriter(dst, meta) as writer:
        for b, lo in enumerate(range(0, len(order), rows_per_batch)):
            part = order[lo : lo + rows_per_batch]
            batch = events.take(pa.array(part[::-1] if b % 2 else part)).combine_chunks()
            batch = batch.to_batches()[0]
            min_start = float(np.min(batch.column("start_s").to_numpy()))
            if b == 3:
                batch = pa.Table.from_batches([batch.slice(0, 100), others, batch.slice(100)])
                batch = batch.combine_chunks().to_batches()[0]
            writer._write_batch(batch, min_start)
        for row in summary.slice(0, summary.num_rows - 1).to_pylist():  # not the batch index
            writer.add_row(
                "summary",
                row["op"],
                start_s=row["start_s"],
                end_s=row["end_s"],
                values=row["values"],
            )


def test_unsorted_overlapping_batches(traced, tmp_path):
    """A trace whose batches are neither sorted nor in time order gives the same analysis: the
    reader sorts the batches and merges the runs that interleave."""
    run, path = traced["default"]
    other = tmp_path / "unsorted.arrow"
    _rewrite_unsorted(path, other)
    mine, ref = analyze(other), analyze(path)
    assert mine.events == ref.events == run.events
    assert mine.rows == ref.rows
    for key, value in ref.metrics.items():
        expected = value if value is None else pytest.approx(value, rel=1e-9, abs=1e-12)
        assert mine.metrics[key] == expected, key
    assert mine.critical_path["length_ms"] == pytest.approx(ref.critical_path["length_ms"])
    assert mine.critical_path["compute_ms"] == pytest.approx(ref.critical_path["compute_ms"])
    assert mine.expert_load == ref.expert_load
    assert [g["compute_ms"] for g in mine.gpus] == pytest.approx(
        [g["compute_ms"] for g in ref.gpus]
    )


@pytest.mark.parametrize("name", list(PLANS))
def test_critical_path_explains_the_iteration(traced, name):
    """The path ends when the iteration ends; its parts add up to it; every wait is explained
    by a dependency the engine has (no unexplained gaps on engine traces)."""
    run, path = traced[name]
    cp = analyze(path).critical_path
    wall = run.metrics["iteration_time_ms"]
    assert cp["length_ms"] == pytest.approx(wall, rel=1e-12)
    assert sum(cp["by_op_ms"].values()) + cp["wait_ms"] == pytest.approx(wall, rel=1e-9)
    assert cp["wait_ms"] < 1e-6 * wall
    assert cp["compute_ms"] + cp["comm_ms"] == pytest.approx(wall, rel=1e-9)
    assert not cp["approximate"]
    assert "optimizer" in cp["by_op_ms"]  # the iteration ends with the optimizer step


def test_per_gpu_rows_cover_every_gpu(traced):
    for name in ("default", "symmetric"):
        run, path = traced[name]
        result = analyze(path)
        plan = run.audit.plan
        assert [g["gpu"] for g in result.gpus] == list(range(plan.parallel.world_size))
        util = np.mean([g["utilization_pct"] for g in result.gpus])
        assert util == pytest.approx(run.metrics["gpu_utilization_pct"], rel=1e-9)
        exposed = np.mean([g["exposed_comm_ms"] for g in result.gpus])
        wall = run.metrics["iteration_time_ms"]
        assert 100 * exposed / wall == pytest.approx(run.metrics["comm_overhead_pct"], rel=1e-9)
    mirrored = [g for g in analyze(traced["symmetric"][1]).gpus if g["mirrors"] is not None]
    assert mirrored  # replica-symmetric: replicas > 0 mirror replica 0


def test_communication_tables(traced):
    run, path = traced["default"]
    result = analyze(path)
    ops = {row["op"]: row for row in result.comm_by_op}
    assert ops["a2a_dispatch"]["group_kind"] == "ep" and ops["tp_comm"]["group_kind"] == "tp"
    for op, row in ops.items():
        assert row["per_gpu_ms"] == pytest.approx(run.breakdown[op], rel=1e-9)
        by_group = sum(g["total_ms"] for g in result.comm_by_group if g["op"] == op)
        assert by_group == pytest.approx(row["total_ms"], rel=1e-9)


def test_polars_query_reproduces_comm_to_compute(traced):
    """The polars query of docs/trace-format.md."""
    pl = pytest.importorskip("polars")
    run, path = traced["default"]
    duration = pl.col("end_s") - pl.col("start_s")
    query = (
        pl.scan_ipc(path)
        .filter(pl.col("kind").is_in(["compute", "comm", "comm_async"]))
        .select(
            (
                100
                * duration.filter(pl.col("kind") != "compute").sum()
                / duration.filter(pl.col("kind") == "compute").sum()
            ).alias("pct")
        )
    )
    value = query.collect()["pct"][0]
    assert value == pytest.approx(analyze(path).metrics["comm_to_compute_pct"], rel=1e-9)
    assert value == pytest.approx(run.metrics["comm_to_compute_pct"], rel=1e-9)


def test_duckdb_query_reproduces_comm_to_compute(traced):
    """The DuckDB SQL of docs/trace-format.md."""
    duckdb = pytest.importorskip("duckdb")
    import pyarrow as pa

    run, path = traced["default"]
    trace = pa.ipc.open_file(str(path)).read_all()  # noqa: F841 (DuckDB reads it by name)
    ((value,),) = duckdb.sql(
        "SELECT 100 * SUM(end_s - start_s) FILTER (WHERE kind IN ('comm', 'comm_async'))"
        " / SUM(end_s - start_s) FILTER (WHERE kind = 'compute') FROM trace"
    ).fetchall()
    assert value == pytest.approx(run.metrics["comm_to_compute_pct"], rel=1e-9)


def test_perfetto_export(traced, tmp_path):
    from clustersim.analyze.perfetto import export_perfetto

    run, path = traced["default"]
    out = tmp_path / "p.json"
    count = export_perfetto(path, out)
    data = json.loads(out.read_text())
    events = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert len(events) == count == run.events * run.audit.plan.parallel.tp
    names = {e["args"]["name"] for e in data["traceEvents"] if e["name"] == "process_name"}
    assert names == {"node 0", "node 1"}
    # every track nests: no two events on one (pid, tid) overlap
    tracks: dict = {}
    for e in events:
        tracks.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    for spans in tracks.values():
        spans.sort()
        ends = np.array([b for _, b in spans[:-1]])
        starts = np.array([a for a, _ in spans[1:]])
        assert (starts >= ends - 1e-6).all()
    windowed = export_perfetto(path, out, (0.0, 10.0))
    assert 0 < windowed < count


def test_plot(traced, tmp_path):
    pytest.importorskip("matplotlib")
    from clustersim.analyze.plots import plot_analysis

    _, path = traced["default"]
    result = analyze(path, window_ms=(0.0, 50.0))
    assert result.window_rows is not None
    assert (result.window_rows["start_s"] < 0.05).all()
    out = plot_analysis(result, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_analyze(traced, tmp_path):
    run, path = traced["default"]
    runner = CliRunner()
    result = runner.invoke(app, ["analyze", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["metrics"]["iteration_time_ms"] == pytest.approx(
        run.metrics["iteration_time_ms"], rel=1e-12
    )
    assert {"communication", "critical_path", "gpus", "expert_load_by_layer"} <= set(data)
    table = runner.invoke(app, ["analyze", str(path)])
    assert table.exit_code == 0 and "critical path" in table.output
    png, js = tmp_path / "a.png", tmp_path / "a.json"
    both = runner.invoke(
        app, ["analyze", str(path), "--plot", str(png), "--perfetto", str(js), "--window", "0:25"]
    )
    assert both.exit_code == 0, both.output
    assert png.exists() and js.exists()
    whole = tmp_path / "whole.png"  # no --window: the whole iteration
    plain = runner.invoke(app, ["analyze", str(path), "--plot", str(whole)])
    assert plain.exit_code == 0, plain.output
    assert whole.stat().st_size > 0
    bad = runner.invoke(app, ["analyze", str(path), "--plot", str(png), "--window", "5"])
    assert bad.exit_code == 2 and "START_MS:END_MS" in bad.output


def test_cli_run_trace_default_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "--trace", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    path = Path(data["simulation"]["trace"]["path"])
    assert path == tmp_path / "traces" / "mixtral-8x7b-train-h100x16-seed0.arrow"
    assert path.exists() and data["simulation"]["trace"]["bytes"] == path.stat().st_size

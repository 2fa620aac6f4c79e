"""clustersim compare: side by side on a seed's current / required pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clustersim.cli import app
from clustersim.explore.compare import compare, plan_differences
from clustersim.spec import load_plan

SEEDS = Path(__file__).resolve().parent.parent / "configs" / "seeds"


@pytest.fixture(scope="module")
def seed001():
    plans = [load_plan(SEEDS / "001_current.yaml"), load_plan(SEEDS / "001_required.yaml")]
    return plans, compare(plans)


def test_differences_name_the_changed_fields(seed001):
    plans, result = seed001
    fields = {d["field"]: d["values"] for d in result.differences}
    assert fields["parallel.tp"] == [3, 4]
    assert fields["parallel.pp"] == [1, 4]
    assert "model.num_layers" not in fields
    assert plan_differences([plans[0], plans[0]]) == []


def test_every_metric_and_target(seed001):
    _plans, result = seed001
    cur, req = result.results
    assert cur.metrics is not None and req.metrics is not None
    sections = dict(result.sections())
    metric_rows = {row[0] for row in sections["metrics"]}
    assert {"latency_ms", "throughput_tokens_per_ms", "bubble_pct"} <= metric_rows
    # 001_required sets a 32 GiB memory target; 001_current sets none
    assert set(req.targets()) == {"memory_per_gpu_gib_max"}
    assert req.targets()["memory_per_gpu_gib_max"]["passed"] is True
    assert cur.targets() == {}
    layout = {row[0]: row[1:] for row in sections["layout"]}
    assert layout["world_size"] == [3, 16]
    deltas = {(d["metric"], d["plan"]) for d in result.metric_differences()}
    assert ("latency_ms", "seed001-required") in deltas


def test_unsimulatable_plan_keeps_null_metrics_or_is_repaired():
    plans = [load_plan(SEEDS / "002_current.yaml"), load_plan(SEEDS / "002_required.yaml")]
    result = compare(plans, simulate=False)
    assert all(r.metrics is None for r in result.results)
    assert "not simulated" in result.results[0].note
    assert result.results[0].errors > 0


def test_cli_compare_table_markdown_json():
    paths = [str(SEEDS / "001_current.yaml"), str(SEEDS / "001_required.yaml")]
    runner = CliRunner()
    table = runner.invoke(app, ["compare", *paths])
    assert table.exit_code == 1, table.output  # both plans have errors, as check says
    assert "seed001-current" in table.stdout and "targets" in table.stdout
    md = runner.invoke(app, ["compare", *paths, "--format", "markdown"])
    assert md.stdout.startswith("# Comparison: seed001-current, seed001-required")
    assert "| parallel.tp | 3 | 4 |" in md.stdout
    js = runner.invoke(app, ["compare", *paths, "--json"])
    data = json.loads(js.stdout)
    assert data["plans"] == ["seed001-current", "seed001-required"]
    assert len(data["results"]) == 2 and data["differences"]
    one = runner.invoke(app, ["compare", paths[0]])
    assert one.exit_code == 2

"""The command line: exit codes, formats, bad input without tracebacks, lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clustersim.cli import app

runner = CliRunner()
SEEDS = Path(__file__).resolve().parent.parent / "configs" / "seeds"
CONTRACT = {
    "layout": {
        "world_size",
        "cluster_gpus",
        "layers_per_stage",
        "experts_per_gpu",
        "experts_per_gpu_per_layer",
        "ep_groups",
        "edp",
    },
    "memory": {
        "memory_per_gpu_gib",
        "params_gib",
        "grads_gib",
        "optimizer_gib",
        "activations_gib",
        "kv_cache_gib",
        "buffers_gib",
        "fits",
    },
    "metrics": {
        "iteration_time_ms",
        "latency_ms",
        "latency_ms_p99",
        "ttft_ms_p50",
        "ttft_ms_p99",
        "tpot_ms_p50",
        "throughput_tokens_per_ms",
        "throughput_tokens_per_s",
        "mfu_pct",
        "comm_overhead_pct",
        "comm_to_compute_pct",
        "bubble_pct",
        "gpu_utilization_pct",
        "load_balance_pct",
        "dropped_tokens_pct",
    },
}


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_check_default_plan_is_clean():
    result = invoke("check")
    assert result.exit_code == 0, result.output
    assert "no findings" in result.output


def test_check_json_follows_contract():
    result = invoke("check", "--json")
    data = json.loads(result.stdout)
    for section, keys in CONTRACT.items():
        assert keys <= set(data[section]), section
    # check simulates like run: the same metrics, findings and exit code (issue 12)
    assert data["metrics"]["iteration_time_ms"] > 0 and data["exit_code"] == 0
    assert any(a["field"] == "hardware.calibration" for a in data["assumptions"])
    assert data["layout"]["world_size"] == 2 * 2 * 4
    assert data["findings"] == []


def test_check_exit_1_and_markdown_document(tmp_path):
    out = tmp_path / "review.md"
    plan = str(SEEDS / "002_current.yaml")
    result = invoke("check", plan, "--format", "markdown", "-o", str(out))
    assert result.exit_code == 1
    text = out.read_text()
    assert text.startswith("# Nodes that need modification")
    assert "`claims.total_gpus`" in text and "needs 32 GPUs" in text


def test_check_json_findings_have_contract_fields():
    result = invoke("check", str(SEEDS / "003_current.yaml"), "--json")
    assert result.exit_code == 1
    findings = json.loads(result.stdout)["findings"]
    assert findings and all(
        set(f) == {"node", "severity", "claimed", "computed", "message", "fix"} for f in findings
    )


def test_set_override_changes_verdict():
    # 5 pipeline stages cannot split 32 layers, and 2 x 5 x 4 = 40 GPUs exceed 16.
    result = invoke("check", "--set", "parallel.pp=5", "--json")
    nodes = {f["node"] for f in json.loads(result.stdout)["findings"]}
    assert result.exit_code == 1 and {"parallel", "parallel.pp"} <= nodes


@pytest.mark.parametrize(
    ("content", "suffix", "expect"),
    [
        ("parallel: [1, 2", ".yaml", "malformed YAML"),
        ('{"parallel": }', ".json", "malformed JSON"),
        (
            "model: {preset: mixtral-8x7b}\nhardware: {gpu: H100-SXM, num_nodes: 1, "
            "gpus_per_node: 8}\nparallel: {tp: 0, pp: 1, dp: 1}\n",
            ".yaml",
            "parallel.tp",
        ),
        (
            "model: {preset: mixtral-8x7b}\nhardware: {gpu: H100-SXM, num_nodes: 1, "
            "gpus_per_node: 8}\nparallel: {tp: 1, pp: 1, dp: 8, tensor_paralel: 2}\n",
            ".yaml",
            "did you mean",
        ),
    ],
)
def test_bad_input_exits_2_with_one_message(tmp_path, content, suffix, expect):
    path = tmp_path / f"plan{suffix}"
    path.write_text(content)
    result = invoke("check", str(path))
    assert result.exit_code == 2
    assert expect in result.output and str(path) in result.output
    assert "Traceback" not in result.output


def test_missing_file_and_directory(tmp_path):
    for target, phrase in ((tmp_path / "nope.yaml", "file not found"), (tmp_path, "directory")):
        result = invoke("plan", "show", str(target))
        assert result.exit_code == 2 and phrase in result.output


def test_plan_show_resolves_presets():
    result = invoke("plan", "show", "--json")
    data = json.loads(result.stdout)
    # Mixtral-8x7B preset: 32 layers, 8 experts; H100 preset: 989 TFLOP/s.
    assert data["model"]["num_layers"] == 32 and data["model"]["moe"]["num_experts"] == 8
    assert data["hardware"]["peak_tflops"] == 989
    assert data["parallel"]["etp"] == 1


def test_plan_schema_is_json_schema():
    data = json.loads(invoke("plan", "schema").stdout)
    assert data["type"] == "object" and {"model", "hardware", "parallel"} <= set(data["required"])


def test_layout_small_lists_every_gpu_and_large_is_summarised():
    small = json.loads(invoke("plan", "layout", "--json").stdout)
    assert [g["gpu"] for g in small["gpus"]] == list(range(16))
    # 1024 GPUs: 128 nodes of 8, TP 8 x PP 8 x DP 16 -> summarised per stage.
    big = invoke(
        "plan",
        "layout",
        "--set",
        "hardware.num_nodes=128",
        "--set",
        "parallel.tp=8",
        "--set",
        "parallel.pp=8",
        "--set",
        "parallel.dp=16",
        "--set",
        "parallel.ep=8",
    )
    assert big.exit_code == 0, big.output
    assert "Pipeline stages" in big.output and "896-1023" in big.output
    assert len(big.output.splitlines()) < 60


def test_help_starts_without_heavy_imports():
    """`clustersim --help` must not import numba, simpy or pyarrow (fast start)."""
    code = (
        "import sys; from clustersim.cli import app; "
        "heavy = [m for m in ('numba', 'simpy', 'pyarrow') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_serving_trace_run_analyze_replay(tmp_path):
    """A serving run writes a trace; analyze gives its metrics back; replay re-serves it."""
    plan = str(SEEDS / "004_current.yaml")
    trace = tmp_path / "serve.arrow"
    run = invoke(
        "run", plan, "--trace-file", str(trace), "--json", "--set", "workload.requests.num=100"
    )
    assert trace.is_file() and run.exit_code in (0, 1), run.output
    ran = json.loads(run.stdout)["metrics"]
    analysed = json.loads(invoke("analyze", str(trace), "--json").stdout)["metrics"]
    assert analysed["ttft_ms_p50"] == ran["ttft_ms_p50"]
    assert analysed["throughput_tokens_per_ms"] == ran["throughput_tokens_per_ms"]
    replayed = invoke("replay", str(trace), "--json")
    assert replayed.exit_code in (0, 1), replayed.output
    png, perfetto = tmp_path / "x.png", tmp_path / "x.json"
    exported = invoke("analyze", str(trace), "--plot", str(png), "--perfetto", str(perfetto))
    assert exported.exit_code == 0, exported.output
    assert png.stat().st_size > 10_000
    events = json.loads(perfetto.read_text())["traceEvents"]
    assert {"prefill", "decode", "requests"} <= {e["name"] for e in events}
    refused = invoke("replay", str(trace), "--set", "workload.requests.rate_per_s=99")
    assert refused.exit_code == 2 and "Traceback" not in refused.output

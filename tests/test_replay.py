"""`clustersim replay`: the recorded workload simulated again, exactly; what-ifs; refusals."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from clustersim.cli import app
from clustersim.run.replay import ReplayError, recorded_plan, replay
from clustersim.run.simulate import simulate
from clustersim.spec import load_plan

PLANS = {
    "sampled": [],
    "symmetric": ["model.moe.routing=even", "workload.seq_len={dist: fixed, value: 1024}"],
    "dense": ["model.moe=null"],
    "skewed-capacity": ["model.moe.router_skew=0.6", "parallel.tp=1", "parallel.dp=8"],
    # every layer routed on two stages (each its own copy of the layer)
    "dualpipe": ["parallel.schedule=dualpipe", "parallel.overlap_ep_comm=true"],
}
COMM_OPS = (
    "tp_comm",
    "a2a_dispatch",
    "a2a_combine",
    "etp_comm",
    "p2p_send",
    "grad_reduce",
    "expert_grad_reduce",
    "param_gather",
)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    out = {}
    for name, overrides in PLANS.items():
        path = root / f"{name}.arrow"
        out[name] = (simulate(load_plan(None, overrides), trace=path), path, overrides)
    return out


@pytest.mark.parametrize("name", list(PLANS))
def test_replay_same_plan_is_exact(traced, name):
    run, path, _ = traced[name]
    again = replay(path)
    assert again.changes == []
    assert again.report.metrics == run.metrics  # exactly, not approximately
    assert again.report.breakdown == run.breakdown
    assert again.report.expert_load == run.expert_load
    assert again.recorded_metrics["iteration_time_ms"] == pytest.approx(
        run.metrics["iteration_time_ms"], rel=1e-12
    )


def _comm_ms(report) -> float:
    return sum(v for k, v in report.breakdown.items() if k in COMM_OPS)


@pytest.mark.parametrize("name", ["sampled", "symmetric", "skewed-capacity"])
def test_more_inter_node_bandwidth_never_increases_communication(traced, name):
    run, path, _ = traced[name]
    previous = _comm_ms(run)
    for factor in (1.25, 2, 4, 16):
        bw = run.audit.plan.hardware.inter_node.bandwidth_gbps * factor
        plan = recorded_plan(path, [f"hardware.inter_node.bandwidth_gbps={bw}"])
        result = replay(path, plan)
        assert [c["field"] for c in result.changes] == ["hardware.inter_node.bandwidth_gbps"]
        comm = _comm_ms(result.report)
        assert comm <= previous * (1 + 1e-12)
        assert result.report.metrics["iteration_time_ms"] <= run.metrics["iteration_time_ms"]
        previous = comm
    assert previous < _comm_ms(run)


def test_replay_under_more_pipeline_stages(traced):
    """Routes are kept per EP group within its stage, so PP may change: same tokens, same
    routing, shorter per-stage work."""
    run, path, _ = traced["sampled"]
    result = replay(path, recorded_plan(path, ["parallel.pp=4", "hardware.num_nodes=4"]))
    assert result.report.metrics["throughput_tokens_per_ms"] > 0
    assert result.report.metrics["load_balance_pct"] == pytest.approx(
        run.metrics["load_balance_pct"], rel=1e-12
    )  # the same routing outcomes
    assert result.report.metrics["dropped_tokens_pct"] == run.metrics["dropped_tokens_pct"]


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.moe.num_experts=16", "model.moe.num_experts"),
        ("model.num_layers=16", "model.num_layers"),
        ("parallel.dp=8", "parallel.dp"),
        ("parallel.num_microbatches=4", "parallel.num_microbatches"),
        ("parallel.micro_batch_size=2", "parallel.micro_batch_size"),
        ("parallel.ep=4", "parallel.ep"),
        ("parallel.tp=4", "parallel.tp"),
        ("model.moe.router_skew=0.5", "model.moe.router_skew"),
        ("seed=3", "seed"),
        ("workload.seq_len={dist: fixed, value: 512}", "workload.seq_len"),
    ],
)
def test_meaningless_changes_are_refused(traced, override, field):
    _, path, _ = traced["sampled"]
    with pytest.raises(ReplayError) as info:
        replay(path, recorded_plan(path, [override]))
    message = str(info.value)
    assert field in message and "\n" not in message and str(path) in message


def test_cli_replay(traced, tmp_path, write_plan):
    run, path, _ = traced["sampled"]
    runner = CliRunner()
    out = runner.invoke(app, ["replay", str(path), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["metrics"] == json.loads(json.dumps(run.metrics))
    assert data["replay"]["changes"] == []
    faster = runner.invoke(
        app, ["replay", str(path), "--set", "hardware.inter_node.bandwidth_gbps=200"]
    )
    assert faster.exit_code == 0 and "recorded" in faster.output and "replayed" in faster.output
    refused = runner.invoke(app, ["replay", str(path), "--set", "model.moe.num_experts=16"])
    assert refused.exit_code == 2
    assert refused.output.startswith("error: cannot replay") and "Traceback" not in refused.output
    bad_set = runner.invoke(app, ["replay", str(path), "--set", "parallel.tp=three"])
    assert bad_set.exit_code == 2 and "parallel.tp" in bad_set.output
    # --plan: a plan file replaces the recorded plan
    plan_file = write_plan(run.audit.plan.model_dump(mode="json"))
    same = runner.invoke(app, ["replay", str(path), "--plan", str(plan_file), "--json"])
    assert same.exit_code == 0, same.output
    assert json.loads(same.stdout)["metrics"] == data["metrics"]

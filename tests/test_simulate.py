"""Targets and simulated claims: judged against the simulated metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from clustersim.audit.judge import judge
from clustersim.engine.errors import EngineError
from clustersim.run.evaluate import evaluate
from clustersim.run.simulate import simulate
from clustersim.spec import load_plan

SEEDS = Path(__file__).resolve().parent.parent / "configs" / "seeds"


def _plan(*overrides: str):
    return load_plan(None, ["workload.seq_len={dist: fixed, value: 1024}", *overrides])


def test_judge_targets_and_claims_by_hand():
    plan = _plan(
        "targets.latency_ms_max=100",
        "targets.load_balance_pct_min=90",
        "claims.latency_ms=120",
        "claims.comm_overhead_pct=10",
    )
    metrics = {"latency_ms": 110.0, "load_balance_pct": 95.0, "comm_overhead_pct": 14.0}
    nodes = {f.node: f for f in judge(plan, metrics)}
    # 110 ms > 100 ms maximum: fails; 95% >= 90% minimum: passes.
    assert "targets.latency_ms_max" in nodes and "targets.load_balance_pct_min" not in nodes
    # |120 - 110| = 10 <= 10% of 110 = 11: the latency claim holds.
    assert "claims.latency_ms" not in nodes
    # |10 - 14| = 4 points <= 5 points: holds; 8 would be 6 points off.
    assert "claims.comm_overhead_pct" not in nodes
    plan = _plan("claims.comm_overhead_pct=8")
    assert {f.node for f in judge(plan, metrics)} == {"claims.comm_overhead_pct"}


def test_check_simulates_claims_of_a_valid_plan():
    run = simulate(_plan())
    latency = run.metrics["iteration_time_ms"]
    report = evaluate(_plan(f"claims.latency_ms={latency * 2}"))
    finding = next(f for f in report.findings if f.node == "claims.latency_ms")
    assert finding.computed == pytest.approx(latency, rel=1e-3)  # same plan, same seed
    assert report.unchecked == [] and report.metrics["latency_ms"] == pytest.approx(latency)


def test_check_static_leaves_claims_unchecked():
    report = evaluate(_plan("claims.latency_ms=1"), static=True)
    assert report.unchecked == ["claims.latency_ms"] and report.metrics is None


def test_seed_000_is_simulated_with_the_etp_fix():
    report = evaluate(load_plan(SEEDS / "000_current.yaml"))
    assert report.note == "simulated with parallel.etp: 1"
    nodes = {f.node for f in report.findings if f.severity == "error"}
    # A 524,288-token iteration (32 x 2048 x 8) cannot take the claimed 129 ms.
    assert {"parallel.etp", "claims.latency_ms", "targets.latency_ms_max"} <= nodes


def test_check_simulates_serving_claims():
    """Serving plans go to the serving simulator: seed 004's TTFT target and throughput claim
    are decided by simulation, not left open."""
    with pytest.raises(EngineError):
        simulate(load_plan(SEEDS / "004_current.yaml"))  # the training engine refuses
    report = evaluate(load_plan(SEEDS / "004_current.yaml"))
    assert report.metrics["ttft_ms_p50"] > 0
    assert "claims.comm_overhead_pct" in report.unchecked or report.metrics["comm_overhead_pct"]
    assert not any(u.startswith("targets.") for u in report.unchecked)


def test_router_skew_slows_the_iteration_and_lowers_balance():
    """Skewed expert popularity concentrates tokens on a few experts: the busiest EP rank
    gates every MoE layer, so the iteration is slower and load balance lower."""
    results = []
    for skew in (0.0, 0.8):
        report = simulate(_plan(f"model.moe.router_skew={skew}", "model.moe.capacity_factor=null"))
        results.append(report)
    plain, skewed = (r.metrics for r in results)
    assert skewed["iteration_time_ms"] > plain["iteration_time_ms"]
    assert skewed["load_balance_pct"] < plain["load_balance_pct"] - 10
    # Per-layer statistics agree: max/mean >= 1 everywhere, larger with skew.
    assert all(row["max_to_mean_mean"] >= 1.0 for row in results[0].expert_load)
    worst = [max(row["max_to_mean_mean"] for row in r.expert_load) for r in results]
    assert worst[1] > worst[0]


def test_even_routing_is_perfectly_balanced():
    report = simulate(_plan("model.moe.routing=even"))
    assert report.metrics["load_balance_pct"] == pytest.approx(100.0)
    assert report.metrics["dropped_tokens_pct"] == 0.0


def test_static_lists_an_ep_groups_claim_it_cannot_count():
    """EP groups exist only on a layout that folds: --static lists the claim as undecided;
    simulated (with the nearest valid folding) it is decided, and the folding is assumed."""
    plan = load_plan(
        SEEDS / "000_current.yaml", ["claims.ep_groups=7", "parallel.num_microbatches=2"]
    )
    static = evaluate(plan, static=True)
    assert "claims.ep_groups" in static.unchecked
    assert "claims.ep_groups" not in {f.node for f in static.findings}
    full = evaluate(plan)
    found = next(f for f in full.findings if f.node == "claims.ep_groups")
    assert (found.claimed, found.computed) == (7, 2) and "claims.ep_groups" not in full.unchecked
    assert any(a.field == "parallel.etp" and a.value == 1 for a in full.assumptions)
    assert full.layout.etp == 1  # the layout shown is the one the metrics came from

"""Impossible plans are still measured (issue 17): a plan needing more GPUs than its cluster has,
or whose EP cannot be formed, is simulated on the plan it would need, said as an assumption;
the errors stay."""

from __future__ import annotations

from pathlib import Path

from clustersim.run.evaluate import evaluate, simulation_repair
from clustersim.spec import load_plan

SEEDS = Path(__file__).resolve().parent.parent / "configs" / "seeds"


def test_000_required_simulated_on_32_gpus_with_ep_8():
    plan = load_plan(SEEDS / "000_required.yaml")
    verdict = evaluate(plan)
    # TP 4 x PP 4 x DP 2 = 32 GPUs on 2 nodes x 8: the error stays ...
    world = [f for f in verdict.findings if f.node == "parallel"]
    assert world and world[0].severity == "error" and world[0].computed == 32
    assert any(f.node == "parallel.ep" and f.severity == "error" for f in verdict.findings)
    # ... and the plan is measured on 4 nodes of 8 with EP 8 (the largest EP dividing both the
    # 64 experts and the 8 ranks of a stage), ETP 1.
    sim = verdict.simulated_plan
    assert sim.hardware.num_nodes == 4 and sim.hardware.gpus_per_node == 8
    assert (sim.parallel.ep, sim.parallel.etp) == (8, 1)
    assumed = {a.field: a for a in verdict.assumptions}
    assert assumed["hardware.num_nodes"].note == "simulated on 32 GPUs; the cluster has 16"
    assert assumed["parallel.ep"].value == 8
    assert "the cluster has 16" in verdict.note
    # its four figures are judged now
    assert verdict.metrics["latency_ms"] is not None
    for claim in ("latency_ms", "comm_overhead_pct", "load_balance_pct", "gpu_utilization_pct"):
        assert f"claims.{claim}" not in verdict.unchecked
    assert any(f.node == "claims.latency_ms" for f in verdict.findings)  # 27 ms is far off


def test_only_the_gpu_count_repaired():
    plan = load_plan(SEEDS / "001_required.yaml")
    plan = plan.model_copy(
        update={"parallel": plan.parallel.model_copy(update={"dp": 2, "etp": 1})}
    )
    repair = simulation_repair(plan, evaluate(plan, static=True).layout)
    assert repair.parallel == {} and repair.num_nodes == (2, 4)
    assert repair.note() == "simulated on 32 GPUs (4 nodes of 8); the cluster has 16"
    # a static audit changes nothing but the folding
    assert evaluate(plan, static=True).assumptions[0].field != "hardware.num_nodes"

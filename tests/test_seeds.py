"""The auditor's verdict on the five review documents of docs/seed-reviews/ (configs/seeds/*.yaml).

Every expected number is worked out by hand in the comments and assertions below, from the
document and the assumptions stated in each YAML file; none is copied from the program.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from clustersim.audit.checks import audit
from clustersim.spec import load_plan

SEEDS = Path(__file__).resolve().parent.parent / "configs" / "seeds"
GIB = 2**30


def run(name: str):
    """Audit one seed plan; return the report and its findings keyed by (node, severity)."""
    report = audit(load_plan(SEEDS / f"{name}.yaml"))
    return report, {(f.node, f.severity): f for f in report.findings}


def error_nodes(report) -> set[str]:
    return {f.node for f in report.errors}


# ---- seed 000 --------------------------------------------------------------------------------
def test_000_current_needs_etp_1():
    report, found = run("000_current")
    # TP 8 x PP 2 x DP 1 = 16 GPUs = 2 nodes x 8: world size is right.
    assert report.layout.world_size == 8 * 2 * 1 == 16
    # EP 8 x ETP 8 (ETP defaults to TP) = 64 does not divide TP 8 x DP 1 = 8; EP 8 x 1 does.
    assert "parallel.etp" in error_nodes(report)
    assert "set parallel.etp: 1" in found[("parallel.etp", "error")].fix
    # 64 experts / EP 8 = 8 per GPU per layer: the claim is right, so no finding on it.
    assert report.layout.experts_per_gpu_per_layer == 64 / 8 == 8
    assert not any(f.node.startswith("claims.") for f in report.findings)
    # Latency, communication overhead and load balance need the simulator.
    assert {"claims.latency_ms", "claims.comm_overhead_pct", "claims.load_balance_pct"} <= set(
        report.unchecked
    )


def test_000_required_cannot_be_formed():
    report, found = run("000_required")
    # TP 4 x PP 4 x DP 2 = 32 GPUs on a 16-GPU cluster.
    world = found[("parallel", "error")]
    assert world.computed == 4 * 4 * 2 == 32 and world.claimed == 16
    assert "needs 32 GPUs" in world.message and "has 16" in world.message
    # EP 16 needs 16 ranks per stage; a stage has TP 4 x DP 2 = 8: not even with ETP 1.
    ep = found[("parallel.ep", "error")]
    assert "8 ranks" in ep.message
    # Valid EP values divide both 64 experts and 8 ranks: 1, 2, 4, 8.
    assert "[1, 2, 4, 8]" in ep.fix
    assert ("parallel.etp", "error") not in found


# ---- seed 001 --------------------------------------------------------------------------------
def test_001_current_tp3_on_3_of_16_gpus():
    report, found = run("001_current")
    # 3 GPUs used, 13 idle: a warning, with the fix "dp: 16 / (3 x 1) is not whole" -> no dp fix.
    idle = found[("parallel", "warning")]
    assert idle.computed == 3 and idle.claimed == 16 and "13 stay idle" in idle.message
    # 32 heads / 3 and 8 KV heads vs TP 3 (neither divides the other): TP 3 is impossible.
    tp_errors = [f for f in report.errors if f.node == "parallel.tp"]
    assert len(tp_errors) == 2
    assert "[1, 2, 4, 8]" in tp_errors[0].fix  # divisors of 32 that fit in an 8-GPU node


def test_001_required_layout_and_memory_claims():
    report, found = run("001_required")
    lay = report.layout
    # TP 4 x PP 4 x DP 1 = 16 = the cluster; 8 layers / 4 stages = 2 per stage.
    assert lay.world_size == 16 and lay.layers_per_stage == [2, 2, 2, 2]
    # EP 4 x ETP 4 = 16 does not divide the 4 ranks of a stage; EP 4 x ETP 1 = 4 does.
    assert "parallel.etp" in error_nodes(report)
    # Claims that hold: 16 GPUs, 4 x 8 = 32 experts, 2 layers per stage, 4/4 = 1 expert per layer.
    for ok in ("total_gpus", "total_experts", "layers_per_stage", "experts_per_gpu_per_layer"):
        assert f"claims.{ok}" not in {f.node for f in report.findings}
    # Parameters on stage 0 with ETP 1 (h = 4096, 8 KV heads of 128, SwiGLU FFN 14336):
    h, ffn, vocab = 4096, 14336, 32000
    expert = 3 * h * ffn  # 176,160,768
    attention = h * 128 * (2 * 32 + 2 * 8)  # Q and O: 32 heads; K and V: 8 heads
    per_gpu = (2 * 4 * expert) / 4 + 2 * attention / 4 + vocab * h / 4 + 2 * (2 * h + h * 4)
    assert report.memory.params_gib == pytest.approx(2 * per_gpu / GIB, rel=0.01)  # bf16
    # The document's "~2GB parameters" is 2.6x the 0.76 GiB computed: an error.
    params = found[("claims.params_gib", "error")]
    assert params.computed == pytest.approx(0.76, abs=0.01)
    # Adam states without a distributed optimizer: 12 bytes/param = 6 x the bf16 weights
    # (4.5 GiB, not the claimed 8: off by more than 25%).
    assert report.memory.optimizer_gib == pytest.approx(6 * report.memory.params_gib, rel=1e-9)
    assert found[("claims.optimizer_gib", "error")].claimed == 8


# ---- seed 002 --------------------------------------------------------------------------------
def test_002_current_world_is_32_not_16_nor_64():
    report, found = run("002_current")
    # World = TP 4 x PP 4 x DP 2 = 32: neither the plan's 16 nor the document's "EP 16 x TP 4 = 64".
    claim = found[("claims.total_gpus", "error")]
    assert claim.claimed == 16 and claim.computed == 32
    assert found[("parallel", "error")].computed == 32
    # EP 16 cannot be formed from TP 4 x DP 2 = 8 ranks per stage.
    assert "parallel.ep" in error_nodes(report)
    # A stage holds TP 4 x DP 2 = 8 GPUs, not the 4 of "Stage 0: GPUs 0-3".
    stage = found[("claims.gpus_per_stage", "error")]
    assert (stage.claimed, stage.computed) == (4, 8)
    # 64 / 16 = 4 experts per layer and 16 / 4 = 4 layers per stage are right.
    assert "claims.experts_per_gpu_per_layer" not in error_nodes(report)
    assert "claims.layers_per_stage" not in error_nodes(report)


def test_002_required_is_itself_wrong():
    report, found = run("002_required")
    # TP 2 x PP 2 x DP 2 = 8 GPUs: the total is right (8 idle GPUs are a warning) ...
    assert report.layout.world_size == 8
    assert "claims.total_gpus" not in error_nodes(report)
    assert found[("parallel", "warning")].message.startswith("uses 8 of the cluster's 16 GPUs")
    # ... but EP 4 x ETP 2 = 8 does not divide TP 2 x DP 2 = 4: valid only with ETP 1,
    assert "set parallel.etp: 1" in found[("parallel.etp", "error")].fix
    # and a stage holds TP 2 x DP 2 = 4 GPUs, not "GPUs 0-1".
    stage = found[("claims.gpus_per_stage", "error")]
    assert (stage.claimed, stage.computed) == (2, 4)
    # 64 / 4 = 16 experts per layer and 16 / 2 = 8 layers per stage hold.
    assert report.layout.experts_per_gpu_per_layer == 16
    assert report.layout.layers_per_stage == [8, 8]


# ---- seed 003 --------------------------------------------------------------------------------
def _params_003_stage0() -> float:
    """Stage 0 of the 10 B model with TP 4, ETP 1, EP 8: 4 layers, embedding; bf16 bytes."""
    h, ffn, experts, vocab = 4096, 2752, 16, 32000
    expert_layer = experts * 3 * h * ffn / 8  # routed experts / (ETP 1 x EP 8)
    attention = h * 128 * (2 * 32 + 2 * 8) / 4  # Q, K, V, O over TP 4
    replicated = 2 * h + h * experts  # two norms and the router
    return 2 * (4 * (expert_layer + attention + replicated) + vocab * h / 4)


def test_003_current_expert_counts_and_params():
    report, found = run("003_current")
    assert report.layout.world_size == 32
    # 16 experts / EP 8 = 2 per layer (the "2 experts per GPU" node was right) ...
    assert report.layout.experts_per_gpu_per_layer == 2
    assert "claims.experts_per_gpu_per_layer" not in {f.node for f in report.findings}
    # ... and 2 x 4 MoE layers per stage = 8 per GPU, not 32.
    claim = found[("claims.experts_per_gpu", "error")]
    assert (claim.claimed, claim.computed) == (32, 8)
    # EP 8 x ETP 4 = 32 does not fold into TP 4 x DP 2 = 8 ranks: needs ETP 1.
    assert "parallel.etp" in error_nodes(report)
    # "Model Parameters: 5GB" vs the hand count (~0.64 GiB): an error.
    assert report.memory.params_gib == pytest.approx(_params_003_stage0() / GIB, rel=0.01)
    assert found[("claims.params_gib", "error")].claimed == 5
    assert report.memory_note == "computed with parallel.etp: 1"


def test_003_required_correction_of_per_layer_count_is_wrong():
    report, found = run("003_required")
    # The document "corrects" 2 experts per GPU per layer to 8: it is 16 / 8 = 2.
    claim = found[("claims.experts_per_gpu_per_layer", "error")]
    assert (claim.claimed, claim.computed) == (8, 2)
    # 8 experts per GPU (all layers) and 32 / 8 = 4 EP groups are right.
    assert "claims.experts_per_gpu" not in {f.node for f in report.findings}
    assert "claims.ep_groups" not in {f.node for f in report.findings}
    # 0.62 GB of parameters is within 10% of the hand count: no finding.
    assert abs(0.62 - _params_003_stage0() / GIB) / (_params_003_stage0() / GIB) < 0.10
    assert "claims.params_gib" not in {f.node for f in report.findings}
    # The default ETP = TP problem is still there.
    assert "parallel.etp" in error_nodes(report)


# ---- seed 004 --------------------------------------------------------------------------------
def test_004_experts_per_gpu_is_per_layer_times_layers():
    report, found = run("004_current")
    # 16 experts / EP 4 = 4 per layer; 4 MoE layers per stage -> 16 per GPU.
    assert report.layout.experts_per_gpu_per_layer == 4
    claim = found[("claims.experts_per_gpu", "error")]
    assert (claim.claimed, claim.computed) == (4, 16)
    # The layout itself is valid: EP 4 x ETP 1 divides TP 2 x DP 2 = 4.
    assert report.layout.expert_folding_ok
    assert not {"parallel", "parallel.ep", "parallel.etp", "parallel.tp"} & error_nodes(report)
    # Memory is computed at the longest prompt + output (10,240 + 512), not a fixed 1,024.
    assert report.memory.seq_len_tokens == 10240 + 512


@pytest.mark.parametrize("name", sorted(p.stem for p in SEEDS.glob("*.yaml")))
def test_every_seed_plan_needs_modification(name):
    """Each document's plans (current and 'required') contain at least one real error."""
    report, _ = run(name)
    assert report.has_errors

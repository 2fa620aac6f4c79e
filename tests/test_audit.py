"""Unit tests of every audit check (clustersim.audit.checks), one small plan per case.

Every expected number is worked out by hand in the test (comments show the arithmetic); only
memory values are taken from the memory model, and only where a test is about the audit's rule
around them (tolerances, fits or not), not about the value itself.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clustersim.audit.checks import AuditReport, audit
from clustersim.audit.findings import Finding
from clustersim.costs.memory import memory_per_gpu
from clustersim.layout import Layout
from clustersim.spec import load_plan, plan_from_dict

# A small MoE model: 12 layers (divisible by 1, 2, 3, 4, 6, 12), 16 heads, 8 KV heads, 8 experts.
SMALL_MODEL: dict[str, Any] = {
    "num_layers": 12,
    "hidden_size": 256,
    "num_attention_heads": 16,
    "num_kv_heads": 8,
    "ffn_hidden_size": 512,
    "vocab_size": 1000,
    "moe": {"num_experts": 8, "top_k": 2},
}
MEMORY_OPTIONS = {"recompute", "sequence_parallel", "distributed_optimizer"}


def small(**parallel: Any) -> dict[str, Any]:
    """The small model on 2 nodes x 8 H100, TP 2 x PP 2 x DP 4 = 16, EP 8 x ETP 1 = 8 = TP x DP:
    a valid plan; keyword arguments override ``parallel`` fields."""
    return {
        "name": "small",
        "model": copy.deepcopy(SMALL_MODEL),
        "hardware": {"gpu": "H100-SXM", "num_nodes": 2, "gpus_per_node": 8},
        "parallel": {
            "tp": 2,
            "pp": 2,
            "dp": 4,
            "ep": 8,
            "etp": 1,
            "num_microbatches": 8,
            "sequence_parallel": True,
            **parallel,
        },
        "workload": {"seq_len": {"dist": "fixed", "value": 128}},
    }


def run(d: dict[str, Any]) -> AuditReport:
    return audit(plan_from_dict(d, "test"))


def at(report: AuditReport, node: str, severity: str | None = None) -> list[Finding]:
    return [f for f in report.findings if f.node == node and severity in (None, f.severity)]


def one(report: AuditReport, node: str, severity: str) -> Finding:
    found = at(report, node, severity)
    assert len(found) == 1, report.findings
    return found[0]


def nodes(report: AuditReport) -> set[str]:
    return {f.node for f in report.findings}


@pytest.fixture
def valid(plan_dict: dict[str, Any]) -> dict[str, Any]:
    """The conftest plan (Mixtral-8x7B, TP 2 PP 2 DP 4 EP 8 ETP 1 on 16 H100) made fully valid:
    sequence parallelism on (MoE training with TP 2) and 8 micro-batches (>= PP 2)."""
    plan_dict["parallel"].update(sequence_parallel=True, num_microbatches=8)
    return plan_dict


# ---- valid plans ---------------------------------------------------------------------------
def test_valid_plans_have_no_findings(valid):
    report = run(valid)
    assert report.findings == [] and not report.has_errors
    assert report.memory is not None and report.memory.fits
    assert run(small()).findings == []
    assert audit(load_plan()).findings == []  # the embedded default plan


def test_conftest_plan_as_is_lacks_sp_and_micro_batches(plan_dict):
    # Defaults: sequence_parallel false, num_microbatches 1. MoE training with TP 2 needs SP;
    # 1 micro-batch for 2 stages leaves a bubble of (2-1)/(1+2-1) = 1/2 = 50%.
    report = run(plan_dict)
    assert nodes(report) == {"parallel.sequence_parallel", "parallel.num_microbatches"}
    assert one(report, "parallel.sequence_parallel", "error")
    assert "= 1/2 = 50%" in one(report, "parallel.num_microbatches", "warning").message


# ---- world size ----------------------------------------------------------------------------
def test_world_larger_than_cluster_proposes_dp():
    # TP 2 x PP 2 x DP 8 = 32 GPUs on 2 x 8 = 16; DP = 16 / (2 x 2) = 4 fits exactly.
    f = one(run(small(dp=8)), "parallel", "error")
    assert (f.claimed, f.computed) == (16, 32)
    assert "needs 32 GPUs (TP 2 x PP 2 x DP 8 = 32)" in f.message and "has 16" in f.message
    assert "set parallel.dp: 4" in f.fix
    assert "4 nodes of 8" in f.fix  # ceil(32 / 8) = 4


def test_world_larger_with_cp():
    # TP 2 x PP 2 x DP 4 x CP 2 = 32; DP = 16 / (2 x 1 x 2 x 2) = 2.
    f = one(run(small(cp=2)), "parallel", "error")
    assert f.computed == 32 and "x CP 2" in f.message
    assert "set parallel.dp: 2" in f.fix


def test_world_larger_dp_not_whole():
    # TP 2 x PP 3 x DP 4 = 24 > 16; 16 / (2 x 3) = 2.67 is not whole: only "add nodes".
    f = one(run(small(pp=3)), "parallel", "error")
    assert (f.claimed, f.computed) == (16, 24)
    assert "parallel.dp" not in f.fix and "3 nodes of 8" in f.fix  # ceil(24 / 8) = 3


def test_world_smaller_than_cluster_is_a_warning():
    # TP 2 x PP 2 x DP 2 = 8 of 16 GPUs (EP 4 folds into the 4 ranks of a stage).
    report = run(small(dp=2, ep=4))
    f = one(report, "parallel", "warning")
    assert (f.claimed, f.computed) == (16, 8)
    assert "uses 8 of the cluster's 16 GPUs" in f.message and "8 stay idle" in f.message
    assert "set parallel.dp: 4" in f.fix  # 16 / (2 x 2)
    assert not report.has_errors


# ---- heads ---------------------------------------------------------------------------------
def test_heads_not_divisible_by_tp():
    # 16 heads / TP 3 = 5.33; 8 KV heads and TP 3 neither divides the other.
    report = run(small(tp=3, dp=1, ep=1))
    found = at(report, "parallel.tp", "error")
    assert len(found) == 2
    heads = next(f for f in found if "attention heads" in f.message)
    assert "16 attention heads do not split over TP 3" in heads.message
    assert "[1, 2, 4, 8]" in heads.fix  # divisors of 16 that fit a node of 8
    assert heads.claimed == 3


def test_kv_heads_8_with_tp_3_is_an_error():
    d = small(tp=3, dp=1, ep=1)
    d["model"].update(num_attention_heads=24, hidden_size=24 * 16)  # 24 % 3 == 0
    f = one(run(d), "parallel.tp", "error")
    assert "8 KV heads and TP 3" in f.message and "neither divides" in f.message
    assert "dividing 8 or a multiple of it" in f.fix


@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16])
def test_kv_heads_8_valid_tp(tp):
    # 16 % tp == 0 and (8 % tp == 0 or tp % 8 == 0): no TP error; TP 16 spans 2 nodes of 8.
    report = run(small(tp=tp, pp=1, dp=16 // tp, ep=8))
    assert at(report, "parallel.tp", "error") == []
    assert (at(report, "parallel.tp", "warning") != []) == (tp == 16)


# ---- layers --------------------------------------------------------------------------------
def test_layers_not_divisible_by_pp():
    # 12 / 5 = 2.40; world TP 2 x PP 5 x DP 1 = 10, divisors of 12 in (1, 10]: 2, 3, 4, 6.
    f = one(run(small(pp=5, dp=1, ep=2)), "parallel.pp", "error")
    assert "12 layers do not split evenly over PP 5 (12 / 5 = 2.40)" in f.message
    assert "[2, 3, 4, 6]" in f.fix and "parallel.layers_per_stage" in f.fix
    assert f.claimed == 5


def test_interleaved_layers_not_divisible_by_pp_times_v():
    # 12 / (PP 2 x 4 virtual) = 1.50. PP values with PP x 4 dividing 12: only 3. With PP 2,
    # virtual stages dividing 12 / 2 = 6: 2, 3, 6. An explicit split excludes virtual stages.
    report = run(small(schedule="interleaved", virtual_stages=4))
    f = one(report, "parallel.pp", "error")
    assert "PP 2 x 4 virtual stages (12 / 8 = 1.50)" in f.message
    assert "choose parallel.pp from [3]" in f.fix
    assert "parallel.virtual_stages from [2, 3, 6]" in f.fix
    assert "layers_per_stage" not in f.fix
    assert run(small(schedule="interleaved", virtual_stages=3)).findings == []  # 12 / 6 = 2


def test_explicit_split_wrong_length():
    report = run(small(layers_per_stage=[4, 4, 4]))
    f = one(report, "parallel.layers_per_stage", "error")
    assert (f.claimed, f.computed) == (3, 2)
    assert "lists 3 stages but parallel.pp is 2" in f.message
    assert "give 2 entries summing to 12" in f.fix
    assert report.memory is None


def test_explicit_split_wrong_sum():
    f = one(run(small(layers_per_stage=[5, 6])), "parallel.layers_per_stage", "error")
    assert (f.claimed, f.computed) == (11, 12)  # 5 + 6 = 11, the model has 12
    assert "sums to 11 layers but the model has 12" in f.message


def test_explicit_split_ok_even_when_pp_does_not_divide():
    report = run(small(layers_per_stage=[5, 7]))
    assert report.findings == [] and report.layout.layers_per_stage == [5, 7]
    # PP 3 with an explicit split: 12 % 3 == 0 anyway; PP 5 would not divide, the split does.
    d = small(pp=5, dp=1, ep=2, layers_per_stage=[2, 2, 2, 3, 3])
    report = run(d)
    assert at(report, "parallel.pp") == [] and at(report, "parallel.layers_per_stage") == []
    assert report.memory is not None


def test_explicit_split_with_virtual_stages():
    """With virtual stages the split lists one entry per virtual stage (PP x v)."""
    d = small(layers_per_stage=[6, 6], schedule="interleaved", virtual_stages=2)
    f = one(run(d), "parallel.layers_per_stage", "error")
    assert (f.claimed, f.computed) == (2, 4)
    assert f.fix.startswith("give PP x virtual_stages = 4 entries summing to 12")
    ok = small(layers_per_stage=[2, 4, 4, 2], schedule="interleaved", virtual_stages=2)
    assert run(ok).findings == []


# ---- experts and folding -------------------------------------------------------------------
def test_experts_not_divisible_by_ep():
    # 8 / EP 3 = 2.67. Stage ranks TP 2 x DP 3 = 6 (EP 3 x ETP 1 folds); divisors of 8 that
    # divide 6: 1, 2.
    report = run(small(dp=3, ep=3))
    f = one(report, "parallel.ep", "error")
    assert "8 experts do not split over EP 3 (8 / 3 = 2.67)" in f.message
    assert "choose parallel.ep from [1, 2]" in f.fix
    assert f.claimed == 3


@pytest.mark.parametrize("etp, source", [(None, "ETP defaults to TP"), (2, "ETP is set")])
def test_folding_fixed_by_etp_1(etp, source):
    # EP 8 x ETP 2 = 16 does not divide TP 2 x DP 4 = 8; EP 8 x ETP 1 = 8 does.
    d = small()
    if etp is None:
        del d["parallel"]["etp"]
    else:
        d["parallel"]["etp"] = etp
    report = run(d)
    f = one(report, "parallel.etp", "error")
    assert "EP 8 x ETP 2 = 16 does not divide the 8 ranks" in f.message
    assert "(TP 2 x DP 4 = 8)" in f.message and source in f.message
    assert "set parallel.etp: 1" in f.fix
    assert (f.claimed, f.computed) == (2, 1)
    assert at(report, "parallel.ep") == []
    # Memory is still computed, for the proposed etp 1, and says so.
    assert report.memory is not None and report.memory_note == "computed with parallel.etp: 1"


def test_folding_impossible_lists_valid_ep():
    # TP 2 x PP 4 x DP 2 = 16; a stage has TP 2 x DP 2 = 4 ranks; EP 8 cannot fit even with
    # ETP 1. Valid EP: divisors of 8 that divide 4: 1, 2, 4. EP 8 x ETP 2 = 16.
    report = run(small(pp=4, dp=2, etp=None))
    f = one(report, "parallel.ep", "error")
    assert "EP 8 x ETP 2 = 16 cannot be formed from the 4 ranks" in f.message
    assert "(TP 2 x DP 2 = 4)" in f.message
    assert "choose parallel.ep from [1, 2, 4] with parallel.etp: 1" in f.fix
    assert "multiple of 16" in f.fix
    assert at(report, "parallel.etp") == []
    assert report.memory is None and report.memory_note.startswith("not computed")


def test_dense_model_with_ep_is_a_warning():
    d = small(ep=2)
    del d["model"]["moe"]
    report = run(d)
    f = one(report, "parallel.ep", "warning")
    assert (f.claimed, f.computed) == (2, 1) and f.fix == "set parallel.ep: 1"
    assert "dense model" in f.message
    assert not report.has_errors


def test_dense_model_with_unfoldable_ep_still_checks_memory():
    # EP 3 does not divide the 8 ranks of a stage, but a dense model has no expert layers:
    # memory must still be computed, and a plan that does not fit must still be an error.
    d = small(ep=3)
    del d["model"]["moe"]
    d["hardware"]["memory_gib"] = 0.001
    report = run(d)
    assert report.memory is not None and not report.memory.fits
    assert one(report, "hardware.memory_gib", "error")
    assert one(report, "parallel.ep", "warning")


# ---- schedule ------------------------------------------------------------------------------
def test_interleaved_needs_two_virtual_stages():
    f = one(run(small(schedule="interleaved")), "parallel.virtual_stages", "error")
    assert (f.claimed, f.computed) == (1, 2) and "at least 2 virtual stages" in f.message


def test_interleaved_needs_pp():
    d = small(schedule="interleaved", virtual_stages=2, pp=1, dp=8)
    f = one(run(d), "parallel.schedule", "error")
    assert (f.claimed, f.computed) == ("interleaved", "1f1b") and "PP >= 2" in f.message


def test_interleaved_needs_microbatches_divisible_by_pp():
    # 7 micro-batches / PP 2 is not whole; the next multiple of 2 is 8.
    report = run(small(schedule="interleaved", virtual_stages=2, num_microbatches=7))
    f = one(report, "parallel.num_microbatches", "error")
    assert "(7 / 2 is not whole)" in f.message
    assert (f.claimed, f.computed) == (7, 8) and f.fix == "set parallel.num_microbatches: 8"
    assert run(small(schedule="interleaved", virtual_stages=2)).findings == []


def test_virtual_stages_without_interleaved():
    f = one(run(small(virtual_stages=2)), "parallel.virtual_stages", "error")
    assert "not '1f1b'" in f.message and f.fix == "set parallel.schedule: interleaved"
    assert (f.claimed, f.computed) == (2, 1)


def test_few_microbatches_bubble_warning():
    # PP 4, m 2: bubble (4-1)/(2+4-1) = 3/5 = 60%; with 4 x 4 = 16 micro-batches 3/19 = 16%.
    report = run(small(pp=4, dp=2, ep=4, num_microbatches=2))
    f = one(report, "parallel.num_microbatches", "warning")
    assert "(p-1)/(m+p-1) = 3/5 = 60%" in f.message
    assert "at least 16 micro-batches (bubble 16%)" in f.fix
    assert (f.claimed, f.computed) == (2, 16)
    assert not report.has_errors
    d = small(pp=4, dp=2, ep=4, num_microbatches=2)
    d["workload"]["mode"] = "inference"
    assert at(run(d), "parallel.num_microbatches") == []


# ---- parallel options ----------------------------------------------------------------------
def test_moe_training_with_tp_needs_sequence_parallel():
    f = one(run(small(sequence_parallel=False)), "parallel.sequence_parallel", "error")
    assert (f.claimed, f.computed) == (False, True)
    assert "TP 2" in f.message and f.fix == "set parallel.sequence_parallel: true"


def test_sequence_parallel_not_needed_for_inference_dense_or_tp_1():
    d = small(sequence_parallel=False)
    d["workload"]["mode"] = "inference"
    assert at(run(d), "parallel.sequence_parallel") == []
    dense = small(sequence_parallel=False, ep=1)
    del dense["model"]["moe"]
    assert at(run(dense), "parallel.sequence_parallel") == []
    assert at(run(small(sequence_parallel=False, tp=1, dp=8)), "parallel.sequence_parallel") == []


def test_tp_crossing_nodes_warning():
    # TP 16 on nodes of 8: every TP group spans 2 nodes. TP values dividing 8 (and 16 heads):
    # 1, 2, 4, 8; the largest is 8.
    f = one(run(small(tp=16, pp=1, dp=1)), "parallel.tp", "warning")
    assert "TP 16 spans nodes of 8 GPUs" in f.message and "50 GB/s" in f.message
    assert "[1, 2, 4, 8]" in f.fix
    assert (f.claimed, f.computed) == (16, 8)


def test_tp_not_dividing_node_crosses_nodes():
    # Nodes of 6 GPUs, TP 4: ranks 4..7 form a TP group on nodes 0 and 1. TP 4 <= 6, so the fix
    # must name TP values dividing 6 that also divide the 16 heads: 1, 2.
    d = small(tp=4, pp=1, dp=3, ep=4)
    d["hardware"]["gpus_per_node"] = 6
    report = run(d)
    f = one(report, "parallel.tp", "warning")
    assert "TP 4 spans nodes of 6 GPUs" in f.message
    assert "[1, 2]" in f.fix and f.computed == 2
    assert not report.has_errors


# ---- memory --------------------------------------------------------------------------------
def apply_fix(d: dict[str, Any], fix: str) -> tuple[dict[str, Any], float]:
    """Apply a memory fix "set parallel.a: x, parallel.b: y (peak P GiB)"; return d and P."""
    m = re.fullmatch(r"set (.+) \(peak ([\d.]+) GiB\)", fix)
    assert m, fix
    d = copy.deepcopy(d)
    for item in m.group(1).split(", "):
        key, value = item.split(": ")
        assert key.startswith("parallel.") and key.removeprefix("parallel.") in MEMORY_OPTIONS
        d["parallel"][key.removeprefix("parallel.")] = yaml.safe_load(value)
    return d, float(m.group(2))


def test_memory_not_fitting_and_the_fix_fits(valid):
    # 16384-token sequences, no recompute, no distributed optimizer: well above 80 GiB.
    valid["workload"] = {"seq_len": {"dist": "fixed", "value": 16384}}
    report = run(valid)
    mem = report.memory
    assert mem is not None and mem.memory_per_gpu_gib > 80 and not mem.fits
    parts = (
        mem.params_gib
        + mem.grads_gib
        + mem.optimizer_gib
        + mem.activations_gib
        + mem.kv_cache_gib
        + mem.buffers_gib
    )
    assert parts == pytest.approx(mem.memory_per_gpu_gib)
    f = one(report, "hardware.memory_gib", "error")
    assert f.claimed == 80 and f.computed == round(mem.memory_per_gpu_gib, 2)
    assert f"peak memory {mem.memory_per_gpu_gib:.1f} GiB" in f.message
    assert "exceeds the 80 GiB available" in f.message
    fixed, peak = apply_fix(valid, f.fix)
    after = run(fixed)
    assert at(after, "hardware.memory_gib") == [] and after.memory.fits
    assert after.memory.memory_per_gpu_gib == pytest.approx(peak, abs=0.05)
    assert not after.has_errors


def test_memory_capacity_leaves_reserved(valid):
    valid["workload"] = {"seq_len": {"dist": "fixed", "value": 16384}}
    valid["hardware"]["memory_reserved_gib"] = 2
    f = one(run(valid), "hardware.memory_gib", "error")
    assert f.claimed == 78 and "the 78 GiB available" in f.message  # 80 - 2


def test_memory_no_option_is_enough(valid):
    valid["hardware"]["memory_gib"] = 10
    f = one(run(valid), "hardware.memory_gib", "error")
    assert f.fix.startswith("no memory option is enough") and "larger GPUs" in f.fix


def test_memory_target_exceeded_and_the_fix_meets_it(valid):
    report = run(valid)
    peak = report.memory.memory_per_gpu_gib
    limit = 60
    assert peak > limit and report.memory.fits
    valid["targets"] = {"memory_per_gpu_gib_max": limit}
    report = run(valid)
    f = one(report, "targets.memory_per_gpu_gib_max", "error")
    assert (f.claimed, f.computed) == (60, round(peak, 2))
    assert "above the target of 60 GiB" in f.message
    assert at(report, "hardware.memory_gib") == []
    fixed, fix_peak = apply_fix(valid, f.fix)
    after = run(fixed)
    assert after.findings == [] and after.memory.memory_per_gpu_gib <= limit
    valid["targets"] = {"memory_per_gpu_gib_max": 76}
    assert run(valid).findings == []


# ---- claims --------------------------------------------------------------------------------
# Small plan: TP 2 x PP 2 x DP 4 = 16 GPUs; a stage TP 2 x DP 4 = 8 GPUs; 8 experts x 12 MoE
# layers = 96; EP groups 16 / 8 = 2; 8 / EP 8 = 1 expert per GPU per layer; 12 / 2 = 6 layers
# per stage, all MoE, so 1 x 6 = 6 experts per GPU.
COUNT_CLAIMS = [
    ("total_gpus", 16, 32),
    ("gpus_per_stage", 8, 16),
    ("total_experts", 96, 8),
    ("ep_groups", 2, 4),
    ("experts_per_gpu_per_layer", 1, 8),
    ("experts_per_gpu", 6, 1),
    ("layers_per_stage", 6, 3),
]


@pytest.mark.parametrize("name, right, wrong", COUNT_CLAIMS)
def test_count_claims(name, right, wrong):
    d = small()
    d["claims"] = {name: right}
    assert run(d).findings == []
    d["claims"] = {name: wrong}
    f = one(run(d), f"claims.{name}", "error")
    assert (f.claimed, f.computed) == (wrong, right)
    assert f"is {right}, not {wrong}" in f.message
    assert f.fix == f"set claims.{name}: {right}"


def test_count_claims_with_leading_dense_layer():
    # first_k_dense 1: MoE layers 1..11 = 11, 8 x 11 = 88 experts. Stage 0 (layers 0-5) has 5
    # MoE layers, stage 1 (6-11) 6. EP 4: 8 / 4 = 2 per layer; per stage 10 and 12; peak 12.
    # EP groups: 16 / 4 = 4.
    d = small(ep=4)
    d["model"]["moe"]["first_k_dense"] = 1
    d["claims"] = {
        "total_experts": 88,
        "experts_per_gpu_per_layer": 2,
        "experts_per_gpu": 12,
        "ep_groups": 4,
    }
    assert run(d).findings == []
    d["claims"] = {"experts_per_gpu": 10}
    f = one(run(d), "claims.experts_per_gpu", "error")
    assert (f.claimed, f.computed) == (10, 12)
    assert "(stage 1; per stage [10, 12])" in f.message


def test_fractional_experts_per_gpu_per_layer():
    # 8 experts / EP 3 = 2.67 per GPU per layer (EP 3 itself is an error too).
    d = small(dp=3, ep=3)
    d["claims"] = {"experts_per_gpu_per_layer": 3}
    f = one(run(d), "claims.experts_per_gpu_per_layer", "error")
    assert f.computed == pytest.approx(8 / 3)


@pytest.mark.parametrize(
    "split, claim, computed",
    [
        (None, [6, 6], None),
        (None, [5, 7], 6),
        ([5, 7], [5, 7], None),
        ([5, 7], 6, [5, 7]),
    ],
)
def test_layers_per_stage_claim_list(split, claim, computed):
    d = small(layers_per_stage=split) if split else small()
    d["claims"] = {"layers_per_stage": claim}
    report = run(d)
    if computed is None:
        assert report.findings == []
    else:
        f = one(report, "claims.layers_per_stage", "error")
        assert (f.claimed, f.computed) == (claim, computed)


ESTIMATES = ("memory_per_gpu_gib", "params_gib", "optimizer_gib", "activations_gib")


@pytest.mark.parametrize("name", ESTIMATES)
@pytest.mark.parametrize(
    "factor, severity",
    [
        (1.05, None),
        (0.95, None),
        (1.15, "warning"),
        (0.85, "warning"),
        (1.3, "error"),
        (0.7, "error"),
        (3.0, "error"),
    ],
)
def test_estimate_claims_tolerance(valid, name, factor, severity):
    # Within 10% of the computed value: fine; 10-25%: warning; over 25%: error.
    computed = getattr(run(valid).memory, name)
    claimed = computed * factor
    valid["claims"] = {name: claimed}
    report = run(valid)
    if severity is None:
        assert report.findings == []
        return
    f = one(report, f"claims.{name}", severity)
    assert report.findings == [f]
    assert f.claimed == claimed and f.computed == round(computed, 2)
    assert f"{computed:.2f} GiB" in f.message
    ratio = max(factor, 1 / factor)
    assert f"{ratio:.1f}x {'over' if factor > 1 else 'under'}estimated" in f.message
    assert f.fix == f"set claims.{name}: {computed:.2f}"


def test_simulated_claims_and_targets_are_unchecked(valid):
    valid["claims"] = {
        "latency_ms": 27,
        "ttft_ms": 100,
        "tpot_ms": 5,
        "throughput_tokens_per_ms": 120,
        "comm_overhead_pct": 1.5,
        "load_balance_pct": 92,
        "gpu_utilization_pct": 94,
    }
    valid["targets"] = {
        "latency_ms_max": 50,
        "ttft_ms_max": 10000,
        "tpot_ms_max": 20,
        "throughput_tokens_per_ms_min": 100,
        "comm_overhead_pct_max": 20,
        "load_balance_pct_min": 90,
        "gpu_utilization_pct_min": 90,
    }
    report = run(valid)
    assert report.findings == []
    assert set(report.unchecked) == {f"claims.{k}" for k in valid["claims"]} | {
        f"targets.{k}" for k in valid["targets"]
    }
    assert len(report.unchecked) == 14
    assert run(small()).unchecked == []


# ---- output contract -----------------------------------------------------------------------
LAYOUT_KEYS = {
    "world_size",
    "cluster_gpus",
    "layers_per_stage",
    "experts_per_gpu",
    "experts_per_gpu_per_layer",
    "ep_groups",
    "edp",
}
MEMORY_KEYS = {
    "memory_per_gpu_gib",
    "params_gib",
    "grads_gib",
    "optimizer_gib",
    "activations_gib",
    "kv_cache_gib",
    "buffers_gib",
    "fits",
}
METRIC_KEYS = {
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
}
FINDING_KEYS = {"node", "severity", "claimed", "computed", "message", "fix"}


def test_to_dict_contract():
    d = small(dp=2, ep=4, sequence_parallel=False)  # warning (8 of 16 GPUs) and an SP error
    d["claims"] = {"total_gpus": 16, "latency_ms": 3}
    out = json.loads(json.dumps(run(d).to_dict()))
    lay = out["layout"]
    assert set(lay) >= LAYOUT_KEYS
    # TP 2 x PP 2 x DP 2 = 8; 12 / 2 = 6 layers; 8 / 4 = 2 experts per layer, x 6 = 12;
    # EP groups 8 / 4 = 2; EDP = TP 2 x DP 2 / (EP 4 x ETP 1) = 1.
    assert (lay["world_size"], lay["cluster_gpus"]) == (8, 16)
    assert lay["layers_per_stage"] == [6, 6]
    assert (lay["experts_per_gpu_per_layer"], lay["experts_per_gpu"]) == (2, 12)
    assert (lay["ep_groups"], lay["edp"]) == (2, 1)
    assert set(out["memory"]) >= MEMORY_KEYS and out["memory"]["fits"] is True
    assert set(out["metrics"]) == METRIC_KEYS
    assert all(v is None for v in out["metrics"].values())
    assert {f["node"] for f in out["findings"]} == {
        "parallel",
        "parallel.sequence_parallel",
        "claims.total_gpus",
    }
    for f in out["findings"]:
        assert set(f) == FINDING_KEYS and f["severity"] in ("error", "warning")
    claim = next(f for f in out["findings"] if f["node"] == "claims.total_gpus")
    assert (claim["claimed"], claim["computed"]) == (16, 8)
    assert out["unchecked"] == ["claims.latency_ms"]


def test_to_dict_without_memory_is_serialisable():
    out = json.loads(json.dumps(run(small(pp=4, dp=2, etp=None)).to_dict()))
    assert out["memory"] is None and out["memory_note"].startswith("not computed")
    assert out["layout"]["edp"] is None and out["layout"]["ep_groups"] == 0
    assert set(out["metrics"]) == METRIC_KEYS


# ---- property: errors only for stated reasons ----------------------------------------------
@st.composite
def random_plans(draw: st.DrawFn) -> dict[str, Any]:
    heads = draw(st.sampled_from([4, 6, 8, 12, 16]))
    model: dict[str, Any] = {
        "num_layers": draw(st.integers(1, 12)),
        "hidden_size": heads * 16,
        "num_attention_heads": heads,
        "num_kv_heads": draw(st.sampled_from([1, 2, 3, 4, 8])),
        "ffn_hidden_size": 64,
        "vocab_size": 512,
    }
    if draw(st.booleans()):
        experts = draw(st.integers(1, 16))
        model["moe"] = {"num_experts": experts, "top_k": draw(st.integers(1, min(2, experts)))}
    parallel: dict[str, Any] = {
        "tp": draw(st.sampled_from([1, 2, 3, 4, 8])),
        "pp": draw(st.integers(1, 4)),
        "dp": draw(st.integers(1, 4)),
        "cp": draw(st.sampled_from([1, 1, 2])),
        "ep": draw(st.integers(1, 8)),
        "num_microbatches": draw(st.integers(1, 8)),
        "schedule": draw(st.sampled_from(["gpipe", "1f1b"])),
        "sequence_parallel": draw(st.booleans()),
        "recompute": draw(st.sampled_from(["none", "selective", "full"])),
        "distributed_optimizer": draw(st.booleans()),
        "grad_bucket_mb": 1,
    }
    etp = draw(st.sampled_from([None, 1, 2]))
    if etp is not None:
        parallel["etp"] = etp
    return {
        "name": "random",
        "model": model,
        "hardware": {
            "gpu": "H100-SXM",
            "num_nodes": draw(st.integers(1, 4)),
            "gpus_per_node": draw(st.sampled_from([4, 8])),
            "memory_gib": draw(st.sampled_from([0.003, 0.01, 80])),
        },
        "parallel": parallel,
        "workload": {
            "mode": draw(st.sampled_from(["training", "inference"])),
            "seq_len": {"dist": "fixed", "value": 64},
            "requests": {
                "prompt_len": {"dist": "fixed", "value": 32},
                "output_len": {"dist": "fixed", "value": 16},
                "max_batch_size": 4,
            },
        },
    }


def expected_errors(d: dict[str, Any]) -> set[str]:
    """The error nodes a plan must get, from the rules of design.md / reference.md."""
    plan = plan_from_dict(d, "test")
    m, par, moe = plan.model, plan.parallel, plan.model.moe
    tp, ep = par.tp, par.ep
    etp = par.etp if par.etp is not None else tp
    world = tp * par.cp * par.dp * par.pp
    stage = tp * par.cp * par.dp
    training = plan.workload.mode == "training"
    out = set()
    if world > plan.hardware.num_nodes * plan.hardware.gpus_per_node:
        out.add("parallel")
    kv = m.num_kv_heads
    if m.num_attention_heads % tp or (kv % tp and tp % kv):
        out.add("parallel.tp")
    if m.num_layers % par.pp:
        out.add("parallel.pp")
    mem_plan = plan
    if moe is not None:
        folds = stage % (ep * etp) == 0
        etp_only = not folds and etp != 1 and stage % ep == 0
        if moe.num_experts % ep or not (folds or etp_only):
            out.add("parallel.ep")
        if etp_only:
            out.add("parallel.etp")
            mem_plan = plan.model_copy(update={"parallel": par.model_copy(update={"etp": 1})})
        if not (folds or etp_only):
            mem_plan = None
        if training and tp > 1 and not par.sequence_parallel:
            out.add("parallel.sequence_parallel")
    if mem_plan is not None and not memory_per_gpu(mem_plan, Layout(mem_plan)).fits:
        out.add("hardware.memory_gib")
    return out


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_plans())
def test_audit_errors_only_for_stated_reasons(d):
    report = run(d)  # never raises
    json.dumps(report.to_dict())
    expected = expected_errors(d)
    assert {f.node for f in report.errors} == expected, report.findings
    if not expected:
        assert not report.has_errors
    for f in report.findings:
        assert f.severity in ("error", "warning") and f.message


@st.composite
def valid_random_plans(draw: st.DrawFn) -> dict[str, Any]:
    """Plans meeting every rule by construction: world == cluster, TP dividing the heads with
    the KV rule, PP dividing the layers, EP dividing the experts and folding, SP on, tiny model
    on 80 GiB."""
    d = draw(random_plans())
    model, par = d["model"], d["parallel"]
    heads, kv = model["num_attention_heads"], model["num_kv_heads"]
    tps = [t for t in (1, 2, 3, 4, 6, 8, 12, 16) if heads % t == 0 and (kv % t == 0 or t % kv == 0)]
    par["tp"] = draw(st.sampled_from(tps))
    par["pp"] = draw(st.sampled_from([p for p in (1, 2, 3, 4) if model["num_layers"] % p == 0]))
    par["sequence_parallel"] = True
    par.pop("etp", None)  # default: ETP = TP
    stage = par["tp"] * par["cp"] * par["dp"]
    if "moe" in model:
        experts = model["moe"]["num_experts"]
        eps = [e for e in range(1, experts + 1) if experts % e == 0 and stage % e == 0]
        par["ep"] = draw(st.sampled_from(eps))
        if stage % (par["ep"] * par["tp"]):  # EP x TP does not fold: ETP 1 (EP divides stage)
            par["etp"] = 1
    world = stage * par["pp"]
    nodes = draw(st.sampled_from([n for n in (1, 2, 4) if world % n == 0]))
    d["hardware"].update(num_nodes=nodes, gpus_per_node=world // nodes, memory_gib=80)
    return d


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_random_plans())
def test_audit_valid_by_construction_has_no_errors(d):
    report = run(d)
    assert expected_errors(d) == set()
    assert report.errors == [] and not report.has_errors
    assert report.memory is not None and report.memory.fits
    assert report.layout.world_size == report.layout.cluster_gpus

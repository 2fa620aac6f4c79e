"""Megatron-Core's selective recompute of named modules (``parallel.recompute_modules``) and
DeepSeek-V3's multi-token prediction heads (``model.mtp_layers``): what the backward runs
again and what the last stage computes, each checked against a hand-computed closed form
(FLOPs / (peak x efficiency), bytes / (HBM x efficiency)) on a calibration with no shape
loss and no fixed or host time, not against captured outputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from clustersim.costs.compute import model_flops_per_iteration
from clustersim.costs.memory import layer_activation_bytes
from clustersim.engine.training.optimes import ExpertTimer, MicrobatchCosts
from clustersim.spec import plan_from_dict
from clustersim.spec.errors import PlanError

TOKENS = 4096
PEAK_TFLOPS, HBM_GBPS = 1000.0, 4000.0
GEMM_EFF, STREAM_EFF, ELEM_EFF, NORM_EFF, ROPE_EFF = 0.8, 0.9, 0.6, 0.5, 0.4
# no shape loss (half_dim 0), no fixed GPU time, no host or kernel-to-kernel time, no L2
# factor and no per-row floor of memory-bound kernels
CALIBRATION = {
    "gemm": {"efficiency": GEMM_EFF, "half_dim": 0.0, "memory_efficiency": 1.0},
    "memory": {
        "efficiency": STREAM_EFF,
        "elementwise_efficiency": ELEM_EFF,
        "rotary_efficiency": ROPE_EFF,
        "norm_efficiency": NORM_EFF,
        "l2_mb": None,
        "row_gbps": None,
    },
    "kernel": {
        "fixed_us": 0.0,
        "stream_fixed_us": 0.0,
        "norm_fixed_us": 0.0,
        "launch_us": 0.0,
        "graph_launch_us": 0.0,
        "framework_us": 0.0,
    },
}
MLA = {"q_lora_rank": 384, "kv_lora_rank": 128, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32,
       "v_head_dim": 64}  # fmt: skip
MODEL = {
    "num_layers": 4,
    "hidden_size": 2048,
    "num_attention_heads": 16,
    "ffn_hidden_size": 512,
    "dense_ffn_hidden_size": 4096,
    "vocab_size": 32000,
    "activation": "swiglu",
    "mla": MLA,
    "moe": {"num_experts": 8, "top_k": 2, "first_k_dense": 1, "routing": "even"},
}


def make_plan(parallel: dict | None = None, **model_fields):
    model = copy.deepcopy(MODEL)
    model.update(model_fields)
    return plan_from_dict(
        {
            "model": model,
            "hardware": {
                "gpu": "H100-SXM",
                "num_nodes": 1,
                "gpus_per_node": 8,
                "peak_tflops": PEAK_TFLOPS,
                "hbm_bandwidth_gbps": HBM_GBPS,
                "calibration": {"generation": "h100", **CALIBRATION},
            },
            "parallel": {"tp": 1, "pp": 1, "dp": 1, "ep": 1, **(parallel or {})},
            "workload": {"seq_len": {"dist": "fixed", "value": TOKENS}},
        },
        "test",
    )


def layer_costs(modules, recompute="selective", **model_fields) -> MicrobatchCosts:
    par = {"recompute": recompute, "recompute_modules": modules}
    return MicrobatchCosts(make_plan(par, **model_fields), [0], np.array([TOKENS]))


def gemm_s(m: float, n: float, k: float) -> float:
    """Roofline of one BF16 GEMM: FLOPs at peak x efficiency or its operands and output
    (2 bytes each) at the HBM bandwidth, whichever is longer."""
    compute = 2 * m * n * k / (PEAK_TFLOPS * 1e12 * GEMM_EFF)
    memory = 2 * (m * k + k * n + m * n) / (HBM_GBPS * 1e9)
    return max(compute, memory)


def mla_up_proj_ms_by_hand() -> float:
    """The two up-projection GEMMs (the latents 384 -> 16 heads x 96 query dims, 128 -> 16 x
    (64 + 64) key/value dims; the second is memory-bound), the two latent RMSNorms (read +
    write the latent) at the norm rate, the rotary embedding (read + write this GPU's queries
    and keys, 16 + 16 heads of 96) at the rotary rate; BF16, 2 bytes."""
    h = 16
    gemms = gemm_s(TOKENS, h * (64 + 32), 384) + gemm_s(TOKENS, h * (64 + 64), 128)
    norm_s = TOKENS * 2 * 2 * (384 + 128) / (HBM_GBPS * 1e9 * NORM_EFF)
    rope_s = TOKENS * 2 * 2 * (h + h) * (64 + 32) / (HBM_GBPS * 1e9 * ROPE_EFF)
    return (gemms + norm_s + rope_s) * 1e3


def test_mla_up_proj_recompute_is_the_up_projections_forward():
    core = layer_costs(["core_attn"])
    both = layer_costs(["core_attn", "mla_up_proj"])
    alone = layer_costs(["mla_up_proj"])
    expected = mla_up_proj_ms_by_hand()
    assert both.moe.recompute_ms - core.moe.recompute_ms == pytest.approx(expected, rel=1e-9)
    assert alone.moe.recompute_ms == pytest.approx(expected, rel=1e-9)
    assert alone.dense.recompute_ms == pytest.approx(expected, rel=1e-9)
    # the default module list is Megatron's: core attention only
    assert layer_costs(None).moe.recompute_ms == core.moe.recompute_ms
    assert core.moe.recompute_ms == pytest.approx(core.moe.core_attn_fwd_ms, rel=1e-12)


def test_mlp_recompute_charges_the_dense_mlp_forward_only():
    costs = layer_costs(["mlp"])
    h, ffn = 2048, 4096  # SwiGLU: up (gate + up, 2 ffn), activation, down, residual add
    gemms = gemm_s(TOKENS, 2 * ffn, h) + gemm_s(TOKENS, h, ffn)
    act_s = TOKENS * 3 * ffn * 2 / (HBM_GBPS * 1e9 * ELEM_EFF)
    residual_s = TOKENS * 3 * h * 2 / (HBM_GBPS * 1e9 * STREAM_EFF)
    expected = (gemms + act_s + residual_s) * 1e3
    assert costs.dense.recompute_ms == pytest.approx(expected, rel=1e-9)
    assert costs.dense.recompute_ms == pytest.approx(costs.dense.mlp_fwd_ms, rel=1e-12)
    assert costs.moe.recompute_ms == 0.0  # an MoE layer's experts are not an MLP module


def test_moe_act_recompute_is_the_experts_activation_pass():
    copies = np.array([0.0, 1000.0, 8192.0])
    timer = ExpertTimer(make_plan({"recompute": "selective", "recompute_modules": ["moe_act"]}))
    by_hand = copies * 3 * 512 * 2 / (HBM_GBPS * 1e9 * ELEM_EFF) * 1e3  # read gate+up, write
    np.testing.assert_allclose(timer.recompute_ms(copies), by_hand, rtol=1e-9)
    plain = ExpertTimer(make_plan({"recompute": "selective"}))
    np.testing.assert_array_equal(plain.recompute_ms(copies), 0.0)


def test_modules_only_under_selective_granularity():
    for level in ("none", "full"):
        plan = make_plan({"recompute": level, "recompute_modules": ["mla_up_proj", "moe_act"]})
        assert plan.parallel.selective_modules == ()
    none = layer_costs(["mla_up_proj"], recompute="none")
    assert none.moe.recompute_ms == 0.0
    assert (
        make_plan({"recompute": "selective", "recompute_modules": []}).parallel.selective_modules
        == ()
    )


def test_mla_up_proj_needs_an_mla_model():
    with pytest.raises(PlanError, match="mla_up_proj.*no model.mla"):
        make_plan({"recompute": "selective", "recompute_modules": ["mla_up_proj"]}, mla=None)


def test_recomputed_modules_drop_their_stored_outputs():
    """Megatron keeps a recomputed module's input and discards what it produced: MLA's Q, K
    and V (2 bytes each: heads x (2 x 96 + 64) per token), a dense MLP's intermediate (gate
    and up outputs 4 bytes + fc2 input 2 bytes per unit of width), the experts' activation
    output (fc2's input, 2 bytes per unit of width, top_k copies)."""
    base = make_plan({"recompute": "selective"})
    s = float(TOKENS)

    def saved(modules, layer):
        plan = make_plan({"recompute": "selective", "recompute_modules": modules})
        keep = layer_activation_bytes(base.model, base.parallel, layer, s, 1)
        return keep - layer_activation_bytes(plan.model, plan.parallel, layer, s, 1)

    assert saved(["mla_up_proj"], 1) == pytest.approx(s * 16 * 2 * (2 * 96 + 64))
    assert saved(["mlp"], 0) == pytest.approx(s * (4 + 2) * 4096)
    assert saved(["mlp"], 1) == 0.0
    assert saved(["moe_act"], 1) == pytest.approx(2 * s * 2 * 512)
    assert saved(["moe_act"], 0) == 0.0


def test_mtp_heads_run_the_output_layer_again():
    one, mtp = layer_costs(None), layer_costs(None, mtp_layers=1)
    two = layer_costs(None, mtp_layers=2)
    for name in ("logits_fwd_ms", "logits_bwd_ms", "logits_weights_ms"):
        assert getattr(mtp, name) == pytest.approx(2 * getattr(one, name), rel=1e-12)
        assert getattr(two, name) == pytest.approx(3 * getattr(one, name), rel=1e-12)
    # the logits GEMM by hand: tokens x h by h x V
    assert one.logits_weights_ms == pytest.approx(gemm_s(TOKENS, 32000, 2048) * 1e3, rel=1e-9)


def test_mtp_flops_count_one_more_output_layer_per_module():
    plain = make_plan().model
    mtp = make_plan(mtp_layers=1).model
    b, s = 8, 4096
    extra = model_flops_per_iteration(mtp, b, s) - model_flops_per_iteration(plain, b, s)
    assert extra == pytest.approx(b * s * 3 * 2 * 2048 * 32000, rel=1e-12)


def test_mtp_layers_must_leave_decoder_layers():
    with pytest.raises(PlanError, match="mtp_layers"):
        make_plan(mtp_layers=4)


def test_layernorm_recompute_is_the_standalone_norms():
    """Megatron-Core's TE layer specs keep two norms as modules of their own: MLA's input norm
    and an MoE layer's pre-MLP norm (a dense layer's pre-MLP norm is fused into its FC1).
    Each: read and write the hidden state (2 x 2 bytes x h) at the norm rate."""
    costs = layer_costs(["layernorm"])
    one_norm = TOKENS * 2 * 2 * 2048 / (HBM_GBPS * 1e9 * NORM_EFF) * 1e3
    assert costs.moe.recompute_ms == pytest.approx(2 * one_norm, rel=1e-9)
    assert costs.dense.recompute_ms == pytest.approx(one_norm, rel=1e-9)
    gqa = layer_costs(["layernorm"], mla=None, num_kv_heads=4)
    assert gqa.moe.recompute_ms == pytest.approx(one_norm, rel=1e-9)
    assert gqa.dense.recompute_ms == 0.0


def test_fused_cross_entropy_moves_ten_bytes_per_logit():
    """Transformer Engine's fused loss: forward reads the bf16 logits twice and writes their
    gradient (2 + 2 + 2 bytes), backward scales the gradient in place (2 + 2); Megatron's
    unfused vocab-parallel loss moves 38 + 14 bytes per logit."""
    plain = layer_costs(None)
    fused = MicrobatchCosts(make_plan({"fused_cross_entropy": True}), [0], np.array([TOKENS]))
    logits = TOKENS * 32000
    rate = HBM_GBPS * 1e9 * ELEM_EFF
    gemm_fwd = gemm_s(TOKENS, 32000, 2048) * 1e3
    assert fused.logits_fwd_ms == pytest.approx(gemm_fwd + 6 * logits / rate * 1e3, rel=1e-9)
    assert fused.logits_bwd_ms == pytest.approx(2 * gemm_fwd + 4 * logits / rate * 1e3, rel=1e-9)
    assert plain.logits_fwd_ms == pytest.approx(gemm_fwd + 38 * logits / rate * 1e3, rel=1e-9)
    assert plain.logits_bwd_ms == pytest.approx(2 * gemm_fwd + 14 * logits / rate * 1e3, rel=1e-9)

"""FP8 training and serving (``model.dtype: fp8``) against closed forms and hand computations.

GEMM times against the peak ratio, memory per GPU against the recipe's bytes per parameter and
per saved activation (computed here from the shapes), the DeepEP FP8 dispatch and the
distributed optimizer's FP8 parameter all-gather against their byte counts.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from calibrations import ROOFLINE
from hypothesis import given, settings
from hypothesis import strategies as st

from clustersim.costs.kernels import KernelTimer
from clustersim.costs.memory import GIB, memory_per_gpu, serving_memory
from clustersim.costs.params import count_params
from clustersim.engine.recorder import Op
from clustersim.layout import Layout
from clustersim.run.evaluate import assumptions_for
from clustersim.run.simulate import simulate
from clustersim.spec import plan_from_dict
from clustersim.spec.errors import PlanError
from clustersim.spec.schema import Plan

# A small dense GPT layer: MHA, GeLU, ffn = 4h, so the saved inputs of the linear layers are
# h (attention input) + h (projection input) + h (MLP input) + 4h (fc2 input) = 7h per token.
SMALL = {
    "num_layers": 2,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "ffn_hidden_size": 1024,
    "vocab_size": 1000,
    "activation": "gelu",
}
MOE = {
    "num_layers": 4,
    "hidden_size": 512,
    "num_attention_heads": 8,
    "num_kv_heads": 4,
    "ffn_hidden_size": 1024,
    "vocab_size": 1000,
    "moe": {"num_experts": 8, "top_k": 2, "routing": "even"},
}
SEQ = 128


def make_plan(
    model: dict[str, Any],
    parallel: dict[str, Any] | None = None,
    gpu: str = "H100-SXM",
    **workload: Any,
) -> Plan:
    par = {"tp": 1, "pp": 1, "dp": 1, **(parallel or {})}
    world = par["tp"] * par["pp"] * par["dp"]
    return plan_from_dict(
        {
            "model": copy.deepcopy(model),
            "hardware": {
                "gpu": gpu,
                "num_nodes": max(1, -(-world // 8)),
                "gpus_per_node": 8,
                "calibration": {"collectives": ROOFLINE["collectives"]},
            },
            "parallel": par,
            "workload": {"seq_len": {"dist": "fixed", "value": SEQ}} | workload,
        },
        "test",
    )


def with_dtype(model: dict[str, Any], dtype: str, recipe: str | None = None) -> dict[str, Any]:
    out = {**model, "dtype": dtype}
    if recipe:
        out["fp8_recipe"] = recipe
    return out


# ---- the contract: defaults and refusals -----------------------------------------------------


@pytest.mark.parametrize(
    ("gpu", "recipe"),
    [("H100-SXM", "blockwise"), ("H800", "blockwise"), ("H20", "blockwise"), ("B200", "mxfp8"),
     ("GB200", "mxfp8"), ("GB300", "mxfp8")],
)  # fmt: skip
def test_default_recipe_per_architecture(gpu, recipe):
    """The default recipe is the GPU architecture's, and every report says it was assumed."""
    plan = make_plan(with_dtype(SMALL, "fp8"), gpu=gpu)
    assert plan.model.fp8_recipe == recipe
    stated = {a.field: a for a in assumptions_for(plan, True, None)}
    assert stated["model.fp8_recipe"].value == recipe
    given = make_plan(with_dtype(SMALL, "fp8", "tensorwise"), gpu=gpu)
    assert "model.fp8_recipe" not in {a.field for a in assumptions_for(given, True, None)}


@pytest.mark.parametrize("gpu", ["A100-80GB", "A100-40GB"])
def test_fp8_refused_without_fp8_tensor_cores(gpu):
    with pytest.raises(PlanError, match=f"fp8 needs a GPU with FP8 tensor cores: {gpu}"):
        make_plan(with_dtype(SMALL, "fp8"), gpu=gpu)


def test_mxfp8_refused_on_hopper_and_recipe_without_fp8():
    with pytest.raises(PlanError, match="mxfp8 needs Blackwell"):
        make_plan(with_dtype(SMALL, "fp8", "mxfp8"))
    with pytest.raises(PlanError, match="needs model.dtype: fp8"):
        make_plan({**SMALL, "fp8_recipe": "blockwise"})


# ---- GEMM time: above 1x, at most the peak ratio ---------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 1 << 16),
    n=st.integers(1, 1 << 15),
    k=st.integers(1, 1 << 15),
    recipe=st.sampled_from(["tensorwise", "blockwise"]),
)
def test_fp8_gemm_faster_by_at_most_the_peak_ratio(m, n, k, recipe):
    """Every GEMM shape: BF16 time / FP8 time lies in (1, fp8 peak / bf16 peak] (GPU time
    without the fixed kernel time, which both pay alike)."""
    bf16 = make_plan(SMALL)
    fp8 = make_plan(with_dtype(SMALL, "fp8", recipe))
    hw = fp8.hardware
    t16 = KernelTimer(bf16.model, bf16.hardware)
    t8 = KernelTimer(fp8.model, hw)
    fixed = t16.fixed_ms
    ratio = (t16.gemm_gpu_ms(m, n, k) - fixed) / (t8.gemm_gpu_ms(m, n, k, fp8=True) - fixed)
    assert 1.0 < ratio <= hw.fp8_peak_tflops / hw.peak_tflops * (1 + 1e-12)


def test_plan_gemm_time_ratio_and_compute_bound_limit():
    """The plan's linear GEMMs (QKV, projection, MLP) at 8192 tokens: the BF16 / FP8 time ratio
    is above 1 and below the peak ratio; compute-bound it equals peak ratio x FP8 efficiency /
    BF16 efficiency."""
    bf16, fp8 = make_plan(SMALL), make_plan(with_dtype(SMALL, "fp8"))
    t16, t8 = KernelTimer(bf16.model, bf16.hardware), KernelTimer(fp8.model, fp8.hardware)
    h, ffn, tokens = SMALL["hidden_size"], SMALL["ffn_hidden_size"], 8192
    shapes = [(3 * h, h), (h, h), (ffn, h), (h, ffn)]
    total16 = sum(t16.gemm_gpu_ms(tokens, n, k) for n, k in shapes)
    total8 = sum(t8.gemm_gpu_ms(tokens, n, k, fp8=True) for n, k in shapes)
    hw = fp8.hardware
    assert 1.0 < total16 / total8 <= hw.fp8_peak_tflops / hw.peak_tflops
    big = 1 << 14  # compute-bound on both
    gemm = hw.calibration.gemm
    from clustersim.costs.precision import fp8_gemm_efficiency

    expected = (hw.fp8_peak_tflops * fp8_gemm_efficiency(gemm.efficiency, None)) / (
        hw.peak_tflops * gemm.efficiency
    )
    fixed = t16.fixed_ms
    got = (t16.gemm_gpu_ms(big, big, big) - fixed) / (
        t8.gemm_gpu_ms(big, big, big, fp8=True) - fixed
    )
    assert got == pytest.approx(expected, rel=1e-12)
    assert got < hw.fp8_peak_tflops / hw.peak_tflops


def test_fp8_iteration_faster_than_bf16_when_gemms_dominate():
    """A wide model on 4,096-token sequences: FP8 shortens the iteration, by less than the
    peak ratio (quantise kernels, attention and the rest stay)."""
    wide = SMALL | {"hidden_size": 4096, "num_attention_heads": 32, "ffn_hidden_size": 16384}
    seq = {"dist": "fixed", "value": 4096}
    bf16 = simulate(make_plan(wide, seq_len=seq)).metrics["iteration_time_ms"]
    run = simulate(make_plan(with_dtype(wide, "fp8"), seq_len=seq))
    fp8 = run.metrics["iteration_time_ms"]
    assert 1.0 < bf16 / fp8 < 2.0
    # the roofline of an FP8 plan is at the FP8 peak: still a bound
    assert 0 < run.metrics["roofline_ratio_pct"] < 100


# ---- memory per GPU: the recipe's formula, by hand -------------------------------------------


def _params(model: dict[str, Any]) -> int:
    h, ffn, vocab, layers = (model[k] for k in ("hidden_size", "ffn_hidden_size", "vocab_size",
                                                 "num_layers"))  # fmt: skip
    layer = 4 * h * h + 2 * h * ffn + 2 * h  # Q, K, V, O; fc1, fc2; two norms
    return layers * layer + 2 * vocab * h + h  # untied embedding and output layer, final norm


@pytest.mark.parametrize(
    ("recipe", "act_scale", "weight_scale"),
    [("tensorwise", 0.0, 0.0), ("blockwise", 4 / 128, 4 / 128**2)],
)
def test_training_memory_lower_by_the_recipe_formula(recipe, act_scale, weight_scale):
    """One GPU, 1F1B with one micro-batch in flight, flash attention: FP8 changes only
    (a) the weights, 2 bytes -> two FP8 copies 2 (1 + weight scale) per parameter, and
    (b) the saved inputs of the linear layers, 7h elements per token and layer, 2 bytes ->
    1 + activation scale. Gradients (4) and optimizer states (12) are unchanged."""
    bf16, fp8 = make_plan(SMALL), make_plan(with_dtype(SMALL, "fp8", recipe))
    m16 = memory_per_gpu(bf16, Layout(bf16))
    m8 = memory_per_gpu(fp8, Layout(fp8))
    p = _params(SMALL)
    assert count_params(bf16.model).total == p
    h, layers = SMALL["hidden_size"], SMALL["num_layers"]
    weights = (2 - 2 * (1 + weight_scale)) * p
    activations = layers * 7 * SEQ * h * (2 - (1 + act_scale))
    expected = (weights + activations) / GIB
    assert m16.memory_per_gpu_gib - m8.memory_per_gpu_gib == pytest.approx(expected, rel=1e-9)
    assert m8.memory_per_gpu_gib < m16.memory_per_gpu_gib
    assert m8.grads_gib == m16.grads_gib and m8.optimizer_gib == m16.optimizer_gib


def test_deepep_fp8_dispatch_buffer():
    """The all-to-all buffers of an MoE stage: dispatch and combine of T k h elements; with
    DeepEP under FP8 the dispatch holds FP8 (+ 1x128 scales), the combine BF16."""
    par = {"ep": 1, "moe_dispatcher": "deepep"}
    bf16, fp8 = make_plan(MOE, par), make_plan(with_dtype(MOE, "fp8", "blockwise"), par)
    b16 = memory_per_gpu(bf16, Layout(bf16)).buffers_gib
    b8 = memory_per_gpu(fp8, Layout(fp8)).buffers_gib
    tkh = SEQ * 2 * MOE["hidden_size"]
    assert (b16 - b8) * GIB == pytest.approx(tkh * (2 - (1 + 4 / 128)), rel=1e-9)


# ---- engine: FP8 dispatch bytes, FP8 parameter all-gather ------------------------------------


def _rows(report, op):
    cols = dict(report.recorder.columns())
    return cols["bytes"][cols["op"] == op], cols["microbatch"][cols["op"] == op]


def test_deepep_forward_dispatch_moves_fp8_bytes():
    """EP 8, even routing: every forward dispatch row carries (1 + 4/128) / 2 of the BF16 run's
    bytes; combines and the backward's transfers stay BF16."""
    par = {"dp": 8, "ep": 8, "moe_dispatcher": "deepep", "num_microbatches": 2}
    bf16 = simulate(make_plan(MOE, par))
    fp8 = simulate(make_plan(with_dtype(MOE, "fp8", "blockwise"), par))
    d16, _ = _rows(bf16, Op.A2A_DISPATCH)
    d8, _ = _rows(fp8, Op.A2A_DISPATCH)
    c16, _ = _rows(bf16, Op.A2A_COMBINE)
    c8, _ = _rows(fp8, Op.A2A_COMBINE)
    np.testing.assert_allclose(np.sort(c8), np.sort(c16), rtol=1e-12)
    # forward dispatches (half of the dispatch rows) scaled, the backward ones not
    ratio = np.sort(d8) / np.sort(d16)
    assert sorted(set(np.round(ratio, 12))) == pytest.approx([(1 + 4 / 128) / 2, 1.0])


def test_param_gather_rows_carry_fp8_bytes():
    """Distributed optimizer over DP 4: the parameter all-gather row carries the gathered
    bytes, 2 per parameter in BF16 and one FP8 copy (1 + 4/128^2) under blockwise FP8."""
    par = {"dp": 4, "distributed_optimizer": True, "overlap_communication": False}
    p = _params(SMALL)
    for model, per_param in ((SMALL, 2.0), (with_dtype(SMALL, "fp8"), 1 + 4 / 128**2)):
        nbytes, _ = _rows(simulate(make_plan(model, par)), Op.PARAM_GATHER)
        assert nbytes == pytest.approx(np.full(len(nbytes), per_param * p), rel=1e-12)


# ---- serving: FP8 weights and KV cache -------------------------------------------------------


def _serving(model: dict[str, Any], kv_dtype: str | None = None) -> Plan:
    requests: dict[str, Any] = {"num": 4}
    if kv_dtype:
        requests["kv_dtype"] = kv_dtype
    return make_plan(model, mode="inference", requests=requests)


def test_serving_fp8_weights_and_kv_cache():
    """Serving keeps one FP8 copy of the weights (1 + scale bytes per parameter, row-wise
    only); ``kv_dtype: fp8`` stores 1 byte per KV element instead of 2."""
    p = _params(SMALL)
    s16 = _serving(SMALL)
    s8 = _serving(with_dtype(SMALL, "fp8", "blockwise"), kv_dtype="fp8")
    m16, m8 = serving_memory(s16, Layout(s16)), serving_memory(s8, Layout(s8))
    assert m16.weights_gib[0] * GIB == pytest.approx(2 * p, rel=1e-12)
    assert m8.weights_gib[0] * GIB == pytest.approx((1 + 4 / 128**2) * p, rel=1e-12)
    assert m8.kv_bytes_per_token[0] == pytest.approx(m16.kv_bytes_per_token[0] / 2, rel=1e-12)
    # default: the activations' type (BF16) for an FP8 model
    default = _serving(with_dtype(SMALL, "fp8", "blockwise"))
    assert serving_memory(default, Layout(default)).kv_bytes_per_token == m16.kv_bytes_per_token


def test_gb200_preset_is_one_nvl72_domain():
    """GB200: trays of 4 GPUs in one NVLink domain of 72, so an EP 64 group of 16 trays never
    leaves NVLink; H100 nodes of 8 put the same group across 8 nodes."""
    plans = [
        plan_from_dict(
            {
                "model": copy.deepcopy(MOE) | {"moe": {"num_experts": 64, "top_k": 2}},
                "hardware": {"gpu": gpu, "num_nodes": 64 // gpn, "gpus_per_node": gpn},
                "parallel": {"tp": 1, "pp": 1, "dp": 64, "ep": 64},
            },
            "test",
        )
        for gpu, gpn in (("GB200", 4), ("H100-SXM", 8))
    ]
    gb200, h100 = (Layout(p) for p in plans)
    assert plans[0].hardware.nvlink_domain == 72 and len(gb200.groups("ep")[0]) == 64
    assert not gb200.crosses_nvlink_domain("ep")
    assert h100.crosses_nvlink_domain("ep")


# ---- quantise fused into the norm before the GEMM (Transformer Engine, training) -------------


def _quantise_kernel_ms(plan: Plan, tokens: float, width: float, copies: int) -> float:
    """One stand-alone tensorwise quantise kernel by hand: read BF16 (2 bytes), write
    ``copies`` FP8 copies (1 byte each) of tokens x width elements at the element-wise HBM
    rate, plus the kernel's fixed GPU time; the stream advances by the larger of that (plus
    the inter-kernel gap) and the host's launch, plus the framework time."""
    cal, hw = plan.hardware.calibration, plan.hardware
    rate = hw.hbm_bandwidth_gbps * 1e9 * cal.memory.elementwise_efficiency
    gpu_ms = tokens * width * (2 + copies) / rate * 1e3 + cal.kernel.fixed_us * 1e-3
    busy = gpu_ms + cal.kernel.graph_launch_us * 1e-3
    return max(busy, cal.kernel.launch_us * 1e-3) + cal.kernel.framework_us * 1e-3


def test_fused_norm_quantise_saves_the_quantise_kernels_by_hand():
    """Tensorwise FP8 training of a dense MHA layer (Megatron-Core: TELayerNormColumnParallel
    Linear for QKV and FC1, whose norm writes the FP8 copies): the norm moves 2 + 2 x 1 bytes
    per element instead of 2 + 2, so exactly the two stand-alone quantise kernels (QKV and FC1
    inputs, h wide) disappear; the output projection and FC2 still quantise. An MoE layer's
    pre-MLP norm also feeds the router: only the QKV one goes."""
    plan = make_plan(with_dtype(SMALL, "fp8", "tensorwise"))
    fused = KernelTimer(plan.model, plan.hardware, training=True)
    plain = KernelTimer(plan.model, plan.hardware, training=True)
    plain.fuse_quantise = False
    assert fused.fuse_quantise
    h, tokens = SMALL["hidden_size"], 4096.0
    one = _quantise_kernel_ms(plan, tokens, h, copies=2)
    dense_fused = fused.attention_block_ms(tokens, mlp_input_fp8=True) + fused.dense_mlp_ms(
        tokens, input_fp8=True
    )
    dense_plain = plain.attention_block_ms(tokens, mlp_input_fp8=True) + plain.dense_mlp_ms(
        tokens, input_fp8=True
    )
    assert dense_plain - dense_fused == pytest.approx(2 * one, rel=1e-9)
    moe_saving = plain.attention_block_ms(tokens) - fused.attention_block_ms(tokens)
    assert moe_saving == pytest.approx(one, rel=1e-9)


def test_fused_quantise_mla_up_projections_only():
    """MLA (Megatron-Core's spec: input norm a separate TENorm, q/kv down-projections TELinear,
    up-projections TELayerNormColumnParallelLinear fused with the latent norms): the quantise
    kernels of the two latents (q_lora and kv_lora wide) go, the down-projections' stay."""
    plan = plan_from_dict(
        {
            "model": {"preset": "deepseek-v3", "num_layers": 4, "dtype": "fp8",
                      "fp8_recipe": "tensorwise"},
            "hardware": {"gpu": "H100-SXM", "num_nodes": 1, "gpus_per_node": 8},
            "parallel": {"tp": 1, "pp": 1, "dp": 8, "ep": 8},
            "workload": {"seq_len": {"dist": "fixed", "value": 4096}},
        },
        "test",
    )  # fmt: skip
    fused = KernelTimer(plan.model, plan.hardware, training=True)
    plain = KernelTimer(plan.model, plan.hardware, training=True)
    plain.fuse_quantise = False
    mla, tokens = plan.model.mla, 4096.0
    saving = plain.attention_block_ms(tokens) - fused.attention_block_ms(tokens)
    expected = _quantise_kernel_ms(plan, tokens, mla.q_lora_rank, 2) + _quantise_kernel_ms(
        plan, tokens, mla.kv_lora_rank, 2
    )
    assert saving == pytest.approx(expected, rel=1e-9)


def test_no_fusion_for_serving_or_bf16():
    """The fusion is Transformer Engine's training path: inference timers and BF16 plans
    keep their kernels (the flags change nothing)."""
    fp8 = make_plan(with_dtype(SMALL, "fp8", "tensorwise"))
    serving = KernelTimer(fp8.model, fp8.hardware, training=False)
    bf16 = make_plan(SMALL)
    for timer in (serving, KernelTimer(bf16.model, bf16.hardware, training=True)):
        assert not timer.fuse_quantise
        assert timer.attention_block_ms(512.0, mlp_input_fp8=True) == timer.attention_block_ms(
            512.0
        )
        assert timer.dense_mlp_ms(512.0, input_fp8=True) == timer.dense_mlp_ms(512.0)


def test_deepep_fp8_dispatch_quantises_before_the_dispatch_by_hand():
    """DeepSeek-V3 Sec. 3.3.3: the tokens are quantised to FP8 before the dispatch. With
    ``moe_dispatcher: deepep`` the attention lane pays one tensorwise quantise of its tokens (read
    2, write 1 byte per element, h wide) and the experts' FC1 no longer quantises its copies
    (read 2, write 2 x 1; one kernel per local expert, as Transformer Engine's grouped
    linear quantises each expert's input on its own) but writes the column-wise copy from the
    row-wise one (read 1, write 1; one kernel over every copy)."""
    model = with_dtype(MOE, "fp8", "tensorwise")
    plans = {d: make_plan(model, {"dp": 8, "ep": 8, "moe_dispatcher": d}) for d in
             ("alltoall", "deepep")}  # fmt: skip
    from clustersim.engine.training.optimes import kernel_timer

    timers = {d: kernel_timer(p) for d, p in plans.items()}
    assert timers["deepep"].fp8_dispatch and not timers["alltoall"].fp8_dispatch
    plan, h, tokens, copies = plans["deepep"], MOE["hidden_size"], 4096.0, 3000.0

    def pass_ms(rows: float, bytes_per_row: float) -> float:  # one element-wise kernel
        cal, hw = plan.hardware.calibration, plan.hardware
        rate = hw.hbm_bandwidth_gbps * 1e9 * cal.memory.elementwise_efficiency
        gpu_ms = rows * bytes_per_row / rate * 1e3 + cal.kernel.fixed_us * 1e-3
        busy = gpu_ms + cal.kernel.graph_launch_us * 1e-3
        return max(busy, cal.kernel.launch_us * 1e-3) + cal.kernel.framework_us * 1e-3

    lane = timers["deepep"].moe_block_ms(tokens) - timers["alltoall"].moe_block_ms(tokens)
    assert lane == pytest.approx(pass_ms(tokens, h * (2 + 1)), rel=1e-9)
    experts = {d: float(t.experts_ms(copies, 4.0)) for d, t in timers.items()}
    experts_per_rank = 4
    saved = experts_per_rank * pass_ms(copies / experts_per_rank, h * (2 + 2)) - pass_ms(
        copies, h * (1 + 1)
    )
    assert experts["alltoall"] - experts["deepep"] == pytest.approx(saved, rel=1e-9)

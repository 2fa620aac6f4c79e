"""MoE training costs the per-kernel model charges: permutes and chunk sorts, grouped GEMMs at
few tokens per expert, the dropless synchronisation, the cross-entropy loss. Each checked
against its closed form (bytes / (efficiency x HBM bandwidth), roofline bounds), not against
captured outputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustersim.costs.kernels import (
    CROSS_ENTROPY_BWD_BYTES,
    CROSS_ENTROPY_FWD_BYTES,
    PERMUTE_PASSES,
    KernelTimer,
)
from clustersim.engine.recorder import Op
from clustersim.engine.training.optimes import ExpertTimer
from clustersim.run.simulate import simulate
from clustersim.spec import plan_from_dict
from clustersim.spec.calibration_data import calibration_generations

GENERATIONS = list(calibration_generations())
MOE = {
    "num_layers": 2,
    "hidden_size": 1024,
    "num_attention_heads": 8,
    "num_kv_heads": 4,
    "ffn_hidden_size": 2048,
    "vocab_size": 32000,
    "activation": "swiglu",
    "moe": {"num_experts": 8, "top_k": 2, "routing": "even"},
}


def make_plan(parallel: dict, moe: dict | None = None, generation: str = "h100", **cal):
    model = copy.deepcopy(MOE)
    model["moe"].update(moe or {})
    par = {"tp": 1, "pp": 1, "dp": 1, "ep": 1, **parallel}
    world = par["tp"] * par["pp"] * par["dp"]
    return plan_from_dict(
        {
            "model": model,
            "hardware": {
                "gpu": "H100-SXM",
                "num_nodes": max(1, world // 8),
                "gpus_per_node": 8,
                "calibration": {"generation": generation, **cal},
            },
            "parallel": par,
            "workload": {"seq_len": {"dist": "fixed", "value": 2048}},
        },
        "test",
    )


# ---- memory-bound MoE kernels ----------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(GENERATIONS), st.integers(1, 1 << 20))
def test_permute_time_is_bytes_over_stream_bandwidth(generation, copies):
    """A permute (and each chunk sort) reads and writes every token copy once:
    ``2 h bytes / (memory.efficiency x HBM)`` of GPU time (``memory.l2_speedup`` x faster
    when the bytes fit in the L2 cache) plus the stream kernels' fixed time, issued as one
    kernel (the GPU's kernel-to-kernel gap inside the host launch's shadow). The chunk sort
    adds exactly two such kernels to the experts."""
    plan = make_plan({"dp": 4, "ep": 4})
    hw = plan.hardware
    k = KernelTimer(plan.model, hw)
    nbytes = copies * PERMUTE_PASSES * MOE["hidden_size"] * 2  # bf16
    mem = hw.calibration.memory
    speedup = mem.l2_speedup if nbytes <= mem.l2_mb * 1e6 else 1.0
    gpu_ms = nbytes / (hw.hbm_bandwidth_gbps * 1e9 * mem.efficiency * speedup) * 1e3
    cal = hw.calibration.kernel
    gpu_ms += cal.stream_fixed_us * 1e-3
    one = max(gpu_ms + cal.graph_launch_us * 1e-3, cal.launch_us * 1e-3) + cal.framework_us * 1e-3
    per_token = PERMUTE_PASSES * MOE["hidden_size"] * 2
    assert k.stream_ms(float(copies), per_token) == pytest.approx(one, rel=1e-12)
    sorted_ = k.experts_ms(float(copies), 2.0, chunk_sort=True)
    plain = k.experts_ms(float(copies), 2.0, chunk_sort=False)
    assert sorted_ - plain == pytest.approx(2 * one, rel=1e-9)


def test_chunk_sort_only_where_megatron_sorts():
    """Megatron-Core re-sorts received copies when a GPU holds several experts fed by several
    ranks; never with one expert per GPU, nor without EP / ETP, nor in serving engines."""
    assert not ExpertTimer(make_plan({"dp": 1})).chunk_sort  # one GPU: nothing to sort
    assert ExpertTimer(make_plan({"dp": 4, "ep": 4})).chunk_sort  # 2 experts per GPU
    assert not ExpertTimer(make_plan({"dp": 8, "ep": 8})).chunk_sort  # 1 expert per GPU
    assert ExpertTimer(make_plan({"tp": 2, "dp": 1, "etp": 2})).chunk_sort  # ETP sources
    assert not ExpertTimer(make_plan({"dp": 4, "ep": 4}), sync=False).chunk_sort  # serving


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(GENERATIONS),
    st.integers(1, 65536),
    st.sampled_from([1, 2, 4, 8]),
    st.sampled_from([8000, 32000, 152064]),
)
def test_cross_entropy_is_its_memory_passes(generation, tokens, tp, vocab):
    """Vocabulary-parallel cross-entropy: 38 (forward) and 14 (backward) bytes per logit of
    this GPU's ``vocab / tp`` columns at the element-wise efficiency; more vocabulary or
    tokens never cost less, a wider TP never more."""
    plan = make_plan({}, generation=generation)
    model = plan.model.model_copy(update={"vocab_size": vocab})
    hw, cal = plan.hardware, plan.hardware.calibration
    k = KernelTimer(model, hw, tp)
    rate = hw.hbm_bandwidth_gbps * 1e9 * cal.memory.elementwise_efficiency
    for per_logit, backward in ((CROSS_ENTROPY_FWD_BYTES, False), (CROSS_ENTROPY_BWD_BYTES, True)):
        gpu = tokens * vocab / tp * per_logit / rate * 1e3 + cal.kernel.fixed_us * 1e-3
        busy = gpu + cal.kernel.graph_launch_us * 1e-3  # the kernel-to-kernel gap
        want = max(busy, cal.kernel.launch_us * 1e-3) + cal.kernel.framework_us * 1e-3
        got = k.cross_entropy_ms(float(tokens), backward=backward)
        assert got == pytest.approx(want, rel=1e-12)
        wider = KernelTimer(model, hw, 2 * tp).cross_entropy_ms(float(tokens), backward=backward)
        assert wider <= got + 1e-15
    assert k.cross_entropy_ms(float(tokens)) >= k.cross_entropy_ms(float(tokens), backward=True)


# ---- grouped GEMMs ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(GENERATIONS),
    st.floats(1.0, 1e5),
    st.floats(1.05, 8.0),
    st.sampled_from([256, 1024, 2048, 7168]),
    st.sampled_from([512, 2048, 6144]),
    st.sampled_from([1, 8, 64]),
)
def test_grouped_gemm_efficiency_rises_with_tokens_per_expert(gen, per_expert, more, n, k, groups):
    """Compute time per routed copy never rises when each expert gets more copies (fuller
    tiles), and a grouped GEMM never beats the roofline: ``2 m n k / peak`` nor its weights
    and activations over the HBM bandwidth."""
    plan = make_plan({}, generation=gen)
    hw = plan.hardware
    t = KernelTimer(plan.model, hw)
    fixed = hw.calibration.kernel.fixed_us * 1e-3
    m1, m2 = per_expert * groups, per_expert * more * groups
    per_copy_1 = (t.gemm_gpu_ms(m1, n, k, groups) - fixed) / m1
    per_copy_2 = (t.gemm_gpu_ms(m2, n, k, groups) - fixed) / m2
    assert per_copy_2 <= per_copy_1 * (1 + 1e-12)
    for m in (m1, m2):
        gpu = t.gemm_gpu_ms(m, n, k, groups) - fixed
        peak_ms = 2 * m * n * k / (hw.peak_tflops * 1e12) * 1e3
        hbm_ms = (m * k + groups * k * n + m * n) * 2 / (hw.hbm_bandwidth_gbps * 1e9) * 1e3
        assert gpu >= max(peak_ms, hbm_ms) * (1 - 1e-12)


def _issued_ms(cal, gpu_ms: float) -> float:
    """Stream time of one eager kernel of GPU time ``gpu_ms`` (kernels.py's issue rule)."""
    busy = gpu_ms + cal.kernel.graph_launch_us * 1e-3
    return max(busy, cal.kernel.launch_us * 1e-3) + cal.kernel.framework_us * 1e-3


@pytest.mark.parametrize("generation", ["h100", "b200"])
@pytest.mark.parametrize("experts", [1, 4, 32])
def test_training_grouped_gemm_is_one_gemm_per_local_expert(generation, experts):
    """Megatron-Core's grouped GEMM in training is Transformer Engine's grouped linear: one
    cuBLAS GEMM per local expert (multi-stream), each launched by the host on its own. So
    the experts' FC1 of ``a`` experts over ``c`` copies costs ``a`` issued GEMMs of ``c / a``
    rows, by hand from the roofline-with-shape formula; a serving engine's fused MoE kernel is
    one launch for all experts."""
    plan = make_plan({"dp": 8, "ep": 8}, generation=generation)
    hw, cal = plan.hardware, plan.hardware.calibration
    h, ffn, copies = MOE["hidden_size"], MOE["ffn_hidden_size"], 8192.0
    n, k = 2 * ffn, h  # swiglu: gate and up in one GEMM
    half = cal.gemm.half_dim

    def gemm_gpu_ms(rows: float, groups: float) -> float:
        shape = (rows / groups) / (rows / groups + half) * n / (n + half) * k / (k + half)
        compute = 2 * rows * n * k / (hw.peak_tflops * 1e12 * cal.gemm.efficiency * shape)
        memory = (
            (rows * k + groups * k * n + rows * n)
            * 2
            / (hw.hbm_bandwidth_gbps * 1e9 * cal.gemm.memory_efficiency)
        )
        return max(compute, memory) * 1e3 + cal.kernel.fixed_us * 1e-3

    training = KernelTimer(plan.model, hw, training=True)
    serving = KernelTimer(plan.model, hw, training=False)
    per_expert = experts * _issued_ms(cal, gemm_gpu_ms(copies / experts, 1.0))
    fused = _issued_ms(cal, gemm_gpu_ms(copies, float(experts)))
    assert training._grouped_linear_ms(copies, n, k, float(experts)) == pytest.approx(
        per_expert, rel=1e-12
    )
    assert serving._grouped_linear_ms(copies, n, k, float(experts)) == pytest.approx(
        fused, rel=1e-12
    )
    if experts == 1:
        assert per_expert == pytest.approx(fused, rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(GENERATIONS),
    st.floats(1.0, 1e6),
    st.floats(1.0, 64.0),
    st.sampled_from(["bf16", "fp8"]),
)
def test_per_expert_launches_never_beat_one_grouped_kernel(gen, copies, experts, dtype):
    """The same FLOPs and bytes launched as one GEMM per expert are never faster than one
    grouped kernel (each launch adds its fixed time and host cost), in either precision, for
    the experts' whole forward too; and more local experts never make it cheaper."""
    plan = make_plan({"dp": 8, "ep": 8}, generation=gen)
    model = plan.model
    if dtype == "fp8":
        model = model.model_copy(update={"dtype": "fp8", "fp8_recipe": "mxfp8"})
    training = KernelTimer(model, plan.hardware, training=True)
    fused = KernelTimer(model, plan.hardware, training=False)
    n, k = 2 * MOE["ffn_hidden_size"], MOE["hidden_size"]
    many = float(training._grouped_linear_ms(copies, n, k, experts))
    one = float(fused._grouped_linear_ms(copies, n, k, experts))
    assert many >= one * (1 - 1e-12)
    more = float(training._grouped_linear_ms(copies, n, k, experts + 1.0))
    assert more >= many * (1 - 1e-12)


def test_fine_grained_experts_cost_more_than_coarse_ones_for_the_same_flops():
    """The same routed FLOPs over 64 experts of 1/8 the width (top-8) take longer than over 8
    experts (top-1): fewer tokens per expert and narrower GEMMs fill fewer tiles."""
    plan = make_plan({})
    t = KernelTimer(plan.model, plan.hardware)
    tokens, h, ffn = 4096.0, 6144, 16384
    coarse = t.gemm_gpu_ms(tokens, ffn, h, 8)
    fine = t.gemm_gpu_ms(8 * tokens, ffn / 8, h, 64)
    assert fine > coarse


# ---- dropless synchronisation in the engine ---------------------------------------------------


def _expert_rows(report, op: Op) -> np.ndarray:
    cols = report.recorder.columns()
    pick = cols["op"] == op
    order = np.lexsort((cols["microbatch"][pick], cols["layer"][pick], cols["lane"][pick]))
    return (cols["end_ms"] - cols["start_ms"])[pick][order]


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_dropless_sync_once_per_forward_pass(recompute):
    """Dropless routing waits for the token counts once per MoE layer and forward pass:
    ``dropless_sync_us + launch_us + framework_us`` (the device-to-host round trip, then the
    host relaunches). With capacity (no drop at balanced routing) there is no wait; the
    backward pays it only when a full recompute runs the forward again."""
    parallel = {"dp": 4, "ep": 4, "num_microbatches": 2, "recompute": recompute}
    dropless = simulate(make_plan(parallel, {"capacity_factor": None}))
    capped = simulate(make_plan(parallel, {"capacity_factor": 4.0}))
    cal = make_plan(parallel).hardware.calibration
    sync_ms = (cal.moe.dropless_sync_us + cal.kernel.launch_us + cal.kernel.framework_us) * 1e-3
    assert sync_ms > 0
    fwd = _expert_rows(dropless, Op.EXPERT_FWD) - _expert_rows(capped, Op.EXPERT_FWD)
    bwd = _expert_rows(dropless, Op.EXPERT_BWD) - _expert_rows(capped, Op.EXPERT_BWD)
    np.testing.assert_allclose(fwd, sync_ms, rtol=1e-9)
    np.testing.assert_allclose(bwd, sync_ms if recompute == "full" else 0.0, atol=1e-12)

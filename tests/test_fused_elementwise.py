"""Serving engines that fuse element-wise kernels (``workload.requests.fused_elementwise``)
against hand counts of their kernels and the bytes each fused kernel moves."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_plans import DENSE, make_plan

from clustersim.costs.kernels import ELEMENTWISE, NORM, STREAM
from clustersim.costs.serving import step_costs
from clustersim.layout import Layout

# A launch far longer than any kernel of a one-token step: each kernel then costs exactly one
# launch plus the framework time, so a layer's time counts its kernels.
SLOW_LAUNCH_US = 10_000.0


def _costs(fused: bool, dtype: str = "bf16", launch_us: float | None = None):
    model = {"preset": "llama-2-7b", "dtype": dtype}
    if dtype == "fp8":
        model["fp8_recipe"] = "tensorwise"
    hardware = {}
    if launch_us is not None:
        hardware = {"calibration": {"kernel": {"launch_us": launch_us, "framework_us": 0.0}}}
    plan = make_plan(
        DENSE,
        model=model,
        hardware=hardware,
        requests={"fused_elementwise": fused, "cuda_graphs": False},
    )
    return plan, step_costs(plan, Layout(plan))


@pytest.mark.parametrize(
    ("dtype", "fused", "kernels"),
    [
        # norm, QKV, rotary, out, residual, norm, up, activation, down, residual, cache write
        ("bf16", False, 11),
        # + a quantise before each of the four GEMMs
        ("fp8", False, 15),
        # norm (+ residual), QKV, out, norm (+ residual), up (+ activation), down, cache write
        # (+ rotary); the quantises are written by the kernels before the GEMMs
        ("bf16", True, 7),
        ("fp8", True, 7),
    ],
)
def test_launch_bound_dense_layer_counts_its_kernels(dtype, fused, kernels):
    plan, costs = _costs(fused, dtype, SLOW_LAUNCH_US)
    dense = costs.parts(1, 1)[0]  # one token, TP 1: no all-reduce
    assert dense == pytest.approx(kernels * SLOW_LAUNCH_US * 1e-3, rel=1e-12)


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_fused_norm_moves_the_norm_and_the_residual_bytes(dtype):
    """The fused residual + norm of a large batch: the norm's pass (read h, write h in the
    GEMM's input type) at the norm rate and fixed time, the residual's 2h at the stream rate."""
    plan, costs = _costs(True, dtype)
    k, cal, hw = costs.eager, plan.hardware.calibration, plan.hardware
    tokens, h = 65536.0, plan.model.hidden_size
    hbm = hw.hbm_bandwidth_gbps * 1e9
    out_bytes = 1.0 if dtype == "fp8" else 2.0
    norm_s = tokens * h * (2.0 + out_bytes) / (hbm * cal.memory.norm_efficiency)
    residual_s = tokens * h * 2 * 2.0 / (hbm * cal.memory.efficiency)
    gpu_ms = (norm_s + residual_s) * 1e3 + cal.kernel.norm_fixed_us * 1e-3
    want = gpu_ms + cal.kernel.graph_launch_us * 1e-3 + cal.kernel.framework_us * 1e-3
    assert float(k._norm(tokens)) == pytest.approx(want, rel=1e-12)
    assert float(k._residual(tokens)) == 0.0


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 1 << 17),
    dtype=st.sampled_from(["bf16", "fp8"]),
)
def test_fusing_is_never_slower(tokens, dtype):
    """Fusing only removes kernels and bytes: every part of a step (dense layer, any batch)
    takes no longer fused than unfused."""
    _, plain = _costs(False, dtype)
    _, fused = _costs(True, dtype)
    seqs = max(1, tokens // 512)
    assert fused.parts(tokens, seqs)[0] <= plain.parts(tokens, seqs)[0]
    k_plain, k_fused = plain.eager, fused.eager
    for kind in (STREAM, ELEMENTWISE, NORM):  # the classes themselves are unchanged
        assert k_fused.memory_gpu_ms(tokens * 1e3, kind) == k_plain.memory_gpu_ms(
            tokens * 1e3, kind
        )


def test_training_never_fuses():
    """The option describes a serving engine: a training plan's kernel timer is unfused."""
    from clustersim.engine.training.optimes import kernel_timer
    from clustersim.spec.load import plan_from_dict

    raw = {
        "name": "t",
        "model": {"preset": "llama-2-7b"},
        "hardware": {"gpu": "H100-SXM", "num_nodes": 1, "gpus_per_node": 8},
        "parallel": {"tp": 1, "pp": 1, "dp": 8},
        "workload": {"mode": "training", "requests": {"fused_elementwise": True}},
    }
    assert not kernel_timer(plan_from_dict(raw, "<test>")).fused

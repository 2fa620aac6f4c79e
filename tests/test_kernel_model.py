"""Properties of the calibrated per-kernel model (costs/kernels.py) and of serving decode
steps built on it: what must hold whatever the fitted values are."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_plans import DENSE, make_plan

from clustersim.costs.kernels import KernelTimer
from clustersim.costs.params import count_params
from clustersim.costs.serving import core_attention_ms, kv_bytes_per_token_layer, step_costs
from clustersim.layout import Layout
from clustersim.spec.calibration_data import calibration_generations

GENERATIONS = list(calibration_generations())


def decode_step_ms(plan, batch: int, context: int) -> float:
    """Token-wise parts and core attention of one decode step of ``batch`` requests, each
    with ``context`` tokens of KV cache (one stage, one replica)."""
    costs = step_costs(plan, Layout(plan))
    parts = costs.parts(batch, batch)
    pairs = batch * (context + 1)
    core = core_attention_ms(parts, pairs, batch * (context + 1), batch, costs)
    layers = plan.model.num_layers
    return layers * (parts[0] + core) + parts[2]


@settings(max_examples=40, deadline=None)
@given(
    generation=st.sampled_from(GENERATIONS),
    tokens=st.integers(1, 8192),
    tp=st.sampled_from([1, 2, 4, 8]),
)
def test_cuda_graphs_are_never_slower(generation, tokens, tp):
    plan = make_plan(DENSE, hardware={"gpu": "H100-SXM", "calibration": {"generation": generation}})
    eager = KernelTimer(plan.model, plan.hardware, tp)
    graph = KernelTimer(plan.model, plan.hardware, tp, graphs=True)
    for name in ("attention_block_ms", "dense_mlp_ms", "logits_ms"):
        assert getattr(graph, name)(tokens) <= getattr(eager, name)(tokens) + 1e-12


def test_cuda_graphs_speed_up_small_decode_end_to_end():
    """One request: decode steps with graphs are faster than eager ones, prefill unchanged."""
    from clustersim.run.serving import simulate_serving

    requests = {
        "num": 1,
        "prompt_len": {"dist": "fixed", "value": 128},
        "output_len": {"dist": "fixed", "value": 16},
    }
    on = simulate_serving(make_plan(DENSE, requests={**requests, "cuda_graphs": True})).metrics
    off = simulate_serving(make_plan(DENSE, requests={**requests, "cuda_graphs": False})).metrics
    assert on["tpot_ms_p50"] < off["tpot_ms_p50"]
    assert on["ttft_ms_p50"] == pytest.approx(off["ttft_ms_p50"], rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    slow_gbps=st.floats(500, 8000),
    factor=st.floats(1.0, 3.0),
    batch=st.integers(1, 256),
    context=st.integers(0, 8192),
)
def test_decode_step_falls_when_hbm_bandwidth_rises(slow_gbps, factor, batch, context):
    slow = make_plan(DENSE, hardware={"hbm_bandwidth_gbps": slow_gbps})
    fast = make_plan(DENSE, hardware={"hbm_bandwidth_gbps": slow_gbps * factor})
    assert decode_step_ms(fast, batch, context) <= decode_step_ms(slow, batch, context) + 1e-12


@pytest.mark.parametrize("batch", [2, 4, 8, 16])
def test_small_decode_batches_share_one_weight_read(batch):
    """Decode is bound by reading the weights once per step: a batch of 16 costs little more
    than one request (only activations and FLOPs grow, far below the ridge)."""
    plan = make_plan(DENSE)
    one, many = decode_step_ms(plan, 1, 0), decode_step_ms(plan, batch, 0)
    assert one <= many <= one * 1.05
    # and the step is no faster than the weights at the calibrated HBM rate
    hw = plan.hardware
    weights = count_params(plan.model).total - count_params(plan.model).embedding
    byte_rate = hw.hbm_bandwidth_gbps * 1e9 * hw.calibration.gemm.memory_efficiency
    assert one >= weights * 2 / byte_rate * 1e3


@pytest.mark.parametrize(("batch", "context"), [(1, 4096), (8, 2048), (64, 1024)])
def test_decode_grows_with_context_by_the_kv_read(batch, context):
    """More context adds exactly the KV cache read (decode attention is memory-bound)."""
    plan = make_plan(DENSE)
    hw, model = plan.hardware, plan.model
    extra = decode_step_ms(plan, batch, context) - decode_step_ms(plan, batch, 0)
    kv_rate = hw.hbm_bandwidth_gbps * 1e9 * hw.calibration.attention.decode_memory_efficiency
    per_layer = batch * context * kv_bytes_per_token_layer(model, 1) / kv_rate * 1e3
    assert extra == pytest.approx(model.num_layers * per_layer, rel=1e-6)

"""Physical properties of the calibrated collective and serving step models (Hypothesis):
bus bandwidth never falls as the message grows, the CUDA-graph TP all-reduce is never slower
than the eager one, and a decode step is never faster than its HBM roofline."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_plans import DENSE, make_plan

from clustersim.costs import comm
from clustersim.costs.memory import DTYPE_BYTES
from clustersim.costs.params import count_params
from clustersim.costs.serving import step_costs
from clustersim.layout import Layout
from clustersim.spec.calibration_data import calibration_data
from clustersim.spec.presets import GPU_PRESETS
from clustersim.spec.schema import CalibrationSpec, HardwareSpec

GPUS = ("A100-80GB", "H100-SXM", "H200")


def _hw(gpu: str, generation: str, num_nodes: int = 4) -> HardwareSpec:
    cal = CalibrationSpec.model_validate(calibration_data(generation))
    return HardwareSpec(
        gpu=gpu, num_nodes=num_nodes, gpus_per_node=8, calibration=cal, **GPU_PRESETS[gpu]
    )


@settings(max_examples=150, deadline=None)
@given(
    generation=st.sampled_from(["a100", "h100", "h200"]),
    op=st.sampled_from(["all_reduce", "reduce_scatter", "all_gather", "all_to_all"]),
    algorithm=st.sampled_from(["ring", "tree", "hierarchical", "auto"]),
    n=st.sampled_from([2, 4, 8, 16, 32]),
    size=st.floats(1e2, 1e9),
    factor=st.floats(1.0, 1e3),
)
def test_bus_bandwidth_never_falls_as_the_message_grows(generation, op, algorithm, n, size, factor):
    """algbw = S / t(S) is non-decreasing in S: every model is a sum (or a minimum) of a fixed
    time and a time proportional to S."""
    gpu = {"a100": "A100-80GB", "h100": "H100-SXM", "h200": "H200"}[generation]
    hw = _hw(gpu, generation)
    if algorithm == "tree" and op != "all_reduce":
        algorithm = "ring"
    ranks = list(range(n))
    small = comm.collective_time_ms(op, size, ranks, 8, hw, algorithm)
    large = comm.collective_time_ms(op, size * factor, ranks, 8, hw, algorithm)
    assert size * factor / large >= size / small * (1 - 1e-9)


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_graph_tp_allreduce_bus_bandwidth_rises_and_never_beats_eager(gpu, tp):
    plan = make_plan(DENSE, hardware={"gpu": gpu, "gpus_per_node": 8}, parallel={"tp": tp})
    costs = step_costs(plan, Layout(plan))
    previous = 0.0
    for tokens in (1, 2, 4, 16, 64, 256, 1024, 4096, 16384):
        graph = costs.tp_allreduce_graph.scalar_ms(tokens)
        assert graph <= costs.tp_allreduce.scalar_ms(tokens) + 1e-12
        algbw = tokens / graph
        assert algbw >= previous * (1 - 1e-9)
        previous = algbw


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("batch", [1, 8, 64, 256])
def test_decode_step_never_beats_the_hbm_roofline(gpu, batch):
    """A decode step reads every weight and the batch's KV cache at least once: never faster
    than those bytes at the full HBM bandwidth, with or without CUDA graphs."""
    plan = make_plan(DENSE, hardware={"gpu": gpu})
    model, hw = plan.model, plan.hardware
    costs = step_costs(plan, Layout(plan))
    counts = count_params(model)
    context = 1024
    bpe = DTYPE_BYTES[model.dtype]
    weights = (counts.total - counts.embedding) * bpe
    kv = batch * context * costs.attn_bytes_per_kv_token * model.num_layers
    floor_ms = (weights + kv) / (hw.hbm_bandwidth_gbps * 1e9) * 1e3
    from clustersim.costs.serving import core_attention_ms

    parts = costs.parts(batch, batch)
    dense, logits = parts[0], parts[2]
    core = core_attention_ms(parts, batch * context, batch * context, batch, costs)
    step = model.num_layers * (dense + core) + logits
    assert step >= floor_ms


def test_mla_decode_scores_in_the_latent_space():
    """DeepSeek-V3 (128 heads, latent 512, rotary 64) at TP 8: 2 x 16 x (2 x 512 + 64) =
    34,816 FLOPs per query-key pair in decode (absorbed), 2 x 16 x (192 + 128) = 10,240 in
    prefill; a dense model's are the same in both."""
    from clustersim.costs.serving import decode_flops_per_pair
    from clustersim.spec.load import plan_from_dict

    raw = {
        "name": "mla",
        "model": {"preset": "deepseek-v3"},
        "hardware": {"gpu": "H200", "num_nodes": 1, "gpus_per_node": 8},
        "parallel": {"tp": 8, "pp": 1, "dp": 1, "ep": 8, "etp": 1},
        "workload": {"mode": "inference", "requests": {"num": 4, "rate_per_s": 1.0}},
    }
    plan = plan_from_dict(raw, "<test>")
    assert decode_flops_per_pair(plan.model, 8) == 2 * 16 * (2 * 512 + 64)
    costs = step_costs(plan, Layout(plan))
    assert costs.attn_flops_per_pair == 2 * 16 * (192 + 128)
    assert costs.attn_flops_per_pair_decode == 34816
    k = costs.graph
    for tokens in (1, 64):  # absorbed: the same weights, one batched GEMM more
        assert k.attention_block_ms(tokens, absorbed=True) > k.attention_block_ms(tokens)
    dense = make_plan(DENSE)
    assert (
        decode_flops_per_pair(dense.model, 1)
        == step_costs(dense, Layout(dense)).attn_flops_per_pair
    )

"""The training engine (``engine.training`` through ``analysis.simulate``) against closed forms.

Every expected value is computed here from a formula (pipeline bubble and iteration time, ring
and hierarchical collectives, parameter counts, the Adam step's HBM traffic) or from another
row of the same run (a step's time, a bucket's size) — never from captured output.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
from calibrations import ROOFLINE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clustersim.costs.compute import model_flops_per_iteration
from clustersim.engine.recorder import Kind, Op, Recorder
from clustersim.engine.training.optimes import (
    GRAD_BYTES,
    OPTIMIZER_BYTES_PER_PARAM,
    MicrobatchCosts,
    kernel_timer,
)
from clustersim.engine.training.sim import TrainingSim
from clustersim.engine.training.workload import microbatch_lengths
from clustersim.run.simulate import routing_for, simulate
from clustersim.spec import plan_from_dict
from clustersim.spec.schema import Plan

FREE_LINK = {"bandwidth_gbps": 1e9, "latency_us": 0.0}  # communication made free
# Kernels without fixed or launch time and GEMMs at one efficiency whatever their shape: the
# stage times are then exactly proportional to their layers (the closed forms' premise).
FREE_KERNELS = {
    "gemm": {"half_dim": 0.0},
    "memory": {"efficiency": 1.0, "elementwise_efficiency": 1.0},
    "kernel": {"fixed_us": 0.0, "launch_us": 0.0, "graph_launch_us": 0.0, "framework_us": 0.0},
    # FlashAttention's backward as 2x its forward, like the GEMMs: every backward is 2x
    "attention": {"backward_ratio": 2.0},
    "collectives": ROOFLINE["collectives"],
}
FORWARD_OPS = [op for op in Op if op.name.endswith("_FWD")]  # compute of a forward step
BACKWARD_OPS = [op for op in Op if op.name.endswith("_BWD") or op == Op.RECOMPUTE]
H100 = {
    "peak_tflops": 989.0,
    "hbm_bandwidth_gbps": 3350.0,
    "intra_bw": 450.0,
    "intra_lat": 3.0,
    "inter_bw": 50.0,
    "inter_lat": 8.0,
}

# Small models: simulation cost grows with layers x micro-batches, not with their width.
DENSE = {
    "num_layers": 4,
    "hidden_size": 1024,
    "num_attention_heads": 8,
    "ffn_hidden_size": 4096,
    "vocab_size": 32000,
    "activation": "gelu",
}
MOE = {
    "num_layers": 8,
    "hidden_size": 512,
    "num_attention_heads": 8,
    "num_kv_heads": 4,
    "ffn_hidden_size": 1024,
    "vocab_size": 1000,
    "moe": {"num_experts": 8, "top_k": 2},
}


def make_plan(
    model: dict[str, Any],
    parallel: dict[str, Any],
    *,
    seq_len: dict[str, Any] | None = None,
    hardware: dict[str, Any] | None = None,
    seed: int = 0,
) -> Plan:
    """A training plan on H100-SXM nodes of 8 GPUs, as many nodes as the world needs."""
    par = {"tp": 1, "pp": 1, "dp": 1, **parallel}
    world = par["tp"] * par["pp"] * par["dp"]
    hw = {
        "gpu": "H100-SXM",
        "num_nodes": max(1, math.ceil(world / 8)),
        "gpus_per_node": 8,
        "calibration": {"collectives": ROOFLINE["collectives"]},
    }
    hw.update(hardware or {})
    return plan_from_dict(
        {
            "seed": seed,
            "model": copy.deepcopy(model),
            "hardware": hw,
            "parallel": par,
            "workload": {"seq_len": seq_len or {"dist": "fixed", "value": 1024}},
        },
        "test",
    )


def rows(report) -> dict[str, np.ndarray]:
    """The recorder's columns plus each row's duration."""
    cols = dict(report.recorder.columns())
    cols["duration"] = cols["end_ms"] - cols["start_ms"]
    return cols


def dense_layer_params(h: int, ffn: int, phi: int = 2) -> int:
    """One dense MHA layer: Q, K, V, O (4 h^2), the MLP (phi h ffn), two norms (2 h)."""
    return 4 * h * h + phi * h * ffn + 2 * h


# ---- pipeline bubble and iteration time with free communication ------------------------------


def free_comm_pipeline(schedule: str, p: int, m: int, v: int = 1) -> Plan:
    """GPT-1.7B layers (h = 2304), 4 layers per model chunk, so every stage (and chunk) has the
    same forward and backward time; a vocabulary of 8, so the logits on the last stage are
    negligible; fixed sequences; DP = 1; links of 1e9 GB/s and no latency."""
    return make_plan(
        {"preset": "gpt-1.7b", "num_layers": 4 * p * v, "vocab_size": 8},
        {"pp": p, "num_microbatches": m, "schedule": schedule, "virtual_stages": v},
        seq_len={"dist": "fixed", "value": 2048},
        hardware={"intra_node": FREE_LINK, "inter_node": FREE_LINK, "calibration": FREE_KERNELS},
    )


# Tolerance: the logits GEMM on the last stage still reads the T x h activations (~0.1% of a
# 4-layer stage step at h = 2304), which stretches the pipeline by m such slivers: measured
# deviations stay below 0.06 percentage points.
BUBBLE_TOLERANCE_POINTS = 0.1


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("p", "m"), [(2, 2), (2, 8), (4, 4), (4, 8), (8, 16)])
def test_bubble_gpipe_1f1b_closed_form(schedule, p, m):
    report = simulate(free_comm_pipeline(schedule, p, m))
    expected = 100 * (p - 1) / (m + p - 1)
    assert report.metrics["bubble_pct"] == pytest.approx(expected, abs=BUBBLE_TOLERANCE_POINTS)


@pytest.mark.parametrize(("p", "m", "v"), [(2, 4, 2), (4, 4, 2), (4, 8, 2), (4, 8, 3), (8, 8, 2)])
def test_bubble_interleaved_closed_form(p, m, v):
    report = simulate(free_comm_pipeline("interleaved", p, m, v))
    expected = 100 * (p - 1) / (v * m + p - 1)
    assert report.metrics["bubble_pct"] == pytest.approx(expected, abs=BUBBLE_TOLERANCE_POINTS)


def test_bubble_shrinks_with_virtual_stages():
    p, m = 4, 8
    bubbles = [
        simulate(free_comm_pipeline("interleaved", p, m, v)).metrics["bubble_pct"]
        for v in (1, 2, 4)
    ]
    assert bubbles[0] > bubbles[1] > bubbles[2]


def free_comm_moe_pipeline(schedule: str, p: int, m: int, v: int = 1) -> Plan:
    """An MoE model with one layer per model chunk (Megatron's VPP = layers / PP, as the
    ModelZoo's Mixtral-8x22B PP 8 x VPP 7 runs), every layer MoE with even routing over EP 2,
    free links and kernels: every chunk step takes the same time on every stage."""
    model = {
        **MOE,
        "num_layers": p * v,
        "hidden_size": 2048,
        "num_attention_heads": 16,
        "ffn_hidden_size": 4096,
        "vocab_size": 8,
        "moe": {"num_experts": 8, "top_k": 2, "routing": "even"},
    }
    return make_plan(
        model,
        {
            "pp": p,
            "dp": 2,
            "ep": 2,
            "num_microbatches": m,
            "schedule": schedule,
            "virtual_stages": v,
        },
        seq_len={"dist": "fixed", "value": 2048},
        hardware={"intra_node": FREE_LINK, "inter_node": FREE_LINK, "calibration": FREE_KERNELS},
    )


# One layer per chunk makes the last stage's logits (reading the T x h activations) ~3 % of a
# chunk step, which stretches the pipeline a little: deviations stay below 2 % of the bubble
# (0.2 points at p 4, m 8, v 2), for 1F1B and the interleaved schedule alike.
MOE_BUBBLE_REL_TOLERANCE = 0.03


@pytest.mark.parametrize(("p", "m", "v"), [(4, 8, 2), (2, 4, 4), (8, 8, 2)])
def test_moe_interleaved_bubble_closed_form_one_layer_per_chunk(p, m, v):
    """An MoE plan interleaved down to one layer per chunk keeps the closed-form bubble
    ``(p-1)/(v m + p - 1)`` (schedule, routing and all-to-alls add nothing per chunk), and so
    does its 1F1B counterpart ``(p-1)/(m + p - 1)``."""
    inter = simulate(free_comm_moe_pipeline("interleaved", p, m, v)).metrics["bubble_pct"]
    plain = simulate(free_comm_moe_pipeline("1f1b", p, m)).metrics["bubble_pct"]
    for got, want in ((inter, (p - 1) / (v * m + p - 1)), (plain, (p - 1) / (m + p - 1))):
        assert got == pytest.approx(100 * want, rel=MOE_BUBBLE_REL_TOLERANCE)


def test_per_iteration_work_does_not_scale_with_model_chunks():
    """Interleaving splits each stage into v chunks but runs the same layers: the
    optimizer and the all-to-alls move the same bytes in the same number of rows for v = 1,
    2, 4, the gradient reduce-scatters (dense and expert) and the parameter all-gathers the
    same bytes (in one row per bucket: Megatron-Core buckets only the first chunk of the first
    stage, so their count follows the chunking); only the pipeline sends grow, to
    ``2 (v p - 1) m`` (one activation and one gradient per micro-batch across each of the
    ``v p - 1`` virtual-stage boundaries), each of the same bytes."""
    p, m = 2, 4
    model = {**MOE, "num_layers": 8, "moe": {"num_experts": 8, "top_k": 2, "routing": "even"}}
    base = {"pp": p, "dp": 4, "ep": 2, "num_microbatches": m, "distributed_optimizer": True}
    per_v = {}
    for v in (1, 2, 4):
        schedule = "1f1b" if v == 1 else "interleaved"
        plan = make_plan(model, {**base, "schedule": schedule, "virtual_stages": v})
        cols = rows(simulate(plan))
        per_v[v] = {
            op: (int((cols["op"] == op).sum()), float(cols["bytes"][cols["op"] == op].sum()))
            for op in (
                Op.GRAD_REDUCE,
                Op.EXPERT_GRAD_REDUCE,
                Op.PARAM_GATHER,
                Op.OPTIMIZER,
                Op.A2A_DISPATCH,
                Op.A2A_COMBINE,
                Op.P2P_SEND,
            )
        }
        lanes = int(cols["lane"].max()) + 1
        sends, send_bytes = per_v[v][Op.P2P_SEND]
        assert sends == lanes // p * 2 * (v * p - 1) * m
        per_v[v][Op.P2P_SEND] = send_bytes / sends
    assert per_v[1][Op.EXPERT_GRAD_REDUCE][0] > 0  # expert data parallelism of 2 reduces
    for v in (2, 4):
        for op in per_v[1]:
            got, want = per_v[v][op], per_v[1][op]
            if op in (Op.PARAM_GATHER, Op.GRAD_REDUCE, Op.EXPERT_GRAD_REDUCE):  # per bucket
                got, want = got[1], want[1]
            assert got == pytest.approx(want, rel=1e-9), op.name


def _step_ms(cols, lane: int, ops) -> float:
    """Compute time of micro-batch 0's step on a lane (all its layers, one direction)."""
    sel = (cols["lane"] == lane) & (cols["microbatch"] == 0) & np.isin(cols["op"], ops)
    return float(cols["duration"][sel].sum())


@pytest.mark.parametrize(("p", "m"), [(2, 4), (4, 3), (4, 8), (8, 16)])
def test_1f1b_iteration_time_closed_form(p, m):
    """1F1B, free communication: the last stage is busy from (p-1) t_f on, m (t'_f + t'_b)
    long (t' includes its logits), then the last gradient goes back through p-1 stages:
    T = (p-1)(t_f + t_b) + m (t'_f + t'_b) ~= (m+p-1)(t_f + t_b); every stage then runs its
    Adam step after the pipeline-wide gradient-norm barrier: iteration = T + max optimizer."""
    report = simulate(free_comm_pipeline("1f1b", p, m))
    cols = rows(report)
    t_f, t_b = _step_ms(cols, 0, FORWARD_OPS), _step_ms(cols, 0, BACKWARD_OPS)
    last_f, last_b = _step_ms(cols, p - 1, FORWARD_OPS), _step_ms(cols, p - 1, BACKWARD_OPS)
    for stage in range(p - 1):  # equal layers per stage: equal step times
        assert _step_ms(cols, stage, FORWARD_OPS) == pytest.approx(t_f, rel=1e-12)
        assert _step_ms(cols, stage, BACKWARD_OPS) == pytest.approx(t_b, rel=1e-12)
    assert t_b == pytest.approx(2 * t_f, rel=1e-12)  # backward = 2 x forward
    # Adam: 36 bytes of HBM traffic per parameter; stage 0 adds the embedding (V h), the last
    # stage the final norm and its copy of the tied embedding.
    h, vocab = 2304, 8
    layers = 4 * dense_layer_params(h, 4 * h)
    params = [
        layers + (vocab * h if s == 0 else 0) + (h + vocab * h if s == p - 1 else 0)
        for s in range(p)
    ]
    optimizer = [
        n * OPTIMIZER_BYTES_PER_PARAM / (H100["hbm_bandwidth_gbps"] * 1e9) * 1e3 for n in params
    ]
    opt_rows = np.sort(cols["duration"][cols["op"] == Op.OPTIMIZER])
    np.testing.assert_allclose(opt_rows, np.sort(optimizer), rtol=1e-9)
    pipeline = (p - 1) * (t_f + t_b) + m * (last_f + last_b)
    iteration = report.metrics["iteration_time_ms"]
    assert iteration == pytest.approx(pipeline + max(optimizer), rel=1e-8)
    assert iteration == pytest.approx((m + p - 1) * (t_f + t_b) + max(optimizer), rel=2e-3)
    # nothing of the optimizer falls inside the pipeline window
    assert cols["start_ms"][cols["op"] == Op.OPTIMIZER].min() >= pipeline * (1 - 1e-9)


# ---- data-parallel gradient reduction: ring and hierarchical closed forms -------------------


def _grad_rows(report, op=Op.GRAD_REDUCE):
    cols = rows(report)
    sel = cols["op"] == op
    return cols["duration"][sel], cols["bytes"][sel]


def _dense_params() -> int:
    h, vocab = DENSE["hidden_size"], DENSE["vocab_size"]
    # untied embedding and output layer (V h each) and the final norm (h)
    return DENSE["num_layers"] * dense_layer_params(h, DENSE["ffn_hidden_size"]) + 2 * vocab * h + h


@pytest.mark.parametrize("n", [2, 4, 8])
def test_grad_all_reduce_is_a_ring_inside_one_node(n):
    """DP = n on one node, no distributed optimizer: every bucket's all-reduce takes
    2(n-1)/n S/B + 2(n-1) alpha (the hierarchical algorithm degenerates to the flat ring on one
    node), B = 450 GB/s, alpha = 3 us; the buckets carry all fp32 gradients."""
    plan = make_plan(DENSE, {"dp": n, "num_microbatches": 2, "grad_bucket_mb": 16})
    durations, sizes = _grad_rows(simulate(plan))
    assert len(sizes) >= 2  # several buckets
    bandwidth, alpha_ms = H100["intra_bw"] * 1e9, H100["intra_lat"] * 1e-3
    expected = 2 * (n - 1) / n * sizes / bandwidth * 1e3 + 2 * (n - 1) * alpha_ms
    np.testing.assert_allclose(durations, expected, rtol=1e-12)
    assert sizes.sum() == pytest.approx(GRAD_BYTES * _dense_params(), rel=1e-12)


@pytest.mark.parametrize(("dtype", "bytes_per_grad"), [("bf16", 4), ("fp16", 2), ("fp32", 4)])
def test_grad_reduce_carries_the_memory_models_gradient_type(dtype, bytes_per_grad):
    """Megatron all-reduces FP32 main gradients under BF16 (arguments.py forces
    accumulate_allreduce_grads_in_fp32) but FP16 ones under FP16 (the flag's default), as the
    memory model's bytes per parameter say (reference.md: bf16/fp32 18, fp16/fp16 20): the
    buckets carry bytes_per_grad x parameters, each at the ring's closed form."""
    n = 4
    model = {**DENSE, "dtype": dtype}
    plan = make_plan(model, {"dp": n, "num_microbatches": 2, "grad_bucket_mb": 16})
    durations, sizes = _grad_rows(simulate(plan))
    assert sizes.sum() == pytest.approx(bytes_per_grad * _dense_params(), rel=1e-12)
    bandwidth, alpha_ms = H100["intra_bw"] * 1e9, H100["intra_lat"] * 1e-3
    expected = 2 * (n - 1) / n * sizes / bandwidth * 1e3 + 2 * (n - 1) * alpha_ms
    np.testing.assert_allclose(durations, expected, rtol=1e-12)


def test_distributed_optimizer_reduce_scatter_and_param_gather():
    """ZeRO-1: gradients reduce-scatter, (n-1)/n S/B + (n-1) alpha; the bf16 parameters are
    all-gathered, (n-1)/n P/B + (n-1) alpha with P = 2 bytes x parameters."""
    n = 4
    plan = make_plan(
        DENSE,
        {
            "dp": n,
            "num_microbatches": 2,
            "distributed_optimizer": True,
            "overlap_communication": False,
        },
    )
    report = simulate(plan)
    durations, sizes = _grad_rows(report)
    bandwidth, alpha_ms = H100["intra_bw"] * 1e9, H100["intra_lat"] * 1e-3
    np.testing.assert_allclose(
        durations, (n - 1) / n * sizes / bandwidth * 1e3 + (n - 1) * alpha_ms, rtol=1e-12
    )
    assert len(sizes) == 1  # without overlap: one bucket at the end
    gather, _ = _grad_rows(report, Op.PARAM_GATHER)
    param_bytes = 2 * _dense_params()
    assert gather == pytest.approx(
        [(n - 1) / n * param_bytes / bandwidth * 1e3 + (n - 1) * alpha_ms], rel=1e-12
    )
    # the optimizer updates a 1/n shard
    cols = rows(report)
    opt = cols["duration"][cols["op"] == Op.OPTIMIZER]
    byte_rate = 3350e9 * plan.hardware.calibration.memory.efficiency
    expected_opt = _dense_params() / n * OPTIMIZER_BYTES_PER_PARAM / byte_rate * 1e3
    assert opt == pytest.approx([expected_opt], rel=1e-12)


def test_grad_all_reduce_hierarchical_across_two_nodes():
    """DP = 16 over 2 nodes of 8: intra-node reduce-scatter of S over 8, inter-node ring
    all-reduce of S/8 over the 2 nodes (at the slower link: 50 GB/s, 8 us), intra-node
    all-gather."""
    plan = make_plan(DENSE, {"dp": 16, "num_microbatches": 1})
    durations, sizes = _grad_rows(simulate(plan))
    intra_bw, intra_lat = H100["intra_bw"] * 1e9, H100["intra_lat"] * 1e-3
    inter_bw, inter_lat = H100["inter_bw"] * 1e9, H100["inter_lat"] * 1e-3
    intra = 7 / 8 * sizes / intra_bw * 1e3 + 7 * intra_lat
    inter = 2 * (1 / 2) * (sizes / 8) / inter_bw * 1e3 + 2 * 1 * inter_lat
    np.testing.assert_allclose(durations, 2 * intra + inter, rtol=1e-12)


# ---- one GPU; DP = 1; no parallelism at all ---------------------------------------------------


def test_one_gpu_iteration_is_the_sum_of_its_ops():
    m = 3
    plan = make_plan(DENSE, {"num_microbatches": m})
    report = simulate(plan)
    cols, metrics = rows(report), report.metrics
    compute = cols["kind"] == Kind.COMPUTE
    assert not (~compute).any()  # no communication rows at all
    assert metrics["iteration_time_ms"] == pytest.approx(cols["duration"].sum(), rel=1e-12)
    assert metrics["comm_overhead_pct"] == 0
    assert metrics["comm_to_compute_pct"] == 0
    assert metrics["bubble_pct"] == pytest.approx(0, abs=1e-9)
    # the ops run back to back: each starts where the previous ended
    np.testing.assert_allclose(cols["start_ms"][1:], cols["end_ms"][:-1], rtol=0, atol=1e-9)
    # backward = 2 x forward, op by op, except FlashAttention's core attention:
    # attention.backward_ratio x its forward
    ratio = plan.hardware.calibration.attention.backward_ratio
    core = MicrobatchCosts(plan, [0], np.array([1024]))._core_attention_ms
    for fwd, bwd in ((Op.ATTN_FWD, Op.ATTN_BWD), (Op.MLP_FWD, Op.MLP_BWD)):
        f, b = cols["duration"][cols["op"] == fwd], cols["duration"][cols["op"] == bwd]
        assert len(f) == len(b) == m * DENSE["num_layers"]
        extra = (ratio - 2.0) * core * len(f) if fwd == Op.ATTN_FWD else 0.0
        assert core > 0 and b.sum() == pytest.approx(2 * f.sum() + extra, rel=1e-12)
    # output layer: logits GEMM + cross-entropy memory passes; backward two GEMMs per GEMM
    f, b = (cols["duration"][cols["op"] == op] for op in (Op.LOGITS_FWD, Op.LOGITS_BWD))
    assert len(f) == len(b) == m
    k = kernel_timer(plan)
    tokens = plan.parallel.micro_batch_size * plan.workload.seq_len.value
    gemm = k.logits_ms(tokens)
    rate = 3350e9 * plan.hardware.calibration.memory.elementwise_efficiency
    loss = tokens * DENSE["vocab_size"] * 4 * 1e3 / rate  # one fp32 pass over the logits
    ce_fwd, ce_bwd = (k.issue(n * loss + k.fixed_ms, tokens) for n in (38 / 4, 14 / 4))
    np.testing.assert_allclose(f, gemm + ce_fwd, rtol=1e-12)
    np.testing.assert_allclose(b, 2 * gemm + ce_bwd, rtol=1e-12)
    # the Adam step over every parameter
    opt = cols["duration"][cols["op"] == Op.OPTIMIZER]
    byte_rate = 3350e9 * plan.hardware.calibration.memory.efficiency
    assert opt == pytest.approx([_dense_params() * OPTIMIZER_BYTES_PER_PARAM / byte_rate * 1e3])
    # the compute can be no faster than the model FLOPs at peak x efficiency (roofline)
    flops = model_flops_per_iteration(plan.model, m, 1024)  # Korthikanti Eq. 7
    floor_ms = (
        flops / (H100["peak_tflops"] * 1e12 * plan.hardware.calibration.gemm.efficiency) * 1e3
    )
    assert metrics["iteration_time_ms"] - opt[0] >= floor_ms * (1 - 1e-9)


def test_one_gpu_moe_has_zero_communication_overhead():
    plan = make_plan(MOE, {"num_microbatches": 2})
    report = simulate(plan)
    cols, metrics = rows(report), report.metrics
    comm = cols["kind"] != Kind.COMPUTE
    assert np.all(cols["duration"][comm] == 0)  # all-to-alls over an EP group of one GPU
    assert metrics["comm_overhead_pct"] == 0
    assert metrics["comm_to_compute_pct"] == 0
    assert metrics["iteration_time_ms"] == pytest.approx(cols["duration"].sum(), rel=1e-12)
    assert not np.isin(
        cols["op"], [Op.GRAD_REDUCE, Op.EXPERT_GRAD_REDUCE, Op.TP_COMM, Op.P2P_SEND, Op.ETP_COMM]
    ).any()
    assert (cols["op"] == Op.EXPERT_FWD).sum() == 2 * MOE["num_layers"]


@pytest.mark.parametrize("model", [DENSE, MOE], ids=["dense", "moe"])
def test_dp1_has_no_gradient_reduction(model):
    parallel = {"tp": 2, "pp": 2, "num_microbatches": 4, "sequence_parallel": True}
    if "moe" in model:
        parallel["ep"] = 2
        parallel["etp"] = 1
    cols = rows(simulate(make_plan(model, parallel)))
    assert not np.isin(cols["op"], [Op.GRAD_REDUCE, Op.EXPERT_GRAD_REDUCE, Op.PARAM_GATHER]).any()
    assert (cols["op"] == Op.TP_COMM).any() and (cols["op"] == Op.P2P_SEND).any()


# ---- monotonicity ----------------------------------------------------------------------------

SHAPES = [
    (DENSE, {"tp": 1, "pp": 1, "dp": 2}),
    (DENSE, {"tp": 2, "pp": 2, "dp": 2, "sequence_parallel": True}),
    (DENSE, {"tp": 1, "pp": 2, "dp": 8}),
    (MOE, {"tp": 1, "pp": 1, "dp": 4, "ep": 4}),
    (MOE, {"tp": 2, "pp": 2, "dp": 4, "ep": 8, "etp": 1, "sequence_parallel": True}),
    (MOE, {"tp": 1, "pp": 2, "dp": 8, "ep": 4}),
]


@st.composite
def plan_shapes(draw) -> tuple[dict, dict]:
    model, parallel = draw(st.sampled_from(SHAPES))
    parallel = dict(parallel)
    schedule = draw(st.sampled_from(["gpipe", "1f1b", "interleaved"]))
    pp = parallel["pp"]
    parallel["schedule"] = schedule
    parallel["virtual_stages"] = 2 if schedule == "interleaved" and pp > 1 else 1
    if schedule == "interleaved" and pp == 1:
        parallel["schedule"] = "1f1b"
    parallel["num_microbatches"] = pp * draw(st.integers(1, 3))
    parallel["distributed_optimizer"] = draw(st.booleans())
    parallel["grad_bucket_mb"] = draw(st.sampled_from([1.0, 8.0, 40.0]))
    parallel["recompute"] = draw(st.sampled_from(["none", "selective", "full"]))
    return model, parallel


MONOTONE = settings(
    max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


NO_LATENCY = {
    "intra_node": {"bandwidth_gbps": 450.0, "latency_us": 0.0},
    "inter_node": {"bandwidth_gbps": 50.0, "latency_us": 0.0},
}


@MONOTONE
@given(plan_shapes())
def test_overlap_never_slower(shape):
    """Overlap starts each gradient bucket as soon as its layers are done (and hides the
    distributed optimizer's parameter all-gather) instead of one reduction after the backward.
    The bandwidth part of every collective is linear in its size, so splitting the reduction
    into buckets costs nothing on links without latency; there overlap is never slower. (With
    latency each extra bucket pays its own; see the next test.)"""
    model, parallel = shape
    on = simulate(
        make_plan(model, {**parallel, "overlap_communication": True}, hardware=NO_LATENCY)
    )
    off = simulate(
        make_plan(model, {**parallel, "overlap_communication": False}, hardware=NO_LATENCY)
    )
    assert on.metrics["iteration_time_ms"] <= off.metrics["iteration_time_ms"] * (1 + 1e-12)


def test_overlap_with_nothing_to_hide_costs_one_bucket_latency():
    """tp2 pp2 dp2, 2 layers per stage of 12.6 M parameters (25 MB of fp32 gradients per TP
    rank each): the 40 MB bucket closes with the stage's last layer, i.e. at the end of its
    backward, so nothing overlaps, and the embedding's gradients follow as a second bucket. The
    reductions are those of the single bucket without overlap plus one more ring latency,
    2(n - 1) alpha = 6 us for n = 2, alpha = 3 us (Megatron pays the same: it uses one bucket
    when overlap is off)."""
    parallel = {
        "tp": 2,
        "pp": 2,
        "dp": 2,
        "sequence_parallel": True,
        "num_microbatches": 2,
        "schedule": "gpipe",
        "grad_bucket_mb": 40.0,
    }
    on = simulate(make_plan(DENSE, {**parallel, "overlap_communication": True}))
    off = simulate(make_plan(DENSE, {**parallel, "overlap_communication": False}))
    stage0 = [rows(r) for r in (on, off)]
    buckets = [int(((c["op"] == Op.GRAD_REDUCE) & (c["lane"] == 0)).sum()) for c in stage0]
    assert buckets == [2, 1]
    extra_latency_ms = 2 * (2 - 1) * H100["intra_lat"] * 1e-3
    delta = on.metrics["iteration_time_ms"] - off.metrics["iteration_time_ms"]
    assert delta == pytest.approx(extra_latency_ms, rel=1e-6)


@MONOTONE
@given(plan_shapes(), st.booleans(), st.sampled_from([(450.0, 50.0), (160.0, 25.0), (900, 400)]))
def test_more_bandwidth_never_slower(shape, overlap, bandwidths):
    model, parallel = shape
    parallel = {**parallel, "overlap_communication": overlap}
    intra, inter = bandwidths

    def hw(factor: float) -> dict:
        return {
            "intra_node": {"bandwidth_gbps": intra * factor, "latency_us": 3.0},
            "inter_node": {"bandwidth_gbps": inter * factor, "latency_us": 8.0},
        }

    slow = simulate(make_plan(model, parallel, hardware=hw(1.0)))
    fast = simulate(make_plan(model, parallel, hardware=hw(2.0)))
    assert fast.metrics["iteration_time_ms"] <= slow.metrics["iteration_time_ms"] * (1 + 1e-12)


# ---- determinism; variable sequence lengths; replica symmetry --------------------------------


def _same_run(a, b) -> None:
    assert a.metrics == b.metrics
    for name, col in a.recorder.columns().items():
        np.testing.assert_array_equal(col, b.recorder.columns()[name], err_msg=name)


def test_same_plan_and_seed_same_metrics():
    parallel = {
        "tp": 2,
        "pp": 2,
        "dp": 4,
        "ep": 8,
        "etp": 1,
        "num_microbatches": 4,
        "sequence_parallel": True,
    }
    _same_run(simulate(make_plan(MOE, parallel)), simulate(make_plan(MOE, parallel)))


def test_variable_sequence_lengths_run_and_are_seeded():
    pytest.importorskip("clustersim.routing.lengths")
    parallel = {
        "tp": 2,
        "pp": 2,
        "dp": 2,
        "ep": 4,
        "etp": 1,
        "num_microbatches": 4,
        "micro_batch_size": 2,
        "sequence_parallel": True,
    }
    uniform = {"dist": "uniform", "min": 128, "max": 4096}
    first = simulate(make_plan(MOE, parallel, seq_len=uniform, seed=7))
    _same_run(first, simulate(make_plan(MOE, parallel, seq_len=uniform, seed=7)))
    other = simulate(make_plan(MOE, parallel, seq_len=uniform, seed=8))
    assert other.metrics["iteration_time_ms"] != first.metrics["iteration_time_ms"]
    m = first.metrics
    assert m["iteration_time_ms"] > 0 and 0 <= m["bubble_pct"] < 100
    # tokens processed = sum of the sampled lengths of every sequence of every replica
    plan = make_plan(MOE, parallel, seq_len=uniform, seed=7)
    lengths = microbatch_lengths(plan, np.random.default_rng([plan.seed, 1]))
    tokens = sum(int(x.sum()) for replica in lengths for x in replica)
    assert 2 * 4 * 2 * 128 <= tokens <= 2 * 4 * 2 * 4096
    assert m["throughput_tokens_per_ms"] * m["iteration_time_ms"] == pytest.approx(tokens)


@pytest.mark.parametrize("model", [DENSE, MOE], ids=["dense", "moe"])
def test_replica_symmetry_matches_full_simulation(model):
    """With fixed lengths and even routing every DP replica does the same work: simulating
    replica 0 alone gives the same iteration time as simulating all of them."""
    parallel = {"tp": 2, "pp": 2, "dp": 4, "num_microbatches": 4, "sequence_parallel": True}
    if "moe" in model:
        parallel.update(ep=8, etp=1)
        model = {**model, "moe": {**model["moe"], "routing": "even"}}
    plan = make_plan(model, parallel)
    lengths = microbatch_lengths(plan, np.random.default_rng(0))
    times = []
    for symmetric in (True, False):
        routing, _ = routing_for(plan)
        sim = TrainingSim(plan, Recorder(plan.parallel.world_size), lengths, routing, symmetric)
        times.append(sim.run().iteration_time_ms)
    assert times[0] == pytest.approx(times[1], rel=1e-12)


# ---- no deadlock -----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved"])
@pytest.mark.parametrize("pp", [1, 2, 4])
@pytest.mark.parametrize("m_factor", [1, 2])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_no_deadlock(schedule, pp, m_factor, kind):
    """Every schedule finishes every step, with the EP groups of an MoE model spanning the DP
    replicas (tp2 dp4 ep8 etp1) and variable lengths, so every replica is simulated and meets
    the others in the all-to-alls and gradient reductions."""
    pytest.importorskip("clustersim.routing.lengths")
    v = 2 if schedule == "interleaved" else 1
    m = m_factor * pp
    parallel = {
        "tp": 2,
        "pp": pp,
        "dp": 4,
        "num_microbatches": m,
        "schedule": schedule,
        "virtual_stages": v,
        "sequence_parallel": True,
    }
    model = dict(MOE if kind == "moe" else DENSE, num_layers=8)
    if kind == "moe":
        parallel.update(ep=8, etp=1)
    plan = make_plan(model, parallel, seq_len={"dist": "uniform", "min": 64, "max": 512})
    report = simulate(plan)  # raises RuntimeError on a deadlock
    cols = rows(report)
    lanes = pp * 4  # every replica simulated (variable lengths)
    assert len(np.unique(cols["lane"])) == lanes
    assert (cols["op"] == Op.ATTN_FWD).sum() == lanes * m * 8 // pp
    assert (cols["op"] == Op.ATTN_BWD).sum() == lanes * m * 8 // pp
    assert (cols["op"] == Op.OPTIMIZER).sum() == lanes
    assert report.metrics["iteration_time_ms"] > 0

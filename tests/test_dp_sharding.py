"""Sharded data parallelism (``parallel.dp_sharding``: ZeRO-1/2/3, ``dp_shard_group``: HSDP)
against hand formulas: memory per GPU, bytes all-gathered and reduce-scattered per step, ring
collective times, and a 405B dense plan that fits on 80 GB GPUs only with full sharding."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from calibrations import ROOFLINE

from clustersim.costs.memory import GIB, memory_per_gpu
from clustersim.engine.recorder import Op
from clustersim.engine.training.optimes import GRAD_BYTES
from clustersim.layout import Layout
from clustersim.run.simulate import simulate
from clustersim.spec import plan_from_dict
from clustersim.spec.errors import PlanError
from clustersim.spec.schema import Plan

SMALL = {
    "num_layers": 2,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "ffn_hidden_size": 1024,
    "vocab_size": 1000,
    "activation": "gelu",
}
H, FFN, VOCAB, LAYERS = 256, 1024, 1000, 2
LAYER_PARAMS = 4 * H * H + 2 * H * FFN + 2 * H  # Q, K, V, O; fc1, fc2; two norms
NON_LAYER = 2 * VOCAB * H + H  # untied embedding and output layer, final norm
P = LAYERS * LAYER_PARAMS + NON_LAYER
# the unit gathered / reduced per layer: its parameters and its share of the stage's others
UNIT = LAYER_PARAMS + NON_LAYER / LAYERS
INTRA_BW, INTRA_LAT_MS = 450e9, 3e-3  # H100 NVLink (ROOFLINE collectives: the link's figures)


def make_plan(parallel: dict[str, Any], model: dict[str, Any] | None = None) -> Plan:
    par = {"tp": 1, "pp": 1, "dp": 8, **parallel}
    world = par["tp"] * par["pp"] * par["dp"]
    return plan_from_dict(
        {
            "model": copy.deepcopy(model or SMALL),
            "hardware": {
                "gpu": "H100-SXM",
                "num_nodes": max(1, -(-world // 8)),
                "gpus_per_node": 8,
                "calibration": {"collectives": ROOFLINE["collectives"]},
            },
            "parallel": par,
            "workload": {"seq_len": {"dist": "fixed", "value": 128}},
        },
        "test",
    )


def _rows(report, op) -> tuple[np.ndarray, np.ndarray]:
    cols = dict(report.recorder.columns())
    sel = cols["op"] == op
    return cols["bytes"][sel], (cols["end_ms"] - cols["start_ms"])[sel]


# ---- the contract --------------------------------------------------------------------------


def test_distributed_optimizer_is_an_alias_of_optimizer_sharding():
    alias = make_plan({"distributed_optimizer": True})
    named = make_plan({"dp_sharding": "optimizer"})
    assert alias.parallel.sharding == named.parallel.sharding == "optimizer"
    assert make_plan({}).parallel.sharding == "none"
    m1, m2 = (memory_per_gpu(p, Layout(p)) for p in (alias, named))
    assert m1.memory_per_gpu_gib == m2.memory_per_gpu_gib


@pytest.mark.parametrize(
    ("parallel", "match"),
    [
        ({"dp_sharding": "none", "distributed_optimizer": True}, "distributed_optimizer"),
        ({"dp_sharding": "full", "dp_shard_group": 3}, "dp_shard_group"),
        ({"dp_shard_group": 4}, "dp_sharding"),
    ],
)
def test_inconsistent_sharding_is_refused(parallel, match):
    with pytest.raises(PlanError, match=match):
        make_plan(parallel)


# ---- memory per GPU --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sharding", "shard"), [("optimizer", 8), ("gradients", 8), ("full", 8), ("full", 4)]
)
def test_memory_per_gpu_follows_the_zero_formula(sharding, shard):
    """Bytes per parameter 2 (weights) + 4 (fp32 gradients) + 12 (master, Adam m, v):
    ZeRO-1 divides the 12 by the shard size N, ZeRO-2 also the 4, ZeRO-3 all 18; ZeRO-2/3
    hold one layer's gradient unsharded before its reduce-scatter, ZeRO-3 two layers' weights
    gathered (the one computing, the one prefetched). HSDP: N = dp_shard_group."""
    par: dict[str, Any] = {"dp_sharding": sharding}
    if shard != 8:
        par["dp_shard_group"] = shard
    plan = make_plan(par)
    mem = memory_per_gpu(plan, Layout(plan))
    weights = 2 * P / shard + 2 * 2 * UNIT if sharding == "full" else 2 * P
    grads = 4 * P / shard + 4 * UNIT if sharding != "optimizer" else 4 * P
    assert mem.params_gib * GIB == pytest.approx(weights, rel=1e-12)
    assert mem.grads_gib * GIB == pytest.approx(grads, rel=1e-12)
    assert mem.optimizer_gib * GIB == pytest.approx(12 * P / shard, rel=1e-12)


# ---- communication per step ----------------------------------------------------------------


def test_zero3_gathers_and_reduce_scatters_per_layer_and_microbatch():
    """ZeRO-3 over DP 8 with m micro-batches: every layer all-gathers its bf16 weights in the
    forward and again in the backward of every micro-batch (2 m x 2 P bytes per step) and
    reduce-scatters its fp32 gradient in every backward (m x 4 P); each collective is a ring
    inside the node, (n-1)/n S/B + (n-1) alpha; no gradient buckets, no post-step gather."""
    m, n = 3, 8
    report = simulate(make_plan({"dp_sharding": "full", "num_microbatches": m}))
    ag_bytes, ag_ms = _rows(report, Op.PARAM_GATHER)
    rs_bytes, rs_ms = _rows(report, Op.GRAD_REDUCE)
    lanes = 1  # symmetric replicas: one lane per stage is simulated
    assert ag_bytes.sum() / lanes == pytest.approx(2 * m * 2 * P, rel=1e-12)
    assert rs_bytes.sum() / lanes == pytest.approx(m * GRAD_BYTES * P, rel=1e-12)
    assert len(ag_bytes) == 2 * m * LAYERS and len(rs_bytes) == m * LAYERS
    np.testing.assert_allclose(ag_bytes, 2 * UNIT, rtol=1e-12)
    ring = (n - 1) / n / INTRA_BW * 1e3
    np.testing.assert_allclose(ag_ms, ring * ag_bytes + (n - 1) * INTRA_LAT_MS, rtol=1e-9)
    np.testing.assert_allclose(rs_ms, ring * rs_bytes + (n - 1) * INTRA_LAT_MS, rtol=1e-9)


def test_zero2_reduce_scatters_every_microbatch_and_gathers_once():
    m = 2
    report = simulate(make_plan({"dp_sharding": "gradients", "num_microbatches": m}))
    ag_bytes, _ = _rows(report, Op.PARAM_GATHER)
    rs_bytes, _ = _rows(report, Op.GRAD_REDUCE)
    assert rs_bytes.sum() == pytest.approx(m * GRAD_BYTES * P, rel=1e-12)
    assert ag_bytes.sum() == pytest.approx(2 * P, rel=1e-12)  # after the optimizer step


def test_zero2_fp16_reduce_scatters_fp16_gradients():
    """FP16 training reduces FP16 gradients (Megatron's accumulate_allreduce_grads_in_fp32 is
    off unless bf16; the memory model's fp16 / fp16 row): m x 2 P bytes, half of BF16's."""
    m = 2
    plan = make_plan(
        {"dp_sharding": "gradients", "num_microbatches": m}, {**SMALL, "dtype": "fp16"}
    )
    rs_bytes, _ = _rows(simulate(plan), Op.GRAD_REDUCE)
    assert rs_bytes.sum() == pytest.approx(m * 2 * P, rel=1e-12)


def test_zero3_gathers_and_reduce_scatters_share_one_stream():
    """PyTorch FSDP runs a layer's all-gathers and reduce-scatters on one NCCL process group,
    one at a time (Zhao et al. 2023, §3.3.2): on every lane the gather and reduce-scatter rows
    never overlap, so the iteration lasts at least their summed durations (two independent
    streams would let a backward's gather and reduce-scatter run at the same time)."""
    report = simulate(make_plan({"dp_sharding": "full", "num_microbatches": 3}))
    cols = report.recorder.columns()
    sel = (cols["op"] == Op.PARAM_GATHER) | (cols["op"] == Op.GRAD_REDUCE)
    for lane in np.unique(cols["lane"][sel]):
        mine = sel & (cols["lane"] == lane)
        order = np.argsort(cols["start_ms"][mine], kind="stable")
        start, end = cols["start_ms"][mine][order], cols["end_ms"][mine][order]
        assert np.all(start[1:] >= end[:-1] - 1e-12)
    _, ag_ms = _rows(report, Op.PARAM_GATHER)
    _, rs_ms = _rows(report, Op.GRAD_REDUCE)
    assert report.metrics["iteration_time_ms"] >= ag_ms.sum() + rs_ms.sum()


def test_gathers_overlap_compute_and_never_beat_free_communication():
    """Prefetching one layer ahead hides most of the gathers: ZeRO-3 is slower than ZeRO-1 by
    less than the sum of its collectives."""
    z1 = simulate(make_plan({"dp_sharding": "optimizer", "num_microbatches": 2}))
    z3 = simulate(make_plan({"dp_sharding": "full", "num_microbatches": 2}))
    _, ag_ms = _rows(z3, Op.PARAM_GATHER)
    _, rs_ms = _rows(z3, Op.GRAD_REDUCE)
    t1, t3 = (r.metrics["iteration_time_ms"] for r in (z1, z3))
    assert t3 < t1 + ag_ms.sum() + rs_ms.sum()


# ---- a 405B dense plan on 80 GB GPUs -----------------------------------------------------------

LLAMA3_405B = {
    "num_layers": 126,
    "hidden_size": 16384,
    "num_attention_heads": 128,
    "num_kv_heads": 8,
    "ffn_hidden_size": 53248,
    "vocab_size": 128256,
}


def test_llama3_405b_fits_on_h100_only_with_full_sharding():
    """torchtitan's Llama 3 405B recipe: 512 H100 (80 GB), TP 8 with sequence parallelism,
    FSDP over the other 64, sequences of 8,192, local batch 2, full activation
    recomputation. ZeRO-1 keeps 6 bytes per parameter of its TP shard (~285 GiB): out of
    memory; ZeRO-3 (18 / 64 bytes + two layers gathered) fits."""
    par = {
        "tp": 8,
        "pp": 1,
        "dp": 64,
        "sequence_parallel": True,
        "recompute": "full",
        "micro_batch_size": 2,
    }
    for sharding, fits in (("optimizer", False), ("full", True)):
        plan = plan_from_dict(
            {
                "model": LLAMA3_405B,
                "hardware": {"gpu": "H100-SXM", "num_nodes": 64, "gpus_per_node": 8},
                "parallel": par | {"dp_sharding": sharding},
                "workload": {"seq_len": {"dist": "fixed", "value": 8192}},
            },
            "test",
        )
        assert memory_per_gpu(plan, Layout(plan)).fits is fits


def test_hsdp_reduce_scatters_in_the_shard_group_then_all_reduces_across_replicas():
    """HSDP, DP 8 in shard groups of 4 (one node): each layer's gradient S is reduce-scattered
    over the 4 ranks of its group, (3/4) S/B + 3 alpha, then its shard S/4 is all-reduced over
    the 2 replicas, 2 (1/2) (S/4)/B + 2 alpha; the gathers run over the 4 ranks only."""
    report = simulate(make_plan({"dp_sharding": "full", "dp_shard_group": 4}))
    rs_bytes, rs_ms = _rows(report, Op.GRAD_REDUCE)
    ag_bytes, ag_ms = _rows(report, Op.PARAM_GATHER)
    per_byte = 1e3 / INTRA_BW
    expected_rs = 3 / 4 * rs_bytes * per_byte + 3 * INTRA_LAT_MS
    expected_rs += 2 * (1 / 2) * (rs_bytes / 4) * per_byte + 2 * INTRA_LAT_MS
    np.testing.assert_allclose(rs_ms, expected_rs, rtol=1e-9)
    np.testing.assert_allclose(ag_ms, 3 / 4 * ag_bytes * per_byte + 3 * INTRA_LAT_MS, rtol=1e-9)


# ---- the EP all-to-all and the sharding stream on the same NICs ------------------------------


def _fluid_finish_ms(a_ms: float, b_ms: float, dt: float) -> tuple[float, float]:
    """Finish times of two transfers needing ``a_ms`` and ``b_ms`` alone, started together on
    one link shared fairly (each gets half while both run), by stepping time ``dt``."""
    left, t, done = [a_ms, b_ms], 0.0, [0.0, 0.0]
    while left[0] > 0 or left[1] > 0:
        active = [i for i in (0, 1) if left[i] > 0]
        rate = 1.0 / len(active)
        t += dt
        for i in active:
            left[i] -= rate * dt
            if left[i] <= 0:
                done[i] = t
    return done[0], done[1]


@pytest.mark.parametrize(("a", "b"), [(1.0, 3.0), (2.0, 2.0), (5.0, 0.5), (0.7, 0.0)])
def test_fair_share_delay_matches_a_fluid_simulation(a, b):
    """Each of two transfers sharing a link ends min(a, b) later than alone."""
    from clustersim.costs.sharding import fair_share_delay_ms

    done_a, done_b = _fluid_finish_ms(a, b, 1e-4)
    delay = fair_share_delay_ms(a, b)
    assert done_a == pytest.approx(a + delay, abs=1e-3)
    if b > 0:
        assert done_b == pytest.approx(b + delay, abs=1e-3)
    assert fair_share_delay_ms(a, -1.0) == 0.0  # an idle stream (its clock behind) costs nothing


def _moe_plan(sharding: str, gpus_per_node: int) -> Plan:
    """Mixtral-shaped 2-layer MoE, EP 8 x DP 16 over 16 GPUs: nodes of 8 keep the EP group
    on NVLink (the sharding collectives cross nodes); nodes of 4 put both across nodes."""
    return plan_from_dict(
        {
            "model": {"preset": "mixtral-8x7b", "num_layers": 2, "moe": {"routing": "even"}},
            "hardware": {
                "gpu": "H100-SXM",
                "num_nodes": 16 // gpus_per_node,
                "gpus_per_node": gpus_per_node,
                "calibration": {"collectives": ROOFLINE["collectives"]},
            },
            "parallel": {
                "tp": 1,
                "pp": 1,
                "dp": 16,
                "ep": 8,
                "dp_sharding": sharding,
                "num_microbatches": 2,
            },
            "workload": {"seq_len": {"dist": "fixed", "value": 1024}},
        },
        "test",
    )


def _a2a_ms(report) -> np.ndarray:
    cols = report.recorder.columns()
    sel = (cols["op"] == Op.A2A_DISPATCH) | (cols["op"] == Op.A2A_COMBINE)
    order = np.lexsort((cols["layer"][sel], cols["microbatch"][sel], cols["start_ms"][sel]))
    return (cols["end_ms"] - cols["start_ms"])[sel][order]


def test_all_to_all_inside_a_node_does_not_share_the_nics_with_fsdp():
    """EP on NVLink, FSDP collectives on the NICs: every all-to-all lasts as without
    sharding (ZeRO-1)."""
    z1 = _a2a_ms(simulate(_moe_plan("optimizer", 8)))
    z3 = _a2a_ms(simulate(_moe_plan("full", 8)))
    np.testing.assert_allclose(np.sort(z3), np.sort(z1), rtol=1e-12)


def test_all_to_all_across_nodes_shares_the_nics_with_fsdp():
    """EP and FSDP both across nodes: an all-to-all running while the sharding stream is busy
    takes longer than alone, at most twice as long (fair sharing); at least one is slowed."""
    z1 = np.sort(_a2a_ms(simulate(_moe_plan("optimizer", 4))))
    z3 = np.sort(_a2a_ms(simulate(_moe_plan("full", 4))))
    assert len(z1) == len(z3)
    assert np.all(z3 >= z1 * (1 - 1e-12))
    assert np.all(z3 <= 2 * z1 * (1 + 1e-12))
    assert np.any(z3 > z1 * (1 + 1e-6))

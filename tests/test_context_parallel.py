"""Context parallelism (``parallel.cp``): ring attention, activation memory, Megatron layout.

Expectations are hand formulas (``clustersim/costs/context_parallel.py``): K/V block bytes
``T n_kv (d_qk + d_v) b``, forward ``(cp - 1)`` blocks, backward twice that; exposed time
``(cp - 1) max(0, p2p(block) - A / cp)``; activations of a GPU proportional to 1/cp.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from clustersim.audit.checks import audit
from clustersim.costs.comm import p2p_link, p2p_ms
from clustersim.costs.context_parallel import kv_block_bytes, ring_attention
from clustersim.costs.memory import memory_per_gpu
from clustersim.engine.errors import EngineError
from clustersim.engine.recorder import Op
from clustersim.engine.training.optimes import MicrobatchCosts
from clustersim.layout import Layout
from clustersim.run.simulate import simulate
from clustersim.spec import plan_from_dict


def moe_plan(cp: int, dp: int, seq: int = 8192, **parallel):
    """Mixtral-8x7B shape, 4 layers, TP2 PP2 EP4 on 16 H100 (CP x DP = the rest)."""
    return plan_from_dict(
        {
            "name": f"cp{cp}",
            "model": {"preset": "mixtral-8x7b", "num_layers": 4},
            "hardware": {"gpu": "H100-SXM", "num_nodes": 2, "gpus_per_node": 8},
            "parallel": {
                "tp": 2,
                "pp": 2,
                "dp": dp,
                "cp": cp,
                "ep": 4,
                "etp": 1,
                "num_microbatches": 4,
                "sequence_parallel": True,
                "distributed_optimizer": True,
                **parallel,
            },
            "workload": {"mode": "training", "seq_len": {"dist": "fixed", "value": seq}},
        },
        "test",
    )


def test_kv_block_is_the_hand_formula():
    plan = moe_plan(4, 1)
    # Mixtral: 8 K/V heads of 128 over TP 2 -> 4 per GPU; K and V; bf16
    assert kv_block_bytes(2048, plan.model, 2) == 2048 * 4 * (128 + 128) * 2


def test_ring_bytes_and_exposed_time_by_hand():
    plan = moe_plan(4, 1)
    hw, group = plan.hardware, [0, 2, 4, 6]
    block = 2048 * 4 * 256 * 2
    link = p2p_link(group, hw.gpus_per_node, hw)
    for attention_ms in (0.0, 0.01, 100.0):
        ring = ring_attention(2048, attention_ms, plan.model, 2, group, hw)
        assert ring.fwd_bytes == 3 * block and ring.bwd_bytes == 6 * block
        step = p2p_ms(block, link.bandwidth_gbps, link.latency_us)
        step_bwd = p2p_ms(2 * block, link.bandwidth_gbps, link.latency_us)
        assert ring.fwd_exposed_ms == pytest.approx(3 * max(0.0, step - attention_ms / 4))
        assert ring.bwd_exposed_ms == pytest.approx(3 * max(0.0, step_bwd - 2 * attention_ms / 4))
    assert ring_attention(2048, 100.0, plan.model, 2, group, hw).fwd_exposed_ms == 0.0
    none = ring_attention(2048, 1.0, plan.model, 2, [0], hw)
    assert none.fwd_bytes == none.bwd_bytes == none.fwd_exposed_ms == 0.0


def test_cp_rows_carry_the_ring_bytes():
    """Every lane records one ring row per layer forward and one backward (plus one per
    recompute) with the hand-formula bytes; with CP = 1 there are none."""
    cp, seq = 2, 8192
    report = simulate(moe_plan(cp, 2, seq))
    cols = report.recorder.columns()
    rows = cols["op"] == Op.CP_COMM
    block = seq / cp * 4 * 256 * 2
    lanes = 2 * 2 * cp  # PP x DP x CP
    per_lane_layers = 2  # 4 layers over PP 2
    expected = lanes * 4 * per_lane_layers * (block + 2 * block)  # 4 micro-batches
    assert rows.sum() == lanes * 4 * per_lane_layers * 2
    assert cols["bytes"][rows].sum() == pytest.approx(expected)
    plain = simulate(moe_plan(1, 4, seq)).recorder.columns()
    assert not np.any(plain["op"] == Op.CP_COMM)


def test_cp_one_is_the_plan_without_cp():
    explicit = simulate(moe_plan(1, 4))
    raw = copy.deepcopy(moe_plan(1, 4).model_dump(mode="json"))
    del raw["parallel"]["cp"]
    implicit = simulate(plan_from_dict(raw, "test"))
    assert explicit.metrics["iteration_time_ms"] == implicit.metrics["iteration_time_ms"]
    assert explicit.events == implicit.events


def test_cp_splits_tokens_and_attention():
    """A CP rank's linear ops see 1/cp of the tokens, its core attention 1/cp of the causal
    work."""
    one, four = moe_plan(1, 4, 16384), moe_plan(4, 1, 16384)
    lens = np.array([16384])
    base = MicrobatchCosts(one, [0, 1], lens)
    split = MicrobatchCosts(four, [0, 1], lens)
    assert split.tokens == base.tokens / 4
    assert split._core_attention_ms < base._core_attention_ms
    assert split.p2p_bytes == pytest.approx(base.p2p_bytes / 4)


def test_activation_memory_scales_as_one_over_cp():
    activations = {}
    for cp in (1, 2, 4, 8):
        plan = moe_plan(cp, 16 // (2 * cp) or 1, 32768, recompute="selective")
        memory = memory_per_gpu(plan, Layout(plan))
        activations[cp] = [st.activations_gib for st in memory.stages]
    for cp in (2, 4, 8):
        for a, b in zip(activations[1], activations[cp], strict=True):
            assert b == pytest.approx(a / cp, rel=1e-12)


def long_context_plan(cp: int):
    """Mixtral-8x7B, 128K-token sequences, TP 8 EP 8 on 64 H100 (DP = 8 / CP)."""
    return plan_from_dict(
        {
            "name": f"128k-cp{cp}",
            "model": {"preset": "mixtral-8x7b"},
            "hardware": {"gpu": "H100-SXM", "num_nodes": 8, "gpus_per_node": 8},
            "parallel": {
                "tp": 8,
                "pp": 1,
                "dp": 8 // cp,
                "cp": cp,
                "ep": 8,
                "etp": 1,
                "num_microbatches": 8,
                "sequence_parallel": True,
                "distributed_optimizer": True,
                "recompute": "selective",
            },
            "workload": {"mode": "training", "seq_len": {"dist": "fixed", "value": 131072}},
        },
        "test",
    )


def test_128k_plan_fits_only_with_cp():
    without, with_cp = audit(long_context_plan(1)), audit(long_context_plan(4))
    capacity = without.memory.capacity_gib
    assert without.memory.stages[0].total_gib > capacity
    assert with_cp.memory.stages[0].total_gib < capacity
    assert any(f.severity == "error" and "memory" in f.message.lower() for f in without.findings)
    assert not any(f.severity == "error" for f in with_cp.findings)


def test_cp_layout_is_megatron_order_and_folds_with_ep():
    plan = moe_plan(2, 2)
    layout = Layout(plan)
    assert layout.groups("cp")[0] == [0, 2]  # tp-cp-ep-dp-pp: CP strides over TP
    assert layout.groups("dp")[0] == [0, 4]
    # EP 4 x ETP 1 folds over the 8 ranks of a stage (TP2 x CP2 x DP2): consecutive ranks
    assert layout.groups("ep")[0] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("parallel", "seq", "message"),
    [({"flash_attention": False}, 8192, "flash_attention"), ({}, 8190, "multiple of 2 x cp")],
)
def test_cp_refuses_what_megatron_cannot_run(parallel, seq, message):
    with pytest.raises(EngineError, match=message):
        simulate(moe_plan(2, 2, seq, **parallel))

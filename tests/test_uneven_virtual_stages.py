"""Uneven pipelines with virtual stages: ``parallel.layers_per_stage`` with pp x v entries in
Megatron's order (the first chunks of stages 0..pp-1, then the second chunks, ...), checked by
hand on a 6-layer model over PP 2 x 2 virtual stages."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustersim.audit.checks import audit
from clustersim.costs.memory import (
    GIB,
    inflight_microbatches,
    layer_activation_bytes,
    memory_per_gpu,
)
from clustersim.engine.recorder import Op
from clustersim.layout import Layout
from clustersim.run.simulate import simulate
from clustersim.spec import plan_from_dict


def plan(split, v=2, layers=6, routing="sampled"):
    return plan_from_dict(
        {
            "name": "uneven",
            "model": {"preset": "mixtral-8x7b", "num_layers": layers, "moe": {"routing": routing}},
            "hardware": {"gpu": "H100-SXM", "num_nodes": 1, "gpus_per_node": 8},
            "parallel": {
                "tp": 1,
                "pp": 2,
                "dp": 4,
                "ep": 4,
                "num_microbatches": 4,
                "schedule": "interleaved",
                "virtual_stages": v,
                "layers_per_stage": split,
            },
            "workload": {"mode": "training", "seq_len": {"dist": "fixed", "value": 2048}},
        },
        "test",
    )


def test_layout_follows_megatron_order():
    # virtual stages 0..3 hold 1, 2, 2, 1 layers: 0 | 1 2 | 3 4 | 5; stage s holds vstages s, s+2
    layout = Layout(plan([1, 2, 2, 1]))
    assert [layout.chunk_layers(s, c) for c in range(2) for s in range(2)] == [
        [0],
        [1, 2],
        [3, 4],
        [5],
    ]
    assert layout.stage_layers == [[0, 3, 4], [1, 2, 5]]
    assert layout.layers_per_stage == [3, 3]


def test_engine_runs_each_chunk_on_its_stage():
    report = simulate(plan([1, 2, 2, 1]))
    cols = report.recorder.columns()
    lanes_of_stage = {0: {0, 1, 2, 3}, 1: {4, 5, 6, 7}}
    forward = cols["op"] == Op.ATTN_FWD
    for stage, layers in ((0, {0, 3, 4}), (1, {1, 2, 5})):
        mine = forward & np.isin(cols["lane"], list(lanes_of_stage[stage]))
        assert set(cols["layer"][mine].tolist()) == layers
        assert mine.sum() == 4 * 4 * 3  # lanes x micro-batches x layers
    logits = cols["op"] == Op.LOGITS_FWD  # the output layer: last virtual stage (stage 1)
    assert set(cols["lane"][logits].tolist()) == lanes_of_stage[1]


def test_chunk_step_time_is_its_layer_count():
    """Even routing, identical MoE layers: on stage 0 the forward step of chunk 1 (layers 3
    and 4, back to back) lasts twice that of chunk 0 (layer 0): from the first attention to
    the last combine before the step's pipeline send."""
    report = simulate(plan([1, 2, 2, 1], routing="even"))
    cols = report.recorder.columns()
    mine = np.flatnonzero((cols["lane"] == 0) & (cols["microbatch"] == 0))
    sends = [i for i in mine if cols["op"][i] == Op.P2P_SEND]  # chunk 0, then chunk 1
    first = [i for i in mine if cols["op"][i] == Op.ATTN_FWD]
    chunk0 = cols["start_ms"][sends[0]] - cols["start_ms"][first[0]]
    chunk1 = cols["start_ms"][sends[1]] - cols["start_ms"][first[1]]
    assert [cols["layer"][i] for i in first] == [0, 3, 4]
    assert chunk1 == pytest.approx(2 * chunk0, rel=1e-9)


@pytest.mark.parametrize(
    ("split", "message"),
    [([3, 3], "one per virtual stage"), ([1, 2, 2, 2], "sums to 7"), ([1, 2, 3], "lists 3")],
)
def test_audit_explains_bad_splits(split, message):
    findings = audit(plan(split)).findings
    assert any(f.node == "parallel.layers_per_stage" and message in f.message for f in findings)


def test_per_stage_split_still_works_without_virtual_stages():
    layout = Layout(plan([2, 4], v=1))
    assert layout.stage_layers == [[0, 1], [2, 3, 4, 5]]
    assert layout.chunk_layers(1, 0) == [2, 3, 4, 5]


# ---- activations in flight follow the chunks (costs/memory.py) ------------------------------
# Mixtral's layers are all MoE, so one layer of one micro-batch stores the same L bytes.
SEQ, VOCAB = 2048, 32000


def activations(split, layers):
    p = plan(split, layers=layers)
    return [st.activations_gib * GIB for st in memory_per_gpu(p, Layout(p)).stages]


def layer_bytes(p):
    return layer_activation_bytes(p.model, p.parallel, 0, SEQ, 1)


def test_uneven_chunks_peak_by_hand():
    """PP 2, v 2, 4 micro-batches, [1, 3, 3, 1]: stage 0 holds chunks of 1 and 3 layers, stage 1
    of 3 and 1. Megatron's order (F = forward, B = backward, mb/chunk), layers held after it:
    stage 0 (warm-up 4): F0/0 1, F1/0 2, F0/1 5, F1/1 8, F2/0 9, B0/1 6, F3/0 7, B1/1 4,
    F2/1 7, B0/0 6, F3/1 9, B1/0 8, ... -> peak 9 L (equal chunks: 5 chunks x 2 = 10 L);
    stage 1 (warm-up 2): F0/0 3, F1/0 6, F0/1 7, B0/1 6, F1/1 7, B1/1 6, F2/0 9, B0/0 6,
    F3/0 9, ... -> peak 9 L (equal chunks: 3 chunks x 2 = 6 L). The embedding output (stage 0)
    and the logits (stage 1) are the same in both layouts, so the differences are layers only."""
    L = layer_bytes(plan([1, 3, 3, 1], layers=8))
    uneven, equal = activations([1, 3, 3, 1], 8), activations([2, 2, 2, 2], 8)
    assert uneven[0] - equal[0] == pytest.approx((9 - 10) * L, rel=1e-9)
    assert uneven[1] - equal[1] == pytest.approx((9 - 6) * L, rel=1e-9)


def test_equal_chunks_unchanged():
    """Equal chunks: the whole-stage formula, in-flight micro-batches x the stage's layers, plus
    the embedding output (stage 0, per micro-batch in flight) and the output layer (stage 1,
    one micro-batch: 4sbh + fp32 logits 4sbV), exactly as the default even layout."""
    p = plan([2, 2, 2, 2], layers=8)
    h, L = p.model.hidden_size, layer_bytes(p)
    got = activations([2, 2, 2, 2], 8)
    even = plan(None, layers=8)
    assert got == [st.activations_gib * GIB for st in memory_per_gpu(even, Layout(even)).stages]
    inflight = [inflight_microbatches(p, s) for s in range(2)]
    assert inflight == [2.5, 1.5]  # (2(p-s-1) + (v-1)p + 1) / v
    assert got[0] == pytest.approx(inflight[0] * (4 * L + 2 * SEQ * h), rel=1e-12)
    assert got[1] == pytest.approx(inflight[1] * 4 * L + 4 * SEQ * h + 4 * SEQ * VOCAB, rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(split=st.lists(st.integers(1, 4), min_size=4, max_size=4))
def test_never_below_largest_chunk_nor_above_warmup_of_largest(split):
    """Every chunk is in flight at some point, so a stage holds at least its largest chunk's
    layers; at most (warm-up + 1) chunk micro-batches are in flight, so at most that many of
    its largest chunk (stage 0: 5, stage 1: 3)."""
    layers = sum(split)
    p = plan(split, layers=layers)
    layout, L = Layout(p), layer_bytes(p)
    got = activations(split, layers)
    h = p.model.hidden_size
    extra = [2.5 * 2 * SEQ * h, 4 * SEQ * h + 4 * SEQ * VOCAB]  # embedding / output layer
    for stage, most in ((0, 5), (1, 3)):
        largest = max(len(layout.chunk_layers(stage, c)) for c in range(2)) * L
        assert largest - 1e-6 <= got[stage] - extra[stage] <= most * largest + 1e-6

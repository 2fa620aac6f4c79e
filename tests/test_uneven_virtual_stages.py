"""Uneven pipelines with virtual stages: ``parallel.layers_per_stage`` with pp x v entries in
Megatron's order (the first chunks of stages 0..pp-1, then the second chunks, ...), checked by
hand on a 6-layer model over PP 2 x 2 virtual stages."""

from __future__ import annotations

import numpy as np
import pytest

from clustersim.audit.checks import audit
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

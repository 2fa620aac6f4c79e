"""FlashAttention's backward in training: ``attention.backward_ratio`` (its time over the
forward's), fitted on the papers' forward and backward throughput of the same shapes, and
charged to the core attention only (the block's GEMMs stay at 2 x their forward)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from clustersim.calibration import fit_attention
from clustersim.costs.comm import p2p_link, p2p_ms
from clustersim.engine.training.optimes import MicrobatchCosts
from clustersim.spec import plan_from_dict
from clustersim.spec.calibration_data import calibration_data


def _row(row_id, direction, tflops, causal="false", seq=4096, kernel="FA3"):
    return {
        "row_id": row_id,
        "kernel": kernel,
        "gpu": "H100-SXM5-80GB",
        "dtype": "fp16/bf16",
        "direction": direction,
        "causal": causal,
        "head_dim": 128,
        "seq_len": seq,
        "batch_size": 16384 // seq,
        "num_heads": 16,
        "tflops": tflops,
    }


def test_backward_ratio_is_the_geometric_mean_of_the_measured_pairs(tmp_path):
    """Shape A: forward 400, backward 250 TFLOP/s -> 2.5 x 400 / 250 = 4.0; shape B: forward
    300, forward + backward 350 -> 3.5 x 300 / 350 - 1 = 2.0; a backward row without its
    forward and another kernel's rows are ignored. Ratio sqrt(4 x 2) = 2.828; out of sample
    each shape is predicted by the other: 2 / 4 - 1 and 4 / 2 - 1."""
    rows = [
        _row("a1", "fwd", 400),
        _row("a2", "bwd", 250),
        _row("b1", "fwd", 300, causal="true", seq=8192),
        _row("b2", "fwd_bwd", 350, causal="true", seq=8192),
        _row("c1", "bwd", 100, seq=1024),
        _row("d1", "fwd", 100, kernel="FA2"),
        _row("d2", "bwd", 10, kernel="FA2"),
    ]
    with open(tmp_path / fit_attention.CSV_NAME, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fit = fit_attention.fit_backward("h100", tmp_path)
    assert sorted(fit.measured.tolist()) == pytest.approx([2.0, 4.0])
    assert fit.ratio == round(math.sqrt(8.0), 3)
    assert fit.errors.out_of_sample.worst == pytest.approx(1.0)  # 4 / 2 - 1
    assert fit.errors.out_of_sample.median == pytest.approx(0.75)  # |-0.5| and |+1|


def test_packaged_ratios_match_the_papers():
    """FA3 on H100 (12 shapes, 2.62-3.69) and FA2 on A100 (2 shapes, 2.84-2.85): the backward
    takes ~2.9x the forward, not the 2x of a GEMM."""
    assert calibration_data("h100")["attention"]["backward_ratio"] == pytest.approx(2.92, abs=0.01)
    assert calibration_data("a100")["attention"]["backward_ratio"] == pytest.approx(2.84, abs=0.01)


def _plan(flash: bool, ratio: float | None, cp: int = 1, seq: int = 8192, per_node: int = 8):
    hardware = {"gpu": "H100-SXM", "num_nodes": 4 // per_node or 1, "gpus_per_node": per_node}
    if ratio is not None:
        cal = calibration_data("h100")
        cal["attention"] = {**cal["attention"], "backward_ratio": ratio}
        hardware["calibration"] = cal
    return plan_from_dict(
        {
            "model": {"preset": "mixtral-8x7b", "num_layers": 2},
            "hardware": hardware,
            "parallel": {
                "tp": 2,
                "pp": 1,
                "dp": 4 // cp,
                "cp": cp,
                "ep": 4,
                "flash_attention": flash,
                "sequence_parallel": True,
            },
            "workload": {"mode": "training", "seq_len": {"dist": "fixed", "value": seq}},
        },
        "test",
    )


@pytest.mark.parametrize("ratio", [2.0, 2.92, 4.0])
def test_attention_block_backward_by_hand(ratio):
    """Backward = 2 x (block forward - core attention) + ratio x core attention."""
    costs = MicrobatchCosts(_plan(True, ratio), [0, 1], np.array([8192]))
    layer = costs.moe
    core = costs._core_attention_ms
    assert core > 0 and layer.core_attn_fwd_ms == core
    expected = 2.0 * (layer.attn_fwd_ms - core) + ratio * core
    assert layer.attn_bwd_ms == pytest.approx(expected, rel=1e-12)


def test_ratio_two_is_the_plain_backward_and_unfused_attention_ignores_it():
    fused = MicrobatchCosts(_plan(True, 2.0), [0, 1], np.array([8192])).moe
    assert fused.attn_bwd_ms == pytest.approx(2.0 * fused.attn_fwd_ms, rel=1e-12)
    unfused = MicrobatchCosts(_plan(False, 4.0), [0, 1], np.array([8192])).moe
    assert unfused.attn_bwd_ms == pytest.approx(2.0 * unfused.attn_fwd_ms, rel=1e-12)


@pytest.mark.parametrize("ratio", [2.0, 2.92])
def test_ring_attention_backward_hides_under_the_ratio(ratio):
    """CP 2 across two nodes of 2 GPUs: the backward ring step (K/V and their gradients over
    the network) hides under ratio x the rank's core attention / cp."""
    plan = _plan(True, ratio, cp=2, seq=2048, per_node=2)
    costs = MicrobatchCosts(plan, [0, 1], np.array([2048]))
    ring, core = costs.moe.ring, costs._core_attention_ms
    hw = plan.hardware
    link = p2p_link([0, 2], hw.gpus_per_node, hw)
    step_bwd = p2p_ms(2 * ring.block_bytes, link.bandwidth_gbps, link.latency_us)
    assert ring.bwd_exposed_ms > 0
    assert ring.bwd_exposed_ms == pytest.approx(step_bwd - ratio * core / 2, rel=1e-12)

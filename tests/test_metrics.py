"""Metrics (``analysis.metrics``) on hand-made event rows, against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustersim.engine.recorder import Kind, Op, Recorder
from clustersim.engine.training.moe import Dispatch, DispatchBatch
from clustersim.engine.training.sim import Lane, SimResult
from clustersim.metrics.training import time_breakdown, training_metrics, union_length_by_lane
from clustersim.spec import plan_from_dict


def union(intervals: list[tuple[int, float, float]], num_lanes: int) -> np.ndarray:
    """``union_length_by_lane`` of (lane, start, end) triples."""
    if not intervals:
        empty = np.array([], dtype=np.int32)
        return union_length_by_lane(empty, np.array([]), np.array([]), num_lanes)
    lanes, starts, ends = (np.array(x) for x in zip(*intervals, strict=True))
    return union_length_by_lane(
        lanes.astype(np.int32), starts.astype(float), ends.astype(float), num_lanes
    )


# ---- union_length_by_lane ---------------------------------------------------------------------


def test_union_empty():
    np.testing.assert_array_equal(union([], 3), [0.0, 0.0, 0.0])


def test_union_disjoint_intervals_add():
    assert union([(0, 0, 1), (0, 2, 3.5)], 1) == pytest.approx([2.5])


def test_union_overlapping_intervals_count_once():
    # [0, 2] u [1, 3] = [0, 3]
    assert union([(0, 0, 2), (0, 1, 3)], 1) == pytest.approx([3.0])


def test_union_nested_intervals():
    # [0, 10] holds [2, 3] and [4, 5]; [9, 12] sticks out by 2
    assert union([(0, 0, 10), (0, 2, 3), (0, 4, 5), (0, 9, 12)], 1) == pytest.approx([12.0])


def test_union_nested_after_a_long_interval_given_last():
    # a short interval sorted first, then one that swallows it and one inside the big one
    assert union([(0, 1, 2), (0, 0, 8), (0, 3, 4)], 1) == pytest.approx([8.0])


def test_union_touching_and_zero_length_intervals():
    # [0, 1] and [1, 2] touch: 2; a zero-length interval adds nothing
    assert union([(0, 0, 1), (0, 1, 2), (0, 5, 5)], 1) == pytest.approx([2.0])


def test_union_several_lanes_unsorted_and_an_empty_lane():
    intervals = [
        (2, 4, 6),
        (0, 5, 7),
        (2, 0, 1),
        (0, 0, 2),
        (0, 1, 3),  # lane 0: [0,3] u [5,7] = 5
        (2, 5, 9),  # lane 2: [0,1] u [4,9] = 6
        (3, 0, 100),  # lane 3: 100, longer than every other lane's span
        (0, 6, 6.5),  # inside lane 0's [5, 7]
    ]
    np.testing.assert_allclose(union(intervals, 5), [5.0, 0.0, 6.0, 100.0, 0.0])


def test_union_intervals_of_one_lane_never_merge_with_another_lane():
    # identical intervals on two lanes: each lane counts its own
    assert union([(0, 0, 4), (1, 0, 4), (1, 2, 6)], 2) == pytest.approx([4.0, 6.0])


def _reference_union(intervals, num_lanes):
    """Sort and merge, lane by lane."""
    out = np.zeros(num_lanes)
    for lane in range(num_lanes):
        spans = sorted((s, e) for ln, s, e in intervals if ln == lane)
        cur_s = cur_e = None
        for s, e in spans:
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    out[lane] += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            out[lane] += cur_e - cur_s
    return out


_intervals = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 50), st.integers(0, 20)).map(
        lambda t: (t[0], t[1] / 4, (t[1] + t[2]) / 4)
    ),
    max_size=30,
)


@settings(max_examples=100, deadline=None)
@given(_intervals)
def test_union_matches_sort_and_merge(intervals):
    np.testing.assert_allclose(union(intervals, 4), _reference_union(intervals, 4), atol=1e-9)


# ---- training_metrics on a hand-made recorder --------------------------------------------------

_PLAN = {
    "model": {
        "num_layers": 4,
        "hidden_size": 1024,
        "num_attention_heads": 8,
        "ffn_hidden_size": 4096,
        "vocab_size": 32000,
        "activation": "gelu",
    },
    "hardware": {"gpu": "H100-SXM", "num_nodes": 1, "gpus_per_node": 8},
    "parallel": {"tp": 1, "pp": 2, "dp": 1, "num_microbatches": 1},
    "workload": {"seq_len": {"dist": "fixed", "value": 1024}},
}


def _hand_run():
    """Two lanes (two pipeline stages of one GPU each), wall time 8 ms, pipeline end 6 ms.

    lane 0: compute [0, 2]; blocking comm [1, 3]; async comm [3, 6]
    lane 1: compute [2, 4]; blocking comm [5, 6]; rank 1 idles 0.5 ms inside its compute
    """
    plan = plan_from_dict(_PLAN, "test")
    rec = Recorder(world_size=2)
    rec.add(0, Kind.COMPUTE, Op.ATTN_FWD, 0.0, 2.0, 0, 0)
    rec.add(0, Kind.COMM, Op.TP_COMM, 1.0, 3.0, 0, 0, 100.0)
    rec.add(0, Kind.COMM_ASYNC, Op.GRAD_REDUCE, 3.0, 6.0, -1, -1, 400.0)
    rec.add(1, Kind.COMPUTE, Op.EXPERT_FWD, 2.0, 4.0, 2, 0)
    rec.add(1, Kind.COMM, Op.A2A_COMBINE, 5.0, 6.0, 2, 0, 50.0)
    rec.rank_idle_ms[1] = 0.5
    dispatches = [  # one batch of two routed (group, micro-batch) outcomes of layer 0
        DispatchBatch.stack(
            [
                Dispatch(
                    np.zeros((2, 2)), np.zeros(2), np.zeros(2), np.array([1.0, 3.0]), 1.0, 10.0
                ),
                Dispatch(
                    np.zeros((2, 2)), np.zeros(2), np.zeros(2), np.array([2.0, 2.0]), 0.0, 10.0
                ),
            ]
        )
    ]
    lanes = [Lane(0, 0, 0, [0]), Lane(1, 1, 0, [1])]
    seq_lens = [[np.array([1024])]]
    result = SimResult(8.0, 6.0, lanes, 1, 0, 1024, seq_lens, dispatches, [0])
    return plan, rec, result


def test_training_metrics_by_hand():
    plan, rec, result = _hand_run()
    m = training_metrics(plan, rec, result)
    assert m["iteration_time_ms"] == m["latency_ms"] == 8.0
    assert m["throughput_tokens_per_ms"] == pytest.approx(1024 / 8)
    assert m["throughput_tokens_per_s"] == pytest.approx(1024 / 8 * 1e3)
    # exposed comm: lane 0 |[0,6]| - |[0,2]| = 4, lane 1 |[2,4] u [5,6]| - 2 = 1 -> 2.5 / 8
    assert m["comm_overhead_pct"] == pytest.approx(100 * 2.5 / 8)
    # all comm (2 + 3 + 1) / all compute (2 + 2)
    assert m["comm_to_compute_pct"] == pytest.approx(100 * 6 / 4)
    # in [0, 6] lane 0's stream (compute + blocking comm) is busy [0, 3], lane 1's [2,4] u [5,6]
    assert m["bubble_pct"] == pytest.approx(100 * (3 + 3) / 2 / 6)
    # compute-busy per GPU: 2 and 2 - 0.5
    assert m["gpu_utilization_pct"] == pytest.approx(100 * (2 + 1.5) / 2 / 8)
    # mean/max expert load: 2/3 and 1; dropped 1 of 20 routed copies
    assert m["load_balance_pct"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert m["dropped_tokens_pct"] == pytest.approx(100 * 1 / 20)
    # Korthikanti Eq. 7: 72 B L s h^2 (1 + s/(6h) + V/(12 h L)), B = 1, over 8 ms x 2 GPUs x peak
    h, layers, s, vocab = 1024, 4, 1024, 32000
    flops = 72 * layers * s * h**2 * (1 + s / (6 * h) + vocab / (12 * h * layers))
    assert m["mfu_pct"] == pytest.approx(100 * flops / (8e-3 * 2 * 989e12), rel=1e-12)
    for key in ("latency_ms_p99", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50"):
        assert m[key] is None


def test_training_metrics_without_routing():
    plan, rec, result = _hand_run()
    result.dispatches = []
    m = training_metrics(plan, rec, result)
    assert m["load_balance_pct"] is None
    assert m["dropped_tokens_pct"] is None


def test_time_breakdown_is_mean_per_lane():
    _plan, rec, result = _hand_run()
    assert time_breakdown(rec, result) == pytest.approx(
        {
            "attn_fwd": 2 / 2,
            "tp_comm": 2 / 2,
            "grad_reduce": 3 / 2,
            "expert_fwd": 2 / 2,
            "a2a_combine": 1 / 2,
        }
    )

"""The distributed optimizer's overlapped parameter all-gather (Megatron-Core's
``overlap_param_gather``, engine/training/param_gather.py): buckets in backward order, gathers
back to back from the iteration's start, each layer's first forward waiting for its bucket.

Expected values are closed forms: the ring all-gather (n - 1) / n x bytes / B + (n - 1) alpha
on one node (the ROOFLINE collectives of the engine tests) and the bucket rule by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_engine import DENSE, H100, _dense_params, dense_layer_params, make_plan, rows

from clustersim.engine.recorder import Kind, Op
from clustersim.engine.training.param_gather import (
    GatherBucket,
    forward_buckets,
    split_at,
)
from clustersim.run.simulate import simulate


def test_buckets_close_walking_backward_and_the_rest_is_first():
    layers = [(0, 10.0, 0.0), (1, 6.0, 4.0), (2, 10.0, 0.0), (3, 5.0, 5.0)]
    # backward: 3 (10 >= 10: closes), 2 (10: closes), 1 (10: closes), 0 left over
    assert forward_buckets(layers, 10.0, True) == [[0], [1], [2], [3]]
    # threshold 15: 3 + 2 = 20 closes, 1 + 0 = 20 closes
    assert forward_buckets(layers, 15.0, True) == [[0, 1], [2, 3]]
    # threshold 25: 3 + 2 + 1 = 30 closes; 0 is the first (smaller) bucket
    assert forward_buckets(layers, 25.0, True) == [[0], [1, 2, 3]]
    assert forward_buckets(layers, 1.0, False) == [[0, 1, 2, 3]]
    assert forward_buckets([], 1.0, True) == []


def _zero1(n: int, bucket_mb: float, overlap: bool = True):
    plan = make_plan(
        DENSE,
        {
            "dp": n,
            "num_microbatches": 2,
            "distributed_optimizer": True,
            "overlap_communication": overlap,
            "grad_bucket_mb": bucket_mb,
        },
    )
    return rows(simulate(plan))


def _buckets(cols):
    """Per bucket (in order of its first layer, whose forward records it): start, end,
    bytes, and the bytes of its exposed part; a bucket is a hidden (asynchronous) row and
    the row of the wait for it, each left out where it would be 0 long."""
    gather = cols["op"] == Op.PARAM_GATHER
    layers = np.unique(cols["layer"][gather])
    out = []
    for lay in layers:
        sel = gather & (cols["layer"] == lay)
        exposed = sel & (cols["kind"] == Kind.COMM)
        hidden = sel & (cols["kind"] == Kind.COMM_ASYNC)
        assert exposed.sum() <= 1 and hidden.sum() <= 1
        if exposed.any() and hidden.any():  # the wait starts where the hidden part ends
            assert cols["start_ms"][exposed][0] == pytest.approx(cols["end_ms"][hidden][0])
        out.append((cols["start_ms"][sel].min(), cols["end_ms"][sel].max(),
                    cols["bytes"][sel].sum(), cols["bytes"][exposed].sum()))  # fmt: skip
    return tuple(np.array(col) for col in zip(*out, strict=True))


def _ring_gather_ms(nbytes: float, n: int) -> float:
    bandwidth, alpha_ms = H100["intra_bw"] * 1e9, H100["intra_lat"] * 1e-3
    return (n - 1) / n * nbytes / bandwidth * 1e3 + (n - 1) * alpha_ms


@pytest.mark.parametrize("n", [2, 4, 8])
def test_one_bucket_gather_is_exposed_before_the_first_forward(n):
    """One bucket (threshold above the model's gradients): the whole BF16 model, 2 bytes x
    parameters, is gathered from t = 0, and the first layer's forward starts when it ends."""
    cols = _zero1(n, bucket_mb=1e6)
    starts, ends, nbytes, blocking = _buckets(cols)
    expected = _ring_gather_ms(2 * _dense_params(), n)
    assert starts == pytest.approx([0.0], abs=1e-12)
    assert ends == pytest.approx([expected], rel=1e-12)
    # nothing ran before it: all of it is exposed, as a blocking row with all the bytes
    assert blocking == pytest.approx([2 * _dense_params()], rel=1e-12)
    assert nbytes == pytest.approx([2 * _dense_params()], rel=1e-12)
    attn = cols["op"] == Op.ATTN_FWD
    assert cols["start_ms"][attn].min() == pytest.approx(expected, rel=1e-12)


def test_per_layer_buckets_wait_only_for_the_first_and_keep_the_bytes():
    """Per-layer buckets (threshold below one layer's FP32 gradients): the first bucket holds
    layer 0 with the embedding and output layer (the stage's non-layer weights); the gathers
    run back to back; layer i's first forward starts no earlier than its bucket's end, the
    first layer exactly at the first bucket's end; the bytes are the whole model's."""
    n, h, ffn, vocab = 4, DENSE["hidden_size"], DENSE["ffn_hidden_size"], DENSE["vocab_size"]
    layer = dense_layer_params(h, ffn)
    cols = _zero1(n, bucket_mb=1.0)
    starts, ends, nbytes, _ = _buckets(cols)
    assert len(nbytes) == DENSE["num_layers"]
    assert nbytes.sum() == pytest.approx(2 * _dense_params(), rel=1e-12)
    non_layer = 2 * vocab * h + h
    np.testing.assert_allclose(nbytes, 2 * np.array([layer + non_layer] + [layer] * 3), rtol=1e-12)
    np.testing.assert_allclose(ends, starts + [_ring_gather_ms(b, n) for b in nbytes], rtol=1e-12)
    np.testing.assert_allclose(starts[1:], ends[:-1], rtol=1e-12)  # back to back
    attn = cols["op"] == Op.ATTN_FWD
    first = {}
    for lay, start in zip(cols["layer"][attn], cols["start_ms"][attn], strict=True):
        first[int(lay)] = min(first.get(int(lay), np.inf), float(start))
    assert first[0] == pytest.approx(ends[0], rel=1e-12)
    for i in range(DENSE["num_layers"]):
        assert first[i] >= ends[i] - 1e-12


def test_without_overlap_the_gather_follows_the_optimizer_and_nothing_waits_for_it():
    cols = _zero1(4, bucket_mb=1.0, overlap=False)
    attn = cols["op"] == Op.ATTN_FWD
    assert cols["start_ms"][attn].min() == 0.0
    gather = cols["op"] == Op.PARAM_GATHER
    opt = cols["op"] == Op.OPTIMIZER
    assert cols["start_ms"][gather].min() == pytest.approx(cols["end_ms"][opt].max(), rel=1e-12)


# ---- the NICs shared with the EP all-to-all ---------------------------------------------------


def _moe_zero1_sim(ep: int, dp: int):
    from test_engine import MOE

    from clustersim.engine.recorder import Recorder
    from clustersim.engine.training.sim import TrainingSim
    from clustersim.engine.training.workload import microbatch_lengths
    from clustersim.run.simulate import routing_for

    model = {**MOE, "moe": {**MOE["moe"], "routing": "even"}}
    plan = make_plan(
        model, {"dp": dp, "ep": ep, "num_microbatches": 2, "distributed_optimizer": True}
    )
    lengths = microbatch_lengths(plan, np.random.default_rng(0))
    routing, _ = routing_for(plan)
    return TrainingSim(plan, Recorder(plan.parallel.world_size), lengths, routing, False)


def test_all_to_all_shares_the_nic_with_bucket_and_gathers_by_hand():
    """Work left when an all-to-all of d = 5 ms starts at t = 2: the gradient bucket in
    flight until 10 (8 ms), the gathers until 4 (2 ms); backlog 10, so the all-to-all loses
    min(5, 10) = 5 ms and the backlog moves 5 ms: 4 to the bucket (14), 1 to the gathers
    (their clock 5; a gather running at t = 2 ends 1 ms later, a queued one starts and ends
    1 ms later, one done before stays)."""
    sim = _moe_zero1_sim(ep=2, dp=2)
    co = sim.cohorts[0]
    lanes = len(co.lanes)
    sim._bucket_busy[0] = np.full(lanes, 10.0)
    sim._gather_chain[0] = (np.full(lanes, 4.0), set())

    def bucket(start, end):
        return GatherBucket(np.full(lanes, start), np.full(lanes, end), 1.0)

    # buckets: one done (0-1), one running (1-3), one queued (3-4)
    sim._gather_ready[0] = {2: bucket(0.0, 1.0), 0: bucket(1.0, 3.0), 1: bucket(3.0, 4.0)}
    delay = sim._overlapped_streams(co, np.full(lanes, 2.0), np.full(lanes, 5.0))
    np.testing.assert_allclose(delay, 5.0)
    np.testing.assert_allclose(sim._bucket_busy[0], 14.0)
    np.testing.assert_allclose(sim._gather_chain[0][0], 5.0)
    spans = {i: (b.start_ms[0], b.end_ms[0]) for i, b in sim._gather_ready[0].items()}
    assert spans == {2: (0.0, 1.0), 0: (1.0, 4.0), 1: (4.0, 5.0)}
    # nothing in flight: no delay
    sim._bucket_busy[0] = np.full(lanes, 1.0)
    sim._gather_chain[0] = (np.full(lanes, 1.5), set())
    np.testing.assert_allclose(
        sim._overlapped_streams(co, np.full(lanes, 2.0), np.full(lanes, 5.0)), 0.0
    )


def test_no_nic_sharing_when_the_all_to_all_stays_inside_a_node():
    """EP 8 of DP 16 on two nodes: the all-to-all stays on NVLink, the sharing rule is off;
    EP 16 crosses nodes, as the DP gathers do: on."""
    assert not _moe_zero1_sim(ep=8, dp=16)._cross_node_sharing(_moe_zero1_sim(8, 16).cohorts[0])
    sim = _moe_zero1_sim(ep=16, dp=16)
    assert sim._cross_node_sharing(sim.cohorts[0])


def test_split_at_clips_the_wait_to_the_gather():
    b = GatherBucket(np.array([1.0, 1.0, 1.0]), np.array([3.0, 3.0, 3.0]), 1.0)
    np.testing.assert_allclose(split_at(b, np.array([0.5, 2.0, 4.0])), [1.0, 2.0, 3.0])


def test_only_the_first_stage_is_bucketed():
    """PP 2, ZeRO-1 with overlap, buckets smaller than a layer: stage 0 reduces its gradients
    layer by layer during its last backward; stage 1 (Megatron-Core: ``pp_rank > 0``, one
    bucket) reduces all of its FP32 gradients (its layers, the final norm and output layer)
    in one collective from the end of its last backward, and gathers its BF16 weights in one
    bucket too."""
    h, ffn, vocab = DENSE["hidden_size"], DENSE["ffn_hidden_size"], DENSE["vocab_size"]
    plan = make_plan(
        DENSE,
        {"pp": 2, "dp": 4, "num_microbatches": 4, "distributed_optimizer": True,
         "grad_bucket_mb": 1.0},
    )  # fmt: skip
    cols = rows(simulate(plan))
    stage_of = {int(ln): int(ln) // (len(np.unique(cols["lane"])) // 2) for ln in cols["lane"]}
    stage = np.array([stage_of[int(ln)] for ln in cols["lane"]])
    reduce = cols["op"] == Op.GRAD_REDUCE
    lane1 = int(cols["lane"][stage == 1][0])
    mine = reduce & (cols["lane"] == lane1)
    assert mine.sum() == 1
    layers = DENSE["num_layers"] // 2
    stage1_params = layers * dense_layer_params(h, ffn) + vocab * h + h
    assert cols["bytes"][mine] == pytest.approx([4 * stage1_params], rel=1e-12)
    bwd = (cols["op"] == Op.ATTN_BWD) & (cols["lane"] == lane1)
    assert cols["start_ms"][mine][0] == pytest.approx(cols["end_ms"][bwd].max(), rel=1e-12)
    lane0 = int(cols["lane"][stage == 0][0])
    # one bucket per layer, then the embedding's gradients (the stage's last bucket)
    assert (reduce & (cols["lane"] == lane0)).sum() == layers + 1
    gathers = (cols["op"] == Op.PARAM_GATHER) & (cols["lane"] == lane1)
    assert cols["bytes"][gathers].sum() == pytest.approx(2 * stage1_params, rel=1e-12)
    assert len(np.unique(cols["layer"][gathers])) == 1

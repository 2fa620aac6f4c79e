"""One in-order hardware queue (``parallel.device_max_connections``, CUDA_DEVICE_MAX_CONNECTIONS):
Megatron-LM's default (1 with TP or CP > 1 before Blackwell) and its effect on ZeRO-3, checked
against the queue rule derived by hand: with one queue a kernel issued after a collective
cannot start before that collective starts, and a collective on a busy stream starts when its
predecessor ends. ZeRO-3's backward issues, per layer i: the gather of layer i-1 (prefetch),
backward(i), the reduce-scatter of layer i; then the gather of layer i-2, backward(i-1), ...
So

* several connections: backward(i-1) starts at max(end of backward(i), end of gather(i-1));
* one connection: for i >= 2 also not before the reduce-scatter of layer i has ended (the
  gather of layer i-2 waits behind it at the head of the queue, backward(i-1) behind that);
  backward(0) has no gather ahead of it and overlaps the last reduce-scatters."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from calibrations import ROOFLINE

from clustersim.costs.sharding import device_max_connections, forward_prefetch, one_hardware_queue
from clustersim.engine.recorder import Op
from clustersim.run.simulate import simulate
from clustersim.spec import plan_from_dict

SMALL = {
    "num_layers": 4,
    "hidden_size": 1024,
    "num_attention_heads": 8,
    "ffn_hidden_size": 4096,
    "vocab_size": 1000,
    "activation": "gelu",
}


def make_plan(parallel: dict, gpu: str = "H100-SXM", nodes: int = 2):
    par = {"tp": 2, "pp": 1, "dp": 8, "dp_sharding": "full", "sequence_parallel": True}
    par.update(parallel)
    return plan_from_dict(
        {
            "model": copy.deepcopy(SMALL),
            "hardware": {
                "gpu": gpu,
                "num_nodes": nodes,
                "gpus_per_node": 8,
                "calibration": {"collectives": ROOFLINE["collectives"]},
            },
            "parallel": par,
            "workload": {"seq_len": {"dist": "fixed", "value": 512}},
        },
        "test",
    )


@pytest.mark.parametrize(
    ("parallel", "gpu", "expected"),
    [
        ({"tp": 2}, "H100-SXM", 1),  # sequence parallelism: Megatron asserts 1 before Blackwell
        ({"tp": 1, "dp": 16}, "H100-SXM", 8),  # no model parallelism: CUDA's default
        ({"tp": 1, "cp": 2}, "A100-80GB", 1),  # context parallelism too
        ({"tp": 2}, "B200", 8),  # Blackwell: no longer required
        ({"tp": 2, "device_max_connections": 32}, "H100-SXM", 32),  # stated
        ({"tp": 1, "dp": 16, "device_max_connections": 1}, "H100-SXM", 1),
    ],
)
def test_default_follows_megatron(parallel, gpu, expected):
    plan = make_plan(parallel, gpu)
    assert device_max_connections(plan) == expected
    assert one_hardware_queue(plan) == (expected == 1)


def test_out_of_range_is_refused():
    from clustersim.spec.errors import PlanError

    with pytest.raises(PlanError, match="device_max_connections"):
        make_plan({"device_max_connections": 0})


def _lane0_rows(report):
    """(op, layer) -> (start_ms, end_ms) arrays of the first lane's trace rows."""
    cols = dict(report.recorder.columns())
    lane0 = cols["lane"] == cols["lane"].min()

    def rows(op, layer):
        sel = lane0 & (cols["op"] == op) & (cols["layer"] == layer)
        return cols["start_ms"][sel], cols["end_ms"][sel]

    return rows


def _backward_chain(connections: int):
    """Per lane-0 backward step i -> (start of backward(i-1), end of backward(i), end of
    gather(i-1), end of reduce-scatter(i)), one micro-batch."""
    report = simulate(make_plan({"device_max_connections": connections}))
    rows = _lane0_rows(report)

    out = []
    for i in range(SMALL["num_layers"] - 1, 0, -1):
        start_prev = rows(Op.MLP_BWD, i - 1)[0].min()
        end_bwd = rows(Op.ATTN_BWD, i)[1].max()
        gather_prev = rows(Op.PARAM_GATHER, i - 1)[1].max()  # the backward's gather
        rs = rows(Op.GRAD_REDUCE, i)[1].max()
        out.append((start_prev, end_bwd, gather_prev, rs))
    return np.array(out), report.metrics["iteration_time_ms"]


def test_one_queue_holds_the_next_backward_behind_the_reduce_scatter():
    chain, one_ms = _backward_chain(1)
    start, end_bwd, gather, rs = chain.T
    held = np.maximum.reduce([end_bwd, gather, rs])
    np.testing.assert_allclose(start[:-1], held[:-1], rtol=1e-12)  # i = 3, 2
    np.testing.assert_allclose(start[-1], max(end_bwd[-1], gather[-1]), rtol=1e-12)  # i = 1
    assert np.any(rs[:-1] > np.maximum(end_bwd, gather)[:-1] + 1e-9)  # the hold binds
    chain8, eight_ms = _backward_chain(8)
    start8, end_bwd8, gather8, rs8 = chain8.T
    np.testing.assert_allclose(start8, np.maximum(end_bwd8, gather8), rtol=1e-12)
    assert np.any(rs8 > start8 + 1e-9)  # with queues to spare the reduce-scatter overlaps
    assert one_ms > eight_ms


def _forward_chain(parallel: dict):
    """Per lane-0 forward step i >= 1 -> (end of forward(i-1), start of forward(i-1), start
    and end of the forward's gather of layer i, start of forward(i)), one micro-batch."""
    report = simulate(make_plan(parallel))
    rows = _lane0_rows(report)

    out = []
    for i in range(1, SMALL["num_layers"]):
        starts, ends = rows(Op.PARAM_GATHER, i)
        first = int(np.argmin(starts))  # the forward's gather (the backward gathers again)
        out.append(
            (
                rows(Op.MLP_FWD, i - 1)[1].max(),
                rows(Op.ATTN_FWD, i - 1)[0].min(),
                starts[first],
                ends[first],
                rows(Op.ATTN_FWD, i)[0].min(),
            )
        )
    return np.array(out), report.metrics["iteration_time_ms"]


def test_one_queue_exposes_the_forward_gathers():
    """Without explicit forward prefetch, the gather of layer i is issued in layer i's
    pre-forward hook, after layer i-1's kernels: with one queue it starts when forward(i-1)
    ends and forward(i) starts when it ends (no overlap); with explicit prefetch it is issued
    when forward(i-1) starts and overlaps it, so the iteration is shorter."""
    chain, lazy_ms = _forward_chain({"device_max_connections": 1})
    end_prev, _, g_start, g_end, start = chain.T
    np.testing.assert_allclose(g_start, end_prev, rtol=1e-12)
    np.testing.assert_allclose(start, g_end, rtol=1e-12)
    assert np.all(g_end > g_start)
    ahead, prefetch_ms = _forward_chain({"device_max_connections": 1, "forward_prefetch": True})
    end_prev, start_prev, g_start, g_end, start = ahead.T
    np.testing.assert_allclose(g_start, start_prev, rtol=1e-12)
    np.testing.assert_allclose(start, np.maximum(end_prev, g_end), rtol=1e-12)
    assert np.all(g_start < end_prev)  # overlaps the layer before it
    assert prefetch_ms < lazy_ms


def test_several_queues_prefetch_the_forward_implicitly():
    """With several hardware queues the gather issued in the pre-forward hook runs on its own
    stream while the GPU still computes the layer before it (implicit forward prefetch): the
    same timeline as explicit prefetch."""
    implicit, implicit_ms = _forward_chain({"device_max_connections": 8})
    explicit, explicit_ms = _forward_chain({"device_max_connections": 8, "forward_prefetch": True})
    np.testing.assert_allclose(implicit, explicit, rtol=1e-12)
    assert implicit_ms == explicit_ms
    end_prev, start_prev, g_start, g_end, start = implicit.T
    np.testing.assert_allclose(g_start, start_prev, rtol=1e-12)
    np.testing.assert_allclose(start, np.maximum(end_prev, g_end), rtol=1e-12)


@pytest.mark.parametrize(
    ("parallel", "gpu", "expected"),
    [
        ({"tp": 2}, "H100-SXM", False),  # one queue, FSDP's default: no explicit prefetch
        ({"tp": 2, "forward_prefetch": True}, "H100-SXM", True),  # explicit prefetch
        ({"tp": 1, "dp": 16}, "H100-SXM", True),  # several queues: implicit prefetch
        ({"tp": 2}, "B200", True),  # Blackwell: several queues by default
        ({"tp": 2, "device_max_connections": 8}, "H100-SXM", True),  # variable unset
    ],
)
def test_forward_prefetch_needs_explicit_prefetch_or_several_queues(parallel, gpu, expected):
    assert forward_prefetch(make_plan(parallel, gpu)) is expected

"""KV transfers sharing ports (engine/serving/kv_links.py): the max-min fair fractions against
the training flows' dense solver, hand-computed sharing, and Hypothesis properties (no port
carries more than its bandwidth x time, every transfer moves exactly its bytes, alone it
takes exactly its unshared time), then the disaggregated engine on a hand-computed case."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_plans import DENSE, make_plan

from clustersim.costs.comm import p2p_link, p2p_ms
from clustersim.engine.flows import max_min_rates
from clustersim.engine.serving.kv_links import PortSharing, max_min_fractions
from clustersim.run.serving import simulate_serving

NUM_PORTS = 4


def drive(transfers: list[tuple[float, float, tuple[int, ...]]]):
    """Run ``(start_ms, work_ms, ports)`` transfers through :class:`PortSharing` as the engine
    does (a start, or the earliest data end, is the next event). Returns each transfer's data
    end and the rate segments ``(t0, t1, {tid: rate})`` in between."""
    ports = PortSharing()
    order = sorted(range(len(transfers)), key=lambda i: (transfers[i][0], i))
    ends = [float("nan")] * len(transfers)
    segments = []
    now, k = 0.0, 0
    while k < len(order) or ports.active:
        next_start = transfers[order[k]][0] if k < len(order) else float("inf")
        data_ends = {tid: ports.data_end_ms(tid) for tid in ports.active}
        next_end = min(data_ends.values(), default=float("inf"))
        t = min(next_start, next_end)
        segments.append((now, t, {tid: x.rate for tid, x in ports.active.items()}))
        now = t
        for tid, end in data_ends.items():
            if end <= now + 1e-9:
                ends[tid] = end
        if next_end <= next_start:
            ports.expire(now)
        else:
            i = order[k]
            k += 1
            ports.start(now, i, transfers[i][1], transfers[i][2])
    return ends, segments


def test_two_equal_simultaneous_transfers_on_one_port_each_take_twice_as_long():
    # both leave prefill replica 0's port, for two decode replicas: half speed each
    ends, _ = drive([(0.0, 3.0, ("out0", "in0")), (0.0, 3.0, ("out0", "in1"))])
    assert ends == [6.0, 6.0]
    # the second starts halfway through the first: 1.5 ms alone, then 3 ms at half speed
    # for the first's last 1.5 ms of work, then the second's last 1.5 ms alone
    ends, _ = drive([(0.0, 3.0, ("out0", "in0")), (1.5, 3.0, ("out1", "in0"))])
    assert ends == pytest.approx([4.5, 6.0], rel=1e-12)
    # disjoint ports: no sharing, each exactly start + work
    ends, _ = drive([(0.0, 3.0, ("out0", "in0")), (0.0, 2.0, ("out1", "in1"))])
    assert ends == [3.0, 2.0]


def test_max_min_gives_the_spare_share_to_the_transfer_not_held_elsewhere():
    # A and B share out0; B and C share in0; A alone on in1: A = B = 1/2 on out0, then C
    # takes in0's remaining half
    rates = max_min_fractions({0: ("out0", "in1"), 1: ("out0", "in0"), 2: ("out1", "in0")})
    assert rates == {0: 0.5, 1: 0.5, 2: 0.5}
    # three on out0, one of them also on in0 with a fourth: 1/3 each on out0, the fourth 2/3
    rates = max_min_fractions(
        {0: ("out0", "in0"), 1: ("out0", "in1"), 2: ("out0", "in2"), 3: ("out1", "in0")}
    )
    assert rates == pytest.approx({0: 1 / 3, 1: 1 / 3, 2: 1 / 3, 3: 2 / 3}, rel=1e-12)


port_sets = st.lists(
    st.tuples(st.integers(0, NUM_PORTS - 1), st.integers(0, NUM_PORTS - 1)), min_size=1, max_size=6
)


@settings(max_examples=60, deadline=None)
@given(port_sets)
def test_fractions_equal_the_flow_solvers_max_min_rates(pairs):
    ports_of = {i: (("out", a), ("in", b)) for i, (a, b) in enumerate(pairs)}
    names = sorted({p for ports in ports_of.values() for p in ports})
    weights = np.array([[1.0 if p in ports_of[i] else 0.0 for p in names] for i in ports_of])
    expected = max_min_rates(weights, np.ones(len(pairs)), np.ones(len(names)))
    got = max_min_fractions(ports_of)
    assert [got[i] for i in ports_of] == pytest.approx(list(expected), rel=1e-9)


transfer_lists = st.lists(
    st.tuples(
        st.integers(0, 8).map(lambda x: x * 0.5),  # start ms (ties likely)
        st.floats(0.1, 5.0),  # work ms at full speed
        st.integers(0, NUM_PORTS - 1),
        st.integers(0, NUM_PORTS - 1),
    ),
    min_size=1,
    max_size=7,
)


@settings(max_examples=80, deadline=None)
@given(transfer_lists)
def test_no_port_carries_more_than_its_bandwidth_and_every_transfer_its_bytes(rows):
    transfers = [(s, w, (("out", a), ("in", b))) for s, w, a, b in rows]
    ends, segments = drive(transfers)
    moved = [0.0] * len(transfers)
    for t0, t1, rates in segments:
        load: dict = {}
        for tid, rate in rates.items():
            assert 0.0 < rate <= 1.0
            moved[tid] += rate * (t1 - t0)
            for port in transfers[tid][2]:
                load[port] = load.get(port, 0.0) + rate
        assert all(x <= 1.0 + 1e-9 for x in load.values())  # bytes <= bandwidth x time
    for (start, work, _), end, done in zip(transfers, ends, moved, strict=True):
        assert done == pytest.approx(work, rel=1e-9)  # each moved exactly its own bytes
        assert end >= start + work * (1 - 1e-12)  # never faster than alone
    # a transfer whose interval meets no other on its ports took exactly its alone time
    for i, (start, work, ports) in enumerate(transfers):
        alone = all(
            not set(ports) & set(other[2]) or ends[j] <= start or other[0] >= ends[i]
            for j, other in enumerate(transfers)
            if j != i
        )
        if alone:
            assert ends[i] == start + work


# ---- the engine: two prompts prefilled in one step share the prefill replica's port ------


def test_two_transfers_of_one_prefill_step_share_its_port(tmp_path):
    """Two equal prompts arriving together are prefilled in one step and both cross to the
    (only) decode replica through the same ports: each takes 2 x its data time + the link's
    latency; either alone takes p2p_ms (hand computation)."""
    prompt = 2000
    trace = tmp_path / "two.csv"
    trace.write_text(
        f"arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,{prompt},16\n0.0,{prompt},16\n"
    )
    parallel = {"tp": None, "pp": None, "dp": None, "ep": None, "etp": None}
    parallel |= {"prefill": {"tp": 1, "pp": 1, "dp": 1}, "decode": {"tp": 1, "pp": 1, "dp": 1}}
    plan = make_plan(
        DENSE,
        requests={"arrival": "trace", "trace": str(trace), "max_num_batched_tokens": 8192},
        hardware={"num_nodes": 2, "gpus_per_node": 1},  # over the network
        parallel=parallel,
    )
    report = simulate_serving(plan)
    res, cols = report.result, report.requests()
    assert cols["first_token_ms"][0] == cols["first_token_ms"][1]  # one prefill step
    link = p2p_link([0, 1], 1, plan.hardware)
    size = float(res.kv_transfer_bytes[0])  # TP 1: the shard is the whole cache
    data_ms = size / (link.bandwidth_gbps * 1e6)
    shared = 2 * data_ms + link.latency_us * 1e-3
    assert res.kv_transfer_ms[0] == pytest.approx(shared, rel=1e-9)
    assert res.kv_transfer_ms[1] == pytest.approx(shared, rel=1e-9)
    alone = p2p_ms(size, link.bandwidth_gbps, link.latency_us)
    assert shared > 1.9 * alone  # the bandwidth term dominates here: sharing nearly doubles

"""The fluid flow solver: max-min fair sharing of links, against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustersim.engine.flows import FlowSet, max_min_rates, solve


def flow_set(flows, capacity):
    """``flows``: list of (start_ms, [(link, bytes), ...]); transfer_ms = alone time on the
    bottleneck (bytes / capacity, the largest)."""
    capacity = np.asarray(capacity, dtype=float)
    ptr, links, volumes, starts, transfer = [0], [], [], [], []
    for start, route in flows:
        starts.append(start)
        links += [ln for ln, _ in route]
        volumes += [b for _, b in route]
        ptr.append(len(links))
        transfer.append(max(b / capacity[ln] for ln, b in route))
    return FlowSet(
        np.array(starts, float),
        np.array(transfer, float),
        np.array(ptr),
        np.array(links, dtype=np.int64),
        np.array(volumes, float),
        capacity,
    )


def test_one_flow_alone_gets_the_bottleneck_bandwidth() -> None:
    # 1 MB over links of 100, 50 and 200 bytes/ms: 20,000 ms on the 50 bytes/ms link.
    fs = flow_set([(5.0, [(0, 1e6), (1, 1e6), (2, 1e6)])], [100.0, 50.0, 200.0])
    assert solve(fs)[0] == pytest.approx(5.0 + 1e6 / 50.0, rel=1e-12)


def test_two_equal_flows_on_one_link_take_twice_as_long() -> None:
    fs = flow_set([(0.0, [(0, 1000.0)]), (0.0, [(0, 1000.0)])], [10.0])
    assert solve(fs) == pytest.approx([200.0, 200.0], rel=1e-12)


def test_a_late_flow_shares_only_while_both_run() -> None:
    # A alone 0-50 at 10/ms (500 bytes), then both at 5/ms: A's last 500 bytes take 100 ms.
    fs = flow_set([(0.0, [(0, 1000.0)]), (50.0, [(0, 1000.0)])], [10.0])
    end = solve(fs)
    assert end[0] == pytest.approx(150.0)
    # B: 500 bytes by 150 at 5/ms, then alone at 10/ms: 500 more bytes in 50 ms.
    assert end[1] == pytest.approx(200.0)


def test_max_min_on_a_three_link_example() -> None:
    # Links: L0 cap 10, L1 cap 4, L2 cap 10. Flows: a on L0+L1, b on L1, c on L0+L2, d on L2.
    # Max-min: L1 saturates first (a = b = 2); then L0 has 8 left for c, L2 10 for c and d:
    # c = d = 5 (L2 full), L0 carries a + c = 7.
    weights = np.array(
        [[1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1]],
        dtype=float,
    )
    x = max_min_rates(weights, np.full(4, np.inf), np.array([10.0, 4.0, 10.0]))
    assert x == pytest.approx([2.0, 2.0, 5.0, 5.0])
    # The same flows in the fluid solver (1,000 bytes each, all starting at 0): a and b end
    # at 500 ms; c and d at 200 ms (then a, b alone on L1 at 2 each: unchanged).
    fs = flow_set(
        [
            (0.0, [(0, 1000.0), (1, 1000.0)]),
            (0.0, [(1, 1000.0)]),
            (0.0, [(0, 1000.0), (2, 1000.0)]),
            (0.0, [(2, 1000.0)]),
        ],
        [10.0, 4.0, 10.0],
    )
    assert solve(fs) == pytest.approx([500.0, 500.0, 200.0, 200.0])


def test_rate_caps_bind_before_links() -> None:
    # A flow capped at 1 (its own bottleneck elsewhere) leaves the rest of a link to another.
    x = max_min_rates(np.array([[1.0], [1.0]]), np.array([1.0, np.inf]), np.array([10.0]))
    assert x == pytest.approx([1.0, 9.0])


def test_disjoint_flows_do_not_interact() -> None:
    fs = flow_set([(0.0, [(0, 100.0)]), (0.0, [(1, 100.0)])], [1.0, 2.0])
    assert solve(fs) == pytest.approx([100.0, 50.0])


flows_strategy = st.lists(
    st.tuples(
        st.floats(0, 100),
        st.lists(st.tuples(st.integers(0, 3), st.floats(1, 1e4)), min_size=1, max_size=3),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(flows_strategy, st.lists(st.floats(1, 100), min_size=4, max_size=4))
def test_bytes_over_a_link_never_exceed_bandwidth_times_time(raw, capacity) -> None:
    flows = []
    for start, route in raw:
        merged: dict[int, float] = {}
        for ln, b in route:
            merged[ln] = merged.get(ln, 0.0) + b
        flows.append((start, sorted(merged.items())))
    fs = flow_set(flows, capacity)
    end = solve(fs)
    alone = fs.start_ms + fs.transfer_ms
    assert (end >= alone - 1e-6 * np.maximum(1, alone)).all()  # sharing never speeds up
    cap = np.asarray(capacity)
    # Over any window [t0, t1]: the bytes of flows lying wholly inside it fit in cap x (t1 - t0).
    edges = np.unique(np.r_[fs.start_ms, end])
    for i, t0 in enumerate(edges):
        for t1 in edges[i + 1 :]:
            inside = (fs.start_ms >= t0) & (end <= t1)
            for ln in range(4):
                carried = sum(
                    b
                    for f in np.flatnonzero(inside)
                    for l2, b in zip(
                        fs.link[fs.ptr[f] : fs.ptr[f + 1]],
                        fs.volume[fs.ptr[f] : fs.ptr[f + 1]],
                        strict=True,
                    )
                    if l2 == ln
                )
                assert carried <= cap[ln] * (t1 - t0) * (1 + 1e-6) + 1e-6
    # work conservation: the last flow ends no later than all of them one after the other
    assert (
        end.max()
        <= fs.start_ms.min() + fs.transfer_ms.sum() + (fs.start_ms.max() - fs.start_ms.min()) + 1e-6
    )


def reference_solve(fs: FlowSet) -> np.ndarray:
    """Plain fluid simulation: every flow in one loop, all active flows re-solved at every
    start and end (no filtering, no components)."""
    n, num_links = fs.size, len(fs.capacity)
    weights = np.zeros((n, num_links))
    for f in range(n):
        weights[f, fs.link[fs.ptr[f] : fs.ptr[f + 1]]] = fs.volume[fs.ptr[f] : fs.ptr[f + 1]]
    heaviest = weights.max(axis=1)
    caps = heaviest / fs.transfer_ms
    remaining, end = np.ones(n), np.full(n, np.nan)
    now, active, pending = 0.0, np.zeros(n, bool), np.ones(n, bool)
    while pending.any() or active.any():
        rate = np.zeros(n)
        if active.any():
            x = max_min_rates(weights[active] / heaviest[active, None], caps[active], fs.capacity)
            rate[active] = x / heaviest[active]
        finish = np.where(active, now + remaining / np.where(rate > 0, rate, 1), np.inf)
        next_start = fs.start_ms[pending].min() if pending.any() else np.inf
        t = min(finish.min(), next_start)
        remaining -= rate * (t - now)
        now = t
        done = active & (finish <= t + 1e-12)
        end[done], active[done] = finish[done], False
        starting = pending & (fs.start_ms <= t)
        active |= starting
        pending &= ~starting
    return end


@settings(max_examples=80, deadline=None)
@given(flows_strategy, st.lists(st.floats(1, 100), min_size=4, max_size=4))
def test_solver_equals_a_plain_fluid_simulation(raw, capacity) -> None:
    flows = []
    for start, route in raw:
        merged: dict[int, float] = {}
        for ln, b in route:
            merged[ln] = merged.get(ln, 0.0) + b
        flows.append((round(start, 3), sorted(merged.items())))
    fs = flow_set(flows, capacity)
    assert solve(fs) == pytest.approx(reference_solve(fs), rel=1e-9, abs=1e-9)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 5), st.floats(0.01, 50)), min_size=1, max_size=4),
        min_size=1,
        max_size=8,
    ),
    st.lists(st.floats(1, 100), min_size=6, max_size=6),
    st.lists(st.floats(0.1, 1e3), min_size=8, max_size=8),
)
def test_numba_group_kernel_equals_the_dense_reference(routes, capacity, cap_values) -> None:
    """engine.flow_kernels.max_min_group (sparse, on the CSR arrays) gives the levels of
    max_min_rates (dense weights) for any group of flows."""
    from clustersim.engine.flow_kernels import max_min_group

    merged = [sorted({ln: b for ln, b in r}.items()) for r in routes]
    n = len(merged)
    ptr = np.r_[0, np.cumsum([len(r) for r in merged])]
    link = np.array([ln for r in merged for ln, _ in r], dtype=np.int64)
    volume = np.array([b for r in merged for _, b in r])
    heaviest = np.array([max(b for _, b in r) for r in merged])
    unit = volume / np.repeat(heaviest, np.diff(ptr))
    caps = np.array(cap_values[:n])
    cap = np.array(capacity)
    weights = np.zeros((n, len(cap)))
    weights[np.repeat(np.arange(n), np.diff(ptr)), link] = unit
    expected = max_min_rates(weights, caps, cap)
    local_of = np.full(len(cap), -1, dtype=np.int64)
    got = np.empty(n)
    max_min_group(np.arange(n, dtype=np.int64), ptr, link, unit, caps, cap, local_of, got)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert (local_of == -1).all()  # the scratch map is restored


@settings(max_examples=60, deadline=None)
@given(flows_strategy, st.lists(st.floats(1, 100), min_size=4, max_size=4))
def test_compiled_event_loop_equals_the_python_one_exactly(raw, capacity) -> None:
    """The numba event loop replays the Python reference event for event: same end times,
    bit for bit (the shared-link results do not depend on which one ran)."""
    flows = []
    for start, route in raw:
        merged: dict[int, float] = {}
        for ln, b in route:
            merged[ln] = merged.get(ln, 0.0) + b
        flows.append((round(start, 3), sorted(merged.items())))
    fs = flow_set(flows, capacity)
    assert np.array_equal(solve(fs, compiled=True), solve(fs, compiled=False))

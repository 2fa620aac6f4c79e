"""Collective times against the nccl-tests alpha-beta formulas, computed by hand here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from calibrations import calibration
from hypothesis import given, settings
from hypothesis import strategies as st

from clustersim.costs import comm
from clustersim.spec.schema import HardwareSpec, LinkSpec

INTRA_GBPS, INTRA_US = 450.0, 3.0
INTER_GBPS, INTER_US = 50.0, 8.0


def make_hw(
    intra: tuple[float, float] = (INTRA_GBPS, INTRA_US),
    inter: tuple[float, float] = (INTER_GBPS, INTER_US),
    gpus_per_node: int = 8,
    num_nodes: int = 4,
) -> HardwareSpec:
    """An H100-like cluster with the given (bandwidth GB/s, latency µs) link classes."""
    return HardwareSpec(
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        memory_gib=80,
        peak_tflops=989,
        hbm_bandwidth_gbps=3350,
        intra_node=LinkSpec(bandwidth_gbps=intra[0], latency_us=intra[1]),
        inter_node=LinkSpec(bandwidth_gbps=inter[0], latency_us=inter[1]),
        calibration=calibration(),
    )


def seconds_to_ms(seconds: float) -> float:
    return seconds * 1e3


SIZES_AND_N = [(1e6, 2), (64e6, 4), (1e9, 8), (3.5e8, 16), (12345.0, 3)]


# ---- primitives ---------------------------------------------------------------------------


@pytest.mark.parametrize(("size_bytes", "n"), SIZES_AND_N)
def test_ring_all_reduce_matches_formula(size_bytes: float, n: int) -> None:
    expected_s = 2 * (n - 1) / n * size_bytes / (INTRA_GBPS * 1e9) + 2 * (n - 1) * INTRA_US * 1e-6
    got = comm.ring_all_reduce_ms(size_bytes, n, INTRA_GBPS, INTRA_US)
    assert got == pytest.approx(seconds_to_ms(expected_s), rel=1e-12)


def test_ring_all_reduce_worked_example() -> None:
    # 1 GB over 8 GPUs at 450 GB/s, 3 µs: 2*7/8 * 1/450 s = 3.8889 ms, + 14 * 3 µs = 0.042 ms.
    got = comm.ring_all_reduce_ms(1e9, 8, 450.0, 3.0)
    assert got == pytest.approx(1.75 / 450 * 1e3 + 0.042, rel=1e-12)


@pytest.mark.parametrize(("size_bytes", "n"), SIZES_AND_N)
def test_reduce_scatter_and_all_gather_match_formula(size_bytes: float, n: int) -> None:
    expected_s = (n - 1) / n * size_bytes / (INTER_GBPS * 1e9) + (n - 1) * INTER_US * 1e-6
    for fn in (comm.reduce_scatter_ms, comm.all_gather_ms, comm.all_to_all_ms):
        assert fn(size_bytes, n, INTER_GBPS, INTER_US) == pytest.approx(
            seconds_to_ms(expected_s), rel=1e-12
        )


@pytest.mark.parametrize(("size_bytes", "n"), SIZES_AND_N)
def test_tree_all_reduce_matches_formula(size_bytes: float, n: int) -> None:
    expected_s = 2 * size_bytes / (INTRA_GBPS * 1e9) + 2 * math.ceil(math.log2(n)) * INTRA_US * 1e-6
    got = comm.tree_all_reduce_ms(size_bytes, n, INTRA_GBPS, INTRA_US)
    assert got == pytest.approx(seconds_to_ms(expected_s), rel=1e-12)


def test_tree_wins_on_latency_ring_on_bandwidth() -> None:
    # 4 KB over 512 GPUs: ring pays 1022 latency steps, tree 18.
    assert comm.tree_all_reduce_ms(4096, 512, 50, 8) < comm.ring_all_reduce_ms(4096, 512, 50, 8)
    # 1 GB over 8 GPUs: ring moves 2 * 7/8 GB per GPU, tree 2 GB.
    assert comm.ring_all_reduce_ms(1e9, 8, 50, 8) < comm.tree_all_reduce_ms(1e9, 8, 50, 8)


def test_p2p_matches_formula() -> None:
    assert comm.p2p_ms(2e8, 50.0, 8.0) == pytest.approx((2e8 / 50e9 + 8e-6) * 1e3, rel=1e-12)


@pytest.mark.parametrize(
    "fn",
    [comm.ring_all_reduce_ms, comm.tree_all_reduce_ms, comm.reduce_scatter_ms, comm.all_to_all_ms],
)
def test_single_gpu_primitives_cost_nothing(fn) -> None:
    assert fn(1e9, 1, 50.0, 8.0) == 0.0


@pytest.mark.parametrize("op", comm.OPS)
@pytest.mark.parametrize("algorithm", ["ring", "hierarchical", "auto"])
def test_single_gpu_collectives_cost_nothing(op: str, algorithm: str) -> None:
    cost = comm.collective_cost(op, 1e9, [5], 8, make_hw(), algorithm)
    assert cost == comm.CollectiveCost(0.0, 0.0, 0.0)


# ---- all-to-all-v -------------------------------------------------------------------------


@pytest.mark.parametrize(("size_bytes", "n"), SIZES_AND_N)
def test_uniform_all_to_all_v_equals_all_to_all(size_bytes: float, n: int) -> None:
    matrix = np.full((n, n), size_bytes / n)
    got = comm.all_to_all_v_ms(matrix, INTER_GBPS, INTER_US)
    assert got == pytest.approx(comm.all_to_all_ms(size_bytes, n, INTER_GBPS, INTER_US), rel=1e-12)


def test_uniform_all_to_all_v_over_nodes_equals_hierarchical_all_to_all() -> None:
    hw, ranks, size_bytes = make_hw(), list(range(16)), 256e6
    matrix = np.full((16, 16), size_bytes / 16)
    got = comm.all_to_all_v_cost(matrix, ranks, 8, hw)
    want = comm.collective_cost("all_to_all", size_bytes, ranks, 8, hw, "hierarchical")
    assert got.time_ms == pytest.approx(want.time_ms, rel=1e-12)
    assert got.inter_node_bytes_per_gpu == pytest.approx(want.inter_node_bytes_per_gpu)
    # By hand: 8 peers on the other node get 16 MB each over the NIC (128 MB / 50 GB/s) and
    # dominate the 7 NVLink peers (112 MB / 450 GB/s); 15 steps of 8 µs.
    assert got.time_ms == pytest.approx((128e6 / 50e9 + 15 * 8e-6) * 1e3, rel=1e-12)


def test_one_hot_receiver_sets_the_time() -> None:
    n, per_sender = 8, 10e6
    matrix = np.zeros((n, n))
    matrix[1:, 0] = per_sender  # every rank sends 10 MB to rank 0
    got = comm.all_to_all_v_ms(matrix, INTRA_GBPS, INTRA_US)
    hot_bytes = (n - 1) * per_sender
    assert got == pytest.approx((hot_bytes / 450e9 + (n - 1) * 3e-6) * 1e3, rel=1e-12)
    # The same total volume spread uniformly is n-1 times cheaper in bandwidth.
    spread = np.full((n, n), hot_bytes / (n * (n - 1)))
    assert comm.all_to_all_v_ms(spread, INTRA_GBPS, INTRA_US) < got


def test_hot_receiver_across_nodes_uses_the_nic() -> None:
    hw, ranks = make_hw(), list(range(16))
    matrix = np.zeros((16, 16))
    matrix[8:, 0] = 5e6  # the other node's 8 GPUs send 5 MB each to rank 0 over its NIC
    cost = comm.all_to_all_v_cost(matrix, ranks, 8, hw)
    assert cost.inter_node_bytes_per_gpu == 40e6
    assert cost.time_ms == pytest.approx((40e6 / 50e9 + 15 * 8e-6) * 1e3, rel=1e-12)


def test_all_to_all_v_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="square"):
        comm.all_to_all_v_ms(np.zeros((2, 3)), 1.0, 0.0)
    with pytest.raises(ValueError, match="ranks"):
        comm.all_to_all_v_cost(np.zeros((2, 2)), [0, 1, 2], 8, make_hw())


# ---- topology -----------------------------------------------------------------------------


def test_group_inside_a_node_uses_nvlink() -> None:
    link = comm.link_for_group([8, 9, 10, 11], 8, make_hw())
    assert link == (INTRA_GBPS, INTRA_US, False)
    got = comm.collective_time_ms("all_reduce", 1e9, [8, 9, 10, 11], 8, make_hw())
    assert got == pytest.approx(comm.ring_all_reduce_ms(1e9, 4, INTRA_GBPS, INTRA_US))


def test_group_across_nodes_uses_the_slower_link() -> None:
    link = comm.link_for_group([0, 8], 8, make_hw())
    assert link == (INTER_GBPS, INTER_US, True)
    got = comm.collective_time_ms("all_reduce", 1e9, [0, 8], 8, make_hw())
    assert got == pytest.approx((1e9 / 50e9 + 2 * 8e-6) * 1e3, rel=1e-12)


def test_p2p_between_stages() -> None:
    hw = make_hw()
    assert comm.collective_time_ms("p2p", 1e8, [3, 11], 8, hw) == pytest.approx(
        (1e8 / 50e9 + 8e-6) * 1e3
    )
    assert comm.collective_time_ms("p2p", 1e8, [3, 4], 8, hw) == pytest.approx(
        (1e8 / 450e9 + 3e-6) * 1e3
    )


def test_hierarchical_all_reduce_by_hand() -> None:
    # 2 nodes x 8 GPUs, 1 GB: intra RS + AG each 7/8 GB at 450 GB/s + 7 x 3 µs;
    # inter all-reduce of 1/8 GB over 2 nodes: 2 * 1/2 * 0.125 GB at 50 GB/s + 2 x 8 µs.
    intra_s = 2 * (7 / 8 * 1e9 / 450e9 + 7 * 3e-6)
    inter_s = 2 * 1 / 2 * 0.125e9 / 50e9 + 2 * 8e-6
    got = comm.hierarchical_all_reduce_ms(1e9, list(range(16)), 8, make_hw())
    assert got == pytest.approx((intra_s + inter_s) * 1e3, rel=1e-12)
    cost = comm.collective_cost("all_reduce", 1e9, list(range(16)), 8, make_hw(), "hierarchical")
    assert cost.time_ms == pytest.approx(got)
    assert cost.inter_node_bytes_per_gpu == pytest.approx(0.125e9)


def test_hierarchical_degenerates_to_flat_rings() -> None:
    hw = make_hw()
    one_node = comm.hierarchical_all_reduce_ms(1e9, list(range(8)), 8, hw)
    assert one_node == pytest.approx(comm.ring_all_reduce_ms(1e9, 8, INTRA_GBPS, INTRA_US))
    one_per_node = comm.hierarchical_all_reduce_ms(1e9, [0, 8, 16, 24], 8, hw)
    assert one_per_node == pytest.approx(comm.ring_all_reduce_ms(1e9, 4, INTER_GBPS, INTER_US))


def test_hierarchical_reduce_scatter_and_all_gather_by_hand() -> None:
    # 4 nodes x 2 GPUs, 64 MB: intra 1/2 * 64 MB at 450 + 3 µs; inter 3/4 * 32 MB at 50 + 3 x 8 µs.
    want_s = 0.5 * 64e6 / 450e9 + 3e-6 + 0.75 * 32e6 / 50e9 + 3 * 8e-6
    ranks = [0, 1, 8, 9, 16, 17, 24, 25]
    for op in ("reduce_scatter", "all_gather"):
        got = comm.collective_time_ms(op, 64e6, ranks, 8, make_hw(), "hierarchical")
        assert got == pytest.approx(want_s * 1e3, rel=1e-12)


link_specs = st.tuples(
    st.floats(1.0, 1000.0), st.floats(0.0, 20.0), st.floats(1.0, 1000.0), st.floats(0.0, 20.0)
)


@settings(max_examples=200, deadline=None)
@given(
    links=link_specs,
    gpus_per_group_node=st.integers(1, 8),
    num_nodes=st.integers(1, 8),
    size_bytes=st.floats(0.0, 1e10),
)
def test_hierarchical_never_slower_than_flat_ring_over_the_slow_link(
    links: tuple[float, float, float, float],
    gpus_per_group_node: int,
    num_nodes: int,
    size_bytes: float,
) -> None:
    hw = make_hw(intra=links[:2], inter=links[2:], num_nodes=num_nodes)
    ranks = [node * 8 + i for node in range(num_nodes) for i in range(gpus_per_group_node)]
    # one ring at the slowest link and latency (no base latency in this calibration)
    n = len(ranks)
    slow_bw = links[0] if num_nodes == 1 else min(links[0], links[2])
    slow_lat = links[1] if num_nodes == 1 else max(links[1], links[3])
    single = comm.ring_all_reduce_ms(size_bytes, n, slow_bw, slow_lat)
    # NCCL's ring over nodes, one per rail, is never slower than that single ring
    flat = comm.collective_time_ms("all_reduce", size_bytes, ranks, 8, hw, "ring")
    assert flat <= single * (1 + 1e-12) + 1e-15
    hier = comm.collective_time_ms("all_reduce", size_bytes, ranks, 8, hw, "hierarchical")
    assert hier <= single * (1 + 1e-12) + 1e-15
    auto = comm.collective_time_ms("all_reduce", size_bytes, ranks, 8, hw, "auto")
    assert auto <= min(hier, flat)


# ---- entry point --------------------------------------------------------------------------


def test_bytes_per_gpu_follow_the_algorithm() -> None:
    hw, ranks = make_hw(), list(range(8))
    assert comm.collective_cost("all_reduce", 8e6, ranks, 8, hw).bytes_per_gpu == 14e6
    assert comm.collective_cost("all_gather", 8e6, ranks, 8, hw).bytes_per_gpu == 7e6
    assert comm.collective_cost("all_reduce", 8e6, ranks, 8, hw, "tree").bytes_per_gpu == 16e6
    assert comm.collective_cost("all_reduce", 8e6, ranks, 8, hw).inter_node_bytes_per_gpu == 0.0


@pytest.mark.parametrize(
    ("op", "algorithm", "match"),
    [
        ("broadcast", "ring", "unknown collective"),
        ("all_reduce", "butterfly", "unknown algorithm"),
        ("all_gather", "tree", "all_reduce only"),
    ],
)
def test_bad_arguments_are_rejected(op: str, algorithm: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        comm.collective_cost(op, 1.0, [0, 1], 8, make_hw(), algorithm)


def test_negative_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="size_bytes"):
        comm.collective_cost("all_reduce", -1.0, [0, 1], 8, make_hw())


def test_uneven_group_uses_the_largest_shard_across_nodes() -> None:
    # 3 GPUs on node 0, 1 on node 1: intra stages over 3 GPUs; the lone GPU on node 1 carries
    # the whole buffer across the NIC (inter all-reduce of S/1 over 2 nodes).
    size = 90e6
    intra_s = 2 * (2 / 3 * size / 450e9 + 2 * 3e-6)
    inter_s = 2 * 1 / 2 * size / 50e9 + 2 * 8e-6
    got = comm.hierarchical_all_reduce_ms(size, [0, 1, 2, 8], 8, make_hw())
    assert got == pytest.approx((intra_s + inter_s) * 1e3, rel=1e-12)


def test_p2p_to_self_costs_nothing() -> None:
    assert comm.collective_time_ms("p2p", 1e9, [3, 3], 8, make_hw()) == 0.0


def test_batched_all_to_all_v_times_by_hand() -> None:
    """A batch of the two hand-computed cases above, plus an empty matrix (latency only)."""
    hw, ranks = make_hw(), list(range(16))
    uniform = np.full((16, 16), 256e6 / 16)
    hot = np.zeros((16, 16))
    hot[8:, 0] = 5e6
    got = comm.all_to_all_v_times_ms(np.stack([uniform, hot, np.zeros((16, 16))]), ranks, 8, hw)
    latency_ms = 15 * 8e-6 * 1e3
    want = [(128e6 / 50e9) * 1e3 + latency_ms, (40e6 / 50e9) * 1e3 + latency_ms, latency_ms]
    np.testing.assert_allclose(got, want, rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 16), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_batched_all_to_all_v_equals_one_at_a_time(n: int, batch: int, seed: int) -> None:
    hw = make_hw()
    ranks = sorted(np.random.default_rng(seed).choice(32, size=n, replace=False).tolist())
    mats = np.random.default_rng(seed + 1).exponential(1e6, size=(batch, n, n))
    got = comm.all_to_all_v_times_ms(mats, ranks, 8, hw)
    want = [comm.all_to_all_v_cost(m, ranks, 8, hw).time_ms for m in mats]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_batched_all_to_all_v_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        comm.all_to_all_v_times_ms(np.zeros((2, 2)), [0, 1], 8, make_hw())
    assert comm.all_to_all_v_times_ms(np.ones((3, 1, 1)), [0], 8, make_hw()).tolist() == [0.0] * 3

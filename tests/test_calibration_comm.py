"""The collective / DeepEP calibration: the fit (clustersim.calibration.fit_comm) and how
comm.py applies it."""

from __future__ import annotations

import numpy as np
import pytest
from calibrations import calibration
from hypothesis import given, settings
from hypothesis import strategies as st

from clustersim.calibration import fit_comm
from clustersim.costs import comm
from clustersim.spec.calibration_data import calibration_data
from clustersim.spec.schema import HardwareSpec, LinkSpec


def make_hw(intra=(450.0, 3.0), inter=(50.0, 8.0), **sections) -> HardwareSpec:
    return HardwareSpec(
        num_nodes=4,
        gpus_per_node=8,
        memory_gib=80,
        peak_tflops=989,
        hbm_bandwidth_gbps=3350,
        intra_node=LinkSpec(bandwidth_gbps=intra[0], latency_us=intra[1]),
        inter_node=LinkSpec(bandwidth_gbps=inter[0], latency_us=inter[1]),
        calibration=calibration(**sections),
    )


# ---- the fit ------------------------------------------------------------------------------


@pytest.mark.parametrize("generation", fit_comm.GENERATIONS)
def test_fit_is_deterministic_and_matches_the_packaged_data(generation: str) -> None:
    first = fit_comm.fit(generation)
    fit_comm._fit_classes.cache_clear()
    assert fit_comm.fit(generation) == first
    packaged = calibration_data(generation)
    assert packaged["collectives"] == first["collectives"]
    for key, value in first["moe"].items():
        assert packaged["moe"][key] == value


def test_synthetic_link_class_is_recovered() -> None:
    link_gbps, eff, p2p_eff, alpha_us, base_us = 450.0, 0.7, 0.85, 2.0, 10.0
    samples = []
    for n in (2, 4, 8):
        for size in np.geomspace(1e4, 1e9, 12):
            t = (base_us + 2 * (n - 1) * alpha_us) * 1e-3 + 2 * (n - 1) / n * size / (
                link_gbps * eff * 1e6
            )
            samples.append(fit_comm.Sample("s", "x", "h100", "all_reduce", n, n, size, t, str(n)))
    for size in np.geomspace(1e4, 1e9, 12):
        t = (base_us + alpha_us) * 1e-3 + size / (link_gbps * p2p_eff * 1e6)
        samples.append(fit_comm.Sample("s", "x", "h100", "p2p", 2, 2, size, t, "p2p"))
    got = fit_comm.fit_link_class(samples, link_gbps)
    assert got.efficiency == pytest.approx(eff, rel=1e-9)
    assert got.p2p_efficiency == pytest.approx(p2p_eff, rel=1e-9)
    assert got.latency_us == pytest.approx(alpha_us, rel=1e-9)
    assert got.base_latency_us == pytest.approx(base_us, rel=1e-9)


def test_fitted_model_equals_comm_py() -> None:
    """The fit's linear model (NCCL protocol as the tuner picks it, NCCL's latency as the
    offset, the GPU-count exponent of the efficiency, the per-step latency's factor) and
    comm.py's calibrated time agree on every in-node sample."""
    fitted = fit_comm._fit_classes("h100")[0]
    assert fitted.protocols
    hw = fit_comm.hardware("h100")
    inv_b = 1 / (450e6 * fitted.efficiency)
    for s in fit_comm._vidur("h100", intra=True)[::50]:
        x, offset, _ = fit_comm._protocol_design(
            s, inv_b, "h100", fitted.gpu_exponent, fitted.step_scale
        )
        params = [
            fitted.latency_us * 1e-3,
            inv_b,
            fitted.base_latency_us * 1e-3,
            1 / (450e6 * fitted.p2p_efficiency),
        ]
        want = float(x @ params) + offset
        assert fit_comm.predict_ms(s, hw) == pytest.approx(want, rel=2e-3)


# Measured here (all Vidur rows of one generation's fitted set; out of sample = leave one GPU
# count out), NCCL's protocols: a100 7.9% / 9.2%, h100 9.5% / 13.6% median |error| (alpha-beta
# before them: a100 12.6% / 14.5%, h100 10.5% / 22.3%).
@pytest.mark.parametrize(
    ("generation", "in_max", "oos_max"), [("a100", 0.09, 0.10), ("h100", 0.10, 0.15)]
)
def test_vidur_all_reduce_within_the_stated_error(generation, in_max, oos_max) -> None:
    rows = [
        r for r in fit_comm.comm_rows(generation) if r.dataset == "vidur_all_reduce" and r.fitted
    ]
    assert len(rows) > 500
    assert np.median([abs(r.error_in_sample) for r in rows]) <= in_max
    assert np.median([abs(r.error_oos) for r in rows]) <= oos_max


def test_send_recv_and_published_rows_within_the_stated_error() -> None:
    # measured: h100 send/recv 2.2% (2.3% 5-fold), h200 nccl-tests 4.4% (4.8%), deepep 14%
    h100 = [r for r in fit_comm.comm_rows("h100") if r.dataset == "vidur_send_recv"]
    assert np.median([abs(r.error_oos) for r in h100]) <= 0.04
    h200 = [r for r in fit_comm.comm_rows("h200") if r.fitted]
    assert np.median([abs(r.error_oos) for r in h200]) <= 0.06
    deepep = fit_comm.comm_rows("h800")
    assert np.median([abs(r.error_oos) for r in deepep]) <= 0.2


def test_comm_errors_report_every_data_set() -> None:
    names = [g.name for g in fit_comm.comm_errors("h100")]
    assert names == [
        "vidur_all_reduce (fitted)",
        "vidur_send_recv (fitted)",
        "nccl_tests (fitted)",
    ]


def test_rows_the_alpha_beta_model_cannot_express_are_listed_not_scored() -> None:
    a100 = fit_comm.not_expressible("a100")
    assert [label.split(" (")[0] for _, label, _ in a100] == [
        "a100 all_reduce n=2 g=1",
        "a100 all_reduce n=4 g=2",
        "a100 all_reduce n=8 g=4",
        "a100 all_reduce n=16 g=8",
        "a100 send_recv n=2 g=1",
    ]
    scored = {r.name.split(" S=")[0] for r in fit_comm.comm_rows("a100")}
    assert not any(label.split(" (")[0] in scored for _, label, _ in a100)
    # a node's network rate: a two-node ring all-reduce sends S per node, a send S
    sample = fit_comm.Sample("x", "x", "a100", "all_reduce", 16, 8, 64e6, 8.0, "g")
    assert fit_comm._node_network_gbps(sample) == pytest.approx(64e6 / 8e6)
    h200 = {rid for rid, _, _ in fit_comm.not_expressible("h200")}
    assert h200 == {f"C{i:04d}" for i in range(89, 97)} | {"C0115"}
    assert not any(r.name.split()[0] in h200 for r in fit_comm.comm_rows("h200"))


# ---- comm.py with a calibration -----------------------------------------------------------


def test_efficiency_latency_and_base_latency_by_hand() -> None:
    hw = make_hw(
        collectives={
            "intra_node_efficiency": 0.5,
            "intra_node_latency_us": 1.0,
            "intra_node_base_latency_us": 20.0,
        }
    )
    got = comm.collective_time_ms("all_reduce", 1e9, list(range(8)), 8, hw)
    want_s = 20e-6 + 14 * 1e-6 + 2 * 7 / 8 * 1e9 / (225e9)
    assert got == pytest.approx(want_s * 1e3, rel=1e-12)


def test_p2p_uses_the_p2p_efficiency_and_pays_base_once() -> None:
    hw = make_hw(collectives={"inter_node_p2p_efficiency": 0.5, "inter_node_base_latency_us": 5.0})
    got = comm.collective_time_ms("p2p", 1e8, [0, 8], 8, hw)
    assert got == pytest.approx((1e8 / 25e9 + 8e-6 + 5e-6) * 1e3, rel=1e-12)
    link = comm.p2p_link([0, 8], 8, hw)
    assert comm.p2p_ms(1e8, link.bandwidth_gbps, link.latency_us) == pytest.approx(got)


def test_deepep_dispatcher_uses_deepep_bandwidths() -> None:
    moe = {
        "deepep_intra_node_gbps": 150.0,
        "deepep_inter_node_gbps": 40.0,
        "deepep_latency_us": 25.0,
    }
    hw, ranks = make_hw(moe=moe), list(range(16))
    matrix = np.full((16, 16), 1e6)  # 1 MB to every peer
    got = comm.all_to_all_v_cost(matrix, ranks, 8, hw, "deepep")
    # busiest port: 8 MB over RDMA at 40 GB/s vs 7 MB over NVLink at 150 GB/s; + 25 µs once
    assert got.time_ms == pytest.approx((8e6 / 40e9 + 25e-6) * 1e3, rel=1e-12)
    batch = comm.all_to_all_v_times_ms(matrix[None], ranks, 8, hw, "deepep")
    assert batch[0] == pytest.approx(got.time_ms)
    one_node = comm.all_to_all_v_cost(np.full((8, 8), 1e6), list(range(8)), 8, hw, "deepep")
    assert one_node.time_ms == pytest.approx((7e6 / 150e9 + 25e-6) * 1e3, rel=1e-12)
    nccl = comm.all_to_all_v_cost(matrix, ranks, 8, hw)
    assert nccl.time_ms == pytest.approx((8e6 / 50e9 + 15 * 8e-6) * 1e3, rel=1e-12)
    with pytest.raises(ValueError, match="dispatcher"):
        comm.all_to_all_v_cost(matrix, ranks, 8, hw, "nvshmem")


def test_large_dp_all_reduce_uses_a_tree_across_many_nodes() -> None:
    hw = HardwareSpec(
        num_nodes=512,
        gpus_per_node=8,
        memory_gib=80,
        peak_tflops=312,
        hbm_bandwidth_gbps=2039,
        intra_node=LinkSpec(bandwidth_gbps=300, latency_us=3),
        inter_node=LinkSpec(bandwidth_gbps=25, latency_us=8),
        calibration=calibration(),
    )
    ranks = [node * 8 for node in range(512)]  # one GPU per node (TP = 8)
    size = 40e6 / 8  # small shard: latency bound
    ring = comm.ring_all_reduce_ms(size, 512, 25, 8)
    tree = comm.tree_all_reduce_ms(size, 512, 25, 8)
    assert tree < ring
    got = comm.collective_cost("all_reduce", size, ranks, 8, hw, "hierarchical")
    assert got.time_ms == pytest.approx(tree, rel=1e-12)
    assert got.inter_node_bytes_per_gpu == pytest.approx(2 * size)


# ---- more bandwidth is never slower -------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    bw=st.tuples(st.floats(10.0, 1000.0), st.floats(1.0, 100.0)),
    factor=st.floats(1.0, 4.0),
    eff=st.tuples(st.floats(0.1, 1.0), st.floats(0.1, 1.0)),
    size=st.floats(0.0, 1e10),
    group=st.sampled_from([list(range(4)), [0, 8, 16, 24], list(range(16)), [0, 1, 8, 9, 16]]),
    op=st.sampled_from(comm.OPS),
    algorithm=st.sampled_from(["ring", "hierarchical", "auto"]),
)
def test_more_bandwidth_is_never_slower(bw, factor, eff, size, group, op, algorithm) -> None:
    collectives = {
        "intra_node_efficiency": eff[0],
        "inter_node_efficiency": eff[1],
        "intra_node_p2p_efficiency": eff[1],
        "inter_node_p2p_efficiency": eff[0],
        "intra_node_base_latency_us": 5.0,
        "inter_node_base_latency_us": 9.0,
    }
    ranks = group[:2] if op == "p2p" else group
    slow = make_hw((bw[0], 3.0), (bw[1], 8.0), collectives=collectives)
    fast = [
        make_hw((bw[0] * factor, 3.0), (bw[1], 8.0), collectives=collectives),
        make_hw((bw[0], 3.0), (bw[1] * factor, 8.0), collectives=collectives),
    ]
    base = comm.collective_time_ms(op, size, ranks, 8, slow, algorithm)
    for hw in fast:
        assert comm.collective_time_ms(op, size, ranks, 8, hw, algorithm) <= base * (1 + 1e-12)
    matrix = np.full((len(group), len(group)), size / len(group) ** 2)
    for dispatcher in comm.DISPATCHERS:
        a2a = comm.all_to_all_v_cost(matrix, group, 8, slow, dispatcher).time_ms
        for hw in fast:
            assert comm.all_to_all_v_cost(matrix, group, 8, hw, dispatcher).time_ms <= a2a * (
                1 + 1e-12
            )


@settings(max_examples=40, deadline=None)
@given(
    st.integers(3, 7),
    st.integers(8, 20),
    st.integers(0, 2**31 - 1),
)
def test_lawson_hanson_reaches_the_exhaustive_optimum(k, rows, seed) -> None:
    # the active-set method (used above EXHAUSTIVE_MAX_FREE columns) against every subset
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, (rows, k)) * (rng.uniform(size=k) > 0.2)
    x[:, 0] += 0.1
    t = x @ rng.uniform(-0.5, 1.0, k) + rng.uniform(0.5, 2.0, rows)
    exhaustive = fit_comm.nnls_relative(x, t, {})
    active_set = np.zeros(k)
    free = [i for i in range(k) if np.any(x[:, i] != 0)]
    active_set[free] = fit_comm._lawson_hanson(x[:, free] / t[:, None], np.ones(rows))
    assert np.all(active_set >= 0)

    def residual(p):
        return float(np.sum((x @ p / t - 1.0) ** 2))

    assert residual(active_set) == pytest.approx(residual(exhaustive), rel=1e-7, abs=1e-12)


def _vidur_sample(n: int, time_us: float, dataset: str = "vidur_all_reduce") -> fit_comm.Sample:
    op = "p2p" if dataset == "vidur_send_recv" else "all_reduce"
    return fit_comm.Sample(dataset, "x", "h100", op, n, n, 2048.0, time_us * 1e-3, str(n))


def test_harness_floor_applies_to_vidur_all_reduce_rows_on_three_or_more_gpus() -> None:
    # rank 0's kernel lasts until the last rank's launch: max(kernel, floor) on 4 GPUs
    four = _vidur_sample(4, 40.0)
    assert fit_comm.harness_ms(four, 0.010, 35.0) == pytest.approx(0.035)
    assert fit_comm.harness_ms(four, 0.050, 35.0) == pytest.approx(0.050)
    # 2 GPUs, send/receive and published rows: the kernel alone
    for sample in (_vidur_sample(2, 40.0), _vidur_sample(2, 40.0, "vidur_send_recv")):
        assert fit_comm.harness_ms(sample, 0.010, 35.0) == pytest.approx(0.010)
    published = fit_comm.Sample("nccl_tests", "x", "h200", "all_reduce", 8, 8, 2048.0, 0.04, "C")
    assert fit_comm.harness_ms(published, 0.010, 35.0) == pytest.approx(0.010)


def test_harness_floor_fit_by_hand() -> None:
    # two 8-GPU rows at a 40 µs floor whose kernels take 10 µs, one GPU-bound row (kernel
    # 60 µs = measured) and a 2-GPU row the floor never touches: squared relative error
    # (max(10, h) / 40 - 1)^2 x 2 is 0 at h = 40, the GPU-bound row is 0 for any h <= 60
    samples = [_vidur_sample(8, 40.0), _vidur_sample(8, 40.0), _vidur_sample(8, 60.0)]
    samples.append(_vidur_sample(2, 7.0))
    kernel_ms = np.array([0.010, 0.010, 0.060, 0.030])
    assert fit_comm.fit_harness_floor_us(samples, kernel_ms) == pytest.approx(40.0)
    # floors 30 and 50 µs measured, kernels 10 µs: min (h/30-1)^2 + (h/50-1)^2 at
    # h = (1/30 + 1/50) / (1/900 + 1/2500) = 35.29 µs, the grid's nearest point 35.5
    samples = [_vidur_sample(4, 30.0), _vidur_sample(4, 50.0)]
    assert fit_comm.fit_harness_floor_us(samples, np.array([0.01, 0.01])) == pytest.approx(35.5)
    assert fit_comm.fit_harness_floor_us(samples[:0], np.array([])) == 0.0


def test_harness_floor_is_refitted_out_of_sample() -> None:
    # leave-one-configuration-out: the held-out 4-GPU rows get the floor fitted on the 8-GPU
    # rows alone, so some sub-MiB 4-GPU row differs in and out of sample by the floors' gap
    rows = [r for r in fit_comm.comm_rows("h100") if r.dataset == "vidur_all_reduce"]
    floor = fit_comm.harness_floor_us("h100")
    assert 20.0 <= floor <= 50.0
    at_floor = [r for r in rows if r.predicted_in_sample == pytest.approx(floor * 1e-3)]
    assert at_floor and all(" n=2 " not in r.name for r in at_floor)
    assert any(r.predicted_oos != pytest.approx(r.predicted_in_sample) for r in at_floor)


def test_synthetic_link_class_is_recovered_under_the_harness_floor() -> None:
    # the alpha-beta rows of the test above as Vidur's harness records them: 4- and 8-GPU
    # all-reduces shorter than a 40 µs floor read 40 µs; the fit leaves those rows out
    # (their kernel is below the fitted floor) and recovers the kernel's parameters exactly
    link_gbps, eff, p2p_eff, alpha_us, base_us, floor_us = 450.0, 0.7, 0.85, 2.0, 10.0, 40.0
    samples = []
    for n in (2, 4, 8):
        for size in np.geomspace(1e4, 1e9, 12):
            t = (base_us + 2 * (n - 1) * alpha_us) * 1e-3 + 2 * (n - 1) / n * size / (
                link_gbps * eff * 1e6
            )
            t = max(t, floor_us * 1e-3) if n >= 3 else t
            samples.append(
                fit_comm.Sample(
                    "vidur_all_reduce", "x", "h100", "all_reduce", n, n, size, t, str(n)
                )
            )
    for size in np.geomspace(1e4, 1e9, 12):
        t = (base_us + alpha_us) * 1e-3 + size / (link_gbps * p2p_eff * 1e6)
        samples.append(fit_comm.Sample("vidur_send_recv", "x", "h100", "p2p", 2, 2, size, t, "p"))
    got = fit_comm.fit_link_class(samples, link_gbps)
    assert got.efficiency == pytest.approx(eff, rel=1e-9)
    assert got.latency_us == pytest.approx(alpha_us, rel=1e-9)
    assert got.base_latency_us == pytest.approx(base_us, rel=1e-9)
    kernel = fit_comm._class_kernel_ms(samples, got, link_gbps, None)
    assert fit_comm.fit_harness_floor_us(samples, kernel) == pytest.approx(floor_us)
    recorded = [fit_comm.harness_ms(s, k, floor_us) for s, k in zip(samples, kernel, strict=True)]
    assert recorded == pytest.approx([s.time_ms for s in samples], rel=1e-9)

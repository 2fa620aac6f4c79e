"""Collectives as flows (calibration.comm_flows): closed forms of small cases, and the
validation against comm.csv's NCCL bus bandwidths and DeepEP figures (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest

from clustersim.calibration import comm_flows as cf

GB = 1e6  # bytes per ms


def _ring(nodes: int, gpn: int, nics: int, size: float, op: str = "all_reduce") -> cf.Case:
    return cf.Case(
        "T", "nccl", "t", "busbw GB/s", 1.0, "H100-SXM", nodes, gpn, "ring", op, size, nics,
        50.0, 450.0, nodes > 1,
    )  # fmt: skip


def test_one_node_ring_is_the_alpha_beta_bandwidth_term():
    # every GPU sends f(n) S to its ring successor over its own NVLink port
    for n, op, f in ((8, "all_reduce", 2 * 7 / 8), (4, "all_gather", 3 / 4)):
        case = _ring(1, n, 8, 2.0**30, op)
        expected = f * 2.0**30 / (450 * 0.8 * GB)
        assert cf.transfer_ms(case, {"nvlink": 0.8, "nic": 1.0}) == pytest.approx(expected)


def test_multi_node_ring_runs_at_the_node_nic_bandwidth():
    # one ring per NIC: the bus bandwidth is the node's NIC bandwidth (8 x 50 GB/s x eff)
    size = 2.0**32
    case = _ring(4, 8, 8, size)
    busbw = 2 * 31 / 32 * size / cf.transfer_ms(case, {"nvlink": 1.0, "nic": 0.9}) / GB
    assert busbw == pytest.approx(8 * 50 * 0.9, rel=1e-9)


def test_gpus_sharing_one_nic_share_its_bandwidth():
    # the same ring with one NIC per node: its 8 GPUs' rings all cross that NIC
    size = 2.0**30
    eight = cf.transfer_ms(_ring(2, 8, 8, size), {"nvlink": 1.0, "nic": 1.0})
    one = cf.transfer_ms(_ring(2, 8, 1, size), {"nvlink": 1.0, "nic": 1.0})
    assert one == pytest.approx(8 * eight, rel=1e-9)


def test_low_latency_dispatch_is_bound_by_the_remote_share_on_the_nic():
    # uniform top-8: (N - 1) / N of a GPU's selections leave its node, on its own NIC
    nodes = 4
    case = cf.Case(
        "T", "deepep", "t", "latency us", 1.0, "H800", nodes, 8, "deepep_ll", "dispatch",
        cf.LL_FP8_BYTES, 8, 50.0, 160.0, True,
    )  # fmt: skip
    nic_bytes = cf.DEEPEP_LL_TOKENS * cf.DEEPEP_TOPK * (nodes - 1) / nodes * cf.LL_FP8_BYTES
    expected = nic_bytes / (50 * 0.9 * GB)
    assert cf.transfer_ms(case, {"nvlink": 1.0, "nic": 0.9}) == pytest.approx(expected)


def test_deepep_normal_counts_own_node_and_sends_remote_tokens_once_per_node():
    remote, local, forwarded, counted = cf._normal_routing(2, 8)
    # two nodes, top-2 groups = both: nearly every token reaches both (8 experts of 256)
    assert 0.95 < remote <= 1.0
    assert counted == pytest.approx(1.0 + remote, abs=0.05)
    assert 0 < local < 7 and 0 < forwarded < 7


@pytest.fixture(scope="module")
def rows():
    return {fam: cf.family_rows(fam)[1] for fam in ("nccl", "deepep")}


def test_deepep_internode_rows_within_15_percent_out_of_sample(rows):
    inter = [r for r in rows["deepep"] if r.case.internode]
    assert len(inter) == 16
    assert max(abs(r.error_oos) for r in inter) <= 0.15


def test_nccl_bus_bandwidth_rows_within_15_percent_on_average_out_of_sample(rows):
    errors = np.array([abs(r.error_oos) for r in rows["nccl"]])
    assert len(errors) == 50
    assert errors.mean() <= 0.15
    assert np.median(errors) <= 0.05


def test_fitted_efficiencies_are_physical():
    for fam in ("nccl", "deepep"):
        values = cf.fit(fam, cf.nccl_cases() if fam == "nccl" else cf.deepep_cases()).values
        for k, v in values.items():
            assert (0.3 < v <= 1.0) if k.endswith("efficiency") else (0.0 <= v < 100.0)

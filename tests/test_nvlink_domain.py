"""hardware.nvlink_domain_gpus: a group inside one NVLink domain runs at NVLink figures."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from test_comm import INTER_GBPS, INTER_US, INTRA_GBPS, INTRA_US, make_hw

from clustersim.costs import comm


def domain_hw(domain: int | None, gpus_per_node: int = 4, num_nodes: int = 36):
    hw = make_hw(gpus_per_node=gpus_per_node, num_nodes=num_nodes)
    return hw.model_copy(update={"nvlink_domain_gpus": domain})


def test_default_domain_is_the_node() -> None:
    hw = make_hw(gpus_per_node=8)
    assert hw.nvlink_domain_gpus is None
    assert hw.nvlink_domain == 8
    assert comm.domain_gpus(8, hw) == 8


def test_group_across_trays_of_one_domain_uses_nvlink() -> None:
    # 16 GPUs on 4 nodes of 4: network-bound without a domain, NVLink inside an NVL72 domain.
    ranks = list(range(16))
    size = 1e9
    alone = comm.collective_time_ms("all_reduce", size, ranks, 4, domain_hw(None))
    nvl72 = comm.collective_time_ms("all_reduce", size, ranks, 4, domain_hw(72))
    cal = make_hw().calibration.collectives
    intra_bw = INTRA_GBPS * cal.intra_node_efficiency
    inter_bw = INTER_GBPS * cal.inter_node_efficiency
    # Ring all-reduce at the group's slowest link: the bandwidth term alone shows the class.
    assert nvl72 == pytest.approx(
        comm.ring_all_reduce_ms(size, 16, intra_bw, cal.intra_node_latency_us or INTRA_US)
        + cal.intra_node_base_latency_us * 1e-3,
        rel=1e-12,
    )
    # Without the domain: NCCL's ring over the 4 nodes, one ring per GPU of a node on its own
    # NIC: bus bandwidth 4 x the NIC's; 30 steps, 6 crossing nodes (8 µs), 24 on NVLink.
    rail_bw = min(intra_bw, 4 * inter_bw)
    mean_step_us = (24 * (cal.intra_node_latency_us or INTRA_US) + 6 * INTER_US) / 30
    assert alone == pytest.approx(
        comm.ring_all_reduce_ms(size, 16, rail_bw, mean_step_us)
        + cal.inter_node_base_latency_us * 1e-3,
        rel=1e-12,
    )
    assert alone > nvl72
    link = comm.link_for_group(ranks, 4, domain_hw(72))
    assert not link.crosses_nodes


def test_group_across_domains_uses_the_network() -> None:
    hw = domain_hw(72)
    assert comm.link_for_group([0, 72], 4, hw).crosses_nodes
    assert not comm.p2p_link([0, 71], 4, hw).crosses_nodes
    assert comm.p2p_link([71, 72], 4, hw).crosses_nodes


def test_domain_must_be_whole_nodes() -> None:
    with pytest.raises(ValidationError, match="nvlink_domain_gpus = 6 is not a multiple"):
        make_hw(gpus_per_node=4).model_validate(
            {**make_hw(gpus_per_node=4).model_dump(), "nvlink_domain_gpus": 6}
        )


def test_layout_crosses_domain(plan_dict) -> None:
    from clustersim.layout import Layout
    from clustersim.spec.load import plan_from_dict

    plan_dict["hardware"].update({"gpus_per_node": 4, "num_nodes": 4})
    plan_dict["parallel"].update({"tp": 8, "dp": 2, "pp": 1})
    plan = plan_from_dict(plan_dict, "test")
    assert Layout(plan).crosses_nvlink_domain("tp")
    plan_dict["hardware"]["nvlink_domain_gpus"] = 16
    layout = Layout(plan_from_dict(plan_dict, "test"))
    assert layout.crosses_nodes("tp") and not layout.crosses_nvlink_domain("tp")

"""ZeRO-2/3 per-layer collectives as flows on the shared links (hardware.topology): a
parameter all-gather and an EP all-to-all on the same NICs share them max-min fairly, which for
two transfers is the closed form ``costs.sharding.fair_share_delay_ms`` the engine uses without
a topology; in the engine the sharded collectives then contend with the all-to-alls."""

from __future__ import annotations

import numpy as np
import pytest
from test_comm import make_hw
from test_network import run, training_plan

from clustersim.costs import comm
from clustersim.costs.sharding import fair_share_delay_ms
from clustersim.engine.network import Network
from clustersim.spec.schema import TopologySpec

GPN = 8
RANKS = [0, GPN]  # one GPU on each of two nodes: every byte crosses their NICs


def gather_and_a2a(gather_bytes: float, a2a_bytes: float, a2a_start_ms: float):
    """A ZeRO all-gather over RANKS from 0 and an all-to-all over RANKS from
    ``a2a_start_ms``, solved together on a non-blocking topology. Returns (delays of both,
    transfer times alone, transfer start times)."""
    hw = make_hw(num_nodes=2).model_copy(update={"topology": TopologySpec(kind="non_blocking")})
    net = Network(hw, hw.num_gpus)
    gather_ms = comm.collective_time_ms("all_gather", gather_bytes, RANKS, GPN, hw, "hierarchical")
    gather_fixed = comm.collective_time_ms("all_gather", 0.0, RANKS, GPN, hw, "hierarchical")
    net.collective(("gather",), "param_gather", "all_gather", gather_bytes, RANKS, 0.0,
                   gather_ms, 1)  # fmt: skip
    send = np.array([[[0.0, a2a_bytes], [a2a_bytes, 0.0]]])
    a2a_ms = float(comm.all_to_all_v_times_ms(send, RANKS, GPN, hw)[0])
    a2a_fixed = float(comm.all_to_all_v_times_ms(np.zeros((1, 2, 2)), RANKS, GPN, hw)[0])
    links, volumes = net.links.matrix_volumes(np.array(RANKS), send)
    net.flows(("a2a",), "ep_a2a", a2a_start_ms, [a2a_ms], a2a_fixed, [(links, volumes[0])], 1)
    net.solve(2, 1.0)
    delays = (float(net.delays[("gather",)][0]), float(net.delays[("a2a",)][0]))
    transfers = (gather_ms - gather_fixed, a2a_ms - a2a_fixed)
    return delays, transfers, (gather_fixed, a2a_start_ms + a2a_fixed)


@pytest.mark.parametrize(
    ("gather_bytes", "a2a_bytes", "a2a_start_ms"),
    [(200e6, 100e6, 0.0), (200e6, 100e6, 1.5), (50e6, 400e6, 0.0), (100e6, 100e6, 0.7)],
)
def test_gather_and_all_to_all_on_one_nic_match_the_closed_form(
    gather_bytes, a2a_bytes, a2a_start_ms
) -> None:
    (gather_delay, a2a_delay), (gather_t, a2a_t), (gather_t0, a2a_t0) = gather_and_a2a(
        gather_bytes, a2a_bytes, a2a_start_ms
    )
    # the all-gather's transfer left when the all-to-all's transfer starts
    backlog = gather_t0 + gather_t - a2a_t0
    assert backlog > 0  # the cases overlap
    expected = float(fair_share_delay_ms(a2a_t, backlog))
    # each runs at half the NICs' bandwidth while both run: both are late by min(d, r)
    assert a2a_delay == pytest.approx(expected, rel=1e-9)
    assert gather_delay == pytest.approx(expected, rel=1e-9)


def test_gather_after_the_all_to_all_is_not_delayed() -> None:
    (gather_delay, a2a_delay), (gather_t, _), (gather_t0, _) = gather_and_a2a(50e6, 50e6, 100.0)
    assert gather_t0 + gather_t < 100.0
    assert gather_delay == a2a_delay == 0.0


def zero_plan(plan_dict, sharding: str) -> dict:
    # EP 16 over two nodes and DP shard groups over both: the per-layer ZeRO collectives and
    # the all-to-alls both cross the NICs
    plan = training_plan(plan_dict, overlap_communication=True, dp_sharding=sharding)
    plan["model"]["moe"] = {"routing": "even"}
    return plan


@pytest.mark.parametrize("sharding", ["gradients", "full"])
def test_sharded_collectives_are_flows_beside_the_all_to_alls(plan_dict, sharding) -> None:
    plan = zero_plan(plan_dict, sharding)
    shared = run(plan, "non-blocking")
    kinds = shared["comm_contention_by_kind_ms"]
    # the per-layer reduce-scatters (dp_grad) and, under ZeRO-3, the gathers (param_gather)
    # lose time to the all-to-alls beside them, and the all-to-alls to them
    assert kinds["dp_grad"] > 0
    assert kinds["ep_a2a"] > 0
    if sharding == "full":
        assert kinds["param_gather"] > 0
    # the same plan twice gives the same figures
    again = run(plan, "non-blocking")
    assert again["iteration_time_ms"] == shared["iteration_time_ms"]
    assert again["comm_contention_ms"] == shared["comm_contention_ms"]


def test_sharded_collectives_contend_only_when_they_overlap(plan_dict) -> None:
    # one layer, one micro-batch, no overlap of the gradients with the backward: the
    # reduce-scatter of the layer starts after its backward's all-to-alls, nothing shares
    plan = zero_plan(plan_dict, "gradients")
    plan["model"]["num_layers"] = 1
    plan["parallel"].update(num_microbatches=1)
    shared = run(plan, "non-blocking")
    assert shared["comm_contention_by_kind_ms"]["dp_grad"] == 0.0


def tp_plan(plan_dict, layers: int = 2, **parallel) -> dict:
    """Mixtral-8x7B (``layers``, even routing) on 2 x 8 GPUs with the given parallelism."""
    plan_dict["model"] = {
        "preset": "mixtral-8x7b",
        "num_layers": layers,
        "moe": {"routing": "even"},
    }
    plan_dict["workload"] = {"mode": "training", "seq_len": {"dist": "fixed", "value": 1024}}
    plan_dict["parallel"].update({"num_microbatches": 4, **parallel})
    return plan_dict


def test_tp_collectives_alone_keep_their_time(plan_dict) -> None:
    # TP 8 inside each node, experts local (EP 1), the DP reduction after the backward:
    # every TP collective has its lane's NVLink ports to itself
    plan = tp_plan(plan_dict, tp=8, pp=1, dp=2, ep=1, etp=1, overlap_communication=False)
    base = run(plan)
    shared = run(plan, "non-blocking")
    assert shared["iteration_time_ms"] == base["iteration_time_ms"]
    assert shared["comm_contention_ms"] == 0.0


PINNED_NVLINK = {
    "intra_node_efficiency": 0.6,
    "intra_node_latency_us": 2.0,
    "intra_node_base_latency_us": 8.0,
    "intra_node_protocols": False,
}


def test_tp_collectives_share_nvlink_with_zero3_gathers(plan_dict) -> None:
    # TP 2 x DP 4 in a node per stage: the ZeRO-3 gathers over the DP shard group (on
    # NVLink, on the sharding stream) run beside the lanes' TP collectives; explicit forward
    # prefetch, so that the forward gathers overlap too despite the one hardware queue
    plan = tp_plan(plan_dict, 8, tp=2, pp=2, dp=4, ep=4, etp=2, dp_sharding="full",
                   overlap_communication=True, forward_prefetch=True)  # fmt: skip
    # whether a TP collective meets a gather depends on the collectives' times: pinned here
    # (alpha-beta NVLink ring at 0.6 of the link) so that a refit of the packaged calibration
    # does not move the scenario (at the fitted H100 figures the two barely overlap)
    plan["hardware"] = {
        **plan["hardware"],
        "calibration": {"collectives": PINNED_NVLINK},
    }
    kinds = run(plan, "non-blocking")["comm_contention_by_kind_ms"]
    assert kinds["tp_comm"] > 0
    assert kinds["param_gather"] > 0
    assert set(kinds) == {"ep_a2a", "dp_grad", "pp_send", "param_gather", "tp_comm", "etp_comm"}

"""Shared links (hardware.topology): lone collectives keep their alpha-beta time, concurrent
ones share, oversubscribed uplinks slow inter-leaf traffic, and the engine's schedule decides
which collectives overlap."""

from __future__ import annotations

import numpy as np
import pytest
from test_comm import make_hw

from clustersim.costs import comm
from clustersim.engine.network import Network
from clustersim.run.simulate import simulate
from clustersim.spec.load import plan_from_dict
from clustersim.spec.schema import TopologySpec


def topo_hw(num_nodes: int = 8, **topology):
    hw = make_hw(num_nodes=num_nodes)
    return hw.model_copy(update={"topology": TopologySpec(**topology)})


def a2a_times(hw, groups: list[list[int]], size_bytes: float, starts=None) -> np.ndarray:
    """Uniform all-to-alls (one per group, ``size_bytes`` per rank) solved together."""
    net = Network(hw, hw.num_gpus)
    gpn = hw.gpus_per_node
    starts = np.zeros(len(groups)) if starts is None else np.asarray(starts, float)
    alone = []
    for i, ranks in enumerate(groups):
        n = len(ranks)
        send = np.full((1, n, n), size_bytes / n)
        duration = float(comm.all_to_all_v_times_ms(send, ranks, gpn, hw)[0])
        latency = float(comm.all_to_all_v_times_ms(np.zeros((1, n, n)), ranks, gpn, hw)[0])
        links, volumes = net.links.matrix_volumes(np.array(ranks), send)
        net.flows(("a2a", i), "ep_a2a", starts[i], [duration], latency, [(links, volumes[0])], 1)
        alone.append(duration)
    net.solve(len(groups), 1.0)
    return np.array(alone) + np.concatenate([net.delays[("a2a", i)] for i in range(len(groups))])


def test_lone_collective_keeps_its_alpha_beta_time_exactly() -> None:
    hw = topo_hw(kind="non_blocking")
    for ranks in (list(range(8)), list(range(32)), [0, 8, 16, 24]):
        n = len(ranks)
        expected = float(comm.all_to_all_v_times_ms(np.full((1, n, n), 64e6 / n), ranks, 8, hw)[0])
        assert a2a_times(hw, [ranks], 64e6)[0] == expected


def test_two_equal_collectives_on_the_same_ports_take_longer() -> None:
    hw = topo_hw(kind="non_blocking")
    alone = a2a_times(hw, [list(range(16))], 256e6)[0]
    both = a2a_times(hw, [list(range(16)), list(range(16))], 256e6)
    latency = float(comm.all_to_all_v_times_ms(np.zeros((1, 16, 16)), list(range(16)), 8, hw)[0])
    # the transfers share every port: each takes twice its transfer time
    assert both == pytest.approx([2 * alone - latency] * 2, rel=1e-9)
    # groups on other GPUs share nothing
    apart = a2a_times(hw, [list(range(16)), list(range(16, 32))], 256e6)
    assert apart == pytest.approx([alone, alone], rel=1e-12)


def test_oversubscription_slows_inter_leaf_all_to_all_at_most_twice() -> None:
    everyone = [list(range(64))]
    flat = topo_hw(kind="fat_tree", nodes_per_leaf=2, oversubscription=1.0)
    over = topo_hw(kind="fat_tree", nodes_per_leaf=2, oversubscription=2.0)
    t1, t2 = a2a_times(flat, everyone, 1e9)[0], a2a_times(over, everyone, 1e9)[0]
    assert t1 < t2 <= 2 * t1
    # 6 of every rank's 7 peer nodes lie outside its leaf of 2: the uplinks carry 6/7 of the
    # network bytes at half the NIC bandwidth, 12/7 the transfer time of the NICs
    latency = float(comm.all_to_all_v_times_ms(np.zeros((1, 64, 64)), everyone[0], 8, flat)[0])
    assert t2 - latency == pytest.approx((t1 - latency) * 12 / 7, rel=1e-9)
    # inside a node: no uplink, unchanged
    node = [list(range(8))]
    assert a2a_times(over, node, 1e9)[0] == a2a_times(flat, node, 1e9)[0]


def training_plan(plan_dict, **parallel) -> dict:
    plan_dict["hardware"].update({"num_nodes": 2, "gpus_per_node": 8})
    plan_dict["parallel"].update(
        {"tp": 1, "pp": 1, "dp": 16, "ep": 16, "etp": 1, "num_microbatches": 2, **parallel}
    )
    plan_dict["model"] = {"preset": "qwen3-30b-a3b", "num_layers": 4}
    plan_dict["workload"] = {"mode": "training", "seq_len": {"dist": "fixed", "value": 1024}}
    return plan_dict


def run(plan_dict, topology=None):
    d = {**plan_dict, "hardware": dict(plan_dict["hardware"])}
    if topology is not None:
        d["hardware"]["topology"] = topology
    return simulate(plan_from_dict(d, "test")).metrics


def test_without_overlap_the_default_topology_changes_nothing(plan_dict) -> None:
    plan = training_plan(plan_dict, overlap_communication=False)
    base = run(plan)
    shared = run(plan, "non-blocking")
    assert shared["iteration_time_ms"] == base["iteration_time_ms"]
    assert shared["comm_contention_ms"] == 0.0


def test_dp_reduction_beside_inter_node_all_to_all(plan_dict) -> None:
    # EP 16 over two nodes: every all-to-all crosses the NICs the DP buckets also use.
    plan = training_plan(plan_dict, overlap_communication=True)
    alone = run(plan)  # no sharing: each collective at full bandwidth
    shared = run(plan, "non-blocking")
    serial = run(training_plan(plan_dict, overlap_communication=False))
    assert shared["comm_contention_ms"] > 0
    assert alone["iteration_time_ms"] < shared["iteration_time_ms"]
    assert shared["iteration_time_ms"] <= serial["iteration_time_ms"]


def test_trace_carries_the_links_to_analyze(plan_dict, tmp_path) -> None:
    from clustersim.analyze.training import analyze_training
    from clustersim.trace import TraceReader

    plan = training_plan(plan_dict, overlap_communication=True)
    plan["hardware"]["topology"] = "dgx-h100-superpod"
    path = tmp_path / "net.arrow"
    report = simulate(plan_from_dict(plan, "test"), trace=path)
    with TraceReader(path) as reader:
        assert reader.version == 3
    analysis = analyze_training(path)
    assert analysis.metrics["comm_contention_ms"] == report.metrics["comm_contention_ms"] > 0
    links = analysis.to_dict()["links"]
    assert links and {d["kind"] for d in links} <= {"nvlink", "nic", "uplink"}
    assert all(0 < d["busy_pct"] <= 100 and d["bytes"] > 0 for d in links)
    # most contended first; the contention charged to links adds up to the flows' delays
    assert links[0]["contention_ms"] == max(d["contention_ms"] for d in links)
    # every link's bytes fit in its bandwidth over its busy time (NIC: 50 GB/s, NVLink 450)
    wall_ms = report.metrics["iteration_time_ms"]
    for d in links:
        gbps = 50.0 if d["kind"] == "nic" else 450.0
        assert d["bytes"] <= gbps * 1e6 * d["busy_pct"] / 100 * wall_ms * (1 + 1e-9)


def test_perfetto_has_link_tracks(plan_dict, tmp_path) -> None:
    import json

    from clustersim.analyze.perfetto import LINK_PID, export_perfetto

    plan = training_plan(plan_dict, overlap_communication=True)
    plan["hardware"]["topology"] = "non-blocking"
    path = tmp_path / "net.arrow"
    simulate(plan_from_dict(plan, "test"), trace=path)
    out = tmp_path / "net.json"
    export_perfetto(path, out)
    events = [e for e in json.loads(out.read_text())["traceEvents"] if e.get("pid") == LINK_PID]
    busy = [e for e in events if e["ph"] == "X"]
    assert busy and all(e["dur"] > 0 for e in busy)
    names = {e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert names and all(n.split(":")[0] in {"nvlink_tx", "nvlink_rx", "nic_tx", "nic_rx"}
                         for n in names)  # fmt: skip


def test_uplinks_simulate_every_replica(plan_dict) -> None:
    plan = training_plan(plan_dict, overlap_communication=True)
    plan["model"]["moe"] = {"routing": "even"}  # fixed lengths + even routing: symmetric
    alone = simulate(plan_from_dict(plan, "test"))
    plan["hardware"]["topology"] = {"kind": "fat_tree", "nodes_per_leaf": 1}
    tree = simulate(plan_from_dict(plan, "test"))
    assert tree.events == 16 * alone.events  # one replica simulated, then all 16

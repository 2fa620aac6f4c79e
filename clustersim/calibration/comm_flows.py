"""Collectives as flows over the measured clusters' links, against comm.csv's NCCL bus
bandwidths and DeepEP figures (the ``flows`` set of ``clustersim validate``).

Every published row becomes a flow problem on its cluster's real topology
(``engine.network.Links``: one NVLink port per GPU, the node's NICs with their GPU mapping
(GPU ``g`` on NIC ``g * nics // gpus_per_node``, its rail), leaf uplinks), one flow per
sending GPU carrying that GPU's bytes on every link of their routes, solved by the shared-link
solver (``engine.flows.solve``, max-min fair). Its time is a fixed part (steps x latency) plus
the solver's transfer time; the measured metric follows from it.

Collectives as flows (``S`` = buffer bytes, ``n`` GPUs, ``N`` nodes, ``g`` per node):

* NCCL ring all-reduce / all-gather / reduce-scatter: one ring per NIC of a node (a channel);
  channel ``c`` visits every node's GPUs from local ``c`` on and crosses to the next node on
  rail ``c``; every ring edge carries ``f(n) S / channels`` (``f`` = 2(n-1)/n for all-reduce,
  (n-1)/n otherwise). Inside one node the NICs play no part.
* NCCL tree all-reduce: a chain through each node's GPUs (``S`` up and ``S`` down every
  edge) and the inter-node double binary tree (``2 S / g`` per GPU each way on its NIC).
* NCCL NVLS all-reduce (NVLink SHARP, in-switch reduction): every GPU puts ``S`` on its
  NVLink port each way (its share up to the switch, the reduced result back); NVLSTree adds
  the inter-node double binary tree. NVLS moves the buffer in rounds of one chunk per channel
  and GPU (NCCL's chunking: 128 KiB, cut to 64 / 32 / 16 KiB below 64 / 8 / 2 rounds' worth;
  16 channels on SM90, 24 on SM100 in one domain): each round costs a fixed time and the
  pipeline fills for a few rounds, so small buffers (smaller chunks) run further below the
  peak than a constant latency says.
* DeepEP normal kernels (V1): a token goes once to every node holding one of its experts, over
  RDMA to the GPU of the same local index (the NIC of the rail), which forwards it over NVLink
  to the target GPUs of its node; tokens for the sender's own node go over NVLink directly.
  Routing as DeepEP's test: random scores, top-4 node groups (``min(N, 4)``), top-8 of 256
  experts; the per-token counts come from a fixed-seed sample (symmetric over GPUs). The
  published "bottleneck bandwidth" counts every (token, node) pair, the sender's own node
  included (DeepEP's ``num_rdma_token_sent``), or intra-node every (token, GPU) received.
* DeepEP low-latency kernels: every (token, expert) selection goes to its GPU directly, over
  NVLink inside a node (since DeepEP PR #173), over the sender's and the receiver's NICs
  across nodes; 128 tokens, 288 experts, uniform top-8 (DeepEP's test).

Parameters (few, physical, fitted per family on its own rows by relative least squares;
out of sample = refitted without the row, then the row predicted):

* NCCL: ring NVLink efficiency, NVLS efficiency (the switch's reduction rate over the port
  rate; Blackwell's is Hopper's x 0.74 / 0.85, NCCL's own ``nvlsEfficiency`` ratio), NIC
  efficiency of rings and of trees, latency per intra-node step and a base latency per call
  (ring, NVLS), NVLS time per chunk round and pipeline fill (rounds at line rate); a step
  that crosses nodes costs the preset's ``inter_node.latency_us`` (stated, not fitted); steps
  counted as NCCL's latency model counts them (a ring's 2(N-1) of its 2(n-1) cross nodes).
  The torch benchmark (C0116-C0123: a barrier, then CUDA events around one blocking call)
  adds a per-call cost, one value on one node and one across nodes, fitted with the rest but
  set by that benchmark's latency-bound sizes (``comm_torch_floor.csv``, same tables).
* DeepEP: NVLink efficiency, NIC efficiency, one latency per kernel call.

NIC counts and rates: as the rows state them (H800 / H100: one 400 Gb/s CX7 per GPU; AWS
p6-b200: 8 x 400 Gb/s EFA); where a row does not, its note states the assumption. Algorithm
per row: as stated, else as the tuner that ran picks it (NCCL's own on one node; AWS OFI
NCCL's region tuner for the p6-b200 four-node rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np

from clustersim.calibration import read_measurements
from clustersim.calibration.fit_comm import TORCH_FLOOR_FILE, nnls_relative, published_rows
from clustersim.costs import nccl
from clustersim.engine.flows import FlowSet, solve
from clustersim.engine.network import Links
from clustersim.spec.calibration_data import calibration_data
from clustersim.spec.presets import GPU_GENERATION, GPU_PRESETS
from clustersim.spec.schema import CalibrationSpec, HardwareSpec, LinkSpec, TopologySpec

GIB = 2.0**30
FAST = 1e30  # capacity of links whose kind is not being measured (bytes/ms)
DEEPEP_HIDDEN = 7168
DEEPEP_NORMAL_TOKENS = 4096
DEEPEP_LL_TOKENS = 128
DEEPEP_LL_EXPERTS = 288
DEEPEP_TOPK = 8
FP8_TOKEN_BYTES = DEEPEP_HIDDEN * (1 + 4 / 128)  # DeepEP test: FP8 payload + scales
LL_FP8_BYTES = DEEPEP_HIDDEN + DEEPEP_HIDDEN / 128 * 4 + 16  # low-latency test's count
BF16_TOKEN_BYTES = DEEPEP_HIDDEN * 2.0
ROUTING_SAMPLE_TOKENS = 8192
ROUTING_SEED = 0

NCCL_PARAMS = (
    "alpha_us", "base_us", "nvls_base_us", "nvls_round_us", "nvls_fill_rounds", "torch_call_us",
    "torch_internode_call_us", "ring_efficiency", "nvls_efficiency", "nic_efficiency",
    "tree_nic_efficiency",
)  # fmt: skip
DEEPEP_PARAMS = ("latency_us", "nvlink_efficiency", "nic_efficiency")


@dataclass(frozen=True)
class Case:
    """One published row as a flow problem."""

    row_id: str
    family: str  # nccl | deepep
    label: str
    metric: str  # busbw GB/s | bandwidth GB/s | latency us
    published: float
    gpu: str  # GPU preset
    nodes: int
    gpn: int
    algo: str  # ring | tree | nvls | nvls_tree | deepep_normal | deepep_ll
    op: str  # all_reduce | all_gather | reduce_scatter | dispatch | combine
    size: float  # NCCL buffer bytes; DeepEP bytes per (token, destination)
    nics: int
    nic_gbps: float
    nvlink_gbps: float
    internode: bool
    note: str = ""
    harness: str = "nccl-tests"  # nccl-tests | torch (all_reduce_bench.py: barrier, events)
    component: bool = False  # a latency-bound size fitting the harness cost, not validated

    @property
    def n(self) -> int:
        return self.nodes * self.gpn

    def time_ms(self, metric_value: float) -> float:
        """The row's time for a value of its metric."""
        if self.metric == "latency us":
            return metric_value * 1e-3
        return self.counted_bytes() / (metric_value * 1e6)

    def metric_of(self, time_ms: float) -> float:
        """The metric for a time (inverse of ``time_ms``)."""
        if self.metric == "latency us":
            return time_ms * 1e3
        return self.counted_bytes() / (time_ms * 1e6)

    def counted_bytes(self) -> float:
        """Bytes the published bandwidth divides by the time."""
        if self.family == "nccl":
            return _busbw_factor(self.op, self.n) * self.size
        return _deepep_counted_units(self) * self.size


def _busbw_factor(op: str, n: int) -> float:
    return nccl.bus_factor(op, n)


# ---- the rows ------------------------------------------------------------------------------


def _nccl(
    row_id: str, algo: str, op: str = "all_reduce", size: float | None = None,
    nics: int = 8, nic_gbps: float | None = None, note: str = "",
    nvlink_gbps: float | None = None,
) -> Case:  # fmt: skip
    r = published_rows()[row_id]
    gpu = _gpu_of(r["gpu"])
    n = int(r["num_gpus"]) if r["num_gpus"] else 16
    nodes = int(r["num_nodes"]) if r["num_nodes"] else 2
    gpn = n // nodes
    size = float(r["message_size_bytes"]) if size is None else size
    value = float(np.mean([float(v) for v in r["value"].split("-")]))
    if row_id == "C0075":  # "46-48 GB/s per NIC": the node's busbw over its 8 NICs
        value *= nics
    preset = GPU_PRESETS[gpu]
    label = f"{r['gpu'][:34]} {algo} {op} n={n} S={_size(size)}"
    harness = "torch" if r["dispatcher_kernel"].startswith("torch.distributed") else "nccl-tests"
    return Case(
        row_id, "nccl", label, "busbw GB/s", value, gpu, nodes, gpn, algo, op, size, nics,
        float(nic_gbps or preset["inter_node"]["bandwidth_gbps"]),
        float(nvlink_gbps or preset["intra_node"]["bandwidth_gbps"]), nodes > 1, note, harness,
    )  # fmt: skip


def _size(b: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if b >= scale:
            return f"{b / scale:g}{unit}"
    return f"{b:g}B"


def _gpu_of(text: str) -> str:
    for key, gpu in (("H800", "H800"), ("H200", "H200"), ("B200", "B200"), ("A100", "A100-80GB")):
        if key in text:
            return gpu
    return "H100-SXM"


LARGE = 8 * GIB
# NCCL's own NVLS efficiency per generation (src/graph/tuning.cc, nvlsEfficiency): Hopper
# 0.85, Blackwell 0.74; the fitted NVLS efficiency is Hopper's, Blackwell's is it x 0.74/0.85.
NVLS_GENERATION_RATIO = {"b200": 0.74 / 0.85}
# H800: NVLink cut to 8 links x 25 GB/s = 200 GB/s per direction (400 GB/s bidirectional, the
# preset's comment); DeepSeek's 160 GB/s (C0065) is what DeepEP achieves on it, not the line
# rate the NCCL efficiencies (fitted on line rates: H100/H200 450, B200 900) apply to.
H800_NVLINK_LINE_GBPS = 200.0
# B200 one node (torch all_reduce_bench.py): AWS's OFI region tuner leaves comms of <= 2
# nodes to NCCL's own, whose model gives NVLS the lowest latency on one node (25 µs against
# a Simple ring's 8.4 + 14 x 3.4) and the higher bandwidth; the source's nccl-tests sweep on
# the same node type confirms NVLS at 8 GPUs (8 GiB).
B200_ONE_NODE_ALGO = {"C0116": "nvls", "C0118": "nvls", "C0120": "nvls", "C0122": "nvls"}
B200_ONE_NODE_NOTE = "NVLS (NCCL's tuner on one node)"
# B200 four nodes (32 ranks, 8 per node): AWS OFI NCCL's region tuner for p6-b200
# (aws-ofi-nccl src/tuner/nccl_ofi_regions.cpp, region_init_internal_p6, all-reduce) at
# 32 ranks: Tree/LL128 below 18,350,080 B, Ring/LL128 to 133,693,440 B, NVLSTree/Simple to
# 435,159,040 B, Ring/Simple above.
B200_FOUR_NODE_ALGO = {"C0117": "tree", "C0119": "nvls_tree", "C0121": "ring", "C0123": "ring"}
B200_FOUR_NODE_NOTE = "AWS OFI region tuner (p6-b200, 32 ranks); 8 x 400 Gb/s EFA per node"
H200_SWEEP = [f"C{i:04d}" for i in range(77, 97)]
SWEEP_RING_MAX_BYTES = 2**20  # the sweep's author: Ring/LL up to 1 MiB, NVLS from 2 MiB


@cache
def nccl_cases() -> tuple[Case, ...]:
    """The NCCL bus-bandwidth rows of comm.csv as flow problems."""
    out = [
        _nccl("C0072", "ring", size=LARGE, note="size not stated ('large messages'): 8 GiB"),
        _nccl("C0073", "nvls", size=LARGE, note="peak: 8 GiB assumed"),
        _nccl("C0074", "nvls", size=4 * GIB, note="sweep peak: its largest size, 4 GiB"),
        _nccl(
            "C0075", "ring", size=LARGE,
            note="2 nodes x 8 GPUs, 8 NICs of 400 Gb/s (DGX H100), 8 GiB assumed; midpoint 47",
        ),
        _nccl(
            "C0076", "nvls", size=LARGE, nvlink_gbps=H800_NVLINK_LINE_GBPS,
            note="NVLS presumed; size not stated: 8 GiB; NVLink line rate 200 GB/s (8 links)",
        ),
    ]  # fmt: skip
    for rid in H200_SWEEP:
        size = float(published_rows()[rid]["message_size_bytes"])
        out.append(_nccl(rid, "ring" if size <= SWEEP_RING_MAX_BYTES else "nvls"))
    for i in range(97, 109):
        rid = f"C{i:04d}"
        r = published_rows()[rid]
        nvls = r["dispatcher_kernel"].startswith("NCCL NVLS")
        out.append(_nccl(rid, "nvls" if nvls else "ring"))
    out.append(_nccl("C0109", "ring", "all_gather"))
    out.append(_nccl("C0110", "ring", "reduce_scatter"))
    out.append(_nccl("C0113", "ring", size=LARGE, note="size not stated: 8 GiB"))
    efa = "AWS p5en: 16 x 200 Gb/s EFA = 400 GB/s per node, as 8 NICs x 50 GB/s (rail per GPU)"
    out.append(_nccl("C0114", "ring", note=efa))
    out.append(_nccl("C0115", "nvls_tree", note=efa))
    for rid, algo in B200_ONE_NODE_ALGO.items():
        out.append(_nccl(rid, algo, note=B200_ONE_NODE_NOTE))
    for rid, algo in B200_FOUR_NODE_ALGO.items():
        out.append(_nccl(rid, algo, note=f"{algo}: {B200_FOUR_NODE_NOTE}"))
    return tuple(out) + torch_floor_cases()


@cache
def torch_floor_cases() -> tuple[Case, ...]:
    """The latency-bound sizes of the B200 torch tables (``comm_torch_floor.csv``): they fit
    the harness's per-call cost, one node and across nodes (NCCL's LL ring on one node, the
    region tuner's tree across)."""
    out = []
    for r in read_measurements(TORCH_FLOOR_FILE):
        nodes, n = int(r["num_nodes"]), int(r["num_gpus"])
        size = float(r["message_size_bytes"])
        algo = "ring" if nodes == 1 else "tree"
        preset = GPU_PRESETS[r["gpu"]]
        label = f"B200 torch all_reduce_bench {algo} n={n} S={_size(size)} (harness cost)"
        out.append(
            Case(
                r["row_id"],
                "nccl",
                label,
                "busbw GB/s",
                float(r["busbw_gbps"]),
                r["gpu"],
                nodes,
                n // nodes,
                algo,
                "all_reduce",
                size,
                8,
                float(preset["inter_node"]["bandwidth_gbps"]),
                float(preset["intra_node"]["bandwidth_gbps"]),
                nodes > 1,
                f"latency-bound size of {r['of_row']}'s table: fits the harness cost",
                "torch",
                True,
            )  # fmt: skip
        )
    return tuple(out)


@cache
def deepep_cases() -> tuple[Case, ...]:
    """DeepEP V1 normal (intra- and inter-node) and low-latency rows (H800, one 400 Gb/s CX7
    NIC per GPU, NVLink 160 GB/s as DeepSeek states it: C0065, C0066)."""
    rows = published_rows()
    out = []
    for rid in [f"C{i:04d}" for i in range(1, 9)]:
        r = rows[rid]
        op = r["operation"]
        nodes = int(r["num_nodes"])
        size = FP8_TOKEN_BYTES if op == "dispatch" else BF16_TOKEN_BYTES
        label = f"DeepEP V1 normal {op} EP{r['ep']} ({nodes} node{'s' * (nodes > 1)})"
        out.append(
            Case(
                rid,
                "deepep",
                label,
                "bandwidth GB/s",
                float(r["value"]),
                "H800",
                nodes,
                8,
                "deepep_normal",
                op,
                size,
                8,
                50.0,
                160.0,
                nodes > 1,
            )
        )
    for rid in [f"C{i:04d}" for i in range(13, 37, 2)]:
        r = rows[rid]
        op = r["operation"]
        nodes = int(r["num_nodes"])
        size = LL_FP8_BYTES if op == "dispatch" else BF16_TOKEN_BYTES
        out.append(
            Case(
                rid,
                "deepep",
                f"DeepEP V1 low-latency {op} EP{r['ep']}",
                "latency us",
                float(r["value"]),
                "H800",
                nodes,
                8,
                "deepep_ll",
                op,
                size,
                8,
                50.0,
                160.0,
                nodes > 1,
            )
        )
    return tuple(out)


# ---- flows ---------------------------------------------------------------------------------


def _links(case: Case) -> Links:
    preset = GPU_PRESETS[case.gpu]
    data = calibration_data(GPU_GENERATION[case.gpu]) or {}
    hw = HardwareSpec(
        gpu=case.gpu,
        num_nodes=case.nodes,
        gpus_per_node=case.gpn if case.nodes > 1 else max(case.gpn, 1),
        memory_gib=preset["memory_gib"],
        peak_tflops=preset["peak_tflops"],
        hbm_bandwidth_gbps=preset["hbm_bandwidth_gbps"],
        intra_node=LinkSpec(bandwidth_gbps=case.nvlink_gbps, latency_us=3),
        inter_node=LinkSpec(
            bandwidth_gbps=case.nic_gbps, latency_us=preset["inter_node"]["latency_us"]
        ),
        calibration=CalibrationSpec.model_validate(data),
        topology=TopologySpec(kind="rail_optimized", nics_per_node=case.nics),
    )
    return Links(hw, case.n)


@dataclass(frozen=True)
class Problem:
    """Flows of one case: CSR entries over ``links`` (one flow per sending GPU)."""

    links: Links
    ptr: np.ndarray
    link: np.ndarray
    volume: np.ndarray  # bytes
    nvlink_kind: str  # the efficiency its NVLink ports run at: ring | nvls | deepep


def _matrix_entries(links: Links, send: np.ndarray):
    """(flow, link, bytes) entries of a send matrix over ranks 0..n-1: NVLink ports inside a
    domain, the sender's and receiver's NICs (and leaf uplinks) across."""
    src, dst = np.nonzero(send)
    keep = src != dst
    src, dst = src[keep], dst[keep]
    b = send[src, dst]
    same = src // links.domain == dst // links.domain
    flows = [src[same], src[same], src[~same], src[~same]]
    ids = [
        links.nvl_tx0 + src[same],
        links.nvl_rx0 + dst[same],
        links.nic_tx0 + links.nic_of(src[~same]),
        links.nic_rx0 + links.nic_of(dst[~same]),
    ]
    vols = [b[same], b[same], b[~same], b[~same]]
    if links.leaf_nodes:
        leaf_s, leaf_d = src // links.gpn // links.leaf_nodes, dst // links.gpn // links.leaf_nodes
        out = leaf_s != leaf_d
        flows += [src[out], src[out]]
        ids += [links.up0 + leaf_s[out], links.down0 + leaf_d[out]]
        vols += [b[out], b[out]]
    return flows, ids, vols


def _problem(links: Links, n: int, entries, nvlink_kind: str) -> Problem:
    flows, ids, vols = (np.concatenate(x) for x in entries)
    num_links = len(links.capacity)
    key = flows.astype(np.int64) * num_links + ids
    unique, inverse = np.unique(key, return_inverse=True)
    volume = np.bincount(inverse, weights=vols)
    flow_u, link_u = np.divmod(unique, num_links)
    ptr = np.searchsorted(flow_u, np.arange(n + 1))
    return Problem(links, ptr, link_u, volume, nvlink_kind)


def _ring_send(case: Case) -> np.ndarray:
    """Send matrix of NCCL's rings: one channel per NIC across nodes (rail ``c``)."""
    n, g, nodes = case.n, case.gpn, case.nodes
    channels = case.nics if nodes > 1 else 1
    per_edge = _busbw_factor(case.op, n) * case.size / channels
    send = np.zeros((n, n))
    for c in range(channels):
        order = [node * g + (c + k) % g for node in range(nodes) for k in range(g)]
        send[order, np.roll(order, -1)] += per_edge
    return send


def _tree_net_send(case: Case) -> np.ndarray:
    """Inter-node part of NCCL's (NVLS) tree all-reduce: the double binary tree over nodes,
    reduce then broadcast, each ``S`` per node each way, spread over the node's rails."""
    n, g, nodes = case.n, case.gpn, case.nodes
    send = np.zeros((n, n))
    per_gpu = 2 * case.size / g
    for node in range(nodes):
        for other in range(nodes):
            if other != node:
                for i in range(g):
                    send[node * g + i, other * g + i] = per_gpu / (nodes - 1)
    return send


def _tree_chain_send(case: Case) -> np.ndarray:
    """Intra-node part of NCCL's tree all-reduce: a chain through the node's GPUs, ``S`` up
    (reduce) and ``S`` down (broadcast) every edge."""
    n, g = case.n, case.gpn
    send = np.zeros((n, n))
    for node in range(case.nodes):
        for i in range(g - 1):
            a, b = node * g + i, node * g + i + 1
            send[a, b] += case.size
            send[b, a] += case.size
    return send


@cache
def problem(case: Case) -> Problem:
    """The case's flows."""
    links = _links(case)
    n = case.n
    if case.algo == "ring":
        return _problem(links, n, _matrix_entries(links, _ring_send(case)), "ring")
    if case.algo == "tree":
        send = _tree_chain_send(case) + _tree_net_send(case)
        return _problem(links, n, _matrix_entries(links, send), "ring")
    if case.algo in ("nvls", "nvls_tree"):
        ranks = np.arange(n)
        s = np.full(n, case.size)
        entries = ([ranks, ranks], [links.nvl_tx0 + ranks, links.nvl_rx0 + ranks], [s, s])
        if case.algo == "nvls_tree":
            more = _matrix_entries(links, _tree_net_send(case))
            entries = tuple(a + b for a, b in zip(entries, more, strict=True))
        return _problem(links, n, entries, "nvls")
    send = _deepep_send(case)
    return _problem(links, n, _matrix_entries(links, send), "deepep")


# ---- DeepEP traffic ------------------------------------------------------------------------


@cache
def _normal_routing(nodes: int, gpn: int) -> tuple[float, float, float, float]:
    """Per token of GPU 0 (node 0, local 0), DeepEP's test routing: (remote nodes reached,
    other local GPUs reached, GPUs reached through a remote node's forwarder other than the
    forwarder itself, counted units: nodes reached or, on one node, GPUs reached)."""
    n = nodes * gpn
    experts = (256 // n) * n
    rng = np.random.default_rng(ROUTING_SEED)
    scores = np.abs(rng.standard_normal((ROUTING_SAMPLE_TOKENS, experts))) + 1
    if nodes > 1:
        groups = min(nodes, 4)
        node_best = scores.reshape(ROUTING_SAMPLE_TOKENS, nodes, -1).max(axis=2)
        chosen = np.argsort(-node_best, axis=1)[:, :groups]
        mask = np.zeros((ROUTING_SAMPLE_TOKENS, nodes), dtype=bool)
        np.put_along_axis(mask, chosen, True, axis=1)
        scores = np.where(np.repeat(mask, experts // nodes, axis=1), scores, 0.0)
    top = np.argsort(-scores, axis=1)[:, :DEEPEP_TOPK]
    gpu_hit = np.zeros((ROUTING_SAMPLE_TOKENS, n), dtype=bool)
    np.put_along_axis(gpu_hit, top // (experts // n), True, axis=1)
    by_node = gpu_hit.reshape(ROUTING_SAMPLE_TOKENS, nodes, gpn)
    node_hit = by_node.any(axis=2)
    remote = float(node_hit[:, 1:].sum(axis=1).mean())
    local = float(by_node[:, 0, 1:].sum(axis=1).mean())
    forwarded = float(by_node[:, 1:, 1:].sum(axis=(1, 2)).mean()) if nodes > 1 else 0.0
    counted = float(node_hit.sum(axis=1).mean()) if nodes > 1 else float(gpu_hit.sum(1).mean())
    return remote, local, forwarded, counted


def _deepep_counted_units(case: Case) -> float:
    if case.algo == "deepep_ll":
        return DEEPEP_LL_TOKENS * DEEPEP_TOPK
    return DEEPEP_NORMAL_TOKENS * _normal_routing(case.nodes, case.gpn)[3]


def _deepep_send(case: Case) -> np.ndarray:
    """Send matrix (bytes) of one DeepEP dispatch (combine: its transpose, same link loads
    with the directions swapped, hence the same time)."""
    n, g, nodes = case.n, case.gpn, case.nodes
    node = np.arange(n) // g
    local = np.arange(n) % g
    same_node = node[:, None] == node[None, :]
    if case.algo == "deepep_ll":
        per_pair = DEEPEP_LL_TOKENS * DEEPEP_TOPK / n * case.size  # uniform over experts
        send = np.full((n, n), per_pair)
    else:
        remote, local_hits, forwarded, _ = _normal_routing(nodes, g)
        tokens = DEEPEP_NORMAL_TOKENS * case.size
        rail = (local[:, None] == local[None, :]) & ~same_node
        send = np.where(rail, remote / max(nodes - 1, 1) * tokens, 0.0)
        nvl = (local_hits + forwarded) / (g - 1) * tokens
        send += np.where(same_node, nvl, 0.0)
    np.fill_diagonal(send, 0.0)
    return send


# ---- solving -------------------------------------------------------------------------------


def transfer_ms(case: Case, efficiency: dict[str, float]) -> float:
    """The solver's transfer time of the case: every link at its line rate x the efficiency of
    its kind (``efficiency``: nvlink, nic; absent = not limiting)."""
    p = problem(case)
    kinds = np.array(p.links.kinds)
    scale = np.full(len(kinds), FAST)
    for kind, eff in efficiency.items():
        pick = kinds == kind if kind != "nic" else np.isin(kinds, ("nic", "uplink"))
        scale[pick] = eff
    cap = np.where(scale >= FAST, FAST, p.links.capacity * np.minimum(scale, 1.0))
    flow = np.repeat(np.arange(len(p.ptr) - 1), np.diff(p.ptr))
    alone = np.zeros(len(p.ptr) - 1)
    np.maximum.at(alone, flow, p.volume / cap[p.link])
    start = np.zeros(len(alone))
    end = solve(FlowSet(start, alone, p.ptr, p.link, p.volume, cap))
    return float(end.max())


@cache
def unit_transfer_ms(case: Case) -> dict[str, float]:
    """Transfer time with only one link kind limiting, at its line rate, per kind."""
    kinds = set(problem(case).links.kinds[int(i)] for i in problem(case).link)
    kinds = {"nic" if k == "uplink" else k for k in kinds}
    return {k: transfer_ms(case, {k: 1.0}) for k in sorted(kinds)}


def _steps(case: Case) -> tuple[float, float]:
    """(intra-node steps, inter-node steps) of the case's fixed part, as NCCL's latency model
    counts them (src/graph/tuning.cc): a ring's 2(n-1) steps of which 2(N-1) cross nodes
    (n-1, N-1 for all-gather / reduce-scatter); a tree 2(g-1) chain steps and 2 log2 N
    tree levels; NVLSTree its 2 log2 N levels."""
    n, nodes, g = case.n, case.nodes, case.gpn
    levels = 2.0 * math.ceil(math.log2(nodes)) if nodes > 1 else 0.0
    if case.algo == "ring":
        intra, inter = nccl.ring_steps(case.op, n, nodes)
        return float(intra), float(inter)
    if case.algo == "tree":
        return 2.0 * (g - 1), levels
    if case.algo == "nvls_tree":
        return 0.0, levels
    return 0.0, 0.0


# NCCL's NVLS chunking (src/enqueue.cc, calcCollChunking; src/transport/nvls.cc): channels per
# generation and node count, 128 KiB chunks cut to 64 / 32 / 16 KiB for smaller buffers.
NVLS_CHUNK_BYTES = 128 * 1024


def nvls_channels(case: Case) -> int:
    """NCCL's NVLS channel count: 16 on SM90, 24 on SM100 in one NVLink domain, 32 across."""
    if GPU_GENERATION[case.gpu] == "b200":
        return 24 if case.nodes == 1 else 32
    return 16


def nvls_chunk(case: Case) -> tuple[float, float]:
    """(chunk bytes, concurrent operations) of an NVLS all-reduce: one chunk in flight per
    channel and head (a head per GPU of the node)."""
    ops = nvls_channels(case) * case.gpn
    chunk = NVLS_CHUNK_BYTES
    for factor, smaller in ((64, 65536), (8, 32768), (2, 16384)):
        if case.size < factor * ops * chunk and chunk > smaller:
            chunk = smaller
    return float(chunk), float(ops)


def _nvls_terms(case: Case) -> tuple[float, float]:
    """(rounds, fill): the NVLS buffer's rounds of ``ops`` chunks, and one round's time at
    the NVLink line rate (ms) -- the pipeline's fill unit."""
    if case.algo != "nvls":
        return 0.0, 0.0
    chunk, ops = nvls_chunk(case)
    rounds = case.size / (chunk * ops)
    return rounds, unit_transfer_ms(case)["nvlink"] / rounds


def _inter_latency_ms(case: Case) -> float:
    return GPU_PRESETS[case.gpu]["inter_node"]["latency_us"] * 1e-3


# ---- fits ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowFit:
    """Fitted parameters of one family (efficiencies <= 1, latencies in µs)."""

    family: str
    values: dict[str, float]

    def efficiency(self, case: Case) -> dict[str, float]:
        """Link-kind efficiencies the case runs at."""
        v = self.values
        if self.family == "deepep":
            return {"nvlink": v["nvlink_efficiency"], "nic": v["nic_efficiency"]}
        eff = {kind: v[name] for kind, name in _efficiency_names(case).items()}
        eff["nvlink"] *= _nvlink_scale(case)
        return eff

    def fixed_ms(self, case: Case) -> float:
        """The case's fixed (latency) part."""
        v = self.values
        if self.family == "deepep":
            return v["latency_us"] * 1e-3
        row, offset = _fixed_columns(case)
        return float(sum(v[name] * x for name, x in row.items())) + offset

    def predict_ms(self, case: Case) -> float:
        """The flow model's time: fixed part + the solver's transfer."""
        return self.fixed_ms(case) + transfer_ms(case, self.efficiency(case))


def _efficiency_names(case: Case) -> dict[str, str]:
    """The NCCL parameter each link kind of the case runs at."""
    trees = case.algo in ("tree", "nvls_tree")
    return {
        "nvlink": "nvls_efficiency" if _nvls(case) else "ring_efficiency",
        "nic": "tree_nic_efficiency" if trees else "nic_efficiency",
    }


def _nvlink_scale(case: Case) -> float:
    """NCCL's NVLS efficiency of the case's generation relative to Hopper's (1 otherwise)."""
    return NVLS_GENERATION_RATIO.get(GPU_GENERATION[case.gpu], 1.0) if _nvls(case) else 1.0


def _fixed_columns(case: Case) -> tuple[dict[str, float], float]:
    """The NCCL fixed part as {parameter: multiplier} (ms per µs or per fill round) and a
    known offset (ms): per-call base, intra-node steps x alpha, inter-node steps x the
    preset's network latency, NVLS rounds and fill, the torch harness's per-call cost."""
    intra, inter = _steps(case)
    rounds, fill = _nvls_terms(case)
    row = {
        "alpha_us": intra * 1e-3,
        "nvls_base_us" if _nvls(case) else "base_us": 1e-3,
        "nvls_round_us": rounds * 1e-3,
        "nvls_fill_rounds": fill,
        "torch_internode_call_us" if case.nodes > 1 else "torch_call_us": (
            1e-3 if case.harness == "torch" else 0.0
        ),
    }
    return row, inter * _inter_latency_ms(case)


def _columns(case: Case, kind: str) -> tuple[list[float], float]:
    """Design row and known offset of a case whose bottleneck is link kind ``kind``."""
    unit = unit_transfer_ms(case)[kind]
    if case.family == "deepep":
        return [1e-3, unit if kind == "nvlink" else 0.0, unit if kind == "nic" else 0.0], 0.0
    if kind == "nvlink":
        unit /= _nvlink_scale(case)
    fixed, offset = _fixed_columns(case)
    limiting = _efficiency_names(case)[kind]
    row = [unit if name == limiting else fixed.get(name, 0.0) for name in NCCL_PARAMS]
    return row, offset


def _nvls(case: Case) -> bool:
    return problem(case).nvlink_kind == "nvls"


def fit(family: str, cases: tuple[Case, ...]) -> FlowFit:
    """Relative least squares of the family's parameters on ``cases`` (each case's bottleneck
    kind taken at the current efficiencies, iterated until it stops changing)."""
    names = NCCL_PARAMS if family == "nccl" else DEEPEP_PARAMS
    eff_cols = [i for i, nm in enumerate(names) if nm.endswith("efficiency")]
    t = np.array([c.time_ms(c.published) for c in cases])
    inv = {i: 1.0 / 0.8 for i in eff_cols}
    kinds: list[str] | None = None
    p = np.zeros(len(names))
    for _ in range(8):
        new = [_bottleneck(c, names, inv) for c in cases]
        if new == kinds:
            break
        kinds = new
        rows = [_columns(c, k) for c, k in zip(cases, kinds, strict=True)]
        x = np.array([r[0] for r in rows])
        offset = np.array([r[1] for r in rows])
        fixed: dict[int, float] = {}
        p = nnls_relative(x, t, fixed, offset)
        for i in eff_cols:  # efficiency <= 1: its inverse >= 1
            if np.any(x[:, i] != 0) and p[i] < 1.0:
                fixed[i] = 1.0
                p = nnls_relative(x, t, fixed, offset)
        inv = {i: (p[i] if p[i] > 0 else inv[i]) for i in eff_cols}
    values = {
        nm: float(1.0 / inv[i]) if nm.endswith("efficiency") else float(p[i])
        for i, nm in enumerate(names)
    }  # latencies: the columns are in ms per µs
    return FlowFit(family, values)


def _bottleneck(case: Case, names: tuple[str, ...], inv: dict[int, float]) -> str:
    unit = unit_transfer_ms(case)
    if case.family == "deepep":
        scale = {"nvlink": inv[1], "nic": inv[2]}
    else:
        eff = _efficiency_names(case)
        scale = {kind: inv[names.index(eff[kind])] for kind in unit}
        if "nvlink" in scale:
            scale["nvlink"] /= _nvlink_scale(case)
    return max(unit, key=lambda k: unit[k] * scale[k])


# ---- rows ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowRow:
    """A published row against the flow model (in its own metric)."""

    case: Case
    in_sample: float
    out_of_sample: float
    params_without: dict[str, float]

    @property
    def error_in(self) -> float:
        """Signed relative error in sample."""
        return self.in_sample / self.case.published - 1

    @property
    def error_oos(self) -> float:
        """Signed relative error out of sample."""
        return self.out_of_sample / self.case.published - 1


def family_rows(family: str) -> tuple[FlowFit, list[FlowRow]]:
    """The family's fit on all its rows and every row in and out of sample (leave one out)."""
    cases = nccl_cases() if family == "nccl" else deepep_cases()
    full = fit(family, cases)
    out = []
    for i, c in enumerate(cases):
        rest = cases[:i] + cases[i + 1 :]
        without = fit(family, rest)
        out.append(
            FlowRow(
                c,
                c.metric_of(full.predict_ms(c)),
                c.metric_of(without.predict_ms(c)),
                without.values,
            )
        )
    return full, out


NOTES = (
    "NCCL: NIC counts and rates as the rows state them (H100: one 400 Gb/s NIC per GPU; "
    "AWS p6-b200: 8 x 400 Gb/s EFA; AWS p5en: 16 x 200 Gb/s EFA as 8 x 50 GB/s); NVLink "
    "line rates of the GPU presets (H800: 200 GB/s, 8 links; DeepEP keeps DeepSeek's "
    "achieved 160 GB/s, C0065)",
    "NCCL algorithm per row as stated (sweep: Ring/LL up to 1 MiB, NVLS from 2 MiB), else "
    "as its tuner picks it: B200 one node NVLS (NCCL's own tuner); B200 four nodes by AWS "
    "OFI NCCL's p6-b200 region table at 32 ranks: 16 MiB Tree/LL128, 256 MiB NVLSTree, "
    "1 GiB and 16 GiB Ring; sizes not stated: 8 GiB (large-message statements); a step "
    "that crosses nodes costs the preset's inter_node.latency_us (8 µs, not fitted)",
    "torch all_reduce_bench rows (C0116-C0123): a per-call cost (one node, across nodes) "
    "fitted with the rest, set by the same tables' latency-bound sizes (F0116a-F0117c: "
    "256 KiB-1 MiB, rows of their own group, not counted as NCCL rows)",
    "DeepEP: H800 with one 400 Gb/s CX7 per GPU and 160 GB/s NVLink (C0065, C0066); routing "
    "as DeepEP's tests (group-limited top-8 of 256 experts / uniform top-8 of 288); V2 rows "
    "(C0053-C0062, 'logical bandwidth' without a stated byte count) are not expressed",
)


def group_of(case: Case) -> str:
    """Summary group of a case."""
    if case.component:
        return "torch benchmark per-call cost (latency-bound sizes, fit only)"
    if case.family == "nccl":
        return "NCCL bus bandwidth, " + ("multi-node" if case.internode else "one node")
    kernel = "normal" if case.algo == "deepep_normal" else "low-latency"
    return f"DeepEP {kernel}, " + ("internode" if case.internode else "intranode")

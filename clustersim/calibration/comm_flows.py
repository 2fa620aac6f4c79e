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
* NCCL NVLS all-reduce (NVLink SHARP, in-switch reduction): every GPU puts ``S`` on its
  NVLink port each way (its share up to the switch, the reduced result back); NVLSTree adds
  the inter-node double binary tree: ``2 S / g`` per GPU each way on its NIC.
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
  rate), NIC efficiency, latency per intra-node ring step and a base latency per call; a
  multi-node ring step costs the preset's ``inter_node.latency_us`` (stated, not fitted).
* DeepEP: NVLink efficiency, NIC efficiency, one latency per kernel call.

NIC counts and rates: as the rows state them (H800 / H100: one 400 Gb/s CX7 per GPU; AWS
p6-b200: 8 x 400 Gb/s EFA); where a row does not, its note states the assumption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np

from clustersim.calibration.fit_comm import nnls_relative, published_rows
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
    "alpha_us", "base_us", "nvls_base_us", "ring_efficiency", "nvls_efficiency", "nic_efficiency",
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
    algo: str  # ring | nvls | nvls_tree | deepep_normal | deepep_ll
    op: str  # all_reduce | all_gather | reduce_scatter | dispatch | combine
    size: float  # NCCL buffer bytes; DeepEP bytes per (token, destination)
    nics: int
    nic_gbps: float
    nvlink_gbps: float
    internode: bool
    note: str = ""

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
    return 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n


# ---- the rows ------------------------------------------------------------------------------


def _nccl(
    row_id: str, algo: str, op: str = "all_reduce", size: float | None = None,
    nics: int = 8, nic_gbps: float | None = None, note: str = "",
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
    return Case(
        row_id, "nccl", label, "busbw GB/s", value, gpu, nodes, gpn, algo, op, size, nics,
        float(nic_gbps or preset["inter_node"]["bandwidth_gbps"]),
        float(preset["intra_node"]["bandwidth_gbps"]), nodes > 1, note,
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
        _nccl("C0076", "nvls", size=LARGE, note="NVLS presumed; size not stated: 8 GiB"),
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
    for rid in ("C0116", "C0118", "C0120", "C0122"):
        out.append(_nccl(rid, "nvls", note="torch.distributed default: NVLS assumed (1 node)"))
    for rid in ("C0117", "C0119", "C0121", "C0123"):
        out.append(_nccl(rid, "ring", note="8 x 400 Gb/s EFA per node; ring assumed"))
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


@cache
def problem(case: Case) -> Problem:
    """The case's flows."""
    links = _links(case)
    n = case.n
    if case.algo == "ring":
        return _problem(links, n, _matrix_entries(links, _ring_send(case)), "ring")
    if case.algo in ("nvls", "nvls_tree"):
        ranks = np.arange(n)
        s = np.full(n, case.size)
        entries = ([ranks, ranks], [links.nvl_tx0 + ranks, links.nvl_rx0 + ranks], [s, s])
        if case.algo == "nvls_tree":
            g, nodes = case.gpn, case.nodes
            send = np.zeros((n, n))
            per_gpu = 2 * case.size / g  # reduce and broadcast, each S per node each way
            for node in range(nodes):
                for other in range(nodes):
                    if other != node:
                        for i in range(g):
                            send[node * g + i, other * g + i] = per_gpu / (nodes - 1)
            more = _matrix_entries(links, send)
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
    """(intra-node steps, inter-node steps) of the case's fixed part."""
    n, nodes = case.n, case.nodes
    ring = 2 * (n - 1) if case.op == "all_reduce" else n - 1
    if case.algo == "ring":
        return (0.0, float(ring)) if nodes > 1 else (float(ring), 0.0)
    if case.algo == "nvls_tree":
        return 0.0, 2.0 * math.ceil(math.log2(nodes))
    return 0.0, 0.0


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
        nvl = v["nvls_efficiency"] if _nvls(case) else v["ring_efficiency"]
        return {"nvlink": nvl, "nic": v["nic_efficiency"]}

    def fixed_ms(self, case: Case) -> float:
        """The case's fixed (latency) part."""
        v = self.values
        if self.family == "deepep":
            return v["latency_us"] * 1e-3
        intra, inter = _steps(case)
        base = v["nvls_base_us"] if _nvls(case) else v["base_us"]
        return (base + intra * v["alpha_us"]) * 1e-3 + inter * _inter_latency_ms(case)

    def predict_ms(self, case: Case) -> float:
        """The flow model's time: fixed part + the solver's transfer."""
        return self.fixed_ms(case) + transfer_ms(case, self.efficiency(case))


def _columns(case: Case, kind: str) -> tuple[list[float], float]:
    """Design row and known offset of a case whose bottleneck is link kind ``kind``."""
    unit = unit_transfer_ms(case)[kind]
    if case.family == "deepep":
        return [1e-3, unit if kind == "nvlink" else 0.0, unit if kind == "nic" else 0.0], 0.0
    intra, inter = _steps(case)
    nvls = _nvls(case)
    ring_col = unit if kind == "nvlink" and not nvls else 0.0
    nvls_col = unit if kind == "nvlink" and nvls else 0.0
    nic_col = unit if kind == "nic" else 0.0
    base = [0.0, 1e-3] if nvls else [1e-3, 0.0]
    row = [intra * 1e-3, *base, ring_col, nvls_col, nic_col]
    return row, inter * _inter_latency_ms(case)


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
        scale = {"nvlink": inv[4] if _nvls(case) else inv[3], "nic": inv[5]}
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
    "port rates of the GPU presets (H800: 160 GB/s, DeepSeek's figure, C0065)",
    "NCCL algorithm per row as stated (sweep: Ring/LL up to 1 MiB, NVLS from 2 MiB); "
    "sizes not stated: 8 GiB (large-message statements); a multi-node ring step costs the "
    "preset's inter_node.latency_us (8 µs, not fitted)",
    "DeepEP: H800 with one 400 Gb/s CX7 per GPU and 160 GB/s NVLink (C0065, C0066); routing "
    "as DeepEP's tests (group-limited top-8 of 256 experts / uniform top-8 of 288); V2 rows "
    "(C0053-C0062, 'logical bandwidth' without a stated byte count) are not expressed",
)


def group_of(case: Case) -> str:
    """Summary group of a case."""
    if case.family == "nccl":
        return "NCCL bus bandwidth, " + ("multi-node" if case.internode else "one node")
    kernel = "normal" if case.algo == "deepep_normal" else "low-latency"
    return f"DeepEP {kernel}, " + ("internode" if case.internode else "intranode")

"""Analytic collective times: the alpha-beta model of nccl-tests ``doc/PERFORMANCE.md``.

A collective over ``n`` GPUs moves a buffer of ``size_bytes`` (``S``) through links of bandwidth
``B`` (GB/s = 1e9 B/s, per GPU, per direction) with a per-step latency ``alpha`` (µs):

- ring all-reduce:                2(n-1)/n · S/B + 2(n-1) · alpha
- double-binary-tree all-reduce:  2 · S/B + 2 · ceil(log2 n) · alpha
- reduce-scatter, all-gather:     (n-1)/n · S/B + (n-1) · alpha   (S = the full buffer)
- all-to-all, uniform:            (n-1)/n · S/B + (n-1) · alpha   (S = one rank's send buffer)
- point-to-point:                 S/B + alpha

The tree line is the pipelined two-tree model (Sanders, Speck, Träff 2009; NCCL's double binary
tree): each half of the buffer is reduced up one tree and broadcast down it; every rank is an
inner node of one tree and a leaf of the other, so it sends and receives about ``S`` per phase
whatever ``n`` is, and a chunk needs ``ceil(log2 n)`` steps per phase. Tree beats ring only on
latency (large ``n``, small ``S``).

Calibration (``hw.calibration.collectives``, fitted by ``clustersim.calibration.fit_comm``):
``B`` is the link's bandwidth times its class's ``efficiency`` (``p2p_efficiency`` for
point-to-point and all-to-all, which NCCL runs as grouped sends), ``alpha`` the class's
``latency_us`` (null: the LinkSpec's), and every collective pays its class's
``base_latency_us`` once (launch and synchronisation; equivalently, the bus bandwidth grows
with the message as ``B·S/(S + S_half)``). With efficiency 1, LinkSpec latencies and no base
latency the lines above hold exactly. The primitives below take ``B`` and ``alpha`` as given;
the entry points (:func:`collective_cost`, :func:`all_to_all_v_cost`, :func:`link_for_group`,
:func:`p2p_link`) apply the calibration.

Topology: a *flat* algorithm over a group that spans nodes runs at the group's slowest link
(:func:`link_for_group`), except a ring all-reduce, reduce-scatter or all-gather, which NCCL
builds as one ring per GPU of a node, each crossing nodes on that GPU's NIC: its bus bandwidth
is the node's NICs together, at most NVLink's (:func:`_rail_ring_link`). The *hierarchical*
variants model one NIC per GPU used in parallel: all-reduce = intra-node reduce-scatter + inter-node
all-reduce of ``S/g`` + intra-node all-gather (``g`` = GPUs of the group per node), the
inter-node stage a ring or a double binary tree over the nodes, whichever is faster (NCCL's
tuner picks trees across many nodes, where a ring's ``2(nodes-1)`` network steps dominate);
all-to-all charges every rank's intra- and inter-node traffic to the matching port (see
:func:`all_to_all_v_cost`). A group of one GPU costs nothing.

NCCL's protocols (``collectives.intra_node_protocols``): a ring all-reduce, reduce-scatter or
all-gather inside one node (flat, or the intra-node stages of a hierarchical one) takes the
time of the fastest of NCCL's LL, LL128 and Simple protocols with NCCL's own latency tables
(:mod:`clustersim.costs.nccl`) at the calibrated bus bandwidth, plus the class's
``base_latency_us`` once per call; small messages then run at LL's low latency instead of
``2(n-1)`` Simple-protocol steps.

MoE dispatcher ``deepep`` (``parallel.moe_dispatcher``): the EP all-to-all-v runs at DeepEP's
measured per-GPU NVLink and RDMA bandwidths (``hw.calibration.moe.deepep_*``) with its fixed
latency per dispatch or combine instead of NCCL's per-peer steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from clustersim.costs import nccl
from clustersim.spec.schema import HardwareSpec

OPS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "p2p")
ALGORITHMS = ("ring", "tree", "hierarchical", "auto")
DISPATCHERS = ("alltoall", "deepep")


class CollectiveCost(NamedTuple):
    """Time of one collective and the bytes the busiest GPU sends (per direction).

    ``inter_node_bytes_per_gpu`` is the part of ``bytes_per_gpu`` the model charges to the
    inter-node link (all of it for a flat algorithm over a group that spans nodes).
    """

    time_ms: float
    bytes_per_gpu: float
    inter_node_bytes_per_gpu: float = 0.0


ZERO_COST = CollectiveCost(0.0, 0.0, 0.0)


class GroupLink(NamedTuple):
    """The bottleneck link of a group: bandwidth (GB/s), latency (µs), whether it spans nodes."""

    bandwidth_gbps: float
    latency_us: float
    crosses_nodes: bool


# ---- primitives (one link class) ---------------------------------------------------------


def transfer_ms(size_bytes: float, bandwidth_gbps: float) -> float:
    """Time to push ``size_bytes`` through a link of ``bandwidth_gbps`` (GB/s), in ms."""
    return size_bytes / (bandwidth_gbps * 1e6)


def ring_all_reduce_ms(
    size_bytes: float, n: int, bandwidth_gbps: float, latency_us: float
) -> float:
    """Ring all-reduce: 2(n-1)/n · S/B + 2(n-1) · alpha; 0 for n <= 1."""
    if n <= 1:
        return 0.0
    steps = n - 1
    return 2 * steps / n * transfer_ms(size_bytes, bandwidth_gbps) + 2 * steps * latency_us * 1e-3


def tree_all_reduce_ms(
    size_bytes: float, n: int, bandwidth_gbps: float, latency_us: float
) -> float:
    """Pipelined double-binary-tree all-reduce: 2 · S/B + 2·ceil(log2 n) · alpha; 0 for n <= 1."""
    if n <= 1:
        return 0.0
    depth = math.ceil(math.log2(n))
    return 2 * transfer_ms(size_bytes, bandwidth_gbps) + 2 * depth * latency_us * 1e-3


def reduce_scatter_ms(size_bytes: float, n: int, bandwidth_gbps: float, latency_us: float) -> float:
    """Ring reduce-scatter of a full buffer of S bytes: (n-1)/n · S/B + (n-1) · alpha."""
    if n <= 1:
        return 0.0
    steps = n - 1
    return steps / n * transfer_ms(size_bytes, bandwidth_gbps) + steps * latency_us * 1e-3


def all_gather_ms(size_bytes: float, n: int, bandwidth_gbps: float, latency_us: float) -> float:
    """Ring all-gather into a full buffer of S bytes: (n-1)/n · S/B + (n-1) · alpha."""
    return reduce_scatter_ms(size_bytes, n, bandwidth_gbps, latency_us)


def all_to_all_ms(size_bytes: float, n: int, bandwidth_gbps: float, latency_us: float) -> float:
    """Uniform all-to-all, S = one rank's whole send buffer (S/n per peer, self included).

    (n-1)/n · S/B + (n-1) · alpha: the S/n kept locally costs nothing.
    """
    return reduce_scatter_ms(size_bytes, n, bandwidth_gbps, latency_us)


def p2p_ms(size_bytes: float, bandwidth_gbps: float, latency_us: float) -> float:
    """Point-to-point send/receive: S/B + alpha."""
    return transfer_ms(size_bytes, bandwidth_gbps) + latency_us * 1e-3


def all_to_all_v_ms(send_bytes: np.ndarray, bandwidth_gbps: float, latency_us: float) -> float:
    """All-to-all-v over one link class; ``send_bytes[i, j]`` = bytes rank i sends to rank j.

    Time = max over ranks of max(bytes sent, bytes received) / B + (n-1) · alpha: every rank has
    one port per direction, all pairs proceed concurrently, so the busiest port sets the time.
    The diagonal (a rank's own share) is a local copy and costs nothing.
    """
    matrix = _off_diagonal(send_bytes)
    n = matrix.shape[0]
    if n <= 1:
        return 0.0
    busiest = max(matrix.sum(axis=1).max(), matrix.sum(axis=0).max())
    return transfer_ms(float(busiest), bandwidth_gbps) + (n - 1) * latency_us * 1e-3


def _off_diagonal(send_bytes: np.ndarray) -> np.ndarray:
    matrix = np.array(send_bytes, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"send_bytes must be a square matrix, got shape {matrix.shape}")
    np.fill_diagonal(matrix, 0.0)
    return matrix


# ---- topology and calibration -----------------------------------------------------------


class LinkClass(NamedTuple):
    """One link class (intra- or inter-node) as calibrated: collective bus bandwidth and
    point-to-point bandwidth (GB/s), latency per step and fixed latency per collective (µs)."""

    bandwidth_gbps: float
    p2p_gbps: float
    latency_us: float
    base_us: float


def link_class(hw: HardwareSpec, inter_node: bool) -> LinkClass:
    """The calibrated intra-node (NVLink) or inter-node (network) link class of ``hw``."""
    cal = hw.calibration.collectives
    if inter_node:
        link, eff, p2p_eff = hw.inter_node, cal.inter_node_efficiency, cal.inter_node_p2p_efficiency
        step, base = cal.inter_node_latency_us, cal.inter_node_base_latency_us
    else:
        link, eff, p2p_eff = hw.intra_node, cal.intra_node_efficiency, cal.intra_node_p2p_efficiency
        step, base = cal.intra_node_latency_us, cal.intra_node_base_latency_us
    step = link.latency_us if step is None else step
    return LinkClass(link.bandwidth_gbps * eff, link.bandwidth_gbps * p2p_eff, step, base)


def domain_gpus(gpus_per_node: int, hw: HardwareSpec) -> int:
    """GPUs of one NVLink domain: ``hw.nvlink_domain_gpus`` if set, else ``gpus_per_node``.

    Every cost below reads "node" as NVLink domain: a group inside one domain runs at the
    intra-node (NVLink) figures even when it spans several servers (GB200 NVL72)."""
    return hw.nvlink_domain_gpus or gpus_per_node


def _nodes(ranks: Sequence[int], gpus_per_node: int) -> dict[int, int]:
    """GPUs of the group on each node."""
    counts: dict[int, int] = {}
    for rank in ranks:
        node = rank // gpus_per_node
        counts[node] = counts.get(node, 0) + 1
    return counts


def _spans_nodes(ranks: Sequence[int], gpus_per_node: int) -> bool:
    return min(ranks) // gpus_per_node != max(ranks) // gpus_per_node


def _base_ms(ranks: Sequence[int], gpus_per_node: int, hw: HardwareSpec) -> float:
    """Fixed time of one collective over ``ranks`` (the inter-node class's if it spans nodes)."""
    return link_class(hw, _spans_nodes(ranks, gpus_per_node)).base_us * 1e-3


def link_for_group(ranks: Sequence[int], gpus_per_node: int, hw: HardwareSpec) -> GroupLink:
    """The slowest link a group uses for collectives, calibrated: intra-node inside one node,
    else the worse of the two (bus bandwidth, latency per step)."""
    gpus_per_node = domain_gpus(gpus_per_node, hw)
    intra = link_class(hw, False)
    if not _spans_nodes(ranks, gpus_per_node):
        return GroupLink(intra.bandwidth_gbps, intra.latency_us, False)
    inter = link_class(hw, True)
    bandwidth_gbps = min(intra.bandwidth_gbps, inter.bandwidth_gbps)
    return GroupLink(bandwidth_gbps, max(intra.latency_us, inter.latency_us), True)


def p2p_link(ranks: Sequence[int], gpus_per_node: int, hw: HardwareSpec) -> GroupLink:
    """The link of a point-to-point transfer between ``ranks`` = [src, dst], calibrated:
    send/receive bandwidth and the whole latency of one transfer (step + fixed), so that
    ``p2p_ms(S, *p2p_link(...)[:2])`` is the transfer's time."""
    gpus_per_node = domain_gpus(gpus_per_node, hw)
    intra = link_class(hw, False)
    if not _spans_nodes(ranks, gpus_per_node):
        return GroupLink(intra.p2p_gbps, intra.latency_us + intra.base_us, False)
    inter = link_class(hw, True)
    bandwidth_gbps = min(intra.p2p_gbps, inter.p2p_gbps)
    return GroupLink(bandwidth_gbps, max(intra.latency_us, inter.latency_us) + inter.base_us, True)


EFFICIENCY_REFERENCE_GPUS = 8


def efficiency_gpu_scale(n: int, exponent: float) -> float:
    """Factor on the intra-node efficiency of a ring over ``n`` GPUs:
    ``(min(n, 8) / 8) ** exponent`` (1 at 8 GPUs and for exponent 0; groups above 8 GPUs, in
    NVLink domains wider than a server, keep the 8-GPU efficiency: no measurement there)."""
    if exponent == 0.0 or n <= 1:
        return 1.0
    return (min(n, EFFICIENCY_REFERENCE_GPUS) / EFFICIENCY_REFERENCE_GPUS) ** exponent


def ring_bus_gbps(n: int, hw: HardwareSpec) -> float:
    """The Simple protocol's bus bandwidth (GB/s) of a ring over ``n`` GPUs of one node:
    NVLink bandwidth x ``intra_node_efficiency`` x :func:`efficiency_gpu_scale`, at most the
    link's bandwidth."""
    cal = hw.calibration.collectives
    eff = cal.intra_node_efficiency * efficiency_gpu_scale(
        n, cal.intra_node_efficiency_gpu_exponent
    )
    return hw.intra_node.bandwidth_gbps * min(1.0, eff)


def intra_ring_ms(
    op: str, size_bytes: float, n: int, hw: HardwareSpec, protocol: str | None = None
) -> float:
    """A ring ``op`` (all_reduce, reduce_scatter, all_gather) over ``n`` GPUs of one node,
    without the per-call base latency: NCCL's protocols (:mod:`clustersim.costs.nccl`, the
    fastest of LL / LL128 / Simple at the calibrated bus bandwidth, or ``protocol``; NCCL's
    per-step latency times ``collectives.intra_node_step_latency_scale``) when
    ``collectives.intra_node_protocols``, else the alpha-beta ring of the intra-node class."""
    if n <= 1:
        return 0.0
    intra = link_class(hw, False)
    cal = hw.calibration
    if cal.collectives.intra_node_protocols:
        bus, gen = ring_bus_gbps(n, hw), cal.generation
        scale = cal.collectives.intra_node_step_latency_scale
        if protocol is not None:
            return nccl.ring_protocol_us(protocol, op, size_bytes, n, bus, gen, scale) * 1e-3
        return nccl.ring_time_us(op, size_bytes, n, bus, gen, scale).time_us * 1e-3
    ring = ring_all_reduce_ms if op == "all_reduce" else reduce_scatter_ms
    return ring(size_bytes, n, intra.bandwidth_gbps, intra.latency_us)


def hierarchical_all_reduce_ms(
    size_bytes: float, ranks: Sequence[int], gpus_per_node: int, hw: HardwareSpec
) -> float:
    """Intra-node reduce-scatter + inter-node all-reduce of S/g + intra-node all-gather.

    ``g`` GPUs of the group per node run ``g`` inter-node all-reduces in parallel, each on its
    own NIC (at the group's slowest link), as a ring or a double binary tree over the nodes,
    whichever is faster. If nodes hold different numbers of the group's GPUs, the intra stages
    use the largest count and the inter stage the smallest (largest shard).
    """
    return _hierarchical_ms(size_bytes, ranks, gpus_per_node, hw, reduce=True, gather=True)[0]


def hierarchical_reduce_scatter_ms(
    size_bytes: float, ranks: Sequence[int], gpus_per_node: int, hw: HardwareSpec
) -> float:
    """Intra-node reduce-scatter of S, then inter-node reduce-scatter of S/g."""
    return _hierarchical_ms(size_bytes, ranks, gpus_per_node, hw, reduce=True, gather=False)[0]


def hierarchical_all_gather_ms(
    size_bytes: float, ranks: Sequence[int], gpus_per_node: int, hw: HardwareSpec
) -> float:
    """Inter-node all-gather of S/g, then intra-node all-gather of S (mirror of reduce-scatter)."""
    return _hierarchical_ms(size_bytes, ranks, gpus_per_node, hw, reduce=False, gather=True)[0]


def _hierarchical_ms(
    size_bytes: float,
    ranks: Sequence[int],
    gpus_per_node: int,
    hw: HardwareSpec,
    *,
    reduce: bool,
    gather: bool,
) -> tuple[float, bool]:
    """Time, and whether the inter-node stage is a tree (all-reduce only)."""
    gpus_per_node = domain_gpus(gpus_per_node, hw)
    counts = _nodes(ranks, gpus_per_node).values()
    num_nodes, g_max, g_min = len(counts), max(counts), min(counts)
    slow = link_for_group(ranks, gpus_per_node, hw)
    intra_ms = intra_ring_ms("reduce_scatter", size_bytes, g_max, hw)
    shard_bytes = size_bytes / g_min
    bw, lat = slow.bandwidth_gbps, slow.latency_us
    tree = False
    if reduce and gather:
        inter_ms = ring_all_reduce_ms(shard_bytes, num_nodes, bw, lat)
        tree_ms = tree_all_reduce_ms(shard_bytes, num_nodes, bw, lat)
        tree = tree_ms < inter_ms
        inter_ms = min(inter_ms, tree_ms)
    else:
        inter_ms = reduce_scatter_ms(shard_bytes, num_nodes, bw, lat)
    base_ms = _base_ms(ranks, gpus_per_node, hw)
    return intra_ms * (reduce + gather) + inter_ms + base_ms, tree


# ---- all-to-all ports --------------------------------------------------------------------


class _Ports(NamedTuple):
    """Bandwidths (GB/s) of a rank's intra- and inter-node ports and the fixed time (ms)."""

    intra_gbps: float
    inter_gbps: float
    fixed_ms: float


def _a2a_ports(
    ranks: Sequence[int], gpus_per_node: int, hw: HardwareSpec, dispatcher: str = "alltoall"
) -> _Ports:
    """NCCL all-to-all (grouped sends at the p2p bandwidths, (n-1) steps of the group's
    slowest latency plus the fixed latency) or DeepEP (its bandwidths and fixed latency)."""
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"unknown dispatcher {dispatcher!r}; valid: {', '.join(DISPATCHERS)}")
    if dispatcher == "deepep":
        moe = hw.calibration.moe
        return _Ports(
            moe.deepep_intra_node_gbps, moe.deepep_inter_node_gbps, moe.deepep_latency_us * 1e-3
        )
    intra = link_class(hw, False)
    steps_ms = (len(ranks) - 1) * link_for_group(ranks, gpus_per_node, hw).latency_us * 1e-3
    if not _spans_nodes(ranks, gpus_per_node):
        return _Ports(intra.p2p_gbps, intra.p2p_gbps, steps_ms + intra.base_us * 1e-3)
    inter = link_class(hw, True)
    return _Ports(
        intra.p2p_gbps, min(intra.p2p_gbps, inter.p2p_gbps), steps_ms + inter.base_us * 1e-3
    )


def _uniform_all_to_all_cost(
    size_bytes: float, ranks: Sequence[int], gpus_per_node: int, hw: HardwareSpec
) -> CollectiveCost:
    """Port model of a uniform all-to-all without building the n x n matrix."""
    n = len(ranks)
    per_peer = size_bytes / n
    worst_intra = worst_inter = 0.0
    for count in _nodes(ranks, gpus_per_node).values():
        worst_intra = max(worst_intra, (count - 1) * per_peer)
        worst_inter = max(worst_inter, (n - count) * per_peer)
    return _port_cost(worst_intra, worst_inter, _a2a_ports(ranks, gpus_per_node, hw))


def _port_cost(intra_bytes: float, inter_bytes: float, ports: _Ports) -> CollectiveCost:
    """Busiest intra- and inter-node port bytes -> time; the two port classes work in parallel."""
    time_ms = float(_port_time_ms(intra_bytes, inter_bytes, ports))
    return CollectiveCost(time_ms, intra_bytes + inter_bytes, inter_bytes)


def _port_time_ms(intra_bytes, inter_bytes, ports: _Ports):
    """:func:`_port_cost`'s time, for scalars or arrays of port bytes."""
    time_ms = np.maximum(
        transfer_ms(intra_bytes, ports.intra_gbps), transfer_ms(inter_bytes, ports.inter_gbps)
    )
    return time_ms + ports.fixed_ms


def all_to_all_v_cost(
    send_bytes: np.ndarray,
    ranks: Sequence[int],
    gpus_per_node: int,
    hw: HardwareSpec,
    dispatcher: str = "alltoall",
) -> CollectiveCost:
    """All-to-all-v over a group that may span nodes; ``send_bytes[i, j]``: ranks[i] -> ranks[j].

    Each rank has an intra-node port (NVLink) and an inter-node port (NIC), each per direction.
    Time = max over ranks and port classes of max(bytes sent, bytes received) / that port's
    bandwidth, plus a fixed time. ``dispatcher`` ``alltoall`` (NCCL): the links' p2p
    bandwidths, (n-1) steps of the group's slowest latency and the base latency; ``deepep``:
    DeepEP's NVLink and RDMA bandwidths and its latency (``hw.calibration.moe``). The bytes
    reported are the busiest rank's (sent or received, whichever is larger) on each port class.
    """
    gpus_per_node = domain_gpus(gpus_per_node, hw)
    matrix = _off_diagonal(send_bytes)
    n = len(ranks)
    if matrix.shape[0] != n:
        raise ValueError(f"send_bytes is {matrix.shape[0]}x{matrix.shape[0]} for {n} ranks")
    ports = _a2a_ports(ranks, gpus_per_node, hw, dispatcher)
    if n <= 1:
        return ZERO_COST
    intra_bytes, inter_bytes = _busiest_ports(matrix[None], ranks, gpus_per_node)
    return _port_cost(float(intra_bytes[0]), float(inter_bytes[0]), ports)


def all_to_all_v_times_ms(
    send_bytes: np.ndarray,
    ranks: Sequence[int],
    gpus_per_node: int,
    hw: HardwareSpec,
    dispatcher: str = "alltoall",
) -> np.ndarray:
    """:func:`all_to_all_v_cost`'s time for a batch of matrices ``send_bytes`` (B, n, n)."""
    gpus_per_node = domain_gpus(gpus_per_node, hw)
    matrix = np.array(send_bytes, dtype=np.float64)
    n = len(ranks)
    if matrix.ndim != 3 or matrix.shape[1:] != (n, n):
        raise ValueError(f"send_bytes must have shape (B, {n}, {n}), got {matrix.shape}")
    ports = _a2a_ports(ranks, gpus_per_node, hw, dispatcher)
    if n <= 1:
        return np.zeros(matrix.shape[0])
    matrix[:, np.arange(n), np.arange(n)] = 0.0  # a rank's own share is a local copy
    intra_bytes, inter_bytes = _busiest_ports(matrix, ranks, gpus_per_node)
    return _port_time_ms(intra_bytes, inter_bytes, ports)


def _busiest_ports(
    matrix: np.ndarray, ranks: Sequence[int], gpus_per_node: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per matrix of a batch (B, n, n) without diagonal: the busiest rank's intra-node and
    inter-node bytes (sent or received, whichever is larger)."""
    node = np.asarray(ranks) // gpus_per_node
    same_node = node[:, None] == node[None, :]
    intra, inter = np.where(same_node, matrix, 0.0), np.where(same_node, 0.0, matrix)
    intra_bytes = np.maximum(intra.sum(axis=2).max(axis=1), intra.sum(axis=1).max(axis=1))
    inter_bytes = np.maximum(inter.sum(axis=2).max(axis=1), inter.sum(axis=1).max(axis=1))
    return intra_bytes, inter_bytes


# ---- entry point -------------------------------------------------------------------------


def collective_cost(
    op: str,
    size_bytes: float,
    ranks: Sequence[int],
    gpus_per_node: int,
    hw: HardwareSpec,
    algorithm: str = "ring",
    protocol: str | None = None,
) -> CollectiveCost:
    """Cost of collective ``op`` (one of :data:`OPS`) of ``size_bytes`` over ``ranks``.

    ``algorithm``: ``ring`` (flat, at the group's slowest link), ``tree`` (all-reduce only),
    ``hierarchical`` (two-level, see the module docstring; for ``p2p`` the same as ``ring``) or
    ``auto`` (the fastest of those that apply, as NCCL's tuner would pick). ``size_bytes`` is
    the full buffer (all-reduce, reduce-scatter input, all-gather output), one rank's whole send
    buffer (all-to-all) or the message (p2p, ``ranks`` = [src, dst]). Times are calibrated
    (``hw.calibration.collectives``, module docstring). ``protocol`` (one of NCCL's
    :data:`~clustersim.costs.nccl.PROTOCOLS`) forces that protocol where NCCL's protocols
    apply (a ring inside one node with ``intra_node_protocols``); None: the tuner's choice.
    """
    gpus_per_node = domain_gpus(gpus_per_node, hw)
    if op not in OPS:
        raise ValueError(f"unknown collective {op!r}; valid: {', '.join(OPS)}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}")
    if size_bytes < 0:
        raise ValueError(f"size_bytes must be >= 0, got {size_bytes}")
    n = len(ranks)
    if n <= 1 or (op == "p2p" and ranks[0] == ranks[-1]):
        return ZERO_COST
    if algorithm == "auto":
        options = (
            ("ring", "tree", "hierarchical") if op == "all_reduce" else ("ring", "hierarchical")
        )
        costs = [collective_cost(op, size_bytes, ranks, gpus_per_node, hw, a) for a in options]
        return min(costs, key=lambda c: c.time_ms)
    if algorithm == "tree" and op != "all_reduce":
        raise ValueError(f"algorithm 'tree' applies to all_reduce only, not {op!r}")
    if op == "p2p":
        link = p2p_link(ranks, gpus_per_node, hw)
        time_ms = p2p_ms(size_bytes, link.bandwidth_gbps, link.latency_us)
        return CollectiveCost(time_ms, size_bytes, size_bytes if link.crosses_nodes else 0.0)
    if algorithm == "hierarchical":
        return _hierarchical_cost(op, size_bytes, ranks, gpus_per_node, hw)
    link = link_for_group(ranks, gpus_per_node, hw)
    if (
        algorithm == "ring"
        and op in nccl.RING_OPS
        and not link.crosses_nodes
        and hw.calibration.collectives.intra_node_protocols
    ):
        time_ms = intra_ring_ms(op, size_bytes, n, hw, protocol)
        time_ms += _base_ms(ranks, gpus_per_node, hw)
        sent = nccl.bus_factor(op, n) * size_bytes
        return CollectiveCost(time_ms, sent, 0.0)
    if op == "all_to_all":  # grouped sends: the slowest p2p bandwidth
        link = link._replace(bandwidth_gbps=p2p_link(ranks, gpus_per_node, hw).bandwidth_gbps)
    if algorithm == "ring" and op in nccl.RING_OPS and link.crosses_nodes:
        link = _rail_ring_link(op, ranks, gpus_per_node, hw)
    cost = _flat_cost(op, size_bytes, n, link, algorithm)
    return cost._replace(time_ms=cost.time_ms + _base_ms(ranks, gpus_per_node, hw))


def collective_time_ms(
    op: str,
    size_bytes: float,
    ranks: Sequence[int],
    gpus_per_node: int,
    hw: HardwareSpec,
    algorithm: str = "ring",
    protocol: str | None = None,
) -> float:
    """Time in ms of :func:`collective_cost`."""
    return collective_cost(op, size_bytes, ranks, gpus_per_node, hw, algorithm, protocol).time_ms


_FLAT_MS = {
    "all_reduce": ring_all_reduce_ms,
    "reduce_scatter": reduce_scatter_ms,
    "all_gather": all_gather_ms,
    "all_to_all": all_to_all_ms,
}


def _rail_ring_link(
    op: str, ranks: Sequence[int], gpus_per_node: int, hw: HardwareSpec
) -> GroupLink:
    """A ring over nodes as NCCL builds it: one ring (channel) per GPU of the group on a node,
    each crossing to the next node on its own GPU's NIC (its rail), so the bus bandwidth is
    the node's NICs together, ``g`` x the inter-node class's (NCCL's ``nChannels x
    bwInter``), at most the intra-node class's; the steps' latency as NCCL counts them
    (:func:`clustersim.costs.nccl.ring_steps`: 2(N-1) of 2(n-1) steps cross nodes),
    returned as the mean latency per step."""
    counts = _nodes(ranks, gpus_per_node).values()
    intra, inter = link_class(hw, False), link_class(hw, True)
    bandwidth_gbps = min(intra.bandwidth_gbps, min(counts) * inter.bandwidth_gbps)
    intra_steps, inter_steps = nccl.ring_steps(op, len(ranks), len(counts))
    total_us = intra_steps * intra.latency_us + inter_steps * inter.latency_us
    return GroupLink(bandwidth_gbps, total_us / (intra_steps + inter_steps), True)


def _flat_cost(
    op: str, size_bytes: float, n: int, link: GroupLink, algorithm: str
) -> CollectiveCost:
    bw, lat = link.bandwidth_gbps, link.latency_us
    if algorithm == "tree":
        time_ms, sent = tree_all_reduce_ms(size_bytes, n, bw, lat), 2.0 * size_bytes
    else:
        time_ms = _FLAT_MS[op](size_bytes, n, bw, lat)
        sent = nccl.bus_factor(op, n) * size_bytes
    return CollectiveCost(time_ms, sent, sent if link.crosses_nodes else 0.0)


def _hierarchical_cost(
    op: str, size_bytes: float, ranks: Sequence[int], gpus_per_node: int, hw: HardwareSpec
) -> CollectiveCost:
    if op == "all_to_all":
        return _uniform_all_to_all_cost(size_bytes, ranks, gpus_per_node, hw)
    counts = _nodes(ranks, gpus_per_node).values()
    num_nodes, g_max, g_min = len(counts), max(counts), min(counts)
    reduce, gather = op in ("all_reduce", "reduce_scatter"), op in ("all_reduce", "all_gather")
    time_ms, tree = _hierarchical_ms(
        size_bytes, ranks, gpus_per_node, hw, reduce=reduce, gather=gather
    )
    phases = 2 if op == "all_reduce" else 1
    intra_sent = phases * (g_max - 1) / g_max * size_bytes
    shard = size_bytes / g_min
    inter_sent = 2 * shard if tree else phases * (num_nodes - 1) / num_nodes * shard
    return CollectiveCost(time_ms, intra_sent + inter_sent, inter_sent)

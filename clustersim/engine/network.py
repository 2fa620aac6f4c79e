"""The network as shared links (``hardware.topology``): contention between concurrent
collectives.

Links (capacities per direction, bytes/ms = GB/s x 1e6):

* ``nvlink_tx:<gpu>``, ``nvlink_rx:<gpu>`` -- a GPU's NVLink port to its domain's NVSwitch
  (``hardware.nvlink_domain_gpus``; non-blocking inside), ``intra_node.bandwidth_gbps``;
* ``nic_tx:<node>.<i>``, ``nic_rx:<node>.<i>`` -- NIC ``i`` of a node (``nics_per_node``;
  GPU ``g`` of a node uses NIC ``g * nics_per_node // gpus_per_node``, its rail), each at
  ``inter_node.bandwidth_gbps``;
* ``up:<leaf>``, ``down:<leaf>`` -- the uplinks of a leaf group of ``nodes_per_leaf`` nodes
  (``rail_optimized``: a scalable unit whose rail switches reach every node in one hop;
  ``fat_tree``: one leaf switch): the group's NIC bandwidth / ``oversubscription``; and with
  ``tiers: 3`` ``pod_up:<p>``, ``pod_down:<p>`` for pods of ``leaves_per_pod`` leaf groups.
  ``non_blocking`` has no uplinks.

Flows: every collective instance (an EP all-to-all of one group, a DP/EDP gradient bucket of
one group, the distributed optimizer's parameter all-gather, a ZeRO-2/3 per-layer all-gather or
reduce-scatter step of one shard group, a lane's TP or expert-TP collective, a pipeline send)
is one flow: its fixed time (latencies, launch; ``costs.comm`` with an empty buffer) runs first
and unshared, then its transfer puts its bytes on the links of its route: same-domain bytes on
the domain's NVLink ports, cross-domain bytes on the sender's NIC (tx) and the receiver's (rx),
and the share leaving a leaf (pod) group on its uplinks. For collectives given as per-GPU
bytes (ring, tree, hierarchical) every GPU's network bytes are spread evenly over the group's
other nodes; the all-to-all-v uses its send matrix. Volumes are scaled so that a flow alone
saturates its bottleneck link in exactly the transfer time of ``costs.comm``: alone, every
collective takes exactly today's alpha-beta time; beside others it takes longer
(``engine.flows``, max-min).

Which collectives overlap is the engine's schedule: a first pass records every flow at its
scheduled start, the fluid solver gives each its delay, and a second pass runs the same
iteration with every collective lengthened by its delay (one fixed-point step: the delays are
those of the first pass's overlaps). Batches of flows are recorded in CSR form
(:class:`Routes`), so recording costs a few array appends per batch.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from clustersim.costs.comm import collective_cost, p2p_link
from clustersim.engine.flows import FlowSet, by_link_then_start, flow_max, solve
from clustersim.spec.schema import HardwareSpec

GB = 1e6  # bytes per ms in one GB/s
KINDS = ("ep_a2a", "dp_grad", "pp_send", "param_gather", "tp_comm", "etp_comm")


@dataclass(frozen=True)
class Routes:
    """The routes of a batch of flows in CSR form: flow ``i`` puts ``volume[o_i:o_i+count[i]]``
    bytes on links ``link[o_i:o_i+count[i]]`` (``o_i`` = the counts before it)."""

    link: np.ndarray  # (k,) int64
    volume: np.ndarray  # (k,) bytes
    count: np.ndarray  # (flows,) int64

    @classmethod
    def of(cls, routes: list[tuple[np.ndarray, np.ndarray]]) -> Routes:
        """From one (links, bytes) pair per flow."""
        if not routes:
            return cls(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))
        return cls(
            np.concatenate([np.asarray(r[0], np.int64) for r in routes]),
            np.concatenate([np.asarray(r[1], np.float64) for r in routes]),
            np.array([len(r[0]) for r in routes], dtype=np.int64),
        )

    @property
    def size(self) -> int:
        """Number of flows."""
        return len(self.count)


@dataclass
class LinkReport:
    """One link over the iteration: bytes carried, busy time, contention of its flows."""

    name: str
    kind: str  # nvlink | nic | uplink
    bytes: float
    busy_ms: float
    contention_ms: float
    intervals: np.ndarray  # (k, 2) busy intervals (ms)


class Links:
    """The links of a cluster and the index of each, from ``hw`` (and its topology)."""

    def __init__(self, hw: HardwareSpec, world_size: int):
        topo = hw.topology
        self.gpn = hw.gpus_per_node
        self.domain = hw.nvlink_domain
        gpus = max(world_size, hw.num_gpus)
        self.num_nodes = -(-gpus // self.gpn)
        self.nics = (topo.nics_per_node if topo and topo.nics_per_node else None) or self.gpn
        nic_gbps = hw.inter_node.bandwidth_gbps
        node_gbps = self.nics * nic_gbps
        names: list[str] = []
        kinds: list[str] = []
        caps: list[float] = []

        def add(prefix: str, count: int, kind: str, gbps: float, label=str) -> int:
            first = len(names)
            names.extend(f"{prefix}:{label(i)}" for i in range(count))
            kinds.extend([kind] * count)
            caps.extend([gbps * GB] * count)
            return first

        def nic_label(k: int) -> str:
            return f"{k // self.nics}.{k % self.nics}"

        num_gpus = self.num_nodes * self.gpn
        num_nics = self.num_nodes * self.nics
        self.nvl_tx0 = add("nvlink_tx", num_gpus, "nvlink", hw.intra_node.bandwidth_gbps)
        self.nvl_rx0 = add("nvlink_rx", num_gpus, "nvlink", hw.intra_node.bandwidth_gbps)
        self.nic_tx0 = add("nic_tx", num_nics, "nic", nic_gbps, nic_label)
        self.nic_rx0 = add("nic_rx", num_nics, "nic", nic_gbps, nic_label)
        self.leaf_nodes = 0  # 0: no uplinks
        self.pod_nodes = 0
        if topo is not None and topo.kind != "non_blocking":
            self.leaf_nodes = topo.nodes_per_leaf
            leaves = -(-self.num_nodes // self.leaf_nodes)
            up = self.leaf_nodes * node_gbps / topo.oversubscription
            self.up0 = add("up", leaves, "uplink", up)
            self.down0 = add("down", leaves, "uplink", up)
            if topo.tiers == 3:
                self.pod_nodes = self.leaf_nodes * topo.leaves_per_pod
                pods = -(-self.num_nodes // self.pod_nodes)
                pod_up = self.pod_nodes * node_gbps / topo.oversubscription
                self.pod_up0 = add("pod_up", pods, "uplink", pod_up)
                self.pod_down0 = add("pod_down", pods, "uplink", pod_up)
        self.names, self.kinds = names, kinds
        self.capacity = np.array(caps)
        self._parts: dict[bytes, list] = {}  # matrix_volumes' structure per group of ranks

    def nic_of(self, ranks: np.ndarray) -> np.ndarray:
        """The NIC (global index) each rank sends through (rail: local GPU -> NIC)."""
        node, local = np.divmod(ranks, self.gpn)
        return node * self.nics + local * self.nics // self.gpn

    # ---- routes ----------------------------------------------------------------------------
    def matrix_volumes(self, ranks: np.ndarray, send: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Link volumes of a batch of all-to-all-v send matrices ``send`` (B, n, n), bytes
        ``ranks[i] -> ranks[j]``: (links (k,), volumes (B, k))."""
        ranks = np.asarray(ranks)
        send = np.array(send, dtype=np.float64)
        n = len(ranks)
        send[:, np.arange(n), np.arange(n)] = 0.0
        parts: list[np.ndarray] = []
        links: list[np.ndarray] = []
        for mask, keep_inside, (tx_links, tx_sum), (rx_links, rx_sum) in self._matrix_parts(ranks):
            part = np.where(mask, send, 0.0) if keep_inside else np.where(mask, 0.0, send)
            parts.append(part.sum(axis=2) @ tx_sum)
            parts.append(part.sum(axis=1) @ rx_sum)
            links.extend((tx_links, rx_links))
        link = np.concatenate(links)
        volumes = np.concatenate(parts, axis=1)
        keep = volumes.max(axis=0) > 0
        return link[keep], volumes[:, keep]

    def _matrix_parts(self, ranks: np.ndarray) -> list:
        """Per kind of link a send matrix loads (NVLink inside a domain, NICs across
        domains, uplinks out of a leaf / pod group): the mask of its (sender, receiver) pairs,
        whether the pairs inside it (True) or outside it count, and for the senders (tx) and
        receivers (rx) the links and the 0/1 matrix summing per-rank bytes onto them. Cached
        per group of ranks (every layer's all-to-all of a group has the same structure)."""
        cache_key = ranks.tobytes()
        found = self._parts.get(cache_key)
        if found is not None:
            return found
        node = ranks // self.gpn
        dom = ranks // self.domain
        same = dom[:, None] == dom[None, :]
        nic = self.nic_of(ranks)
        found = [
            (same, True, self._by(ranks, self.nvl_tx0), self._by(ranks, self.nvl_rx0)),
            (same, False, self._by(nic, self.nic_tx0), self._by(nic, self.nic_rx0)),
        ]
        if self.leaf_nodes:
            leaf = node // self.leaf_nodes
            out = leaf[:, None] != leaf[None, :]
            found.append((out, True, self._by(leaf, self.up0), self._by(leaf, self.down0)))
        if self.pod_nodes:
            pod = node // self.pod_nodes
            out = pod[:, None] != pod[None, :]
            found.append((out, True, self._by(pod, self.pod_up0), self._by(pod, self.pod_down0)))
        self._parts[cache_key] = found
        return found

    @staticmethod
    def _by(key: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray]:
        """The links ``base + unique(key)`` and the (n, k) 0/1 matrix that sums per-rank
        values (B, n) onto them by ``key`` (n,)."""
        unique, inverse = np.unique(key, return_inverse=True)
        onehot = np.zeros((len(key), len(unique)))
        onehot[np.arange(len(key)), inverse] = 1.0
        return base + unique, onehot

    def group_volumes(
        self, ranks, intra_per_gpu: float, inter_per_gpu: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Link volumes of a collective whose every GPU sends ``intra_per_gpu`` bytes inside
        its NVLink domain and ``inter_per_gpu`` to other domains, spread evenly over them."""
        ranks = np.asarray(ranks)
        n = len(ranks)
        dom = ranks // self.domain
        send = np.zeros((n, n))
        same = dom[:, None] == dom[None, :]
        np.fill_diagonal(same, False)
        peers_in = same.sum(axis=1, keepdims=True)
        cross = dom[:, None] != dom[None, :]
        peers_out = cross.sum(axis=1, keepdims=True)
        send += np.where(same, intra_per_gpu / np.maximum(peers_in, 1), 0.0)
        send += np.where(cross, inter_per_gpu / np.maximum(peers_out, 1), 0.0)
        links, volumes = self.matrix_volumes(ranks, send[None])
        return links, volumes[0]

    def p2p_volumes(self, src: int, dst: int, nbytes: float) -> tuple[np.ndarray, np.ndarray]:
        """Link volumes of one send of ``nbytes`` from rank ``src`` to rank ``dst`` (the
        links ``matrix_volumes`` gives the 2 x 2 matrix of that send, in its order)."""
        if nbytes <= 0:
            return np.zeros(0, np.int64), np.zeros(0)
        if src // self.domain == dst // self.domain:
            links = [self.nvl_tx0 + src, self.nvl_rx0 + dst]
        else:
            nic_src, nic_dst = self.nic_of(np.array([src, dst])).tolist()
            links = [self.nic_tx0 + nic_src, self.nic_rx0 + nic_dst]
        node_src, node_dst = src // self.gpn, dst // self.gpn
        tiers = [(self.leaf_nodes, "up0", "down0"), (self.pod_nodes, "pod_up0", "pod_down0")]
        for size, up, down in tiers:  # leaving a leaf (pod) group: its uplinks
            if size and node_src // size != node_dst // size:
                links += [
                    getattr(self, up) + node_src // size,
                    getattr(self, down) + node_dst // size,
                ]
        return np.array(links, dtype=np.int64), np.full(len(links), float(nbytes))


class Network:
    """Flows recorded by the engine (first pass) or delays applied (second pass)."""

    def __init__(self, hw: HardwareSpec, world_size: int):
        self.hw = hw
        self.links = Links(hw, world_size)
        self.delays: dict[Any, np.ndarray] | None = None  # set: second pass
        self._calls: dict[Any, int] = defaultdict(int)
        self._cache: dict[Any, Any] = {}
        # flows (first pass)
        self._key: list[Any] = []
        self._batch: list[int] = []
        self._kind: list[str] = []
        self._start: list[np.ndarray] = []
        self._latency: list[np.ndarray] = []
        self._transfer: list[np.ndarray] = []
        self._lanes: list[np.ndarray] = []
        self._routes: list[Routes] = []  # per batch
        self.report: NetworkReport | None = None

    def next_key(self, *key: Any) -> tuple:
        """``key`` with a call counter: the n-th collective of a sequential stream."""
        count = self._calls[key]
        self._calls[key] += 1
        return (*key, count)

    # ---- the engine's hooks ----------------------------------------------------------------
    def flows(
        self,
        key: Any,
        kind: str,
        start_ms: np.ndarray,
        duration_ms: np.ndarray,
        latency_ms: np.ndarray,
        routes: list[tuple[np.ndarray, np.ndarray]] | Routes,
        lanes: np.ndarray,
    ) -> np.ndarray:
        """A batch of collectives (one flow each; ``routes``: one (links, bytes) pair per
        flow, or :class:`Routes`): record them (first pass) or return their durations
        lengthened by their delays (second pass)."""
        duration_ms = np.asarray(duration_ms, dtype=np.float64)
        if self.delays is not None:
            delay = self.delays.get(key)
            return duration_ms if delay is None else duration_ms + delay
        if not isinstance(routes, Routes):
            routes = Routes.of(routes)
        size = routes.size
        self._key.append(key)
        self._batch.append(size)
        self._kind.append(kind)
        self._start.append(_vector(start_ms, size))
        latency = _vector(latency_ms, size)
        self._latency.append(latency)
        self._transfer.append(np.maximum(duration_ms - latency, 0.0))
        self._lanes.append(_vector(lanes, size))
        self._routes.append(routes)
        return duration_ms

    def collective(
        self, key: Any, kind: str, op: str, size: float, ranks: list[int], start_ms: float,
        duration_ms: float, lanes: int,
    ) -> float:  # fmt: skip
        """One DP/EDP (or parameter) collective of the hierarchical algorithm."""
        if self.delays is not None:
            delay = self.delays.get(key)
            return duration_ms if delay is None else duration_ms + float(delay[0])
        route, latency = self._collective_route(op, size, ranks)
        return float(
            self.flows(key, kind, start_ms, np.array([duration_ms]), latency, [route], lanes)[0]
        )

    def _collective_route(self, op: str, size: float, ranks: list[int]):
        cache_key = (op, size, ranks[0], len(ranks))
        found = self._cache.get(cache_key)
        if found is None:
            hw, gpn = self.hw, self.hw.gpus_per_node
            cost = collective_cost(op, size, ranks, gpn, hw, "hierarchical")
            latency = collective_cost(op, 0.0, ranks, gpn, hw, "hierarchical").time_ms
            intra = cost.bytes_per_gpu - cost.inter_node_bytes_per_gpu
            route = self.links.group_volumes(ranks, intra, cost.inter_node_bytes_per_gpu)
            found = self._cache[cache_key] = (route, latency)
        return found

    def sends(
        self, key: Any, pairs: list[list[int]], nbytes: np.ndarray, start_ms: np.ndarray,
        duration_ms: np.ndarray,
    ) -> np.ndarray:  # fmt: skip
        """Pipeline sends, one per lane (``pairs`` = [src, dst] first ranks)."""
        if self.delays is not None:
            return self.flows(key, "pp_send", start_ms, duration_ms, 0.0, [], 1)
        nbytes = np.broadcast_to(np.asarray(nbytes, np.float64), (len(pairs),))
        unit, latency = self._send_routes(pairs)
        routes = Routes(unit.link, unit.volume * np.repeat(nbytes, unit.count), unit.count)
        return self.flows(key, "pp_send", start_ms, duration_ms, latency, routes, 1)

    def _send_routes(self, pairs: list[list[int]]) -> tuple[Routes, np.ndarray]:
        """The routes of one byte sent between each pair, and each send's fixed time (ms);
        cached by the pairs."""
        cache_key = ("p2p", tuple(map(tuple, pairs)))
        found = self._cache.get(cache_key)
        if found is None:
            routes, latency = [], []
            for src, dst in pairs:
                routes.append(self.links.p2p_volumes(src, dst, 1.0))
                latency.append(p2p_link([src, dst], self.hw.gpus_per_node, self.hw).latency_us)
            found = self._cache[cache_key] = (Routes.of(routes), np.array(latency) * 1e-3)
        return found

    # ---- solving -----------------------------------------------------------------------------
    def solve(self, lanes_total: int, iteration_ms: float) -> NetworkReport:
        """Solve the recorded flows; keep each batch's delays for the second pass."""
        starts = np.concatenate(self._start) if self._start else np.zeros(0)
        latency = np.concatenate(self._latency) if self._latency else np.zeros(0)
        transfer = np.concatenate(self._transfer) if self._transfer else np.zeros(0)
        lanes = np.concatenate(self._lanes) if self._lanes else np.zeros(0)
        cap = self.links.capacity
        routes = self._routes
        counts = np.concatenate([r.count for r in routes]) if routes else np.zeros(0, np.int64)
        ptr = np.r_[0, np.cumsum(counts)]
        link = np.concatenate([r.link for r in routes]) if routes else np.zeros(0, np.int64)
        raw = np.concatenate([r.volume for r in routes]) if routes else np.zeros(0)
        entry_flow = np.repeat(np.arange(len(counts)), counts)
        # scale every flow so that alone it saturates its bottleneck NVLink port or NIC in
        # its alpha-beta transfer time; uplinks (which costs.comm does not know) may bind more
        need = raw / cap[link]
        port = np.array([k != "uplink" for k in self.links.kinds], dtype=bool)[link]
        bottleneck = flow_max(ptr, np.where(port, need, 0.0))
        ok = bottleneck > 0
        scale = np.where(ok, transfer / np.where(ok, bottleneck, 1.0), 0.0)
        volume = raw * scale[entry_flow]
        t0 = starts + latency
        flow_set = FlowSet(t0, transfer, ptr, link, volume, cap)
        end = solve(flow_set)
        delay = end - (t0 + transfer)
        delay[delay <= 1e-9 * (t0 + transfer)] = 0.0  # rounding, not sharing
        self.delays = {}
        pos = 0
        for key, size in zip(self._key, self._batch, strict=True):
            self.delays[key] = delay[pos : pos + size]
            pos += size
        self.report = NetworkReport.build(
            self.links, self._kind, self._batch, t0, end, delay, lanes, lanes_total,
            link, raw, ptr, need, iteration_ms, flow_set.entry_order(),
        )  # fmt: skip
        return self.report


@dataclass
class NetworkReport:
    """The iteration on the links: contention per collective kind and per link."""

    contention_ms: float  # lane-mean time collectives lost to sharing
    by_kind_ms: dict[str, float]
    links: list[LinkReport]

    @classmethod
    def build(
        cls, links: Links, kinds, batches, t0, end, delay, lanes, lanes_total, link, raw,
        ptr, need, iteration_ms, order=None,
    ) -> NetworkReport:  # fmt: skip
        """Aggregate solved flows per kind and per link (flow ``f``'s entries: ``ptr[f]:
        ptr[f+1]`` of ``link``, ``raw``, ``need``; ``order``: the entries by link, then
        start, when known)."""
        entry_flow = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
        kind_code = np.array([KINDS.index(k) for k in kinds], dtype=np.int64)
        flow_kind = np.repeat(kind_code, batches) if kinds else np.zeros(0, dtype=np.int64)
        lane_delay = delay * lanes / max(lanes_total, 1)
        per_kind = np.bincount(flow_kind, weights=lane_delay, minlength=len(KINDS))
        by_kind = {k: float(per_kind[i]) for i, k in enumerate(KINDS)}
        num_links = len(links.names)
        bytes_per_link = np.bincount(link, weights=raw, minlength=num_links)
        # each flow's delay is charged to its bottleneck link (largest alone time)
        tightest = flow_max(ptr, need)
        at_max = np.flatnonzero(need >= tightest[entry_flow])  # entries in flow order
        at_flow = entry_flow[at_max]  # non-decreasing: each flow's first entry at its max
        first = np.flatnonzero(np.r_[True, at_flow[1:] != at_flow[:-1]]) if len(at_flow) else at_max
        bottleneck = np.full(len(delay), -1)
        bottleneck[at_flow[first]] = link[at_max[first]]
        has = bottleneck >= 0
        contention = np.bincount(bottleneck[has], weights=delay[has], minlength=num_links)
        out = []
        # every link's flows by start (ties in entry order): each link's union in one pass
        if order is None:
            order = by_link_then_start(ptr, link, t0, num_links)
        intervals, bounds = _unions_by_link(link[order], entry_flow[order], t0, end, num_links)
        used = np.flatnonzero(bytes_per_link > 0)
        for ln in used.tolist():
            busy_intervals = intervals[bounds[ln] : bounds[ln + 1]]
            busy = float((busy_intervals[:, 1] - busy_intervals[:, 0]).sum())
            out.append(
                LinkReport(
                    links.names[ln],
                    links.kinds[ln],
                    float(bytes_per_link[ln]),
                    busy,
                    float(contention[ln]),
                    busy_intervals,
                )  # fmt: skip
            )
        del iteration_ms
        return cls(float(lane_delay.sum()), by_kind, out)

    def links_dicts(self, iteration_ms: float) -> list[dict[str, Any]]:
        """The ``links`` list of ``analyze --json``: most contended first, then busiest."""
        rows = [
            {
                "link": r.name,
                "kind": r.kind,
                "bytes": r.bytes,
                "busy_pct": 100.0 * r.busy_ms / iteration_ms if iteration_ms > 0 else 0.0,
                "contention_ms": r.contention_ms,
            }
            for r in self.links
        ]
        rows.sort(key=lambda d: (-d["contention_ms"], -d["busy_pct"], d["link"]))
        return rows


def _vector(value, size: int) -> np.ndarray:
    """``value`` (a scalar or an array of ``size``) as a float64 array of ``size``."""
    if np.ndim(value) == 0:
        return np.full(size, float(value))
    return np.array(value, dtype=np.float64)


def _unions_by_link(
    link_s: np.ndarray, flow_s: np.ndarray, start: np.ndarray, end: np.ndarray, num_links: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every link's busy time as a union of intervals: entries given by link, then start
    (``link_s``, and the flow of each, ``flow_s``; flow ``f`` busy from ``start[f]`` to
    ``end[f]``). Returns the (k, 2) intervals, sorted by link then start, and where each
    link's begin (``bounds[l]:bounds[l+1]``, (num_links + 1,)).

    One pass over all entries: a new interval begins where a link begins or an entry starts
    after every earlier entry of its link has ended (the running maximum of the ends within
    the link, taken exactly on the ends' ranks)."""
    n = len(link_s)
    if n == 0:
        return np.zeros((0, 2)), np.zeros(num_links + 1, dtype=np.int64)
    by_end = np.argsort(end, kind="stable")
    rank = np.empty(len(end), dtype=np.int64)
    rank[by_end] = np.arange(len(end))
    new_link = np.r_[True, link_s[1:] != link_s[:-1]]
    offset = (np.cumsum(new_link) - 1) * len(end)  # each link above every earlier one
    run_end = end[by_end][np.maximum.accumulate(rank[flow_s] + offset) - offset]
    start_s = start[flow_s]
    new = new_link
    new[1:] |= start_s[1:] > run_end[:-1]
    first = np.flatnonzero(new)
    stops = run_end[np.r_[first[1:] - 1, n - 1]]
    intervals = np.stack([start_s[first], stops], axis=1)
    return intervals, np.searchsorted(link_s[first], np.arange(num_links + 1))

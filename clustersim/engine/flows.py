"""Fluid flows over shared links, max-min fair: when does each transfer end?

A *flow* is one collective's (or send's) transfer: it starts at ``start_ms`` and puts
``volume[f, l]`` bytes on each link ``l`` of its route (a list of (link, bytes) pairs, CSR).
Link ``l`` carries ``capacity[l]`` bytes/ms. A flow's progress rate is ``p`` (fraction of its
transfer per ms); on link ``l`` it uses ``p * volume[f, l]`` bytes/ms. Alone, a flow runs at
most ``1 / transfer_ms`` (its own alpha-beta speed); the caller scales volumes so that this
saturates its bottleneck port (``max_l volume / capacity == transfer_ms`` over the links that
speed knows of), and a flow alone ends exactly at ``start + transfer_ms`` -- or later, when
another link of its route (an oversubscribed uplink) cannot carry it at that speed.

Sharing: at every flow start and end, rates are re-solved by progressive filling (max-min
fairness) on ``x = p * W`` with ``W`` the flow's largest link volume, i.e. on the byte rate on
its heaviest link; for a plain flow (the same bytes on every link of a path) this is the
textbook max-min fair rate allocation, for a collective its heaviest link's byte rate. Rates
then stay constant until the next start or end: one rate change per event on the flows of
the component it touches, never per packet.

Speed: flows whose alone interval overlaps no other flow on any link cannot be slowed; they
are settled in one vectorised pass. The event loop runs only over the others, and re-solves
only the connected component (flows linked through shared links) of the flow that starts or
ends; if settling them made a flow overlap a flow settled alone, that flow joins and the loop
runs again (rarely more than twice).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

EPS = 1e-12


@dataclass
class FlowSet:
    """Flows in CSR form: flow ``f`` uses links ``link[ptr[f]:ptr[f+1]]`` with ``volume``
    bytes each; ``capacity[l]`` is link ``l``'s bytes per ms."""

    start_ms: np.ndarray
    transfer_ms: np.ndarray
    ptr: np.ndarray
    link: np.ndarray
    volume: np.ndarray
    capacity: np.ndarray

    @property
    def size(self) -> int:
        """Number of flows."""
        return len(self.start_ms)

    def flow_of_entry(self) -> np.ndarray:
        """The flow of every (flow, link) entry."""
        return np.repeat(np.arange(self.size), np.diff(self.ptr))


def max_min_rates(weights: np.ndarray, caps: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Max-min fair levels ``x`` (progressive filling) for flows with ``weights[f, l]`` (link
    use per unit of ``x``), ``x[f] <= caps[f]`` and ``sum_f weights[f, l] x[f] <=
    capacity[l]``."""
    num_flows = weights.shape[0]
    x = np.zeros(num_flows)
    free = np.ones(num_flows, dtype=bool)
    residual = capacity.astype(np.float64).copy()
    while free.any():
        demand = weights[free].sum(axis=0)  # per link, per unit of level
        used = demand > EPS
        link_level = np.full(len(capacity), np.inf)
        link_level[used] = residual[used] / demand[used]
        level = min(float(link_level.min()), float(caps[free].min()))
        level = max(level, 0.0)
        # every free flow rises to ``level``; freeze those at their cap or on a full link
        x[free] = level
        saturated = used & (link_level <= level * (1 + 1e-9) + EPS)
        frozen = free & (
            (caps <= level * (1 + 1e-9) + EPS) | (weights[:, saturated] > EPS).any(axis=1)
        )
        if not frozen.any():  # numerical safety: freeze the tightest flow
            frozen = free & (caps == caps[free].min())
        residual -= weights[frozen & free].T @ x[frozen & free]
        residual = np.maximum(residual, 0.0)
        free &= ~frozen
    return x


def solve(flows: FlowSet) -> np.ndarray:
    """End time (ms) of every flow's transfer under max-min fair sharing of the links."""
    start, transfer = flows.start_ms, flows.transfer_ms
    if flows.size == 0:
        return start + transfer
    # alone: at its own rate, or slower where a link of its route cannot carry that
    need = np.zeros(flows.size)
    np.maximum.at(need, flows.flow_of_entry(), flows.volume / flows.capacity[flows.link])
    slower = need > transfer * (1 + 1e-9)  # not a rounding error of the caller's scaling
    end = start + np.where(transfer > 0, np.where(slower, need, transfer), 0.0)
    busy = (transfer > 0) & (np.diff(flows.ptr) > 0)
    index = _LinkIndex(flows, end)
    contended = index.overlapping() & busy
    while contended.any():
        before = end.copy()
        end[contended] = _event_loop(flows, np.flatnonzero(contended))
        # a delayed flow may now overlap a flow that was settled alone: solve again with it
        grown = (index.reached(before, end) & busy) | contended
        if (grown == contended).all():
            break
        contended = grown
    return end


class _LinkIndex:
    """Every (flow, link) entry sorted by link, then start: who overlaps whom."""

    def __init__(self, flows: FlowSet, end: np.ndarray):
        entry_flow = flows.flow_of_entry()
        start = flows.start_ms[entry_flow]
        order = np.lexsort((start, flows.link))
        self.size = flows.size
        self.link = flows.link[order]
        self.start = start[order]
        self.flow = entry_flow[order]
        self.stop = end[self.flow]
        self.starts = flows.start_ms

    def overlapping(self) -> np.ndarray:
        """Flows whose interval overlaps another flow's on a shared link."""
        link_s, start_s, stop_s = self.link, self.start, self.stop
        out = np.zeros(self.size, dtype=bool)
        if len(link_s) < 2:
            return out
        new_link = np.r_[True, link_s[1:] != link_s[:-1]]
        seg = np.cumsum(new_link) - 1
        run_max = _segmented_cummax(stop_s, seg)
        prev_max = np.r_[-np.inf, run_max[:-1]]
        prev_max[new_link] = -np.inf
        hit = start_s < prev_max - EPS
        # mark both sides: each entry against the next start of its link
        next_start = np.r_[start_s[1:], np.inf]
        next_start[np.r_[link_s[1:] != link_s[:-1], True]] = np.inf
        hit |= next_start < stop_s - EPS
        out[self.flow[hit]] = True
        return out

    def reached(self, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        """Flows starting, on a link of a flow whose end moved from ``before`` to ``after``,
        inside the added stretch (they now overlap it)."""
        out = np.zeros(self.size, dtype=bool)
        moved = np.flatnonzero(after > before + EPS)
        if not len(moved):
            return out
        mine = np.isin(self.flow, moved)
        links, lo, hi = self.link[mine], before[self.flow[mine]], after[self.flow[mine]]
        # entries sorted by (link, start): the range of each link's starts in [lo, hi)
        key = self.link.astype(np.float64)
        span = float(np.abs(self.start).max(initial=1.0)) * 4 + 1.0
        sorted_key = key * span + self.start
        first = np.searchsorted(sorted_key, links * span + lo - EPS, side="left")
        last = np.searchsorted(sorted_key, links * span + hi - EPS, side="left")
        for a, b in zip(first.tolist(), last.tolist(), strict=True):
            if b > a:
                out[self.flow[a:b]] = True
        out[moved] = True
        return out


def _segmented_cummax(values: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Cumulative max of ``values`` restarting at every new segment id (segments sorted)."""
    # shift each segment above all earlier ones so one global cummax respects segments
    span = float(np.max(np.abs(values[np.isfinite(values)]), initial=1.0)) * 4 + 1.0
    shifted = values + seg * span
    return np.maximum.accumulate(shifted) - seg * span


def _event_loop(flows: FlowSet, members: np.ndarray) -> np.ndarray:
    """Max-min fair fluid simulation of ``members`` only; returns their end times."""
    ptr, links, volume, capacity = flows.ptr, flows.link, flows.volume, flows.capacity
    starts = flows.start_ms[members]
    transfer = flows.transfer_ms[members]
    n = len(members)
    routes = [(links[ptr[f] : ptr[f + 1]], volume[ptr[f] : ptr[f + 1]]) for f in members.tolist()]
    heaviest = np.array([float(v.max()) for _, v in routes])
    caps = heaviest / transfer  # bytes/ms on the heaviest link, alone
    remaining = np.ones(n)  # fraction of the transfer left
    rate = np.zeros(n)  # fraction per ms
    updated = np.zeros(n)  # time ``remaining`` was last brought up to date
    version = np.zeros(n, dtype=np.int64)
    end = np.full(n, np.nan)
    on_link: dict[int, set[int]] = {}
    order = np.argsort(starts, kind="stable")
    next_start = 0
    heap: list[tuple[float, int, int]] = []  # (end time, version, flow)

    def component(seed: list[int]) -> list[int]:
        seen, stack = set(seed), list(seed)
        while stack:
            f = stack.pop()
            for ln in routes[f][0].tolist():
                for g in on_link[ln]:
                    if g not in seen:
                        seen.add(g)
                        stack.append(g)
        return sorted(seen)

    def resolve(now: float, seed: list[int]) -> None:
        group = component(seed)
        if not group:
            return
        idx = np.array(group)
        for f in group:  # bring progress up to date at the old rates
            remaining[f] -= rate[f] * (now - updated[f])
            updated[f] = now
        used = sorted({ln for f in group for ln in routes[f][0].tolist()})
        column = {ln: j for j, ln in enumerate(used)}
        weights = np.zeros((len(group), len(used)))
        for i, f in enumerate(group):
            ls, vs = routes[f]
            weights[i, [column[ln] for ln in ls.tolist()]] = vs / heaviest[f]
        x = max_min_rates(weights, caps[idx], capacity[used])
        rate[idx] = x / heaviest[idx]
        for f in group:
            version[f] += 1
            left = max(remaining[f], 0.0)
            heapq.heappush(heap, (now + left / rate[f], int(version[f]), f))

    while next_start < n or heap:
        t_start = starts[order[next_start]] if next_start < n else np.inf
        while heap and heap[0][1] != version[heap[0][2]]:
            heapq.heappop(heap)  # stale
        t_end = heap[0][0] if heap else np.inf
        if t_end <= t_start:
            now = t_end
            done = []
            while heap and heap[0][0] <= now + EPS:
                t, ver, f = heapq.heappop(heap)
                if ver != version[f]:
                    continue
                end[f] = t
                version[f] += 1
                done.append(f)
            neighbours = set()
            for f in done:
                for ln in routes[f][0].tolist():
                    on_link[ln].discard(f)
                    neighbours |= on_link[ln]
            if neighbours:
                resolve(now, sorted(neighbours))
        else:
            now = t_start
            new = []
            while next_start < n and starts[order[next_start]] <= now:
                f = int(order[next_start])
                next_start += 1
                updated[f] = now
                for ln in routes[f][0].tolist():
                    on_link.setdefault(ln, set()).add(f)
                new.append(f)
            resolve(now, new)
    return end

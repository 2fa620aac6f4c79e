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
runs again (rarely more than twice). A component's max-min levels come from a numba kernel
(``engine.flow_kernels.max_min_group``) working on the CSR arrays directly; ``max_min_rates``
below is its dense reference (tests hold the two equal).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

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
    _order: np.ndarray | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        """Number of flows."""
        return len(self.start_ms)

    def entry_order(self) -> np.ndarray:
        """The entries by link, then their flow's start, ties in entry order
        (:func:`by_link_then_start`; computed once, for the solver and the link report)."""
        if self._order is None:
            self._order = by_link_then_start(self.ptr, self.link, self.start_ms, len(self.capacity))
        return self._order

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


def solve(flows: FlowSet, compiled: bool = True) -> np.ndarray:
    """End time (ms) of every flow's transfer under max-min fair sharing of the links.
    ``compiled``: the event loop's numba version (False: the Python reference, same
    results)."""
    start, transfer = flows.start_ms, flows.transfer_ms
    if flows.size == 0:
        return start + transfer
    # alone: at its own rate, or slower where a link of its route cannot carry that
    need = flow_max(flows.ptr, flows.volume / flows.capacity[flows.link])
    slower = need > transfer * (1 + 1e-9)  # not a rounding error of the caller's scaling
    end = start + np.where(transfer > 0, np.where(slower, need, transfer), 0.0)
    busy = (transfer > 0) & (np.diff(flows.ptr) > 0)
    index = _LinkIndex(flows, end)
    contended = index.overlapping() & busy
    if contended.any():
        # flows settled alone that a delayed flow may still reach: by link, then start
        passive = (busy & ~contended)[index.flow]
        settled = (index.link[passive], index.start[passive], index.flow[passive])
        loop = _event_loop_compiled if compiled else _event_loop
        loop(flows, np.flatnonzero(contended), end, settled)
    return end


def _event_loop_compiled(flows: FlowSet, members: np.ndarray, end: np.ndarray, passive) -> None:
    """``_event_loop`` run by its numba version (``engine.flow_kernels.event_loop``)."""
    from clustersim.engine import flow_kernels as kernels  # numba: imported when needed

    ptr, volume, transfer = flows.ptr, flows.volume, flows.transfer_ms
    counts = np.diff(ptr)
    heaviest = flow_max(ptr, volume)
    unit = volume / np.repeat(np.where(heaviest > 0, heaviest, 1.0), counts)
    caps = np.where(transfer > 0, heaviest / np.where(transfer > 0, transfer, 1.0), 0.0)
    passive_link, passive_start, passive_flow = passive
    horizon = float(passive_start.max(initial=0.0)) + 1.0
    passive_key = passive_link + _fraction(passive_start, horizon)
    kernels.event_loop(
        np.sort(members).astype(np.int64), _as(ptr, np.int64), _as(flows.link, np.int64),
        volume, unit, heaviest, caps, _as(flows.capacity, np.float64),
        _as(flows.start_ms, np.float64), passive_key, _as(passive_flow, np.int64), horizon,
        end,
    )  # fmt: skip


def _as(values: np.ndarray, dtype) -> np.ndarray:
    """``values`` as a C-contiguous array of ``dtype`` (no copy when it already is one: the
    kernels only read it)."""
    return np.ascontiguousarray(values, dtype=dtype)


def by_link_then_start(
    ptr: np.ndarray, link: np.ndarray, start_ms: np.ndarray, num_links: int
) -> np.ndarray:
    """Order of CSR entries (flow ``f``: ``ptr[f]:ptr[f+1]``) by link, then their flow's
    start, ties in entry order: ``np.lexsort((start_ms[flow], link))`` in two cheap passes
    (flows by start, then a stable sort by link: a radix sort when link ids fit 16 bits)."""
    counts = np.diff(ptr)
    by_start = np.argsort(start_ms, kind="stable")
    # the entries of the flows in start order (each flow's entries stay in entry order)
    first = ptr[:-1][by_start]
    lengths = counts[by_start]
    offsets = np.arange(len(link)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    entries = np.repeat(first, lengths) + offsets
    keys = link[entries]
    if num_links < 2**15:
        keys = keys.astype(np.int16)
    return entries[np.argsort(keys, kind="stable")]


def flow_max(ptr: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per flow, the largest of its entries' non-negative ``values`` (0 for a flow without
    entries): ``np.maximum.at`` over the CSR rows, by ``reduceat``."""
    counts = np.diff(ptr)
    out = np.zeros(len(counts))
    has = counts > 0
    if has.any():
        out[has] = np.maximum.reduceat(values, ptr[:-1][has])
    return np.maximum(out, 0.0)


class _LinkIndex:
    """Every (flow, link) entry sorted by link, then start: who overlaps whom."""

    def __init__(self, flows: FlowSet, end: np.ndarray):
        self.size = flows.size
        order = flows.entry_order()
        self.link = flows.link[order]
        self.flow = flows.flow_of_entry()[order]
        self.start = flows.start_ms[self.flow]
        self.stop = end[self.flow]

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


def _fraction(t, horizon: float):
    """Times in [0, horizon) mapped into [0, 1); later times to just below 1."""
    return np.clip(np.asarray(t, dtype=np.float64), 0.0, horizon * (1 - 1e-12)) / horizon


def _segmented_cummax(values: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Cumulative max of ``values`` restarting at every new segment id (segments sorted)."""
    # shift each segment above all earlier ones so one global cummax respects segments
    span = float(np.max(np.abs(values[np.isfinite(values)]), initial=1.0)) * 4 + 1.0
    shifted = values + seg * span
    return np.maximum.accumulate(shifted) - seg * span


def _event_loop(flows: FlowSet, members: np.ndarray, end: np.ndarray, passive) -> None:
    """Max-min fair fluid simulation of ``members`` and of every flow settled alone that one of
    them reaches once delayed (``passive``: links, starts and flows of the settled flows'
    entries, sorted by link, then start);
    writes their end times into ``end``.

    A flow settled alone overlaps no other flow's alone interval, so it can only be reached by
    a flow that is running late: whenever a running flow's projected end moves on, the
    settled flows starting on its links before that end are queued, and at its start such a
    flow joins if one of its links is busy (else it keeps its alone end)."""
    from clustersim.engine import flow_kernels as kernels  # numba: imported when needed

    ptr, links, volume, capacity = flows.ptr, flows.link, flows.volume, flows.capacity
    start_ms, transfer = flows.start_ms, flows.transfer_ms
    # per flow: its largest link volume and its cap on that scale; per entry: link use per
    # unit of that scale (the weights of max_min_rates)
    counts = np.diff(ptr)
    heaviest_all = np.zeros(flows.size)
    has = counts > 0
    heaviest_all[has] = np.maximum.reduceat(volume, ptr[:-1][has]) if has.any() else 0.0
    safe = np.where(heaviest_all > 0, heaviest_all, 1.0)
    unit = volume / np.repeat(safe, counts)
    caps_all = np.where(transfer > 0, heaviest_all / np.where(transfer > 0, transfer, 1.0), 0.0)
    local_of = np.full(len(capacity), -1, dtype=np.int64)
    passive_link, passive_start, passive_flow = passive
    # one sorted key for (link, start): link + start / horizon, the starts all below horizon
    horizon = float(passive_start.max(initial=0.0)) + 1.0
    passive_key = passive_link + _fraction(passive_start, horizon)
    routes: dict[int, tuple[list[int], np.ndarray, float, np.ndarray]] = {}
    remaining: dict[int, float] = {}  # fraction of the transfer left
    rate: dict[int, float] = {}  # fraction per ms
    updated: dict[int, float] = {}  # time ``remaining`` was last brought up to date
    version: dict[int, int] = {}
    checked: dict[int, float] = {}  # passive flows on this flow's links queued up to then
    on_link: dict[int, set[int]] = {}
    member = set(members.tolist())
    queued = set(member)
    start_list = start_ms.tolist()
    starts = [(start_list[f], f) for f in member]
    heapq.heapify(starts)
    heap: list[tuple[float, int, int]] = []  # (end time, version, flow)

    def route(f: int) -> tuple[list[int], np.ndarray, float, np.ndarray]:
        found = routes.get(f)
        if found is None:
            ls, vs = links[ptr[f] : ptr[f + 1]], volume[ptr[f] : ptr[f + 1]]
            found = routes[f] = (ls.tolist(), vs, float(vs.max()), ls)
        return found

    top = horizon * (1 - 1e-12)

    def fraction(t: float) -> float:  # _fraction of one time, without numpy's overhead
        return (t if 0.0 <= t <= top else (0.0 if t < 0.0 else top)) / horizon

    def lookahead(f: int, until: float) -> None:
        lo = checked.get(f, start_list[f])
        if until <= lo:
            return
        checked[f] = until
        ls = routes[f][3]
        keys = np.concatenate((ls + fraction(lo - EPS), ls + fraction(until - EPS)))
        bounds = np.searchsorted(passive_key, keys).tolist()
        half = len(ls)
        found = [g for a, b in zip(bounds[:half], bounds[half:], strict=True) if b > a
                 for g in passive_flow[a:b].tolist()]  # fmt: skip
        for g in found:
            if g not in queued:
                queued.add(g)
                heapq.heappush(starts, (start_list[g], g))

    def component(seed: list[int]) -> list[int]:
        seen, stack = set(seed), list(seed)
        while stack:
            f = stack.pop()
            for ln in routes[f][0]:
                for g in on_link[ln]:
                    if g not in seen:
                        seen.add(g)
                        stack.append(g)
        return sorted(seen)

    def resolve(now: float, seed: list[int]) -> None:
        group = component(seed)
        if not group:
            return
        for f in group:  # bring progress up to date at the old rates
            remaining[f] -= rate[f] * (now - updated[f])
            updated[f] = now
        members_of = np.array(group, dtype=np.int64)
        heaviest = heaviest_all[members_of]
        if len(group) == 1 and all(len(on_link[ln]) == 1 for ln in routes[group[0]][0]):
            _, vs, _, ls = routes[group[0]]  # alone: its own speed, or its tightest link's
            alone = float((capacity[ls] / (vs / heaviest[0])).min())
            x = np.array([min(caps_all[group[0]], alone)])
        else:
            x = np.empty(len(group))
            kernels.max_min_group(members_of, ptr, links, unit, caps_all, capacity, local_of, x)
        for f, level, scale in zip(group, x.tolist(), heaviest.tolist(), strict=True):
            rate[f] = level / scale
            version[f] += 1
            finish = now + max(remaining[f], 0.0) / rate[f]
            heapq.heappush(heap, (finish, version[f], f))
            lookahead(f, finish)

    while starts or heap:
        t_start = starts[0][0] if starts else np.inf
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
            neighbours: set[int] = set()
            for f in done:
                for ln in routes[f][0]:
                    on_link[ln].discard(f)
                    neighbours |= on_link[ln]
            if neighbours:
                resolve(now, sorted(neighbours))
        else:
            now = t_start
            new = []
            while starts and starts[0][0] <= now:
                _, f = heapq.heappop(starts)
                ls = route(f)[0]
                if f not in member and not any(on_link.get(ln) for ln in ls):
                    continue  # settled alone: nobody on its links when it starts
                remaining[f], rate[f], updated[f], version[f] = 1.0, 0.0, now, 0
                for ln in ls:
                    on_link.setdefault(ln, set()).add(f)
                new.append(f)
            if new:
                resolve(now, new)

"""Numba kernel of the flow solver (``engine.flows``): max-min fair levels of one connected
group of flows, straight from the flow set's CSR arrays.

``engine.flows.max_min_rates`` is the reference (dense weights, numpy); this kernel runs the
same progressive filling on the group's (flow, link) entries without building the dense
matrix: links are numbered locally through a scratch map (``local_of`` over all links, -1
outside a call, restored on return). Per round the free flows' demand per link is summed in
flow order, every free flow rises to the lowest link level or cap, and flows at their cap or
on a saturated link freeze; their use leaves the links' residual capacity. Sums run in a
fixed order, so results are deterministic; they agree with the reference to rounding (the
reference subtracts a frozen set's use through one matrix product).

Imported by ``engine.flows`` inside the function that needs it, so importing the engine never
imports numba.
"""

from __future__ import annotations

import heapq

import numpy as np
from numba import njit

EPS = 1e-12
TOL = 1e-9


@njit(cache=True)
def max_min_group(group, ptr, link, unit, caps, capacity, local_of, out):  # noqa: PLR0912
    """Max-min fair levels of the flows ``group`` (sorted flow ids) into ``out``: flow ``f``
    puts ``unit[e] * level`` on link ``link[e]`` for its entries ``e`` in
    ``ptr[f]:ptr[f+1]``, its level at most ``caps[f]``, links at most ``capacity``."""
    m = group.shape[0]
    count = 0
    for i in range(m):
        f = group[i]
        count += ptr[f + 1] - ptr[f]
    used = np.empty(count, dtype=np.int64)  # global ids of the group's links
    col = np.empty(count, dtype=np.int64)  # local link of each entry
    row_start = np.empty(m + 1, dtype=np.int64)
    n_links = 0
    k = 0
    for i in range(m):
        f = group[i]
        row_start[i] = k
        for e in range(ptr[f], ptr[f + 1]):
            ln = link[e]
            if local_of[ln] < 0:
                local_of[ln] = n_links
                used[n_links] = ln
                n_links += 1
            col[k] = local_of[ln]
            k += 1
    row_start[m] = k
    residual = np.empty(n_links)
    for j in range(n_links):
        residual[j] = capacity[used[j]]
    demand = np.empty(n_links)
    link_level = np.empty(n_links)
    saturated = np.zeros(n_links, dtype=np.bool_)
    free = np.ones(m, dtype=np.bool_)
    frozen = np.zeros(m, dtype=np.bool_)
    left = m
    while left > 0:
        demand[:n_links] = 0.0
        for i in range(m):
            if free[i]:
                f = group[i]
                base = ptr[f] - row_start[i]
                for k in range(row_start[i], row_start[i + 1]):
                    demand[col[k]] += unit[base + k]
        level = np.inf
        for j in range(n_links):
            if demand[j] > EPS:
                link_level[j] = residual[j] / demand[j]
                if link_level[j] < level:
                    level = link_level[j]
            else:
                link_level[j] = np.inf
        min_cap = np.inf
        for i in range(m):
            if free[i] and caps[group[i]] < min_cap:
                min_cap = caps[group[i]]
        if min_cap < level:
            level = min_cap
        if level < 0.0:
            level = 0.0
        bound = level * (1 + TOL) + EPS
        for j in range(n_links):
            saturated[j] = demand[j] > EPS and link_level[j] <= bound
        any_frozen = False
        for i in range(m):
            frozen[i] = False
            if not free[i]:
                continue
            out[i] = level
            f = group[i]
            if caps[f] <= bound:
                frozen[i] = True
            else:
                base = ptr[f] - row_start[i]
                for k in range(row_start[i], row_start[i + 1]):
                    if saturated[col[k]] and unit[base + k] > EPS:
                        frozen[i] = True
                        break
            any_frozen = any_frozen or frozen[i]
        if not any_frozen:  # numerical safety: freeze the tightest flow
            for i in range(m):
                if free[i] and caps[group[i]] == min_cap:
                    frozen[i] = True
        for i in range(m):
            if frozen[i]:
                f = group[i]
                base = ptr[f] - row_start[i]
                for k in range(row_start[i], row_start[i + 1]):
                    residual[col[k]] -= unit[base + k] * out[i]
                free[i] = False
                left -= 1
        for j in range(n_links):
            if residual[j] < 0.0:
                residual[j] = 0.0
    for j in range(n_links):
        local_of[used[j]] = -1


@njit(cache=True)
def _add_member(slots, counts, ln, f):
    """Put flow ``f`` on link ``ln`` (its member list, grown when full)."""
    if counts[ln] == slots.shape[1]:
        bigger = np.full((slots.shape[0], 2 * slots.shape[1]), -1, dtype=np.int64)
        bigger[:, : slots.shape[1]] = slots
        slots = bigger
    slots[ln, counts[ln]] = f
    counts[ln] += 1
    return slots


@njit(cache=True)
def _remove_member(slots, counts, ln, f):
    """Take flow ``f`` off link ``ln`` (order of the rest is irrelevant: users sort)."""
    last = counts[ln] - 1
    for k in range(counts[ln]):
        if slots[ln, k] == f:
            slots[ln, k] = slots[ln, last]
            slots[ln, last] = -1
            counts[ln] = last
            return


@njit(cache=True)
def event_loop(  # noqa: PLR0912, PLR0915
    members, ptr, link, volume, unit, heaviest, caps, capacity, start_ms,
    passive_key, passive_flow, horizon, end,
):  # fmt: skip
    """``engine.flows._event_loop`` compiled: the max-min fair fluid simulation of the
    contended flows ``members`` (sorted) and of the settled flows they reach (``passive_key``
    = link + start / horizon of the settled flows' entries, sorted; ``passive_flow`` their
    flows); writes end times into ``end``. Same events in the same order as the Python
    version: flows start at their start, every start and end re-solves the connected flows
    (``max_min_group``), a running flow's projected end queues the settled flows starting on
    its links before it (lookahead)."""
    n_flows = start_ms.shape[0]
    n_links = capacity.shape[0]
    remaining = np.zeros(n_flows)
    rate = np.zeros(n_flows)
    updated = np.zeros(n_flows)
    version = np.zeros(n_flows, dtype=np.int64)
    checked = start_ms.copy()
    is_member = np.zeros(n_flows, dtype=np.bool_)
    queued = np.zeros(n_flows, dtype=np.bool_)
    seen = np.zeros(n_flows, dtype=np.int64)  # stamp of the last component search
    stamp = 0
    slots = np.full((n_links, 8), -1, dtype=np.int64)
    counts = np.zeros(n_links, dtype=np.int64)
    local_of = np.full(n_links, -1, dtype=np.int64)
    top = horizon * (1 - 1e-12)
    starts = [(0.0, np.int64(0))]
    starts.pop()
    for i in range(members.shape[0]):
        f = members[i]
        is_member[f] = True
        queued[f] = True
        starts.append((start_ms[f], f))
    heapq.heapify(starts)
    heap = [(0.0, np.int64(0), np.int64(0))]
    heap.pop()
    stack = np.empty(n_flows, dtype=np.int64)
    group_buf = np.empty(n_flows, dtype=np.int64)
    seed_buf = np.empty(n_flows, dtype=np.int64)

    while len(starts) > 0 or len(heap) > 0:
        t_start = starts[0][0] if len(starts) > 0 else np.inf
        while len(heap) > 0 and heap[0][1] != version[heap[0][2]]:
            heapq.heappop(heap)  # stale
        t_end = heap[0][0] if len(heap) > 0 else np.inf
        n_seed = 0
        if t_end <= t_start:
            now = t_end
            stamp += 1
            n_done = 0
            while len(heap) > 0 and heap[0][0] <= now + EPS:
                t, ver, f = heapq.heappop(heap)
                if ver != version[f]:
                    continue
                end[f] = t
                version[f] += 1
                group_buf[n_done] = f
                n_done += 1
            for d in range(n_done):  # off their links; who is still beside them is re-solved
                f = group_buf[d]
                for e in range(ptr[f], ptr[f + 1]):
                    ln = link[e]
                    _remove_member(slots, counts, ln, f)
                    for k in range(counts[ln]):
                        g = slots[ln, k]
                        if seen[g] != stamp:
                            seen[g] = stamp
                            seed_buf[n_seed] = g
                            n_seed += 1
        else:
            now = t_start
            while len(starts) > 0 and starts[0][0] <= now:
                _, f = heapq.heappop(starts)
                if not is_member[f]:
                    busy = False
                    for e in range(ptr[f], ptr[f + 1]):
                        if counts[link[e]] > 0:
                            busy = True
                            break
                    if not busy:
                        continue  # settled alone: nobody on its links when it starts
                remaining[f] = 1.0
                rate[f] = 0.0
                updated[f] = now
                version[f] = 0
                for e in range(ptr[f], ptr[f + 1]):
                    slots = _add_member(slots, counts, link[e], f)
                seed_buf[n_seed] = f
                n_seed += 1
        if n_seed == 0:
            continue
        # the connected component of the seeds (flows linked through shared links)
        stamp += 1
        n_group = 0
        n_stack = 0
        for s in range(n_seed):
            f = seed_buf[s]
            if seen[f] != stamp:
                seen[f] = stamp
                stack[n_stack] = f
                n_stack += 1
                group_buf[n_group] = f
                n_group += 1
        while n_stack > 0:
            n_stack -= 1
            f = stack[n_stack]
            for e in range(ptr[f], ptr[f + 1]):
                ln = link[e]
                for k in range(counts[ln]):
                    g = slots[ln, k]
                    if seen[g] != stamp:
                        seen[g] = stamp
                        stack[n_stack] = g
                        n_stack += 1
                        group_buf[n_group] = g
                        n_group += 1
        group = np.sort(group_buf[:n_group])
        for i in range(n_group):  # bring progress up to date at the old rates
            f = group[i]
            remaining[f] -= rate[f] * (now - updated[f])
            updated[f] = now
        x = np.empty(n_group)
        alone = False
        if n_group == 1:
            f = group[0]
            alone = True
            for e in range(ptr[f], ptr[f + 1]):
                if counts[link[e]] != 1:
                    alone = False
                    break
        if alone:  # its own speed, or its tightest link's
            f = group[0]
            tight = np.inf
            for e in range(ptr[f], ptr[f + 1]):
                v = capacity[link[e]] / (volume[e] / heaviest[f])
                if v < tight:
                    tight = v
            x[0] = min(caps[f], tight)
        else:
            max_min_group(group, ptr, link, unit, caps, capacity, local_of, x)
        for i in range(n_group):
            f = group[i]
            rate[f] = x[i] / heaviest[f]
            version[f] += 1
            finish = now + max(remaining[f], 0.0) / rate[f]
            heapq.heappush(heap, (finish, version[f], f))
            # lookahead: settled flows on its links starting before ``finish`` join the queue
            lo = checked[f]
            if finish <= lo:
                continue
            checked[f] = finish
            a_t = lo - EPS
            b_t = finish - EPS
            a_frac = (a_t if 0.0 <= a_t <= top else (0.0 if a_t < 0.0 else top)) / horizon
            b_frac = (b_t if 0.0 <= b_t <= top else (0.0 if b_t < 0.0 else top)) / horizon
            for e in range(ptr[f], ptr[f + 1]):
                ln = link[e]
                a = np.searchsorted(passive_key, ln + a_frac)
                b = np.searchsorted(passive_key, ln + b_frac)
                for k in range(a, b):
                    g = passive_flow[k]
                    if not queued[g]:
                        queued[g] = True
                        heapq.heappush(starts, (start_ms[g], g))

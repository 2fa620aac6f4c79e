"""Numba kernels of trace analysis. Each takes one chunk of event rows in time order (by start,
asynchronous rows first at equal starts) and updates state arrays in place, so a trace of any
length streams through them chunk by chunk.

* :func:`_scan_totals`: per-lane interval unions (compute, everything, the compute stream
  clipped to the pipeline phase), time per lane and kind, time/count/bytes per op, time per
  (op, process group).
* :func:`_scan_critical`: the critical path, as a forward dynamic programme. Every lane keeps
  the *chain* that ends with its latest event on each of its two streams (0: compute stream =
  compute and blocking collectives; 1: asynchronous collectives), as a vector of time per op
  plus ``wait`` (gaps no dependency explains) and ``hops`` (jumps between lanes). An event's
  predecessor is the candidate that ended last, no later than its start: the lane's own
  streams, the pipeline transfer (``p2p_send``) into this lane for the same micro-batch, and
  for the optimizer the barrier after every lane's backward. A cross-lane collective
  (all-to-all, gradient reduction) starts when its last member is ready: members are matched by
  (op, group, layer, micro-batch, end time), the chain of the member that was ready last is
  carried on, plus the collective's own duration. The path of the iteration is the chain of the
  event that ends last.
* :func:`_sorted_by_key`, :func:`_count_before`: the order checks of ``trace_stream`` (is a
  batch in ``schema.event_sort_key`` order; how many rows of a sorted run start before a
  watermark), computed from the start bits without building the key arrays.

They take many arrays because the state of the programme is many small tables (one per
candidate kind); grouping them into objects would cost numba's cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit

COMPUTE, COMM, ASYNC = 0, 1, 2
F_RENDEZVOUS, F_P2P, F_OPTIMIZER, F_BWD_END = 1, 2, 4, 8
# counters[]: 0 free arrival slots on the stack, 1 instances in the table, 2 overflow flag,
# 3 free pool slots on pstack
# fstate[]: 0 barrier computed (0/1), 1 barrier end time, 2 eps, 3 barrier lane


@njit(cache=True, nogil=True, error_model="numpy")
def _scan_totals(
    lane, kind, op, group, start, end, nbytes, t_pipe, reach, unions, lane_kind, op_stats, op_group
):
    for i in range(lane.size):
        ln, k, o, s, e = lane[i], kind[i], op[i], start[i], end[i]
        d = e - s
        lane_kind[k, ln] += d
        op_stats[0, o] += d
        op_stats[1, o] += 1.0
        op_stats[2, o] += nbytes[i]
        g = group[i]
        if g >= 0:
            op_group[o, g] += d
        for u in range(3):  # 0: compute, 1: everything, 2: compute stream up to t_pipe
            if u == 0 and k != COMPUTE:
                continue
            if u == 2:
                if k == ASYNC:
                    continue
                s, e = min(s, t_pipe), min(e, t_pipe)
            r = reach[u, ln]
            lo = s if s > r else r
            if e > lo:
                unions[u, ln] += e - lo
            if e > r:
                reach[u, ln] = e


# ---- instance table --------------------------------------------------------------------------
# A collective instance lives in a pool slot that never moves while the instance exists (its
# members' ``pend`` entries point at it); an open-addressing hash table (linear probing,
# backward-shift deletion) maps its key (op, group, layer, micro-batch, end bits) to the slot.
# pint[p]: 0 members joined and not yet resolved, 1 lane of the member that started last, 2 op,
# 3 home bucket; pmeta[p]: 0 latest member start, 1 end; pchain[p]: the chain of that member.
# Hot loops call only helpers with scalar arguments (a call with array arguments costs numba
# reference counting, ~100 ns); the table is probed inline.


@njit(cache=True, nogil=True, error_model="numpy")
def _hash(a, b, c, d, e, mask):
    h = (e ^ (a << 58) ^ (b << 40) ^ (c << 20) ^ d) * -7046029254386353131  # 0x9E37...7C15
    h = h ^ (h >> 29)
    return h & mask


@njit(cache=True, nogil=True, error_model="numpy")
def _delete(hkey, hslot, pint, pstack, p, counters):
    """Free pool slot ``p`` and remove its bucket, shifting later entries of the run back."""
    mask = hslot.shape[0] - 1
    i = pint[p, 3]
    while hslot[i] != p:
        i = (i + 1) & mask
    pstack[counters[3]] = p
    counters[3] += 1
    counters[1] -= 1
    while True:
        hslot[i] = -1
        j = i
        while True:
            j = (j + 1) & mask
            if hslot[j] < 0:
                return
            h = pint[hslot[j], 3]
            stays = (i < h <= j) if i <= j else (h > i or h <= j)
            if not stays:
                break
        for q in range(5):
            hkey[i, q] = hkey[j, q]
        hslot[i] = hslot[j]
        i = j


@njit(cache=True, nogil=True, error_model="numpy")
def _resolve_all(s, free, chain, pend, hkey, hslot, pint, pmeta, pchain, pstack, counters, eps):
    """Resolve every pending collective that ended by ``s`` (used at the optimizer barrier and
    at the end, not per row)."""
    n_cat = chain.shape[2]
    for ln in range(free.shape[1]):
        for c in range(2):
            p = pend[c, ln]
            if p < 0 or free[c, ln] > s + eps:
                continue
            pend[c, ln] = -1  # (same code as _scan_critical, inline)
            for q in range(n_cat):
                chain[c, ln, q] = pchain[p, q]
            chain[c, ln, pint[p, 2]] += pmeta[p, 1] - pmeta[p, 0]
            if pint[p, 1] != ln:
                chain[c, ln, n_cat - 1] += 1.0
            pint[p, 0] -= 1
            if pint[p, 0] <= 0:
                _delete(hkey, hslot, pint, pstack, p, counters)


# ---- the critical path -----------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy")
def _scan_critical(
    lane,
    kind,
    op,
    group,
    layer,
    mb,
    start,
    end,
    end_bits,
    flags,
    stage,
    dp,
    lane_at,
    free,
    chain,
    pend,
    last_op,
    arr_slot,
    arr_t,
    arr_chain,
    stack,
    hkey,
    hslot,
    pint,
    pmeta,
    pchain,
    pstack,
    counters,
    fstate,
    bchain,
):
    """One time-ordered chunk through the critical-path programme (see the module doc).
    One function on purpose (~100 lines): helpers taking arrays would cost numba reference
    counting on every row; the same resolution code in :func:`_resolve_all` runs only at the
    barrier and at the end."""
    eps = fstate[2]
    n_cat = chain.shape[2]
    wait, hops = n_cat - 2, n_cat - 1
    pp = lane_at.shape[0]
    mask = hslot.shape[0] - 1
    n_mb = arr_slot.shape[1]
    for i in range(lane.size):
        ln, k, o, s, e, f, m = lane[i], kind[i], op[i], start[i], end[i], flags[op[i]], mb[i]
        # collectives this lane's streams ended with, now complete: take over their chains
        for c in range(2):
            p = pend[c, ln]
            if p < 0 or free[c, ln] > s + eps:
                continue
            pend[c, ln] = -1  # (same code as _resolve_all, inline)
            for q in range(n_cat):
                chain[c, ln, q] = pchain[p, q]
            chain[c, ln, pint[p, 2]] += pmeta[p, 1] - pmeta[p, 0]
            if pint[p, 1] != ln:
                chain[c, ln, hops] += 1.0
            pint[p, 0] -= 1
            if pint[p, 0] <= 0:
                _delete(hkey, hslot, pint, pstack, p, counters)
        if f & F_P2P:
            back = last_op[ln] >= 0 and (flags[last_op[ln]] & F_BWD_END) != 0
            dst = lane_at[(stage[ln] + (pp - 1 if back else 1)) % pp, dp[ln]]
            if dst < 0 or m < 0 or m >= n_mb:
                continue
            slot = arr_slot[dst, m]
            if slot < 0:
                if counters[0] == 0:
                    counters[2] = 1
                    continue
                counters[0] -= 1
                slot = stack[counters[0]]
                arr_slot[dst, m] = slot
            for q in range(n_cat):
                arr_chain[slot, q] = chain[0, ln, q]
            if s - free[0, ln] > eps:
                arr_chain[slot, wait] += s - free[0, ln]
            arr_chain[slot, o] += e - s
            arr_t[slot] = e
            continue
        ch = 1 if k == ASYNC else 0
        # candidates: the lane's two streams (0, 1), an arrival (2), the barrier (3)
        best_t, best, slot = -np.inf, -1, -1
        limit = s + eps
        if free[ch, ln] <= limit:
            best_t, best = free[ch, ln], ch
        if free[1 - ch, ln] <= limit and free[1 - ch, ln] > best_t:
            best_t, best = free[1 - ch, ln], 1 - ch
        if ch == 0 and 0 <= m < n_mb and arr_slot[ln, m] >= 0:
            slot = arr_slot[ln, m]
            if arr_t[slot] <= s + eps:
                if arr_t[slot] > best_t:
                    best_t, best = arr_t[slot], 2
                arr_slot[ln, m] = -1
                stack[counters[0]] = slot
                counters[0] += 1
        if f & F_OPTIMIZER:
            if fstate[0] == 0.0:
                _barrier(
                    s,
                    free,
                    chain,
                    pend,
                    hkey,
                    hslot,
                    pint,
                    pmeta,
                    pchain,
                    pstack,
                    counters,
                    fstate,
                    bchain,
                )
            if fstate[1] > best_t and fstate[1] <= s + eps:
                best_t, best = fstate[1], 3
        if best < 0:  # nothing ended before the start (overlap within eps): own stream
            best, best_t = ch, s
        if best != ch:
            for q in range(n_cat):
                if best < 2:
                    chain[ch, ln, q] = chain[best, ln, q]
                elif best == 2:
                    chain[ch, ln, q] = arr_chain[slot, q]
                else:
                    chain[ch, ln, q] = bchain[q]
            if best == 2 or (best == 3 and fstate[3] != ln):
                chain[ch, ln, hops] += 1.0
        if s - best_t > eps:
            chain[ch, ln, wait] += s - best_t
        free[ch, ln] = e
        if ch == 0:
            last_op[ln] = o
        if not f & F_RENDEZVOUS:
            chain[ch, ln, o] += e - s
            continue
        # join the collective (op, group, layer, micro-batch, end time)
        g, lay, eb = group[i], layer[i], end_bits[i]
        h = _hash(o, g, lay, m, eb, mask)
        j = h
        while hslot[j] >= 0 and not (
            hkey[j, 0] == o
            and hkey[j, 1] == g
            and hkey[j, 2] == lay
            and hkey[j, 3] == m
            and hkey[j, 4] == eb
        ):
            j = (j + 1) & mask
        p = hslot[j]
        if p < 0:
            if counters[1] * 4 >= hslot.shape[0] * 3:  # table full: keep the lane's own chain
                counters[2] = 1
                chain[ch, ln, o] += e - s
                continue
            counters[3] -= 1
            p = pstack[counters[3]]
            hkey[j, 0], hkey[j, 1], hkey[j, 2], hkey[j, 3], hkey[j, 4] = o, g, lay, m, eb
            hslot[j] = p
            pint[p, 0], pint[p, 1], pint[p, 2], pint[p, 3] = 0, -1, o, h
            pmeta[p, 0], pmeta[p, 1] = -np.inf, e
            counters[1] += 1
        pint[p, 0] += 1
        if s > pmeta[p, 0]:
            pmeta[p, 0] = s
            pint[p, 1] = ln
            for q in range(n_cat):
                pchain[p, q] = chain[ch, ln, q]
        pend[ch, ln] = p


@njit(cache=True, nogil=True, error_model="numpy")
def _barrier(
    s, free, chain, pend, hkey, hslot, pint, pmeta, pchain, pstack, counters, fstate, bchain
):
    """The optimizer barrier: the chain of the lane stream that finished last before ``s``."""
    eps = fstate[2]
    n_lanes = free.shape[1]
    _resolve_all(s, free, chain, pend, hkey, hslot, pint, pmeta, pchain, pstack, counters, eps)
    best, best_t = -1, -np.inf
    for ln in range(n_lanes):
        for c in range(2):
            if free[c, ln] <= s + eps and free[c, ln] > best_t:
                best_t, best = free[c, ln], c * n_lanes + ln
    fstate[0], fstate[1] = 1.0, best_t
    if best >= 0:
        c, ln = best // n_lanes, best % n_lanes
        for q in range(bchain.size):
            bchain[q] = chain[c, ln, q]
        fstate[3] = ln


@njit(cache=True, nogil=True, error_model="numpy")
def _finish_critical(free, chain, pend, hkey, hslot, pint, pmeta, pchain, pstack, counters):
    """The chain that ends last (after resolving every pending collective); its lane."""
    n_lanes = free.shape[1]
    _resolve_all(np.inf, free, chain, pend, hkey, hslot, pint, pmeta, pchain, pstack, counters, 0.0)
    best_t, best = -np.inf, 0
    for ln in range(n_lanes):
        for c in range(2):
            if free[c, ln] > best_t:
                best_t, best = free[c, ln], c * n_lanes + ln
    return best_t, chain[best // n_lanes, best % n_lanes].copy(), best % n_lanes


# ---- reading helpers (trace_stream) -----------------------------------------------------------
_ONE = np.uint64(1)


@njit(cache=True, nogil=True)
def _sorted_by_key(start_bits, kind):
    """Whether rows are in ``schema.event_sort_key`` order (start bits, asynchronous first),
    without building the keys."""
    prev = np.uint64(0)
    for i in range(start_bits.size):
        key = (start_bits[i] << _ONE) | (_ONE if kind[i] != ASYNC else np.uint64(0))
        if key < prev:
            return False
        prev = key
    return True


@njit(cache=True, nogil=True)
def _count_before(start_bits, wkey):
    """Rows of a key-sorted run whose key is below ``wkey`` (``wkey``: start bits << 1),
    i.e. ``searchsorted(keys, wkey, "left")`` without building the keys."""
    lo, hi = 0, start_bits.size
    while lo < hi:
        mid = (lo + hi) >> 1
        if (start_bits[mid] << _ONE) < wkey:
            lo = mid + 1
        else:
            hi = mid
    return lo

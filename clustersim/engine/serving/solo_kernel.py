"""The serving simulation of replicas of one micro-batch each, as one compiled loop.

:class:`~clustersim.engine.serving.sim.ServingSim` runs a colocated deployment whose engines
are each one replica with one micro-batch (``pp = 1`` and no EP group across replicas:
dense models, or EP inside the replica; any ``dp``) here instead of in Python, when
``ServingSim.use_compiled_engine`` allows. The kernel is a line-by-line port of the Python
engine for that case, with every floating-point operation in the same order, so every
request's times, every accumulator and every metric are the same numbers
(``tests/test_serving_speed.py`` compares both with the frozen first engine):

* the event loop (:mod:`.loop`): a heap of (time, priority, order) entries, stale timers
  included, ``now + delay`` sums, "call soon or now" and "advance if next";
* the arrival chain and the dispatcher (round robin or least loaded; a request that can
  never fit is rejected), the in-system integral;
* the engine (``Engine.start``, ``notify``, ``_plan_solo``, ``_commit``): runs of decode
  steps, cut by arrivals at the end of the step in progress;
* the scheduler (:mod:`.scheduler`): chunked and unchunked prefill, preemption by
  recompute from the tail, decode runs up to the next completion or block shortage;
* the step timer's one-micro-batch case (``StepTimer._time_one``): the round formula of
  :func:`clustersim.costs.serving.core_attention_ms`, and numpy's pairwise summation of a
  run's round times (``np.add.reduce``) and sequential running sums (``np.cumsum``).

What is not arithmetic stays in Python, with one source of truth: the constants of a
micro-batch of ``n`` tokens over ``s`` requests come from ``StepTimer._one`` (the cost model,
the MoE table), asked for the first time each ``(n, s)`` appears (the kernel returns,
:func:`run_solo` fills the row and calls it again); the progress callback is called when
the kernel returns at the next event after 1 % more requests finished; an
:class:`~clustersim.engine.serving.sim.Overloaded` run or an unschedulable replica returns
a status that is raised as the Python engine raises it.

Imported by ``engine.serving.sim`` inside the function that needs it, so importing the
engine never imports numba.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# ---- kernel statuses -------------------------------------------------------------------------
DONE, NEED_CONSTANTS, PROGRESS, GROW_SERIES, OVERLOADED, STUCK = range(6)

# ---- phases: where the kernel resumes ---------------------------------------------------------
PH_LOOP, PH_START, PH_TIMING = range(3)

# ---- heap entry kinds (priorities as engine/serving/loop.py) ---------------------------------
K_ARRIVALS, K_RESUME, K_START, K_FIRE, K_WAKE = range(5)
URGENT, NORMAL = 0, 1

# ---- per-request integer rows ----------------------------------------------------------------
(
    R_PROMPT, R_OUTPUT, R_COMPUTED, R_GENERATED, R_BLOCKS, R_PREEMPTIONS, R_REJECTED, R_REPLICA,
    R_WAIT_NEXT,
) = range(9)  # fmt: skip
# ---- per-request float rows (arrival has a sentinel +inf past the last request) --------------
T_ARRIVAL, T_FIRST_SCHEDULED, T_FIRST_TOKEN, T_FINISH = range(4)

# ---- integer scalars -------------------------------------------------------------------------
(
    S_PHASE, S_NUM, S_FINISHED, S_EVENTS, S_BAD, S_ALLOWED_BAD, S_HAS_LIMITS, S_CURSOR,
    S_IN_SYSTEM, S_PENDING, S_NUM_LAST, S_HEAP_N, S_ORDER, S_NUM_BLOCKS, S_BLOCK_SIZE,
    S_MAX_SEQS, S_BUDGET, S_CHUNKED, S_KEY_TOKENS, S_KEY_SEQS, S_SERIES_N, S_RECORD,
    S_PROGRESS_EVERY, S_PROGRESS_DUE, S_HAS_PROGRESS, S_MAX_STEPS, S_ENGINE, S_NUM_ENGINES,
    S_LEAST_LOADED, S_NEXT_RR, S_SIZE,
) = range(31)  # fmt: skip

# ---- float scalars ---------------------------------------------------------------------------
(
    F_NOW, F_AREA, F_LAST, F_TTFT, F_TPOT, F_LATENCY, F_KV_BYTE, F_FLOPS_PER_PAIR, F_SIZE,
) = range(9)  # fmt: skip

# ---- integer state of each engine (= its one replica and scheduler) --------------------------
(
    E_IDLE, E_GENERATION, E_RUN_STEPS, E_ENDS_LEN, E_FREE, E_NUM_RUNNING, E_WAIT_HEAD,
    E_WAIT_TAIL, E_WAIT_COUNT, E_PREEMPTIONS, E_PEAK, E_USED0, E_STEP_N, E_STEP_PREEMPTED,
    E_STEP_ADMITTED, E_STEP_DECODES, E_STEP_TOKENS, E_STEP_PAIRS, E_STEP_KV, E_STEP_LEFT,
    E_STEP_DECODE_ONLY, E_SLOT, E_STEPS, E_KV_PEAK, E_SIZE,
) = range(25)  # fmt: skip

# ---- float state of each engine: EngineStats, the step's start, the replica's KV area --------
(
    G_START, G_BUSY, G_WORK, G_COMM, G_FLOPS, G_MOE_TOKENS, G_BALANCE, G_DROPPED, G_KV_AREA,
    G_SIZE,
) = range(10)  # fmt: skip

# ---- columns of a micro-batch's constants (StepTimer._one, members = 1) ----------------------
(
    C_PER_PAIR, C_PER_KV_BYTE, C_KERNEL_FIXED, C_LAUNCH, C_FRAMEWORK, C_FIXED, C_LAYERS,
    C_QUERY_MS, C_QUERY_BYTES, C_COMM, C_WORK_OFFSET, C_FLOPS, C_FLOPS_GROWTH, C_MOE_TOKENS,
    C_BALANCE, C_DROPPED, C_SIZE,
) = range(17)  # fmt: skip

KEY_SHIFT = 24  # constants key: tokens << KEY_SHIFT | requests
HASH_MULT = 0x9E3779B97F4A7C15 & ((1 << 63) - 1)


# ---- the event loop's heap -------------------------------------------------------------------
@njit(cache=True)
def _before(ht, hi, a, b):
    """Whether heap entry ``a`` comes before ``b``: (time, priority, order)."""
    if ht[a] != ht[b]:
        return ht[a] < ht[b]
    if hi[0, a] != hi[0, b]:
        return hi[0, a] < hi[0, b]
    return hi[1, a] < hi[1, b]


@njit(cache=True)
def _swap(ht, hi, a, b):
    ht[a], ht[b] = ht[b], ht[a]
    for r in range(5):
        hi[r, a], hi[r, b] = hi[r, b], hi[r, a]


@njit(cache=True)
def _push(si, ht, hi, at, priority, kind, arg, engine):
    """A heap entry at ``at`` (heapq.heappush): rows priority, order, kind, argument,
    engine."""
    n = si[S_HEAP_N]
    ht[n] = at
    hi[0, n] = priority
    hi[1, n] = si[S_ORDER]
    hi[2, n] = kind
    hi[3, n] = arg
    hi[4, n] = engine
    si[S_ORDER] += 1
    si[S_HEAP_N] = n + 1
    while n > 0:
        parent = (n - 1) >> 1
        if _before(ht, hi, n, parent):
            _swap(ht, hi, n, parent)
            n = parent
        else:
            break


@njit(cache=True)
def _pop(si, ht, hi):
    """Remove the first entry (heapq.heappop), which the caller has read at index 0."""
    n = si[S_HEAP_N] - 1
    si[S_HEAP_N] = n
    if n == 0:
        return
    ht[0] = ht[n]
    for r in range(5):
        hi[r, 0] = hi[r, n]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= n:
            break
        child = left
        if left + 1 < n and _before(ht, hi, left + 1, left):
            child = left + 1
        if _before(ht, hi, child, i):
            _swap(ht, hi, child, i)
            i = child
        else:
            break


# ---- arithmetic shared with numpy ------------------------------------------------------------
@njit(cache=True)
def _block_sum(a, lo, n):
    """numpy's pairwise sum of a block of at most 128 values (below)."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    stop = n - n % 8
    while i < stop:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(cache=True)
def _pairwise_sum(a, n, stack_i, stack_f):
    """``np.add.reduce(a[:n])`` of a contiguous float64 array: numpy's pairwise sum (an
    array of more than 128 values is split at half its length rounded down to a multiple of
    8, and the halves' sums added; a block of at most 128 is summed by
    :func:`_block_sum`), evaluated with an explicit stack (``stack_i``: 3 x depth of
    (start, length, halves done); ``stack_f``: partial sums) instead of recursion."""
    if n <= 128:
        return _block_sum(a, 0, n)
    top, values = 1, 0
    stack_i[0, 0], stack_i[1, 0], stack_i[2, 0] = 0, n, 0
    while top:
        t = top - 1
        lo, m, done = stack_i[0, t], stack_i[1, t], stack_i[2, t]
        if m <= 128:
            stack_f[values] = _block_sum(a, lo, m)
            values += 1
            top -= 1
            continue
        half = m // 2
        half -= half % 8
        if done == 2:  # both halves summed: add them
            stack_f[values - 2] = stack_f[values - 2] + stack_f[values - 1]
            values -= 1
            top -= 1
            continue
        stack_i[2, t] = done + 1
        if done == 0:
            stack_i[0, top], stack_i[1, top] = lo, half
        else:
            stack_i[0, top], stack_i[1, top] = lo + half, m - half
        stack_i[2, top] = 0
        top += 1
    return stack_f[0]


@njit(cache=True)
def _ceil_div(a, b):
    return -(-a // b)


# ---- the dispatcher and the engines' wake-ups ------------------------------------------------
@njit(cache=True)
def _count(si, sf, delta, now):
    """Dispatcher.count: a request enters (+1) or leaves (-1) the system at ``now``."""
    sf[F_AREA] += si[S_IN_SYSTEM] * (now - sf[F_LAST])
    sf[F_LAST] = now
    si[S_IN_SYSTEM] += delta


@njit(cache=True)
def _on_finished(si, count):
    """ServingSim.on_finished: the progress report is due when a 1 % step was crossed."""
    if count:
        before = si[S_FINISHED]
        si[S_FINISHED] = before + count
        every = si[S_PROGRESS_EVERY]
        if before // every != si[S_FINISHED] // every:
            si[S_PROGRESS_DUE] = 1


@njit(cache=True)
def _arm(si, sf, es, ht, hi, e, at_ms):
    """Engine._arm of engine ``e``: a timer at ``at_ms`` (earlier ones become stale)."""
    es[E_GENERATION] += 1
    si[S_EVENTS] += 1
    now = sf[F_NOW]
    delay = at_ms - now
    at = now + (delay if delay > 0.0 else 0.0)
    _push(si, ht, hi, at, NORMAL, K_FIRE, es[E_GENERATION], e)


@njit(cache=True)
def _notify(si, sf, ei, ht, hi, ends, e, now):
    """Engine.notify of engine ``e``: wake it when idle, or cut its run at the step in
    progress."""
    es = ei[e]
    if es[E_IDLE]:
        es[E_IDLE] = 0
        _push(si, ht, hi, sf[F_NOW], NORMAL, K_START, 0, e)
    elif es[E_RUN_STEPS] > 1:
        end_ms = ends[e]
        lo, hi_ = 0, es[E_ENDS_LEN]  # searchsorted(ends, now, "left")
        while lo < hi_:
            mid = (lo + hi_) >> 1
            if end_ms[mid] < now:
                lo = mid + 1
            else:
                hi_ = mid
        if lo + 1 < es[E_RUN_STEPS]:
            es[E_RUN_STEPS] = lo + 1
            _arm(si, sf, es, ht, hi, e, end_ms[lo])


@njit(cache=True)
def _dispatch(si, sf, ei, req, ht, hi, ends, rid, now):
    """Dispatcher._dispatch (round robin, or the least loaded replica, lowest index on
    ties); False when the run is overloaded."""
    engines = si[S_NUM_ENGINES]
    if si[S_LEAST_LOADED]:
        replica, best = 0, -1
        for r in range(engines):
            load = ei[r, E_WAIT_COUNT] + ei[r, E_NUM_RUNNING]
            if best < 0 or load < best:
                replica, best = r, load
    else:
        replica = si[S_NEXT_RR]
        si[S_NEXT_RR] = (replica + 1) % engines
    req[R_REPLICA, rid] = replica
    tokens = req[R_PROMPT, rid] + req[R_OUTPUT, rid] - 1
    if _ceil_div(tokens, si[S_BLOCK_SIZE]) > si[S_NUM_BLOCKS]:
        req[R_REJECTED, rid] = 1
        if si[S_HAS_LIMITS]:
            si[S_BAD] += 1
            if si[S_BAD] > si[S_ALLOWED_BAD]:
                return False
        _on_finished(si, 1)
        return True
    _count(si, sf, 1, now)
    es = ei[replica]  # add: to the back of the replica's waiting queue
    req[R_WAIT_NEXT, rid] = -1
    if es[E_WAIT_COUNT]:
        req[R_WAIT_NEXT, es[E_WAIT_TAIL]] = rid
    else:
        es[E_WAIT_HEAD] = rid
    es[E_WAIT_TAIL] = rid
    es[E_WAIT_COUNT] += 1
    _notify(si, sf, ei, ht, hi, ends, replica, now)
    return True


@njit(cache=True)
def _advance_through(si, sf, ei, req, ht, hi, ends, index, now):
    """Dispatcher.advance_through: every request up to ``index``."""
    while si[S_CURSOR] <= index:
        if not _dispatch(si, sf, ei, req, ht, hi, ends, si[S_CURSOR], now):
            return False
        si[S_CURSOR] += 1
    return True


@njit(cache=True)
def _advance_arrivals(si, sf, ei, req, reqf, ht, hi, ends, last):
    """The arrival chain (ServingSim._arrivals.advance): dispatch the distinct arrival
    times already reached, then wait for the next one; False when overloaded."""
    arrival = reqf[T_ARRIVAL]
    while si[S_PENDING] < si[S_NUM_LAST]:
        index = last[si[S_PENDING]]
        si[S_PENDING] += 1
        at = arrival[index]
        now = sf[F_NOW]
        if at > now:
            si[S_EVENTS] += 1
            _push(si, ht, hi, now + (at - now), NORMAL, K_RESUME, index, 0)
            return True
        if not _advance_through(si, sf, ei, req, ht, hi, ends, index, now):
            return False
    return True


# ---- the scheduler of one replica (``es``: its engine's state) -------------------------------
@njit(cache=True)
def _allocate(si, es, req, rid, tokens):
    """ReplicaScheduler._allocate."""
    need = _ceil_div(req[R_COMPUTED, rid] + tokens, si[S_BLOCK_SIZE]) - req[R_BLOCKS, rid]
    if need > es[E_FREE]:
        return False
    es[E_FREE] -= need
    req[R_BLOCKS, rid] += need
    return True


@njit(cache=True)
def _preempt(es, req, rid):
    """ReplicaScheduler._preempt: back to the front of the waiting queue."""
    es[E_FREE] += req[R_BLOCKS, rid]
    req[R_BLOCKS, rid] = 0
    req[R_COMPUTED, rid] = 0
    req[R_PREEMPTIONS, rid] += 1
    es[E_PREEMPTIONS] += 1
    if es[E_WAIT_COUNT]:
        req[R_WAIT_NEXT, rid] = es[E_WAIT_HEAD]
    else:
        req[R_WAIT_NEXT, rid] = -1
        es[E_WAIT_TAIL] = rid
    es[E_WAIT_HEAD] = rid
    es[E_WAIT_COUNT] += 1


@njit(cache=True)
def _pop_waiting(es, req):
    """Remove the front of the waiting queue."""
    es[E_WAIT_HEAD] = req[R_WAIT_NEXT, es[E_WAIT_HEAD]]
    es[E_WAIT_COUNT] -= 1


@njit(cache=True)
def _step_add(es, step, rid, q, c):
    n = es[E_STEP_N]
    step[0, n] = rid
    step[1, n] = q
    step[2, n] = c
    es[E_STEP_N] = n + 1


@njit(cache=True)
def _prefill_step(si, es, req, running, step):
    """ReplicaScheduler._prefill_step (vLLM V0); False when no prompt can be admitted."""
    es[E_STEP_N] = 0
    budget = si[S_BUDGET]
    tokens = pairs = 0
    while es[E_WAIT_COUNT] and es[E_NUM_RUNNING] < si[S_MAX_SEQS]:
        rid = es[E_WAIT_HEAD]
        q = req[R_PROMPT, rid] + req[R_GENERATED, rid] - req[R_COMPUTED, rid]
        if (q > budget and es[E_STEP_N]) or not _allocate(si, es, req, rid, q):
            break
        _pop_waiting(es, req)
        running[es[E_NUM_RUNNING]] = rid
        es[E_NUM_RUNNING] += 1
        _step_add(es, step, rid, q, 0)
        budget -= q
        tokens += q
        pairs += q * (q + 1) // 2
    n = es[E_STEP_N]
    if not n:
        return False
    left = 1 << 62
    for i in range(n):
        rid = step[0, i]
        x = req[R_OUTPUT, rid] - req[R_GENERATED, rid]
        if x < left:
            left = x
    es[E_STEP_DECODE_ONLY] = 0
    es[E_STEP_PREEMPTED] = 0
    es[E_STEP_ADMITTED] = n
    es[E_STEP_DECODES] = 0
    es[E_STEP_TOKENS] = tokens
    es[E_STEP_PAIRS] = pairs
    es[E_STEP_KV] = tokens
    es[E_STEP_LEFT] = left
    return True


@njit(cache=True)
def _running_step(si, es, req, running, step):
    """ReplicaScheduler._running_step (and _admit with chunked prefill)."""
    bs = si[S_BLOCK_SIZE]
    es[E_STEP_N] = 0
    budget, preempted, decodes = si[S_BUDGET], 0, 0
    tokens = pairs = context = 0
    left = 1 << 62
    free = es[E_FREE]
    i = 0
    while i < es[E_NUM_RUNNING]:
        if budget <= 0:
            break
        rid = running[i]
        i += 1
        c = req[R_COMPUTED, rid]
        g = req[R_GENERATED, rid]
        remaining = req[R_PROMPT, rid] + g - c
        q = remaining if remaining < budget else budget
        need = _ceil_div(c + q, bs) - req[R_BLOCKS, rid]
        if need <= free:
            free -= need
            req[R_BLOCKS, rid] += need
        else:
            es[E_FREE] = free
            rid_preempted = False
            while not _allocate(si, es, req, rid, q):
                es[E_NUM_RUNNING] -= 1
                victim = running[es[E_NUM_RUNNING]]
                _preempt(es, req, victim)
                preempted += 1
                if victim == rid:
                    rid_preempted = True
                    break
            free = es[E_FREE]
            if rid_preempted:
                break
        _step_add(es, step, rid, q, c)
        budget -= q
        tokens += q
        pairs += q * c + q * (q + 1) // 2
        context += c
        if req[R_OUTPUT, rid] - g < left:
            left = req[R_OUTPUT, rid] - g
        if remaining == 1 and g > 0:
            decodes += 1
    es[E_FREE] = free
    all_served = es[E_STEP_N] == es[E_NUM_RUNNING]
    admitted = 0
    if si[S_CHUNKED] and not preempted and es[E_WAIT_COUNT]:  # _admit
        while es[E_WAIT_COUNT] and budget > 0 and es[E_NUM_RUNNING] < si[S_MAX_SEQS]:
            rid = es[E_WAIT_HEAD]
            c = req[R_COMPUTED, rid]
            remaining = req[R_PROMPT, rid] + req[R_GENERATED, rid] - c
            q = remaining if remaining < budget else budget
            if not _allocate(si, es, req, rid, q):
                break
            _pop_waiting(es, req)
            running[es[E_NUM_RUNNING]] = rid
            es[E_NUM_RUNNING] += 1
            _step_add(es, step, rid, q, c)
            budget -= q
            tokens += q
            pairs += q * c + q * (q + 1) // 2
            context += c
            x = req[R_OUTPUT, rid] - req[R_GENERATED, rid]
            if x < left:
                left = x
            admitted += 1
    n = es[E_STEP_N]
    es[E_STEP_PREEMPTED] = preempted
    es[E_STEP_ADMITTED] = admitted
    es[E_STEP_DECODES] = decodes
    es[E_STEP_TOKENS] = tokens
    es[E_STEP_PAIRS] = pairs
    es[E_STEP_KV] = tokens + context
    es[E_STEP_LEFT] = left
    es[E_STEP_DECODE_ONLY] = (
        1 if decodes == n and all_served and not preempted and not admitted and n else 0
    )


@njit(cache=True)
def _schedule(si, es, req, running, step):
    """ReplicaScheduler.schedule: True when a step was scheduled."""
    while True:
        if not es[E_NUM_RUNNING] and not es[E_WAIT_COUNT]:
            return False
        if not si[S_CHUNKED] and es[E_WAIT_COUNT] and _prefill_step(si, es, req, running, step):
            return True
        _running_step(si, es, req, running, step)
        if es[E_STEP_N]:
            return True
        if not es[E_STEP_PREEMPTED]:
            return False


@njit(cache=True)
def _run_length(si, es, step, limit):
    """ReplicaScheduler.run_length."""
    if not es[E_STEP_DECODE_ONLY] or limit <= 1:
        return 1
    k = min(limit, es[E_STEP_LEFT])
    if k <= 1:
        return 1
    bs = si[S_BLOCK_SIZE]
    n = es[E_STEP_N]
    free = es[E_FREE]
    if n * _ceil_div(k - 1, bs) <= free:
        return k
    lo, hi = 1, k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        extra = 0
        for i in range(n):
            first = step[2, i] + 1
            extra += _ceil_div(first + mid - 1, bs) - _ceil_div(first, bs)
        if extra <= free:
            lo = mid
        else:
            hi = mid - 1
    return lo


@njit(cache=True)
def _lookup(keys, slots, key):
    """The constants' row of ``key``, or -1 (open addressing, linear probing)."""
    mask = keys.shape[0] - 1
    h = ((key * HASH_MULT) >> 17) & mask
    while True:
        k = keys[h]
        if k == key:
            return slots[h]
        if k == -1:
            return -1
        h = (h + 1) & mask


# ---- commit ----------------------------------------------------------------------------------
@njit(cache=True)
def _commit(si, sf, ei, ef, req, reqf, running, step, rounds, ends, consts, batches, series_f,
            series_i, stack_i, stack_f, e):  # fmt: skip
    """Engine._commit of solo engine ``e`` with ReplicaScheduler.commit; False when the
    finished requests made the run overloaded."""
    es, fs = ei[e], ef[e]
    running, step, rounds, ends = running[e], step[e], rounds[e], ends[e]
    k = es[E_RUN_STEPS]
    end = ends[k - 1]
    row = es[E_SLOT]
    if k == 1:
        busy = rounds[0]
        work = busy + consts[row, C_WORK_OFFSET]
        comm = consts[row, C_COMM]
        flops = sf[F_FLOPS_PER_PAIR] * es[E_STEP_PAIRS]
        flops = consts[row, C_FLOPS] + flops
    else:
        busy = _pairwise_sum(rounds, k, stack_i, stack_f)
        work = busy + k * consts[row, C_WORK_OFFSET]
        flops0 = consts[row, C_FLOPS] + sf[F_FLOPS_PER_PAIR] * es[E_STEP_PAIRS]
        flops = k * flops0 + consts[row, C_FLOPS_GROWTH] * k * (k - 1) / 2
        comm = k * consts[row, C_COMM]
    fs[G_BUSY] += busy
    fs[G_WORK] += work
    fs[G_COMM] += comm
    fs[G_FLOPS] += flops
    es[E_STEPS] += k
    moe = consts[row, C_MOE_TOKENS]
    if moe:
        fs[G_MOE_TOKENS] += moe * k
        fs[G_BALANCE] += consts[row, C_BALANCE] * moe * k
        fs[G_DROPPED] += consts[row, C_DROPPED] * moe * k
    start = fs[G_START]
    duration = end - start
    n = es[E_STEP_N]
    decodes = es[E_STEP_DECODES]
    batches[1, decodes] += k
    if n > decodes:
        batches[0, n - decodes] += 1
    # ReplicaScheduler.commit
    bs = si[S_BLOCK_SIZE]
    num_finished = 0
    finished = step[3]  # scratch row
    if k > 1:
        need = 0
        for i in range(n):
            rid = step[0, i]
            c = req[R_COMPUTED, rid] + k
            req[R_COMPUTED, rid] = c
            g = req[R_GENERATED, rid] + k
            req[R_GENERATED, rid] = g
            b = _ceil_div(c, bs)
            need += b - req[R_BLOCKS, rid]
            req[R_BLOCKS, rid] = b
            if g == req[R_OUTPUT, rid]:
                finished[num_finished] = rid
                num_finished += 1
        es[E_FREE] -= need
    else:
        for i in range(n):
            rid = step[0, i]
            c = req[R_COMPUTED, rid] + step[1, i]
            req[R_COMPUTED, rid] = c
            g = req[R_GENERATED, rid]
            if c == req[R_PROMPT, rid] + g:
                g += 1
                req[R_GENERATED, rid] = g
                if g == 1:
                    reqf[T_FIRST_TOKEN, rid] = end
                if g == req[R_OUTPUT, rid]:
                    finished[num_finished] = rid
                    num_finished += 1
    peak = si[S_NUM_BLOCKS] - es[E_FREE]
    es[E_PEAK] = peak
    if num_finished:
        for i in range(num_finished):  # _retire
            rid = finished[i]
            es[E_FREE] += req[R_BLOCKS, rid]
            req[R_BLOCKS, rid] = 0
            reqf[T_FINISH, rid] = end
        kept = 0
        for i in range(es[E_NUM_RUNNING]):  # running without the finished, in order
            rid = running[i]
            done = False
            for j in range(num_finished):
                if finished[j] == rid:
                    done = True
                    break
            if not done:
                running[kept] = rid
                kept += 1
        es[E_NUM_RUNNING] = kept
    used0 = es[E_USED0]
    fs[G_KV_AREA] += 0.5 * (used0 + peak) * duration
    if si[S_RECORD]:
        m = si[S_SERIES_N]
        series_f[0, m] = start
        series_f[1, m] = end
        series_i[0, m] = e
        series_i[1, m] = used0
        series_i[2, m] = peak
        si[S_SERIES_N] = m + 1
    if peak > es[E_KV_PEAK]:
        es[E_KV_PEAK] = peak
    if num_finished:
        _count(si, sf, -num_finished, end)
        if si[S_HAS_LIMITS]:
            bad = 0
            arrival = reqf[T_ARRIVAL]
            for i in range(num_finished):
                rid = finished[i]
                t0, first, fin = arrival[rid], reqf[T_FIRST_TOKEN, rid], reqf[T_FINISH, rid]
                out = req[R_OUTPUT, rid]
                tpot = (fin - first) / (out - 1) if out > 1 else 0.0
                if first - t0 > sf[F_TTFT] or tpot > sf[F_TPOT] or fin - t0 > sf[F_LATENCY]:
                    bad += 1
            if bad:
                si[S_BAD] += bad
                if si[S_BAD] > si[S_ALLOWED_BAD]:
                    return False
        _on_finished(si, num_finished)
    es[E_RUN_STEPS] = 0
    return True


# ---- the whole loop --------------------------------------------------------------------------
@njit(cache=True)
def simulate(si, sf, ei, ef, req, reqf, running, step, ht, hi, last, rounds, ends, keys, slots,
             consts, batches, series_f, series_i, stack_i, stack_f):  # fmt: skip  # noqa: PLR0912, PLR0915
    """Run the simulation from where it stopped (``si[S_PHASE]``, and ``si[S_ENGINE]`` the
    engine in ``Engine.start``) until it ends or needs Python (the returned status)."""
    while True:
        phase = si[S_PHASE]
        if phase == PH_LOOP:
            if si[S_HAS_PROGRESS] and si[S_PROGRESS_DUE]:
                return PROGRESS
            if si[S_HEAP_N] == 0:
                return DONE
            sf[F_NOW] = now = ht[0]
            kind, arg, e = hi[2, 0], hi[3, 0], hi[4, 0]
            _pop(si, ht, hi)
            if kind == K_ARRIVALS:
                if not _advance_arrivals(si, sf, ei, req, reqf, ht, hi, ends, last):
                    return OVERLOADED
            elif kind == K_RESUME:
                if not _advance_through(si, sf, ei, req, ht, hi, ends, arg, now):
                    return OVERLOADED
                if not _advance_arrivals(si, sf, ei, req, reqf, ht, hi, ends, last):
                    return OVERLOADED
            elif kind == K_START:
                si[S_ENGINE] = e
                si[S_PHASE] = PH_START
            elif kind == K_FIRE:
                if arg == ei[e, E_GENERATION]:
                    if si[S_HEAP_N] and ht[0] <= now:  # call_soon_or_now
                        _push(si, ht, hi, now, NORMAL, K_WAKE, 0, e)
                    else:
                        if not _commit(si, sf, ei, ef, req, reqf, running, step, rounds, ends,
                                       consts, batches, series_f, series_i, stack_i, stack_f,
                                       e):  # fmt: skip
                            return OVERLOADED
                        si[S_ENGINE] = e
                        si[S_PHASE] = PH_START
            else:  # K_WAKE
                if not _commit(si, sf, ei, ef, req, reqf, running, step, rounds, ends, consts,
                               batches, series_f, series_i, stack_i, stack_f, e):  # fmt: skip
                    return OVERLOADED
                si[S_ENGINE] = e
                si[S_PHASE] = PH_START
            continue
        e = si[S_ENGINE]
        es = ei[e]
        est = step[e]
        if phase == PH_START:  # the top of Engine.start's loop
            if si[S_HAS_PROGRESS] and si[S_PROGRESS_DUE]:
                return PROGRESS
            if si[S_RECORD] and si[S_SERIES_N] >= series_f.shape[1]:
                return GROW_SERIES
            now = sf[F_NOW]
            arrival = reqf[T_ARRIVAL]
            while arrival[si[S_CURSOR]] <= now:  # Dispatcher.advance_to
                if not _dispatch(si, sf, ei, req, ht, hi, ends, si[S_CURSOR], now):
                    return OVERLOADED
                si[S_CURSOR] += 1
            if not _schedule(si, es, req, running[e], est):  # Engine._plan_solo
                if es[E_WAIT_COUNT]:
                    return STUCK
                if si[S_FINISHED] != si[S_NUM]:
                    es[E_IDLE] = 1
                si[S_PHASE] = PH_LOOP
                continue
            n = es[E_STEP_N]
            admitted = es[E_STEP_ADMITTED]
            for i in range(n - admitted, n):
                rid = est[0, i]
                if reqf[T_FIRST_SCHEDULED, rid] != reqf[T_FIRST_SCHEDULED, rid]:
                    reqf[T_FIRST_SCHEDULED, rid] = now
            es[E_RUN_STEPS] = _run_length(si, es, est, si[S_MAX_STEPS])
            es[E_USED0] = si[S_NUM_BLOCKS] - es[E_FREE]
            si[S_PHASE] = PH_TIMING
            key = (es[E_STEP_TOKENS] << KEY_SHIFT) | n
            row = _lookup(keys, slots, key)
            if row < 0:
                si[S_KEY_TOKENS] = es[E_STEP_TOKENS]
                si[S_KEY_SEQS] = n
                return NEED_CONSTANTS
            es[E_SLOT] = row
        else:  # PH_TIMING, resumed once Python added the constants
            key = (es[E_STEP_TOKENS] << KEY_SHIFT) | es[E_STEP_N]
            es[E_SLOT] = _lookup(keys, slots, key)
        # StepTimer._time_one and the end of each step of the run
        now = sf[F_NOW]
        row = es[E_SLOT]
        run = es[E_RUN_STEPS]
        fixed, layers = consts[row, C_FIXED], consts[row, C_LAYERS]
        per_pair, per_kv_byte = consts[row, C_PER_PAIR], consts[row, C_PER_KV_BYTE]
        kfixed, launch = consts[row, C_KERNEL_FIXED], consts[row, C_LAUNCH]
        framework = consts[row, C_FRAMEWORK]
        query_ms, query_bytes = consts[row, C_QUERY_MS], consts[row, C_QUERY_BYTES]
        kv_byte = sf[F_KV_BYTE]
        pairs, kv = float(es[E_STEP_PAIRS]), float(es[E_STEP_KV])
        tokens = float(es[E_STEP_TOKENS])
        round_ms, end_ms = rounds[e], ends[e]
        acc = 0.0
        for j in range(run):
            grown = tokens * float(j)
            kv_bytes = (kv + grown) * kv_byte
            kv_bytes = kv_bytes + query_bytes
            flops_ms = (pairs + grown) * per_pair + query_ms
            bytes_ms = kv_bytes * per_kv_byte
            gpu = (flops_ms if flops_ms >= bytes_ms else bytes_ms) + kfixed
            core = (gpu if gpu >= launch else launch) + framework
            r = fixed + layers * core
            round_ms[j] = r
            acc = acc + r if j else r
            end_ms[j] = acc + now
        es[E_ENDS_LEN] = run
        ef[e, G_START] = now
        at_ms = end_ms[run - 1]
        delay = at_ms - now
        delay = delay if delay > 0.0 else 0.0
        if si[S_HEAP_N] and ht[0] <= now + delay:  # not EventLoop.advance_if_next
            _arm(si, sf, es, ht, hi, e, at_ms)
            si[S_PHASE] = PH_LOOP
            continue
        sf[F_NOW] = now + delay
        es[E_GENERATION] += 1
        si[S_EVENTS] += 1
        if not _commit(si, sf, ei, ef, req, reqf, running, step, rounds, ends, consts, batches,
                       series_f, series_i, stack_i, stack_f, e):  # fmt: skip
            return OVERLOADED
        si[S_PHASE] = PH_START


@njit(cache=True)
def _insert(keys, slots, key, slot):
    """Add ``key`` -> ``slot`` to the open-addressing table (``key`` absent, room left)."""
    mask = keys.shape[0] - 1
    h = ((key * HASH_MULT) >> 17) & mask
    while keys[h] != -1:
        h = (h + 1) & mask
    keys[h] = key
    slots[h] = slot


# ---- Python side -----------------------------------------------------------------------------
class _Constants:
    """Rows of micro-batch constants keyed by (tokens, requests), filled from the step
    timer on demand (``StepTimer._one``: the one source of the cost model's numbers)."""

    def __init__(self, timer):
        self.timer = timer
        self.keys = np.full(256, -1, dtype=np.int64)
        self.slots = np.zeros(256, dtype=np.int64)
        self.rows = np.zeros((64, C_SIZE), dtype=np.float64)
        self.count = 0

    def add(self, tokens: int, seqs: int) -> None:
        """The row of a micro-batch of ``tokens`` tokens over ``seqs`` requests."""
        one = self.timer._one(tokens, seqs, 1)
        parts = one[0]
        if self.count == self.rows.shape[0]:
            self.rows = np.concatenate([self.rows, np.zeros_like(self.rows)])
        if 2 * (self.count + 1) > self.keys.size:
            self._rehash(2 * self.keys.size)
        row = self.rows[self.count]
        row[C_PER_PAIR], row[C_PER_KV_BYTE], row[C_KERNEL_FIXED] = parts[5], parts[7], parts[8]
        row[C_LAUNCH], row[C_FRAMEWORK] = parts[9], parts[10]
        row[C_FIXED], row[C_LAYERS], row[C_QUERY_MS], row[C_QUERY_BYTES] = one[1:5]
        row[C_COMM], row[C_WORK_OFFSET], row[C_FLOPS], row[C_FLOPS_GROWTH] = one[5:9]
        row[C_MOE_TOKENS], row[C_BALANCE], row[C_DROPPED] = one[9:12]
        _insert(self.keys, self.slots, (tokens << KEY_SHIFT) | seqs, self.count)
        self.count += 1

    def _rehash(self, size: int) -> None:
        old_keys, old_slots = self.keys, self.slots
        self.keys = np.full(size, -1, dtype=np.int64)
        self.slots = np.zeros(size, dtype=np.int64)
        for key, slot in zip(old_keys.tolist(), old_slots.tolist(), strict=True):
            if key != -1:
                _insert(self.keys, self.slots, key, slot)


def run_solo(sim) -> None:
    """Run ``sim`` (every engine one replica with one micro-batch) in the kernel, leaving in
    ``sim`` what the Python engine leaves there (book, accumulators, events, engine
    statistics, KV series); raises as the Python engine raises."""
    from clustersim.engine.serving import sim as serving_sim  # (MAX_STEPS as the engine's)

    book, scheds = sim.book, sim.schedulers
    engines = len(scheds)
    num = sim.num_requests
    req = np.zeros((9, num), dtype=np.int64)
    req[R_PROMPT], req[R_OUTPUT] = book.prompt, book.output
    req[R_REPLICA] = -1
    reqf = np.full((4, num + 1), math.nan)
    reqf[T_ARRIVAL, :num] = sim.arrival_ms
    reqf[T_ARRIVAL, num] = math.inf
    times = sim.arrival_ms
    last = np.flatnonzero(np.append(times[1:] != times[:-1], True)).astype(np.int64)
    first = scheds[0]
    max_seqs = first.max_seqs
    si = np.zeros(S_SIZE, dtype=np.int64)
    sf = np.zeros(F_SIZE, dtype=np.float64)
    si[S_NUM], si[S_NUM_LAST], si[S_NUM_ENGINES] = num, last.size, engines
    si[S_LEAST_LOADED] = sim.dispatcher._least_loaded
    si[S_NUM_BLOCKS], si[S_BLOCK_SIZE] = first.num_blocks, first.block_size
    si[S_MAX_SEQS], si[S_BUDGET], si[S_CHUNKED] = max_seqs, first.budget, first.chunked
    si[S_MAX_STEPS] = max_steps = serving_sim.MAX_STEPS
    si[S_PROGRESS_EVERY] = sim._progress_every
    si[S_HAS_PROGRESS] = sim._progress is not None
    si[S_RECORD] = sim.kv_series is not None
    limits = sim.limits
    if limits is not None:
        si[S_HAS_LIMITS], si[S_ALLOWED_BAD] = 1, limits.allowed_bad
        sf[F_TTFT], sf[F_TPOT], sf[F_LATENCY] = limits.ttft_ms, limits.tpot_ms, limits.latency_ms
    sf[F_KV_BYTE] = sim.timer.c.attn_bytes_per_kv_token
    sf[F_FLOPS_PER_PAIR] = sim.timer.flops_per_pair
    ei = np.zeros((engines, E_SIZE), dtype=np.int64)
    ei[:, E_FREE] = first.num_blocks
    ef = np.zeros((engines, G_SIZE), dtype=np.float64)
    running = np.zeros((engines, max_seqs + 1), dtype=np.int64)
    step = np.zeros((engines, 4, max_seqs + 1), dtype=np.int64)
    heap_size = num + 4 * engines + 64  # alive: the arrival chain's, engines', stale timers
    ht = np.zeros(heap_size, dtype=np.float64)
    hi = np.zeros((5, heap_size), dtype=np.int64)
    rounds = np.zeros((engines, max_steps), dtype=np.float64)
    ends = np.zeros((engines, max_steps), dtype=np.float64)
    batches = np.zeros((2, max_seqs + 1), dtype=np.int64)
    series_f = np.zeros((2, 1024 if si[S_RECORD] else 0), dtype=np.float64)
    series_i = np.zeros((3, series_f.shape[1]), dtype=np.int64)
    consts = sim.timer.solo_constants  # rows filled by earlier runs sharing the timer
    if consts is None:
        consts = sim.timer.solo_constants = _Constants(sim.timer)
    stack_i = np.zeros((3, 64), dtype=np.int64)  # the pairwise sum's stack (depth < 64)
    stack_f = np.zeros(64, dtype=np.float64)
    _push(si, ht, hi, 0.0, URGENT, K_ARRIVALS, 0, 0)  # ServingSim.run
    for e in range(engines):
        _push(si, ht, hi, 0.0, URGENT, K_START, 0, e)
    si[S_PHASE] = PH_LOOP
    while True:
        status = simulate(si, sf, ei, ef, req, reqf, running, step, ht, hi, last, rounds, ends,
                          consts.keys, consts.slots, consts.rows, batches, series_f, series_i,
                          stack_i, stack_f)  # fmt: skip
        if si[S_PROGRESS_DUE]:
            si[S_PROGRESS_DUE] = 0
            if sim._progress is not None:
                sim._progress(int(si[S_FINISHED]) / num)
        if status == NEED_CONSTANTS:
            consts.add(int(si[S_KEY_TOKENS]), int(si[S_KEY_SEQS]))
        elif status == GROW_SERIES:
            series_f = np.concatenate([series_f, np.zeros_like(series_f)], axis=1)
            series_i = np.concatenate([series_i, np.zeros_like(series_i)], axis=1)
        elif status == OVERLOADED:
            raise serving_sim.Overloaded(
                f"{si[S_BAD]} requests missed their limits, {si[S_FINISHED]} finished"
            )
        elif status == STUCK:
            raise RuntimeError("a replica has waiting requests but cannot schedule any")
        elif status == DONE:
            break
    _write_back(sim, si, sf, ei, ef, req, reqf, running, batches, series_f, series_i)


def _write_back(sim, si, sf, ei, ef, req, reqf, running, batches, series_f, series_i) -> None:
    """Leave in ``sim`` what the Python engine leaves there after its run."""
    book, num = sim.book, sim.num_requests
    book.computed = req[R_COMPUTED].tolist()
    book.generated = req[R_GENERATED].tolist()
    book.blocks = req[R_BLOCKS].tolist()
    book.preemptions = req[R_PREEMPTIONS].tolist()
    book.replica = req[R_REPLICA].tolist()
    book.first_scheduled_ms = reqf[T_FIRST_SCHEDULED, :num].tolist()
    book.first_token_ms = reqf[T_FIRST_TOKEN, :num].tolist()
    book.finish_ms = reqf[T_FINISH, :num].tolist()
    sim.rejected[:] = req[R_REJECTED].astype(bool)
    sim.finished, sim.events, sim.bad = int(si[S_FINISHED]), int(si[S_EVENTS]), int(si[S_BAD])
    sim.loop.now = float(sf[F_NOW])
    dispatcher = sim.dispatcher
    dispatcher.cursor, dispatcher.in_system = int(si[S_CURSOR]), int(si[S_IN_SYSTEM])
    dispatcher.area, dispatcher._last_ms = float(sf[F_AREA]), float(sf[F_LAST])
    dispatcher._next_rr = int(si[S_NEXT_RR])
    for e, (engine, sched) in enumerate(zip(sim.engines, sim.schedulers, strict=True)):
        es, fs = ei[e], ef[e]
        sched.free_blocks, sched.preemptions = int(es[E_FREE]), int(es[E_PREEMPTIONS])
        sched.peak_used = int(es[E_PEAK])
        sched.running = running[e, : es[E_NUM_RUNNING]].tolist()
        stats = engine.stats
        stats.busy_ms, stats.work_ms = float(fs[G_BUSY]), float(fs[G_WORK])
        stats.comm_ms, stats.flops = float(fs[G_COMM]), float(fs[G_FLOPS])
        stats.steps = int(es[E_STEPS])
        stats.moe_tokens, stats.balance_weighted = float(fs[G_MOE_TOKENS]), float(fs[G_BALANCE])
        stats.dropped_weighted = float(fs[G_DROPPED])
        sim.kv_area[e] = float(fs[G_KV_AREA])
        sim.kv_peak[e] = int(es[E_KV_PEAK])
    sim.prefill_batches = batches[0].tolist()
    sim.decode_batches = batches[1].tolist()
    if sim.kv_series is not None:
        m = int(si[S_SERIES_N])
        sim.kv_series.extend(
            zip(
                series_i[0, :m].tolist(),
                series_f[0, :m].tolist(),
                series_f[1, :m].tolist(),
                series_i[1, :m].tolist(),
                series_i[2, :m].tolist(),
                strict=True,
            )  # fmt: skip
        )

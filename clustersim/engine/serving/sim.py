"""Serving (inference) as a discrete-event simulation: requests, replicas, continuous batching.

On an :class:`~clustersim.engine.serving.loop.EventLoop` (timed callbacks in SimPy's order):
one *arrival* chain (one timeout per distinct arrival time; it hands each request to a
replica through the :class:`Dispatcher`) and one *engine* per set of
data-parallel replicas that step in lockstep because an EP group spans them; see
:mod:`clustersim.engine.serving.step_timer`). No process per request: requests are rows of a
:class:`~clustersim.engine.serving.scheduler.RequestBook`, served by each replica's
:class:`~clustersim.engine.serving.scheduler.ReplicaScheduler`.

An engine loop: ask every member replica's scheduler for its next step, time the step with the
:class:`~clustersim.engine.serving.step_timer.StepTimer`, wait that long (one timeout), then
(after whatever else is due at that time) commit.
When every member's step only decodes, the engine times the whole *run* of identical decode
steps up to the next completion or KV-cache exhaustion at once (the steps differ only in the
context length, so their times are computed together) and waits once; a request that arrives
at one of the engine's replicas during a run cuts the run at the end of the step in progress,
where the scheduler admits it, exactly as if every step had been simulated. So the events grow
with arrivals, completions and prefill steps, not with generated tokens.

Dispatch (``workload.requests.dispatch``): ``round_robin`` (request i to replica i mod DP) or
``least_loaded`` (the replica with the fewest waiting and running requests, lowest index on
ties), decided when the request arrives. A request whose prompt and output cannot fit in a
replica's whole KV cache is rejected on arrival.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from clustersim.costs.serving import KVCapacity, kv_capacity, step_costs
from clustersim.engine.errors import EngineError
from clustersim.engine.serving.kv_usage import KVUsage
from clustersim.engine.serving.loop import URGENT, EventLoop
from clustersim.engine.serving.moe_table import MoEStepTable
from clustersim.engine.serving.requests import Requests
from clustersim.engine.serving.scheduler import ReplicaScheduler, RequestBook, Step
from clustersim.engine.serving.step_timer import MAX_STEPS, StepTimer, StepTiming
from clustersim.engine.training.sim import check_common
from clustersim.layout import Layout
from clustersim.spec.schema import Plan


@dataclass
class EngineStats:
    """What one engine accumulated (times in ms, summed over its steps)."""

    busy_ms: float = 0.0  # rounds: time the engine was stepping
    work_ms: float = 0.0  # stage busy time, summed over stages (compute + communication)
    comm_ms: float = 0.0  # communication inside stage work, plus pipeline sends
    flops: float = 0.0
    steps: int = 0  # model steps (rounds), decode runs counted step by step
    moe_tokens: float = 0.0
    balance_weighted: float = 0.0
    dropped_weighted: float = 0.0


@dataclass
class ServingResult:
    """A simulated serving run: every request's lifecycle, and per-replica accumulators."""

    book: RequestBook
    arrival_ms: np.ndarray
    rejected: np.ndarray  # bool per request
    kv: KVCapacity
    num_replicas: int
    engines: list[list[int]]  # member replicas of each engine
    engine_stats: list[EngineStats]
    kv_area: np.ndarray  # per replica: integral of used blocks over time (block x ms)
    kv_peak: np.ndarray  # per replica: most blocks in use
    in_system_area: float  # integral of requests in the system over time (request x ms)
    events: int  # SimPy timeouts scheduled (steps, runs, cut runs, arrival times)
    preemptions: int
    routing_s: float = 0.0
    # steps of a replica by requests prefilling in them, and by requests decoding in them (a
    # run of decode steps counted step by step); None when unknown (a run read from a trace)
    prefill_batches: np.ndarray | None = None
    decode_batches: np.ndarray | None = None
    # disaggregated deployments (None when colocated): the pools, and per request the decode
    # replica (global index), its KV transfer's time (ms) and bytes (NaN: none)
    pools: list[PoolResult] | None = None
    decode_replica: np.ndarray | None = None
    kv_transfer_ms: np.ndarray | None = None
    kv_transfer_bytes: np.ndarray | None = None
    # KV-cache blocks in use over time, per replica (engine/serving/kv_usage.py); None when
    # not recorded (``kv_series`` of the simulation or its pools left None)
    kv_usage: KVUsage | None = None


@dataclass
class PoolResult:
    """One pool of a disaggregated run: its role, GPUs, layout sizes, where its replicas and
    engines sit in the :class:`ServingResult`'s lists, and its KV cache per replica."""

    role: str  # prefill | decode
    gpus: int
    stages: int
    replicas: int
    first_replica: int  # its replicas are first_replica .. first_replica + replicas - 1
    engines: list[int]  # indices into ServingResult.engines / engine_stats
    kv: KVCapacity


def coupled_replicas(plan: Plan, layout: Layout) -> list[list[int]]:
    """Replicas that step together: connected by an EP group of the first stage."""
    dp = plan.parallel.dp
    parent = list(range(dp))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    if plan.model.moe is not None:
        stage0 = set(range(plan.parallel.tp * dp))
        for group in layout.groups("ep"):
            if group[0] not in stage0:
                continue
            replicas = sorted({layout.coords(r).dp for r in group})
            for other in replicas[1:]:
                parent[root(other)] = root(replicas[0])
    groups: dict[int, list[int]] = {}
    for r in range(dp):
        groups.setdefault(root(r), []).append(r)
    return sorted(groups.values())


def check_serving_supported(plan: Plan, layout: Layout) -> None:
    """Raise :class:`EngineError` when the serving engine cannot simulate ``plan``."""
    check_common(plan, layout, "inference")


def usable_kv(plan: Plan, layout: Layout, where: str = "") -> KVCapacity:
    """The KV cache of a replica of ``plan``; :class:`EngineError` when memory leaves none
    (``where`` prefixes the message, e.g. ``decode pool: ``)."""
    kv = kv_capacity(plan, layout)
    if kv.num_blocks < 1:
        worst = int(np.argmin(kv.free_gib))
        raise EngineError(
            f"{where}no memory is left for the KV cache on pipeline stage {worst}: weights "
            f"{kv.weights_gib[worst]:.1f} GiB + activations "
            f"{kv.activations_gib[worst]:.1f} GiB exceed "
            f"{plan.workload.requests.gpu_memory_utilization:g} x the GPU's memory"
        )
    return kv


COMPILED_RUNS_MIN_REQUESTS = 16384


class Overloaded(Exception):
    """Raised out of :meth:`ServingSim.run` when more requests missed their
    :class:`LatencyLimits` than allowed: the run can no longer meet its SLOs (one argument,
    the message: SimPy re-raises exceptions from their arguments)."""


@dataclass(frozen=True)
class LatencyLimits:
    """Per-request limits (ms) and how many requests may miss them before the run stops
    (:class:`Overloaded`); a rejected request misses them."""

    ttft_ms: float = math.inf
    tpot_ms: float = math.inf
    latency_ms: float = math.inf
    allowed_bad: int = 0


class Dispatcher:
    """Hands arriving requests to replicas and keeps the in-system count."""

    def __init__(self, sim: ServingSim):
        self.sim = sim
        self.cursor = 0
        self.in_system = 0
        self.area = 0.0
        self._last_ms = 0.0
        self._next_rr = 0
        # arrival times as Python floats and a sentinel past the last (cheap comparisons)
        self._arrival = [*sim.arrival_ms.tolist(), math.inf]
        self._least_loaded = sim.plan.workload.requests.dispatch == "least_loaded"

    def advance_to(self, now: float) -> None:
        """Dispatch every request that has arrived by ``now``."""
        arrival = self._arrival
        while arrival[self.cursor] <= now:
            self._dispatch(self.cursor, now)
            self.cursor += 1

    def advance_through(self, index: int, now: float) -> None:
        """Dispatch every request up to ``index`` (the arrival process's own wake-up)."""
        while self.cursor <= index:
            self._dispatch(self.cursor, now)
            self.cursor += 1

    def count(self, delta: int, now: float) -> None:
        """A request enters (+1) or leaves (-1) the system at ``now``."""
        self.area += self.in_system * (now - self._last_ms)
        self._last_ms = now
        self.in_system += delta

    def _dispatch(self, rid: int, now: float) -> None:
        sim = self.sim
        scheds = sim.schedulers
        if self._least_loaded:
            replica = min(range(len(scheds)), key=lambda r: (scheds[r].load, r))
        else:
            replica, self._next_rr = self._next_rr, (self._next_rr + 1) % len(scheds)
        sim.book.replica[rid] = replica
        if not scheds[replica].fits(rid):
            sim.rejected[rid] = True
            if sim.limits is not None:
                sim.count_bad(1)
            sim.on_finished(1)
            return
        self.count(+1, now)
        scheds[replica].add(rid)
        sim.engines[sim.engine_of[replica]].notify(now)


class Engine:
    """One lockstep group of replicas, driven by the event loop (module docstring)."""

    def __init__(self, sim: ServingSim, index: int, members: list[int], pool=None):
        """``pool``: what holds the members' schedulers, timer, micro-batch count and KV
        accumulators (``schedulers``, ``timer``, ``num_microbatches``, ``kv_area``,
        ``kv_peak``, ``kv_series``, ``hands_off``); the simulation itself for a colocated
        deployment."""
        self.sim, self.index, self.members = sim, index, members
        self.pool = pool = sim if pool is None else pool
        self.loop = sim.loop
        self.stats = EngineStats()
        self._idle = False
        self._generation = 0
        self._steps: list[Step | None] = []  # the members' current step (None: idle member)
        self._timing: StepTiming | None = None
        self._ends: list[float] | np.ndarray = []  # end time of each step of the current run
        self._run_steps = 0  # steps of the current run (0: none)
        self._start_ms = 0.0
        self._used_at_start: list[int] = []
        self._scheds = [pool.schedulers[m] for m in members]
        # one replica of one micro-batch (dense models, EP inside the replica): the timer's
        # one-micro-batch case directly (_plan_solo)
        self._solo = len(members) == 1 and pool.num_microbatches == 1

    # ---- waking ----------------------------------------------------------------------------
    def notify(self, now: float) -> None:
        """A request arrived at a member: wake the engine, or cut its run of decode steps."""
        if self._idle:
            self._idle = False
            self.loop.call_soon(self.start)
        elif self._run_steps > 1:
            j = int(self._ends.searchsorted(now, "left"))
            if j + 1 < self._run_steps:
                self._run_steps = j + 1
                self._arm(float(self._ends[j]))

    def _arm(self, at_ms: float) -> None:
        self._generation += 1
        generation = self._generation
        self.sim.events += 1
        loop = self.loop
        delay = at_ms - loop.now
        loop.call_later(delay if delay > 0.0 else 0.0, lambda: self._fire(generation))

    def _fire(self, generation: int) -> None:
        """The end of the step or run in progress, unless it was cut (then a later timer
        ends it): wake the engine after whatever else is due now."""
        if generation == self._generation:
            self.loop.call_soon_or_now(self._wake)

    # ---- the loop --------------------------------------------------------------------------
    def _wake(self) -> None:
        """Commit the step or run that ended, then start the next."""
        self._commit()
        self.start()

    def start(self) -> None:
        """Dispatch what has arrived, then plan the next step or run and set its timer; or
        idle until a request arrives (``notify``). When the timer's entry would be the
        loop's next one (nothing else due until the step ends), the loop's time moves to
        its end and the step is committed here, and the next planned: what the entry would
        have done, in the same order, without the heap."""
        sim, loop = self.sim, self.loop
        while True:
            now = loop.now
            sim.dispatcher.advance_to(now)
            if not (self._plan_solo(now) if self._solo else self._plan(now)):
                if sim.finished != sim.num_requests:
                    self._idle = True
                return
            at_ms = float(self._ends[self._run_steps - 1])  # a Python float: cheap
            delay = at_ms - now
            if not loop.advance_if_next(delay if delay > 0.0 else 0.0):
                self._arm(at_ms)
                return
            self._generation += 1  # (as _arm: a timer set before is stale)
            sim.events += 1
            self._commit()

    def _plan(self, now: float) -> bool:
        """Schedule the members' next step (or run); False when none has work."""
        sim = self.sim
        scheds = self._scheds
        steps = [s.schedule() for s in scheds]
        aggs, run = [], MAX_STEPS
        v = self.pool.num_microbatches
        first = sim.book.first_scheduled_ms
        for sched, st in zip(scheds, steps, strict=True):
            if st is not None:
                if st.admitted:
                    for rid in st.ids[len(st.ids) - st.admitted :]:
                        if first[rid] != first[rid]:  # NaN: never scheduled before
                            first[rid] = now
                aggs.append(st.aggregates(v))
                run = sched.run_length(st, run) if st.decode_only else 1
        if not aggs:
            if any(s.waiting and not s.held_blocks for s in scheds):
                raise RuntimeError("a replica has waiting requests but cannot schedule any")
            return False
        timing = self.pool.timer.time(aggs, run, len(scheds))
        self._steps, self._timing = steps, timing
        if run == 1:
            self._ends = [now + timing.round_ms[0]]
        else:
            cum = timing.cum_ms if timing.cum_ms is not None else np.cumsum(timing.round_ms)
            self._ends = now + cum
        self._run_steps = run
        self._start_ms = now
        self._used_at_start = [s.num_blocks - s.free_blocks for s in scheds]
        return True

    def _plan_solo(self, now: float) -> bool:
        """:meth:`_plan` for an engine of one replica with one micro-batch: the same step
        and timing, without the engine-wide aggregates."""
        sched = self._scheds[0]
        st = sched.schedule()
        if st is None:
            if sched.waiting and not sched.held_blocks:
                raise RuntimeError("a replica has waiting requests but cannot schedule any")
            return False
        if st.admitted:
            first = self.sim.book.first_scheduled_ms
            ids = st.ids
            for rid in ids[len(ids) - st.admitted :]:
                if first[rid] != first[rid]:  # NaN: never scheduled before
                    first[rid] = now
        run = sched.run_length(st, MAX_STEPS) if st.decode_only else 1
        timing = self.pool.timer.time_one(st.tokens, len(st.ids), st.pairs, st.kv_read, run)
        self._steps, self._timing = [st], timing
        if run == 1:
            self._ends = [now + timing.round_ms[0]]
        else:
            cum = timing.cum_ms
            ends = timing.round_ms.cumsum() if cum is None else cum
            ends += now  # now + the running sums (a fresh array)
            self._ends = ends
        self._run_steps = run
        self._start_ms = now
        self._used_at_start = [sched.num_blocks - sched.free_blocks]
        return True

    def _commit(self) -> None:
        sim, k, t = self.sim, self._run_steps, self._timing
        end = float(self._ends[k - 1])
        stats = self.stats
        rounds, work, comm, flops = t.totals(k)
        stats.busy_ms += rounds
        stats.work_ms += work
        stats.comm_ms += comm
        stats.flops += flops
        stats.steps += k
        if t.moe_tokens:  # (adding zeros changes nothing)
            stats.moe_tokens += t.moe_tokens * k
            stats.balance_weighted += t.balance_pct * t.moe_tokens * k
            stats.dropped_weighted += t.dropped_pct * t.moe_tokens * k
        duration = end - self._start_ms
        pool = self.pool
        kv_area, kv_peak = pool.kv_area, pool.kv_peak
        series = pool.kv_series  # a list to append (replica, start, end, used, used) to, or None
        for m, sched, st, used0 in zip(
            self.members, self._scheds, self._steps, self._used_at_start, strict=True
        ):
            if st is None:
                kv_area[m] += used0 * duration
                if series is not None:
                    series.append((m, self._start_ms, end, used0, used0))
                continue
            sim.decode_batches[st.decodes] += k
            if len(st.ids) > st.decodes:
                sim.prefill_batches[len(st.ids) - st.decodes] += 1
            finished = sched.commit(st, k, end)
            if pool.hands_off and sched.handoffs:
                sim.hand_off(m, sched.handoffs, end)
            peak = sched.peak_used
            kv_area[m] += 0.5 * (used0 + peak) * duration
            if series is not None:
                series.append((m, self._start_ms, end, used0, peak))
            if peak > kv_peak[m]:
                kv_peak[m] = peak
            if finished:
                sim.dispatcher.count(-len(finished), end)
                if sim.limits is not None:
                    sim.judge_finished(finished)
                sim.on_finished(len(finished))
        self._run_steps = 0


class ServingSim:
    """Simulates serving ``requests`` under ``plan`` (module docstring)."""

    # run in the compiled loop (engine/serving/solo_kernel.py): None lets
    # use_compiled_engine decide, True forces it where eligible, False never
    compiled_engine: bool | None = None

    def __init__(
        self,
        plan: Plan,
        requests: Requests,
        progress: Callable[[float], None] | None = None,
        *,
        table: MoEStepTable | None = None,
        limits: LatencyLimits | None = None,
        timer: StepTimer | None = None,
    ):
        """``table``: the MoE step table of this plan's model, layout and routing (built when
        None; it does not depend on the request stream, so runs of one deployment at several
        request rates may share it). ``limits``: stop early (:class:`Overloaded`) once more
        requests than allowed missed them. ``timer``: the step timer (``self.timer``) of an
        earlier simulation of the same deployment, with its table, reused with the step
        constants it memoised (they do not depend on the request stream either)."""
        self.plan = plan
        self.layout = layout = Layout(plan)
        check_serving_supported(plan, layout)
        req = plan.workload.requests
        self.kv = usable_kv(plan, layout)
        if timer is not None:
            table = timer.table
        elif table is None and plan.model.moe is not None:
            table = MoEStepTable(plan, layout)
        self.table = table
        if timer is None:
            timer = StepTimer(plan, step_costs(plan, layout), table)
        self.timer = timer
        # the compiled run timer gives the same numbers; loading numba (~0.5 s) pays off on
        # long simulations, or costs nothing when routing has loaded it already (MoE)
        self.timer.compiled_runs = (
            requests.num >= COMPILED_RUNS_MIN_REQUESTS or "numba" in sys.modules
        )
        self.num_microbatches = plan.parallel.pp
        self.arrival_ms = np.asarray(requests.arrival_ms, dtype=np.float64)
        self.num_requests = requests.num
        self.book = RequestBook(requests.prompt_tokens, requests.output_tokens)
        self.rejected = np.zeros(self.num_requests, dtype=bool)
        self.finished = 0
        self.events = 0
        self.loop = EventLoop()
        dp = plan.parallel.dp
        self.schedulers = [
            ReplicaScheduler(
                self.book,
                self.kv.num_blocks,
                req.kv_block_size,
                req.max_batch_size,
                req.max_num_batched_tokens,
                req.chunked_prefill,
            )
            for _ in range(dp)
        ]
        groups = coupled_replicas(plan, layout)
        self.engines = [Engine(self, i, members) for i, members in enumerate(groups)]
        self.engine_of = {m: i for i, members in enumerate(groups) for m in members}
        self.dispatcher = Dispatcher(self)
        self.kv_area = [0.0] * dp  # lists while running (cheap scalar access), arrays after
        self.kv_peak = [0] * dp
        self.prefill_batches = [0] * (req.max_batch_size + 1)
        self.decode_batches = [0] * (req.max_batch_size + 1)
        self.limits = limits
        self.hands_off = False  # colocated: no replica hands requests to another
        self.kv_series: list[tuple] | None = None  # engine/serving/kv_usage.py records into it
        self.bad = 0
        self._progress = progress
        self._progress_every = max(1, self.num_requests // 100)

    def on_finished(self, count: int) -> None:
        """Requests completed; report progress every 1%."""
        if not count:
            return
        before, every = self.finished, self._progress_every
        self.finished += count
        if self._progress and before // every != self.finished // every:
            self._progress(self.finished / self.num_requests)

    def count_bad(self, count: int) -> None:
        """Requests that missed the limits; raise :class:`Overloaded` past the allowance."""
        self.bad += count
        if self.bad > self.limits.allowed_bad:
            raise Overloaded(f"{self.bad} requests missed their limits, {self.finished} finished")

    def judge_finished(self, finished: list[int]) -> None:
        """Count the just-finished requests that missed the limits."""
        book, lim, arrival = self.book, self.limits, self.arrival_ms
        bad = 0
        for rid in finished:
            t0, first, end = float(arrival[rid]), book.first_token_ms[rid], book.finish_ms[rid]
            out = book.output[rid]
            tpot = (end - first) / (out - 1) if out > 1 else 0.0
            if first - t0 > lim.ttft_ms or tpot > lim.tpot_ms or end - t0 > lim.latency_ms:
                bad += 1
        if bad:
            self.count_bad(bad)

    def _arrivals(self) -> None:
        """Dispatch the requests of each distinct arrival time at that time."""
        times = self.arrival_ms
        last = np.flatnonzero(np.append(times[1:] != times[:-1], True))  # last of equal times
        pending = iter(last.tolist())
        loop = self.loop

        def resume(index: int) -> None:
            self.dispatcher.advance_through(index, loop.now)
            advance()

        def advance() -> None:
            for index in pending:
                at = float(times[index])
                if at > loop.now:
                    self.events += 1
                    loop.call_later(at - loop.now, lambda i=index: resume(i))
                    return
                self.dispatcher.advance_through(index, loop.now)

        advance()

    def compiled_engine_eligible(self) -> bool:
        """Whether the compiled loop covers this simulation: every engine one replica with
        one micro-batch (``pp = 1``, no EP group across replicas; engine/serving/
        solo_kernel.py)."""
        return (
            all(e._solo and e.members == [i] for i, e in enumerate(self.engines))
            and not self.hands_off
            and self.plan.workload.requests.max_batch_size < 1 << 24
        )

    def use_compiled_engine(self) -> bool:
        """Whether :meth:`run` runs in the compiled loop: eligible, and either forced
        (``compiled_engine``) or, by default, when loading numba (~0.9 s of CPU once per
        process) pays off (``COMPILED_RUNS_MIN_REQUESTS`` requests) or costs nothing
        (numba loaded already)."""
        if self.compiled_engine is False or not self.compiled_engine_eligible():
            return False
        return (
            self.compiled_engine is True
            or self.num_requests >= COMPILED_RUNS_MIN_REQUESTS
            or "numba" in sys.modules
        )

    def run(self) -> ServingResult:
        """Simulate until every request has finished (or was rejected)."""
        if self.use_compiled_engine():
            from clustersim.engine.serving import solo_kernel  # numba: imported when needed

            solo_kernel.run_solo(self)
        else:
            self.loop.call_soon(self._arrivals, URGENT)
            for engine in self.engines:
                self.loop.call_soon(engine.start, URGENT)
            self.loop.run()
        if self.finished != self.num_requests:
            raise RuntimeError(
                f"simulation stopped with {self.num_requests - self.finished} requests unserved"
            )
        return ServingResult(
            book=self.book,
            arrival_ms=self.arrival_ms,
            rejected=self.rejected,
            kv=self.kv,
            num_replicas=self.plan.parallel.dp,
            engines=[e.members for e in self.engines],
            engine_stats=[e.stats for e in self.engines],
            kv_area=np.array(self.kv_area, dtype=np.float64),
            kv_peak=np.array(self.kv_peak, dtype=np.int64),
            in_system_area=self.dispatcher.area,
            events=self.events,
            preemptions=sum(s.preemptions for s in self.schedulers),
            prefill_batches=np.array(self.prefill_batches, dtype=np.int64),
            decode_batches=np.array(self.decode_batches, dtype=np.int64),
            routing_s=self.table.build_s if self.table else 0.0,
        )

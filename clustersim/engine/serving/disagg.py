"""Disaggregated serving: a prefill pool and a decode pool of replicas, with KV-cache transfer.

A plan with ``parallel.prefill`` and ``parallel.decode`` runs each pool as a deployment of its
own (:meth:`~clustersim.spec.schema.Plan.pool`: its layout, KV cache, step costs, MoE table,
and engines of replicas coupled by an EP group, so a decode pool of attention DP with EP
across all its GPUs steps as one engine), on the same event loop and request book
(:mod:`clustersim.engine.serving.sim`):

1. an arriving request goes to a prefill replica (``workload.requests.dispatch``), which
   schedules it as a colocated replica would (chunked prefill or not, as configured); the step
   that completes its prompt yields the first token (TTFT ends there);
2. the request then leaves the prefill replica, its KV blocks still held there, and is given
   to a decode replica (the same dispatch policy over the decode replicas, counting the
   transfers under way to each as load); its KV cache -- the prompt's tokens -- crosses from
   the prefill replica's GPUs to the decode replica's in one timed event: every GPU sends its
   own shard over its own link in parallel, so the transfer takes
   ``p2p_ms(prompt x bytes per token of the largest shard, link)``, the shard being one GPU's
   KV bytes per token over its stage's layers (:func:`~clustersim.costs.serving.kv_capacity`,
   the cache's own figure: GQA heads split by TP, the MLA latent whole) on either side,
   and the link the calibrated point-to-point link between the two replicas' first GPUs
   (:func:`~clustersim.costs.comm.p2p_link`: NVLink inside one NVLink domain, else the
   network). Transfers in flight at once share ports (:mod:`~clustersim.engine.serving.kv_links`):
   each leaves through its prefill replica's port and enters through its decode replica's
   (NVLink, or the network port when it crosses NVLink domains), the data time of
   concurrent transfers on a port shares it max-min fairly, re-solved at every start and
   data end, and the link's latency follows the last byte; a transfer alone on its ports
   takes exactly ``p2p_ms`` (its ``kv_transfer_ms`` is then that figure, else its arrival
   minus its first token);
3. when it arrives, the prefill replica frees the blocks and the request waits in the decode
   replica's queue until that replica has blocks and a batch slot for it (the decode pool
   admits as chunked prefill does: the newcomer joins the running batch with one token on
   top of its transferred context; a request preempted there recomputes on the decode
   replica), then decodes there to its last token.

Ranks: the prefill pool holds ranks ``0 .. P-1``, the decode pool ``P .. P+D-1``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

from clustersim.costs.comm import p2p_link, p2p_ms, transfer_ms
from clustersim.costs.memory import kv_cache_bytes_per_token_layer
from clustersim.costs.serving import step_costs
from clustersim.engine.errors import EngineError
from clustersim.engine.serving.kv_links import PortSharing
from clustersim.engine.serving.loop import EventLoop
from clustersim.engine.serving.moe_table import MoEStepTable
from clustersim.engine.serving.requests import Requests
from clustersim.engine.serving.scheduler import PrefillScheduler, ReplicaScheduler, RequestBook
from clustersim.engine.serving.sim import (
    COMPILED_RUNS_MIN_REQUESTS,
    Dispatcher,
    Engine,
    LatencyLimits,
    PoolResult,
    ServingResult,
    ServingSim,
    check_serving_supported,
    coupled_replicas,
    usable_kv,
)
from clustersim.engine.serving.step_timer import StepTimer
from clustersim.layout import Layout
from clustersim.spec.schema import ModelSpec, Plan

POOLS = ("prefill", "decode")


def kv_transfer_bytes(model: ModelSpec, tokens: int, kv_dtype: str | None = None) -> float:
    """Bytes of one request's KV cache of ``tokens`` tokens, the whole model's: K and V,
    ``2 x layers x KV heads x head size x tokens x bytes``; MLA, its latent
    ``layers x (kv_lora_rank + qk_rope_head_dim) x tokens x bytes`` (the cache's own figure
    per token and layer, :func:`~clustersim.costs.memory.kv_cache_bytes_per_token_layer`, at
    TP 1)."""
    return kv_cache_bytes_per_token_layer(model, 1, kv_dtype) * model.num_layers * tokens


class Pool:
    """One pool of a disaggregated deployment: its plan, layout, schedulers and timer, and
    the accumulators its engines fill (the attributes :class:`Engine` reads)."""

    def __init__(
        self,
        plan: Plan,
        role: str,
        book: RequestBook,
        num_requests: int,
        downstream: ReplicaScheduler | None = None,
        table: MoEStepTable | None = None,
    ):
        self.plan, self.role = plan, role
        self.layout = layout = Layout(plan)
        try:
            check_serving_supported(plan, layout)
        except EngineError as exc:
            raise EngineError(f"{role} pool: {exc}") from None
        self.kv = usable_kv(plan, layout, f"{role} pool: ")
        if table is None and plan.model.moe is not None:
            table = MoEStepTable(plan, layout)
        self.table = table
        self.timer = StepTimer(plan, step_costs(plan, layout), table)
        self.timer.compiled_runs = (
            num_requests >= COMPILED_RUNS_MIN_REQUESTS or "numba" in sys.modules
        )
        self.num_microbatches = plan.parallel.pp
        self.hands_off = role == "prefill"
        req, dp = plan.workload.requests, plan.parallel.dp
        args = (book, self.kv.num_blocks, req.kv_block_size, req.max_batch_size)
        budget = req.max_num_batched_tokens
        if role == "prefill":
            self.schedulers: list[ReplicaScheduler] = [
                PrefillScheduler(*args, budget, req.chunked_prefill, downstream=downstream)
                for _ in range(dp)
            ]
        else:  # transferred requests join the running batch (module docstring)
            self.schedulers = [ReplicaScheduler(*args, budget, True) for _ in range(dp)]
        self.groups = coupled_replicas(plan, layout)
        self.engines: list[Engine] = []
        self.engine_of: dict[int, int] = {}
        self.kv_area = [0.0] * dp
        self.kv_peak = [0] * dp
        self.kv_series: list[tuple] | None = None  # engine/serving/kv_usage.py records into it

    def start_engines(self, sim: DisaggregatedSim, first_index: int) -> None:
        """One engine per group of coupled replicas."""
        self.engines = [
            Engine(sim, first_index + i, members, pool=self)
            for i, members in enumerate(self.groups)
        ]
        self.engine_of = {m: i for i, members in enumerate(self.groups) for m in members}

    def first_gpu(self, replica: int) -> int:
        """Rank (within the pool) of the first GPU of ``replica``."""
        return self.layout.rank_of(dp=replica)


class DisaggregatedSim(ServingSim):
    """Simulates serving ``requests`` under a disaggregated ``plan`` (module docstring)."""

    def __init__(
        self,
        plan: Plan,
        requests: Requests,
        progress: Callable[[float], None] | None = None,
        *,
        tables: dict[str, MoEStepTable | None] | None = None,
        limits: LatencyLimits | None = None,
    ):
        """``tables``: each pool's MoE step table (built when absent; runs of one deployment
        at several rates may share them). ``limits``: as :class:`ServingSim`."""
        if not plan.parallel.disaggregated:
            raise EngineError("a disaggregated simulation needs parallel.prefill and decode")
        self.plan = plan
        self.layout = Layout(plan)
        self.loop = EventLoop()
        tables = tables or {}
        self.arrival_ms = np.asarray(requests.arrival_ms, dtype=np.float64)
        self.num_requests = n = requests.num
        self.book = RequestBook(requests.prompt_tokens, requests.output_tokens)
        self.decode = Pool(plan.pool("decode"), "decode", self.book, n, None, tables.get("decode"))
        self.prefill = Pool(
            plan.pool("prefill"),
            "prefill",
            self.book,
            n,
            self.decode.schedulers[0],
            tables.get("prefill"),
        )
        self.prefill.start_engines(self, 0)
        self.decode.start_engines(self, len(self.prefill.engines))
        self.kv = self.decode.kv
        # what the Dispatcher and the arrival process see: the prefill pool
        self.schedulers = self.prefill.schedulers
        self.engines = self.prefill.engines
        self.engine_of = self.prefill.engine_of
        self.timer = self.prefill.timer
        self.table = self.prefill.table
        self.num_microbatches = self.prefill.num_microbatches
        self.kv_area, self.kv_peak = self.prefill.kv_area, self.prefill.kv_peak
        self.hands_off = True
        self.rejected = np.zeros(n, dtype=bool)
        self.finished = 0
        self.events = 0
        self.dispatcher = Dispatcher(self)
        max_batch = max(  # each pool may have its own (workload.requests.<pool>)
            pool.plan.workload.requests.max_batch_size for pool in (self.prefill, self.decode)
        )
        self.prefill_batches = [0] * (max_batch + 1)
        self.decode_batches = [0] * (max_batch + 1)
        self.limits = limits
        self.bad = 0
        self._progress = progress
        self._progress_every = max(1, n // 100)
        self._links = self._transfer_links()
        shard = max(max(self.prefill.kv.bytes_per_token), max(self.decode.kv.bytes_per_token))
        self._shard_bytes_per_token = shard
        self.decode_replica = [-1] * n
        self.transfer_ms = [float("nan")] * n
        self._incoming = [0] * len(self.decode.schedulers)
        self._next_decode = 0
        self._ports = PortSharing()
        self._src = [-1] * n  # each transfer's prefill replica
        self._latency_ms = [0.0] * n  # each transfer's link latency, after its last byte
        self._arrival_gen = [0] * n  # a transfer's arrival callback counts when it matches
        self._ports_gen = 0  # likewise the port-sharing timer

    def _transfer_links(self) -> list[list[tuple[float, float, bool]]]:
        """(bandwidth GB/s, latency µs, crosses NVLink domains) of the link from each prefill
        replica to each decode replica (their first GPUs; module docstring)."""
        plan, hw = self.plan, self.plan.hardware
        base = plan.pool_first_rank("decode")
        out = []
        for p in range(len(self.prefill.schedulers)):
            src = self.prefill.first_gpu(p)
            row = []
            for d in range(len(self.decode.schedulers)):
                link = p2p_link([src, base + self.decode.first_gpu(d)], hw.gpus_per_node, hw)
                row.append((link.bandwidth_gbps, link.latency_us, link.crosses_nodes))
            out.append(row)
        return out

    # ---- hand-off and transfer ---------------------------------------------------------------
    def _decode_replica(self) -> int:
        scheds = self.decode.schedulers
        if self.plan.workload.requests.dispatch == "least_loaded":
            incoming = self._incoming
            return min(range(len(scheds)), key=lambda r: (scheds[r].load + incoming[r], r))
        d, self._next_decode = self._next_decode, (self._next_decode + 1) % len(scheds)
        return d

    def hand_off(self, replica: int, rids: list[int], end_ms: float) -> None:
        """Requests of prefill ``replica`` that produced their first token at ``end_ms``:
        start their KV transfers over the ports they share (module docstring)."""
        loop, prompt, ports = self.loop, self.book.prompt, self._ports
        for rid in rids:
            d = self._decode_replica()
            bandwidth_gbps, latency_us, crosses = self._links[replica][d]
            size = prompt[rid] * self._shard_bytes_per_token
            ms = p2p_ms(size, bandwidth_gbps, latency_us)
            self.decode_replica[rid] = d
            self._src[rid] = replica
            self.transfer_ms[rid] = ms
            self._latency_ms[rid] = latency_us * 1e-3
            self._incoming[d] += 1
            self.events += 1
            moved = ports.start(
                loop.now,
                rid,
                transfer_ms(size, bandwidth_gbps),
                (("out", replica, crosses), ("in", d, crosses)),
            )
            for tid in moved:
                if tid == rid and ports.full_speed(rid):  # alone: exactly the unshared link
                    self._arrive_in(rid, max(0.0, end_ms + ms - loop.now), replica, d)
                else:
                    self._arrive_at(tid)
            self._arm_ports()

    def _arrive_in(self, rid: int, delay_ms: float, replica: int, d: int) -> None:
        self._arrival_gen[rid] += 1
        gen = self._arrival_gen[rid]
        self.loop.call_later(delay_ms, lambda: self._transferred(replica, rid, d, gen))

    def _arrive_at(self, rid: int) -> None:
        """(Re)schedule a slowed transfer's arrival: its data end plus its link's latency."""
        loop = self.loop
        at = self._ports.data_end_ms(rid) + self._latency_ms[rid]
        self.transfer_ms[rid] = float("nan")  # measured at arrival
        self._arrive_in(rid, max(0.0, at - loop.now), self._src[rid], self.decode_replica[rid])

    def _arm_ports(self) -> None:
        """Wake at the next data end that speeds other transfers up (if any)."""
        at = self._ports.next_change_ms()
        self._ports_gen += 1
        if at is None:
            return
        gen = self._ports_gen
        self.events += 1
        self.loop.call_later(max(0.0, at - self.loop.now), lambda: self._ports_due(gen))

    def _ports_due(self, gen: int) -> None:
        if gen != self._ports_gen:
            return
        for tid in self._ports.expire(self.loop.now):
            self._arrive_at(tid)
        self._arm_ports()

    def _transferred(self, replica: int, rid: int, d: int, gen: int) -> None:
        """A KV transfer ended: free the prefill blocks (waking the prefill engine when
        requests wait there), queue the request at the decode replica and wake its engine."""
        if gen != self._arrival_gen[rid]:
            return  # rescheduled (its rate changed)
        now = self.loop.now
        if self.transfer_ms[rid] != self.transfer_ms[rid]:  # slowed: measured
            self.transfer_ms[rid] = now - self.book.first_token_ms[rid]
        sched = self.prefill.schedulers[replica]
        sched.release(rid)
        if sched.waiting:  # the freed blocks may admit a waiting request
            self.prefill.engines[self.prefill.engine_of[replica]].notify(now)
        self._incoming[d] -= 1
        self.decode.schedulers[d].add(rid)
        self.decode.engines[self.decode.engine_of[d]].notify(now)

    # ---- running -------------------------------------------------------------------------------
    def run(self) -> ServingResult:
        """Simulate until every request has finished (or was rejected)."""
        from clustersim.engine.serving.loop import URGENT

        self.loop.call_soon(self._arrivals, URGENT)
        for engine in self.prefill.engines + self.decode.engines:
            self.loop.call_soon(engine.start, URGENT)
        self.loop.run()
        if self.finished != self.num_requests:
            raise RuntimeError(
                f"simulation stopped with {self.num_requests - self.finished} requests unserved"
            )
        return self._result()

    def _result(self) -> ServingResult:
        pools, engines, stats, first = [], [], [], 0
        for pool in (self.prefill, self.decode):
            index = list(range(len(engines), len(engines) + len(pool.engines)))
            engines += [[first + m for m in e.members] for e in pool.engines]
            stats += [e.stats for e in pool.engines]
            par = pool.plan.parallel
            pools.append(
                PoolResult(pool.role, par.pool_world_size, par.pp, par.dp, first, index, pool.kv)
            )
            first += par.dp
        decode_first = pools[1].first_replica
        model, kv_dtype = self.plan.model, self.plan.workload.requests.kv_dtype
        per_token = kv_transfer_bytes(model, 1, kv_dtype)
        transfer = np.array(self.transfer_ms, dtype=np.float64)
        moved = ~np.isnan(transfer)
        prompt = np.array(self.book.prompt, dtype=np.float64)
        decode_replica = np.array(self.decode_replica, dtype=np.int32)
        decode_replica[decode_replica >= 0] += decode_first
        tables = [t for t in (self.prefill.table, self.decode.table) if t is not None]
        scheds = self.prefill.schedulers + self.decode.schedulers
        return ServingResult(
            book=self.book,
            arrival_ms=self.arrival_ms,
            rejected=self.rejected,
            kv=self.decode.kv,
            num_replicas=first,
            engines=engines,
            engine_stats=stats,
            kv_area=np.array(self.prefill.kv_area + self.decode.kv_area, dtype=np.float64),
            kv_peak=np.array(self.prefill.kv_peak + self.decode.kv_peak, dtype=np.int64),
            in_system_area=self.dispatcher.area,
            events=self.events,
            preemptions=sum(s.preemptions for s in scheds),
            prefill_batches=np.array(self.prefill_batches, dtype=np.int64),
            decode_batches=np.array(self.decode_batches, dtype=np.int64),
            routing_s=sum(t.build_s for t in tables),
            pools=pools,
            decode_replica=decode_replica,
            kv_transfer_ms=transfer,
            kv_transfer_bytes=np.where(moved, prompt * per_token, np.nan),
        )

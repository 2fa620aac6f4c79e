"""Time of one serving step (or a run of identical decode steps) of an engine.

An *engine* is a set of ``M`` data-parallel replicas that step in lockstep because their MoE
layers share an EP group (attention data parallelism with EP spanning replicas, the
DeepSeek-V3 style; one replica when EP stays inside it, or for dense models). Each replica's
batch is dealt round-robin into ``V = pp`` micro-batches; micro-batch ``v`` of the engine is
the union of the replicas' micro-batches ``v``.

Per micro-batch ``v`` and pipeline stage ``s`` (costs from :mod:`clustersim.costs.serving`,
per layer kind, times the stage's layers of that kind):

    tau[v, s] = dense_layers[s] * max_m dense(m, v)
              + moe_layers[s] * (max_m attention(m, v) + moe(N_v))
              + [s last] * max_m logits(m, v)

The replicas meet at every MoE layer, so the slowest one's attention gates each layer;
``moe(N_v)`` is the routed part for the ``N_v`` tokens of all replicas
(:class:`clustersim.engine.serving.moe_table.MoEStepTable`).

**Pipeline** (one choice, stated): the replica keeps its micro-batches in flight through the
stages, as vLLM's pipeline-parallel engine does, and every request advances once per *round*.
A round lasts the steady-state cycle time of the cyclic pipeline,

    round = max( max_s sum_v tau[v, s],  max_v (sum_s tau[v, s] + (S - 1) * p2p_v) ),

the busiest stage's work or the longest trip of one micro-batch through all stages, whichever
is longer. With one stage it is the step time; a single request pays its full trip through
the stages. All requests of a round get their tokens at its end.

A run of ``K`` decode steps differs from step to step only in the context the attention
reads (one token more per request per step), so all ``K`` round times come from one
vectorised evaluation. In a decode step a micro-batch's query-key pairs equal its KV reads
(``sum(context + 1)``), so its core attention, and with one micro-batch in the engine its
round time, is a function of that one integer, growing by the batch size ``n`` per step:
the timer keeps tables of them per ``n`` and residue of the context mod ``n``, and a run
reads its ``K`` values as a slice (the same operations as the direct evaluation, so the
same numbers; the direct evaluation remains for tables that would exceed
``RUN_TABLE_MAX`` entries).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from clustersim.costs.params import count_params
from clustersim.costs.serving import StepCosts, core_attention_ms, head_dims
from clustersim.engine.serving.moe_table import MoEStepTable
from clustersim.engine.serving.run_kernel import run_rounds
from clustersim.spec.schema import Plan

MAX_STEPS = 1 << 14  # decode steps timed at once, at most
PARTS_CACHE_SIZE = 1 << 16  # memoised per-batch-size layer times
RUN_TABLE_MIN = 1024  # entries of a new table of decode round times
RUN_TABLE_MAX = 1 << 22  # entries of all tables of decode round times together (32 MiB)


class StepTiming(NamedTuple):
    """A step, or a run of K identical decode steps: each step's round time (length K), stage
    work (compute + communication, summed over the GPUs' stages: ``work_ms`` per step, or
    when None the round time plus ``work_offset_ms``), communication per step (constant over a
    run), model FLOPs of the first step and their growth per step, and the MoE token copies
    routed per step with their mean load balance and drop percentages."""

    round_ms: np.ndarray | list[float]
    work_ms: np.ndarray | list[float] | None
    work_offset_ms: float
    comm_ms: float
    flops: float
    flops_growth: float
    moe_tokens: float
    balance_pct: float
    dropped_pct: float
    cum_ms: np.ndarray | None = None  # running sums of round_ms, when already computed

    def totals(self, steps: int) -> tuple[float, float, float, float]:
        """(round, work, communication, FLOPs) summed over the first ``steps`` steps."""
        if steps == 1:
            rounds = float(self.round_ms[0])
            work = rounds + self.work_offset_ms if self.work_ms is None else self.work_ms[0]
            return rounds, float(work), self.comm_ms, self.flops
        rounds = float(np.add.reduce(self.round_ms[:steps]))
        if self.work_ms is None:
            work = rounds + steps * self.work_offset_ms
        else:
            work = float(np.add.reduce(self.work_ms[:steps]))
        flops = steps * self.flops + self.flops_growth * steps * (steps - 1) / 2
        return rounds, work, steps * self.comm_ms, flops


class _Tally:
    """Sums over the replicas and micro-batches of one step (see :meth:`StepTimer.time`)."""

    def __init__(self) -> None:
        self.work = 0.0  # a float, or an array over the steps of a run
        self.comm = self.flops = self.flops_growth = 0.0
        self.moe_ms = self.moe_comm_ms = self.moe_tokens = 0.0
        self._balance = self._dropped = 0.0

    def add_moe(self, ms: float, comm: float, balance: float, dropped: float, routed: float):
        """One micro-batch's MoE layer time, communication and routing statistics."""
        self.moe_ms += ms
        self.moe_comm_ms += comm
        self.moe_tokens += routed
        self._balance += balance * routed
        self._dropped += dropped * routed

    def routing(self) -> tuple[float, float]:
        """Token-weighted mean load balance and drop percentages."""
        if not self.moe_tokens:
            return 100.0, 0.0
        return self._balance / self.moe_tokens, self._dropped / self.moe_tokens


class StepTimer:
    """Times steps of an engine of a plan (module docstring)."""

    def __init__(self, plan: Plan, costs: StepCosts, table: MoEStepTable | None):
        self.c, self.table = costs, table
        self.compiled_runs = False  # time runs of decode steps with run_kernel.py (ServingSim)
        self.dense_layers = [float(x) for x in costs.dense_layers]
        self.moe_layers = [float(x) for x in costs.moe_layers]
        self.num_stages = len(self.dense_layers)
        self.total_dense = sum(self.dense_layers)
        self.total_moe = sum(self.moe_layers)
        self._j = np.arange(MAX_STEPS, dtype=np.float64)
        self._parts_cache: dict[tuple[float, float], tuple[float, float, float, float, float]] = {}
        self._one_cache: dict[tuple, tuple] = {}
        self._mb_cache: dict[tuple, tuple] = {}
        self._run_tables: dict[tuple, tuple[int, np.ndarray]] = {}  # (kind, r) -> (lo, table)
        self._run_entries = 0
        # the compiled loop's rows of _one's constants (engine/serving/solo_kernel.py), kept
        # with the memos above for later runs that share this timer
        self.solo_constants = None
        model = plan.model
        qk, v = head_dims(model)
        counts = count_params(model)
        linear_params = counts.active_per_token - counts.embedding - counts.output
        self.flops_per_token = 2.0 * linear_params
        self.flops_per_pair = 2.0 * model.num_attention_heads * (qk + v) * model.num_layers
        self.flops_per_seq = 2.0 * model.hidden_size * model.vocab_size

    def _parts(self, n: float, seqs: float) -> tuple[float, ...]:
        """Per-layer times of one replica's micro-batch (:meth:`StepCosts.parts`: dense
        layer, MoE layer's attention block, logits, one TP all-reduce, pipeline send, core
        attention coefficients), memoised: decode batches repeat their sizes."""
        key = (n, seqs)
        found = self._parts_cache.get(key)
        if found is None:
            if len(self._parts_cache) > PARTS_CACHE_SIZE:
                self._parts_cache.clear()
            found = self._parts_cache[key] = self.c.parts(n, seqs)
        return found

    def time(self, aggs: list[list[list[float]]], steps: int, members: int) -> StepTiming:
        """Timing of ``steps`` decode steps (or one step) of an engine of ``members``
        replicas, given the aggregates of its replicas that have work (each four rows of V
        numbers, :meth:`clustersim.engine.serving.scheduler.Step.aggregates`).

        With ``steps > 1`` the core-attention terms, and everything that depends on them, are
        numpy arrays over the steps; otherwise Python floats: one code path for both.
        """
        active = [(agg, v) for agg in aggs for v in range(len(agg[0])) if agg[0][v] > 0]
        if len(active) == 1:
            agg, v = active[0]
            return self._time_one(*(row[v] for row in agg), steps, members)
        vmax = np.maximum if steps > 1 else max
        grow = self._j[:steps] if steps > 1 else 0.0
        tally = _Tally()
        per_mb = [
            self._micro_batch(aggs, v, grow, vmax, tally, steps) for v in range(len(aggs[0][0]))
        ]
        rounds = self._round(per_mb, vmax)
        work = tally.work + members * self.total_moe * tally.moe_ms
        comm = tally.comm + members * self.total_moe * tally.moe_comm_ms
        if steps == 1:
            rounds, work = [rounds], [work]
        balance, dropped = tally.routing()
        return StepTiming(
            rounds,
            work,
            0.0,
            comm,
            tally.flops,
            tally.flops_growth,
            tally.moe_tokens,
            balance,
            dropped,
        )

    def _micro_batch(self, aggs, v: int, grow, vmax, tally: _Tally, steps: int):
        """Per-layer maxima over the replicas of micro-batch ``v`` (dense layer, MoE
        attention block, logits, pipeline send) and its MoE layer time; adds the replicas'
        own work, communication and FLOPs to ``tally``."""
        c = self.c
        layers = self.total_dense + self.total_moe
        dmax = amax = lmax = pmax = tokens = 0.0
        for agg in aggs:
            n = agg[0][v]
            if n <= 0:
                continue
            seqs, pairs, kv = agg[1][v], agg[2][v], agg[3][v]
            parts, own, comm, flops, growth = self._mb(n, seqs)
            dense, attn, logits, _, p2p = parts[:5]
            if steps > 1 and pairs == kv and n == seqs:  # a run of decode steps
                core = self._core_table(parts, n, pairs, steps)
                if core is None:
                    core = core_attention_ms(parts, pairs + n * grow, kv + n * grow, n, c, vmax)
            else:
                core = core_attention_ms(parts, pairs + n * grow, kv + n * grow, n, c, vmax)
            dmax = vmax(dmax, dense + core)
            amax = vmax(amax, attn + core)
            lmax, pmax = max(lmax, logits), max(pmax, p2p)
            tally.work = tally.work + (own + layers * core)
            tally.comm += comm
            tally.flops += flops + self.flops_per_pair * pairs
            tally.flops_growth += growth
            tokens += n
        moe_ms, moe_comm, balance, dropped, routed = self._moe_one(tokens)
        tally.add_moe(moe_ms, moe_comm, balance, dropped, routed)
        return dmax, amax, lmax, pmax, moe_ms

    def time_one(self, n, seqs, pairs, kv, steps: int) -> StepTiming:
        """:meth:`time` of an engine of one replica whose step has one non-empty
        micro-batch, from its four sums (``n`` > 0 tokens)."""
        return self._time_one(n, seqs, pairs, kv, steps, 1)

    def _one(self, n, seqs, members: int) -> tuple:
        """The constants of one non-empty micro-batch of ``n`` tokens over ``seqs`` requests
        in an engine of ``members`` replicas, memoised (decode batches repeat their sizes):
        (parts, round's fixed ms, layers, n x query ms, n x query bytes, communication, work
        offset, FLOPs before the pairs' term, FLOPs growth per step, MoE token copies,
        balance, dropped)."""
        key = (n, seqs, members)
        found = self._one_cache.get(key)
        if found is not None:
            return found
        if len(self._one_cache) > PARTS_CACHE_SIZE:
            self._one_cache.clear()
        c, hops = self.c, self.num_stages - 1
        parts = self._parts(n, seqs)
        dense, attn, logits, allreduce, p2p = parts[:5]
        moe_ms, moe_comm, balance, dropped, routed = self._moe_one(n)
        own = self.total_dense * dense + self.total_moe * attn + logits + hops * p2p
        comm = (
            (2 * self.total_dense + self.total_moe) * allreduce
            + hops * p2p
            + members * self.total_moe * moe_comm
        )
        found = self._one_cache[key] = (
            parts,
            own + self.total_moe * moe_ms,
            self.total_dense + self.total_moe,
            n * parts[6],
            n * c.attn_bytes_per_query_token,
            comm,
            (members - 1) * self.total_moe * moe_ms,
            self.flops_per_token * n + self.flops_per_seq * seqs,
            self.flops_per_pair * n,
            routed,
            balance,
            dropped,
        )
        return found

    def _mb(self, n, seqs) -> tuple:
        """The constants of one replica's micro-batch of ``n`` tokens over ``seqs`` requests
        in :meth:`_micro_batch`, memoised: (parts, own work before the core attention,
        communication, FLOPs before the pairs' term, FLOPs growth per step)."""
        key = (n, seqs)
        found = self._mb_cache.get(key)
        if found is not None:
            return found
        if len(self._mb_cache) > PARTS_CACHE_SIZE:
            self._mb_cache.clear()
        hops = self.num_stages - 1
        parts = self._parts(n, seqs)
        dense, attn, logits, allreduce, p2p = parts[:5]
        found = self._mb_cache[key] = (
            parts,
            self.total_dense * dense + self.total_moe * attn + logits + hops * p2p,
            (2 * self.total_dense + self.total_moe) * allreduce + hops * p2p,
            self.flops_per_token * n + self.flops_per_seq * seqs,
            self.flops_per_pair * n,
        )
        return found

    def _time_one(self, n, seqs, pairs, kv, steps: int, members: int) -> StepTiming:
        """The common case of one non-empty micro-batch in the engine: its trip through the
        stages is the round (the stage loads are parts of it).

        The round time is ``fixed + layers x core`` with the core attention of
        :func:`clustersim.costs.serving.core_attention_ms`, written out here with the same
        operations in the same order (the same numbers). A run of decode steps reads its
        round times from a table (:meth:`_run_table`) when it can, else evaluates them."""
        one = self._one(n, seqs, members)
        parts, fixed, layers, nq, nqb = one[:5]
        cum = None
        if steps == 1:
            c = self.c
            kv_bytes = kv * c.attn_bytes_per_kv_token
            kv_bytes = kv_bytes + nqb
            a, b = pairs * parts[5] + nq, kv_bytes * parts[7]
            gpu = (a if a >= b else b) + parts[8]
            core = (gpu if gpu >= parts[9] else parts[9]) + parts[10]
            rounds = [fixed + layers * core]
        elif (
            pairs == kv
            and n == seqs
            and (table := self._run_table(one, n, pairs, steps)) is not None
        ):
            rounds = table
        elif not self.compiled_runs:
            c = self.c
            grown = n * self._j[:steps]
            core = core_attention_ms(parts, pairs + grown, kv + grown, n, c, np.maximum)
            rounds = fixed + layers * core
        else:  # the same, compiled (run_kernel.py): the same numbers, fewer numpy calls
            c = self.c
            per_pair, per_query, per_kv_byte, kfixed, launch, framework = parts[5:11]
            consts = (
                c.attn_bytes_per_kv_token,
                nqb,
                per_pair,
                nq,
                per_kv_byte,
                kfixed,
                launch,
                framework,
                fixed,
                layers,
            )
            rounds, cum = run_rounds(steps, float(n), float(pairs), float(kv), consts)
        return StepTiming(
            rounds,
            None,
            one[6],
            one[5],
            one[7] + self.flops_per_pair * pairs,
            one[8],
            one[9],
            one[10],
            one[11],
            cum,
        )

    def _run_table(self, one: tuple, n: int, x0: int, steps: int):
        """Round times of a run of ``steps`` decode steps of ``n`` requests whose step ``j``
        reads ``x0 + n j`` tokens of context (its pairs equal its KV reads in a decode step),
        as a view of a memoised table (:meth:`_table`), or None when too large."""
        parts, fixed, layers, nq, nqb = one[:5]
        return self._table((n, True), n, x0, steps, parts, nq, nqb, (layers, fixed))

    def _core_table(self, parts, n: int, x0: int, steps: int):
        """Core attention per layer of the same run (:func:`core_attention_ms`), as a view of
        a memoised table, or None when too large."""
        nq, nqb = n * parts[6], n * self.c.attn_bytes_per_query_token
        return self._table((n, False), n, x0, steps, parts, nq, nqb, None)

    def _table(self, kind, n: int, x0: int, steps: int, parts, nq, nqb, scale):
        """Values for ``x = x0 + n j``, ``j < steps``, of a function of the context ``x``
        alone, as a view of a memoised table, or None when the table would be too large.

        The table of ``kind`` and residue ``r = x0 mod n`` holds the values at
        ``x = r + n i`` over a range of ``i``; the run is the slice from ``i = x0 // n``. They
        are computed with the operations of the direct evaluation (identical numbers): core
        attention, and with ``scale = (layers, fixed)`` the round ``fixed + layers x core``.
        """
        i0, r = divmod(x0, n)
        end = i0 + steps
        key = (kind, r)
        found = self._run_tables.get(key)
        if found is not None:
            lo, table = found
            if lo <= i0 and end <= lo + table.size:
                return table[i0 - lo : end - lo]
            hi = max(end, lo + 2 * table.size)
            lo = min(lo, i0)
            self._run_entries -= table.size
        else:
            lo, hi = i0, i0 + max(2 * steps, RUN_TABLE_MIN)
        if hi - lo > RUN_TABLE_MAX:
            return None
        if self._run_entries + hi - lo > RUN_TABLE_MAX:
            self._run_tables.clear()
            self._run_entries = 0
        x = np.arange(lo, hi, dtype=np.float64)
        x *= n
        x += r
        b = x * self.c.attn_bytes_per_kv_token
        b += nqb
        b *= parts[7]
        x *= parts[5]
        x += nq
        np.maximum(x, b, out=x)
        x += parts[8]
        np.maximum(x, parts[9], out=x)
        x += parts[10]
        if scale is not None:
            x *= scale[0]
            x += scale[1]
        x.flags.writeable = False  # runs hold views of it
        self._run_tables[key] = (lo, x)
        self._run_entries += x.size
        return x[i0 - lo : end - lo]

    def _round(self, per_mb, vmax):
        """The round time from each micro-batch's per-layer maxima (module docstring)."""
        stages = range(self.num_stages)
        last = self.num_stages - 1
        stage_load = [0.0] * self.num_stages
        trip_max = 0.0
        dense_layers, moe_layers = self.dense_layers, self.moe_layers
        for dmax, amax, lmax, pmax, moe_ms in per_mb:
            trip = (last) * pmax
            moe_block = amax + moe_ms
            for s in stages:
                # a stage without layers of a kind adds an exact 0 for them: left out
                if not dense_layers[s]:
                    tau = moe_layers[s] * moe_block
                elif not moe_layers[s]:
                    tau = dense_layers[s] * dmax
                else:
                    tau = dense_layers[s] * dmax + moe_layers[s] * moe_block
                if s == last:
                    tau = tau + lmax
                stage_load[s] = stage_load[s] + tau
                trip = trip + tau
            trip_max = vmax(trip_max, trip)
        load_max = stage_load[0]
        for load in stage_load[1:]:
            load_max = vmax(load_max, load)
        return vmax(load_max, trip_max)

    def _flops(self, tokens: float, seqs: float, pairs: float) -> float:
        return (
            self.flops_per_token * tokens + self.flops_per_seq * seqs + self.flops_per_pair * pairs
        )

    def _moe_one(self, tokens: float) -> tuple[float, float, float, float, float]:
        """MoE layer time, its communication, and the routing statistics with the token
        copies they weigh (tokens x MoE layers) for one micro-batch of the engine."""
        if self.table is None or tokens <= 0:
            return 0.0, 0.0, 100.0, 0.0, 0.0
        moe_ms, comm, balance, dropped = self.table.lookup(int(tokens))
        return moe_ms, comm, balance, dropped, tokens * self.total_moe

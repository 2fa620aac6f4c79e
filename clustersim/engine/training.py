"""One training iteration as a SimPy simulation.

Processes: one per *lane* (a TP group of one pipeline stage and one data-parallel replica; its
TP ranks work in lockstep, so one process drives them all) plus one communication stream per
lane for the data-parallel gradient buckets. Lanes meet in :class:`Rendezvous` collectives for
the MoE all-to-alls (EP groups may span lanes) and the gradient reductions (DP/EDP groups).
Pipeline transfers are point-to-point events between lanes of neighbouring stages.

Per step (one chunk of one micro-batch, forward or backward) and layer the lane issues at most
one SimPy timeout per compute block and one wait per collective; sub-ops inside a block are
written as separate rows with their own start and end.

Link sharing rule: collectives of one lane run one at a time on its communication stream
(FIFO, each at the full link bandwidth), which gives the same completion time for the last of a
set of transfers as fair sharing of the link; pipeline sends use separate send/receive queues
(full duplex) and never contend with each other.

Replica symmetry: when every data-parallel replica provably does the same work (fixed
sequence length and deterministic, even routing), only replica 0 is simulated and the metrics
fan out to all GPUs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import simpy

from clustersim.costs.comm import all_to_all_v_cost, collective_time_ms
from clustersim.costs.compute import BACKWARD_FACTOR, DTYPE_BYTES
from clustersim.costs.memory import stage_params_per_gpu
from clustersim.costs.params import count_params
from clustersim.engine.moe import Dispatch, RoutingSource
from clustersim.engine.optimes import (
    GRAD_BYTES,
    ExpertTimer,
    MicrobatchCosts,
    optimizer_ms,
    p2p_time_ms,
)
from clustersim.engine.recorder import Kind, Op, Recorder
from clustersim.engine.rendezvous import Rendezvous
from clustersim.engine.schedules import stage_steps
from clustersim.layout import Layout
from clustersim.spec.schema import Plan

MIB = 2**20


class EngineError(ValueError):
    """A plan the engine cannot simulate (the message says why)."""


def check_common(plan: Plan, layout: Layout, mode: str) -> None:
    """What both engines (training, serving) need of a plan; raises :class:`EngineError`."""
    par = plan.parallel
    if plan.workload.mode != mode:
        raise EngineError(f"the {mode} engine needs workload.mode: {mode}")
    if par.cp > 1:
        raise EngineError("context parallelism (parallel.cp > 1) is not simulated yet")
    if plan.model.moe is not None and not layout.expert_folding_ok:
        raise EngineError("EP x ETP does not fold into the ranks of a pipeline stage")
    if len(layout.stage_layers) != par.pp or sum(layout.layers_per_stage) != plan.model.num_layers:
        raise EngineError("the layers do not split over the pipeline stages")


@dataclass
class Lane:
    """A TP group of one stage and one data-parallel replica."""

    index: int
    stage: int
    dp: int
    ranks: list[int]
    ep_groups: list[int] = field(default_factory=list)
    member_slots: list[tuple[int, int]] = field(default_factory=list)  # (ep_groups slot, index)


@dataclass
class SimResult:
    """What one simulated iteration produced, besides the recorder's rows."""

    iteration_time_ms: float
    pipeline_end_ms: float
    lanes: list[Lane]
    simulated_dp: int
    events: int
    tokens: int
    seq_lens: list[list[np.ndarray]]
    dispatches: list[Dispatch]
    dispatch_layers: list[int]


class TrainingSim:
    """Simulates one training iteration of ``plan``; rows go to ``recorder``."""

    def __init__(
        self,
        plan: Plan,
        recorder: Recorder,
        seq_lens: list[list[np.ndarray]],
        routing: RoutingSource | None,
        symmetric: bool,
        progress: Callable[[float], None] | None = None,
    ):
        self.plan, self.rec, self.routing = plan, recorder, routing
        self.layout = Layout(plan)
        self.par, self.model, self.hw = plan.parallel, plan.model, plan.hardware
        check_supported(plan, self.layout)
        self.env = simpy.Environment()
        self.rv = Rendezvous(self.env)
        self.simulated_dp = 1 if symmetric else self.par.dp
        self.seq_lens = seq_lens
        self._mb_tokens = np.array([[int(x.sum()) for x in mbs] for mbs in seq_lens])
        self._deterministic = bool(getattr(routing, "deterministic", False))
        self._route_cache: dict[tuple, tuple] = {}
        self.lanes = self._make_lanes()
        self._lane_of = {r: ln.index for ln in self.lanes for r in ln.ranks}
        self._p2p_ms: dict[tuple, float] = {}
        self.lane_at = {(ln.stage, ln.dp): ln for ln in self.lanes}
        self.costs = {
            (d, i): MicrobatchCosts(plan, self.lanes[0].ranks, lens)
            for d, mbs in enumerate(seq_lens[: self.simulated_dp])
            for i, lens in enumerate(mbs)
        }
        self.expert_timer = ExpertTimer(plan) if self.model.moe else None
        self.events = 0
        self.dispatches: list[Dispatch] = []
        self.dispatch_layers: list[int] = []
        self._routes: dict[tuple, tuple] = {}
        self._ready: dict[tuple, simpy.Event] = {}
        self._progress = progress
        self._steps_total = sum(len(self._steps(ln)) for ln in self.lanes)
        self._steps_done = 0
        self._pipeline_end = 0.0
        self._counts = count_params(self.model)

    # ---- construction ----------------------------------------------------------------------
    def _make_lanes(self) -> list[Lane]:
        lay, lanes = self.layout, []
        for stage in range(self.par.pp):
            for dp in range(self.simulated_dp):
                ranks = [lay.rank_of(tp=t, dp=dp, pp=stage) for t in range(self.par.tp)]
                lanes.append(Lane(len(lanes), stage, dp, ranks))
        if self.model.moe is not None:
            self._ep_groups = lay.groups("ep")
            lane_of = {r: ln.index for ln in lanes for r in ln.ranks}
            slot_of = {r: (gid, i) for gid, grp in enumerate(self._ep_groups)
                       for i, r in enumerate(grp)}  # fmt: skip
            self._group_lanes = {}
            self._group_dp = [np.array([lay.coords(r).dp for r in g]) for g in self._ep_groups]
            self._groups_per_stage = len(self._ep_groups) // self.par.pp
            for gid, group in enumerate(self._ep_groups):
                members = sorted({lane_of[r] for r in group if r in lane_of})
                self._group_lanes[gid] = len(members)
                for lane_index in members:
                    lanes[lane_index].ep_groups.append(gid)
            for ln in lanes:
                ln.member_slots = [(ln.ep_groups.index(slot_of[r][0]), slot_of[r][1])
                                   for r in ln.ranks]  # fmt: skip
        return lanes

    def _steps(self, lane: Lane):
        return stage_steps(self.par.schedule, self.par.pp, self.par.num_microbatches,
                           lane.stage, self.par.virtual_stages)  # fmt: skip

    def _chunk_layers(self, stage: int, chunk: int) -> list[int]:
        layers = self.layout.stage_layers[stage]
        per_chunk = len(layers) // self.par.virtual_stages
        return layers[chunk * per_chunk : (chunk + 1) * per_chunk]

    # ---- running ---------------------------------------------------------------------------
    def run(self) -> SimResult:
        """Simulate the iteration; return its end time and bookkeeping."""
        finals = [self.env.process(self._lane(ln)) for ln in self.lanes]
        self.env.run()
        if self.rv.pending or not all(p.triggered for p in finals):
            raise RuntimeError("simulation deadlocked: a collective never completed")
        tokens = int(sum(int(x.sum()) for mbs in self.seq_lens for x in mbs))
        # Events = rows recorded: one per compute op or collective step of a lane.
        return SimResult(self.env.now, self._pipeline_end, self.lanes, self.simulated_dp,
                         self.rec.size, tokens, self.seq_lens,
                         self.dispatches, self.dispatch_layers)  # fmt: skip

    def _event(self, key: tuple) -> simpy.Event:
        ev = self._ready.get(key)
        if ev is None:
            ev = self._ready[key] = self.env.event()
        return ev

    def _wait(self, duration_ms: float):
        self.events += 1
        return self.env.timeout(duration_ms)

    def _lane(self, lane: Lane):
        steps = self._steps(lane)
        num_vstages = self.par.pp * self.par.virtual_stages
        last_b = {st.chunk: i for i, st in enumerate(steps) if st.kind == "B"}
        buckets = simpy.Store(self.env)
        comm = self.env.process(self._grad_stream(lane, buckets))
        grad_state = {"bytes": 0.0, "expert_bytes": 0.0, "layers": []}
        if self.par.distributed_optimizer and self.par.overlap_communication:
            self._param_gather(lane, blocking=False)
        for i, step in enumerate(steps):
            vstage = step.chunk * self.par.pp + lane.stage
            layers = self._chunk_layers(lane.stage, step.chunk)
            costs = self.costs[(lane.dp, step.microbatch)]
            if step.kind == "F":
                if vstage > 0:
                    key = ("act", lane.dp, vstage, step.microbatch)
                    yield self._event(key)
                    del self._ready[key]
                yield from self._forward(lane, step.microbatch, layers, costs,
                                         vstage == num_vstages - 1)  # fmt: skip
                if vstage < num_vstages - 1:
                    self._send(lane, vstage + 1, step.microbatch, costs.p2p_bytes, "act")
            else:
                if vstage < num_vstages - 1:
                    key = ("grad", lane.dp, vstage, step.microbatch)
                    yield self._event(key)
                    del self._ready[key]
                is_last = last_b[step.chunk] == i
                yield from self._backward(lane, step.microbatch, layers, costs,
                                          vstage == num_vstages - 1,
                                          buckets if is_last else None, grad_state)  # fmt: skip
                if vstage > 0:
                    self._send(lane, vstage - 1, step.microbatch, costs.p2p_bytes, "grad")
                self._pipeline_end = max(self._pipeline_end, self.env.now)
            self._tick()
        self._flush_bucket(lane, buckets, grad_state, final=True)
        yield comm
        # Megatron's optimizer step starts with the gradient-norm (clip_grad) all-reduce over
        # the model-parallel group, pipeline stages included: no stage updates its weights
        # before every stage has finished its backward and gradient reduction. A barrier
        # (the tiny all-reduce's latency is not charged).
        self.events += 1
        yield self.rv.arrive(("optimizer_barrier",), len(self.lanes), self.env.now, _fixed, 0.0)
        yield from self._optimizer(lane)

    def _tick(self) -> None:
        self._steps_done += 1
        if self._progress and self._steps_done % max(1, self._steps_total // 100) == 0:
            self._progress(self._steps_done / self._steps_total)

    # ---- forward / backward of a chunk -----------------------------------------------------
    def _forward(self, lane: Lane, mb: int, layers: list[int], costs: MicrobatchCosts, last):
        """Forward of a chunk. Compute and TP collectives advance a lane-local clock ``t``;
        the lane yields only to meet other lanes (all-to-alls) and once at the end."""
        rec, lid = self.rec, lane.index
        t = self.env.now
        for layer in layers:
            moe = self.model.is_moe_layer(layer)
            lt = costs.moe if moe else costs.dense
            rec.add(lid, Kind.COMPUTE, Op.ATTN_FWD, t, t + lt.attn_fwd_ms, layer, mb)
            t = self._tp_rows(lid, t + lt.attn_fwd_ms, lt.tp_comm_ms, layer, mb, costs, moe)
            if not moe:
                rec.add(lid, Kind.COMPUTE, Op.MLP_FWD, t, t + lt.mlp_fwd_ms, layer, mb)
                t += lt.mlp_fwd_ms
            else:  # joins the dispatch at once, ready when attention ends
                t = yield from self._moe_block(lane, layer, mb, costs, False, ready_at=t)
        if last:
            rec.add(lid, Kind.COMPUTE, Op.LOGITS_FWD, t, t + costs.logits_fwd_ms, -1, mb)
            t += costs.logits_fwd_ms
        if t > self.env.now:
            yield self._wait(t - self.env.now)

    def _backward(self, lane, mb, layers, costs: MicrobatchCosts, last, buckets, grad_state):
        """Backward of a chunk (lane-local clock as in :meth:`_forward`); on the chunk's last
        micro-batch each layer's gradients go to the bucket queue when they are ready."""
        rec, lid = self.rec, lane.index
        t = self.env.now
        if last:
            logits_bwd = BACKWARD_FACTOR * costs.logits_fwd_ms
            rec.add(lid, Kind.COMPUTE, Op.LOGITS_BWD, t, t + logits_bwd, -1, mb)
            t += logits_bwd
        for layer in reversed(layers):
            moe = self.model.is_moe_layer(layer)
            lt = costs.moe if moe else costs.dense
            if moe:
                t = yield from self._moe_block(lane, layer, mb, costs, True, ready_at=t)
            if lt.recompute_ms:
                rec.add(lid, Kind.COMPUTE, Op.RECOMPUTE, t, t + lt.recompute_ms, layer, mb)
                t = self._tp_rows(lid, t + lt.recompute_ms, lt.recompute_comm_ms, layer, mb,
                                  costs, moe)  # fmt: skip
            if lt.mlp_bwd_ms:
                rec.add(lid, Kind.COMPUTE, Op.MLP_BWD, t, t + lt.mlp_bwd_ms, layer, mb)
                t += lt.mlp_bwd_ms
            t = self._tp_rows(lid, t, lt.tp_comm_ms, layer, mb, costs, moe)
            rec.add(lid, Kind.COMPUTE, Op.ATTN_BWD, t, t + lt.attn_bwd_ms, layer, mb)
            t += lt.attn_bwd_ms
            if buckets is not None:
                self._add_layer_grads(lane, layer, buckets, grad_state, t)
        if t > self.env.now:
            yield self._wait(t - self.env.now)

    def _tp_rows(self, lid, t, total_ms, layer, mb, costs, moe) -> float:
        """TP collective rows (one for an MoE layer, two for a dense one); returns end time."""
        if not total_ms:
            return t
        size = costs.tokens * self.model.hidden_size * DTYPE_BYTES[self.model.dtype]
        parts = 1 if moe else 2
        for _ in range(parts):
            self.rec.add(lid, Kind.COMM, Op.TP_COMM, t, t + total_ms / parts, layer, mb, size)
            t += total_ms / parts
        return t

    # ---- MoE: dispatch, experts, combine ---------------------------------------------------
    def _moe_block(self, lane: Lane, layer: int, mb: int, costs, backward: bool, ready_at):
        """Dispatch, experts, combine (reversed in the backward). The lane joins each
        all-to-all as soon as it knows when its preceding compute ends (``ready_at``)."""
        first_op, second_op = (Op.A2A_COMBINE, Op.A2A_DISPATCH) if backward else (
            Op.A2A_DISPATCH, Op.A2A_COMBINE)  # fmt: skip
        routes = yield from self._a2a(lane, layer, mb, first_op, backward, ready_at)
        expert_ms, rank_ms, etp_ms = self._expert_times(lane, routes)
        factor = BACKWARD_FACTOR + (1.0 if self.par.recompute == "full" else 0.0)
        if backward:
            expert_ms, rank_ms = expert_ms * factor, [ms * factor for ms in rank_ms]
        t = self.env.now
        if etp_ms:
            self.rec.add(lane.index, Kind.COMM, Op.ETP_COMM, t, t + etp_ms, layer, mb)
            t += etp_ms
        op = Op.EXPERT_BWD if backward else Op.EXPERT_FWD
        self.rec.add(lane.index, Kind.COMPUTE, op, t, t + expert_ms, layer, mb)
        t += expert_ms
        if len(rank_ms) > 1:
            idle = self.rec.rank_idle_ms
            for r, ms in zip(lane.ranks, rank_ms, strict=True):
                idle[r] += expert_ms - ms
        if etp_ms:
            self.rec.add(lane.index, Kind.COMM, Op.ETP_COMM, t, t + etp_ms, layer, mb)
            t += etp_ms
        yield from self._a2a(lane, layer, mb, second_op, backward, t)
        return self.env.now

    def _a2a(self, lane: Lane, layer: int, mb: int, op: Op, backward: bool, ready_at: float):
        """All-to-all over every EP group the lane's ranks belong to (concurrently); the lane
        is ready to send at ``ready_at`` and waits (in the collective) until it ends."""
        events = [
            self.rv.arrive((op, backward, gid, layer, mb), self._group_lanes[gid], ready_at,
                           self._a2a_timing, gid, layer, mb, backward and op == Op.A2A_DISPATCH)
            for gid in lane.ep_groups
        ]  # fmt: skip
        t0 = ready_at
        self.events += 1
        if len(events) == 1:
            _start, end, (dispatch, nbytes) = yield events[0]
            routes = [dispatch]
        else:
            results = yield self.env.all_of(events)
            values = [results[ev] for ev in events]
            routes = [v[2][0] for v in values]
            end, nbytes = max(v[1] for v in values), sum(v[2][1] for v in values)
        self.rec.add(lane.index, Kind.COMM, op, t0, end, layer, mb, nbytes)
        return routes

    def _a2a_timing(self, _payloads, gid: int, layer: int, mb: int, last_use: bool):
        """Duration of an EP group's all-to-all (routing once per group, layer, micro-batch;
        forgotten after its last use, the backward dispatch)."""
        key = (gid, layer, mb)
        route = self._routes.pop(key, None) if last_use else self._routes.get(key)
        if route is None:
            route = self._route(gid, layer, mb)
            if not last_use:
                self._routes[key] = route
        dispatch, time_ms, size = route
        return time_ms, (dispatch, size)

    def _route(self, gid: int, layer: int, mb: int):
        """Route one EP group's tokens and time its all-to-all (cached when deterministic)."""
        tokens = self._mb_tokens[self._group_dp[gid], mb] * self.par.expert_tp // self.par.tp
        cache_key = (gid % self._groups_per_stage, tokens.tobytes())
        if self._deterministic and cache_key in self._route_cache:
            found = self._route_cache[cache_key]
            self.dispatches.append(found[0])
            self.dispatch_layers.append(layer)
            return found
        dispatch = self.routing.dispatch(layer, mb * len(self._ep_groups) + gid, tokens)
        self.dispatches.append(dispatch)
        self.dispatch_layers.append(layer)
        send = dispatch.a2a_tokens * (self.model.hidden_size * DTYPE_BYTES[self.model.dtype])
        group = self._ep_groups[gid]
        cost = all_to_all_v_cost(send, group, self.hw.gpus_per_node, self.hw)
        found = (dispatch, cost.time_ms, float(send.sum() - np.trace(send)))
        if self._deterministic:
            self._route_cache[cache_key] = found
        return found

    def _expert_times(self, lane: Lane, routes: list[Dispatch]):
        """Lane expert time (its slowest rank), per-rank times, ETP collective time."""
        etp = self.par.expert_tp
        timer = self.expert_timer
        received = [float(routes[slot].received_tokens[i]) for slot, i in lane.member_slots]
        active = [float(routes[slot].active_experts[i]) for slot, i in lane.member_slots]
        if etp > 1:  # each ETP group (inside the lane) gathers its members' tokens
            received = [sum(received[j - j % etp : j - j % etp + etp]) for j in range(len(active))]
        rank_ms = [timer.forward_ms_one(t, a) for t, a in zip(received, active, strict=True)]
        etp_ms = 0.0
        if etp > 1:
            size = max(received) * self.model.hidden_size * DTYPE_BYTES[self.model.dtype]
            etp_ms = collective_time_ms("all_gather", size, lane.ranks[:etp],
                                        self.hw.gpus_per_node, self.hw)  # fmt: skip
        return max(rank_ms), rank_ms, etp_ms

    # ---- pipeline transfers ----------------------------------------------------------------
    def _send(self, lane: Lane, to_vstage: int, mb: int, nbytes: float, what: str) -> None:
        to_stage = to_vstage % self.par.pp
        peer = self.lane_at[(to_stage, lane.dp)]
        key = (lane.ranks[0], peer.ranks[0], nbytes)
        duration = self._p2p_ms.get(key)
        if duration is None:  # same pair, same size: the same time (cached)
            duration = self._p2p_ms[key] = p2p_time_ms(self.plan, key[0], key[1], nbytes)
        target = self._event((what, lane.dp, to_vstage, mb))
        t0 = self.env.now
        self.events += 1
        done = self.env.timeout(duration)
        done.callbacks.append(lambda _e: target.succeed())
        self.rec.add(lane.index, Kind.COMM_ASYNC, Op.P2P_SEND, t0, t0 + duration, -1, mb, nbytes)

    # ---- data-parallel gradients and the optimizer -----------------------------------------
    def _layer_grad_bytes(self, lane: Lane, layer: int) -> tuple[float, float]:
        sums = self._counts.layers([layer])
        t, kv = self.par.tp, min(self.par.tp, self.model.kv_heads)
        dense = ((sums.attention - sums.attention_kv + sums.dense_mlp + sums.shared_experts) / t
                 + sums.attention_kv / kv + sums.norms + sums.router)  # fmt: skip
        expert = sums.routed_experts / (self.par.expert_tp * self.par.ep)
        return dense * GRAD_BYTES, expert * GRAD_BYTES

    def _add_layer_grads(self, lane: Lane, layer: int, buckets, state, ready_at: float) -> None:
        dense, expert = self._layer_grad_bytes(lane, layer)
        state["bytes"] += dense
        state["expert_bytes"] += expert
        if not self.par.overlap_communication:
            return
        if state["bytes"] + state["expert_bytes"] >= self.par.grad_bucket_mb * MIB:
            self._flush_bucket(lane, buckets, state, final=False, ready_at=ready_at)

    def _flush_bucket(self, lane: Lane, buckets, state, final: bool, ready_at=None) -> None:
        if final:  # embedding / output layer gradients join the last bucket
            dense, _ = stage_params_per_gpu(self.plan, self.layout, self._counts, lane.stage)
            state["bytes"] = max(state["bytes"], 0.0) + self._non_layer_grads(lane, dense)
        if state["bytes"] or state["expert_bytes"]:
            when = self.env.now if ready_at is None else ready_at
            buckets.put((state["bytes"], state["expert_bytes"], when))
        state["bytes"] = state["expert_bytes"] = 0.0
        if final:
            buckets.put(None)

    def _non_layer_grads(self, lane: Lane, dense_params: float) -> float:
        layer_dense = sum(self._layer_grad_bytes(lane, i)[0]
                          for i in self.layout.stage_layers[lane.stage])  # fmt: skip
        return max(0.0, dense_params * GRAD_BYTES - layer_dense)

    def _grad_stream(self, lane: Lane, buckets: simpy.Store):
        """The lane's communication stream: gradient buckets, one at a time (FIFO)."""
        dp_group = self.layout.group_of("dp", lane.ranks[0])
        edp_group = self.layout.group_of("edp", lane.ranks[0]) if self.model.moe else []
        index = 0
        while True:
            self.events += 1
            item = yield buckets.get()
            if item is None:
                return
            dense_bytes, expert_bytes, ready_at = item
            for group, size, op in ((dp_group, dense_bytes, Op.GRAD_REDUCE),
                                    (edp_group, expert_bytes, Op.EXPERT_GRAD_REDUCE)):  # fmt: skip
                if len(group) > 1 and size > 0:
                    yield from self._dp_collective(lane, group, size, op, index, ready_at)
                    ready_at = self.env.now
            index += 1

    def _dp_collective(self, lane: Lane, group: list[int], size: float, op: Op, index: int,
                       ready_at: float):  # fmt: skip
        kind = "reduce_scatter" if self.par.distributed_optimizer else "all_reduce"
        hw, gpn = self.hw, self.hw.gpus_per_node
        duration = collective_time_ms(kind, size, group, gpn, hw, "hierarchical")
        expected = len({self._lane_of[r] for r in group if r in self._lane_of})
        key = (int(op), lane.stage, group[0], index)
        t0 = max(ready_at, self.env.now)  # the bucket's last gradient is ready at ready_at
        self.events += 1
        yield self.rv.arrive(key, expected, t0, _fixed, duration)
        kind_row = Kind.COMM_ASYNC if self.par.overlap_communication else Kind.COMM
        self.rec.add(lane.index, kind_row, op, t0, self.env.now, -1, -1, size)

    def _param_gather(self, lane: Lane, blocking: bool) -> float:
        """Distributed optimizer: all-gather the updated bf16 parameters over DP (and EDP)."""
        dense, expert = stage_params_per_gpu(self.plan, self.layout, self._counts, lane.stage)
        bpe = DTYPE_BYTES[self.model.dtype]
        hw, gpn, total = self.hw, self.hw.gpus_per_node, 0.0
        for kind, params in (("dp", dense), ("edp", expert)):
            if kind == "edp" and not self.model.moe:
                continue
            group = self.layout.group_of(kind, lane.ranks[0])
            if len(group) > 1 and params > 0:
                total += collective_time_ms("all_gather", params * bpe, group, gpn, hw,
                                            "hierarchical")  # fmt: skip
        if total:
            t0 = self.env.now
            self.rec.add(lane.index, Kind.COMM if blocking else Kind.COMM_ASYNC,
                         Op.PARAM_GATHER, t0, t0 + total, -1, -1)  # fmt: skip
        return total

    def _optimizer(self, lane: Lane):
        dense, expert = stage_params_per_gpu(self.plan, self.layout, self._counts, lane.stage)
        if self.par.distributed_optimizer:
            dense /= self.par.dp * self.par.cp
            expert /= self.layout.edp or 1
        t0 = self.env.now
        yield self._wait(optimizer_ms(self.plan, dense + expert))
        self.rec.add(lane.index, Kind.COMPUTE, Op.OPTIMIZER, t0, self.env.now)
        if self.par.distributed_optimizer and not self.par.overlap_communication:
            yield self._wait(self._param_gather(lane, blocking=True))


def _fixed(_payloads, duration_ms: float) -> tuple[float, None]:
    """Rendezvous timing of a collective whose duration is known in advance."""
    return duration_ms, None


def check_supported(plan: Plan, layout: Layout) -> None:
    """Raise :class:`EngineError` when the engine cannot simulate ``plan``."""
    par = plan.parallel
    check_common(plan, layout, "training")
    if par.tp % par.expert_tp:
        raise EngineError(f"ETP {par.expert_tp} must divide TP {par.tp} for the simulation")
    if par.virtual_stages > 1 and par.schedule != "interleaved":
        raise EngineError("virtual_stages > 1 needs schedule: interleaved")
    if par.virtual_stages > 1 and any(n % par.virtual_stages for n in layout.layers_per_stage):
        raise EngineError("layers per stage must divide evenly into virtual stages")

"""One training iteration as a SimPy simulation.

Lanes and cohorts: a *lane* is the TP group of one pipeline stage and one data-parallel
replica (its TP ranks work in lockstep). The lanes of a stage run the same schedule of steps
and meet each other in the MoE all-to-alls (the lanes of an EP group, every MoE layer,
forward and backward) and the gradient reductions, so one SimPy process drives the *cohort*
of a stage: it keeps one clock per lane in numpy arrays, times every op for all lanes at once
and records it as one row per lane (``Recorder.add_block``), so the trace and the metrics
still speak of every lane and every GPU. Collectives inside the cohort are timed from the
lanes' clocks (an EP group starts when its slowest lane is ready); nothing waits on another
lane's process. Each cohort also has a communication-stream process for its data-parallel
gradient buckets (one FIFO stream per lane). Cohorts meet each other through pipeline
transfers between neighbouring stages and in the optimizer barrier (a :class:`Rendezvous`).

Routing: the first time a stage reaches an MoE layer, every EP group and micro-batch of that
layer is routed in one batch (``moe.dispatch_many``) and its all-to-all times and per-lane
expert times are computed as arrays; each all-to-all of the run then reads its row.

Expert folding (Megatron-Core MoE parallel folding, arXiv 2504.14960): the TP x DP ranks of a
stage are refolded as ETP x EP x EDP for the experts. Attention ends in a sequence-parallel
reduce-scatter (Megatron requires sequence parallelism for MoE with TP > 1), so each TP rank
of a lane holds a disjoint 1/TP share of the lane's tokens and is the *source* of exactly those
tokens in its EP group: every token is routed once, by one GPU. An EP group is the ranks with
the same ETP (and EDP) coordinate, so the ``etp`` ranks of an ETP group sit in ``etp``
different EP groups; each receives the copies its EP group's sources route to its E/EP
experts, the ETP group all-gathers them (every GPU of it then computes all the copies routed to
its experts, on its 1/ETP slice of each expert's FFN) and reduce-scatters the outputs before
the combine. Summed over a stage, expert FLOPs are the routed copies x the full expert FFN,
whatever the folding.

Per step (one chunk of one micro-batch, forward or backward) a cohort issues one SimPy wait
for its input (activations or gradients from the neighbouring stage) and one to reach the
end of its slowest lane; everything inside the chunk advances the lane clocks analytically.
A lane's clock may lag the process's (the process waits for the slowest lane's input), never
its result: every start is the latest of the lane's own ready times.

Timing per MoE layer of a cohort: each lane is ready to dispatch when its attention ends; an
EP group's all-to-all starts when its slowest member is ready and lasts the time of its
all-to-all-v (``costs.comm``); each lane then runs its ETP all-gather, its expert GEMMs (its
slowest rank's), the ETP reduce-scatter, and joins the combine, which again starts when the
group's slowest lane is ready.

Link sharing rule: collectives of one lane run one at a time on its communication stream
(FIFO, each at the full link bandwidth), which gives the same completion time for the last of a
set of transfers as fair sharing of the link; pipeline sends use separate send/receive queues
(full duplex) and never contend with each other. ZeRO-2/3 run their per-layer gathers and
reduce-scatters on one more stream per lane; an EP all-to-all that crosses nodes while that
stream is busy across nodes shares the NICs with it fairly (both are delayed by the overlap,
``costs.sharding.fair_share_delay_ms``). With one hardware queue
(``parallel.device_max_connections`` 1, Megatron-LM's setting with TP or CP > 1 before
Blackwell) a sharding collective issued while that stream is busy holds back the compute
issued after it until it starts (``costs.sharding.one_hardware_queue``): in ZeRO-3's
backward, layer i-1 waits for the reduce-scatter of layer i; in its forward, without
explicit forward prefetch, the gather of layer i starts when layer i-1 is done
(``costs.sharding.forward_prefetch``). With ``hardware.topology`` none
of the NIC sharing applies: the
EP all-to-alls, gradient buckets, ZeRO-2/3 per-layer collectives, parameter all-gathers, TP
and expert-TP collectives and pipeline sends are flows on shared links (``engine.network``),
each delayed by what overlaps it there; the second pass (``reuse``) reads the first pass's
tables and only times the schedule again.

Replica symmetry: when every data-parallel replica provably does the same work (fixed
sequence length and deterministic, even routing), only replica 0 is simulated and the metrics
fan out to all GPUs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import simpy

from clustersim.costs import precision
from clustersim.costs.comm import (
    all_gather_ms,
    all_to_all_v_times_ms,
    collective_cost,
    collective_time_ms,
    link_for_group,
    p2p_ms,
)
from clustersim.costs.compute import BACKWARD_FACTOR, DTYPE_BYTES
from clustersim.costs.memory import stage_params_per_gpu
from clustersim.costs.params import count_params
from clustersim.costs.schedules import (
    DUALPIPE_RULE,
    dualpipe_position,
    dualpipe_valid,
    overlapped_pairs,
    stage_steps,
)
from clustersim.costs.sharding import (
    LayerUnit,
    fair_share_delay_ms,
    forward_prefetch,
    layer_units,
    one_hardware_queue,
    shard_sizes,
)
from clustersim.engine.errors import EngineError
from clustersim.engine.network import Network, Routes
from clustersim.engine.recorder import Kind, Op, Recorder
from clustersim.engine.rendezvous import Rendezvous, trigger_at
from clustersim.engine.training.moe import DispatchBatch, RoutingSource, dispatch_many
from clustersim.engine.training.optimes import (
    ExpertTimer,
    MicrobatchCosts,
    optimizer_ms,
)
from clustersim.engine.training.param_gather import GatherBucket, forward_buckets, split_at
from clustersim.layout import Layout
from clustersim.spec.schema import Plan

MIB = 2**20


def check_common(plan: Plan, layout: Layout, mode: str) -> None:
    """What both engines (training, serving) need of a plan; raises :class:`EngineError`."""
    par = plan.parallel
    if plan.workload.mode != mode:
        raise EngineError(f"the {mode} engine needs workload.mode: {mode}")
    if par.cp > 1 and mode != "training":
        raise EngineError(f"context parallelism (parallel.cp > 1) is not simulated in {mode}")
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
    ep_groups: list[int] = field(default_factory=list)  # EP groups holding its ranks
    cp: int = 0  # context-parallel rank (its share of every sequence)


def make_lanes(layout: Layout, simulated_dp: int) -> list[Lane]:
    """The lanes of an iteration, stage by stage: one per simulated data-parallel replica and
    context-parallel rank (a trace names lanes by these indices)."""
    par, lanes = layout.plan.parallel, []
    for stage in range(par.pp):
        for dp in range(simulated_dp):
            for cp in range(par.cp):
                ranks = [layout.rank_of(tp=t, cp=cp, dp=dp, pp=stage) for t in range(par.tp)]
                lanes.append(Lane(len(lanes), stage, dp, ranks, cp=cp))
    return lanes


@dataclass(frozen=True)
class EpIndex:
    """Where the ranks of an MoE model sit in its EP groups (built with the lanes, which
    learn the groups they belong to)."""

    groups: list[list[int]]
    slot_of: dict[int, tuple[int, int]]  # rank -> (EP group, position in it)
    dp: np.ndarray  # (groups, ep) data-parallel coordinate of each member
    tp: np.ndarray  # (groups, ep) tensor-parallel coordinate
    cp: np.ndarray  # (groups, ep) context-parallel coordinate

    @classmethod
    def of(cls, layout: Layout, lanes: list[Lane]) -> EpIndex:
        """The index of ``layout``'s EP groups; fills each lane's ``ep_groups``."""
        groups = layout.groups("ep")
        lane_of = {r: ln.index for ln in lanes for r in ln.ranks}
        for gid, group in enumerate(groups):
            for lane_index in sorted({lane_of[r] for r in group if r in lane_of}):
                lanes[lane_index].ep_groups.append(gid)
        coords = [[layout.coords(r) for r in g] for g in groups]
        return cls(
            groups=groups,
            slot_of={r: (gid, i) for gid, grp in enumerate(groups) for i, r in enumerate(grp)},
            dp=np.array([[c.dp for c in g] for g in coords]),
            tp=np.array([[c.tp for c in g] for g in coords]),
            cp=np.array([[c.cp for c in g] for g in coords]),
        )


@dataclass
class Cohort:
    """The lanes of one pipeline stage (in replica order), driven by one process.

    ``membership[g, l]``: lane ``l`` holds ranks of the cohort's EP group ``groups[g]``;
    ``block`` > 0 when every lane is in one group and the groups are consecutive runs of
    ``block`` lanes (the usual layout: group starts and ends are reshapes, not masks).
    """

    stage: int
    lanes: list[Lane]
    lane_ids: np.ndarray  # (L,) int32 lane indices
    groups: list[int] = field(default_factory=list)  # EP group ids
    membership: np.ndarray | None = None  # (G, L) bool
    block: int = 0
    ranks: np.ndarray | None = None  # (L * tp,) ranks in lane order
    rank_slot: np.ndarray | None = None  # (L * tp,) index into the groups' member arrays


@dataclass
class _LayerRoutes:
    """One MoE layer of a cohort, every micro-batch routed: all-to-all time and bytes per
    (micro-batch, group), per-lane expert time and ETP collective time per micro-batch."""

    a2a_ms: np.ndarray  # (m, G)
    lane_bytes: np.ndarray  # (m, L): bytes one GPU of the lane sends (mean over its GPUs)
    expert_fwd_ms: np.ndarray  # (m, L): the lane's slowest rank
    expert_bwd_ms: np.ndarray  # (m, L)
    etp_ms: np.ndarray | None  # (m, L), None without expert TP
    # forward dispatch in FP8 (DeepEP on an FP8 model): its own time and bytes; None: as a2a
    fp8_dispatch: tuple[np.ndarray, np.ndarray] | None = None
    expert_weights_ms: np.ndarray | None = None  # (m, L): weight-gradient share of the bwd


class _LayerVectors:
    """Per-lane times (ms) of one layer kind of one micro-batch, as arrays over a cohort."""

    __slots__ = (
        "attn_fwd",
        "attn_bwd",
        "mlp_fwd",
        "mlp_bwd",
        "tp_comm",
        "recompute",
        "recompute_comm",
        "cp_fwd",
        "cp_bwd",
        "cp_fwd_bytes",
        "cp_bwd_bytes",
        "cp_recompute",
        "weights",
    )

    def __init__(self, per_lane: list):
        def vec(name: str) -> np.ndarray:
            return np.array([getattr(x, name) for x in per_lane], dtype=np.float64)

        self.attn_fwd, self.mlp_fwd = vec("attn_fwd_ms"), vec("mlp_fwd_ms")
        self.attn_bwd, self.mlp_bwd = vec("attn_bwd_ms"), vec("mlp_bwd_ms")
        self.tp_comm, self.recompute = vec("tp_comm_ms"), vec("recompute_ms")
        self.recompute_comm = vec("recompute_comm_ms")
        self.weights = vec("weights_ms")  # the weight-gradient share of the backward
        ring = [x.ring for x in per_lane]
        has_ring = all(r is not None for r in ring)
        zeros = np.zeros(len(per_lane))

        def ring_vec(name: str) -> np.ndarray:
            return np.array([getattr(r, name) for r in ring]) if has_ring else zeros

        self.cp_fwd, self.cp_bwd = ring_vec("fwd_exposed_ms"), ring_vec("bwd_exposed_ms")
        self.cp_fwd_bytes, self.cp_bwd_bytes = ring_vec("fwd_bytes"), ring_vec("bwd_bytes")
        self.cp_recompute = bool(has_ring and per_lane[0].recompute_ring)


class _CohortCosts:
    """Op times of one micro-batch on every lane of a cohort (from :class:`MicrobatchCosts`);
    ``dense`` / ``moe`` are None when the model has no layer of that kind."""

    def __init__(self, per_lane: list[MicrobatchCosts], activation_bytes: int, kinds: set[bool]):
        self.dense = _LayerVectors([c.dense for c in per_lane]) if False in kinds else None
        self.moe = _LayerVectors([c.moe for c in per_lane]) if True in kinds else None
        self.logits_fwd = np.array([c.logits_fwd_ms for c in per_lane])
        self.logits_bwd = np.array([c.logits_bwd_ms for c in per_lane])
        self.logits_weights = np.array([c.logits_weights_ms for c in per_lane])
        self.p2p_bytes = np.array([c.p2p_bytes for c in per_lane])
        self.tp_bytes = np.array([float(c.tokens * activation_bytes) for c in per_lane])


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
    dispatches: list[DispatchBatch]  # one batch per (stage, MoE layer)
    dispatch_layers: list[int]  # the layer of each batch
    # (world_size,) token copies each GPU's expert GEMMs computed in the forward, all MoE
    # layers and micro-batches (on its 1/ETP slice of the FFN); 0 for unsimulated replicas
    expert_tokens: np.ndarray | None = None


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
        network: Network | None = None,
        reuse: TrainingSim | None = None,
    ):
        """``reuse``: an earlier pass over the same plan and workload (the shared-link
        model's first pass); this pass reads its per-plan tables (micro-batch costs, each
        layer's routes and expert times, collective times) instead of computing them again.
        Only timing differs between the passes, and none of these depends on it."""
        self.plan, self.rec, self.routing = plan, recorder, routing
        self.net = network  # shared links (hardware.topology): flows, then delays
        self.layout = Layout(plan)
        self.par, self.model, self.hw = plan.parallel, plan.model, plan.hardware
        check_supported(plan, self.layout)
        self.env = simpy.Environment()
        self.rv = Rendezvous(self.env)
        self.simulated_dp = 1 if symmetric else self.par.dp
        self.seq_lens = seq_lens
        self._mb_tokens = np.array([[int(x.sum()) for x in mbs] for mbs in seq_lens])
        self._act_bytes = self.model.hidden_size * DTYPE_BYTES[self.model.dtype]
        # bytes per gradient element reduced over DP: the memory model's gradient type (FP32
        # main gradients for BF16 / FP8, FP16 for FP16 training, costs/precision.py)
        self._grad_bytes = precision.training_bytes_per_param(self.model)[1]
        if precision.is_fp8(self.model):
            self._fp8_token_bytes = self.model.hidden_size * precision.fp8_activation_bytes(
                self.model
            )
        self.lanes = make_lanes(self.layout, self.simulated_dp)
        self.ep = EpIndex.of(self.layout, self.lanes) if self.model.moe is not None else None
        self.cohorts = [self._make_cohort(stage) for stage in range(self.par.pp)]
        self._cohort_costs: dict[int, _CohortCosts] = {}
        self._layer_kinds = {self.model.is_moe_layer(i) for i in range(self.model.num_layers)}
        self.expert_timer = ExpertTimer(plan) if self.model.moe else None
        self.dispatches: list[DispatchBatch] = []
        self.dispatch_layers: list[int] = []
        self.expert_tokens = np.zeros(plan.parallel.world_size)
        self._layer_routes: dict[tuple[int, int], _LayerRoutes] = {}  # (stage, layer)
        self._dualpipe = self.par.schedule == "dualpipe"
        self._ready: dict[tuple, simpy.Event] = {}
        self._progress = progress
        self._steps_total = sum(len(self._steps(co.stage)) * len(co.lanes) for co in self.cohorts)
        self._steps_done = 0
        self._pipeline_end = 0.0
        self._counts = count_params(self.model)
        self._layer_grads: dict[int, tuple[float, float]] = {}
        self._collective_ms: dict[tuple, float] = {}
        self._links: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._send_pairs: dict[tuple[int, int], tuple] = {}  # (stage, peer stage)
        self._groups_of_lanes: dict[tuple[int, str], list] = {}  # (stage, what) -> groups
        self._a2a_routes: dict[tuple, tuple] = {}
        self._lane_route_cache: dict[tuple[str, int], tuple] = {}  # (tp_comm | etp_comm, stage)
        # sharded data parallelism: ZeRO-2/3 reduce-scatter layer by layer, ZeRO-3 gathers
        sharding = self.par.sharding
        self._layer_rs = sharding in ("gradients", "full")
        self._layer_ag = sharding == "full"
        # one in-order hardware queue: a sharding collective issued behind a busy stream
        # holds back the compute issued after it (costs.sharding.one_hardware_queue)
        self._one_queue = one_hardware_queue(plan)
        # ZeRO-3 forward: the next layer's gather overlaps the layer before it unless it is
        # issued after that layer's kernels in one queue (costs.sharding.forward_prefetch)
        self._forward_prefetch = forward_prefetch(plan)
        self._units: dict[int, LayerUnit] = {}
        self._shard_streams: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # (stage, layer) -> (batch, routes, expert tokens, idle): what routing the layer gave
        self._route_memo: dict[tuple[int, int], tuple] = {}
        # ZeRO-1/2 with overlap: the parameter gathers of the next forward, bucket by bucket
        # (param_gather.py); per stage the chain's clock and dispatched chunks, and each
        # layer's gather end
        self._overlapped_gather = self._gathers_after_step and self.par.overlap_communication
        self._gather_chain: dict[int, tuple[np.ndarray, set[int]]] = {}
        self._gather_ready: dict[int, dict[int, GatherBucket]] = {}  # stage -> layer -> bucket
        # the gradient-bucket stream: per stage its clock, which is the end of the collective
        # issued last, whose row is recorded when the next is issued (all-to-alls sharing the
        # NICs push it meanwhile), as (op, start, end = clock, bytes)
        self._bucket_busy: dict[int, np.ndarray] = {}
        self._bucket_pending: dict[int, tuple] = {}
        if reuse is not None:
            self._share_tables(reuse)

    def _share_tables(self, other: TrainingSim) -> None:
        """Read ``other``'s tables (same plan and workload): its micro-batch costs, layer
        routes (:meth:`_route_layer` replays their effects), collective times and routes."""
        if other.plan is not self.plan or other.seq_lens is not self.seq_lens:
            raise ValueError("a pass reuses the tables of a pass over the same plan and workload")
        self._cohort_costs = other._cohort_costs
        self._route_memo = other._route_memo
        self._collective_ms = other._collective_ms
        self._links = other._links
        self._send_pairs = other._send_pairs
        self._groups_of_lanes = other._groups_of_lanes
        self._layer_grads = other._layer_grads
        self._units = other._units

    # ---- construction ----------------------------------------------------------------------
    def _make_cohort(self, stage: int) -> Cohort:
        lanes = [ln for ln in self.lanes if ln.stage == stage]
        co = Cohort(stage, lanes, np.array([ln.index for ln in lanes], dtype=np.int32))
        if self.model.moe is None:
            return co
        groups = sorted({gid for ln in lanes for gid in ln.ep_groups})
        position = {gid: j for j, gid in enumerate(groups)}
        co.groups = groups
        co.membership = np.array([[gid in ln.ep_groups for ln in lanes] for gid in groups])
        size, rest = divmod(len(lanes), len(groups))
        blocks = np.repeat(np.eye(len(groups), dtype=bool), size, axis=1) if not rest else None
        co.block = size if blocks is not None and np.array_equal(co.membership, blocks) else 0
        co.ranks = np.array([r for ln in lanes for r in ln.ranks], dtype=np.int64)
        ep = self.par.ep
        co.rank_slot = np.array(
            [position[self.ep.slot_of[r][0]] * ep + self.ep.slot_of[r][1] for r in co.ranks],
            dtype=np.int64,
        )
        return co

    def _steps(self, stage: int):
        return stage_steps(
            self.par.schedule,
            self.par.pp,
            self.par.num_microbatches,
            stage,
            self.par.virtual_stages,
        )

    def _chunk_layers(self, stage: int, chunk: int) -> list[int]:
        if self._dualpipe:  # chunk 1 is the model stage at the mirrored position
            return self.layout.stage_layers[dualpipe_position(self.par.pp, stage, chunk)]
        return self.layout.chunk_layers(stage, chunk)

    def _place(self, stage: int, chunk: int) -> tuple[int, bool, bool]:
        """Virtual stage of ``chunk`` of ``stage`` (the key of its transfers) and whether it is
        the first / last of its pipeline. DualPipe: ``chunk * pp + position``, each chunk its
        own pipeline (chunk 1 fed at the last stage)."""
        p = self.par.pp
        if self._dualpipe:
            position = dualpipe_position(p, stage, chunk)
            return chunk * p + position, position == 0, position == p - 1
        vstage = chunk * p + stage
        return vstage, vstage == 0, vstage == p * self.par.virtual_stages - 1

    def _stage_of(self, vstage: int) -> int:
        """The pipeline stage running virtual stage ``vstage``."""
        p = self.par.pp
        if self._dualpipe:  # the position <-> stage map is its own inverse
            return dualpipe_position(p, vstage % p, vstage // p)
        return vstage % p

    def _costs_of(self, co: Cohort, mb: int) -> _CohortCosts:
        """Per-lane op times of micro-batch ``mb`` (the same on every stage: every stage's
        lanes are the same replicas, and TP groups have the same shape)."""
        found = self._cohort_costs.get(mb)
        if found is None:
            ranks = self.lanes[0].ranks
            per_lane = [
                MicrobatchCosts(self.plan, ranks, self.seq_lens[ln.dp][mb]) for ln in co.lanes
            ]
            found = self._cohort_costs[mb] = _CohortCosts(
                per_lane, self._act_bytes, self._layer_kinds
            )
        return found

    # ---- running ---------------------------------------------------------------------------
    def run(self) -> SimResult:
        """Simulate the iteration; return its end time and bookkeeping."""
        finals = [self.env.process(self._cohort(co)) for co in self.cohorts]
        self.env.run()
        if self.rv.pending or not all(p.triggered for p in finals):
            raise RuntimeError("simulation deadlocked: a collective never completed")
        tokens = int(sum(int(x.sum()) for mbs in self.seq_lens for x in mbs))
        # Events = rows recorded: one per compute op or collective step of a lane.
        return SimResult(
            self.env.now,
            self._pipeline_end,
            self.lanes,
            self.simulated_dp,
            self.rec.size,
            tokens,
            self.seq_lens,
            self.dispatches,
            self.dispatch_layers,
            self.expert_tokens,
        )

    def _event(self, key: tuple) -> simpy.Event:
        ev = self._ready.get(key)
        if ev is None:
            ev = self._ready[key] = self.env.event()
        return ev

    def _reach(self, t_ms: float):
        """A wait until ``t_ms`` (or none when the clock is there already)."""
        return self.env.timeout(max(0.0, t_ms - self.env.now))

    def _cohort(self, co: Cohort):
        steps = self._steps(co.stage)
        # the step completing each chunk's weight gradients: its last full backward or W
        last_b = {st.chunk: i for i, st in enumerate(steps) if st.kind in ("B", "W")}
        pairs = set(self._pairs(co.stage))
        received: dict[int, np.ndarray] = {}  # a pair's backward input, taken with its forward
        buckets = simpy.Store(self.env)
        comm = self.env.process(self._grad_stream(co, buckets))
        grad_state = {"bytes": 0.0, "expert_bytes": 0.0, "bucketed": True}
        last_chunk = max(last_b, key=last_b.get) if last_b else 0  # its grads complete last
        free = np.zeros(len(co.lanes))  # each lane's clock: the end of its last step
        if self._overlapped_gather:
            self._gather_chain[co.stage] = (np.zeros(len(co.lanes)), set())
            for chunk in (0, 1):  # chunk 1: interleaved (align_param_gather) or DualPipe
                self._dispatch_gather(co, chunk, free)
        partners = self._overlap_partners(steps, co.stage)
        for i, step in enumerate(steps):
            vstage, first, last = self._place(co.stage, step.chunk)
            self._partner = partners[i]
            layers = self._chunk_layers(co.stage, step.chunk)
            mb = step.microbatch
            costs = self._costs_of(co, mb)
            forward = step.kind == "F"
            start = free
            if i in received:
                start = np.maximum(free, received.pop(i))
            elif (not first) if forward else (step.kind != "W" and not last):
                arrived = yield from self._receive("act" if forward else "grad", vstage, mb)
                start = np.maximum(free, arrived)
            if i in pairs:  # DualPipe's F&B step receives both inputs before computing
                partner = steps[i + 1]
                p_vstage, _, p_last = self._place(co.stage, partner.chunk)
                if not p_last:
                    received[i + 1] = yield from self._receive("grad", p_vstage, partner.microbatch)
                    start = np.maximum(start, received[i + 1])
            grads = buckets if last_b.get(step.chunk) == i else None
            grad_state["bucketed"] = self._bucketed(co.stage, step.chunk)
            if forward and self._overlapped_gather and not self._dualpipe:
                # interleaved: chunk k + 1's gathers go out with chunk k's first forward
                self._dispatch_gather(co, step.chunk + 1, start)
            if forward:
                free = self._forward(co, mb, layers, costs, last, start)
            elif step.kind == "W":
                free = self._weight_grads(co, mb, layers, costs, last, grads, grad_state, start)
            else:
                free = self._backward(
                    co, mb, layers, costs, last, grads, grad_state, start, step.kind == "I"
                )
            if (grads is not None and self.par.overlap_communication
                    and not grad_state["bucketed"] and step.chunk != last_chunk):  # fmt: skip
                self._flush_bucket(co, buckets, grad_state, final=False, ready=free)
            end = float(free.max())
            yield self._reach(end)
            if forward and not last:
                self._send(co, vstage + 1, mb, costs.p2p_bytes, "act", free)
            elif not forward:
                if not first and step.kind != "W":
                    self._send(co, vstage - 1, mb, costs.p2p_bytes, "grad", free)
                self._pipeline_end = max(self._pipeline_end, end)
            self._tick(len(co.lanes))
        self._flush_bucket(co, buckets, grad_state, final=True, ready=free)
        comm_free = yield comm
        # Megatron's optimizer step starts with the gradient-norm (clip_grad) all-reduce over
        # the model-parallel group, pipeline stages included: no stage updates its weights
        # before every stage has finished its backward and gradient reduction. A barrier
        # (the tiny all-reduce's latency is not charged).
        ready = float(np.maximum(free, comm_free).max())
        if co.stage in self._shard_streams:  # ZeRO-2/3: the last layer reduce-scatters
            ready = max(ready, float(self._shard_streams[co.stage][1].max()))
        start, _end, _ = yield self.rv.arrive(
            ("optimizer_barrier",), len(self.cohorts), ready, _fixed, 0.0
        )
        yield from self._optimizer(co, start)

    def _receive(self, what: str, vstage: int, mb: int):
        """Wait for the activations (gradients) of ``mb`` into ``vstage``; returns the lanes'
        arrival times."""
        key = (what, vstage, mb)
        arrived = yield self._event(key)
        del self._ready[key]
        return arrived

    def _pairs(self, stage: int) -> list[int]:
        """DualPipe's F&B steps of ``stage`` (the index of their forward); none otherwise."""
        par = self.par
        return overlapped_pairs(par.schedule, par.pp, par.num_microbatches, stage)

    def _overlap_partners(self, steps, stage: int = 0) -> list:
        """``parallel.overlap_ep_comm``: each step's partner in the 1F1B steady state (a
        forward followed by a backward run as one merged step, Megatron-Core's EP overlap),
        under DualPipe in its F&B steps; None outside them or without the option."""
        partners: list = [None] * len(steps)
        if not self.par.overlap_ep_comm or self.par.schedule == "gpipe" or not self.model.moe:
            return partners
        if self._dualpipe:
            for i in self._pairs(stage):
                partners[i], partners[i + 1] = steps[i + 1], steps[i]
            return partners
        for i in range(len(steps) - 1):
            if steps[i].kind == "F" and steps[i + 1].kind == "B":
                partners[i], partners[i + 1] = steps[i + 1], steps[i]
        return partners

    def _hidden_ms(self, co: Cohort, layer: int, routes: _LayerRoutes) -> np.ndarray | None:
        """Per lane, the compute of the partner step's ``layer`` one all-to-all can hide under
        (half of it: the layer has a dispatch and a combine); None without a partner."""
        partner = getattr(self, "_partner", None)
        if partner is None:
            return None
        lt, mb = self._costs_of(co, partner.microbatch).moe, partner.microbatch
        if partner.kind == "B":
            compute = lt.attn_bwd + routes.expert_bwd_ms[mb]
            compute = compute + (lt.recompute if self.par.recompute != "none" else 0.0)
        else:
            compute = lt.attn_fwd + routes.expert_fwd_ms[mb]
        return compute / 2

    def _tick(self, lanes: int) -> None:
        if not self._progress:
            return
        before = self._steps_done
        self._steps_done += lanes
        every = max(1, self._steps_total // 100)
        if self._steps_done // every != before // every:
            self._progress(self._steps_done / self._steps_total)

    # ---- forward / backward of a chunk -----------------------------------------------------
    def _forward(
        self, co: Cohort, mb: int, layers: list[int], costs: _CohortCosts, last: bool, t: np.ndarray
    ) -> np.ndarray:
        """Forward of a chunk from the lanes' start times ``t``; returns their end times."""
        gathered = self._gather_ahead(co, layers, mb, t, self._forward_prefetch)
        chain_ready = self._gather_ready.get(co.stage)
        for layer in layers:
            if gathered is not None:  # ZeRO-3: the layer's weights must be there
                t = gathered(layer, t)
            elif chain_ready is not None and layer in chain_ready:  # ZeRO-1/2, overlapped
                t = self._wait_gather(co, chain_ready[layer], t, layer, mb)
            moe = self.model.is_moe_layer(layer)
            lt = costs.moe if moe else costs.dense
            t = self._op(co, Kind.COMPUTE, Op.ATTN_FWD, t, lt.attn_fwd, layer, mb)
            t = self._ring_row(co, t, lt.cp_fwd, lt.cp_fwd_bytes, layer, mb)
            t = self._tp_rows(co, t, lt.tp_comm, layer, mb, costs, moe)
            if not moe:
                t = self._op(co, Kind.COMPUTE, Op.MLP_FWD, t, lt.mlp_fwd, layer, mb)
            else:  # each lane joins the dispatch when its attention ends
                t = self._moe_block(co, layer, mb, False, t)
        if last:
            t = self._op(co, Kind.COMPUTE, Op.LOGITS_FWD, t, costs.logits_fwd, -1, mb)
        return t

    def _backward(
        self,
        co: Cohort,
        mb: int,
        layers: list[int],
        costs: _CohortCosts,
        last: bool,
        buckets,
        grad_state,
        t: np.ndarray,
        defer_weights: bool = False,
    ) -> np.ndarray:
        """Backward of a chunk; on the chunk's last micro-batch each layer's gradients go to
        the bucket queue when they are ready. ``defer_weights`` (DualPipe's I step): the input
        gradients only, the weight-gradient share of each op runs later (:meth:`_weight_grads`)."""
        recompute = self.par.recompute != "none"
        if last:
            w = costs.logits_weights if defer_weights else 0.0
            t = self._op(co, Kind.COMPUTE, Op.LOGITS_BWD, t, costs.logits_bwd - w, -1, mb)
        gathered = self._gather_ahead(co, list(reversed(layers)), mb, t, prefetch=True)
        for layer in reversed(layers):
            if gathered is not None:
                t = gathered(layer, t)
            moe = self.model.is_moe_layer(layer)
            lt = costs.moe if moe else costs.dense
            if moe:
                t = self._moe_block(co, layer, mb, True, t, defer_weights)
            if recompute:
                t = self._op(co, Kind.COMPUTE, Op.RECOMPUTE, t, lt.recompute, layer, mb)
                if lt.cp_recompute:
                    t = self._ring_row(co, t, lt.cp_fwd, lt.cp_fwd_bytes, layer, mb)
                t = self._tp_rows(co, t, lt.recompute_comm, layer, mb, costs, moe)
            if not moe:
                w = lt.mlp_fwd if defer_weights else 0.0
                t = self._op(co, Kind.COMPUTE, Op.MLP_BWD, t, lt.mlp_bwd - w, layer, mb)
            t = self._tp_rows(co, t, lt.tp_comm, layer, mb, costs, moe)
            w = (lt.weights - lt.mlp_fwd) if defer_weights else 0.0
            t = self._op(co, Kind.COMPUTE, Op.ATTN_BWD, t, lt.attn_bwd - w, layer, mb)
            t = self._ring_row(co, t, lt.cp_bwd, lt.cp_bwd_bytes, layer, mb)
            if self._layer_rs:  # ZeRO-2/3: every micro-batch reduce-scatters the layer
                t = self._reduce_scatter_layer(co, layer, mb, t)
            elif buckets is not None:
                self._add_layer_grads(co, layer, buckets, grad_state, t)
        return t

    def _weight_grads(
        self,
        co: Cohort,
        mb: int,
        layers: list[int],
        costs: _CohortCosts,
        last: bool,
        buckets,
        grad_state,
        t: np.ndarray,
    ) -> np.ndarray:
        """DualPipe's W step: the weight gradients a deferred backward left, layer by layer
        in the backward's order, recorded as the layer's backward ops (compute only: no
        communication); the chunk's last W hands each layer's gradients to the buckets."""
        if last:
            t = self._op(co, Kind.COMPUTE, Op.LOGITS_BWD, t, costs.logits_weights, -1, mb)
        for layer in reversed(layers):
            moe = self.model.is_moe_layer(layer)
            lt = costs.moe if moe else costs.dense
            if moe:
                routes = self._routes(co, layer)
                t = self._op(
                    co, Kind.COMPUTE, Op.EXPERT_BWD, t, routes.expert_weights_ms[mb], layer, mb
                )
            else:
                t = self._op(co, Kind.COMPUTE, Op.MLP_BWD, t, lt.mlp_fwd, layer, mb)
            t = self._op(co, Kind.COMPUTE, Op.ATTN_BWD, t, lt.weights - lt.mlp_fwd, layer, mb)
            if buckets is not None:
                self._add_layer_grads(co, layer, buckets, grad_state, t)
        return t

    def _op(
        self,
        co: Cohort,
        kind: Kind,
        op: Op,
        t: np.ndarray,
        duration_ms,
        layer: int = -1,
        mb: int = -1,
        nbytes: float | np.ndarray = 0.0,
    ) -> np.ndarray:
        """Record one op on every lane of the cohort, from ``t`` for ``duration_ms`` (per lane
        or one for all); returns the lanes' end times."""
        end = t + duration_ms
        self.rec.add_block(co.lane_ids, kind, op, t, end, layer, mb, nbytes)
        return end

    def _ring_row(
        self, co: Cohort, t: np.ndarray, exposed_ms: np.ndarray, nbytes, layer: int, mb: int
    ) -> np.ndarray:
        """Context parallelism: the ring attention's transfer time not hidden under the
        attention (one row carrying the layer's ring bytes); nothing without CP."""
        if self.par.cp == 1:
            return t
        return self._op(co, Kind.COMM, Op.CP_COMM, t, exposed_ms, layer, mb, nbytes)

    def _tp_rows(
        self,
        co: Cohort,
        t: np.ndarray,
        total_ms: np.ndarray,
        layer: int,
        mb: int,
        costs: _CohortCosts,
        moe: bool,
    ) -> np.ndarray:
        """TP collective rows (one for an MoE layer, two for a dense one); returns end times."""
        if self.par.tp == 1 or not total_ms.any():
            return t
        parts = 1 if moe else 2
        part = total_ms / parts
        for _ in range(parts):
            took = part if self.net is None else self._lane_flows(co, "tp_comm", t, part, layer, mb)
            t = self._op(co, Kind.COMM, Op.TP_COMM, t, took, layer, mb, costs.tp_bytes)
        return t

    def _lane_flows(
        self, co: Cohort, kind: str, t: np.ndarray, duration_ms: np.ndarray, layer: int, mb: int
    ) -> np.ndarray:
        """A TP (``tp_comm``) or expert-TP (``etp_comm``) collective of every lane as a flow on
        the shared links (one per lane, from ``t``, ``duration_ms`` alone): returns the
        durations with their delays."""
        key = self.net.next_key(kind, co.stage, layer, mb)
        if self.net.delays is not None:
            return self.net.flows(key, kind, t, duration_ms, 0.0, [], 1)
        routes, fixed_ms = self._lane_routes(co, kind)
        return self.net.flows(key, kind, t, duration_ms, fixed_ms, routes, 1)

    def _lane_routes(self, co: Cohort, kind: str) -> tuple[Routes, np.ndarray]:
        """Per lane of the cohort: the links its TP collective (all-gather + reduce-scatter
        with sequence parallelism, else all-reduce; ``tp_comm``) or its expert-TP all-gather
        (in every ETP group of its ranks; ``etp_comm``) loads, and the collective's fixed time
        (ms; its time with an empty buffer). Cached per stage."""
        found = self._lane_route_cache.get((kind, co.stage))
        if found is not None:
            return found
        gpn, hw, links = self.hw.gpus_per_node, self.hw, self.net.links
        if kind == "tp_comm":
            ops = ["all_gather", "reduce_scatter"] if self.par.sequence_parallel else ["all_reduce"]
            size = self.par.tp
        else:
            ops, size = ["all_gather"], self.par.expert_tp
        routes, fixed = [], []
        for ln in co.lanes:
            groups = [ln.ranks[i : i + size] for i in range(0, len(ln.ranks), size)]
            merged: dict[int, float] = {}
            for group in groups:  # concurrently, on their own GPUs' links
                for op in ops:
                    cost = collective_cost(op, 1.0, group, gpn, hw)
                    inter = cost.inter_node_bytes_per_gpu
                    ids, volumes = links.group_volumes(group, cost.bytes_per_gpu - inter, inter)
                    for link, volume in zip(ids.tolist(), volumes.tolist(), strict=True):
                        merged[link] = merged.get(link, 0.0) + volume
            routes.append((np.array(list(merged), dtype=np.int64), np.array(list(merged.values()))))
            fixed.append(sum(collective_time_ms(op, 0.0, groups[0], gpn, hw) for op in ops))
        found = self._lane_route_cache[(kind, co.stage)] = (Routes.of(routes), np.array(fixed))
        return found

    # ---- MoE: dispatch, experts, combine ---------------------------------------------------
    def _moe_block(
        self,
        co: Cohort,
        layer: int,
        mb: int,
        backward: bool,
        ready: np.ndarray,
        defer_weights: bool = False,
    ):
        """Dispatch, experts, combine (reversed in the backward), from the lanes' ready times;
        returns the lanes' times after the combine. ``defer_weights``: the experts' backward
        without its weight-gradient share (DualPipe's I step)."""
        first_op, second_op = (
            (Op.A2A_COMBINE, Op.A2A_DISPATCH) if backward else (Op.A2A_DISPATCH, Op.A2A_COMBINE)
        )
        routes, t = self._a2a(co, layer, mb, first_op, ready, fp8=not backward)
        etp_ms = None if routes.etp_ms is None else routes.etp_ms[mb]
        if etp_ms is not None:
            t = self._op(co, Kind.COMM, Op.ETP_COMM, t, self._etp_ms(co, t, etp_ms, layer, mb),
                         layer, mb)  # fmt: skip
        op, expert_ms = (
            (Op.EXPERT_BWD, routes.expert_bwd_ms)
            if backward
            else (Op.EXPERT_FWD, routes.expert_fwd_ms)
        )
        expert_ms = expert_ms[mb]
        if defer_weights:
            expert_ms = expert_ms - routes.expert_weights_ms[mb]
        t = self._op(co, Kind.COMPUTE, op, t, expert_ms, layer, mb)
        if etp_ms is not None:
            t = self._op(co, Kind.COMM, Op.ETP_COMM, t, self._etp_ms(co, t, etp_ms, layer, mb),
                         layer, mb)  # fmt: skip
        _, t = self._a2a(co, layer, mb, second_op, t)
        return t

    def _etp_ms(self, co: Cohort, t: np.ndarray, etp_ms: np.ndarray, layer: int, mb: int):
        """The lanes' expert-TP collective from ``t``: ``etp_ms`` alone, with
        ``hardware.topology`` lengthened by its delay on the shared links."""
        return (
            etp_ms if self.net is None else self._lane_flows(co, "etp_comm", t, etp_ms, layer, mb)
        )

    def _a2a(self, co: Cohort, layer: int, mb: int, op: Op, ready: np.ndarray, fp8=False):
        """All-to-all over the cohort's EP groups (concurrently): each group starts when its
        slowest lane is ready; a lane in several groups waits for the last. ``fp8``: the
        forward dispatch, in FP8 where the dispatcher quantises it. With ``overlap_ep_comm`` a
        steady-state step is blocked only by what the partner micro-batch's compute cannot
        hide. Returns the layer's routes and the lanes' end times."""
        routes = self._routes(co, layer)
        durations, lane_bytes = routes.a2a_ms[mb], routes.lane_bytes[mb]
        if fp8 and routes.fp8_dispatch is not None:
            durations, lane_bytes = routes.fp8_dispatch[0][mb], routes.fp8_dispatch[1][mb]
        if co.block:
            starts = ready.reshape(len(co.groups), co.block).max(axis=1)
        else:
            starts = np.where(co.membership, ready[None, :], -np.inf).max(axis=1)
        if self.net is not None:
            durations = self._a2a_flows(co, layer, mb, op, starts, durations)
        hidden = self._hidden_ms(co, layer, routes)
        if hidden is not None:  # a group hides what all its lanes can hide
            if co.block:
                hidden = hidden.reshape(len(co.groups), co.block).min(axis=1)
            else:
                hidden = np.where(co.membership, hidden[None, :], np.inf).min(axis=1)
        exposed = durations if hidden is None else np.maximum(durations - hidden, 0.0)
        exposed = exposed + self._shared_with_sharding(co, starts, exposed)
        if co.block:
            ends = np.repeat(starts + exposed, co.block)
            full = np.repeat(starts + np.maximum(durations, exposed), co.block)
        else:
            member = co.membership
            ends = np.where(member, (starts + exposed)[:, None], -np.inf).max(axis=0)
            full = np.where(
                member, (starts + np.maximum(durations, exposed))[:, None], -np.inf
            ).max(axis=0)
        if hidden is None:
            self.rec.add_block(co.lane_ids, Kind.COMM, op, ready, ends, layer, mb, lane_bytes)
            return routes, ends
        # overlapped: the exposed part blocks the lane, the rest runs on the communication
        # stream under the partner micro-batch's compute (bytes split by time)
        share = np.divide(ends - ready, full - ready, out=np.ones_like(ends), where=full > ready)
        self.rec.add_block(co.lane_ids, Kind.COMM, op, ready, ends, layer, mb, lane_bytes * share)
        self.rec.add_block(
            co.lane_ids, Kind.COMM_ASYNC, op, ends, full, layer, mb, lane_bytes * (1 - share)
        )
        return routes, ends

    def _shared_with_sharding(
        self, co: Cohort, starts: np.ndarray, a2a_ms: np.ndarray
    ) -> np.ndarray:
        """ZeRO-1/2/3: the time each EP group's all-to-all (from
        ``starts``, ``a2a_ms`` long; per group) loses to the lanes' sharding streams when both
        cross nodes, and the streams' matching delay (their clocks move on in place): ZeRO-2/3's
        per-layer stream, and with overlap the distributed optimizer's gradient buckets and
        parameter gathers (:meth:`_overlapped_streams`).

        Both transfers then use the same NICs. Two bandwidth-bound transfers sharing a link
        fairly, needing ``d`` and ``r`` alone, finish at ``2 min(d, r)`` and ``d + r``: each
        is delayed by ``min(d, r)``, with ``r`` the stream's work left when the all-to-all
        starts (its clock minus the start). A group waits for its most delayed member.
        Zero when either stays inside a node (NVLink and the NICs are separate links), and
        with ``hardware.topology``, where both are flows on the shared links instead."""
        zero = np.zeros_like(a2a_ms)
        sharded = self._layer_rs or self._overlapped_gather
        if not sharded or self.net is not None or not self._cross_node_sharing(co):
            return zero
        if co.block:
            lane_start = np.repeat(starts, co.block)
            lane_d = np.repeat(a2a_ms, co.block)
        else:
            member = co.membership
            lane_start = np.where(member, starts[:, None], -np.inf).max(axis=0)
            lane_d = np.where(member, a2a_ms[:, None], 0.0).max(axis=0)
        if self._layer_rs:
            clock, _ = self._streams(co)
            delay = fair_share_delay_ms(lane_d, clock - lane_start)
            clock += delay
        else:
            delay = self._overlapped_streams(co, lane_start, lane_d)
        if co.block:
            return delay.reshape(len(co.groups), co.block).max(axis=1)
        return np.where(co.membership, delay[None, :], 0.0).max(axis=1)

    def _overlapped_streams(
        self, co: Cohort, lane_start: np.ndarray, lane_d: np.ndarray
    ) -> np.ndarray:
        """ZeRO-1/2 with overlap: an all-to-all of ``lane_d`` from ``lane_start`` (per lane)
        beside the work left on the lane's gradient-bucket stream (buckets issued, not yet
        reduced) and its parameter gathers (dispatched, not yet done). Each is delayed by the
        fair share of the NIC (``fair_share_delay_ms`` against their sum), and the backlog by
        as much, split over the two in proportion to their work left: the bucket stream's
        clock moves (the rows already recorded keep their ends, as ZeRO-2/3's), and so does
        every gather still to end (each layer waits for its bucket's new end)."""
        busy = self._bucket_busy.get(co.stage)
        bucket_left = np.zeros_like(lane_d) if busy is None else np.maximum(busy - lane_start, 0)
        chain = self._gather_chain.get(co.stage)
        gather_left = np.zeros_like(lane_d)
        if chain is not None:
            gather_left = np.maximum(chain[0] - lane_start, 0.0)
        backlog = bucket_left + gather_left
        delay = fair_share_delay_ms(lane_d, backlog)
        share = np.divide(gather_left, backlog, out=np.zeros_like(backlog), where=backlog > 0)
        if busy is not None:
            busy += delay * (1.0 - share)
        if chain is not None and gather_left.any():
            push = delay * share
            chain[0][:] += push
            for bucket in {id(b): b for b in self._gather_ready[co.stage].values()}.values():
                if not bucket.recorded:
                    bucket.push(lane_start, push)
        return delay

    def _cross_node_sharing(self, co: Cohort) -> bool:
        """Whether the cohort's EP all-to-alls and its sharded-DP collectives both cross
        nodes (cached per stage)."""
        key = ("cross_node_sharing", co.stage)
        found = self._collective_ms.get(key)
        if found is None:
            gpn, hw = self.hw.gpus_per_node, self.hw
            ep_cross = any(
                link_for_group(self.ep.groups[gid], gpn, hw).crosses_nodes for gid in co.groups
            )
            shard_cross = any(
                link_for_group(shard, gpn, hw).crosses_nodes
                for kind in ("dp", "edp")
                for shard, _ in self._shard_groups(co, kind)
                if len(shard) > 1
            )
            found = self._collective_ms[key] = float(ep_cross and shard_cross)
        return bool(found)

    def _routes(self, co: Cohort, layer: int) -> _LayerRoutes:
        """The cohort's routes of ``layer`` (routed the first time; under DualPipe a layer
        runs on two stages, each with its own EP groups)."""
        routes = self._layer_routes.get((co.stage, layer))
        if routes is None:
            routes = self._layer_routes[(co.stage, layer)] = self._route_layer(co, layer)
        return routes

    def _a2a_flows(self, co: Cohort, layer: int, mb: int, op: Op, starts, durations):
        """The all-to-alls of one layer and micro-batch as flows on the shared links."""
        key = ("a2a", co.stage, layer, mb, int(op))
        if self.net.delays is not None:
            return self.net.flows(key, "ep_a2a", starts, durations, 0.0, [], 1)
        (links, volumes, counts), latency = self._a2a_routes[(co.stage, layer)]
        lanes = co.membership.sum(axis=1) if co.membership is not None else 1
        flows = Routes(links, volumes[mb], counts)
        return self.net.flows(key, "ep_a2a", starts, durations, latency, flows, lanes)

    def _route_layer(self, co: Cohort, layer: int) -> _LayerRoutes:
        """Route every EP group and micro-batch of ``layer`` in one batch; time the
        all-to-alls and each lane's experts."""
        m, num_groups, ep = self.par.num_microbatches, len(co.groups), self.par.ep
        # Each member routes its TP rank's share of its lane's tokens (sequence parallel: the
        # lane's T tokens split over its TP ranks, the first T % tp ranks one more).
        tp, gids = self.par.tp, np.array(co.groups)
        lane_tokens = self._mb_tokens[self.ep.dp[gids]]  # (G, ep, m)
        if self.par.cp > 1:  # each CP rank holds 1/cp of its replica's tokens
            cp = self.par.cp
            lane_tokens = lane_tokens // cp + (self.ep.cp[gids][:, :, None] < lane_tokens % cp)
        share = lane_tokens // tp + (self.ep.tp[gids][:, :, None] < lane_tokens % tp)
        tokens = share.transpose(0, 2, 1).reshape(num_groups * m, ep)  # group-major rows
        keys = np.tile(np.arange(m), num_groups) * len(self.ep.groups) + np.repeat(gids, m)
        batch = dispatch_many(self.routing, layer, keys, tokens)
        self.dispatches.append(batch)
        self.dispatch_layers.append(layer)
        known = self._route_memo.get((co.stage, layer))
        if known is not None and known[0] is batch:  # an earlier pass timed this routing
            _, routes, expert_tokens, idle = known
            self._expert_effects(co, expert_tokens, idle)
            return routes
        copies = batch.a2a_tokens.reshape(num_groups, m, ep, ep)
        send = copies * self._act_bytes
        a2a_ms, lane_bytes = self._a2a_times(co, send)
        if self.net is not None and self.net.delays is None:
            self._record_a2a_routes(co, layer, send)
        fp8_dispatch = None
        if precision.is_fp8(self.model) and self.par.moe_dispatcher == "deepep":
            # DeepEP dispatches FP8 tokens (+ scales); the combine stays BF16
            fp8_dispatch = self._a2a_times(co, copies * self._fp8_token_bytes)
        fwd, bwd, etp_ms, weights, expert_tokens, idle = self._expert_times(co, batch, m)
        self._expert_effects(co, expert_tokens, idle)
        routes = _LayerRoutes(a2a_ms, lane_bytes, fwd, bwd, etp_ms, fp8_dispatch, weights)
        self._route_memo[(co.stage, layer)] = (batch, routes, expert_tokens, idle)
        return routes

    def _expert_effects(self, co: Cohort, expert_tokens: np.ndarray, idle) -> None:
        """Add one layer's expert token copies per rank to ``expert_tokens`` and its ranks'
        waits for their lane's slowest rank (None: no TP) to ``rank_idle_ms``."""
        self.expert_tokens[co.ranks] += expert_tokens
        if idle is not None:
            self.rec.rank_idle_ms[co.ranks] += idle  # every micro-batch, both directions

    def _a2a_times(self, co: Cohort, send: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All-to-all time per (micro-batch, group) of ``send`` bytes (G, m, ep, ep), and the
        bytes one GPU of each lane sends (m, L)."""
        m, tp = send.shape[1], self.par.tp
        a2a_ms = np.stack(
            [
                all_to_all_v_times_ms(
                    send[j],
                    self.ep.groups[gid],
                    self.hw.gpus_per_node,
                    self.hw,
                    self.par.moe_dispatcher,
                )
                for j, gid in enumerate(co.groups)
            ],
            axis=1,
        )
        # Bytes each member sends to the others (its own share stays put); a lane's row
        # records the mean over its GPUs, as the other collectives record one GPU's bytes.
        sent = send.sum(axis=3) - np.diagonal(send, axis1=2, axis2=3)  # (G, m, ep)
        per_rank = sent.transpose(1, 0, 2).reshape(m, -1)[:, co.rank_slot]
        return a2a_ms, per_rank.reshape(m, len(co.lanes), tp).mean(axis=2)

    def _record_a2a_routes(self, co: Cohort, layer: int, send: np.ndarray) -> None:
        """Link volumes of every group's all-to-all of ``layer`` (links and counts per group,
        volumes per micro-batch: the :class:`Routes` of each micro-batch's batch) and the fixed
        part of its time (the all-to-all of an empty matrix)."""
        links, volumes, latency = [], [], []
        for j, gid in enumerate(co.groups):
            ranks = self.ep.groups[gid]
            found = self.net.links.matrix_volumes(np.array(ranks), send[j])
            links.append(found[0])
            volumes.append(found[1])
            key = ("a2a_latency", gid)
            fixed = self._collective_ms.get(key)
            if fixed is None:
                empty = np.zeros((1, len(ranks), len(ranks)))
                fixed = self._collective_ms[key] = all_to_all_v_times_ms(
                    empty, ranks, self.hw.gpus_per_node, self.hw, self.par.moe_dispatcher
                )[0]
            latency.append(fixed)
        counts = np.array([len(x) for x in links], dtype=np.int64)
        csr = (np.concatenate(links), np.ascontiguousarray(np.hstack(volumes)), counts)
        self._a2a_routes[(co.stage, layer)] = (csr, np.array(latency))

    def _expert_times(self, co: Cohort, batch: DispatchBatch, m: int):
        """Per micro-batch and lane: expert time forward and backward (the lane's slowest
        rank), ETP all-gather time (None without expert TP), the weight-gradient share of
        the backward (the forward GEMMs' time, without synchronisation), the token copies each
        rank of the cohort computes, and the ranks' waits for their lane's slowest rank (None
        without TP)."""
        etp, tp, lanes = self.par.expert_tp, self.par.tp, len(co.lanes)

        def per_rank(values: np.ndarray) -> np.ndarray:  # (G * m, n) -> (m, ranks)
            by_mb = values.reshape(len(co.groups), m, -1).transpose(1, 0, 2).reshape(m, -1)
            return by_mb[:, co.rank_slot]

        received, active = per_rank(batch.received_tokens), per_rank(batch.active_experts)
        if etp > 1:  # each ETP group (inside the lane; its members are in etp different EP
            # groups) all-gathers its members' copies: every member computes all of them on
            # its 1/etp of the experts' FFN width (the ExpertTimer's GEMM shapes)
            received = received.reshape(m, -1, etp).sum(axis=2).repeat(etp, axis=1)
        expert_tokens = received.sum(axis=0)
        timer = self.expert_timer
        rank_ms = timer.compute_ms(received, active)
        full = self.par.recompute == "full"
        factor = BACKWARD_FACTOR + (1.0 if full else 0.0)
        # selective recompute of the experts' activation (moe_act): its forward again
        rank_bwd = rank_ms * factor + timer.recompute_ms(received)
        # the dropless synchronisation: once per forward pass (a full recompute is one more)
        sync = np.where(received > 0, timer.sync_ms, 0.0)
        if tp == 1:
            fwd, bwd = rank_ms + sync, rank_bwd + (sync if full else 0.0)
            weights, idle = rank_ms, None
        else:
            fwd_compute = rank_ms.reshape(m, lanes, tp).max(axis=2)
            bwd_compute = rank_bwd.reshape(m, lanes, tp).max(axis=2)
            lane_sync = sync.reshape(m, lanes, tp).max(axis=2)
            fwd = fwd_compute + lane_sync
            bwd = bwd_compute + (lane_sync if full else 0.0)
            weights = fwd_compute
            idle = (np.repeat(fwd_compute, tp, axis=1) - rank_ms).sum(axis=0)
            idle += (np.repeat(bwd_compute, tp, axis=1) - rank_bwd).sum(axis=0)
        etp_ms = None
        if etp > 1:
            sizes = received.reshape(m, lanes, tp).max(axis=2) * self._act_bytes
            bandwidth, latency = self._link_vectors([ln.ranks[:etp] for ln in co.lanes])
            etp_ms = all_gather_ms(sizes, etp, bandwidth, latency)
        return fwd, bwd, etp_ms, weights, expert_tokens, idle

    # ---- pipeline transfers ----------------------------------------------------------------
    def _send(
        self, co: Cohort, to_vstage: int, mb: int, nbytes: np.ndarray, what: str, free: np.ndarray
    ) -> None:
        """Send every lane's activations (or gradients) to the same replica's lane of the
        next (previous) stage; each lane's transfer starts when the lane is free."""
        peer = self.cohorts[self._stage_of(to_vstage)]
        found = self._send_pairs.get((co.stage, peer.stage))
        if found is None:  # the first ranks of each lane and its peer, and their link
            pairs = [[a.ranks[0], b.ranks[0]] for a, b in zip(co.lanes, peer.lanes, strict=True)]
            found = self._send_pairs[(co.stage, peer.stage)] = (pairs, self._link_vectors(pairs))
        pairs, (bandwidth, latency) = found
        duration = p2p_ms(nbytes, bandwidth, latency)
        if self.net is not None:
            key = ("p2p", what, to_vstage, mb)
            duration = self.net.sends(key, pairs, nbytes, free, duration)
        arrive = free + duration
        self.rec.add_block(co.lane_ids, Kind.COMM_ASYNC, Op.P2P_SEND, free, arrive, -1, mb, nbytes)
        target = self._event((what, to_vstage, mb))
        trigger_at(target, arrive, max(0.0, float(arrive.max()) - self.env.now))

    def _link_vectors(self, groups: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Bandwidth (GB/s) and latency (µs) of each group's slowest link, as arrays (one
        entry per lane; cached by the groups)."""
        key = tuple(map(tuple, groups))
        found = self._links.get(key)
        if found is None:
            links = [link_for_group(g, self.hw.gpus_per_node, self.hw) for g in groups]
            found = self._links[key] = (
                np.array([ln.bandwidth_gbps for ln in links]),
                np.array([ln.latency_us for ln in links]),
            )
        return found

    # ---- data-parallel gradients and the optimizer -----------------------------------------
    def _layer_grad_bytes(self, layer: int) -> tuple[float, float]:
        found = self._layer_grads.get(layer)
        if found is not None:
            return found
        sums = self._counts.layers([layer])
        t, kv = self.par.tp, min(self.par.tp, self.model.kv_heads)
        dense = (
            (sums.attention - sums.attention_kv + sums.dense_mlp + sums.shared_experts) / t
            + sums.attention_kv / kv
            + sums.norms
            + sums.router
        )
        expert = sums.routed_experts / (self.par.expert_tp * self.par.ep)
        found = self._layer_grads[layer] = (dense * self._grad_bytes, expert * self._grad_bytes)
        return found

    def _bucketed(self, stage: int, chunk: int) -> bool:
        """Whether a model chunk's gradients (and gathers) are bucketed: Megatron-Core buckets
        only the first chunk of the first pipeline stage (``pp_rank > 0``: ``bucket_size =
        None``; later chunks: ``disable_bucketing``), the others are one bucket each, reduced
        after the chunk's last backward ("not on the critical path"). DualPipe (not
        Megatron-Core's schedule) buckets every chunk."""
        return self._dualpipe or (stage == 0 and chunk == 0)

    def _add_layer_grads(self, co: Cohort, layer: int, buckets, state, ready: np.ndarray) -> None:
        dense, expert = self._layer_grad_bytes(layer)
        state["bytes"] += dense
        state["expert_bytes"] += expert
        if not self.par.overlap_communication or not state["bucketed"]:
            return
        if state["bytes"] + state["expert_bytes"] >= self.par.grad_bucket_mb * MIB:
            self._flush_bucket(co, buckets, state, final=False, ready=ready)

    def _flush_bucket(self, co: Cohort, buckets, state, final: bool, ready: np.ndarray) -> None:
        if self._layer_rs:  # ZeRO-2/3 reduced every layer already
            if final:
                buckets.put(None)
            return
        if final:  # embedding / output layer gradients join the last bucket
            dense, _ = stage_params_per_gpu(self.plan, self.layout, self._counts, co.stage)
            state["bytes"] = max(state["bytes"], 0.0) + self._non_layer_grads(co.stage, dense)
        if state["bytes"] or state["expert_bytes"]:
            self._reduce_bucket(co, state["bytes"], state["expert_bytes"], ready)
        state["bytes"] = state["expert_bytes"] = 0.0
        if final:
            buckets.put(None)

    def _reduce_bucket(self, co: Cohort, dense_bytes: float, expert_bytes: float, ready) -> None:
        """One gradient bucket on the cohort's bucket stream (one per lane, FIFO, one
        collective at a time): its dense part over DP, then its expert part over EDP, each
        from when the bucket is ready and the stream is free. Timed when the bucket is
        issued, so that the all-to-alls after it see the stream's backlog (its clock, which
        they push when they share the NICs with it: :meth:`_overlapped_streams`)."""
        clock = self._bucket_busy.get(co.stage, np.zeros(len(co.lanes)))
        for kind, size, op in (
            ("dp", dense_bytes, Op.GRAD_REDUCE),
            ("edp", expert_bytes, Op.EXPERT_GRAD_REDUCE),
        ):
            groups = self._lane_groups(co, kind) if kind == "dp" or self.model.moe else []
            if groups and size > 0:
                start = np.maximum(ready, clock)  # the bucket is ready, the stream is free
                ends = self._dp_collective(co, groups, size, op, start)
                self._record_bucket(co)
                self._bucket_pending[co.stage] = (op, start, ends, size)
                self._bucket_busy[co.stage] = clock = ready = ends

    def _record_bucket(self, co: Cohort) -> None:
        """Record the bucket stream's last collective (its end as pushed so far)."""
        pending = self._bucket_pending.pop(co.stage, None)
        if pending is not None:
            op, start, ends, size = pending
            kind_row = Kind.COMM_ASYNC if self.par.overlap_communication else Kind.COMM
            self.rec.add_block(co.lane_ids, kind_row, op, start, ends, -1, -1, size)

    def _non_layer_grads(self, stage: int, dense_params: float) -> float:
        layer_dense = sum(
            self._layer_grad_bytes(i)[0]
            for s in self.layout.held_stages(stage)  # DualPipe: both chunks
            for i in self.layout.stage_layers[s]
        )
        return max(0.0, dense_params * self._grad_bytes - layer_dense)

    def _group_of(self, kind: str, rank: int) -> list[int]:
        """The ``kind`` group of ``rank``; with context parallelism the dense gradients and
        parameters are reduced and gathered over DP x CP (Megatron's data-parallel group with
        CP): the ranks of the same TP slot and stage."""
        if kind != "dp" or self.par.cp == 1:
            return self.layout.group_of(kind, rank)
        c, lay = self.layout.coords(rank), self.layout
        return sorted(
            lay.rank_of(tp=c.tp, cp=j, dp=d, pp=c.pp)
            for d in range(self.par.dp)
            for j in range(self.par.cp)
        )

    def _lane_groups(self, co: Cohort, kind: str) -> list[tuple[list[int], np.ndarray]]:
        """The cohort's lanes by their ``kind`` group (of their first rank): (group, lane
        positions), for groups of more than one GPU. DP and EDP groups lie inside a stage, so
        every simulated member of a group is a lane of this cohort."""
        found = self._groups_of_lanes.get((co.stage, kind))
        if found is not None:
            return found
        by_first: dict[int, tuple[list[int], list[int]]] = {}
        for pos, ln in enumerate(co.lanes):
            group = self._group_of(kind, ln.ranks[0])
            by_first.setdefault(group[0], (group, []))[1].append(pos)
        found = self._groups_of_lanes[(co.stage, kind)] = [
            (group, np.array(positions)) for group, positions in by_first.values() if len(group) > 1
        ]
        return found

    def _grad_stream(self, co: Cohort, buckets: simpy.Store):
        """Waits for the cohort's last gradient bucket (:meth:`_reduce_bucket` times them)
        and until its stream is done. Returns the lanes' stream clocks at the end."""
        while (yield buckets.get()) is not None:
            pass
        self._record_bucket(co)
        clock = self._bucket_busy.get(co.stage, np.zeros(len(co.lanes)))
        yield self._reach(float(clock.max()))
        return clock

    def _dp_collective(
        self, co: Cohort, groups, size: float, op: Op, start: np.ndarray
    ) -> np.ndarray:
        """One bucket's reduction over each of the cohort's DP (or EDP) groups: each starts
        when its last member's stream is ready. Returns the lanes' end times."""
        kind = "reduce_scatter" if self.par.sharding != "none" else "all_reduce"
        return self._groups_collective(co, groups, kind, size, start, ("grad", int(op)), "dp_grad")

    def _groups_collective(
        self, co: Cohort, groups, kind: str, size: float, start: np.ndarray, tag: tuple,
        flow: str,
    ) -> np.ndarray:  # fmt: skip
        """A collective ``kind`` of ``size`` bytes per GPU over each of ``groups`` (group,
        lane positions), from its last member's ``start``: timed once per (kind, tag, size,
        group), a flow ``flow`` on the shared links with ``hardware.topology``. Returns the
        lanes' end times (``start`` for lanes in none of the groups)."""
        ends = np.array(start, dtype=float)
        for group, positions in groups:
            key = (kind, *tag[1:], size, group[0])
            duration = self._collective_ms.get(key)
            if duration is None:
                duration = self._collective_ms[key] = collective_time_ms(
                    kind, size, group, self.hw.gpus_per_node, self.hw, "hierarchical"
                )
            begin = float(start[positions].max())
            if self.net is not None:
                net_key = self.net.next_key(tag[0], co.stage, *tag[1:], group[0])
                duration = self.net.collective(
                    net_key, flow, kind, size, group, begin, duration, len(positions)
                )
            ends[positions] = begin + duration
        return ends

    def _param_gather(self, co: Cohort, start: np.ndarray) -> float:
        """Distributed optimizer without overlap: all-gather the updated parameters over DP
        (and EDP; FP8 primary weights in FP8, costs/precision.py) after the step; records a
        blocking row per lane from ``start`` with the bytes one GPU gathers, returns the
        duration."""
        dense, expert = stage_params_per_gpu(self.plan, self.layout, self._counts, co.stage)
        bpe = precision.param_gather_bytes(self.model)
        hw, gpn, total, nbytes = self.hw, self.hw.gpus_per_node, 0.0, 0.0
        first = co.lanes[0].ranks[0]
        for kind, params in (("dp", dense), ("edp", expert)):
            if kind == "edp" and not self.model.moe:
                continue
            group = self._group_of(kind, first)
            if len(group) > 1 and params > 0:
                total += collective_time_ms(
                    "all_gather", params * bpe, group, gpn, hw, "hierarchical"
                )
                nbytes += params * bpe
        if total and self.net is not None:
            total = self._param_gather_flow(co, start, total)
        if total:
            self.rec.add_block(
                co.lane_ids,
                Kind.COMM,
                Op.PARAM_GATHER,
                start,
                start + total,
                -1,
                -1,
                nbytes,
            )
        return total

    def _dispatch_gather(self, co: Cohort, chunk: int, at: np.ndarray) -> None:
        """Dispatch the overlapped parameter all-gathers of ``chunk`` of the cohort's stage
        at ``at`` (per lane), once: its buckets (param_gather.forward_buckets; Megatron-Core
        buckets only chunk 0 of stage 0) run back to back on the stage's gather stream, each
        a gather of its dense weights over DP then of its expert weights over EDP; every
        layer's first forward waits for its bucket (:meth:`_forward`). The stage's embedding
        and output-layer weights join its first bucket."""
        clock, sent = self._gather_chain[co.stage]
        chunks = 2 if self._dualpipe else self.par.virtual_stages
        if chunk in sent or chunk >= chunks:
            return
        sent.add(chunk)
        layers = self._chunk_layers(co.stage, chunk)
        per_layer = [(i, *self._layer_grad_bytes(i)) for i in layers]
        bucketed = self._bucketed(co.stage, chunk)
        buckets = forward_buckets(per_layer, self.par.grad_bucket_mb * MIB, bucketed)
        grads = {i: (d, e) for i, d, e in per_layer}
        if chunk == 0:  # the stage's embedding / output layer: the first bucket
            dense, _ = stage_params_per_gpu(self.plan, self.layout, self._counts, co.stage)
            extra = self._non_layer_grads(co.stage, dense)
        else:
            extra = 0.0
        per_param = precision.param_gather_bytes(self.model) / self._grad_bytes
        ready = self._gather_ready.setdefault(co.stage, {})
        start = np.maximum(clock, at)
        for bucket in buckets:
            dense = (sum(grads[i][0] for i in bucket) + extra) * per_param
            expert = sum(grads[i][1] for i in bucket) * per_param
            extra = 0.0
            t = start
            for kind, nbytes in (("dp", dense), ("edp", expert)):
                if nbytes > 0 and (kind == "dp" or self.model.moe):
                    t = self._gather_over(co, kind, nbytes, t)
            gather = GatherBucket(start, t, dense + expert)
            for i in bucket:
                ready[i] = gather
            start = t
        clock[:] = start

    def _wait_gather(
        self, co: Cohort, bucket: GatherBucket, t: np.ndarray, layer: int, mb: int
    ) -> np.ndarray:
        """``layer``'s forward of ``mb`` reaching its bucket's gather at ``t``: the first
        time, record the gather (hidden part asynchronous, the part the lanes wait for
        blocking, bytes split by time; rows of that layer and micro-batch); returns when the
        lanes may go on."""
        if not bucket.recorded:
            bucket.recorded = True
            split = split_at(bucket, t)
            span = bucket.end_ms - bucket.start_ms
            hidden = np.divide(split - bucket.start_ms, span, out=np.ones_like(span),
                               where=span > 0)  # fmt: skip
            wait_from = np.maximum(t, bucket.start_ms)
            wait_to = np.maximum(wait_from, bucket.end_ms)
            rows = ((Kind.COMM_ASYNC, bucket.start_ms, split, hidden),
                    (Kind.COMM, wait_from, wait_to, 1.0 - hidden))  # fmt: skip
            for kind, begin, end, share in rows:
                lanes = end > begin  # no 0-long rows (ties with the layer's first op)
                if lanes.any():
                    self.rec.add_block(
                        co.lane_ids[lanes], kind, Op.PARAM_GATHER, begin[lanes], end[lanes],
                        layer, mb, (bucket.nbytes * share)[lanes],
                    )  # fmt: skip
        return np.maximum(t, bucket.end_ms)

    def _gather_over(self, co: Cohort, kind: str, nbytes: float, start: np.ndarray) -> np.ndarray:
        """One bucket's parameter all-gather (``nbytes`` per GPU after it) over each of the
        cohort's ``kind`` (dp / edp) groups, from its last member's ``start``; returns the
        lanes' end times (unchanged for lanes in no group of more than one GPU)."""
        groups = self._lane_groups(co, kind)
        tag = ("param_gather", kind)
        return self._groups_collective(co, groups, "all_gather", nbytes, start, tag, "param_gather")

    def _param_gather_flow(self, co: Cohort, start: np.ndarray, total: float) -> float:
        """The parameter all-gather as one flow per DP group of the cohort (its DP and EDP
        all-gathers back to back): returns the duration with its delay."""
        key = ("param_gather", co.stage)
        begin = float(np.max(start))
        if self.net.delays is not None:
            return float(self.net.flows(key, "param_gather", begin, [total], 0.0, [], 1)[0])
        dense, expert = stage_params_per_gpu(self.plan, self.layout, self._counts, co.stage)
        bpe = precision.param_gather_bytes(self.model)
        routes, latency = [], 0.0
        first = co.lanes[0].ranks[0]
        for kind, params in (("dp", dense), ("edp", expert)):
            group = self.layout.group_of(kind, first) if kind == "dp" or self.model.moe else []
            if len(group) > 1 and params > 0:
                (route, fixed) = self.net._collective_route("all_gather", params * bpe, group)
                routes.append(route)
                latency += fixed
        merged: dict[int, float] = {}
        for ln, vol in routes:
            for a, b in zip(ln.tolist(), vol.tolist(), strict=True):
                merged[a] = merged.get(a, 0.0) + b
        route = (np.array(list(merged), dtype=np.int64), np.array(list(merged.values())))
        lanes = len(co.lanes)
        return float(
            self.net.flows(key, "param_gather", begin, [total], latency, [route], lanes)[0]
        )

    def _optimizer(self, co: Cohort, start_ms: float):
        dense, expert = stage_params_per_gpu(self.plan, self.layout, self._counts, co.stage)
        dense_n, expert_n = shard_sizes(self.plan, self.layout)
        start = np.full(len(co.lanes), start_ms)
        end = start + optimizer_ms(self.plan, dense / dense_n + expert / expert_n)
        self.rec.add_block(co.lane_ids, Kind.COMPUTE, Op.OPTIMIZER, start, end)
        yield self._reach(float(end[0]))
        if self._gathers_after_step and not self.par.overlap_communication:
            yield self._reach(float(end[0]) + self._param_gather(co, end))

    @property
    def _gathers_after_step(self) -> bool:
        """ZeRO-1/2 all-gather the updated parameters after the step (ZeRO-3 gathers them
        layer by layer when they are used)."""
        return self.par.sharding in ("optimizer", "gradients")

    # ---- ZeRO-2/3: per-layer gathers and reduce-scatters -------------------------------------
    def _unit(self, stage: int, layer: int) -> LayerUnit:
        """The parameters one GPU gathers / reduces for ``layer`` (costs/sharding.py)."""
        found = self._units.get(layer)
        if found is None:
            layers = [i for i in self.layout.stage_layers[stage] if i < self.model.num_layers]
            params = stage_params_per_gpu(self.plan, self.layout, self._counts, stage)
            for unit in layer_units(self.plan, self.layout, self._counts, layers, params):
                self._units[unit.layer] = unit
            found = self._units[layer]
        return found

    def _streams(self, co: Cohort) -> tuple[np.ndarray, np.ndarray]:
        """Each lane's all-gather and reduce-scatter stream clocks (created at 0): one clock,
        returned twice. PyTorch FSDP issues a layer's all-gathers and reduce-scatters on one
        NCCL process group, whose collectives run one at a time in issue order (Zhao et al.
        2023, "PyTorch FSDP", VLDB, §3.3.2: the next layer's all-gather is issued before the
        current reduce-scatter, *backward prefetching*, because otherwise it would wait
        behind it); the two also share the lane's links (the link-sharing rule above)."""
        found = self._shard_streams.get(co.stage)
        if found is None:
            clock = np.zeros(len(co.lanes))
            found = self._shard_streams[co.stage] = (clock, clock)
        return found

    def _shard_groups(self, co: Cohort, kind: str) -> list[tuple[list[int], list[int]]]:
        """Per lane: its shard group of ``kind`` (dp or edp) and the group of the replicas
        of its shard (HSDP; one member without replication)."""
        found = self._groups_of_lanes.get((co.stage, "shard_" + kind))
        if found is not None:
            return found
        dense_n, expert_n = shard_sizes(self.plan, self.layout)
        size = dense_n // self.par.cp if kind == "dp" else expert_n
        out = []
        for ln in co.lanes:
            group = self.layout.group_of(kind, ln.ranks[0]) if (
                kind == "dp" or self.model.moe) else [ln.ranks[0]]  # fmt: skip
            pos = group.index(ln.ranks[0])
            size = min(size, len(group)) or 1
            block = pos // size
            out.append((group[block * size : (block + 1) * size], group[pos % size :: size]))
        self._groups_of_lanes[(co.stage, "shard_" + kind)] = out
        return out

    def _sharded_ms(self, kind: str, params: float, nbytes: float, groups) -> np.ndarray:
        """Per lane: the time of one collective over the shard group (``all_gather`` of the
        parameters or ``reduce_scatter`` of the gradients, then for the latter the all-reduce
        of the shard across replicas)."""
        out = np.zeros(len(groups))
        if params <= 0:
            return out
        gpn, hw = self.hw.gpus_per_node, self.hw
        for i, (shard, replicas) in enumerate(groups):
            key = (kind, nbytes, tuple(shard), tuple(replicas))
            ms = self._collective_ms.get(key)
            if ms is None:
                ms = 0.0
                if len(shard) > 1:
                    ms += collective_time_ms(kind, nbytes, shard, gpn, hw, "hierarchical")
                if kind == "reduce_scatter" and len(replicas) > 1:
                    part = nbytes / len(shard)
                    ms += collective_time_ms("all_reduce", part, replicas, gpn, hw, "hierarchical")
                self._collective_ms[key] = ms
            out[i] = ms
        return out

    def _unit_ms(
        self, co: Cohort, unit: LayerUnit, kind: str, per_param: float, start: np.ndarray
    ) -> np.ndarray:
        """Per lane: one unit's collective, dense part over DP and expert part over EDP, from
        the lanes' ``start``; with ``hardware.topology`` lengthened by its delay on the
        shared links (:meth:`_unit_flows`)."""
        dense = self._shard_groups(co, "dp")
        total = self._sharded_ms(kind, unit.dense_params, unit.dense_params * per_param, dense)
        parts = [(dense, unit.dense_params)]
        if unit.expert_params > 0:
            expert = self._shard_groups(co, "edp")
            nbytes = unit.expert_params * per_param
            total = total + self._sharded_ms(kind, unit.expert_params, nbytes, expert)
            parts.append((expert, unit.expert_params))
        if self.net is None:
            return total
        return total + self._unit_flows(co, kind, [(g, p * per_param) for g, p in parts], start)

    def _unit_flows(self, co: Cohort, kind: str, parts, start: np.ndarray) -> np.ndarray:
        """ZeRO-2/3 on the shared links: the steps of one unit's collective (per part, dense
        then expert: the ``kind`` collective over each shard group, then for a reduce-scatter
        the all-reduce of its shard over the replicas) as flows, one per group, each starting
        when the group's last lane has finished the steps before it (alone); returns each
        lane's delay, the sum of its steps' delays. ``parts``: (per-lane (shard, replicas)
        groups, bytes) of each part."""
        gpn, hw, lanes = self.hw.gpus_per_node, self.hw, len(co.lanes)
        flow_kind = "param_gather" if kind == "all_gather" else "dp_grad"
        delay, offset = np.zeros(lanes), np.zeros(lanes)
        for part, (groups, nbytes) in enumerate(parts):
            steps = [(kind, nbytes, [shard for shard, _ in groups])]
            if kind == "reduce_scatter":
                steps.append(
                    ("all_reduce", [nbytes / len(shard) for shard, _ in groups],
                     [replicas for _, replicas in groups])
                )  # fmt: skip
            for step, (op, size, members) in enumerate(steps):
                sizes = np.broadcast_to(np.asarray(size, dtype=np.float64), (lanes,))
                by_group: dict[tuple, list[int]] = {}
                for pos, group in enumerate(members):
                    if len(group) > 1:
                        by_group.setdefault((tuple(group), float(sizes[pos])), []).append(pos)
                for (group, nb), positions in by_group.items():
                    alone = self._collective_ms.get((op, nb, group))
                    if alone is None:
                        alone = self._collective_ms[(op, nb, group)] = collective_time_ms(
                            op, nb, list(group), gpn, hw, "hierarchical"
                        )
                    begin = float(np.max(start[positions] + offset[positions]))
                    key = self.net.next_key("shard", co.stage, kind, part, step, group[0])
                    took = self.net.collective(
                        key, flow_kind, op, nb, list(group), begin, alone, len(positions)
                    )
                    delay[positions] += took - alone
                    offset[positions] += alone
        return delay

    def _gather_ahead(self, co: Cohort, layers: list[int], mb: int, t: np.ndarray, prefetch: bool):
        """ZeRO-3: all-gather the chunk's layers in order on the lanes' sharding stream (the
        first from ``t``). With ``prefetch`` one layer ahead of the compute: each next one
        when the layer before it starts computing; without, each when the layer before it has
        finished (issued after its kernels in one hardware queue). Returns ``ready(layer,
        t)``: when the layer can start (None without ZeRO-3); with one hardware queue not
        before the prefetch issued ahead of its compute has started."""
        if not self._layer_ag or not layers:
            return None
        ag_free, _ = self._streams(co)
        per_param = precision.param_gather_bytes(self.model)
        ends: dict[int, np.ndarray] = {}

        def issue(layer: int, at: np.ndarray) -> np.ndarray:
            unit = self._unit(co.stage, layer)
            start = np.maximum(at, ag_free)
            end = start + self._unit_ms(co, unit, "all_gather", per_param, start)
            nbytes = unit.params * per_param
            self.rec.add_block(
                co.lane_ids, Kind.COMM_ASYNC, Op.PARAM_GATHER, start, end, layer, mb, nbytes
            )
            ag_free[:] = end
            ends[layer] = end
            return start

        issue(layers[0], t)
        following = dict(zip(layers[:-1], layers[1:], strict=True))

        def ready(layer: int, now: np.ndarray) -> np.ndarray:
            if layer not in ends:  # not prefetched: issued when the layer before it is done
                issue(layer, now)
            start = np.maximum(now, ends.pop(layer))
            if prefetch and layer in following:
                began = issue(following[layer], start)  # prefetch the next layer
                if self._one_queue:  # the layer's kernels wait behind it in the queue
                    start = np.maximum(start, began)
            return start

        return ready

    def _reduce_scatter_layer(self, co: Cohort, layer: int, mb: int, t: np.ndarray) -> np.ndarray:
        """ZeRO-2/3: reduce-scatter the layer's gradients (FP32 main gradients, FP16 under FP16)
        once its backward is done, on the lanes' sharding stream, after the gathers issued
        before it (overlapping the next layers' backward). Returns when the compute issued
        after it can start: ``t``, or with one hardware queue not before it has started."""
        _, rs_free = self._streams(co)
        unit = self._unit(co.stage, layer)
        start = np.maximum(t, rs_free)
        end = start + self._unit_ms(co, unit, "reduce_scatter", self._grad_bytes, start)
        nbytes = unit.params * self._grad_bytes
        self.rec.add_block(
            co.lane_ids, Kind.COMM_ASYNC, Op.GRAD_REDUCE, start, end, layer, mb, nbytes
        )
        rs_free[:] = end
        return np.maximum(t, start) if self._one_queue else t


def _fixed(_payloads, duration_ms: float) -> tuple[float, None]:
    """Rendezvous timing of a collective whose duration is known in advance."""
    return duration_ms, None


def check_supported(plan: Plan, layout: Layout) -> None:
    """Raise :class:`EngineError` when the engine cannot simulate ``plan``."""
    par = plan.parallel
    check_common(plan, layout, "training")
    if par.tp % par.expert_tp:
        raise EngineError(f"ETP {par.expert_tp} must divide TP {par.tp} for the simulation")
    if par.cp > 1 and not par.flash_attention:
        raise EngineError(
            "context parallelism (parallel.cp > 1) runs ring attention on fused attention "
            "kernels; set parallel.flash_attention: true"
        )
    seq = plan.workload.seq_len
    if par.cp > 1 and seq is not None and seq.dist == "fixed" and seq.value % (2 * par.cp):
        raise EngineError(
            f"workload.seq_len {seq.value} must be a multiple of 2 x cp = {2 * par.cp} "
            "(each CP rank takes two of the 2 cp chunks of every sequence)"
        )
    if par.virtual_stages > 1 and par.schedule != "interleaved":
        raise EngineError("virtual_stages > 1 needs schedule: interleaved")
    if par.schedule == "dualpipe":
        if not dualpipe_valid(par.pp, par.num_microbatches):
            raise EngineError(
                f"parallel.schedule: {DUALPIPE_RULE} (its reference implementation's rule); "
                f"got pp {par.pp}, num_microbatches {par.num_microbatches}"
            )
        if par.sharding in ("gradients", "full"):
            raise EngineError(
                f"parallel.schedule: dualpipe is simulated with dp_sharding none or optimizer "
                f"(ZeRO-1), not {par.sharding}"
            )
    explicit = par.layers_per_stage is not None and len(par.layers_per_stage) > par.pp
    if (
        par.virtual_stages > 1
        and not explicit
        and any(n % par.virtual_stages for n in layout.layers_per_stage)
    ):
        raise EngineError("layers per stage must divide evenly into virtual stages")

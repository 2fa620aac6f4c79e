"""Time of an MoE layer's routed experts in one serving step, from sampled routing.

A step sends ``N`` tokens (all the tokens of the replicas that share the EP group, in that
micro-batch) through every MoE layer: dispatch all-to-all over the EP group, ETP all-gather,
the expert GEMMs of the busiest EP rank (the slowest rank gates the combine), ETP
reduce-scatter, combine all-to-all. The busiest rank's expert time depends on how many tokens
it received *and on how many distinct experts they hit*: decode is bound by reading the
weights of the activated experts only, so the small batches of decode read few of them.

Routing a step's tokens at every step and layer would cost far more than the step itself, so
the routing is sampled once, when the table is built: for a grid of token counts (every count
up to 64, then about 12% apart) several draws of :class:`clustersim.routing.Router` (the
plan's skew, capacity and node limit, the layers' own popularities, the plan's seed) give the
busiest rank's expert time, the all-to-all times (from the sampled send matrix, on the real
topology) and the load balance and drops; the engine takes their mean at a step's ``N``
(linear interpolation between grid points). Steps are deterministic in their token count, so
the same plan and seed give the same results, and runs of identical decode steps keep
identical MoE times. The sources of the ``N`` tokens are the EP group's ranks, evenly; with
expert tensor parallelism each of the ``etp`` EP groups routes ``N / etp`` of them (every token
once, by one TP rank) and each ETP group computes what all its members received.
"""

from __future__ import annotations

import time

import numpy as np

from clustersim.costs.comm import all_to_all_v_cost, collective_time_ms
from clustersim.costs.compute import DTYPE_BYTES
from clustersim.costs.kernels import DEFAULT_GRAPH_BATCH_MAX
from clustersim.costs.serving import graph_replay_hardware
from clustersim.engine.training.optimes import ExpertTimer
from clustersim.layout import Layout
from clustersim.routing.router import Router, RoutingOutcome, uniform_outcome
from clustersim.spec.schema import HardwareSpec, Plan

EXACT_UP_TO = 64  # every token count up to this is a grid point
GRID_RATIO = 1.125  # then points about 12% apart
SAMPLES = 8  # routing draws per grid point (fewer for large counts, see _samples)


class MoEStepTable:
    """MoE layer times and routing statistics per token count ``N`` of a step (module doc)."""

    def __init__(self, plan: Plan, layout: Layout):
        moe = plan.model.moe
        if moe is None:
            raise ValueError("MoEStepTable needs an MoE model")
        self.plan, self.moe = plan, moe
        self.hw = plan.hardware
        self.ep = layout.ep
        self.etp = layout.etp
        self.ep_ranks = layout.groups("ep")[0]
        self.etp_ranks = layout.groups("etp")[0]
        self.moe_layer_ids = [i for i in range(plan.model.num_layers) if plan.model.is_moe_layer(i)]
        # Serving MoE kernels (fused/grouped MoE of vLLM/SGLang) need no host sync; small
        # steps are taken to be decode steps, replayed from CUDA graphs when enabled.
        graphs = plan.workload.requests.cuda_graphs
        self.timers = (ExpertTimer(plan, sync=False), ExpertTimer(plan, graphs=graphs, sync=False))
        self.comm_hw = (self.hw, graph_replay_hardware(self.hw) if graphs else self.hw)
        self.token_bytes = plan.model.hidden_size * DTYPE_BYTES[plan.model.dtype]
        self.router = None
        if moe.routing == "sampled":
            self.router = Router(
                moe, self.ep, plan.seed, _ep_ranks_per_node(self.ep_ranks, self.hw.gpus_per_node)
            )
        self._grid: list[int] = []
        self._rows: dict[int, tuple[float, float, float, float]] = {}
        self._cache: dict[int, tuple[float, float, float, float]] = {}
        self.build_s = 0.0

    def lookup(self, tokens: int) -> tuple[float, float, float, float]:
        """``(layer_ms, comm_ms, load_balance_pct, dropped_pct)`` of one MoE layer for
        ``tokens`` tokens (0 tokens cost nothing)."""
        found = self._cache.get(tokens)
        if found is not None:
            return found
        if tokens <= 0:
            found = (0.0, 0.0, 100.0, 0.0)
        elif tokens <= EXACT_UP_TO:
            found = self._row(tokens)
        else:
            lo, hi = _bracket(tokens)
            a, b = self._row(lo), self._row(hi)
            w = (tokens - lo) / (hi - lo)
            found = tuple((1 - w) * x + w * y for x, y in zip(a, b, strict=True))
        self._cache[tokens] = found
        return found

    def _row(self, tokens: int) -> tuple[float, float, float, float]:
        row = self._rows.get(tokens)
        if row is None:
            started = time.perf_counter()
            row = self._rows[tokens] = self._measure(tokens)
            self.build_s += time.perf_counter() - started
        return row

    def _measure(self, tokens: int) -> tuple[float, float, float, float]:
        """Mean over routing draws of one grid point. Each of the ``etp`` EP groups routes the
        tokens of its own TP rank (1/etp of them, as in training); an ETP group then gathers
        what its members' EP groups routed to its experts (``_one``)."""
        decode = tokens <= DEFAULT_GRAPH_BATCH_MAX
        timer, hw = self.timers[decode], self.comm_hw[decode]
        tokens = -(-tokens // self.etp)
        sources = np.full(self.ep, tokens // self.ep, dtype=np.int64)
        sources[: tokens % self.ep] += 1
        draws = _samples(tokens) if self.router is not None else 1
        rows = [self._one(self._route(sources, tokens, d), timer, hw) for d in range(draws)]
        return tuple(float(x) for x in np.mean(rows, axis=0))

    def _route(self, sources: np.ndarray, tokens: int, draw: int) -> RoutingOutcome:
        if self.router is None:
            return uniform_outcome(self.moe.num_experts, self.ep, self.moe.top_k, sources)
        layer = self.moe_layer_ids[draw % len(self.moe_layer_ids)]
        return self.router.route(layer, tokens, sources, step=draw)

    def _one(
        self, out: RoutingOutcome, timer: ExpertTimer, hw: HardwareSpec
    ) -> tuple[float, float, float, float]:
        per_rank = out.tokens_per_expert.reshape(self.ep, -1)
        active = np.count_nonzero(per_rank, axis=1)
        received = out.tokens_per_rank.astype(np.float64) * self.etp  # ETP gathers its group
        expert_ms = float(timer.forward_ms(received, active).max())
        gpn = hw.gpus_per_node
        a2a_ms = all_to_all_v_cost(
            out.a2a_tokens * self.token_bytes,
            self.ep_ranks,
            gpn,
            hw,
            self.plan.parallel.moe_dispatcher,
        ).time_ms
        etp_ms = 0.0
        if self.etp > 1:
            size = float(received.max()) * self.token_bytes
            etp_ms = collective_time_ms("all_gather", size, self.etp_ranks, gpn, hw)
        comm_ms = 2 * a2a_ms + 2 * etp_ms
        top = out.tokens_per_expert.max()
        balance = 100 * float(out.tokens_per_expert.mean() / top) if top > 0 else 100.0
        dropped = 100 * out.dropped_tokens / out.routed_tokens if out.routed_tokens else 0.0
        return expert_ms + comm_ms, comm_ms, balance, dropped


def _samples(tokens: int) -> int:
    """Routing draws for a grid point: fewer where one draw already averages many tokens."""
    return max(2, min(SAMPLES, 65536 // tokens))


def _bracket(tokens: int) -> tuple[int, int]:
    """The grid points around ``tokens`` > EXACT_UP_TO (a fixed geometric grid)."""
    k = np.log(tokens / EXACT_UP_TO) / np.log(GRID_RATIO)
    lo = int(round(EXACT_UP_TO * GRID_RATIO ** np.floor(k)))
    hi = int(round(EXACT_UP_TO * GRID_RATIO ** (np.floor(k) + 1)))
    lo = min(lo, tokens)
    hi = max(hi, lo + 1)
    return lo, hi


def _ep_ranks_per_node(group: list[int], gpus_per_node: int) -> int | None:
    """EP ranks per node when the group is node-contiguous blocks (node-limited routing)."""
    first = group[0] // gpus_per_node
    per_node = sum(1 for r in group if r // gpus_per_node == first)
    contiguous = all(group.index(r) // per_node == r // gpus_per_node - first for r in group)
    return per_node if contiguous and len(group) % per_node == 0 else None

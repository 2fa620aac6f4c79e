"""Capacity of a serving deployment: the highest request rate at which its SLOs hold.

The rate varied is ``workload.requests.rate_per_s`` (for ``arrival: trace``, the trace is
scaled in time to that mean rate; its own mean rate, (rows - 1) / span, is the start). The
arrival pattern and the lengths stay the same at every rate (:mod:`clustersim.engine.serving.
requests`: raising the rate compresses the same arrivals in time), so each probe is a
deterministic function of the rate.

**The SLOs hold at a rate** when at least ``attain`` of the requests are *good* (they meet
every per-request limit of ``targets``: ``ttft_ms_p99_max``, ``tpot_ms_p99_max``,
``ttft_ms_max``, ``tpot_ms_max``, ``latency_ms_max``; :func:`clustersim.metrics.serving.
good_requests`) and the verdict that ``check`` and ``run`` print (:func:`clustersim.audit.
judge.judge`) finds no error on those targets nor on the median ones (``ttft_ms_p50_max``,
``tpot_ms_p50_max``); with ``attain`` below 0.99 the p99 targets are left to the attainment.
So at the default ``attain`` of 0.99, ``check`` of the plan at its capacity passes its SLO
targets. A plan without a per-request limit has no capacity to find.

**Search** (deterministic, :func:`find_capacity`) over the geometric grid of rates
``start x 2^(k / GRID_PER_DOUBLING)`` (steps of 1.9%; ``start`` the plan's rate): probe the
start; double until the SLOs fail (or halve until they hold, at most ``MAX_HALVINGS`` times:
when even the lowest rate fails there is no capacity); then bisect on the grid until the
highest rate that held and the lowest that failed are neighbours; then probe 1.1 x the
result, and if the SLOs hold there too (the latency-vs-rate curve is not always monotone on a
finite sample) search upwards again from the grid point above it. So at the reported capacity
the SLOs hold and at 1.1 x it they do not, both simulated; and because the grid depends only
on the start rate, a deployment whose SLOs hold at every rate where another's do (one more
replica, a relaxed SLO) gets at least its capacity.

**Sustained load**: a rate holds only when the requests' arrivals span at least
``STEADY_SPAN`` (2) x their p99 end-to-end latency; faster, a finite request stream is a burst
that a large deployment may absorb within its SLOs at any rate, which says nothing about the
rate it sustains. When that rule, not an SLO, is what fails above the capacity,
``limited_by_requests`` says so: more requests (``workload.requests.num``) measure further.

**Early stopping**: a probe stops as soon as more requests missed their per-request limits
than ``attain`` allows (:class:`clustersim.engine.serving.sim.LatencyLimits`): the verdict is
then already decided, and an overloaded run, whose queue only grows, costs a fraction of a
full one. Its latencies are not known (null in the curve).

**Compiled engine**: the probes run in one process, so when together they reach
``COMPILED_RUNS_MIN_REQUESTS`` requests (about ``PROBES_EXPECTED`` probes of
``workload.requests.num``), the search has the engine use its compiled loop where it applies
(:mod:`clustersim.engine.serving.solo_kernel`; numba's one-time load then pays off); the
results are the same numbers either way.

**Limiting SLO**: at the capacity, the SLO closest to its limit: the largest ratio of the
``attain``-quantile of the per-request metric (TTFT, TPOT, end-to-end) to its limit, or of
the median to a p50 limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clustersim.audit.checks import audit
from clustersim.engine.serving.requests import Requests, make_requests
from clustersim.engine.serving.sim import COMPILED_RUNS_MIN_REQUESTS, LatencyLimits, Overloaded
from clustersim.run.serving import moe_tables, simulate_serving, step_timer
from clustersim.spec.schema import MAX_RATE, Plan

GRID_PER_DOUBLING = 36  # grid points per doubling of the rate: 2^(1/36) = 1.0194
CHECK_FACTOR = 1.1  # the rate above the capacity that must fail
MAX_HALVINGS = 12  # the lowest rate probed: start / 4096
MAX_DOUBLINGS = 40
MAX_ROUNDS = 4  # upward restarts when 1.1 x the capacity still holds
STEADY_SPAN = 2.0  # a sustained load: arrivals span at least this x the p99 latency
PROBES_EXPECTED = 10  # a search's probes, typically (9-10 in BENCHMARKS.md)
# per-request limits: target field -> per-request metric
PER_REQUEST = {
    "ttft_ms_p99_max": "ttft",
    "ttft_ms_max": "ttft",
    "tpot_ms_p99_max": "tpot",
    "tpot_ms_max": "tpot",
    "latency_ms_max": "e2e",
}
MEDIAN = {"ttft_ms_p50_max": "ttft_ms_p50", "tpot_ms_p50_max": "tpot_ms_p50"}
P99 = 0.99


class NoSlo(ValueError):
    """The plan sets no per-request limit (nothing to find the capacity under)."""


@dataclass
class Probe:
    """One simulated rate: whether the SLOs held, and what was measured."""

    rate_req_per_s: float
    holds: bool
    stopped_early: bool
    metrics: dict[str, Any] | None = None  # None when stopped early
    ratios: dict[str, float] = field(default_factory=dict)  # SLO -> quantile / limit
    steady: bool = True  # the arrivals span STEADY_SPAN x the p99 latency (module docstring)

    def point(self) -> dict[str, Any]:
        """The curve's entry (contract: rate_req_per_s, ttft_ms_p99, tpot_ms_p99,
        goodput_pct; plus holds, stopped_early, goodput_req_per_s)."""
        m = self.metrics or {}
        return {
            "rate_req_per_s": self.rate_req_per_s,
            "ttft_ms_p99": m.get("ttft_ms_p99"),
            "tpot_ms_p99": m.get("tpot_ms_p99"),
            "goodput_pct": m.get("goodput_pct"),
            "goodput_req_per_s": m.get("goodput_req_per_s"),
            "holds": self.holds,
            "stopped_early": self.stopped_early,
            "steady": self.steady,
        }


@dataclass
class Capacity:
    """The result of :func:`find_capacity` (``capacity_req_per_s`` None: no rate held)."""

    plan: Plan
    attain: float
    gpus: int
    probes: list[Probe]
    best: Probe | None
    audit_errors: list[str] = field(default_factory=list)  # the static audit's error findings

    @property
    def capacity_req_per_s(self) -> float | None:
        """The highest rate found at which the SLOs hold."""
        return self.best.rate_req_per_s if self.best else None

    @property
    def limited_by_requests(self) -> bool:
        """Whether the rate above the capacity failed only for being a burst (too few
        requests to be a sustained load there): more requests may show a higher capacity."""
        above = [
            p for p in self.probes if self.best and p.rate_req_per_s > self.best.rate_req_per_s
        ]
        if not above:
            return False
        first = min(above, key=lambda p: p.rate_req_per_s)
        return not first.steady and not first.stopped_early

    @property
    def limiting_slo(self) -> str | None:
        """The SLO closest to its limit at the capacity (module docstring)."""
        if self.best is None or not self.best.ratios:
            return None
        return max(self.best.ratios.items(), key=lambda kv: kv[1])[0]

    def curve(self) -> list[dict[str, Any]]:
        """Every probe, by rate."""
        return [p.point() for p in sorted(self.probes, key=lambda p: p.rate_req_per_s)]

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``clustersim capacity`` (README: Serving)."""
        cap = self.capacity_req_per_s
        m = self.best.metrics if self.best else {}
        return {
            "plan": self.plan.name,
            "seed": self.plan.seed,
            "attain": self.attain,
            "gpus": self.gpus,
            "capacity_req_per_s": cap,
            "capacity_req_per_s_per_gpu": cap / self.gpus if cap is not None else None,
            "goodput_req_per_s": m.get("goodput_req_per_s"),
            "goodput_pct": m.get("goodput_pct"),
            "ttft_ms_p99": m.get("ttft_ms_p99"),
            "tpot_ms_p99": m.get("tpot_ms_p99"),
            "limiting_slo": self.limiting_slo,
            "limited_by_requests": self.limited_by_requests,
            "slo_ratios": self.best.ratios if self.best else None,
            "probes": len(self.probes),
            "audit_errors": self.audit_errors,
            "curve": self.curve(),
        }


def slo_limits(plan: Plan) -> dict[str, float]:
    """The per-request limits the plan sets: target field -> limit."""
    return {
        name: getattr(plan.targets, name)
        for name in PER_REQUEST
        if getattr(plan.targets, name) is not None
    }


def latency_limits(plan: Plan, attain: float, num_requests: int) -> LatencyLimits:
    """The engine's early-stopping limits: the tightest limit per metric, and the requests
    that may miss them with the SLOs still holding."""
    limits = slo_limits(plan)

    def tightest(metric: str) -> float:
        found = [v for k, v in limits.items() if PER_REQUEST[k] == metric]
        return min(found) if found else math.inf

    allowed = math.floor(num_requests * (1 - attain) + 1e-9)
    return LatencyLimits(tightest("ttft"), tightest("tpot"), tightest("e2e"), allowed)


class CapacitySearch:
    """Probes of one deployment at several rates (module docstring)."""

    def __init__(
        self,
        plan: Plan,
        attain: float = 0.99,
        progress: Callable[[float], None] | None = None,
    ):
        if not slo_limits(plan):
            raise NoSlo(
                "targets: the plan sets no per-request SLO (targets.ttft_ms_p99_max, "
                "tpot_ms_p99_max, ttft_ms_max, tpot_ms_max or latency_ms_max)"
            )
        self.plan, self.attain, self.progress = plan, attain, progress
        self.base = make_requests(plan)
        spec = plan.workload.requests
        if spec.arrival == "trace":
            span_s = float(self.base.arrival_ms[-1] - self.base.arrival_ms[0]) / 1e3
            n = self.base.num
            self.start_rate = (n - 1) / span_s if n > 1 and span_s > 0 else 1.0
        else:
            self.start_rate = spec.rate_per_s
        self.table = moe_tables(plan)
        # the step constants the probes meet, memoised once for all of them (colocated)
        self.timer = step_timer(plan, self.table)
        self.limits = latency_limits(plan, attain, self.base.num)
        # (module docstring) True: the compiled loop where it applies; None: the engine decides
        many = self.base.num * PROBES_EXPECTED >= COMPILED_RUNS_MIN_REQUESTS
        self.compiled_engine = True if many else None
        self.probes: dict[float, Probe] = {}

    def plan_at(self, rate: float) -> Plan:
        """The plan with ``workload.requests.rate_per_s`` = ``rate``."""
        spec = self.plan.workload.requests.model_copy(update={"rate_per_s": rate})
        workload = self.plan.workload.model_copy(update={"requests": spec})
        return self.plan.model_copy(update={"workload": workload})

    def requests_at(self, rate: float) -> Requests:
        """The same requests, their arrival times scaled to a mean rate of ``rate``."""
        scale = self.start_rate / rate
        base = self.base
        return Requests(base.arrival_ms * scale, base.prompt_tokens, base.output_tokens)

    def probe(self, rate: float) -> Probe:
        """Simulate ``rate`` (once: probes are memoised)."""
        found = self.probes.get(rate)
        if found is not None:
            return found
        plan = self.plan_at(rate)
        try:
            report = simulate_serving(
                plan,
                requests=self.requests_at(rate),
                table=self.table,
                limits=self.limits,
                compiled_engine=self.compiled_engine,
                timer=self.timer,
            )
        except Overloaded:
            found = Probe(rate, False, True)
        else:
            found = self._judged(rate, plan, report)
        self.probes[rate] = found
        if self.progress is not None:
            self.progress(min(1.0, len(self.probes) / 16))
        return found

    def _judged(self, rate: float, plan: Plan, report) -> Probe:
        m = report.metrics
        judged = {f"targets.{k}" for k in (*PER_REQUEST, *MEDIAN)}
        if self.attain < P99:  # a looser attainment than the p99 targets ask for
            judged -= {"targets.ttft_ms_p99_max", "targets.tpot_ms_p99_max"}
        targets_ok = not any(f.severity == "error" and f.node in judged for f in report.findings)
        good = m.get("goodput_pct")
        slos_ok = good is not None and good >= 100 * self.attain - 1e-9 and targets_ok
        span_ms = float(report.result.arrival_ms[-1] - report.result.arrival_ms[0])
        latency = m.get("latency_ms_p99")
        steady = latency is not None and span_ms >= STEADY_SPAN * latency
        return Probe(rate, slos_ok and steady, False, m, self._ratios(plan, report), steady)

    def _ratios(self, plan: Plan, report) -> dict[str, float]:
        """SLO -> (``attain``-quantile of its per-request metric, or the median) / limit."""
        cols = report.requests()
        done = ~cols["rejected"]
        arrival, first, finish = cols["arrival_ms"], cols["first_token_ms"], cols["finish_ms"]
        out_tokens = cols["output_tokens"]
        values = {
            "ttft": (first - arrival)[done],
            "tpot": np.where(out_tokens > 1, (finish - first) / np.maximum(out_tokens - 1, 1), 0.0)[
                done
            ],
            "e2e": (finish - arrival)[done],
        }
        n = cols["arrival_ms"].size
        out: dict[str, float] = {}
        for name, limit in slo_limits(plan).items():
            v = np.sort(values[PER_REQUEST[name]])
            # the attain-quantile over all requests; rejected ones count as infinite
            k = math.ceil(self.attain * n) - 1
            q = float(v[k]) if 0 <= k < v.size else math.inf
            out[name] = q / limit
        for name, metric in MEDIAN.items():
            limit, value = getattr(plan.targets, name), report.metrics.get(metric)
            if limit is not None and value is not None:
                out[name] = value / limit
        return out

    def rate(self, k: int) -> float:
        """Grid point ``k`` (module docstring)."""
        return min(self.start_rate * 2.0 ** (k / GRID_PER_DOUBLING), MAX_RATE)

    def holds(self, k: int) -> bool:
        """Whether the SLOs hold at grid point ``k``."""
        return self.probe(self.rate(k)).holds

    def run(self) -> Capacity:
        """The search (module docstring)."""
        lo, hi = self._bracket(0)
        rounds = 0
        while lo is not None:
            lo, hi = self._bisect(lo, hi)
            rounds += 1
            if not self.probe(self.rate(lo) * CHECK_FACTOR).holds or rounds >= MAX_ROUNDS:
                break
            above = lo + math.ceil(GRID_PER_DOUBLING * math.log2(CHECK_FACTOR))
            lo, hi = self._bracket(above)
        best = self.probes[self.rate(lo)] if lo is not None else None
        if self.progress is not None:
            self.progress(1.0)
        errors = [
            f"{f.node}: {f.message}" for f in audit(self.plan).findings if f.severity == "error"
        ]
        return Capacity(
            self.plan,
            self.attain,
            self.plan.parallel.world_size,
            list(self.probes.values()),
            best,
            errors,
        )

    def _bracket(self, start: int) -> tuple[int | None, int]:
        """(highest grid point that held, a grid point above it that failed); (None, lowest
        probed) when nothing held."""
        g = GRID_PER_DOUBLING
        k = start
        if self.holds(k):
            for _ in range(MAX_DOUBLINGS):
                if self.rate(k + g) == self.rate(k) or not self.holds(k + g):
                    return k, k + g
                k += g
            return k, k + 1
        for _ in range(MAX_HALVINGS):
            if self.holds(k - g):
                return k - g, k
            k -= g
        return None, k

    def _bisect(self, lo: int, hi: int) -> tuple[int, int]:
        while hi > lo + 1:
            mid = (lo + hi) // 2
            if self.holds(mid):
                lo = mid
            else:
                hi = mid
        return lo, hi


def find_capacity(
    plan: Plan, attain: float = 0.99, progress: Callable[[float], None] | None = None
) -> Capacity:
    """The capacity of serving ``plan`` under its SLOs (module docstring). Raises
    :class:`NoSlo` for a plan without per-request limits, EngineError when the plan cannot be
    simulated, ValueError for an unreadable request trace."""
    return CapacitySearch(plan, attain, progress).run()

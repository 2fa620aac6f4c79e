"""How much simulation a plan asks for, estimated before simulating it.

A plan can ask for far more simulation than anyone means to wait for (``num_microbatches:
100000``, ``requests.num: 1e7``, a million-GPU cluster): the CLI refuses such a run with the
estimate and the option that forces it (``--max-events``) instead of running for hours. The
estimate is a count of work units, proportional to the simulator's events:

- training: GPUs x layers x micro-batches (the default plan, 16 x 32 x 8 = 4096 units, is
  11.5 k events; about 2.8 events per unit, 180 k events/s on one core);
- serving: requests x mean output tokens (each decoded token is one step of one request).

``DEFAULT_MAX_EVENTS`` is what one core simulates in about a minute.
"""

from __future__ import annotations

from dataclasses import dataclass

from clustersim.spec.schema import LengthSpec, Plan

DEFAULT_MAX_EVENTS = 2_000_000
"""Largest estimate run without ``--max-events`` (about a minute on one core: the default
training plan with 3900 micro-batches)."""


@dataclass(frozen=True)
class WorkEstimate:
    """The estimate and what it is made of (for the message)."""

    events: int
    formula: str

    def too_large(self, limit: int | None) -> bool:
        """Whether the estimate exceeds ``limit`` (None: ``DEFAULT_MAX_EVENTS``)."""
        return self.events > (DEFAULT_MAX_EVENTS if limit is None else limit)

    def refusal(self, limit: int | None) -> str:
        """The message that refuses the run."""
        cap = DEFAULT_MAX_EVENTS if limit is None else limit
        return (
            f"this plan asks for about {self.events:,} simulated events ({self.formula}), more "
            f"than the limit of {cap:,} (about a minute per 2,000,000); rerun with "
            f"--max-events {self.events} to simulate it anyway, or make it smaller"
        )


def _mean_length(spec: LengthSpec) -> float | None:
    if spec.dist == "fixed":
        return float(spec.value or 0)
    if spec.dist == "uniform":
        return (float(spec.min or 0) + float(spec.max or 0)) / 2
    if spec.dist == "lognormal":
        return float(spec.mean or 0)
    return float(spec.max) if spec.max is not None else None  # empirical: only a file knows


def estimate_work(plan: Plan) -> WorkEstimate:
    """The work estimate of simulating ``plan`` (see the module docstring)."""
    if plan.workload.mode == "inference":
        req = plan.workload.requests
        mean = _mean_length(req.output_len)
        if mean is None:
            mean = 1.0  # lengths from a file: bounded by the file's own size limit
        events = int(req.num * max(mean, 1.0))
        return WorkEstimate(events, f"{req.num:,} requests x {mean:,.0f} mean output tokens")
    gpus = plan.parallel.world_size
    layers, micro = plan.model.num_layers, plan.parallel.num_microbatches
    return WorkEstimate(
        gpus * layers * micro, f"{gpus:,} GPUs x {layers:,} layers x {micro:,} micro-batches"
    )


__all__ = ["DEFAULT_MAX_EVENTS", "WorkEstimate", "estimate_work"]

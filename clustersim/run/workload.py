"""How much simulation a plan asks for, estimated before simulating it.

A plan can ask for far more simulation than anyone means to wait for (``num_microbatches:
100000``, ``requests.num: 1e7``, a million-GPU cluster): the CLI refuses such a run with the
estimate and the option that forces it (``--max-events``) instead of running for hours. The
estimate counts the simulator's events, or work units proportional to them:

- training: GPUs x layers x micro-batches (the default plan, 16 x 32 x 8 = 4096 units, is
  11.5 k events; about 2.8 events per unit, 180 k events/s on one core);
- serving: an upper bound on the serving engine's events (``ServingResult.events``, the same
  in the Python engine and its compiled loop), which grow with requests, not with generated
  tokens: a run of decode steps is one event (engine/serving/sim.py). Per request, colocated:
  its arrival, the step that finishes its prefill, the decode run its completion ends, and
  the run its arrival cuts (two events: the cut timer and the new one), so at most
  ``SERVING_EVENTS_PER_REQUEST`` = 5; disaggregated, twice that (its KV transfer's hand-off
  and port timers, and admission in the decode pool on top). Chunked prefill adds a step per
  full token budget of prompt, at most one per ``max_num_batched_tokens - max_batch_size``
  prompt tokens (the budget less one decode per running request); a decode run also ends
  after ``MAX_STEPS`` steps. Preemptions are not known before the run: each adds about two events
  (the run the full KV cache ends, the recompute's prefill), more when its recompute is
  chunked.

``DEFAULT_MAX_EVENTS`` is what one core simulates in about a minute (training; the Python
serving engine of a dense replica runs 25-50 k events/s, its compiled loop far more, a
lockstep MoE engine fewer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from clustersim.spec.schema import LengthSpec, Plan

SERVING_EVENTS_PER_REQUEST = 5
"""Serving events per request of a colocated deployment, at most (module docstring)."""

DISAGGREGATED_EVENTS_PER_REQUEST = 10
"""Serving events per request of a disaggregated deployment, at most."""

MAX_RUN_STEPS = 1 << 14
"""Decode steps of one run, at most (the engine's ``MAX_STEPS``, not imported: this module
must stay light)."""

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


def _chunk_tokens(plan: Plan) -> int:
    """Prompt tokens one chunked-prefill step carries at least unless it ends a prefill (its
    token budget less one decode per running request), the smallest over the pools."""
    req = plan.workload.requests
    limits = [(req.max_num_batched_tokens, req.max_batch_size)]
    for pool in (req.prefill, req.decode):
        if pool is not None:
            limits.append(
                (
                    pool.max_num_batched_tokens or req.max_num_batched_tokens,
                    pool.max_batch_size or req.max_batch_size,
                )
            )
    return max(1, min(tokens - seqs for tokens, seqs in limits))


def _serving_estimate(plan: Plan) -> WorkEstimate:
    """Serving: requests x events per request, chunked-prefill steps and run cuts."""
    req = plan.workload.requests
    disaggregated = plan.parallel.disaggregated
    per_request = DISAGGREGATED_EVENTS_PER_REQUEST if disaggregated else SERVING_EVENTS_PER_REQUEST
    events = req.num * per_request
    parts = [f"{req.num:,} requests x {per_request} events"]
    if req.chunked_prefill:
        prompt = _mean_length(req.prompt_len)
        chunk = _chunk_tokens(plan)
        if prompt is None:  # lengths from a file: taken as one full chunk each
            prompt = float(chunk)
        chunks = math.ceil(req.num * prompt / chunk)
        events += chunks
        parts.append(f"{chunks:,} prefill chunks of {chunk:,} tokens")
    output = _mean_length(req.output_len)
    if output is None:  # lengths from a file: taken as one run each
        output = float(MAX_RUN_STEPS)
    if output > 1:  # (each step of a run advances a request by a token)
        cuts = math.ceil(req.num * output / MAX_RUN_STEPS)
        events += cuts
        parts.append(f"{cuts:,} decode runs of {MAX_RUN_STEPS:,} steps")
    return WorkEstimate(events, " + ".join(parts) + "; about 2 more per preemption")


def estimate_work(plan: Plan) -> WorkEstimate:
    """The work estimate of simulating ``plan`` (see the module docstring)."""
    if plan.workload.mode == "inference":
        return _serving_estimate(plan)
    gpus = plan.parallel.world_size
    layers, micro = plan.model.num_layers, plan.parallel.num_microbatches
    return WorkEstimate(
        gpus * layers * micro, f"{gpus:,} GPUs x {layers:,} layers x {micro:,} micro-batches"
    )


__all__ = [
    "DEFAULT_MAX_EVENTS",
    "DISAGGREGATED_EVENTS_PER_REQUEST",
    "SERVING_EVENTS_PER_REQUEST",
    "WorkEstimate",
    "estimate_work",
]

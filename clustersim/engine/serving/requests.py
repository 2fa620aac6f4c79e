"""The serving workload: every request's arrival time, prompt tokens and output tokens.

Arrivals (``workload.requests.arrival``), in ms from the first request (which arrives at 0):

* ``poisson``: exponential gaps of mean ``1 / rate_per_s``;
* ``gamma``: gamma gaps of mean ``1 / rate_per_s`` and coefficient of variation
  ``arrival_cv`` (shape ``1 / cv^2``; cv = 1 is Poisson, larger is burstier);
* ``uniform``: one request every ``1 / rate_per_s``;
* ``trace``: the rows of a request file (:mod:`clustersim.spec.request_trace`), whose token
  counts are used as they are.

Otherwise prompt and output lengths are drawn from ``prompt_len`` and ``output_len``
(:func:`clustersim.routing.lengths.sample_lengths`). Three independent random streams
(``[seed, 2, 0..2]``: gaps, prompts, outputs) keep the lengths unchanged when only the rate
changes, and the gaps of two rates proportional: raising the rate compresses the same arrival
pattern in time.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from clustersim.routing.lengths import sample_lengths
from clustersim.spec.request_trace import read_request_trace
from clustersim.spec.schema import Plan, RequestsSpec


class Requests(NamedTuple):
    """Requests in arrival order."""

    arrival_ms: np.ndarray  # float64, non-decreasing, first = 0
    prompt_tokens: np.ndarray  # int64 >= 1
    output_tokens: np.ndarray  # int64 >= 1

    @property
    def num(self) -> int:
        """Number of requests."""
        return int(self.arrival_ms.size)


def make_requests(plan: Plan) -> Requests:
    """The requests of ``plan``'s workload (module docstring)."""
    spec = plan.workload.requests
    if spec.arrival == "trace":
        limit = spec.num if "num" in spec.model_fields_set else None
        trace = read_request_trace(spec.trace, limit)
        return Requests(trace.arrival_s * 1e3, trace.prompt_tokens, trace.output_tokens)
    streams = [np.random.default_rng([plan.seed, 2, i]) for i in range(3)]
    arrival = arrival_times_ms(spec, spec.num, streams[0])
    prompt = sample_lengths(spec.prompt_len, spec.num, streams[1])
    output = sample_lengths(spec.output_len, spec.num, streams[2])
    return Requests(arrival, prompt, output)


def arrival_times_ms(spec: RequestsSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` arrival times (ms), the first at 0, for a poisson, gamma or uniform stream."""
    mean_gap_ms = 1e3 / spec.rate_per_s
    if spec.arrival == "uniform":
        gaps = np.full(max(n - 1, 0), mean_gap_ms)
    elif spec.arrival == "gamma":
        shape = 1.0 / spec.arrival_cv**2
        gaps = rng.gamma(shape, 1.0 / shape, size=max(n - 1, 0)) * mean_gap_ms
    elif spec.arrival == "poisson":
        gaps = rng.exponential(1.0, size=max(n - 1, 0)) * mean_gap_ms
    else:
        raise ValueError(f"arrival {spec.arrival!r} has no generated times")
    return np.concatenate(([0.0], np.cumsum(gaps)))[:n]

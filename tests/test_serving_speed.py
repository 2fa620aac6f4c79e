"""The faster serving engine gives results identical to the engine before it was made faster
(``tests/serving_reference``, a frozen copy): every request's times, every accumulator, every
metric, bit for bit, on plans that exercise chunked and unchunked prefill, preemption,
pipelines, lockstep EP replicas, dispatch policies and bursty arrivals; with runs of decode
steps read from the timer's tables of round times, and (tables disabled) evaluated by numpy
and by the compiled loop (``engine/serving/run_kernel.py``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from serving_plans import DENSE, MOE, make_plan
from serving_reference.sim import ServingSim as ReferenceSim

from clustersim.engine.serving import step_timer
from clustersim.engine.serving.requests import make_requests
from clustersim.engine.serving.sim import ServingSim
from clustersim.metrics.serving import serving_metrics

CASES = {
    "dense-chunked": (DENSE, {"num": 300, "rate_per_s": 6.0}, {}),
    "dense-v0": (DENSE, {"num": 300, "rate_per_s": 6.0, "chunked_prefill": False}, {}),
    "dense-preempting": (
        DENSE,
        {"num": 200, "rate_per_s": 20.0, "num_gpu_blocks": 300, "max_batch_size": 32},
        {},
    ),
    "dense-bursty-small-budget": (
        DENSE,
        {
            "num": 300,
            "rate_per_s": 8.0,
            "arrival": "gamma",
            "arrival_cv": 4.0,
            "max_num_batched_tokens": 512,
        },
        {},
    ),  # fmt: skip
    "dense-dp2-least-loaded": (
        DENSE,
        {"num": 300, "rate_per_s": 10.0, "dispatch": "least_loaded"},
        {"parallel": {"dp": 2}, "hardware": {"gpus_per_node": 2}},
    ),
    "moe-lockstep-pp2": (MOE, {"num": 150, "rate_per_s": 8.0}, {}),
}


def _run(sim_class, plan, compiled=None):
    sim = sim_class(plan, make_requests(plan))
    if compiled is not None:
        sim.timer.compiled_runs = compiled
    return sim.run()


@pytest.mark.parametrize(
    "compiled", [None, False, True], ids=["table-runs", "numpy-runs", "compiled-runs"]
)
@pytest.mark.parametrize("name", list(CASES))
def test_identical_to_the_reference_engine(name, compiled, monkeypatch):
    if compiled is not None:  # no table: every run of decode steps evaluated
        monkeypatch.setattr(step_timer, "RUN_TABLE_MAX", 0)
    base, requests, sections = CASES[name]
    plan = make_plan(base, requests=requests, **sections)
    new, ref = _run(ServingSim, plan, compiled), _run(ReferenceSim, plan)
    for field in ("first_scheduled_ms", "first_token_ms", "finish_ms", "preemptions", "replica"):
        np.testing.assert_array_equal(getattr(new.book, field), getattr(ref.book, field), field)
    np.testing.assert_array_equal(new.rejected, ref.rejected)
    np.testing.assert_array_equal(new.kv_area, ref.kv_area)
    np.testing.assert_array_equal(new.kv_peak, ref.kv_peak)
    np.testing.assert_array_equal(new.prefill_batches, ref.prefill_batches)
    np.testing.assert_array_equal(new.decode_batches, ref.decode_batches)
    assert [dataclasses.asdict(s) for s in new.engine_stats] == [
        dataclasses.asdict(s) for s in ref.engine_stats
    ]
    assert (new.events, new.preemptions, new.in_system_area) == (
        ref.events,
        ref.preemptions,
        ref.in_system_area,
    )
    assert serving_metrics(plan, new) == serving_metrics(plan, ref)
    if name == "dense-preempting":
        assert new.preemptions > 0

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
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_plans import DENSE, MOE, make_plan
from serving_reference.sim import ServingSim as ReferenceSim

from clustersim.costs.serving import core_attention_ms
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
    ("compiled", "table_max"),
    [(None, None), (None, 2048), (False, 0), (True, 0)],
    ids=["table-runs", "small-tables", "numpy-runs", "compiled-runs"],
)
@pytest.mark.parametrize("name", list(CASES))
def test_identical_to_the_reference_engine(name, compiled, table_max, monkeypatch):
    if table_max is not None:  # 0: no table, every run evaluated; 2048: tables often rebuilt
        monkeypatch.setattr(step_timer, "RUN_TABLE_MAX", table_max)
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


_DENSE_PLAN = make_plan(DENSE)
_MOE_PLAN = make_plan(MOE)


@settings(max_examples=60, deadline=None)
@given(
    moe=st.booleans(),
    n=st.integers(1, 64),
    context=st.lists(st.integers(0, 40_000), min_size=6, max_size=6),
    steps=st.lists(st.integers(2, 3_000), min_size=6, max_size=6),
)
def test_run_tables_equal_the_direct_evaluation(moe, n, context, steps):
    """Round times and core attention of decode runs read from the timer's tables (built,
    extended up and down, reused) equal the direct numpy evaluation, bit for bit."""
    plan = _MOE_PLAN if moe else _DENSE_PLAN
    sim = ServingSim(plan, make_requests(make_plan(DENSE, requests={"num": 1})))
    timer = sim.timer
    for c, k in zip(context, steps, strict=True):
        x0 = n * (c + 1)  # pairs = KV reads = sum of (context + 1) of a decode step
        parts = timer._parts(n, n)
        grown = n * np.arange(k, dtype=np.float64)
        core = core_attention_ms(parts, x0 + grown, x0 + grown, n, timer.c, np.maximum)
        np.testing.assert_array_equal(timer._core_table(parts, n, x0, k), core)
        one = timer._one(n, n, 1)
        rounds = one[1] + one[2] * core  # fixed + layers x core
        np.testing.assert_array_equal(timer._run_table(one, n, x0, k), rounds)

"""The faster serving engine gives results identical to the engine before it was made faster
(``tests/serving_reference``, a frozen copy): every request's times, every accumulator, every
metric, bit for bit, on plans that exercise chunked and unchunked prefill, preemption,
pipelines, lockstep EP replicas, dispatch policies and bursty arrivals; with runs of decode
steps read from the timer's tables of round times, and (tables disabled) evaluated by numpy
and by the compiled loop (``engine/serving/run_kernel.py``); and with the whole simulation of
one replica of one micro-batch in the compiled engine (``engine/serving/solo_kernel.py``)."""

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
from clustersim.engine.serving.kv_usage import record_kv_usage
from clustersim.engine.serving.requests import make_requests
from clustersim.engine.serving.sim import LatencyLimits, Overloaded, ServingSim
from clustersim.explore.capacity import CapacitySearch
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
# engines of one replica with one micro-batch each: what the compiled engine covers (an MoE
# model with EP inside the replica included)
SOLO = [name for name in CASES if name.startswith("dense-")]
SOLO_CASES = {
    **{name: CASES[name] for name in SOLO},
    "dense-dp3-round-robin-v0": (
        DENSE,
        {"num": 300, "rate_per_s": 12.0, "chunked_prefill": False, "num_gpu_blocks": 400},
        {"parallel": {"dp": 3}, "hardware": {"gpus_per_node": 3}},
    ),
    "moe-solo-ep2": (
        MOE,
        {"num": 150, "rate_per_s": 8.0},
        {
            "parallel": {"tp": 2, "pp": 1, "dp": 1, "ep": 2},
            "hardware": {"num_nodes": 1, "gpus_per_node": 2},
        },
    ),
    "dense-long-runs": (
        DENSE,
        {"num": 120, "rate_per_s": 0.3, "output_len": {"dist": "uniform", "min": 1, "max": 3000}},
        {},
    ),
}


def _run(sim_class, plan, compiled=None, engine=None):
    sim = sim_class(plan, make_requests(plan))
    if compiled is not None:
        sim.timer.compiled_runs = compiled
    if engine is not None:  # the compiled engine forced on (True) or off (False)
        sim.compiled_engine = engine
        assert sim.use_compiled_engine() is engine
    return sim.run()


def _assert_identical(plan, new, ref):
    """Every request's times, accumulators and metrics of two runs are the same numbers."""
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
    new, ref = _run(ServingSim, plan, compiled, engine=False), _run(ReferenceSim, plan)
    _assert_identical(plan, new, ref)
    if name == "dense-preempting":
        assert new.preemptions > 0


@pytest.mark.parametrize("name", list(SOLO_CASES))
def test_compiled_engine_identical_to_the_reference_engine(name):
    """The whole simulation in the compiled engine (``solo_kernel.py``) gives the reference
    engine's numbers, bit for bit (chunked and unchunked prefill, preemption, bursts, small
    budgets, an MoE replica, decode runs of thousands of steps)."""
    base, requests, sections = SOLO_CASES[name]
    plan = make_plan(base, requests=requests, **sections)
    new, ref = _run(ServingSim, plan, engine=True), _run(ReferenceSim, plan)
    _assert_identical(plan, new, ref)
    if name == "dense-preempting":
        assert new.preemptions > 0


def _recorded(plan, engine, limits=None):
    """A run recording its KV series and progress (``engine``: compiled or not); the
    :class:`Overloaded` message instead of the result when the limits stop it."""
    seen = []
    sim = ServingSim(plan, make_requests(plan), seen.append, limits=limits)
    sim.compiled_engine = engine
    record_kv_usage(sim)
    try:
        result = sim.run()
    except Overloaded as stop:
        return str(stop), seen
    return (result, sim.kv_series), seen


@pytest.mark.parametrize("dp", [1, 2])
def test_compiled_engine_records_and_stops_as_the_python_engine(dp):
    """The compiled engine records the same KV-cache segments, ends its progress at 1, and
    stops an overloaded run at the same request with the same message; rejected requests
    (too long for the cache) are counted the same way."""
    plan = make_plan(
        DENSE,
        requests={
            "num": 300,
            "rate_per_s": 20.0 * dp,
            "num_gpu_blocks": 300,
            "max_batch_size": 32,
            "prompt_len": {"dist": "uniform", "min": 32, "max": 6000},
            "dispatch": "least_loaded" if dp > 1 else "round_robin",
        },
        parallel={"dp": dp},
        hardware={"gpus_per_node": dp},
    )
    (new, new_series), new_seen = _recorded(plan, True)
    (old, old_series), old_seen = _recorded(plan, False)
    assert new.rejected.any() and new.preemptions > 0
    _assert_identical(plan, new, old)
    assert new_series == old_series and len(new_series) > 100
    assert new_seen[-1] == old_seen[-1] == 1.0
    assert new_seen == sorted(new_seen) and len(new_seen) > 10
    for limits in (
        LatencyLimits(ttft_ms=2000.0, allowed_bad=5),  # stopped by late first tokens
        LatencyLimits(tpot_ms=1e9, allowed_bad=0),  # stopped by the first rejected request
    ):
        new_stop, _ = _recorded(plan, True, limits)
        old_stop, _ = _recorded(plan, False, limits)
        assert isinstance(new_stop, str) and new_stop == old_stop


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


def test_capacity_search_takes_the_compiled_engine_with_the_same_result():
    """A capacity search whose probes together reach COMPILED_RUNS_MIN_REQUESTS requests runs
    them in the compiled loop; forced either way, it finds the same capacity from the same
    probes with the same curve."""
    targets = {"ttft_ms_p99_max": 2000.0, "tpot_ms_p99_max": 50.0}
    plan = make_plan(DENSE, requests={"num": 300, "rate_per_s": 2.0}, targets=targets)
    assert CapacitySearch(plan).compiled_engine is None  # 300 x 10 probes: below
    big = make_plan(DENSE, requests={"num": 2000}, targets=targets)
    assert CapacitySearch(big).compiled_engine is True
    found = []
    for engine in (True, False):
        search = CapacitySearch(plan)
        search.compiled_engine = engine
        found.append(search.run().to_dict())
    assert found[0] == found[1] and found[0]["capacity_req_per_s"] is not None

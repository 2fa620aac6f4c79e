"""KV-cache use over time (engine/serving/kv_usage.py, metrics/kv_usage.py) and the serving
timeline rows of traces (``kv_usage``, ``kv_transfer``): a hand-computed single request, the
time-weighted percentiles against a direct evaluation of their definition, utilisation
bounds, and run = analyze = replay on colocated and disaggregated traces."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_plans import DENSE, make_plan

from clustersim.analyze import analyze
from clustersim.analyze.serving import kv_usage_curves
from clustersim.engine.serving.kv_usage import KVUsage
from clustersim.metrics.kv_usage import KV_PERCENTILE_KEYS, time_weighted_quantile
from clustersim.run import record
from clustersim.run.replay import replay
from clustersim.run.serving import simulate_serving
from clustersim.trace import TraceReader

BLOCK = 16
TWO_POOLS = {
    "tp": None,
    "pp": None,
    "dp": None,
    "prefill": {"tp": 1, "pp": 1, "dp": 1},
    "decode": {"tp": 1, "pp": 1, "dp": 1},
}


def _one_request(prompt: int, output: int, blocks: int):
    requests = {
        "num": 1,
        "prompt_len": {"dist": "fixed", "value": prompt},
        "output_len": {"dist": "fixed", "value": output},
        "num_gpu_blocks": blocks,
        "kv_block_size": BLOCK,
    }
    return make_plan(DENSE, requests=requests)


def test_one_request_by_hand():
    """100 prompt tokens, 50 output, 20 blocks of 16: the prefill step holds ceil(100/16) = 7
    blocks (35 %); the run of 49 decode steps grows from ceil(101/16) = 7 to ceil(149/16) =
    10 blocks (35 % -> 50 %). Mean and percentiles written out from those two segments."""
    report = simulate_serving(_one_request(100, 50, 20))
    usage = report.result.kv_usage
    cols = report.requests()
    arrival, first, finish = (
        float(cols[k][0]) for k in ("arrival_ms", "first_token_ms", "finish_ms")
    )
    np.testing.assert_array_equal(usage.replica, [0, 0])
    np.testing.assert_array_equal(usage.start_ms, [arrival, first])
    np.testing.assert_array_equal(usage.end_ms, [first, finish])
    np.testing.assert_array_equal(usage.used_start, [7, 7])
    np.testing.assert_array_equal(usage.used_end, [7, 10])
    window, prefill = finish - arrival, first - arrival
    decode = window - prefill
    m = report.metrics
    mean = (35 * prefill + 0.5 * (35 + 50) * decode) / window
    assert m["kv_cache_utilization_pct"] == pytest.approx(mean, rel=1e-12)
    assert m["kv_cache_utilization_peak_pct"] == 50
    for key in KV_PERCENTILE_KEYS:
        q = int(key.rsplit("p", 1)[1]) / 100
        # the prefill's share of the window at 35 %, then a uniform ramp to 50 %
        want = 35.0 if q <= prefill / window else 35 + (q * window - prefill) / decode * 15
        assert m[key] == pytest.approx(want, rel=1e-9), key


def _weight_at_or_below(start, end, duration, zero, x: float) -> float:
    """F(x) of the definition, evaluated directly: the weight of the values <= x."""
    total = zero if x >= 0 else 0.0
    for a, b, d in zip(start, end, duration, strict=True):
        lo, hi = min(a, b), max(a, b)
        if hi == lo:
            total += d if x >= lo else 0.0
        else:
            total += d * min(1.0, max(0.0, (x - lo) / (hi - lo)))
    return total


segment = st.tuples(st.integers(0, 100), st.integers(0, 100), st.floats(0.0, 50.0, allow_nan=False))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(segment, min_size=1, max_size=12),
    st.floats(0.0, 30.0, allow_nan=False),
    st.sampled_from([0.01, 0.25, 0.5, 0.9, 0.99, 1.0]),
)
def test_quantile_matches_its_definition(segments, zero, q):
    start, end, duration = (np.array(x, dtype=np.float64) for x in zip(*segments, strict=True))
    if zero + duration.sum() <= 0:
        return
    got = time_weighted_quantile(start, end, duration, zero, q)
    total = zero + duration.sum()
    # got is a q-quantile (at least q of the weight at or below it) and the smallest one
    assert _weight_at_or_below(start, end, duration, zero, got) >= q * total - 1e-9 * total
    assert _weight_at_or_below(start, end, duration, zero, got - 1e-7) <= q * total + 1e-9 * total


PLANS = {
    # a small cache that preempts and rejects
    "preempting": make_plan(
        DENSE, requests={"num": 160, "rate_per_s": 12.0, "num_gpu_blocks": 120}
    ),
    "dp2": make_plan(
        DENSE,
        requests={"num": 120, "rate_per_s": 6.0, "num_gpu_blocks": 400},
        parallel={"dp": 2},
        hardware={"gpus_per_node": 2},
    ),
    "1p1d": make_plan(
        DENSE,
        requests={"num": 120, "rate_per_s": 4.0, "num_gpu_blocks": 500},
        parallel=TWO_POOLS,
        hardware={"gpus_per_node": 2},
    ),
}


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv-usage")
    return {
        name: (simulate_serving(plan, trace=root / f"{name}.arrow"), root / f"{name}.arrow")
        for name, plan in PLANS.items()
    }


@pytest.mark.parametrize("name", list(PLANS))
def test_utilisation_is_bounded_and_its_mean_is_the_engines(traced, name):
    report, _ = traced[name]
    usage, m = report.result.kv_usage, report.metrics
    start, end = usage.utilization_pct()
    assert usage.num_segments > 0
    assert (start >= 0).all() and (end <= 100).all() and (start <= 100).all()
    assert (usage.end_ms >= usage.start_ms).all()
    # per replica, segments do not overlap: the engine's rounds follow each other
    for r in np.unique(usage.replica):
        mine = usage.replica == r
        assert (usage.start_ms[mine][1:] >= usage.end_ms[mine][:-1]).all()
    window = m["window_ms"]
    area = (0.5 * (start + end) * (usage.end_ms - usage.start_ms)).sum()
    assert area / (usage.blocks.size * window) == pytest.approx(
        m["kv_cache_utilization_pct"], rel=1e-9
    )
    p = [m[k] for k in KV_PERCENTILE_KEYS]
    assert 0 <= p[0] <= p[1] <= p[2] <= m["kv_cache_utilization_peak_pct"] <= 100
    if name == "preempting":
        assert m["preemptions"] > 0


@pytest.mark.parametrize("name", list(PLANS))
def test_analyze_and_replay_give_the_runs_metrics(traced, name):
    report, path = traced[name]
    assert analyze(path).metrics == report.metrics  # exactly, every key
    again = replay(path)
    assert again.recorded_metrics == report.metrics
    assert again.report.metrics == report.metrics


def test_disaggregated_trace_records_every_transfer(traced):
    report, path = traced["1p1d"]
    m, res = report.metrics, report.result
    assert m["kv_transfer_ms_p50"] is not None
    with TraceReader(path) as reader:
        table = pa.Table.from_batches(list(reader.batches()))
    kind, op = (np.array(table.column(c).to_pylist()) for c in ("kind", "op"))

    def rows(name: str) -> dict[str, np.ndarray]:
        mine = table.filter(pa.array((kind == "serving") & (op == name)))
        out = {c: np.array(mine.column(c).to_pylist()) for c in mine.column_names}
        order = np.argsort(out["microbatch"], kind="stable")
        return {c: v[order] for c, v in out.items()}

    moves = rows("kv_transfer")
    moved = np.flatnonzero(~np.isnan(res.kv_transfer_ms))
    np.testing.assert_array_equal(moves["microbatch"], moved)
    first = np.asarray(res.book.first_token_ms)[moved]
    np.testing.assert_allclose(moves["start_s"], first / 1e3, rtol=1e-12)
    np.testing.assert_allclose(
        moves["end_s"] - moves["start_s"], res.kv_transfer_ms[moved] / 1e3, rtol=1e-6
    )
    np.testing.assert_array_equal(moves["bytes"], res.kv_transfer_bytes[moved])
    assert (moves["replica"] == 0).all()  # the prefill replica
    assert (moves["values"][:, 2] == 1).all()  # the decode replica (global index 1)
    usage = rows("kv_usage")
    assert usage["replica"].size == res.kv_usage.num_segments
    assert set(usage["value"].tolist()) == {p.kv.num_blocks for p in res.pools}


def test_traces_without_timeline_rows_still_read(traced, tmp_path, monkeypatch):
    """A trace written before the ``serving`` rows: the percentiles are null, the rest is
    the run's."""
    report, _ = traced["preempting"]
    monkeypatch.setattr(record, "write_kv_rows", lambda writer, result: None)
    path = tmp_path / "old.arrow"
    record.write_serving_trace(path, report.audit.plan, report.result)
    got = analyze(path).metrics
    for key in KV_PERCENTILE_KEYS:
        assert got.pop(key) is None
    want = {k: v for k, v in report.metrics.items() if k not in KV_PERCENTILE_KEYS}
    assert got == want
    assert not any(
        isinstance(v, float) and math.isnan(v) for v in got.values()
    )  # nothing half-read


def test_plot_curves_drop_to_zero_while_idle():
    """Two segments of replica 0 with an idle gap between them: the curve is linear within
    each, and at 0 % over the gap (as the metrics count it)."""
    usage = KVUsage(
        np.array([0, 0], dtype=np.int32),
        np.array([0.0, 5.0]),
        np.array([2.0, 6.0]),
        np.array([1, 4]),
        np.array([3, 4]),
        np.array([10]),
    )
    [(replica, times, use)] = kv_usage_curves(usage)
    assert replica == 0
    np.testing.assert_array_equal(times, [0.0, 2.0, 2.0, 5.0, 5.0, 6.0])
    np.testing.assert_array_equal(use, [10.0, 30.0, 0.0, 0.0, 40.0, 40.0])


def test_analyze_plot_of_a_serving_trace_draws_the_kv_panel(traced, tmp_path):
    pytest.importorskip("matplotlib")
    from clustersim.analyze.plots import plot_serving
    from clustersim.analyze.serving import analyze_serving

    _, path = traced["dp2"]
    out = plot_serving(analyze_serving(path), tmp_path / "kv.png")
    assert out.stat().st_size > 10_000


@pytest.mark.parametrize("damage", ["short_values", "repeated_transfer"])
def test_damaged_timeline_rows_are_refused(traced, tmp_path, monkeypatch, damage):
    """Rows that cannot be the run's (values of the wrong width, a request transferred twice)
    make the trace unusable with one message, not wrong metrics."""
    from clustersim.trace import TraceError

    report, _ = traced["1p1d"]
    real = record.write_kv_rows

    def write(writer, result):
        real(writer, result)
        minus_one = np.full(1, -1)
        values = np.zeros((1, 2)) if damage == "short_values" else np.zeros((1, 3))
        writer.add_rows("serving", "kv_transfer", layer=minus_one, microbatch=np.zeros(1, int),
                        group=minus_one, replica=np.zeros(1, int), values=values,
                        start_s=np.zeros(1), end_s=np.zeros(1), nbytes=np.zeros(1))  # fmt: skip

    monkeypatch.setattr(record, "write_kv_rows", write)
    path = tmp_path / f"{damage}.arrow"
    record.write_serving_trace(path, report.audit.plan, report.result)
    with pytest.raises(TraceError, match="damaged trace"):
        analyze(path)


def test_pool_figures_make_up_the_whole(traced):
    """Disaggregated: each pool's mean, peak and p99 are those of its own replicas; the
    replica-weighted means make up the run's mean, the larger peak is the run's."""
    report, _ = traced["1p1d"]
    m, res = report.metrics, report.result
    pools = {p.role: p for p in res.pools}
    weighted = sum(m[f"{r}_kv_cache_utilization_pct"] * p.replicas for r, p in pools.items())
    assert weighted / res.num_replicas == pytest.approx(m["kv_cache_utilization_pct"], rel=1e-12)
    peaks = [m[f"{r}_kv_cache_utilization_peak_pct"] for r in pools]
    assert max(peaks) == m["kv_cache_utilization_peak_pct"]
    usage, window = res.kv_usage, m["window_ms"]
    for role, pool in pools.items():
        mine = usage.replica == pool.first_replica  # one replica per pool here
        start, end = (u[mine] for u in usage.utilization_pct())
        duration = (usage.end_ms - usage.start_ms)[mine]
        idle = window - duration.sum()
        total = window
        got = m[f"{role}_kv_cache_utilization_pct_p99"]
        assert _weight_at_or_below(start, end, duration, idle, got) >= 0.99 * total * (1 - 1e-9)
        assert _weight_at_or_below(start, end, duration, idle, got - 1e-7) <= 0.99 * total
        assert got <= m[f"{role}_kv_cache_utilization_peak_pct"]

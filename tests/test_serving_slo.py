"""Serving SLOs (targets.*_p99_max, *_p50_max), goodput, queueing delay and batch sizes,
against closed forms on idle and saturated systems."""

from __future__ import annotations

import numpy as np
import pytest
from serving_plans import DENSE, make_plan, step_ms

from clustersim.run.evaluate import evaluate
from clustersim.run.serving import simulate_serving

PROMPT, OUTPUT = 600, 6


def spaced(num=5, rate=0.1, **sections):
    """``num`` identical requests far apart (one every 10 s): each finds the GPU idle."""
    requests = {
        "num": num,
        "arrival": "uniform",
        "rate_per_s": rate,
        "prompt_len": {"dist": "fixed", "value": PROMPT},
        "output_len": {"dist": "fixed", "value": OUTPUT},
        **sections.pop("requests", {}),
    }
    return make_plan(DENSE, requests=requests, **sections)


def idle_ttft_ms(plan) -> float:
    return step_ms(plan, PROMPT, 0)


@pytest.mark.parametrize(("factor", "good_pct"), [(1.01, 100.0), (0.99, 0.0)])
def test_ttft_p99_limit_decides_each_request(factor, good_pct):
    base = spaced()
    limit = factor * idle_ttft_ms(base)
    plan = spaced(targets={"ttft_ms_p99_max": limit})
    verdict = evaluate(plan)
    m = verdict.metrics
    assert m["goodput_pct"] == pytest.approx(good_pct)
    assert m["slo_attainment_pct"] == m["goodput_pct"]
    good = 5 * good_pct / 100
    assert m["goodput_req_per_s"] == pytest.approx(good / m["window_ms"] * 1e3)
    assert m["goodput_req_per_s_per_gpu"] == pytest.approx(m["goodput_req_per_s"] / 1)
    nodes = {f.node for f in verdict.findings if f.severity == "error"}
    assert ("targets.ttft_ms_p99_max" in nodes) == (good_pct == 0.0)
    assert verdict.exit_code == (1 if good_pct == 0.0 else 0)


def test_tpot_p99_and_p50_limits_are_judged_on_their_percentiles():
    plan = spaced(targets={"tpot_ms_p99_max": 1e-3, "tpot_ms_p50_max": 1e-3})
    verdict = evaluate(plan)
    m = verdict.metrics
    assert m["goodput_pct"] == 0.0  # the p99 limit bounds every request
    errors = {f.node: f for f in verdict.findings if f.severity == "error"}
    assert errors["targets.tpot_ms_p99_max"].computed == pytest.approx(m["tpot_ms_p99"], rel=1e-3)
    assert errors["targets.tpot_ms_p50_max"].computed == pytest.approx(m["tpot_ms_p50"], rel=1e-3)
    # p50 limits bound the median, not each request: alone they leave goodput undefined
    only_median = evaluate(spaced(targets={"ttft_ms_p50_max": 1e6})).metrics
    assert only_median["goodput_pct"] is None and only_median["goodput_req_per_s"] is None


def test_no_per_request_limit_no_goodput():
    m = simulate_serving(spaced()).metrics
    assert m["goodput_req_per_s"] is None and m["goodput_pct"] is None


def test_idle_requests_never_queue_and_batch_alone():
    m = simulate_serving(spaced()).metrics
    assert m["queue_ms_p50"] == 0.0 and m["queue_ms_p99"] == 0.0
    assert m["prefill_batch_size_p50"] == m["prefill_batch_size_p99"] == 1
    assert m["decode_batch_size_p50"] == m["decode_batch_size_p99"] == 1
    assert m["decode_batch_size_mean"] == 1.0 and m["preemptions"] == 0


def test_one_at_a_time_queueing_is_the_previous_completion():
    """max_batch_size 1 and a burst: request i is first scheduled when i - 1 finishes."""
    plan = spaced(num=6, rate=1000.0, requests={"max_batch_size": 1})
    report = simulate_serving(plan)
    cols, m = report.requests(), report.metrics
    queue = cols["first_scheduled_ms"] - cols["arrival_ms"]
    assert queue[0] == 0.0
    np.testing.assert_allclose(cols["first_scheduled_ms"][1:], cols["finish_ms"][:-1], rtol=0)
    assert m["queue_ms_p50"] == pytest.approx(float(np.percentile(queue, 50)))
    assert m["queue_ms_mean"] == pytest.approx(float(queue.mean()))
    assert m["decode_batch_size_p99"] == 1 and m["prefill_batch_size_p99"] == 1
    # every step serves one request: 6 prefills and 6 x (OUTPUT - 1) decode steps
    assert report.result.prefill_batches.tolist() == [0, 6]
    assert report.result.decode_batches.tolist() == [6, 6 * (OUTPUT - 1)]


def test_a_burst_batches_decodes_together():
    """Four requests 1 us apart: the first prefills alone; the next step decodes it and admits
    the other three (1,800 prompt tokens, within the 8,192 budget); then four decode together
    until the first finishes, and the last step decodes the other three."""
    res = simulate_serving(spaced(num=4, rate=1e6)).result
    assert res.prefill_batches.tolist()[:4] == [0, 1, 0, 1]
    assert res.decode_batches.tolist()[:5] == [1, 1, 0, 1, OUTPUT - 2]
    m = simulate_serving(spaced(num=4, rate=1e6)).metrics
    assert m["decode_batch_size_p50"] == 4 and m["decode_batch_size_p99"] == 4
    assert m["decode_batch_size_mean"] == pytest.approx((1 + 3 + 4 * (OUTPUT - 2)) / (OUTPUT))

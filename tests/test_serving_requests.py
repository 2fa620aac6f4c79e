"""Request streams: generated arrivals, request trace files, plan fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from serving_plans import DENSE, make_plan

from clustersim.engine.serving.requests import make_requests
from clustersim.spec.errors import PlanError
from clustersim.spec.load import load_plan
from clustersim.spec.request_trace import read_request_trace

SAMPLE = Path(__file__).resolve().parents[1] / "traces" / "splitwise_conv_1000.csv"


def test_poisson_gaps_have_the_rate_and_scale_with_it():
    slow = make_requests(make_plan(DENSE, requests={"num": 20000, "rate_per_s": 2.0}))
    fast = make_requests(make_plan(DENSE, requests={"num": 20000, "rate_per_s": 8.0}))
    gaps = np.diff(slow.arrival_ms)
    assert slow.arrival_ms[0] == 0.0
    assert gaps.mean() == pytest.approx(500.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    np.testing.assert_allclose(fast.arrival_ms * 4, slow.arrival_ms, rtol=1e-12)
    np.testing.assert_array_equal(fast.prompt_tokens, slow.prompt_tokens)  # lengths unchanged


def test_gamma_gaps_have_the_coefficient_of_variation():
    reqs = make_requests(
        make_plan(
            DENSE, requests={"num": 20000, "arrival": "gamma", "arrival_cv": 3.0, "rate_per_s": 4.0}
        )
    )
    gaps = np.diff(reqs.arrival_ms)
    assert gaps.mean() == pytest.approx(250.0, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.1)


def test_uniform_arrivals_are_evenly_spaced():
    reqs = make_requests(make_plan(DENSE, requests={"num": 5, "arrival": "uniform"}))
    np.testing.assert_allclose(reqs.arrival_ms, [0, 500, 1000, 1500, 2000])


def test_lengths_follow_the_distributions():
    reqs = make_requests(make_plan(DENSE, requests={"num": 5000}))
    assert reqs.prompt_tokens.min() >= 32 and reqs.prompt_tokens.max() <= 2048
    assert reqs.output_tokens.min() >= 1 and reqs.output_tokens.max() <= 256


def test_read_the_shipped_sample_trace():
    trace = read_request_trace(SAMPLE)
    assert trace.arrival_s.size == 1000
    assert trace.arrival_s[0] == 0.0 and np.all(np.diff(trace.arrival_s) >= 0)
    assert trace.prompt_tokens[:2].tolist() == [374, 396]
    assert trace.output_tokens[:2].tolist() == [44, 109]
    assert read_request_trace(SAMPLE, limit=10).arrival_s.size == 10


def test_arrow_trace_equals_csv(tmp_path):
    csv = read_request_trace(SAMPLE)
    table = pa.table(
        {
            "arrived_at": csv.arrival_s + 5.0,
            "num_prefill_tokens": csv.prompt_tokens,
            "num_decode_tokens": csv.output_tokens,
            "other": csv.prompt_tokens,
        }
    )
    path = tmp_path / "trace.arrow"
    with ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    arrow = read_request_trace(path)
    np.testing.assert_allclose(arrow.arrival_s, csv.arrival_s, atol=1e-9)
    np.testing.assert_array_equal(arrow.prompt_tokens, csv.prompt_tokens)


def test_unsorted_rows_are_put_in_arrival_order(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("num_decode_tokens,arrived_at,num_prefill_tokens\n5,2.0,10\n7,1.0,20\n")
    trace = read_request_trace(path)
    assert trace.arrival_s.tolist() == [0.0, 1.0]
    assert trace.prompt_tokens.tolist() == [20, 10] and trace.output_tokens.tolist() == [7, 5]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("arrived_at,num_prefill_tokens\n0,1\n", "lacks column"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,x,1\n", "not a number"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,0,1\n", "positive whole"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n-1,3,1\n", ">= 0"),
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n", "no rows"),
    ],
)
def test_bad_traces_say_why(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_request_trace(path)


def test_trace_path_is_relative_to_the_plan_file(tmp_path, write_plan):
    (tmp_path / "req.csv").write_text(SAMPLE.read_text())
    plan_file = write_plan(
        {
            **DENSE,
            "workload": {"mode": "inference", "requests": {"arrival": "trace", "trace": "req.csv"}},
        }
    )
    plan = load_plan(plan_file)
    assert Path(plan.workload.requests.trace) == tmp_path / "req.csv"
    assert make_requests(plan).num == 1000


def test_trace_arrival_needs_a_file(write_plan):
    plan_file = write_plan(
        {**DENSE, "workload": {"mode": "inference", "requests": {"arrival": "trace"}}}
    )
    with pytest.raises(PlanError, match="needs trace"):
        load_plan(plan_file)


def test_unknown_scheduler_key_suggests_the_field(write_plan):
    plan_file = write_plan(
        {**DENSE, "workload": {"mode": "inference", "requests": {"max_num_batched_token": 4096}}}
    )
    with pytest.raises(PlanError, match="max_num_batched_tokens"):
        load_plan(plan_file)

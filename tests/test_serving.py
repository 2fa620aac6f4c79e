"""The serving simulation end to end, against closed forms and queueing laws."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from serving_plans import DENSE, MOE, make_plan, step_ms

import clustersim.engine.serving.sim as inference
from clustersim.audit.fixes import folding_fix
from clustersim.costs.comm import link_for_group, p2p_ms
from clustersim.engine.errors import EngineError
from clustersim.layout import Layout
from clustersim.run.serving import simulate_serving
from clustersim.spec.load import load_plan

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TRACE = REPO / "traces" / "splitwise_conv_1000.csv"
CONTRACT_KEYS = (
    "iteration_time_ms",
    "latency_ms",
    "latency_ms_p99",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "tpot_ms_p50",
    "throughput_tokens_per_ms",
    "throughput_tokens_per_s",
    "mfu_pct",
    "comm_overhead_pct",
    "comm_to_compute_pct",
    "bubble_pct",
    "gpu_utilization_pct",
    "load_balance_pct",
    "dropped_tokens_pct",
)


def one_request(prompt=1000, output=50, extra=None, **sections):
    requests = {
        "num": 1,
        "prompt_len": {"dist": "fixed", "value": prompt},
        "output_len": {"dist": "fixed", "value": output},
        **(extra or {}),
    }
    return make_plan(DENSE, requests=requests, **sections)


# ---- closed forms on an idle system ------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False])
def test_one_request_ttft_is_its_prefill_step(chunked):
    plan = one_request(prompt=1000, output=50, extra={"chunked_prefill": chunked})
    report = simulate_serving(plan)
    cols = report.requests()
    ttft = cols["first_token_ms"][0] - cols["arrival_ms"][0]
    assert ttft == pytest.approx(step_ms(plan, 1000, 0), rel=1e-9)
    assert report.metrics["ttft_ms_p50"] == pytest.approx(ttft, rel=1e-12)


def test_one_request_end_to_end_is_ttft_plus_decode_steps():
    prompt, output = 777, 40
    plan = one_request(prompt=prompt, output=output)
    report = simulate_serving(plan)
    m = report.metrics
    # decode step j (1-based) computes the j-th output token's KV on a context of prompt+j-1
    # decode-only steps replay CUDA graphs (the default)
    decodes = [step_ms(plan, 1, prompt + j - 1, graphs=True) for j in range(1, output)]
    assert m["latency_ms"] == pytest.approx(m["ttft_ms_p50"] + sum(decodes), rel=1e-9)
    tpot = sum(decodes) / (output - 1)
    assert m["tpot_ms_p50"] == pytest.approx(tpot, rel=1e-9)
    assert m["latency_ms"] == pytest.approx(m["ttft_ms_p50"] + (output - 1) * tpot, rel=1e-9)
    # decode is memory-bound: it reads every weight once per step, so TPOT > weights / HBM
    weights_ms = 6.7e9 * 2 / (plan.hardware.hbm_bandwidth_gbps * 1e9) * 1e3
    assert tpot > weights_ms
    assert m["completed_requests"] == 1 and m["preemptions"] == 0


def test_one_output_token_finishes_at_the_first_token():
    report = simulate_serving(one_request(prompt=64, output=1))
    cols = report.requests()
    assert cols["finish_ms"][0] == cols["first_token_ms"][0]
    assert report.metrics["tpot_ms_p50"] is None  # no request has a second token


def test_pipeline_adds_one_hop_to_the_idle_prefill():
    """TP 1: the two stages run the same layers as one GPU; the round adds one p2p send."""
    one = simulate_serving(one_request(prompt=512, output=8)).metrics
    plan = one_request(
        prompt=512, output=8, parallel={"pp": 2}, hardware={"num_nodes": 1, "gpus_per_node": 2}
    )
    two = simulate_serving(plan).metrics
    link = link_for_group([0, 1], 2, plan.hardware)
    hop = p2p_ms(512 * plan.model.hidden_size * 2, link.bandwidth_gbps, link.latency_us)
    assert two["ttft_ms_p50"] == pytest.approx(one["ttft_ms_p50"] + hop, rel=1e-9)
    assert two["bubble_pct"] > 40  # one micro-batch keeps half of the pipeline idle


# ---- queueing ----------------------------------------------------------------------------


@pytest.mark.parametrize(("arrival", "tolerance"), [("uniform", 0.02), ("poisson", 0.10)])
def test_littles_law(arrival, tolerance):
    """Steady state: mean requests in the system = arrival rate x mean latency, with the
    nominal rate. Tolerance: uniform arrivals 2% (start-up and drain of 1,500 requests);
    Poisson 10%, about 4 standard deviations of the realised rate of 1,500 arrivals (2.6%)."""
    rate = 4.0
    plan = make_plan(DENSE, requests={"num": 1500, "rate_per_s": rate, "arrival": arrival})
    m = simulate_serving(plan).metrics
    assert m["mean_requests_in_system"] > 2  # requests do overlap
    expected = rate / 1e3 * m["latency_ms_mean"]
    assert m["mean_requests_in_system"] == pytest.approx(expected, rel=tolerance)


def test_in_system_integral_is_the_sum_of_latencies():
    """Little's law on the sample path: the engine's integral of the requests in the system
    equals the sum of their sojourn times exactly."""
    report = simulate_serving(make_plan(DENSE, requests={"num": 300, "rate_per_s": 4.0}))
    cols = report.requests()
    total = float(np.sum(cols["finish_ms"] - cols["arrival_ms"]))
    assert report.result.in_system_area == pytest.approx(total, rel=1e-9)


def test_raising_the_arrival_rate_never_lowers_ttft_p50():
    ttfts = []
    for rate in (0.5, 2.0, 4.0, 8.0, 16.0, 32.0):
        plan = make_plan(DENSE, requests={"num": 300, "rate_per_s": rate})
        ttfts.append(simulate_serving(plan).metrics["ttft_ms_p50"])
    assert all(b >= a for a, b in zip(ttfts, ttfts[1:], strict=False)), ttfts
    assert ttfts[-1] > 2 * ttfts[0]  # the fastest rate queues


def test_small_kv_cache_preempts_and_still_serves_every_token():
    requests = {"num": 200, "rate_per_s": 16.0, "num_gpu_blocks": 400}
    report = simulate_serving(make_plan(DENSE, requests=requests))
    m = report.metrics
    assert m["preemptions"] > 0
    assert m["completed_requests"] == 200
    assert m["kv_cache_utilization_peak_pct"] > 90
    book = report.result.book
    assert book.generated == book.output  # every token generated exactly once
    ample = simulate_serving(make_plan(DENSE, requests={"num": 200, "rate_per_s": 16.0}))
    assert ample.metrics["preemptions"] == 0


def test_request_too_long_for_the_cache_is_rejected():
    requests = {
        "num": 3,
        "num_gpu_blocks": 8,
        "kv_block_size": 16,
        "prompt_len": {"dist": "fixed", "value": 200},
        "output_len": {"dist": "fixed", "value": 4},
    }
    m = simulate_serving(make_plan(DENSE, requests=requests)).metrics
    assert m["rejected_requests"] == 3 and m["completed_requests"] == 0
    assert m["latency_ms"] is None and m["throughput_tokens_per_ms"] is None


# ---- runs of decode steps equal step-by-step simulation ----------------------------------


@pytest.mark.parametrize(
    ("base", "requests"),
    [
        (DENSE, {"rate_per_s": 8.0}),
        (DENSE, {"rate_per_s": 8.0, "num_gpu_blocks": 300, "chunked_prefill": False}),
        (DENSE, {"rate_per_s": 8.0, "num_gpu_blocks": 300, "max_num_batched_tokens": 512}),
        (MOE, {"rate_per_s": 16.0, "dispatch": "least_loaded"}),
        (MOE, {"rate_per_s": 16.0, "num_gpu_blocks": 200, "max_batch_size": 8}),
    ],
)
def test_runs_of_decode_steps_equal_single_steps(monkeypatch, base, requests):
    plan = make_plan(base, requests={"num": 120, **requests})
    fast = simulate_serving(plan)
    monkeypatch.setattr(inference, "MAX_STEPS", 1)
    slow = simulate_serving(plan)
    assert fast.events < slow.events
    a, b = fast.requests(), slow.requests()
    for key in ("first_token_ms", "finish_ms"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-9)
    for key in ("replica", "preemptions"):
        np.testing.assert_array_equal(a[key], b[key])
    for key in ("gpu_utilization_pct", "comm_overhead_pct", "kv_cache_utilization_peak_pct"):
        assert fast.metrics[key] == pytest.approx(slow.metrics[key], rel=1e-9), key


# ---- determinism, dispatch, deployments --------------------------------------------------


def test_same_seed_same_results_and_another_seed_differs():
    plan = make_plan(MOE, requests={"num": 100, "rate_per_s": 8.0})
    first, second = simulate_serving(plan), simulate_serving(plan)
    assert first.metrics == second.metrics
    other = simulate_serving(plan.model_copy(update={"seed": 1}))
    assert other.metrics["latency_ms"] != first.metrics["latency_ms"]


def test_least_loaded_dispatch_avoids_the_busy_replica(tmp_path):
    # one long request first, then short ones that each finish before the next arrives
    rows = ["arrived_at,num_prefill_tokens,num_decode_tokens", "0,100,2000"]
    rows += [f"{1 + i},100,2" for i in range(6)]
    trace = tmp_path / "trace.csv"
    trace.write_text("\n".join(rows) + "\n")
    base = {"arrival": "trace", "trace": str(trace)}
    parallel = {"dp": 2}
    hardware = {"gpus_per_node": 2}
    rr = simulate_serving(make_plan(DENSE, requests=base, parallel=parallel, hardware=hardware))
    ll = simulate_serving(
        make_plan(
            DENSE,
            requests={**base, "dispatch": "least_loaded"},
            parallel=parallel,
            hardware=hardware,
        )
    )
    assert rr.requests()["replica"].tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert ll.requests()["replica"].tolist() == [0, 1, 1, 1, 1, 1, 1]


def test_ep_across_replicas_couples_them():
    plan = make_plan(MOE)  # TP 2 x DP 4 per stage, EP 8 x ETP 1: one EP group over 4 replicas
    assert inference.coupled_replicas(plan, Layout(plan)) == [[0, 1, 2, 3]]
    inside = make_plan(MOE, parallel={"pp": 1, "dp": 8, "ep": 2})  # EP inside each TP pair
    assert inference.coupled_replicas(inside, Layout(inside)) == [[i] for i in range(8)]
    assert make_plan(DENSE).model.moe is None


def test_moe_metrics_and_contract_keys():
    report = simulate_serving(make_plan(MOE, requests={"num": 150, "rate_per_s": 16.0}))
    m = report.metrics
    for key in CONTRACT_KEYS:
        assert key in m, key
    assert m["iteration_time_ms"] is None
    assert m["throughput_tokens_per_s"] == pytest.approx(1e3 * m["throughput_tokens_per_ms"])
    assert m["output_tokens_per_ms"] < m["throughput_tokens_per_ms"]
    assert 0 < m["load_balance_pct"] <= 100 and m["dropped_tokens_pct"] == 0
    assert 0 < m["gpu_utilization_pct"] <= 100 and 0 < m["comm_overhead_pct"] < 100
    assert m["ttft_ms_p50"] <= m["ttft_ms_p90"] <= m["ttft_ms_p99"]
    assert m["latency_ms"] <= m["latency_ms_p90"] <= m["latency_ms_p99"]
    assert m["goodput_requests_per_s"] is None  # no per-request targets
    out = report.to_dict()
    assert out["serving"]["engines"] == [[0, 1, 2, 3]]
    assert out["metrics"] is m


def test_goodput_counts_requests_within_targets():
    plan = make_plan(
        DENSE,
        requests={"num": 300, "rate_per_s": 16.0},
        targets={"ttft_ms_max": 150, "tpot_ms_max": 30},
    )
    report = simulate_serving(plan)
    m, cols = report.metrics, report.requests()
    ttft = cols["first_token_ms"] - cols["arrival_ms"]
    gaps = np.maximum(cols["output_tokens"] - 1, 1)
    tpot = np.where(
        cols["output_tokens"] > 1, (cols["finish_ms"] - cols["first_token_ms"]) / gaps, 0.0
    )
    good = int(np.sum((ttft <= 150) & (tpot <= 30)))
    assert m["slo_attainment_pct"] == pytest.approx(100 * good / 300)
    assert m["goodput_requests_per_s"] == pytest.approx(good / m["window_ms"] * 1e3)
    assert 0 < good < 300


def test_progress_reaches_one():
    seen = []
    simulate_serving(make_plan(DENSE, requests={"num": 50}), progress=seen.append)
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)


def test_no_memory_for_the_kv_cache_is_an_engine_error():
    plan = make_plan(DENSE, hardware={"gpu": "A100-40GB", "memory_gib": 12})
    with pytest.raises(EngineError, match="no memory is left for the KV cache"):
        simulate_serving(plan)


def test_training_plans_are_refused():
    plan = make_plan(DENSE)
    training = plan.model_copy(
        update={"workload": plan.workload.model_copy(update={"mode": "training"})}
    )
    with pytest.raises(EngineError, match="inference"):
        simulate_serving(training)


# ---- traces and seed plans ---------------------------------------------------------------


def test_shipped_trace_runs_as_it_is():
    plan = make_plan(MOE, requests={"arrival": "trace", "trace": str(SAMPLE_TRACE), "num": None})
    report = simulate_serving(plan)
    m = report.metrics
    assert m["completed_requests"] == 1000  # every row, although requests.num defaults to 1000
    cols = report.requests()
    assert cols["prompt_tokens"][:3].tolist() == [374, 396, 879]
    assert cols["arrival_ms"][1] == pytest.approx(4314.579)
    assert m["ttft_ms_p50"] > 0 and m["throughput_tokens_per_ms"] > 0


def test_trace_num_takes_the_first_rows():
    plan = make_plan(DENSE, requests={"arrival": "trace", "trace": str(SAMPLE_TRACE), "num": 25})
    assert simulate_serving(plan).metrics["completed_requests"] == 25


@pytest.mark.parametrize("name", ["003_current", "003_required", "004_current"])
def test_seed_serving_plans_simulate(name):
    plan = load_plan(REPO / "configs" / "seeds" / f"{name}.yaml")
    if not Layout(plan).expert_folding_ok:  # 003: EP 8 folds only with ETP 1 (as check does)
        plan = folding_fix(plan)
    report = simulate_serving(plan)
    m = report.metrics
    assert m["completed_requests"] == plan.workload.requests.num
    assert m["ttft_ms_p50"] > 0 and m["throughput_tokens_per_ms"] > 0
    assert math.isfinite(m["tpot_ms_p50"])
    nodes = {f.node for f in report.findings}
    assert "targets.throughput_tokens_per_ms_min" in nodes or m["throughput_tokens_per_ms"] >= 100
    assert not any(u.startswith("targets.ttft") for u in report.unchecked)

"""``clustersim capacity``: the highest request rate at which a serving plan's SLOs hold."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_plans import DENSE, MOE, make_plan
from typer.testing import CliRunner

from clustersim.cli import app
from clustersim.engine.serving.requests import make_requests
from clustersim.explore.capacity import CHECK_FACTOR, NoSlo, find_capacity
from clustersim.run.evaluate import evaluate
from clustersim.run.serving import simulate_serving

SLO = {"ttft_ms_p99_max": 400.0, "tpot_ms_p99_max": 30.0}


def plan_with(num=200, rate=4.0, targets=None, **sections):
    requests = {
        "num": num,
        "rate_per_s": rate,
        "prompt_len": {"dist": "uniform", "min": 64, "max": 1024},
        "output_len": {"dist": "uniform", "min": 8, "max": 128},
        **sections.pop("requests", {}),
    }
    return make_plan(DENSE, requests=requests, targets=targets or SLO, **sections)


def plan_at(plan, rate: float):
    spec = plan.workload.requests.model_copy(update={"rate_per_s": rate})
    return plan.model_copy(update={"workload": plan.workload.model_copy(update={"requests": spec})})


def good_share(plan, rate: float) -> float:
    """Share of requests meeting both p99 limits in a full run at ``rate``, computed here from
    the request lifecycles (not from the metrics' own goodput)."""
    cols = simulate_serving(plan_at(plan, rate)).requests()
    ttft = cols["first_token_ms"] - cols["arrival_ms"]
    out = cols["output_tokens"]
    tpot = np.where(
        out > 1, (cols["finish_ms"] - cols["first_token_ms"]) / np.maximum(out - 1, 1), 0
    )
    t = plan.targets
    good = ~cols["rejected"] & (ttft <= t.ttft_ms_p99_max) & (tpot <= t.tpot_ms_p99_max)
    return float(good.mean())


def slos_hold(plan, rate: float) -> bool:
    """The capacity's definition, computed here: at least 99% of the requests good (from the
    request lifecycles), no error on a target in the verdict ``check`` prints, and the
    arrivals spanning twice the p99 latency (a sustained load)."""
    at = plan_at(plan, rate)
    verdict = evaluate(at)
    targets_ok = not [f for f in verdict.findings if f.node.startswith("targets.")]
    span_ms = float(make_requests(at).arrival_ms[-1])
    steady = span_ms >= 2 * verdict.metrics["latency_ms_p99"]
    return good_share(plan, rate) >= 0.99 and targets_ok and steady


def test_slos_hold_at_the_capacity_and_fail_at_1_1x():
    plan = plan_with()
    cap = find_capacity(plan)
    rate = cap.capacity_req_per_s
    assert rate is not None and rate > 0
    assert slos_hold(plan, rate)
    assert not slos_hold(plan, rate * CHECK_FACTOR)
    assert good_share(plan, rate) >= 0.99
    d = cap.to_dict()
    assert d["capacity_req_per_s_per_gpu"] == pytest.approx(rate / 1)
    assert d["limiting_slo"] in SLO
    assert d["goodput_req_per_s"] > 0 and d["goodput_pct"] >= 99
    assert [p["rate_req_per_s"] for p in d["curve"]] == sorted(
        p["rate_req_per_s"] for p in d["curve"]
    )
    assert {"rate_req_per_s", "ttft_ms_p99", "tpot_ms_p99", "goodput_pct"} <= set(d["curve"][0])


def test_trace_arrivals_are_scaled_to_the_rate(tmp_path):
    """A trace's arrivals compressed in time: the capacity search sees the same requests."""
    path = tmp_path / "t.csv"
    rows = ["arrived_at,num_prefill_tokens,num_decode_tokens"]
    rows += [f"{i * 0.5},{200 + 10 * i},{16 + i % 7}" for i in range(60)]
    path.write_text("\n".join(rows) + "\n")
    plan = plan_with(requests={"arrival": "trace", "trace": str(path)})
    cap = find_capacity(plan)
    base = make_requests(plan)
    assert cap.probes[0].rate_req_per_s == pytest.approx(59 / 29.5)  # the trace's own rate
    assert cap.capacity_req_per_s is not None
    assert base.num == 60


def test_no_per_request_slo_is_refused():
    with pytest.raises(NoSlo):
        find_capacity(plan_with(targets={"ttft_ms_p50_max": 100.0}))


def _cli(*args):
    return CliRunner().invoke(app, ["capacity", *args])


def test_cli_exit_codes_and_json(tmp_path):
    raw = json.loads(json.dumps(DENSE))
    raw["workload"]["requests"].update(num=100, rate_per_s=4.0)
    raw["targets"] = dict(SLO)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(raw))
    res = _cli(str(good), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for key in ("capacity_req_per_s", "capacity_req_per_s_per_gpu", "goodput_req_per_s"):
        assert out[key] > 0
    assert out["limiting_slo"] in SLO and out["curve"]
    # an SLO no rate can meet (TTFT below one prefill step): exit 1
    res = _cli(str(good), "--set", "targets.ttft_ms_p99_max=0.001", "--json")
    assert res.exit_code == 1, res.output
    assert json.loads(res.stdout)["capacity_req_per_s"] is None
    # no per-request SLO, a training plan, a bad --attain: exit 2
    res = _cli(str(good), "--set", "targets.ttft_ms_p99_max=null", "--set",
               "targets.tpot_ms_p99_max=null")  # fmt: skip
    assert res.exit_code == 2 and "per-request SLO" in res.output
    assert _cli().exit_code == 2  # the default plan trains
    assert _cli(str(good), "--attain", "1.5").exit_code == 2


SMALL = dict(
    prompt=st.sampled_from([128, 512, 1024]),
    output=st.sampled_from([8, 32]),
    ttft=st.sampled_from([150.0, 400.0]),
    tpot=st.sampled_from([12.0, 30.0]),
    relax=st.sampled_from([1.5, 3.0]),
)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**SMALL)
def test_capacity_never_falls_with_a_replica_or_a_relaxed_slo(prompt, output, ttft, tpot, relax):
    lengths = {
        "prompt_len": {"dist": "fixed", "value": prompt},
        "output_len": {"dist": "fixed", "value": output},
    }
    slo = {"ttft_ms_p99_max": ttft, "tpot_ms_p99_max": tpot}
    base = find_capacity(plan_with(num=100, targets=slo, requests=lengths))
    relaxed = find_capacity(
        plan_with(num=100, targets={k: v * relax for k, v in slo.items()}, requests=lengths)
    )
    two = find_capacity(
        plan_with(
            num=100,
            targets=slo,
            requests=lengths,
            parallel={"dp": 2},
            hardware={"gpus_per_node": 2},
        )
    )

    def cap(c):
        return c.capacity_req_per_s or 0.0

    assert cap(relaxed) >= cap(base)
    assert cap(two) >= cap(base)
    assert not math.isnan(cap(base))


def test_a_burst_is_not_a_sustained_rate():
    """Eight replicas and 40 short requests absorb any burst within the SLOs: the capacity
    stops where the arrivals span less than twice the p99 latency, and says so."""
    plan = plan_with(
        num=40,
        targets={"ttft_ms_p99_max": 5000.0, "tpot_ms_p99_max": 200.0},
        requests={"output_len": {"dist": "fixed", "value": 8}},
        parallel={"dp": 8},
        hardware={"gpus_per_node": 8},
    )
    cap = find_capacity(plan)
    d = cap.to_dict()
    assert d["limited_by_requests"] is True
    best = cap.best.metrics
    # the same arrivals compressed in time: span at the capacity = span at 4/s x 4 / capacity
    span_ms = float(make_requests(plan).arrival_ms[-1]) * 4.0 / d["capacity_req_per_s"]
    assert best["latency_ms_p99"] * 2 <= span_ms * (1 + 1e-9)
    above = min(
        (p for p in cap.probes if p.rate_req_per_s > d["capacity_req_per_s"]),
        key=lambda p: p.rate_req_per_s,
    )
    assert not above.steady and above.metrics["goodput_pct"] == 100.0  # SLOs met, a burst
    assert d["capacity_req_per_s"] < 1e6


def test_probes_stopped_early_report_null_latencies_not_numbers():
    """An overloaded probe stops once too many requests missed their limits: the curve keeps
    its rate and verdict but no latency or goodput (none was measured to the end)."""
    cap = find_capacity(plan_with(num=300))
    stopped = [p for p in cap.curve() if p["stopped_early"]]
    assert stopped, cap.curve()
    for point in stopped:
        assert point["holds"] is False
        for key in ("ttft_ms_p99", "tpot_ms_p99", "goodput_pct", "goodput_req_per_s"):
            assert point[key] is None, (key, point)
    measured = [p for p in cap.curve() if not p["stopped_early"]]
    assert all(p["ttft_ms_p99"] is not None and p["goodput_pct"] is not None for p in measured)


def _same_lifecycles(a, b) -> None:
    cols_a, cols_b = a.requests(), b.requests()
    assert cols_a.keys() == cols_b.keys()
    for key in cols_a:
        np.testing.assert_array_equal(cols_a[key], cols_b[key], err_msg=key)  # NaN == NaN


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("moe", [False, True])
def test_probes_sharing_one_step_timer_equal_fresh_runs(compiled, moe):
    """The search builds the step timer once for all its probes (its memoised step constants
    and, for the compiled loop, their rows do not depend on the rate): every probe equals a
    run of that rate with nothing shared, request by request."""
    from clustersim.explore.capacity import CapacitySearch
    from clustersim.run.serving import moe_tables, step_timer

    sections = (  # EP inside the replica: the compiled loop applies
        {
            "parallel": {"tp": 2, "pp": 1, "dp": 1, "ep": 2, "etp": 1},
            "hardware": {"num_nodes": 1, "gpus_per_node": 2},
        }
        if moe
        else {}
    )
    base = MOE if moe else DENSE
    plan = make_plan(
        base,
        requests={
            "num": 120,
            "rate_per_s": 4.0,
            "prompt_len": {"dist": "uniform", "min": 64, "max": 1024},
            "output_len": {"dist": "uniform", "min": 8, "max": 128},
        },
        targets=SLO,
        **sections,
    )
    search = CapacitySearch(plan)
    shared = step_timer(plan, search.table)
    for rate in (2.0, 8.0, 4.0, 8.0 * 2 ** (1 / 36)):
        at = search.plan_at(rate)
        kwargs = {"requests": search.requests_at(rate), "compiled_engine": compiled}
        reused = simulate_serving(at, table=search.table, timer=shared, **kwargs)
        fresh = simulate_serving(at, table=moe_tables(at), **kwargs)
        _same_lifecycles(reused, fresh)
        assert json.dumps(reused.metrics, sort_keys=True, default=str) == json.dumps(
            fresh.metrics, sort_keys=True, default=str
        )
    if compiled:
        assert shared.solo_constants is not None and shared.solo_constants.count > 0

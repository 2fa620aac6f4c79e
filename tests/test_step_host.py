"""The engine's host time per step (``workload.requests.step_host_us``): work an engine runs
eagerly between two forward passes (input preparation, sampling), which the GPU waits for.
Checked against hand counts of the steps a request takes, and the validation rows that carry
it (SGLang) or not (TensorRT-LLM, gpt-fast)."""

from __future__ import annotations

import pytest
from serving_plans import DENSE, make_plan

from clustersim.calibration import sets_serving as sv
from clustersim.costs.serving import step_costs
from clustersim.layout import Layout
from clustersim.run.serving import simulate_serving

HOST_US = 750.0


def _one_request(step_host_us: float, graphs: bool, prompt: int = 128, output: int = 9):
    """One request of ``prompt`` + ``output`` tokens alone on one GPU."""
    return make_plan(
        DENSE,
        requests={
            "num": 1,
            "arrival": "uniform",
            "rate_per_s": 1.0,
            "prompt_len": {"dist": "fixed", "value": prompt},
            "output_len": {"dist": "fixed", "value": output},
            "cuda_graphs": graphs,
            "step_host_us": step_host_us,
        },
    )


@pytest.mark.parametrize("graphs", [True, False])
def test_every_step_waits_for_the_host_once(graphs):
    """A lone request takes one prefill step (its first token) and ``output - 1`` decode steps:
    each is longer by exactly the host time, so TTFT grows by 0.75 ms, every inter-token gap
    by 0.75 ms, and the request's latency by 9 x 0.75 = 6.75 ms."""
    base = simulate_serving(_one_request(0.0, graphs)).metrics
    host = simulate_serving(_one_request(HOST_US, graphs)).metrics
    ms = HOST_US * 1e-3
    assert host["ttft_ms_p50"] - base["ttft_ms_p50"] == pytest.approx(ms, rel=1e-9)
    assert host["tpot_ms_p50"] - base["tpot_ms_p50"] == pytest.approx(ms, rel=1e-9)
    assert host["latency_ms"] - base["latency_ms"] == pytest.approx(9 * ms, rel=1e-9)


def test_host_time_is_charged_once_per_step_not_per_layer():
    """In the per-step parts it sits with the output layer (once per step on the last stage),
    not in the per-layer parts (a layer count times it would be 32 x 0.75 ms)."""
    plans = [_one_request(us, True) for us in (0.0, HOST_US)]
    base, host = (step_costs(p, Layout(p)) for p in plans)
    for tokens, seqs in ((1.0, 1.0), (128.0, 1.0), (64.0, 64.0)):
        a, b = base.parts(tokens, seqs), host.parts(tokens, seqs)
        assert b[2] - a[2] == pytest.approx(HOST_US * 1e-3, rel=1e-12)  # logits + host
        assert b[:2] == a[:2] and b[3:] == a[3:]


def test_sglang_rows_carry_the_host_time_and_the_others_do_not():
    table = {r["row_id"]: r for r in sv.serving_table()}
    values = {sv.STEP_HOST: HOST_US}
    for rid in ("S0135", "S0137", "S0139", "S0141", "S0143"):  # SGLang bench_latency
        plan = sv.serving_plan(table[rid], values)
        assert plan.workload.requests.step_host_us == HOST_US
    for rid in ("S0082", "S0069", "S0127"):  # TensorRT-LLM (H100, A100), gpt-fast
        plan = sv.serving_plan(table[rid], values)
        assert plan.workload.requests.step_host_us == 0.0
    rows = {r.row_id: r for r in sv.serving_rows()[0]}
    assert rows["S0135"].param == rows["S0139"].param == sv.STEP_HOST
    assert rows["S0135"].fits and rows["S0139"].fits
    assert rows["S0143"].param == sv.STEP_HOST and not rows["S0143"].fits  # out of sample
    assert rows["S0137"].param == rows["S0141"].param == sv.LAUNCH

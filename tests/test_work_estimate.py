"""The serving work estimate (``clustersim.run.workload``): an upper bound on the serving
engine's events (one per request's arrival, prefill step, completed and cut decode runs, not
one per generated token), so that large request streams run without ``--max-events`` and
absurd ones are still refused with the knob named."""

from __future__ import annotations

import sys

import pytest

from clustersim import cli
from clustersim.engine.serving.disagg import DisaggregatedSim
from clustersim.engine.serving.requests import make_requests
from clustersim.engine.serving.sim import ServingSim
from clustersim.engine.serving.step_timer import MAX_STEPS
from clustersim.run.workload import DEFAULT_MAX_EVENTS, MAX_RUN_STEPS, estimate_work
from clustersim.spec import plan_from_dict
from clustersim.spec.schema import MAX_REQUESTS

ONE = {"tp": 1, "pp": 1, "dp": 1}


def _raw(parallel: dict, gpus: int, **requests) -> dict:
    return {
        "name": "estimate",
        "model": {"preset": "llama-2-7b"},
        "hardware": {"gpu": "H100-SXM", "num_nodes": 1, "gpus_per_node": gpus},
        "parallel": parallel,
        "workload": {
            "mode": "inference",
            "requests": {
                "prompt_len": {"dist": "uniform", "min": 128, "max": 4096},
                "output_len": {"dist": "uniform", "min": 16, "max": 512},
                **requests,
            },
        },
    }


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["clustersim", *args])
    monkeypatch.setattr(cli, "_debug", False)
    with pytest.raises(SystemExit) as info:
        cli.main()
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_run_length_cap_is_the_engines():
    assert MAX_RUN_STEPS == MAX_STEPS


def test_hand_computed_estimate():
    # 20,000 requests: 5 events each; chunked prefill: 20,000 x 2,112 mean prompt tokens in
    # chunks of 8,192 - 64 tokens; decode runs capped at 16,384 steps: 20,000 x 264 / 16,384
    plan = plan_from_dict(_raw(ONE, 1, num=20000, rate_per_s=4.0), "test")
    estimate = estimate_work(plan)
    chunks = -(-20000 * 2112 // 8128)
    runs = -(-20000 * 264 // 16384)
    assert estimate.events == 5 * 20000 + chunks + runs
    assert estimate.events < DEFAULT_MAX_EVENTS
    unchunked = plan_from_dict(_raw(ONE, 1, num=20000, chunked_prefill=False), "test")
    assert estimate_work(unchunked).events == 5 * 20000 + runs
    disagg = plan_from_dict(_raw({"prefill": ONE, "decode": ONE}, 2, num=20000), "test")
    assert estimate_work(disagg).events == 10 * 20000 + chunks + runs


# small plans that exercise every kind of event: idle and busy replicas, preemptions (a tight
# KV cache), tiny prefill chunks, unchunked prefill, evenly spaced arrivals on two replicas,
# pipeline stages, disaggregated pools
CASES = {
    "idle": (ONE, 1, {"rate_per_s": 0.5}),
    "busy": (ONE, 1, {"rate_per_s": 30.0}),
    "preempting": (
        ONE,
        1,
        {"rate_per_s": 50.0, "num_gpu_blocks": 600, "output_len": {"dist": "fixed", "value": 2000}},
    ),
    "small-chunks": (ONE, 1, {"rate_per_s": 20.0, "max_num_batched_tokens": 256}),
    "unchunked": (ONE, 1, {"rate_per_s": 20.0, "chunked_prefill": False}),
    "uniform-dp2": (
        {"tp": 1, "pp": 1, "dp": 2},
        2,
        {"rate_per_s": 10.0, "arrival": "uniform", "output_len": {"dist": "fixed", "value": 64}},
    ),
    "pp2": ({"tp": 1, "pp": 2, "dp": 1}, 2, {"rate_per_s": 20.0}),
    "1p1d": ({"prefill": ONE, "decode": ONE}, 2, {"rate_per_s": 5.0}),
    "1p1d-busy": ({"prefill": ONE, "decode": ONE}, 2, {"rate_per_s": 40.0}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_estimate_bounds_the_engines_events(name):
    parallel, gpus, requests = CASES[name]
    plan = plan_from_dict(_raw(parallel, gpus, num=300, **requests), "test")
    reqs = make_requests(plan)
    sim = (DisaggregatedSim if plan.parallel.disaggregated else ServingSim)(plan, reqs)
    result = sim.run()
    estimate = estimate_work(plan)
    # preemptions are not known before the run: the estimate says about 2 more each
    assert result.events <= estimate.events + 2 * result.preemptions, (result, estimate)
    # and it is not loose by more than the per-request count (events grow with requests)
    assert estimate.events <= 10 * result.events


def test_20000_request_plan_runs_without_max_events(monkeypatch, capsys, tmp_path):
    import yaml

    path = tmp_path / "dense.yaml"
    path.write_text(yaml.safe_dump(_raw(ONE, 1, num=20000, rate_per_s=4.0)))
    code, out, err = _main(monkeypatch, capsys, "run", str(path))
    assert code in (0, 1), err
    events = int(out.split(" events simulated")[0].split()[-1])
    assert events <= estimate_work(plan_from_dict(_raw(ONE, 1, num=20000), "t")).events


def test_absurd_request_stream_is_refused(monkeypatch, capsys, tmp_path):
    import yaml

    path = tmp_path / "absurd.yaml"
    path.write_text(yaml.safe_dump(_raw(ONE, 1, num=MAX_REQUESTS)))
    code, _, err = _main(monkeypatch, capsys, "run", str(path))
    expected = estimate_work(plan_from_dict(_raw(ONE, 1, num=MAX_REQUESTS), "t")).events
    assert code == 2 and f"--max-events {expected}" in err, err
    assert f"{MAX_REQUESTS:,} requests x 5 events" in err
    # the knob lets a smaller limit refuse, and capacity applies the same guard
    code, _, err = _main(monkeypatch, capsys, "capacity", str(path), "--max-events", "1000")
    assert code == 2 and "--max-events" in err, err

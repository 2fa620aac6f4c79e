"""Search of a serving plan: serving knobs only, ranked by capacity (or goodput) per GPU;
every deployment it returns passes ``check`` and meets the SLOs at its capacity."""

from __future__ import annotations

import json

import numpy as np
import pytest
from serving_plans import DENSE, MOE, make_plan
from typer.testing import CliRunner

from clustersim.cli import app
from clustersim.explore.search import SearchError
from clustersim.explore.serving_search import (
    PARAM_KEYS,
    ServingSpace,
    enumerate_serving,
    serving_search,
)
from clustersim.run.evaluate import evaluate
from clustersim.run.serving import simulate_serving

SLO = {"ttft_ms_p99_max": 400.0, "tpot_ms_p99_max": 30.0}
REQUESTS = {
    "num": 120,
    "rate_per_s": 4.0,
    "prompt_len": {"dist": "uniform", "min": 64, "max": 1024},
    "output_len": {"dist": "uniform", "min": 8, "max": 96},
}


def base_plan(**targets):
    return make_plan(
        DENSE,
        requests=REQUESTS,
        targets={**SLO, **targets},
        hardware={"gpus_per_node": 2},
    )


def at_rate(plan, rate):
    spec = plan.workload.requests.model_copy(update={"rate_per_s": rate})
    return plan.model_copy(update={"workload": plan.workload.model_copy(update={"requests": spec})})


def test_every_returned_deployment_passes_check_at_its_capacity():
    result = serving_search(base_plan(), 2, workers=1)
    ranked = result.ranked()
    assert ranked, result.rows
    for row in ranked:
        plan = at_rate(result.plan_for(row), row["capacity_req_per_s"])
        verdict = evaluate(plan)
        assert verdict.exit_code == 0, [f.node for f in verdict.findings]
        cols = simulate_serving(plan).requests()
        ttft = cols["first_token_ms"] - cols["arrival_ms"]
        out = cols["output_tokens"]
        gaps = np.maximum(out - 1, 1)
        tpot = np.where(out > 1, (cols["finish_ms"] - cols["first_token_ms"]) / gaps, 0.0)
        good = (ttft <= SLO["ttft_ms_p99_max"]) & (tpot <= SLO["tpot_ms_p99_max"])
        assert good.mean() >= 0.99
    per_gpu = [r["capacity_req_per_s_per_gpu"] for r in ranked]
    assert per_gpu == sorted(per_gpu, reverse=True)
    assert result.pareto() and result.pareto()[0] is ranked[0]
    d = result.to_dict()
    assert set(d["best_parallel"]) == {"tp", "pp", "dp", "ep", "etp"}
    for row in d["ranking"]:  # serving columns only: no micro-batches, schedules, recompute
        assert not {"micro_batch_size", "num_microbatches", "schedule", "recompute"} & set(row)
        assert set(PARAM_KEYS) <= set(row)


def test_the_space_is_serving_knobs_with_dp_derived():
    plan = make_plan(MOE, requests=REQUESTS, targets=SLO)
    space = ServingSpace(gpus=16, tp=(2,), pp=(1, 2), max_batch_size=(64, 128))
    cands = enumerate_serving(plan, space)
    assert {c["ep"] for c in cands} == {1, 2, 4, 8}  # Mixtral's 8 experts
    assert {(c["pp"], c["dp"]) for c in cands} == {(1, 8), (2, 4)}
    assert {c["etp"] for c in cands} == {1, 2}
    assert {c["chunked_prefill"] for c in cands} == {True, False}
    assert len(cands) == 2 * 4 * 2 * 2 * 2


def test_goodput_objective_and_refusals():
    result = serving_search(base_plan(), 2, "goodput", workers=1)
    best = result.best()
    assert best is not None and best["goodput_req_per_s_per_gpu"] > 0
    with pytest.raises(SearchError, match="capacity or goodput"):
        serving_search(base_plan(), 2, "throughput", workers=1)
    no_slo = make_plan(DENSE, requests=REQUESTS, hardware={"gpus_per_node": 2})
    with pytest.raises(SearchError, match="per-request SLO"):
        serving_search(no_slo, 2, workers=1)


def _serving_plan_file(tmp_path):
    """The dense serving plan on 2 GPUs with the SLOs, as a JSON plan file."""
    raw = json.loads(json.dumps(DENSE))
    raw["workload"]["requests"].update(REQUESTS)
    raw["hardware"]["gpus_per_node"] = 2
    raw["targets"] = dict(SLO)
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(raw))
    return path


def test_cli_serving_search(tmp_path):
    path = _serving_plan_file(tmp_path)
    runner = CliRunner()
    args = ["search", str(path), "-o", str(tmp_path / "s.parquet"), "-w", "1", "--tp", "1"]
    res = runner.invoke(app, [*args, "--json", "--chunked", "true"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["objective"] == "capacity" and out["ranking"][0]["capacity_req_per_s"] > 0
    assert runner.invoke(app, [*args, "--objective", "throughput"]).exit_code == 2
    assert runner.invoke(app, ["search", "--objective", "capacity"]).exit_code == 2  # training


def test_interrupted_search_resumed_gives_the_uninterrupted_table(tmp_path):
    """--limit stops a search after some deployments (the rest stay pending in the table);
    --resume takes those from the table and simulates the rest: the table is the same as
    one uninterrupted search's, row for row, and nothing finished is simulated again."""
    pq = pytest.importorskip("pyarrow.parquet")
    space = ServingSpace(gpus=2, tp=(1, 2), chunked_prefill=(True,), max_batch_size=(64, 256))
    whole, part = tmp_path / "whole.parquet", tmp_path / "part.parquet"
    serving_search(base_plan(), 2, space=space, workers=1, out=whole)
    first = serving_search(base_plan(), 2, space=space, workers=1, out=part, limit=1)
    assert first.counts["pending"] >= 2 and first.counts["simulated"] == 1
    assert pq.read_table(part).column("status").to_pylist().count("pending") >= 2
    second = serving_search(base_plan(), 2, space=space, workers=1, out=part, limit=1,
                            resume=True)  # fmt: skip
    assert second.resumed == 1 and second.counts["simulated"] == 2
    done = serving_search(base_plan(), 2, space=space, workers=1, out=part, resume=True)
    assert done.resumed == 2 and "pending" not in done.counts
    assert pq.read_table(part).equals(pq.read_table(whole))
    assert pq.read_table(part).to_pylist() == pq.read_table(whole).to_pylist()
    with pytest.raises(SearchError, match="another objective"):
        serving_search(base_plan(), 2, "goodput", space=space, workers=1, out=part, resume=True)
    with pytest.raises(SearchError, match="base plan"):
        serving_search(base_plan(ttft_ms_p99_max=500.0), 2, space=space, workers=1, out=part,
                       resume=True)  # fmt: skip


def test_cli_serving_search_resumes(tmp_path):
    path = _serving_plan_file(tmp_path)
    runner = CliRunner()
    table = str(tmp_path / "s.parquet")
    args = ["search", str(path), "-o", table, "-w", "1", "--tp", "1", "--chunked", "true",
            "--max-batch-size", "64,256", "--json"]  # fmt: skip
    res = runner.invoke(app, [*args, "--limit", "1"])
    assert res.exit_code == 0, res.output
    first = json.loads(res.stdout)["summary"]
    assert first["simulated"] == 1 and first["pending"] >= 1
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)["summary"]
    assert summary["resumed"] == 1 and "pending" not in summary
    assert summary["simulated"] == 1 + first["pending"]

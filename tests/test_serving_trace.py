"""Serving traces: the request lifecycle written by `run --trace`, read back by `analyze` (same
metrics as the run) and `replay` (the recorded request stream served again, exactly or under a
changed plan); refusals of changes that would draw another stream; atomic, checked files."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from serving_plans import DENSE, MOE, make_plan

from clustersim.analyze import analyze
from clustersim.analyze.serving import ServingTraceAnalysis, is_serving_trace, read_serving_result
from clustersim.engine.serving.requests import make_requests
from clustersim.metrics.serving import request_columns
from clustersim.run import record
from clustersim.run.replay import ReplayError, recorded_plan, replay
from clustersim.run.serving import simulate_serving
from clustersim.trace import TraceError, TraceReader
from clustersim.trace.writer import partial_files

# a loaded one-GPU plan whose small KV cache rejects the longest requests and preempts others
MIXED = {"num": 160, "rate_per_s": 12.0, "num_gpu_blocks": 120}
TARGETS = {"ttft_ms_max": 200, "tpot_ms_max": 40}


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-trace")
    plans = {
        "dense": make_plan(DENSE, requests={"num": 200, "rate_per_s": 8.0}, targets=TARGETS),
        "mixed": make_plan(DENSE, requests=MIXED),
        "moe": make_plan(MOE, requests={"num": 120, "rate_per_s": 16.0}),
    }
    out = {}
    for name, plan in plans.items():
        path = root / f"{name}.arrow"
        out[name] = (simulate_serving(plan, trace=path), path)
    return out


def test_mixed_plan_rejects_and_preempts(traced):
    m = traced["mixed"][0].metrics
    assert m["rejected_requests"] > 0 and m["completed_requests"] > 0 and m["preemptions"] > 0


@pytest.mark.parametrize("name", ["dense", "mixed", "moe"])
def test_round_trip_keeps_every_request(traced, name):
    report, path = traced[name]
    assert report.trace["path"] == str(path)
    assert report.trace["rows"] > 3 * report.result.arrival_ms.size
    assert not partial_files(path)
    assert is_serving_trace(path)
    with TraceReader(path) as reader:
        assert reader.metadata["run"]["mode"] == "inference"
        assert reader.metadata["seed"] == report.audit.plan.seed
        plan, requests, res = read_serving_result(reader)
    assert plan == report.audit.plan
    sampled = make_requests(plan)
    for got, want in zip(requests, sampled, strict=True):
        assert np.array_equal(got, want)
    original, back = report.requests(), request_columns(res)
    for key, want in original.items():
        np.testing.assert_array_equal(back[key], want, err_msg=key)


def test_rows_are_queryable_in_seconds(traced):
    """The polars query of docs/trace-format.md (TTFT per request from the prefill rows)."""
    pl = pytest.importorskip("polars")
    report, path = traced["mixed"]
    cols = report.requests()
    ok = ~cols["rejected"]

    def rows(op: str):
        return (
            pl.scan_ipc(path)
            .filter((pl.col("kind") == "request") & (pl.col("op") == op))
            .sort("microbatch")
            .collect()
        )

    prefill, decode, done = rows("prefill"), rows("decode"), rows("request_done")
    ttft_s = (prefill["end_s"] - prefill["start_s"]).to_numpy()
    np.testing.assert_allclose(
        ttft_s[ok] * 1e3, (cols["first_token_ms"] - cols["arrival_ms"])[ok], rtol=1e-9, atol=1e-9
    )
    assert np.isnan(ttft_s[~ok]).all() and done["end_s"].null_count() == (~ok).sum()
    np.testing.assert_array_equal(prefill["value"].to_numpy(), cols["prompt_tokens"])
    np.testing.assert_array_equal(decode["value"].to_numpy(), cols["output_tokens"])
    np.testing.assert_array_equal(done["value"].to_numpy(), cols["preemptions"])
    np.testing.assert_array_equal(done["replica"].to_numpy(), cols["replica"])
    ttft_p50 = (
        pl.scan_ipc(path)
        .filter((pl.col("kind") == "request") & (pl.col("op") == "prefill"))
        .select(
            1e3
            * (pl.col("end_s") - pl.col("start_s"))
            .drop_nulls()
            .quantile(0.5, interpolation="linear")
        )
        .collect()
        .item()
    )
    assert ttft_p50 == pytest.approx(report.metrics["ttft_ms_p50"], rel=1e-9)


@pytest.mark.parametrize("name", ["dense", "mixed", "moe"])
def test_analyze_gives_the_metrics_run_printed(traced, name):
    report, path = traced[name]
    seen = []
    result = analyze(path, progress=seen.append)
    assert isinstance(result, ServingTraceAnalysis) and seen[-1] == 1.0
    assert result.metrics == report.metrics  # exactly
    assert result.breakdown == report.breakdown
    assert result.serving["engines"] == report.to_dict()["serving"]["engines"]
    rows = result.replicas
    assert len(rows) == report.audit.plan.parallel.dp
    assert sum(r["completed"] for r in rows) == report.metrics["completed_requests"]
    assert sum(r["rejected"] for r in rows) == report.metrics["rejected_requests"]
    assert sum(r["preemptions"] for r in rows) == report.metrics["preemptions"]
    out = result.to_dict()
    assert out["trace"]["mode"] == "inference" and out["metrics"] is result.metrics


@pytest.mark.parametrize("name", ["dense", "mixed", "moe"])
def test_replay_same_plan_is_exact(traced, name):
    report, path = traced[name]
    again = replay(path)
    assert again.changes == []
    assert again.report.metrics == report.metrics  # exactly
    assert again.report.breakdown == report.breakdown
    assert again.recorded_metrics == report.metrics
    assert again.to_dict()["replay"]["changes"] == []


def test_replay_writes_its_own_trace(traced, tmp_path):
    report, path = traced["dense"]
    again = replay(path, trace=tmp_path / "again.arrow")
    assert analyze(tmp_path / "again.arrow").metrics == report.metrics
    assert again.report.trace["rows"] == report.trace["rows"]


def test_more_replicas_serve_the_same_stream_no_slower(traced):
    """Round-robin over two replicas gives each half the recorded stream, on the same hardware
    per replica: every replica is less loaded, so the median TTFT cannot rise (queueing only
    shrinks; prefill work per request is unchanged)."""
    report, path = traced["dense"]
    plan = recorded_plan(path, ["parallel.dp=2", "hardware.gpus_per_node=2"])
    wider = replay(path, plan)
    assert {c["field"] for c in wider.changes} == {"parallel.dp", "hardware.gpus_per_node"}
    m, old = wider.report.metrics, report.metrics
    assert m["ttft_ms_p50"] <= old["ttft_ms_p50"]
    assert m["completed_requests"] == old["completed_requests"]
    cols, rec = wider.report.requests(), report.requests()
    for key in ("arrival_ms", "prompt_tokens", "output_tokens"):
        np.testing.assert_array_equal(cols[key], rec[key])
    assert set(cols["replica"].tolist()) == {0, 1}


def test_bigger_kv_cache_serves_the_rejected_requests(traced):
    report, path = traced["mixed"]
    plan = recorded_plan(path, ["workload.requests.num_gpu_blocks=20000"])
    m = replay(path, plan).report.metrics
    assert m["rejected_requests"] == 0 and m["preemptions"] == 0
    assert m["completed_requests"] == MIXED["num"] > report.metrics["completed_requests"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["workload.requests.max_batch_size=8"],
        ["workload.requests.chunked_prefill=false"],
        ["hardware.gpu=A100-80GB"],
        ["workload.requests.dispatch=least_loaded"],
        ["targets.ttft_ms_max=50"],
    ],
)
def test_allowed_changes_replay(traced, overrides):
    _report, path = traced["dense"]
    result = replay(path, recorded_plan(path, overrides))
    assert len(result.changes) >= 1
    assert result.report.metrics["completed_requests"] == 200


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["seed=1"], "seed"),
        (["workload.requests.rate_per_s=4"], "workload.requests.rate_per_s"),
        (["workload.requests.num=50"], "workload.requests.num"),
        (["workload.requests.prompt_len={dist: fixed, value: 64}"], "workload.requests.prompt_len"),
        (["workload.requests.arrival=gamma"], "workload.requests.arrival"),
        (["workload.mode=training"], "workload.mode"),
    ],
)
def test_stream_changes_are_refused(traced, overrides, field):
    _report, path = traced["dense"]
    with pytest.raises(ReplayError, match=f"cannot replay .*{field}") as err:
        replay(path, recorded_plan(path, overrides))
    assert "clustersim run" in str(err.value) and "\n" not in str(err.value)


def test_truncated_serving_trace_is_refused(traced, tmp_path):
    _report, path = traced["dense"]
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for call in (analyze, replay):
        with pytest.raises(TraceError, match="not a complete Arrow"):
            call(bad)


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    plan = make_plan(DENSE, requests={"num": 20})
    path = tmp_path / "t.arrow"

    def boom(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(record.TraceWriter, "add_row", boom)
    with pytest.raises(KeyboardInterrupt):
        simulate_serving(plan, trace=path)
    assert list(tmp_path.iterdir()) == []


def test_same_plan_same_bytes_but_the_timestamp(tmp_path):
    plan = make_plan(DENSE, requests={"num": 30})
    a, b = tmp_path / "a.arrow", tmp_path / "b.arrow"
    simulate_serving(plan, trace=a)
    simulate_serving(plan, trace=b)
    ta, tb = (pa.ipc.open_file(str(p)).read_all() for p in (a, b))
    assert ta.equals(tb)
    runs = []
    for p in (a, b):
        with TraceReader(p) as reader:
            runs.append(reader.metadata["run"])
    ra, rb = runs
    ra.pop("created_utc"), rb.pop("created_utc")
    assert ra == rb


def test_perfetto_export_of_a_serving_trace(traced, tmp_path):
    """Each completed request gives a prefill and a decode slice on its replica's tracks (no
    two overlapping on one track); the counters are the continuous batch over time."""
    import json

    from clustersim.analyze.perfetto import export_perfetto

    report, path = traced["dense"]
    count = export_perfetto(path, tmp_path / "x.json", None)
    events = json.loads((tmp_path / "x.json").read_text())["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    done = int((~report.result.rejected).sum())
    assert len(slices) == 2 * done and count == len(slices) + sum(e["ph"] == "C" for e in events)
    tracks: dict = {}
    for e in sorted(slices, key=lambda e: e["ts"]):
        key = (e["pid"], e["tid"])
        assert e["ts"] >= tracks.get(key, -1.0) - 1e-6
        tracks[key] = e["ts"] + e["dur"]
    peak = max(e["args"]["decode"] for e in events if e["ph"] == "C")
    assert (
        1 <= peak <= report.audit.plan.workload.requests.max_batch_size * report.result.num_replicas
    )

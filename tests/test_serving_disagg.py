"""Disaggregated prefill/decode serving: the plan contract, the audit of both pools, and the
engine against closed forms (the colocated engine's idle single-request figures, the KV-cache
size formula, the calibrated point-to-point link) and a property peers report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_plans import DENSE, MOE, make_plan, step_ms
from typer.testing import CliRunner

from clustersim.audit.checks import audit
from clustersim.cli import app
from clustersim.costs.comm import p2p_link, p2p_ms
from clustersim.costs.serving import kv_bytes_per_token_layer
from clustersim.engine.serving.disagg import kv_transfer_bytes
from clustersim.explore.serving_search import ServingSpace, enumerate_serving, serving_search
from clustersim.run.evaluate import evaluate
from clustersim.run.serving import simulate_serving
from clustersim.spec.errors import PlanError
from clustersim.spec.load import load_plan
from clustersim.spec.presets import MODEL_PRESETS
from clustersim.spec.schema import ModelSpec

REPO = Path(__file__).resolve().parents[1]
ONE = {"tp": 1, "pp": 1, "dp": 1}
TWO_GPUS = {"num_nodes": 1, "gpus_per_node": 2}
FAST_LINKS = {  # "infinite" bandwidth: a transfer costs only the link's latency
    "intra_node": {"bandwidth_gbps": 1e6, "latency_us": 1.0},
    "inter_node": {"bandwidth_gbps": 1e6, "latency_us": 1.0},
}


def pools(prefill=None, decode=None) -> dict:
    """A ``parallel`` update that replaces the base's block by two pools."""
    return {"tp": None, "pp": None, "dp": None, "ep": None, "etp": None} | {
        "prefill": prefill or ONE,
        "decode": decode or ONE,
    }


def one_request(prompt: int, output: int, parallel: dict | None = None, **sections):
    requests = {
        "num": 1,
        "prompt_len": {"dist": "fixed", "value": prompt},
        "output_len": {"dist": "fixed", "value": output},
    }
    sections.setdefault("hardware", TWO_GPUS)
    return make_plan(DENSE, requests=requests, parallel=parallel or pools(), **sections)


# ---- the plan contract ---------------------------------------------------------------------


def test_both_pools_make_a_disaggregated_plan_of_their_summed_gpus():
    plan = make_plan(
        DENSE,
        hardware={"num_nodes": 1, "gpus_per_node": 4},
        parallel=pools(decode={**ONE, "tp": 2, "dp": 1}),
    )
    assert plan.parallel.disaggregated
    assert plan.parallel.world_size == 3 and audit(plan).layout_dict()["world_size"] == 3
    assert plan.pool("decode").parallel.tp == 2 and plan.pool("prefill").parallel.tp == 1
    assert plan.pool_first_rank("decode") == 1
    # a dumped plan loads again as the same plan
    again = make_plan(plan.model_dump(mode="json"))
    assert again.parallel == plan.parallel


@pytest.mark.parametrize(
    ("parallel", "mode", "says"),
    [
        (
            {"tp": None, "pp": None, "dp": None, "prefill": ONE},
            "inference",
            "needs parallel.decode",
        ),
        ({"dp": None, "tp": 2, "prefill": ONE, "decode": ONE}, "inference", "parallel.tp: with"),
        (pools(prefill={"tp": 1, "pp": 1}), "inference", "parallel.prefill.dp"),
        (pools(), "training", "need workload.mode: inference"),
    ],
)
def test_bad_pools_are_refused_with_the_field(parallel, mode, says):
    with pytest.raises(PlanError, match=says):
        make_plan(DENSE, parallel=parallel, workload={"mode": mode})


def test_check_names_the_pool_field_and_an_out_of_memory_decode_pool():
    # Mixtral-8x7B (~87 GiB of bf16 weights) fits on TP 4 but not on one 80 GiB GPU
    plan = make_plan(
        MOE,
        hardware={"num_nodes": 1, "gpus_per_node": 8},
        parallel=pools(
            prefill={"tp": 4, "pp": 1, "dp": 1, "ep": 1},
            decode={"tp": 1, "pp": 1, "dp": 1, "ep": 1},
        ),
    )
    report = audit(plan)
    oom = [f for f in report.findings if f.node == "parallel.decode" and f.severity == "error"]
    assert oom and "decode pool: out of memory" in oom[0].message
    assert not any(
        f.node.startswith("parallel.prefill") and f.severity == "error" for f in report.findings
    )
    assert (
        report.pools["decode"].memory.memory_per_gpu_gib
        > report.pools["prefill"].memory.memory_per_gpu_gib
    )
    idle = [f for f in report.findings if f.node == "parallel"]
    assert idle and "prefill 4 + decode 1 = 5" in idle[0].message  # 3 of 8 GPUs idle
    bad_tp = make_plan(
        DENSE,
        hardware={"num_nodes": 1, "gpus_per_node": 4},
        parallel=pools(decode={"tp": 3, "pp": 1, "dp": 1}),
    )
    nodes = {f.node for f in audit(bad_tp).errors}
    assert "parallel.decode.tp" in nodes and not any(
        n.startswith("parallel.prefill") for n in nodes
    )


# ---- the engine against closed forms -------------------------------------------------------


def test_1p1d_idle_request_ttft_is_its_prefill_and_tpot_the_decode_pool_alone():
    """With (nearly) infinite link bandwidth: TTFT = the prefill step (nothing queues), and the
    decode steps are the colocated engine's (the same closed forms), plus one transfer."""
    prompt, output = 777, 40
    plan = one_request(prompt, output, hardware={**TWO_GPUS, **FAST_LINKS})
    report = simulate_serving(plan)
    m, res = report.metrics, report.result
    assert m["ttft_ms_p50"] == pytest.approx(step_ms(plan, prompt, 0), rel=1e-9)
    assert m["queue_ms_p50"] == 0.0
    transfer = float(res.kv_transfer_ms[0])
    link = p2p_link([0, 1], 2, plan.hardware)
    assert transfer < 2 * link.latency_us * 1e-3  # bandwidth term negligible
    decodes = [step_ms(plan, 1, prompt + j - 1, graphs=True) for j in range(1, output)]
    assert m["tpot_ms_p50"] == pytest.approx((sum(decodes) + transfer) / (output - 1), rel=1e-9)
    colocated = simulate_serving(
        make_plan(DENSE, requests=plan.workload.requests.model_dump(mode="json"), parallel=ONE)
    ).metrics
    assert m["ttft_ms_p50"] == pytest.approx(colocated["ttft_ms_p50"], rel=1e-12)
    assert m["tpot_ms_p50"] - transfer / (output - 1) == pytest.approx(
        colocated["tpot_ms_p50"], rel=1e-9
    )
    assert m["prefill_gpus"] == m["decode_gpus"] == 1


def test_kv_transfer_bytes_and_time_match_the_hand_formulas():
    # K and V: 2 x layers x KV heads x head size x tokens x bytes (Llama-2-7B: 32 x 32 x 128)
    llama = ModelSpec(**MODEL_PRESETS["llama-2-7b"])
    assert kv_transfer_bytes(llama, 1000) == 2 * 32 * 32 * 128 * 1000 * 2
    # MLA keeps its compressed latent: layers x (kv_lora_rank + rope dim) x tokens x bytes
    v3 = ModelSpec(**MODEL_PRESETS["deepseek-v3"])
    assert kv_transfer_bytes(v3, 1000) == 61 * (512 + 64) * 1000 * 2
    # across nodes (one GPU per node): the network's point-to-point link, TP 1 shards = whole
    prompt = 1500
    far = one_request(prompt, 8, hardware={"num_nodes": 2, "gpus_per_node": 1})
    near = one_request(prompt, 8)
    res_far, res_near = simulate_serving(far).result, simulate_serving(near).result
    assert res_far.kv_transfer_bytes[0] == 2 * 32 * 32 * 128 * prompt * 2
    for plan, res in ((far, res_far), (near, res_near)):
        hw = plan.hardware
        link = p2p_link([0, 1], hw.gpus_per_node, hw)
        expected = p2p_ms(res.kv_transfer_bytes[0], link.bandwidth_gbps, link.latency_us)
        assert res.kv_transfer_ms[0] == pytest.approx(expected, rel=1e-12)
    assert res_far.kv_transfer_ms[0] > res_near.kv_transfer_ms[0]  # network slower than NVLink
    # TP 2 on both sides: each GPU sends its half of the heads over its own link in parallel
    tp2 = one_request(
        prompt, 8, hardware={"num_nodes": 1, "gpus_per_node": 4},
        parallel=pools(prefill={"tp": 2, "pp": 1, "dp": 1}, decode={"tp": 2, "pp": 1, "dp": 1}),
    )  # fmt: skip
    res = simulate_serving(tp2).result
    link = p2p_link([0, 2], 4, tp2.hardware)
    half = res.kv_transfer_bytes[0] / 2
    assert res.kv_transfer_ms[0] == pytest.approx(
        p2p_ms(half, link.bandwidth_gbps, link.latency_us), rel=1e-12
    )


def test_ttft_does_not_depend_on_the_decode_side():
    """The first token comes from the prefill pool: a slow transfer link delays the decode,
    never the TTFT (while the prefill cache is not exhausted)."""
    requests = {"num": 150, "rate_per_s": 3.0}
    fast = simulate_serving(
        make_plan(DENSE, requests=requests, hardware={**TWO_GPUS, **FAST_LINKS}, parallel=pools())
    )
    slow_links = {"intra_node": {"bandwidth_gbps": 5.0, "latency_us": 50.0}}
    slow = simulate_serving(
        make_plan(DENSE, requests=requests, hardware={**TWO_GPUS, **slow_links}, parallel=pools())
    )
    a, b = fast.requests(), slow.requests()
    np.testing.assert_array_equal(a["first_token_ms"], b["first_token_ms"])
    assert slow.metrics["kv_transfer_ms_p50"] > 10 * fast.metrics["kv_transfer_ms_p50"]
    assert slow.metrics["tpot_ms_p99"] > fast.metrics["tpot_ms_p99"]
    # TTFT = queueing + prefill: a request's first token comes after its first schedule
    cols = a
    assert np.all(cols["first_token_ms"] >= cols["first_scheduled_ms"])
    assert fast.metrics["queue_ms_p50"] is not None


def test_moving_prefill_off_the_decode_gpus_lowers_tpot_p99():
    """Prefill-heavy load (long prompts, short outputs) on 2 GPUs: colocated, prefill chunks
    stall every decode batch they join; 1P1D keeps decode steps short (DistServe's finding)."""
    requests = {
        "num": 300,
        "rate_per_s": 2.0,
        "prompt_len": {"dist": "uniform", "min": 3000, "max": 6000},
        "output_len": {"dist": "uniform", "min": 32, "max": 128},
    }
    colocated = simulate_serving(
        make_plan(DENSE, requests=requests, hardware=TWO_GPUS, parallel={"dp": 2})
    )
    split = simulate_serving(
        make_plan(DENSE, requests=requests, hardware=TWO_GPUS, parallel=pools())
    )
    assert split.metrics["tpot_ms_p99"] < 0.9 * colocated.metrics["tpot_ms_p99"]
    assert split.metrics["completed_requests"] == colocated.metrics["completed_requests"] == 300


def test_same_seed_same_results_with_large_ep_decode():
    """MoE decode pool of attention DP 4 with EP 4 across all its GPUs: one engine of four
    replicas (the EP group spans them); the run is reproducible."""
    plan = make_plan(
        MOE,
        requests={"num": 60, "rate_per_s": 6.0},
        hardware={"num_nodes": 1, "gpus_per_node": 8},
        parallel=pools(
            prefill={"tp": 4, "pp": 1, "dp": 1, "ep": 4, "etp": 1},
            decode={"tp": 1, "pp": 1, "dp": 4, "ep": 4, "etp": 1},
        ),
        model={"num_layers": 8},
    )
    first, second = simulate_serving(plan), simulate_serving(plan)
    assert first.metrics == second.metrics
    decode = first.result.pools[1]
    assert [first.result.engines[i] for i in decode.engines] == [[1, 2, 3, 4]]
    assert first.metrics["completed_requests"] == 60
    assert first.metrics["goodput_req_per_s_per_gpu"] is None  # no SLO set
    with_slo = make_plan(plan.model_dump(mode="json"), targets={"ttft_ms_p99_max": 1e5})
    m = simulate_serving(with_slo).metrics
    assert m["goodput_req_per_s_per_gpu"] == pytest.approx(m["goodput_req_per_s"] / 8)


def test_the_disaggregated_example_config_runs_and_checks():
    path = REPO / "configs" / "serving_disaggregated.yaml"
    plan = load_plan(path)
    assert plan.parallel.disaggregated
    result = CliRunner().invoke(
        app, ["run", str(path), "--json", "--set", "workload.requests.num=40"]
    )
    assert result.exit_code in (0, 1), result.output
    data = json.loads(result.stdout)
    assert data["layout"]["world_size"] == plan.parallel.world_size
    assert data["metrics"]["kv_transfer_ms_p50"] > 0
    assert set(data["serving"]["pools"]) == {"prefill", "decode"}


def test_the_run_table_shows_kv_transfers_only_for_a_disaggregated_plan():
    """A colocated deployment has no KV transfer, so its table has no such row (its metric
    is null); the disaggregated example has one."""
    disagg = REPO / "configs" / "serving_disaggregated.yaml"
    colocated = REPO / "configs" / "seeds" / "004_current.yaml"
    small = ["--set", "workload.requests.num=20"]
    tables = {
        path.stem: CliRunner().invoke(app, ["run", str(path), *small]).stdout
        for path in (disagg, colocated)
    }
    assert "KV transfer p50" in tables["serving_disaggregated"]
    assert "KV transfer" not in tables["004_current"]
    assert "TTFT p99" in tables["004_current"]  # a row with a target field stays


# ---- search over the prefill:decode split --------------------------------------------------


def test_search_covers_the_split_and_every_returned_plan_meets_the_slos_at_its_capacity(
    tmp_path,
):
    slo = {"ttft_ms_p99_max": 400.0, "tpot_ms_p99_max": 30.0}
    base = make_plan(
        DENSE,
        requests={
            "num": 120,
            "rate_per_s": 4.0,
            "prompt_len": {"dist": "uniform", "min": 64, "max": 1024},
            "output_len": {"dist": "uniform", "min": 8, "max": 96},
        },
        targets=slo,
        hardware={"num_nodes": 1, "gpus_per_node": 4},
        parallel=pools(),
    )
    space = ServingSpace(gpus=4, chunked_prefill=(True,), prefill_gpus=(1, 2))
    cands = enumerate_serving(base, space)
    # 1P on 1 GPU + decode on 3 (TP 1); 2 GPUs each with TP 1 or 2 on either side
    assert {(c["prefill_gpus"], c["prefill_tp"], c["tp"]) for c in cands} == {
        (1, 1, 1), (2, 1, 1), (2, 1, 2), (2, 2, 1), (2, 2, 2),
    }  # fmt: skip
    assert {c["split"] for c in cands} == {"1P3D", "2P2D", "2P1D", "1P2D", "1P1D"}
    table = tmp_path / "split.parquet"
    result = serving_search(base, 4, space=space, workers=1, out=table)
    ranked = result.ranked()
    assert ranked, result.rows
    # the table resumes (split and pool knobs in the candidate id): nothing simulated again
    again = serving_search(base, 4, space=space, workers=1, out=table, resume=True)
    assert again.resumed == result.counts["simulated"]
    assert again.to_dict()["ranking"] == result.to_dict()["ranking"]
    for row in ranked:
        plan = result.plan_for(row)
        assert plan.parallel.disaggregated and plan.parallel.world_size == 4
        spec = plan.workload.requests.model_copy(update={"rate_per_s": row["capacity_req_per_s"]})
        at = plan.model_copy(
            update={"workload": plan.workload.model_copy(update={"requests": spec})}
        )
        verdict = evaluate(at)
        assert verdict.exit_code == 0, [f.node for f in verdict.findings]
        assert verdict.metrics["goodput_pct"] >= 99
        assert row["capacity_req_per_s_per_gpu"] == pytest.approx(row["capacity_req_per_s"] / 4)
    best = result.to_dict()["best_parallel"]
    assert set(best) == {"prefill", "decode"}


def test_search_splits_a_moe_budget_with_large_ep_decode():
    plan = make_plan(
        MOE, requests={"num": 50}, targets={"ttft_ms_p99_max": 1000.0}, parallel=pools()
    )
    cands = enumerate_serving(plan, ServingSpace(gpus=16, tp=(2,), prefill_gpus=(8,)))
    # EP inside a replica (= TP) or across the whole pool (attention DP + EP), ETP 1
    assert {(c["prefill_ep"], c["ep"]) for c in cands} == {(2, 2), (2, 8), (8, 2), (8, 8)}
    assert {c["split"] for c in cands} == {"4P4D"}


def test_capacity_of_a_disaggregated_plan_holds_there_and_counts_both_pools():
    from clustersim.explore.capacity import find_capacity

    plan = make_plan(
        DENSE,
        requests={
            "num": 200,
            "rate_per_s": 4.0,
            "prompt_len": {"dist": "uniform", "min": 64, "max": 1024},
            "output_len": {"dist": "uniform", "min": 8, "max": 128},
        },
        targets={"ttft_ms_p99_max": 400.0, "tpot_ms_p99_max": 30.0},
        hardware=TWO_GPUS,
        parallel=pools(),
    )
    cap = find_capacity(plan)
    rate = cap.capacity_req_per_s
    assert rate is not None and cap.to_dict()["capacity_req_per_s_per_gpu"] == rate / 2
    spec = plan.workload.requests.model_copy(update={"rate_per_s": rate})
    at = plan.model_copy(update={"workload": plan.workload.model_copy(update={"requests": spec})})
    verdict = evaluate(at)
    assert verdict.exit_code == 0 and verdict.metrics["goodput_pct"] >= 99
    assert verdict.metrics["kv_transfer_ms_p50"] > 0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefill_tp=st.sampled_from([1, 2]),
    decode_tp=st.sampled_from([1, 2]),
    decode_dp=st.sampled_from([1, 2]),
    gpus_per_node=st.sampled_from([2, 4, 8]),
    dispatch=st.sampled_from(["round_robin", "least_loaded"]),
    rate=st.floats(1.0, 40.0),
)
def test_every_request_crosses_once_at_its_shard_over_its_link(
    prefill_tp, decode_tp, decode_dp, gpus_per_node, dispatch, rate
):
    """Hypothesis over small 1PyD plans: every request completes; one with more than one
    output token crossed once, to a decode replica, in at least p2p_ms(prompt x one GPU's KV
    bytes per token over all layers, the link between the two replicas' first GPUs) -- exactly
    that when no other transfer was in flight meanwhile (transfers share ports) -- and its
    last token comes after its first token plus that transfer."""
    gpus = prefill_tp + decode_tp * decode_dp
    plan = make_plan(
        DENSE,
        requests={"num": 20, "rate_per_s": rate, "dispatch": dispatch},
        hardware={"num_nodes": -(-gpus // gpus_per_node), "gpus_per_node": gpus_per_node},
        parallel=pools(
            prefill={"tp": prefill_tp, "pp": 1, "dp": 1},
            decode={"tp": decode_tp, "pp": 1, "dp": decode_dp},
        ),
    )
    report = simulate_serving(plan)
    res, cols = report.result, report.requests()
    assert not cols["rejected"].any() and report.metrics["completed_requests"] == 20
    hw, model = plan.hardware, plan.model
    shard = max(
        kv_bytes_per_token_layer(model, tp) * model.num_layers for tp in (prefill_tp, decode_tp)
    )
    start = np.asarray(cols["first_token_ms"], dtype=np.float64)
    end = start + res.kv_transfer_ms
    for rid in range(20):
        if cols["output_tokens"][rid] == 1:
            assert np.isnan(res.kv_transfer_ms[rid])
            continue
        d = int(res.decode_replica[rid]) - 1  # replica 0 is the prefill replica
        assert 0 <= d < decode_dp
        dst = prefill_tp + d * decode_tp  # the decode replica's first GPU
        link = p2p_link([0, dst], gpus_per_node, hw)
        prompt = cols["prompt_tokens"][rid]
        expected = p2p_ms(prompt * shard, link.bandwidth_gbps, link.latency_us)
        others = np.arange(20) != rid
        overlapped = (others & (start < end[rid]) & (end > start[rid])).any()
        if overlapped:
            assert res.kv_transfer_ms[rid] >= expected * (1 - 1e-12)
        else:
            assert res.kv_transfer_ms[rid] == pytest.approx(expected, rel=1e-12)
        assert cols["finish_ms"][rid] >= cols["first_token_ms"][rid] + expected * (1 - 1e-12)


# ---- per-pool batch limits (workload.requests.prefill / .decode) ---------------------------

LOADED = {
    "num": 120,
    "rate_per_s": 8.0,
    "prompt_len": {"dist": "uniform", "min": 600, "max": 1200},
    "output_len": {"dist": "uniform", "min": 64, "max": 256},
}


def _limited(prefill=None, decode=None, **requests):
    limits = {k: v for k, v in (("prefill", prefill), ("decode", decode)) if v is not None}
    return make_plan(DENSE, requests={**LOADED, **requests, **limits}, parallel=pools(),
                     hardware=TWO_GPUS)  # fmt: skip


def test_pool_batch_limits_apply_to_their_pool_only():
    from clustersim.engine.serving.disagg import DisaggregatedSim
    from clustersim.engine.serving.requests import make_requests

    plan = _limited(prefill={"max_num_batched_tokens": 512}, decode={"max_batch_size": 2})
    shared = plan.workload.requests
    prefill, decode = (plan.pool(p).workload.requests for p in ("prefill", "decode"))
    assert (prefill.max_num_batched_tokens, prefill.max_batch_size) == (512, shared.max_batch_size)
    assert (decode.max_num_batched_tokens, decode.max_batch_size) == (
        shared.max_num_batched_tokens,
        2,
    )
    assert prefill.decode is None and decode.prefill is None
    sim = DisaggregatedSim(plan, make_requests(plan))
    assert {(s.budget, s.max_seqs) for s in sim.prefill.schedulers} == {
        (512, shared.max_batch_size)
    }
    assert {(s.budget, s.max_seqs) for s in sim.decode.schedulers} == {
        (shared.max_num_batched_tokens, 2)
    }
    limited = simulate_serving(plan).metrics
    free = simulate_serving(_limited()).metrics
    assert free["decode_batch_size_p99"] > 2 >= limited["decode_batch_size_p99"]
    assert limited["completed_requests"] == LOADED["num"]
    assert limited["tpot_ms_p99"] > free["tpot_ms_p99"]  # decodes queue behind 2 slots


def test_pool_batch_limits_need_a_disaggregated_plan():
    with pytest.raises(PlanError, match="workload.requests.decode .* needs a disaggregated"):
        make_plan(DENSE, requests={"decode": {"max_batch_size": 8}})
    with pytest.raises(PlanError, match="max_batch_size"):
        _limited(decode={"max_batch_size": 0})


def test_check_names_the_pool_limit_it_questions():
    """A decode pool whose own max_batch_size exceeds the longest requests its KV cache holds:
    the finding is on workload.requests.decode.max_batch_size, and so is its fix."""
    plan = _limited(decode={"max_batch_size": 512}, num_gpu_blocks=2000, max_batch_size=8)
    findings = [f for f in audit(plan).findings if "max_batch_size" in f.node]
    assert [f.node for f in findings] == ["workload.requests.decode.max_batch_size"]
    assert "workload.requests.decode.max_batch_size" in findings[0].fix
    assert findings[0].message.startswith("decode pool: ")
    shared = make_plan(DENSE, requests={**LOADED, "num_gpu_blocks": 2000, "max_batch_size": 512},
                       parallel=pools(), hardware=TWO_GPUS)  # fmt: skip
    nodes = {f.node for f in audit(shared).findings if "max_batch_size" in f.node}
    assert nodes == {"workload.requests.max_batch_size"}

"""Claim kinds of issue 17: experts per EP group, modules per GPU, GPUs by formula, peak
bandwidth, the roofline bound, serving's communication share, relative claims; and the seed
plans' claims all decided. Expected values are worked out by hand in the comments."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clustersim.audit.checks import audit, modules_per_gpu
from clustersim.explore.compare import compare
from clustersim.run.evaluate import evaluate
from clustersim.spec import load_plan, plan_from_dict

SEEDS = Path(__file__).resolve().parent.parent / "configs" / "seeds"
PAIRS = [("000_current", "000_required"), ("001_current", "001_required")]
PAIRS += [("002_current", "002_required"), ("003_current", "003_required")]

MOE = {
    "num_layers": 4,
    "hidden_size": 512,
    "num_attention_heads": 8,
    "num_kv_heads": 4,
    "ffn_hidden_size": 1024,
    "vocab_size": 1000,
    "moe": {"num_experts": 8, "top_k": 2},
}


def plan(parallel: dict[str, Any], claims: dict[str, Any] | None = None, **extra):
    par = {"tp": 1, "pp": 1, "dp": 1, **parallel}
    world = par["tp"] * par["pp"] * par["dp"]
    data = {
        "model": extra.pop("model", MOE),
        "hardware": {"gpu": "H100-SXM", "num_nodes": max(1, -(-world // 8)), "gpus_per_node": 8},
        "parallel": par,
        "workload": extra.pop("workload", {"seq_len": {"dist": "fixed", "value": 256}}),
        "claims": claims or {},
    }
    return plan_from_dict(data, "test")


def nodes(report) -> dict[str, Any]:
    """The claim findings, by node."""
    return {f.node: f for f in report.findings if f.node.startswith("claims.")}


# ---- static claim kinds ------------------------------------------------------------------------
def test_experts_per_ep_group_and_total():
    # 8 experts x 4 MoE layers; PP 2: 2 MoE layers per stage -> an EP group holds 8 x 2 = 16.
    p = plan({"pp": 2, "dp": 4, "ep": 4}, {"experts_per_ep_group": 16, "total_experts": 32})
    assert not nodes(audit(p))
    wrong = nodes(audit(plan({"pp": 2, "dp": 4, "ep": 4}, {"experts_per_ep_group": 8})))
    assert wrong["claims.experts_per_ep_group"].computed == 16


def test_modules_per_gpu_definition():
    # PP 2, EP 4 of 8 experts: per GPU 2 layers x (1 attention + 2 experts) = 6, all equal.
    p = plan({"pp": 2, "dp": 4, "ep": 4})
    from clustersim.layout import Layout

    assert modules_per_gpu(p, Layout(p)) == [6.0] * 8
    ok = plan({"pp": 2, "dp": 4, "ep": 4}, {"modules_per_gpu": 6, "modules_per_gpu_variance": 0})
    assert not nodes(audit(ok))
    bad = nodes(audit(plan({"pp": 2, "dp": 4, "ep": 4}, {"modules_per_gpu": 2.5})))
    assert bad["claims.modules_per_gpu"].computed == 6


def test_gpus_by_formula_arithmetic_layout_and_coincidence():
    par = {"tp": 2, "pp": 2, "dp": 2, "ep": 4, "etp": 1}  # 8 GPUs
    # wrong arithmetic: EP 4 x TP 2 = 8, not 16
    f = nodes(audit(plan(par, {"gpus_by_formula": {"factors": ["ep", "tp"], "value": 16}})))
    assert (
        f["claims.gpus_by_formula"].computed == 8
        and "= 8, not 16" in f["claims.gpus_by_formula"].message
    )
    # right arithmetic, equal to the GPU count by coincidence: a warning
    f = nodes(audit(plan(par, {"gpus_by_formula": {"factors": ["ep", "tp"], "value": 8}})))
    assert f["claims.gpus_by_formula"].severity == "warning"
    # the right formula: nothing
    right = {"factors": ["tp", "pp", "dp"], "value": 8}
    assert "claims.gpus_by_formula" not in nodes(audit(plan(par, {"gpus_by_formula": right})))
    # seed 002: EP 16 x TP 4 = 64 is arithmetic, but the plan uses TP 4 x PP 4 x DP 2 = 32
    seed = nodes(audit(load_plan(SEEDS / "002_current.yaml")))["claims.gpus_by_formula"]
    assert (seed.severity, seed.claimed, seed.computed) == ("error", 64, 32)


def test_peak_bandwidth_against_the_preset():
    # H100-SXM: HBM 3350, NVLink 450, network 50 GB/s
    assert not nodes(audit(plan({"dp": 2}, {"peak_bandwidth_gbps": 3350})))
    ok = {"peak_bandwidth_gbps": 450, "peak_bandwidth_link": "intra_node"}
    assert not nodes(audit(plan({"dp": 2}, ok)))
    bad = {"peak_bandwidth_gbps": 1440, "peak_bandwidth_link": "intra_node"}
    f = nodes(audit(plan({"dp": 2}, bad)))["claims.peak_bandwidth_gbps"]
    assert f.computed == 450


# ---- bounds ------------------------------------------------------------------------------------
@settings(
    max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    st.sampled_from(
        [{"dp": 2}, {"tp": 2, "dp": 2, "ep": 2, "etp": 1}, {"pp": 2, "dp": 4, "ep": 4}, {"pp": 4}]
    ),
    st.sampled_from([128, 512, 2048]),
    st.integers(1, 4),
    st.sampled_from(["none", "full"]),
    st.booleans(),
)
def test_roofline_never_below_simulated(parallel, seq, mbs, recompute, dense):
    model = dict(MOE)
    if dense:
        model.pop("moe")
    par = {**parallel, "micro_batch_size": mbs, "recompute": recompute, "num_microbatches": 4}
    if dense:
        par.pop("ep", None), par.pop("etp", None)
    p = plan(par, model=model, workload={"seq_len": {"dist": "fixed", "value": seq}})
    m = evaluate(p).metrics
    bound = m["roofline_throughput_tokens_per_ms"]
    assert bound >= m["throughput_tokens_per_ms"]
    assert m["roofline_ratio_pct"] == pytest.approx(100 * m["throughput_tokens_per_ms"] / bound)


@settings(
    max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    st.sampled_from(["dense", "moe"]),
    st.sampled_from([2.0, 50.0, 1000.0]),
    st.sampled_from([4, 32, 256]),
    st.sampled_from([512, 4096]),
)
def test_serving_roofline_never_below_simulated(kind, rate, max_batch, budget):
    """Serving: the bound (peak FLOP/s, or one weight read per step of at most
    max_num_batched_tokens per replica and stage) is never below what the engine serves."""
    from serving_plans import DENSE
    from serving_plans import MOE as SERVING_MOE

    base = copy.deepcopy(DENSE if kind == "dense" else SERVING_MOE)
    base["workload"]["requests"].update(
        num=60, rate_per_s=rate, max_batch_size=max_batch, max_num_batched_tokens=budget
    )
    m = evaluate(plan_from_dict(base, "test")).metrics
    bound = m["roofline_throughput_tokens_per_ms"]
    assert bound >= m["throughput_tokens_per_ms"] > 0
    assert m["roofline_ratio_pct"] == pytest.approx(100 * m["throughput_tokens_per_ms"] / bound)


# ---- simulated and relative claims on the seeds ------------------------------------------------
SEED_NAMES = sorted(p.stem for p in SEEDS.glob("*.yaml"))


@pytest.fixture(scope="module")
def checked():
    return {name: evaluate(load_plan(SEEDS / f"{name}.yaml")) for name in SEED_NAMES}


@pytest.mark.parametrize("name", SEED_NAMES)
def test_check_decides_every_claim_but_relative_ones(checked, name):
    left = [u for u in checked[name].unchecked if u.startswith("claims.")]
    assert all(u.startswith("claims.relative.") for u in left), left


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0][:3])
def test_compare_decides_every_claim_of_both_plans(pair):
    result = compare([load_plan(SEEDS / f"{n}.yaml") for n in pair])
    for verdict in result.results:
        assert not [u for u in verdict.unchecked if u.startswith("claims.")]


def test_seed_001_relative_claims(checked):
    # check: the claims needing a baseline are undecided; the others are judged.
    assert set(checked["001_required"].unchecked) == {
        "claims.relative.latency_change_pct",
        "claims.relative.throughput_ratio",
    }
    pair = [load_plan(SEEDS / "001_current.yaml"), load_plan(SEEDS / "001_required.yaml")]
    result = compare(pair)
    cur, req = result.results
    found = nodes(req.report)
    lat = 100 * (req.metrics["latency_ms"] / cur.metrics["latency_ms"] - 1)
    assert found["claims.relative.latency_change_pct"].computed == pytest.approx(lat, abs=1e-3)
    assert lat > 0  # the review's "-75 %" is a latency increase
    ratio = req.metrics["throughput_tokens_per_ms"] / cur.metrics["throughput_tokens_per_ms"]
    assert found["claims.relative.throughput_ratio"].computed == pytest.approx(ratio, abs=1e-3)
    # "> 90 % per GPU" fails; "100 % of the experts active" holds
    assert "claims.relative.gpu_utilization_pct_min_per_gpu" in found
    assert "claims.relative.expert_utilization_pct" not in found
    assert req.metrics["expert_utilization_pct"] == 100


def test_serving_reports_its_communication_share(checked):
    m = checked["004_current"].metrics
    assert 0 < m["comm_step_share_pct"] < 100
    # comm / (compute + comm) and comm / compute describe the same split of step time
    share, ratio = m["comm_step_share_pct"] / 100, m["comm_to_compute_pct"] / 100
    assert share == pytest.approx(ratio / (1 + ratio))
    # the theoretical 12,000 tokens/ms is held against the roofline bound
    roof = nodes(checked["004_current"].report)["claims.roofline_throughput_tokens_per_ms"]
    assert roof.claimed == 12000 and roof.computed < 12000

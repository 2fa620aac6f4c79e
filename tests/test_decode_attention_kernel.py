"""Per-query-head decode attention (``workload.requests.decode_attention: per_head``): the K/V
head of a GQA group is read once per query head, the re-reads from L2 at
``attention.decode_l2_gbps`` (costs/kernels.py ``decode_kv_ms_per_byte``, costs/serving.py
``decode_kv_rereads``), checked against hand-computed cases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_plans import DENSE, make_plan

from clustersim.calibration.sets_serving import SERVING_MODELS
from clustersim.costs.kernels import KernelTimer
from clustersim.costs.serving import core_attention_ms, decode_kv_rereads, step_costs
from clustersim.layout import Layout
from clustersim.spec.schema import ModelSpec

# Config.json values as the serving validation set writes them (meta-llama/Llama-2-70b-hf:
# 64 query heads, 8 K/V heads, head size 128; tiiuae/falcon-180B: 232 query heads, 8 K/V
# heads, head size 64).
LLAMA_70B = SERVING_MODELS["Llama-2-70B"]
FALCON_180B = SERVING_MODELS["Falcon 180B"]

GQA_PLAN = {
    **DENSE,
    "model": LLAMA_70B,
    "hardware": {"gpu": "H100-SXM", "num_nodes": 1, "gpus_per_node": 4},
    "parallel": {"tp": 4, "pp": 1, "dp": 1},
}


@pytest.mark.parametrize(
    ("model", "tp", "want"),
    [
        (LLAMA_70B, 1, 8.0),  # 64 / 8
        (LLAMA_70B, 4, 8.0),  # 16 query heads over 2 K/V heads
        (LLAMA_70B, 8, 8.0),  # 8 over 1
        (LLAMA_70B, 16, 4.0),  # 4 query heads, still one whole K/V head (replicated)
        (FALCON_180B, 8, 29.0),  # 29 query heads over 1 K/V head
        (FALCON_180B, 4, 29.0),  # 58 over 2
    ],
)
def test_per_head_kernel_rereads_each_kv_head_once_per_query_head(model, tp, want):
    spec = ModelSpec.model_validate(model)
    assert decode_kv_rereads(spec, tp, "per_head") == pytest.approx(want)
    assert decode_kv_rereads(spec, tp, "grouped") == 1.0


def test_mha_and_mla_are_read_once_by_any_kernel():
    mha = ModelSpec.model_validate({**LLAMA_70B, "num_kv_heads": 64})
    assert decode_kv_rereads(mha, 4, "per_head") == 1.0
    mla = ModelSpec.model_validate(
        {
            **LLAMA_70B,
            "num_kv_heads": None,
            "mla": {
                "kv_lora_rank": 512,
                "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64,
                "v_head_dim": 128,
            },
        }
    )
    assert decode_kv_rereads(mla, 1, "per_head") == 1.0


def _timer(l2_gbps: float | None, decode_eff: float = 1.0) -> KernelTimer:
    att = {"decode_memory_efficiency": decode_eff, "decode_l2_gbps": l2_gbps}
    plan = make_plan(GQA_PLAN, hardware={"calibration": {"attention": att}})
    return KernelTimer(plan.model, plan.hardware, tp=4, training=False)


def test_decode_kv_time_per_byte_is_the_slower_of_hbm_and_l2_rereads():
    # H100-SXM: 3,350 GB/s of HBM; at 90 % one byte takes 1 / 3.015e12 s. Eight reads at
    # 5,000 GB/s of L2 take 8 / 5e12 s per byte: 1.6e-12 s > 0.332e-12 s.
    t = _timer(5000.0, decode_eff=0.9)
    hbm_ms = 1e3 / (3350e9 * 0.9)
    assert t.kv_ms_per_byte == pytest.approx(hbm_ms)
    assert t.decode_kv_ms_per_byte(1.0) == pytest.approx(hbm_ms)  # grouped: HBM only
    assert t.decode_kv_ms_per_byte(8.0) == pytest.approx(8 * 1e3 / 5000e9)
    # one re-read more than HBM can feed, not L2: 1.2 reads at 5,000 GB/s < 1 read at 3,015
    assert t.decode_kv_ms_per_byte(1.2) == pytest.approx(hbm_ms)
    # no L2 rate calibrated (null): no L2 bound
    assert _timer(None).decode_kv_ms_per_byte(29.0) == pytest.approx(1e3 / 3350e9)


@pytest.mark.parametrize(("batch", "context"), [(1, 128), (64, 2048), (480, 1152)])
def test_per_head_decode_attention_reads_kv_once_per_query_head(batch, context):
    """One decode step of LLaMA-70B on TP 4 (16 query heads, 2 K/V heads per GPU): the core
    attention of one layer is the KV cache (batch x context tokens x 2 heads x 128 x 2
    (K, V) x 2 bytes) read 8 times at the L2 rate, plus the queries and outputs, when that
    is longer than the FLOPs."""
    l2 = 4000.0
    cal = {"attention": {"decode_l2_gbps": l2}}
    grouped = make_plan(GQA_PLAN, hardware={"calibration": cal})
    per_head = make_plan(
        GQA_PLAN, hardware={"calibration": cal}, requests={"decode_attention": "per_head"}
    )
    times = {}
    for name, plan in (("grouped", grouped), ("per_head", per_head)):
        costs = step_costs(plan, Layout(plan))
        parts = costs.parts(float(batch), float(batch))
        pairs = kv = float(batch * context)
        times[name] = core_attention_ms(parts, pairs, kv, float(batch), costs)
        assert costs.attn_bytes_per_kv_token == 2 * 128 * 2 * 2  # two K/V heads per GPU
    kv_bytes = batch * context * 1024.0 + batch * 16 * 256 * 2  # + queries and outputs
    k = step_costs(per_head, Layout(per_head)).graph
    read_ms = 8 * kv_bytes / (l2 * 1e9) * 1e3
    flops_ms = batch * context * 2 * 16 * 256 / (k._attn_flop_s) * 1e3
    if read_ms > flops_ms:
        want = read_ms + k.fixed_ms + k.gap_ms
        assert times["per_head"] == pytest.approx(want, rel=1e-6)
    assert times["per_head"] >= times["grouped"]
    assert times["per_head"] > 2 * times["grouped"] or batch * context < 1000


def test_per_head_does_not_change_prefill_or_mha_models():
    cal = {"attention": {"decode_l2_gbps": 3000.0}}
    base = make_plan(GQA_PLAN, hardware={"calibration": cal})
    per_head = make_plan(
        GQA_PLAN, hardware={"calibration": cal}, requests={"decode_attention": "per_head"}
    )
    a = step_costs(base, Layout(base)).parts(2048.0, 1.0)  # a prefill step: flash kernel
    b = step_costs(per_head, Layout(per_head)).parts(2048.0, 1.0)
    assert a == b
    mha = {**LLAMA_70B, "num_kv_heads": 64}
    c = make_plan(GQA_PLAN, model=mha, hardware={"calibration": cal})
    d = make_plan(
        GQA_PLAN,
        model=mha,
        hardware={"calibration": cal},
        requests={"decode_attention": "per_head"},
    )
    assert step_costs(c, Layout(c)).parts(64.0, 64.0) == step_costs(d, Layout(d)).parts(64.0, 64.0)


def test_the_l2_rate_goes_to_the_generations_it_was_measured_on():
    from clustersim.calibration.calibrate import GenerationResult, apply_end_to_end

    results = [
        GenerationResult(g, {"kernel": {}, "attention": {}})
        for g in ("a100", "h100", "h200", "h800", "b200")
    ]
    apply_end_to_end(results, {"kernel.launch_us": 8.0, "attention.decode_l2_gbps": 5000.0})
    for r in results:
        assert r.data["kernel"]["launch_us"] == 8.0  # host costs: every generation
        has_l2 = "decode_l2_gbps" in r.data["attention"]
        assert has_l2 == (r.generation != "b200"), r.generation


def test_only_gqa_decode_rows_of_the_per_head_engine_fit_the_l2_rate():
    from clustersim.calibration.sets_serving import DECODE_L2, serving_rows

    rows, _ = serving_rows()
    fitting = {r.row_id for r in rows if r.param == DECODE_L2}
    assert all(r.fits for r in rows if r.param == DECODE_L2)
    # TensorRT-LLM v0.6.1 peak-throughput rows of LLaMA-70B and Falcon-180B (GQA), H100 FP8
    # and A100 FP16; never GPT-J / LLaMA-7B (MHA) nor the first-token (prefill) rows
    assert fitting == {f"S00{n}" for n in (*range(61, 69), *range(77, 82))}


@settings(max_examples=40, deadline=None)
@given(
    kv_heads=st.sampled_from([1, 2, 4, 8, 64]),
    tp=st.sampled_from([1, 2, 4, 8]),
    batch=st.integers(1, 512),
    context=st.integers(1, 32768),
    l2_gbps=st.floats(500.0, 20000.0),
)
def test_per_head_decode_is_never_faster_and_equal_without_sharing(
    kv_heads, tp, batch, context, l2_gbps
):
    """Whatever the GQA ratio, TP, batch, context and L2 rate: a per-head kernel's decode
    attention is never faster than a grouped kernel's, and exactly as fast when each GPU holds
    one query head per K/V head (MHA) or the re-reads are cheaper than one HBM read."""
    cal = {"attention": {"decode_l2_gbps": l2_gbps}}
    model = {**LLAMA_70B, "num_kv_heads": kv_heads}
    hw = {"calibration": cal, "gpus_per_node": tp}
    par = {"tp": tp}
    out = {}
    for kernel in ("grouped", "per_head"):
        plan = make_plan(
            GQA_PLAN, model=model, hardware=hw, parallel=par, requests={"decode_attention": kernel}
        )
        costs = step_costs(plan, Layout(plan))
        parts = costs.parts(float(batch), float(batch))
        kv = float(batch * context)
        out[kernel] = (core_attention_ms(parts, kv, kv, float(batch), costs), costs)
    grouped, per_head = out["grouped"][0], out["per_head"][0]
    assert per_head >= grouped
    rereads = out["per_head"][1].kv_rereads
    k = out["per_head"][1].graph
    if rereads == 1.0 or rereads / (l2_gbps * 1e9) <= 1.0 / k._kv_byte_s:
        assert per_head == grouped

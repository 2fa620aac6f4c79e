"""Memory per GPU against hand computations written out here (never the code's own output).

Symbols: s sequence, b micro-batch, h hidden, a heads, t TP, p PP, m micro-batches, V vocab.
GPT-1.7B (Narayanan Table 1): a=24, h=2304, L=24, V=51200, tied embeddings, GeLU ffn=4h.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustersim.costs.memory import (
    GIB,
    MemoryReport,
    kv_cache_bytes,
    layer_activation_bytes,
    memory_per_gpu,
)
from clustersim.layout import Layout
from clustersim.spec import Plan, plan_from_dict

MIB = 2**20
H, A, L, V = 2304, 24, 24, 51200  # gpt-1.7b
GPT_PARAMS = 12 * L * H**2 + 2 * L * H + V * H + H  # tied, p = 1 (see test_params.py)

BASE: dict[str, Any] = {
    "model": {"preset": "gpt-1.7b"},
    "hardware": {"gpu": "A100-80GB", "num_nodes": 4, "gpus_per_node": 8},
    "parallel": {"tp": 1, "pp": 1, "dp": 1},
    "workload": {"mode": "training", "seq_len": {"dist": "fixed", "value": 2048}},
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def make_plan(model: str = "gpt-1.7b", **sections: Any) -> Plan:
    """A plan from BASE with ``model`` preset; keyword sections (``parallel={...}``) merge in.
    ``model_fields={...}`` overrides model fields."""
    raw = _merge(BASE, {"model": {"preset": model, **sections.pop("model_fields", {})}})
    return plan_from_dict(_merge(raw, sections), "test")


def report(plan: Plan) -> MemoryReport:
    """The memory report of ``plan``."""
    return memory_per_gpu(plan, Layout(plan))


def stage_bytes(plan: Plan, field: str) -> list[float]:
    """One field of every stage, in bytes."""
    return [getattr(stage, field) * GIB for stage in report(plan).stages]


# ---- activations per layer: Korthikanti et al. 2022, Table 2 ------------------------------

KORTHIKANTI_ROWS = [
    # (sequence_parallel, flash_attention, recompute, bytes per layer / sbh as f(a, s, h, t))
    (False, False, "none", lambda a, s, h, t: 10 + 24 / t + 5 * a * s / (h * t)),
    (True, False, "none", lambda a, s, h, t: 34 / t + 5 * a * s / (h * t)),
    (False, False, "selective", lambda a, s, h, t: 10 + 24 / t),
    (True, False, "selective", lambda a, s, h, t: 34 / t),
    (False, False, "full", lambda a, s, h, t: 2),
    (True, False, "full", lambda a, s, h, t: 2 / t),
    # flash attention stores no s^2 scores: same as selective recompute
    (False, True, "none", lambda a, s, h, t: 10 + 24 / t),
    (True, True, "none", lambda a, s, h, t: 34 / t),
]


@pytest.mark.parametrize(("sp", "flash", "recompute", "per_sbh"), KORTHIKANTI_ROWS)
@pytest.mark.parametrize(
    ("preset", "a", "h", "t"),
    [
        ("gpt-1.7b", 24, 2304, 1),
        ("gpt-1.7b", 24, 2304, 2),
        ("gpt-18.4b", 48, 6144, 8),
        ("gpt-145.6b", 96, 12288, 8),
    ],
)
def test_layer_activations_match_korthikanti_table2(
    sp: bool, flash: bool, recompute: str, per_sbh: Any, preset: str, a: int, h: int, t: int
) -> None:
    s, b = 2048, 2
    par = {"tp": t, "sequence_parallel": sp, "flash_attention": flash, "recompute": recompute}
    plan = make_plan(preset, parallel=par)
    expected = s * b * h * per_sbh(a, s, h, t)
    got = layer_activation_bytes(plan.model, plan.parallel, 0, s, b)
    assert got == pytest.approx(expected, rel=0.01)


def test_layer_activations_of_an_moe_layer_by_hand() -> None:
    """Mixtral: h 4096, 32 heads, 8 KV heads of 128, SwiGLU ffn 14336, top-2."""
    s, b, h, t, k, ffn = 4096, 1, 4096, 2, 2, 14336
    sbh = s * b * h
    attention = 2 * s * b * 128 * (2 * 32 / t + 2 * 8 / t)  # Q, O-input 16 heads; K, V 4 heads
    with_sp = make_plan(
        "mixtral-8x7b", parallel={"tp": t, "dp": 4, "ep": 8, "etp": 1, "sequence_parallel": True}
    )
    # SP: replicated (7 + 3k) sbh / t; experts k * 6 * s*b*ffn / t (tokens split over t)
    expected_sp = (7 + 3 * k) * sbh / t + attention + k * 6 * s * b * ffn / t
    got = layer_activation_bytes(with_sp.model, with_sp.parallel, 0, s, b)
    assert got == pytest.approx(expected_sp, rel=1e-9)
    # no SP, etp 1: replicated not divided; the expert intermediate divides by etp = 1
    no_sp = make_plan("mixtral-8x7b", parallel={"tp": t, "dp": 4, "ep": 8, "etp": 1})
    expected_no_sp = (7 + 3 * k) * sbh + attention + k * 6 * s * b * ffn
    got = layer_activation_bytes(no_sp.model, no_sp.parallel, 0, s, b)
    assert got == pytest.approx(expected_no_sp, rel=1e-9)


# ---- activations per stage: schedules ----------------------------------------------------

S, T = 2048, 2
SBH = S * 1 * H
PER_LAYER = 34 * SBH / T  # SP + selective recompute
EMBEDDING = 2 * SBH / T  # per in-flight micro-batch, first stage
LOGITS = 4 * SBH / T + 4 * S * V / T  # last stage, one micro-batch


def sp_plan(**parallel: Any) -> Plan:
    """gpt-1.7b, t=2 with SP and selective recompute, s=2048, b=1."""
    par = {"tp": T, "sequence_parallel": True, "recompute": "selective", **parallel}
    return make_plan(parallel=par)


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_1f1b_first_stage_holds_all_layers_whatever_p(p: int) -> None:
    acts = stage_bytes(sp_plan(pp=p, num_microbatches=16), "activations_gib")
    # p micro-batches x L/p layers = L layers, plus p embedding outputs (and logits if p = 1)
    expected = L * PER_LAYER + p * EMBEDDING + (LOGITS if p == 1 else 0)
    assert acts[0] == pytest.approx(expected, rel=1e-9)


def test_1f1b_stage_i_holds_p_minus_i_and_at_most_m() -> None:
    acts = stage_bytes(sp_plan(pp=4, num_microbatches=16), "activations_gib")
    assert acts[1] == pytest.approx(3 * 6 * PER_LAYER, rel=1e-9)
    assert acts[3] == pytest.approx(1 * 6 * PER_LAYER + LOGITS, rel=1e-9)
    few = stage_bytes(sp_plan(pp=4, num_microbatches=2), "activations_gib")
    assert few[0] == pytest.approx(2 * 6 * PER_LAYER + 2 * EMBEDDING, rel=1e-9)


def test_gpipe_holds_all_m_microbatches() -> None:
    acts = stage_bytes(sp_plan(pp=4, num_microbatches=8, schedule="gpipe"), "activations_gib")
    assert acts[1] == pytest.approx(8 * 6 * PER_LAYER, rel=1e-9)
    assert acts[0] == pytest.approx(8 * 6 * PER_LAYER + 8 * EMBEDDING, rel=1e-9)
    assert acts[3] == pytest.approx(8 * 6 * PER_LAYER + 8 * LOGITS, rel=1e-9)


def test_interleaved_first_stage_factor() -> None:
    p, v = 4, 3
    plan = sp_plan(pp=p, num_microbatches=8, schedule="interleaved", virtual_stages=v)
    acts = stage_bytes(plan, "activations_gib")
    inflight = p * (1 + (p - 1) / (p * v))  # = 5 micro-batches of the stage's 6 layers
    assert acts[0] == pytest.approx(inflight * (6 * PER_LAYER + EMBEDDING), rel=1e-9)
    # last stage: (v-1)*p + 1 = 9 chunk micro-batches of 2 layers = 3 of the stage's 6 layers
    assert acts[3] == pytest.approx(3 * 6 * PER_LAYER + LOGITS, rel=1e-9)


def test_context_parallel_divides_the_sequence() -> None:
    acts = stage_bytes(sp_plan(cp=2, num_microbatches=4), "activations_gib")
    assert acts[0] == pytest.approx((L * PER_LAYER + EMBEDDING + LOGITS) / 2, rel=1e-9)


# ---- parameters, gradients, optimizer ----------------------------------------------------


def training_bytes(plan: Plan) -> float:
    """Params + grads + optimizer of the peak stage, in bytes."""
    r = report(plan)
    return (r.params_gib + r.grads_gib + r.optimizer_gib) * GIB


@pytest.mark.parametrize(
    ("dtype", "plain", "weights_grads", "optimizer"),
    [
        ("bf16", 18, 6, 12),
        ("fp16", 20, 4, 16),
        ("fp32", 16, 8, 8),
    ],
)
def test_bytes_per_param(dtype: str, plain: int, weights_grads: int, optimizer: int) -> None:
    fields = {"dtype": dtype}
    plan = make_plan(model_fields=fields, parallel={"dp": 8})
    assert training_bytes(plan) == pytest.approx(plain * GPT_PARAMS, rel=1e-12)
    dist = make_plan(model_fields=fields, parallel={"dp": 8, "distributed_optimizer": True})
    assert training_bytes(dist) == pytest.approx((weights_grads + optimizer / 8) * GPT_PARAMS)
    # the optimizer is sharded over DP x CP
    cp = make_plan(model_fields=fields, parallel={"dp": 4, "cp": 2, "distributed_optimizer": True})
    assert training_bytes(cp) == pytest.approx((weights_grads + optimizer / 8) * GPT_PARAMS)


def mixtral_split(t: int, etp: int, ep: int) -> tuple[float, float]:
    """Mixtral-8x7B with p = 1, by hand: (dense + replicated params per GPU, experts per GPU)."""
    h, layers, vocab, ffn = 4096, 32, 32000, 14336
    attention = h * 128 * (2 * 32 + 2 * 8)  # 41,943,040; K/V shard over min(t, 8) = t here
    replicated = layers * (2 * h + h * 8) + h  # norms, router, final norm
    dense = (layers * attention + 2 * vocab * h) / t + replicated
    experts = layers * 8 * 3 * h * ffn / (etp * ep)
    return dense, experts


@pytest.mark.parametrize(("t", "dp", "ep", "etp", "edp"), [(2, 4, 4, 1, 2), (2, 4, 4, 2, 1)])
def test_expert_params_divide_by_etp_ep_and_optimizer_by_edp(
    t: int, dp: int, ep: int, etp: int, edp: int
) -> None:
    par = {"tp": t, "dp": dp, "ep": ep, "etp": etp, "distributed_optimizer": True}
    r = report(make_plan("mixtral-8x7b", parallel=par))
    dense, experts = mixtral_split(t, etp, ep)
    assert r.params_gib * GIB == pytest.approx(2 * (dense + experts), rel=1e-12)
    assert r.grads_gib * GIB == pytest.approx(4 * (dense + experts), rel=1e-12)
    assert r.optimizer_gib * GIB == pytest.approx(12 * dense / dp + 12 * experts / edp, rel=1e-12)


@pytest.mark.parametrize(("t", "kv_shards"), [(8, 8), (16, 8)])
def test_gqa_kv_projections_replicate_when_tp_exceeds_kv_heads(t: int, kv_shards: int) -> None:
    """Mixtral has 8 KV heads: beyond t = 8 every GPU keeps one K/V head (K/V weights / 8)."""
    h, layers, vocab = 4096, 32, 32000
    q_o, k_v = 2 * h * 128 * 32, 2 * h * 128 * 8
    replicated = layers * (2 * h + h * 8) + h
    expected = (
        layers * (q_o / t + k_v / kv_shards)
        + 2 * vocab * h / t
        + replicated
        + layers * 8 * 3 * h * 14336 / t  # experts, etp = t, ep = 1
    )
    params = stage_bytes(make_plan("mixtral-8x7b", parallel={"tp": t}), "params_gib")[0] / 2
    assert params == pytest.approx(expected, rel=1e-12)


def test_embedding_on_first_stage_output_on_last() -> None:
    h, vocab = 4096, 32000
    params = [
        x / 2 for x in stage_bytes(make_plan("mixtral-8x7b", parallel={"pp": 4}), "params_gib")
    ]
    assert params[0] - params[1] == pytest.approx(vocab * h)
    assert params[3] - params[1] == pytest.approx(vocab * h + h)  # output layer + final norm
    assert params[2] == pytest.approx(params[1])


def test_tied_embedding_copy_on_last_stage_only_when_pipelined() -> None:
    one = stage_bytes(make_plan(), "params_gib")
    assert one[0] / 2 == pytest.approx(GPT_PARAMS)  # one copy of V*h
    two = [x / 2 for x in stage_bytes(make_plan(parallel={"pp": 2}), "params_gib")]
    half = 12 * (12 * H**2 + 2 * H)
    assert two[0] == pytest.approx(half + V * H)
    assert two[1] == pytest.approx(half + V * H + H)


# ---- inference: KV cache -----------------------------------------------------------------

INFERENCE = {
    "mode": "inference",
    "requests": {
        "prompt_len": {"dist": "fixed", "value": 1000},
        "output_len": {"dist": "fixed", "value": 24},
        "max_batch_size": 16,
    },
}


@pytest.mark.parametrize(("t", "kv_heads_per_gpu"), [(1, 4), (2, 2), (4, 1), (8, 1)])
def test_kv_cache_gqa_closed_form(t: int, kv_heads_per_gpu: int) -> None:
    """Qwen3-30B-A3B: 48 layers, 4 KV heads of 128; S = 1000 + 24, B = 16, bf16, p = 2. The
    cache a full batch of the longest requests needs (the capacity the memory leaves is
    tested in test_serving_memory.py)."""
    plan = make_plan("qwen3-30b-a3b", parallel={"tp": t, "pp": 2}, workload=INFERENCE)
    layout = Layout(plan)
    kv = [kv_cache_bytes(plan, layout, stage) for stage in range(2)]
    expected = 2 * 24 * kv_heads_per_gpu * 128 * 1024 * 16 * 2
    assert kv == pytest.approx([expected, expected], rel=1e-12)
    r = report(plan)
    assert r.grads_gib == r.optimizer_gib == 0.0
    assert r.seq_len_tokens == 1024


@pytest.mark.parametrize("t", [1, 8])
def test_kv_cache_mla_is_latent_and_not_tp_sharded(t: int) -> None:
    plan = make_plan("deepseek-v3", parallel={"tp": t}, workload=INFERENCE)
    expected = 61 * (512 + 64) * 1024 * 16 * 2
    assert kv_cache_bytes(plan, Layout(plan), 0) == pytest.approx(expected, rel=1e-12)


def test_inference_holds_weights_only() -> None:
    plan = make_plan(parallel={"dp": 8}, workload=INFERENCE)
    assert report(plan).params_gib * GIB == pytest.approx(2 * GPT_PARAMS)
    assert report(plan).buffers_gib == 0.0  # dense: no all-to-all, no gradient buckets


def test_training_has_no_kv_cache() -> None:
    assert report(make_plan()).kv_cache_gib == 0.0


# ---- buffers, peak, fits, contract -------------------------------------------------------


def test_buffers_grad_buckets_and_all_to_all() -> None:
    assert report(make_plan()).buffers_gib == 0.0  # dp = 1: nothing to reduce
    assert report(make_plan(parallel={"dp": 2})).buffers_gib * GIB == 2 * 40 * MIB
    par = {"tp": 2, "dp": 4, "ep": 8, "etp": 1, "sequence_parallel": True}
    plan = make_plan("mixtral-8x7b", parallel=par, workload={"seq_len": {"value": 4096}})
    a2a = 2 * (4096 / 2) * 2 * 4096 * 2  # dispatch + combine of s*b/t tokens, top-2, bf16
    assert report(plan).buffers_gib * GIB == pytest.approx(2 * 40 * MIB + a2a)


def test_peak_capacity_and_fits() -> None:
    plan = make_plan(hardware={"memory_reserved_gib": 2}, parallel={"pp": 2})
    r = report(plan)
    assert r.capacity_gib == 78
    assert r.memory_per_gpu_gib == max(stage.total_gib for stage in r.stages)
    assert r.stages[r.peak_stage].total_gib == r.memory_per_gpu_gib
    assert r.fits
    too_big = report(make_plan("gpt-145.6b"))  # 145.6B x 18 bytes on one GPU
    assert too_big.memory_per_gpu_gib > 145e9 * 18 / GIB
    assert not too_big.fits


def test_to_dict_has_the_contract_keys() -> None:
    out = report(make_plan(parallel={"pp": 2})).to_dict()
    for key in (
        "memory_per_gpu_gib",
        "params_gib",
        "grads_gib",
        "optimizer_gib",
        "activations_gib",
        "kv_cache_gib",
        "buffers_gib",
        "fits",
        "peak_stage",
        "capacity_gib",
    ):
        assert key in out
    assert len(out["stages"]) == 2
    assert out["stages"][0]["inflight_microbatches"] == 1  # m = 1


# ---- properties --------------------------------------------------------------------------

MODELS = {  # preset: (TP degrees dividing the heads, PP degrees dividing the layers)
    "gpt-1.7b": ([1, 2, 4, 8], [1, 2, 3, 4, 6, 8]),
    "mixtral-8x7b": ([1, 2, 4, 8, 16], [1, 2, 4, 8]),
}


def max_params_gib(model: str, tp: int, pp: int) -> float:
    """The largest params_gib over the stages."""
    return max(s.params_gib for s in report(make_plan(model, parallel={"tp": tp, "pp": pp})).stages)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(MODELS)), st.data())
def test_more_tp_or_pp_never_increases_params_per_gpu(model: str, data: Any) -> None:
    tps, pps = MODELS[model]
    t1, t2 = sorted(data.draw(st.lists(st.sampled_from(tps), min_size=2, max_size=2)))
    p1, p2 = sorted(data.draw(st.lists(st.sampled_from(pps), min_size=2, max_size=2)))
    base = max_params_gib(model, t1, p1)
    assert max_params_gib(model, t2, p1) <= base * (1 + 1e-12)
    assert max_params_gib(model, t1, p2) <= base * (1 + 1e-12)


@settings(max_examples=40, deadline=None)
@given(
    model=st.sampled_from(sorted(MODELS)),
    seq=st.sampled_from([128, 1000, 4096, 8192]),
    batch=st.integers(1, 4),
    tp=st.sampled_from([1, 2, 4, 8]),
    pp=st.sampled_from([1, 2, 4]),
    m=st.integers(1, 16),
    schedule=st.sampled_from(["gpipe", "1f1b"]),
    sp=st.booleans(),
    flash=st.booleans(),
)
def test_full_le_selective_le_no_recompute(
    model: str,
    seq: int,
    batch: int,
    tp: int,
    pp: int,
    m: int,
    schedule: str,
    sp: bool,
    flash: bool,
) -> None:
    def acts(recompute: str) -> list[float]:
        par = {
            "tp": tp,
            "pp": pp,
            "num_microbatches": m,
            "micro_batch_size": batch,
            "schedule": schedule,
            "sequence_parallel": sp,
            "flash_attention": flash,
            "recompute": recompute,
        }
        plan = make_plan(model, parallel=par, workload={"seq_len": {"value": seq}})
        return [s.activations_gib for s in report(plan).stages]

    full, selective, none = acts("full"), acts("selective"), acts("none")
    for f, s_, n in zip(full, selective, none, strict=True):
        assert f <= s_ * (1 + 1e-12)
        assert s_ <= n * (1 + 1e-12)


# ---- published large-model runs that ran: the plan must fit 80 GiB per GPU ---------------


def published_plan(model: dict[str, Any], gpu: str, gpus: int, seq: int, **par: Any) -> Plan:
    """A training plan of a published run on nodes of 8 GPUs."""
    return plan_from_dict(
        {
            "name": "published",
            "model": model,
            "hardware": {"gpu": gpu, "num_nodes": gpus // 8, "gpus_per_node": 8},
            "parallel": par,
            "workload": {"mode": "training", "seq_len": {"value": seq}},
        },
        "test",
    )


# Narayanan et al. 2021 (SC21), Table 1: GPT models on A100-80GB, seq 2048, vocabulary 51,200,
# fp16 mixed precision, full activation recomputation (their Sec. 3.5), no sequence
# parallelism or flash attention (2021), no distributed optimizer; micro-batch 1 (not in the
# table; the large-model runs use 1). Columns: preset, TP, PP, GPUs, global batch; DP = GPUs /
# (TP x PP), micro-batches = batch / DP. Schedule not in the table: 1F1B and the interleaved
# schedule with the smallest v >= 2 dividing the layers per stage must both fit.
NARAYANAN_TABLE1 = [
    # preset, TP, PP, GPUs, global batch, v (interleaved), hidden, layers
    ("gpt-145.6b", 8, 8, 1536, 2304, 2, 12288, 80),  # 10 layers per stage
    ("gpt-310.1b", 8, 16, 1920, 2160, 2, 16384, 96),  # 6 per stage
    ("gpt-529.6b", 8, 35, 2520, 2520, 3, 20480, 105),  # 3 per stage
    ("gpt-1t", 8, 64, 3072, 3072, 2, 25600, 128),  # 2 per stage
]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(
    ("preset", "t", "p", "gpus", "batch", "v", "h", "layers"), NARAYANAN_TABLE1
)
def test_narayanan_2021_table1_runs_fit_a100_80gb(
    preset: str,
    t: int,
    p: int,
    gpus: int,
    batch: int,
    v: int,
    h: int,
    layers: int,
    interleaved: bool,
) -> None:
    d = gpus // (t * p)
    schedule = {"schedule": "interleaved", "virtual_stages": v} if interleaved else {}
    plan = published_plan(
        {"preset": preset, "dtype": "fp16"},
        "A100-80GB",
        gpus,
        2048,
        tp=t,
        pp=p,
        dp=d,
        num_microbatches=batch // d,
        recompute="full",
        flash_attention=False,
        **schedule,
    )
    r = report(plan)
    assert r.memory_per_gpu_gib < 80, r.peak
    # Full recompute keeps each layer's input, 2sbh (b = 1, no SP), and stage 0 the embedding
    # output, per micro-batch in flight: p (1F1B), or (2(p-1) + (v-1)p + 1) / v (interleaved).
    inflight = (2 * (p - 1) + (v - 1) * p + 1) / v if interleaved else p
    expected = inflight * (layers // p + 1) * 2 * 2048 * h
    assert r.stages[0].activations_gib * GIB == pytest.approx(expected, rel=1e-9)


# MoE Parallel Folding (Liu et al. 2025, arXiv:2504.14960), Table 1 / Appendix Table 3: best
# configuration per method on H100-80GB, seq 4096, global batch 256, BF16, token-drop with
# capacity factor 1.0. What the paper leaves open is taken from the same authors' Megatron-MoE-
# ModelZoo benchmarking config (Mixtral-8x22B.yaml, runtime.conf): micro-batch 1, no activation
# recompute flags, flash attention, sequence parallel, distributed optimizer, untied
# embeddings, Llama-2 tokenizer (vocabulary 32,000), 1F1B. A blank ETP is Megatron's default
# (ETP = TP) except where only ETP 1 can fold (Llama3-8x70B with folding: EP 8 x TP 8 does not
# divide the 16 ranks of a stage).
MIXTRAL_8X22B = {
    "preset": "mixtral-8x22b",
    "vocab_size": 32000,
    "moe": {"num_experts": 8, "top_k": 2, "capacity_factor": 1.0},
}
# Qwen/Qwen2-57B-A14B config.json.
QWEN2_57B = {
    "name": "qwen2-57b-a14b",
    "num_layers": 28,
    "hidden_size": 3584,
    "num_attention_heads": 28,
    "num_kv_heads": 4,
    "ffn_hidden_size": 2560,
    "vocab_size": 151936,
    "moe": {
        "num_experts": 64,
        "top_k": 8,
        "capacity_factor": 1.0,
        "num_shared_experts": 1,
        "shared_expert_ffn_hidden_size": 20480,
    },
}
# Mixtral-8x22B fine-grained-upcycled to 64 experts of 1/8 width, top-8 (paper Sec. 4.1).
MIXTRAL_G8T8 = {
    **MIXTRAL_8X22B,
    "ffn_hidden_size": 2048,
    "moe": {"num_experts": 64, "top_k": 8, "capacity_factor": 1.0},
}
# Llama3-70B upcycled to 8 experts (Sec. 4.1); top-k not stated: top-2 (as Mixtral) assumed.
LLAMA3_8X70B = {
    "name": "llama3-8x70b",
    "num_layers": 80,
    "hidden_size": 8192,
    "num_attention_heads": 64,
    "num_kv_heads": 8,
    "ffn_hidden_size": 28672,
    "vocab_size": 128256,
    "moe": {"num_experts": 8, "top_k": 2, "capacity_factor": 1.0},
}
FOLDING_COMMON = {
    "micro_batch_size": 1,
    "sequence_parallel": True,
    "flash_attention": True,
    "recompute": "none",
    "distributed_optimizer": True,
}
FOLDING_TABLE3 = [
    # model, GPUs, TP, EP, PP, ETP (None: = TP)
    ("Mixtral-8x22B MCore w/ Folding", MIXTRAL_8X22B, 128, 2, 8, 8, 1),
    ("Mixtral-8x22B MCore", MIXTRAL_8X22B, 128, 2, 4, 8, None),
    ("Mixtral-8x22B TP+EP+DP", MIXTRAL_8X22B, 128, 4, 8, 1, None),
    ("Qwen2-57B-A14B MCore w/ Folding", QWEN2_57B, 64, 2, 4, 4, 1),
    ("Qwen2-57B-A14B MCore", QWEN2_57B, 64, 2, 4, 4, None),
    ("Mixtral-8x22B-G8T8 MCore w/ Folding", MIXTRAL_G8T8, 128, 4, 8, 8, 1),
    ("Llama3-8x70B MCore w/ Folding", LLAMA3_8X70B, 256, 8, 8, 16, 1),
    ("Llama3-8x70B MCore", LLAMA3_8X70B, 256, 8, 4, 8, None),
]


@pytest.mark.parametrize(("label", "model", "gpus", "t", "ep", "p", "etp"), FOLDING_TABLE3)
def test_moe_parallel_folding_table3_runs_fit_h100_80gb(
    label: str, model: dict[str, Any], gpus: int, t: int, ep: int, p: int, etp: int | None
) -> None:
    d = gpus // (t * p)
    par = {**FOLDING_COMMON, "tp": t, "ep": ep, "pp": p, "dp": d, "num_microbatches": 256 // d}
    if etp is not None:
        par["etp"] = etp
    plan = published_plan(model, "H100-SXM", gpus, 4096, **par)
    assert Layout(plan).expert_folding_ok, label
    r = report(plan)
    assert r.memory_per_gpu_gib < 80, (label, r.peak)


def test_moe_parallel_folding_reported_oom_is_oom() -> None:
    """Table 1: Llama3-8x70B with TP+EP+DP (TP 8, EP 8, no PP) ran out of memory; under the
    same settings (no recompute) the model agrees: the weights, gradients and the 80 layers'
    activations of one micro-batch exceed 80 GiB."""
    par = {**FOLDING_COMMON, "tp": 8, "ep": 8, "pp": 1, "dp": 32, "num_microbatches": 8}
    assert (
        report(published_plan(LLAMA3_8X70B, "H100-SXM", 256, 4096, **par)).memory_per_gpu_gib > 80
    )


# Megatron-MoE-ModelZoo Mixtral-8x22B benchmark script (training_moe.csv T0094-T0097, H100,
# 128 GPUs): TP 2, PP 8, VPP 7, EP 8, ETP 1, MBS 1, GBS 256, seq 4096, dropless, no activation
# recompute, sequence parallel, distributed optimizer; ran (~445-470 TFLOP/s per GPU).
MODELZOO_MIXTRAL = {
    "micro_batch_size": 1,
    "sequence_parallel": True,
    "flash_attention": True,
    "recompute": "none",
    "distributed_optimizer": True,
    "tp": 2,
    "pp": 8,
    "dp": 8,
    "ep": 8,
    "etp": 1,
    "num_microbatches": 32,
}


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_modelzoo_mixtral_interleaved_vpp7_run_fits_h100_80gb(capacity_factor) -> None:
    """The run fits 80 GiB, dropless or token-drop; its first stage holds Megatron's
    interleaved warm-up, (2(p-1) + (v-1)p + 1) / v = 9 micro-batches of its 7 layers, where
    1F1B holds p = 8: the layer activations of the two schedules are in the ratio 9 / 8."""
    model = {**MIXTRAL_8X22B, "moe": {**MIXTRAL_8X22B["moe"], "capacity_factor": capacity_factor}}
    par = {**MODELZOO_MIXTRAL, "schedule": "interleaved", "virtual_stages": 7}
    interleaved = report(published_plan(model, "H100-SXM", 128, 4096, **par))
    assert interleaved.memory_per_gpu_gib < 80, interleaved.peak
    plain = {**MODELZOO_MIXTRAL, "schedule": "1f1b"}
    one_f_one_b = published_plan(model, "H100-SXM", 128, 4096, **plain)
    layout = Layout(one_f_one_b)
    layers = layout.stage_layers[1]  # a middle stage: layers only, no embedding or logits
    par = one_f_one_b.parallel
    per_mb = sum(layer_activation_bytes(one_f_one_b.model, par, i, 4096, 1) for i in layers)
    middle = report(one_f_one_b).stages[1].activations_gib * GIB
    assert middle == pytest.approx((8 - 1) * per_mb, rel=1e-9)  # stage 1 of 1F1B: p - 1
    inter_mid = interleaved.stages[1].activations_gib * GIB
    assert inter_mid == pytest.approx((2 * (8 - 2) + 6 * 8 + 1) / 7 * per_mb, rel=1e-9)


# MoE Parallel Folding long-context runs (training_moe.csv T0084, T0091; §4.3): Mixtral-8x22B
# with context parallelism, no recompute stated (the paper's settings: no activation
# recomputation), token-drop CF 1.0; both ran (45.3 % and 42.9 % MFU). Sequence split over
# CP ranks: each GPU holds the activations of seq / cp tokens.
LONG_CONTEXT = [
    # row, GPUs, seq, global batch, TP, CP, PP, EP, ETP (None: = TP)
    ("T0084", 128, 16384, 1024, 2, 4, 8, 4, None),
    ("T0091", 1024, 131072, 128, 8, 8, 8, 8, 1),
]


@pytest.mark.parametrize(("row", "gpus", "seq", "gbs", "t", "cp", "p", "ep", "etp"), LONG_CONTEXT)
def test_moe_parallel_folding_long_context_runs_fit_h100_80gb(
    row: str, gpus: int, seq: int, gbs: int, t: int, cp: int, p: int, ep: int, etp: int | None
) -> None:
    d = gpus // (t * cp * p)
    par = {**FOLDING_COMMON, "tp": t, "cp": cp, "pp": p, "ep": ep, "dp": d}
    par["num_microbatches"] = gbs // d
    if etp is not None:
        par["etp"] = etp
    plan = published_plan(MIXTRAL_8X22B, "H100-SXM", gpus, seq, **par)
    r = report(plan)
    assert r.memory_per_gpu_gib < 80, (row, r.peak)
    # the same GPUs without CP would hold cp times the tokens per layer: out of memory
    no_cp = {**par, "cp": 1, "dp": d * cp, "num_microbatches": max(1, gbs // (d * cp))}
    assert report(published_plan(MIXTRAL_8X22B, "H100-SXM", gpus, seq, **no_cp)).stages[
        0
    ].activations_gib > r.stages[0].activations_gib * (cp - 0.5)


# ---- deep models: per-kind evaluation equals the per-layer sum -----------------------------


@pytest.mark.parametrize(("first_k_dense", "layer_freq"), [(0, 1), (1, 2), (3, 3)])
def test_stage_activations_equal_the_sum_over_each_layer(
    first_k_dense: int, layer_freq: int
) -> None:
    """A stage's activations are the per-layer bytes summed over its layers, one by one."""
    plan = make_plan(
        "mixtral-8x7b",
        model_fields={
            "num_layers": 12,
            "moe": {"first_k_dense": first_k_dense, "layer_freq": layer_freq},
        },
        parallel={"tp": 2, "pp": 2, "dp": 2, "ep": 4, "etp": 1, "num_microbatches": 4},
    )
    layout = Layout(plan)
    mem = report(plan)
    s = plan.workload.seq_len.value
    b = plan.parallel.micro_batch_size
    for stage in mem.stages[:-1]:  # the last stage adds logits
        layers = layout.stage_layers[stage.stage]
        per_layer = sum(layer_activation_bytes(plan.model, plan.parallel, i, s, b) for i in layers)
        extra = 2 * s * b * plan.model.hidden_size if stage.stage == 0 else 0.0
        expected = stage.inflight_microbatches * (per_layer + extra)
        assert stage.activations_gib * GIB == pytest.approx(expected, rel=1e-12)


def test_memory_of_a_very_deep_model_is_quick() -> None:
    """The largest layer count the plan schema accepts is audited without per-layer loops."""
    import time

    plan = make_plan("mixtral-8x7b", model_fields={"num_layers": 2**16}, parallel={"pp": 4})
    start = time.perf_counter()
    for _ in range(20):
        report(plan)
    assert time.perf_counter() - start < 10.0
    assert sum(Layout(plan).moe_layers_per_stage) == 2**16

"""Op FLOPs, bytes and roofline times against closed forms computed by hand here."""

from __future__ import annotations

from typing import Any

import pytest
from calibrations import calibration
from hypothesis import given
from hypothesis import strategies as st

from clustersim.costs import compute
from clustersim.spec.presets import MODEL_PRESETS
from clustersim.spec.schema import HardwareSpec, LinkSpec, ModelSpec

H100 = HardwareSpec(
    num_nodes=1,
    gpus_per_node=8,
    memory_gib=80,
    peak_tflops=989,
    hbm_bandwidth_gbps=3350,
    intra_node=LinkSpec(bandwidth_gbps=450, latency_us=3),
    inter_node=LinkSpec(bandwidth_gbps=50, latency_us=8),
    calibration=calibration(),
)
# 989e12 * 0.6 / 3350e9 FLOP per byte.
H100_RIDGE = 177.13432835820896


def gpt(hidden: int = 2304, layers: int = 24, heads: int = 24, vocab: int = 51200) -> ModelSpec:
    """A Narayanan-style GPT: GeLU MLP of 4h, multi-head attention."""
    return ModelSpec(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=4 * hidden,
        vocab_size=vocab,
        activation="gelu",
    )


def preset(name: str, **overrides: Any) -> ModelSpec:
    return ModelSpec(**{**MODEL_PRESETS[name], **overrides})


# ---- roofline -----------------------------------------------------------------------------


def test_ridge_point() -> None:
    assert compute.ridge_point_flops_per_byte(H100) == pytest.approx(H100_RIDGE, rel=1e-12)


def test_large_gemm_is_compute_bound() -> None:
    cost = compute.gemm(8192, 8192, 8192, 2)
    assert cost.flops == 2 * 8192**3
    assert cost.hbm_bytes == 3 * 8192**2 * 2
    assert cost.time_ms(H100) == pytest.approx(2 * 8192**3 / (989e12 * 0.6) * 1e3, rel=1e-12)


def test_small_token_count_is_memory_bound() -> None:
    # One token through an 8192 x 8192 bf16 weight: intensity 2*8192^2 / (2*(8192^2 + 2*8192))
    # ~ 1 FLOP/byte, far below the ridge; time = bytes / HBM bandwidth.
    cost = compute.gemm(1, 8192, 8192, 2)
    want_bytes = (8192 + 8192**2 + 8192) * 2
    assert cost.hbm_bytes == want_bytes
    assert cost.time_ms(H100) == pytest.approx(want_bytes / 3350e9 * 1e3, rel=1e-12)


@pytest.mark.parametrize(
    ("tokens", "compute_bound"), [(1, False), (184, False), (186, True), (4096, True)]
)
def test_gemm_crossover_at_the_ridge(tokens: int, compute_bound: bool) -> None:
    # Square n = k = 8192 weight: intensity = 2mn^2 / (2(2mn + n^2)) = m n / (2m + n), which
    # reaches the ridge R at m* = R n / (n - 2R) = 177.13 * 8192 / 7837.7 ~ 185.1 tokens.
    n = 8192
    intensity = tokens * n / (2 * tokens + n)
    assert (intensity > H100_RIDGE) == compute_bound
    cost = compute.gemm(tokens, n, n, 2)
    flops_ms = cost.flops / (989e12 * 0.6) * 1e3
    bytes_ms = cost.hbm_bytes / 3350e9 * 1e3
    assert cost.time_ms(H100) == pytest.approx(flops_ms if compute_bound else bytes_ms)


@given(factor=st.floats(0.01, 100.0))
def test_op_time_switches_branch_at_the_ridge(factor: float) -> None:
    hbm_bytes = 1e9
    flops = H100_RIDGE * factor * hbm_bytes
    want = max(flops / (989e12 * 0.6), hbm_bytes / 3350e9) * 1e3
    assert compute.op_time_ms(flops, hbm_bytes, H100) == pytest.approx(want, rel=1e-12)
    at_ridge = compute.op_time_ms(H100_RIDGE * hbm_bytes, hbm_bytes, H100)
    assert at_ridge == pytest.approx(hbm_bytes / 3350e9 * 1e3, rel=1e-12)


def test_expert_decode_is_memory_bound_and_prefill_compute_bound() -> None:
    model = preset("mixtral-8x7b")
    h, ffn = 4096, 14336
    decode = compute.expert_mlp(4, model, etp=1, num_active_experts=2)
    weight_bytes = 2 * 3 * h * ffn * 2  # two experts, three h x ffn bf16 matrices
    assert decode.hbm_bytes > weight_bytes
    assert decode.time_ms(H100) == pytest.approx(decode.hbm_bytes / 3350e9 * 1e3)
    prefill = compute.expert_mlp(16384, model, etp=1, num_active_experts=2)
    assert prefill.time_ms(H100) == pytest.approx(prefill.flops / (989e12 * 0.6) * 1e3)


# ---- per-op FLOPs -------------------------------------------------------------------------


@pytest.mark.parametrize(("b", "s", "tp"), [(1, 2048, 1), (4, 1024, 2), (2, 4096, 8)])
def test_gpt_layer_forward_is_24bsh2_plus_4bs2h(b: int, s: int, tp: int) -> None:
    model = gpt()
    h = 2304
    costs = compute.layer_forward_costs(model, 0, b, s, tp)
    assert set(costs) == {"qkv", "core_attention", "attention_output", "mlp"}
    assert costs["qkv"].flops == pytest.approx(6 * b * s * h * h / tp)
    assert costs["attention_output"].flops == pytest.approx(2 * b * s * h * h / tp)
    assert costs["mlp"].flops == pytest.approx(16 * b * s * h * h / tp)
    assert costs["core_attention"].flops == pytest.approx(4 * b * s * s * h / tp)
    total = sum(c.flops for c in costs.values())
    assert total == pytest.approx((24 * b * s * h * h + 4 * b * s * s * h) / tp, rel=1e-12)
    fwd_bwd = sum(c.flops + compute.backward(c).flops for c in costs.values())
    assert fwd_bwd == pytest.approx(3 * (24 * b * s * h * h + 4 * b * s * s * h) / tp, rel=1e-12)


def test_causal_mask_halves_core_attention() -> None:
    b, s, h = 2, 2048, 2304
    costs = compute.layer_forward_costs(gpt(), 0, b, s, causal=True)
    assert sum(c.flops for c in costs.values()) == pytest.approx(
        24 * b * s * h * h + 2 * b * s * s * h
    )


def test_gqa_shrinks_only_the_kv_projection() -> None:
    model = preset("mixtral-8x7b")  # h 4096, 32 heads of 128, 8 kv heads
    tokens, h = 1000, 4096
    assert compute.qkv_projection(tokens, model).flops == 2 * tokens * h * (h + 2 * 8 * 128)
    # TP 4: 8 query heads and 2 kv heads per GPU; TP 16: kv heads bottom out at one per GPU.
    assert compute.qkv_projection(tokens, model, 4).flops == 2 * tokens * h * (1024 + 2 * 2 * 128)
    assert compute.qkv_projection(tokens, model, 16).flops == 2 * tokens * h * (256 + 2 * 128)
    mha = compute.core_attention(1, 4096, preset("mixtral-8x7b", num_kv_heads=None))
    assert compute.core_attention(1, 4096, model).flops == mha.flops == 4 * 4096**2 * h


def test_swiglu_mlp_router_expert_and_logits() -> None:
    model = preset("mixtral-8x7b")
    tokens, h, ffn, experts, vocab = 512, 4096, 14336, 8, 32000
    assert compute.dense_mlp(tokens, model, 2).flops == 3 * 2 * tokens * h * ffn / 2
    assert compute.router(tokens, model).flops == 2 * tokens * h * experts
    assert compute.expert_mlp(tokens, model, etp=4).flops == 3 * 2 * tokens * h * ffn / 4
    assert compute.expert_mlp(0, model).flops == 0
    assert compute.logits(tokens, model, 8).flops == 2 * tokens * h * vocab / 8
    assert compute.router(tokens, gpt()).flops == 0
    assert compute.shared_expert_mlp(tokens, model).flops == 0


def test_shared_experts_and_dense_width_of_deepseek() -> None:
    model = preset("deepseek-v3")
    h, tokens = 7168, 64
    assert compute.shared_expert_mlp(tokens, model).flops == 3 * 2 * tokens * h * 2048
    assert compute.dense_mlp(tokens, model).flops == 3 * 2 * tokens * h * 18432
    dense = compute.layer_forward_costs(model, 0, 1, tokens)
    moe = compute.layer_forward_costs(model, 3, 1, tokens)
    assert "mlp" in dense and "experts" in moe
    assert moe["experts"].flops == 3 * 2 * tokens * 8 * h * 2048


def test_mla_projection_flops() -> None:
    model = preset("deepseek-v3")
    tokens, h, heads = 10, 7168, 128
    q_down_up = h * 1536 + 1536 * heads * (128 + 64)
    kv_down_up = h * (512 + 64) + 512 * heads * (128 + 128)  # down includes the rope key
    per_token = q_down_up + kv_down_up
    assert compute.qkv_projection(tokens, model).flops == 2 * tokens * per_token
    assert compute.attention_output_projection(tokens, model).flops == 2 * tokens * heads * 128 * h
    s = 1024
    assert compute.core_attention(1, s, model).flops == 2 * s * s * heads * (192 + 128)


def test_backward_is_twice_forward_and_flash_saves_bytes() -> None:
    fwd = compute.core_attention(2, 4096, gpt(), 2)
    assert compute.backward(fwd) == compute.OpCost(2 * fwd.flops, 2 * fwd.hbm_bytes)
    no_flash = compute.core_attention(2, 4096, gpt(), 2, flash=False)
    assert no_flash.flops == fwd.flops
    # Four passes over 2 x 12 heads x 4096^2 bf16 scores.
    assert no_flash.hbm_bytes - fwd.hbm_bytes == 4 * 2 * 12 * 4096**2 * 2


# ---- model FLOPs --------------------------------------------------------------------------


def test_gpt_1_7b_matches_narayanan_eq3() -> None:
    # Narayanan 2021 Table 1, first row: h 2304, L 24, s 2048, V 51200, B 512, recompute on.
    # 96 * 512 * 2048 * 24 * 2304^2 * (1 + 2048/13824 + 51200/884736) = 1.5467e16 FLOPs.
    model = preset("gpt-1.7b")
    want = 96 * 512 * 2048 * 24 * 2304**2 * (1 + 2048 / 13824 + 51200 / 884736)
    got = compute.model_flops_per_iteration(model, 512, 2048, recompute="full")
    assert got == pytest.approx(want, rel=1e-12)
    assert got == pytest.approx(1.5466830067924994e16, rel=1e-12)


def test_gpt_1_7b_matches_korthikanti_eq7_without_recompute() -> None:
    # 72 * B * L * s * h^2 * (1 + s/(6h) + V/(12hL)) = 72 * 512 * 24 * 2048 * 2304^2 * (...)
    model = preset("gpt-1.7b")
    want = 72 * 512 * 24 * 2048 * 2304**2 * (1 + 2048 / 13824 + 51200 / 663552)
    assert compute.model_flops_per_iteration(model, 512, 2048) == pytest.approx(want, rel=1e-12)


def test_selective_recompute_adds_one_core_attention_forward() -> None:
    model, B, s, L, h = gpt(), 8, 2048, 24, 2304
    none = compute.model_flops_per_iteration(model, B, s)
    selective = compute.model_flops_per_iteration(model, B, s, recompute="selective")
    assert selective - none == pytest.approx(4 * B * s * s * h * L, rel=1e-9)


def test_moe_model_flops_match_megatron_per_token_formula() -> None:
    # Mixtral 8x7B: Megatron counts 6 x [h*(ffn*phi*k*L) + attention projections * L + h*V]
    # per token, plus core attention halved for the causal mask: 6 * (s/2) * a * d * 2 * L.
    model = preset("mixtral-8x7b")
    B, s, L, h, ffn, k, V, a, kv, d = 4, 4096, 32, 4096, 14336, 2, 32000, 32, 8, 128
    projections = h * a * d + 2 * h * kv * d + a * d * h
    per_token = 6 * (h * ffn * 3 * k * L + projections * L + h * V) + 6 * s / 2 * a * d * 2 * L
    got = compute.model_flops_per_iteration(model, B, s)
    assert got == pytest.approx(B * s * per_token, rel=1e-12)


def test_moe_layer_op_sum_reproduces_model_flops() -> None:
    model = preset("mixtral-8x7b")
    B, s = 2, 1024
    layers = sum(
        c.flops
        for i in range(model.num_layers)
        for name, c in compute.layer_forward_costs(model, i, B, s, causal=True).items()
        if name != "router"  # Megatron's model FLOPs leave the router out
    )
    want = 3 * layers + 3 * compute.logits(B * s, model).flops
    assert compute.model_flops_per_iteration(model, B, s) == pytest.approx(want, rel=1e-12)


def test_unknown_recompute_is_rejected() -> None:
    with pytest.raises(ValueError, match="recompute"):
        compute.model_flops_per_iteration(gpt(), 1, 128, recompute="partial")  # type: ignore[arg-type]

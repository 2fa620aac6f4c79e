"""Small serving plans for the serving tests, and closed-form step times to check them against.

The closed forms write the calibrated per-kernel model out by hand (the formulas of
``clustersim/costs/kernels.py``'s docstring, not its code): a dense model on one GPU (TP 1),
kernel by kernel.
"""

from __future__ import annotations

import copy
from typing import Any

from clustersim.costs.serving import kv_bytes_per_token_layer
from clustersim.spec.load import plan_from_dict
from clustersim.spec.schema import Plan

DENSE: dict[str, Any] = {
    "name": "test-llama-1gpu",
    "seed": 0,
    "model": {"preset": "llama-2-7b"},
    "hardware": {"gpu": "H100-SXM", "num_nodes": 1, "gpus_per_node": 1},
    "parallel": {"tp": 1, "pp": 1, "dp": 1},
    "workload": {
        "mode": "inference",
        "requests": {
            "num": 200,
            "rate_per_s": 2.0,
            "prompt_len": {"dist": "uniform", "min": 32, "max": 2048},
            "output_len": {"dist": "uniform", "min": 1, "max": 256},
        },
    },
}

MOE: dict[str, Any] = {
    "name": "test-mixtral-16",
    "seed": 0,
    "model": {"preset": "mixtral-8x7b"},
    "hardware": {"gpu": "H100-SXM", "num_nodes": 2, "gpus_per_node": 8},
    "parallel": {"tp": 2, "pp": 2, "dp": 4, "ep": 8, "etp": 1},
    "workload": copy.deepcopy(DENSE["workload"]),
}


def make_plan(base: dict[str, Any], **sections: dict[str, Any]) -> Plan:
    """``base`` with ``requests``, ``parallel``, ``hardware``, ``targets`` or ``model`` keys
    updated (one level deep; a value None removes the key)."""
    raw = copy.deepcopy(base)
    for name, changes in sections.items():
        node = raw["workload"] if name == "requests" else raw
        merged = {**node.get(name, {}), **changes}
        node[name] = {k: v for k, v in merged.items() if v is not None}
    return plan_from_dict(raw, "<test>")


def _kernel_ms(plan: Plan, gpu_ms: float, graphs: bool) -> float:
    """A kernel's stream time: GPU time + kernel-to-kernel gap under CUDA graphs; eager, the
    larger of that and the host launch, plus the framework time."""
    k = plan.hardware.calibration.kernel
    busy = gpu_ms + k.graph_launch_us * 1e-3
    if graphs:
        return busy
    return max(busy, k.launch_us * 1e-3) + k.framework_us * 1e-3


def _gemm_gpu_ms(plan: Plan, m: float, n: float, k: float) -> float:
    """The calibrated GEMM: max(2mnk / (peak e prod x/(x+half)), (mk+kn+mn) b / (HBM mu_g))."""
    hw, cal = plan.hardware, plan.hardware.calibration
    half = cal.gemm.half_dim
    shape = (m / (m + half)) * (n / (n + half)) * (k / (k + half))
    compute = 2 * m * n * k / (hw.peak_tflops * 1e12 * cal.gemm.efficiency * shape)
    byte_rate = hw.hbm_bandwidth_gbps * 1e9 * cal.gemm.memory_efficiency
    memory = (m * k + k * n + m * n) * 2 / byte_rate
    return max(compute, memory) * 1e3 + cal.kernel.fixed_us * 1e-3


def _stream_gpu_ms(plan: Plan, nbytes: float, kind: str = "stream", row_bytes=0.0) -> float:
    """A memory-bound kernel of class ``kind``: plain stream (add, cache write), norm, rotary
    embedding or element-wise (activation): bytes / (HBM x its efficiency) + its fixed time
    (the rotary embedding at ``rotary_efficiency``, the element-wise fixed time); a stream or
    norm whose bytes fit in L2 (``l2_mb``) at ``l2_speedup`` x that rate; a norm, rotary or
    element-wise kernel of one thread block per token row at least ``row_bytes`` at one
    block's ``row_gbps``."""
    hw, cal = plan.hardware, plan.hardware.calibration
    mem, kern = cal.memory, cal.kernel
    mu, fixed_us = {
        "stream": (mem.efficiency, kern.stream_fixed_us),
        "norm": (mem.norm_efficiency, kern.norm_fixed_us),
        "elementwise": (mem.elementwise_efficiency, kern.fixed_us),
        "rotary": (mem.rotary_efficiency or mem.elementwise_efficiency, kern.fixed_us),
    }[kind]
    if kind in ("stream", "norm") and mem.l2_mb is not None and nbytes <= mem.l2_mb * 1e6:
        mu *= mem.l2_speedup
    move_ms = nbytes / (hw.hbm_bandwidth_gbps * 1e9 * mu) * 1e3
    if kind != "stream" and mem.row_gbps is not None:
        move_ms = max(move_ms, row_bytes / (mem.row_gbps * 1e9) * 1e3)
    return move_ms + fixed_us * 1e-3


def layer_ms(plan: Plan, new_tokens: int, context: int, graphs: bool = False) -> float:
    """One dense layer (Llama: GQA-free MHA, SwiGLU, bf16) on one GPU for one request
    computing ``new_tokens`` on ``context``, kernel by kernel: norm, QKV, rotary, KV-cache
    write, core attention, output projection, residual add, norm, up (gate+up), SiLU-and-mul, down,
    residual add."""
    model, hw, cal = plan.model, plan.hardware, plan.hardware.calibration
    n, h, ffn = new_tokens, model.hidden_size, model.ffn_hidden_size
    heads, d = model.num_attention_heads, model.head_size
    kv_heads = model.kv_heads

    def kern(gpu_ms: float) -> float:
        return _kernel_ms(plan, gpu_ms, graphs)

    norm = kern(_stream_gpu_ms(plan, n * 2 * h * 2, "norm", 2 * h * 2))
    residual = kern(_stream_gpu_ms(plan, n * 3 * h * 2))
    rope_row = 2 * (heads + kv_heads) * d * 2  # one thread block per token
    rope = kern(_stream_gpu_ms(plan, n * rope_row, "rotary", rope_row))
    cache_write = kern(_stream_gpu_ms(plan, n * 2 * kv_bytes_per_token_layer(model, 1)))
    qkv = kern(_gemm_gpu_ms(plan, n, (heads + 2 * kv_heads) * d, h))
    out = kern(_gemm_gpu_ms(plan, n, h, heads * d))
    up = kern(_gemm_gpu_ms(plan, n, 2 * ffn, h))
    act = kern(_stream_gpu_ms(plan, n * 3 * ffn * 2, "elementwise", 3 * ffn * 2))
    down = kern(_gemm_gpu_ms(plan, n, h, ffn))
    pairs = n * context + n * (n + 1) / 2  # causal: each new token sees the context and itself
    # FlashAttention: each query row costs half_seq pairs more (efficiency s / (s + half));
    # each pair and head its 4d FLOPs and one exp at the special-function rate
    attn_pairs = (pairs + cal.attention.half_seq * n) * heads
    attn_rate = hw.peak_tflops * 1e12 * cal.attention.efficiency
    exp_s = attn_pairs / (cal.attention.exp_tflops * 1e12)
    kv_bytes = (context + n) * kv_bytes_per_token_layer(model, 1) + n * heads * 2 * d * 2
    kv_rate = hw.hbm_bandwidth_gbps * 1e9 * cal.attention.decode_memory_efficiency
    attn_s = attn_pairs * 4 * d / attn_rate + exp_s
    core = kern(max(attn_s, kv_bytes / kv_rate) * 1e3 + cal.kernel.fixed_us * 1e-3)
    return 2 * norm + 2 * residual + rope + cache_write + qkv + out + up + act + down + core


def step_ms(plan: Plan, new_tokens: int, context: int, graphs: bool = False) -> float:
    """A whole step of one request: every layer, then the logits of its one sampled token."""
    model = plan.model
    logits = _kernel_ms(plan, _gemm_gpu_ms(plan, 1, model.vocab_size, model.hidden_size), graphs)
    return model.num_layers * layer_ms(plan, new_tokens, context, graphs) + logits

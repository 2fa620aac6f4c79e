"""Costs of serving: per-step op coefficients of one replica and its KV-cache capacity.

A serving *step* runs one forward pass of a batch whose requests each contribute ``q`` new
tokens on top of ``c`` tokens already in their KV cache (decode: ``q = 1``; a prefill chunk:
``q`` prompt tokens). Everything a step costs is affine in a few sums over its requests, so
the engine times a step from those sums and never from per-token work:

* ``tokens`` = sum of ``q``: every GEMM (attention projections, MLP, router, shared experts)
  is a roofline of FLOPs ``f * tokens`` and HBM bytes ``weights + b * tokens`` (the
  coefficients come from :mod:`clustersim.costs.compute` at one and two tokens, so the
  formulas are those of training): decode, with few tokens, is bound by reading the weights,
  prefill by FLOPs;
* core attention (causal, flash): ``pairs`` = sum of ``q*c + q*(q+1)/2`` query-key pairs at
  ``2 * heads/t * (d_qk + d_v)`` FLOPs each, and HBM bytes for the KV cache read
  (``kv_read`` = sum of ``c + q`` tokens, at the cache's bytes per token and layer, MLA: the
  latent) plus the queries and outputs (``tokens``). Decode attention is memory-bound and
  grows with the context, prefill attention is compute-bound and grows with ``q * c + q^2/2``;
* output layer: a GEMM for ``seqs`` rows (one sampled token per scheduled request);
* TP all-reduce of the activations (``tokens * h`` elements, ring), two per dense layer, one
  per MoE layer; pipeline send of ``tokens * h / t`` elements between stages;
* a fixed launch overhead per kernel (``hardware.kernel_overhead_us``, as in training; CUDA
  graphs make real decode launches cheaper, so lower it for such deployments).

The routed experts and their all-to-alls depend on the sampled routing and are timed by the
engine (``engine/serving_moe.py``) with :class:`costs.optimes`-style coefficients.

**KV-cache capacity** (vLLM's rule): of ``gpu_memory_utilization x (memory_gib -
memory_reserved_gib)`` per GPU, what remains after the weights, one forward's activations and
the MoE all-to-all buffers holds the cache. The activations are one layer's (no recompute,
flash attention as the plan says) for a prefill of ``max_num_batched_tokens`` tokens, plus
fp32 logits of ``max_batch_size`` rows on the last stage (vLLM profiles a forward of the token
budget the same way). All stages hold the same tokens, so the replica's capacity is the
smallest over stages of free bytes / (cache bytes per token of that stage's layers), rounded
down to whole blocks of ``kv_block_size`` tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from clustersim.costs import compute as cc
from clustersim.costs.comm import collective_time_ms, link_for_group, p2p_ms
from clustersim.costs.memory import (
    DTYPE_BYTES,
    GIB,
    layer_activation_bytes,
    stage_params_per_gpu,
)
from clustersim.costs.params import count_params
from clustersim.layout import Layout
from clustersim.spec.schema import HardwareSpec, ModelSpec, Plan


@dataclass(frozen=True, slots=True)
class Roofline:
    """An op with FLOPs ``f * n`` and HBM bytes ``w + b * n`` for ``n`` tokens, timed in ms."""

    ms_per_token_compute: float
    ms_fixed_memory: float
    ms_per_token_memory: float

    @classmethod
    def of(cls, op_at: Callable[[float], cc.OpCost], hw: HardwareSpec) -> Roofline:
        """Coefficients of an op given as ``op_at(tokens) -> OpCost`` (affine in tokens)."""
        one, two = op_at(1), op_at(2)
        per_token_bytes = two.hbm_bytes - one.hbm_bytes
        ms_per_flop = 1e3 / (hw.peak_tflops * 1e12 * hw.compute_efficiency)
        ms_per_byte = 1e3 / (hw.hbm_bandwidth_gbps * 1e9)
        return cls(
            (two.flops - one.flops) * ms_per_flop,
            (one.hbm_bytes - per_token_bytes) * ms_per_byte,
            per_token_bytes * ms_per_byte,
        )

    def time_ms(self, tokens):
        """Roofline time for ``tokens`` (a float or a numpy array; 0 tokens cost 0)."""
        compute = tokens * self.ms_per_token_compute
        memory = self.ms_fixed_memory + tokens * self.ms_per_token_memory
        return np.maximum(compute, memory) * (tokens > 0)

    def scalar_ms(self, tokens: float) -> float:
        """:meth:`time_ms` for one Python number (no numpy overhead)."""
        if tokens <= 0:
            return 0.0
        compute = tokens * self.ms_per_token_compute
        memory = self.ms_fixed_memory + tokens * self.ms_per_token_memory
        return compute if compute > memory else memory


@dataclass(frozen=True, slots=True)
class Affine:
    """A time ``fixed + per_token * n`` for ``n > 0`` tokens (0 for none), in ms."""

    fixed_ms: float
    per_token_ms: float

    @classmethod
    def of(cls, time_at: Callable[[float], float]) -> Affine:
        """Coefficients of ``time_at(tokens) -> ms`` (affine in tokens for tokens >= 1)."""
        one, two = time_at(1), time_at(2)
        return cls(one - (two - one), two - one)

    def time_ms(self, tokens):
        """The time for ``tokens`` (a float or a numpy array)."""
        return (tokens > 0) * (self.fixed_ms + tokens * self.per_token_ms)

    def scalar_ms(self, tokens: float) -> float:
        """:meth:`time_ms` for one Python number."""
        return self.fixed_ms + tokens * self.per_token_ms if tokens > 0 else 0.0


def kv_bytes_per_token_layer(model: ModelSpec, tp: int) -> float:
    """KV-cache bytes one GPU stores per token and layer (memory.py's rule: GQA keeps at least
    one K/V head per GPU; MLA keeps the latent, not split by TP)."""
    if model.mla is not None:
        elements = model.mla.kv_lora_rank + model.mla.qk_rope_head_dim
    else:
        elements = 2 * max(1.0, model.kv_heads / tp) * model.head_size
    return elements * DTYPE_BYTES[model.dtype]


@dataclass(frozen=True)
class StepCosts:
    """Per-step cost coefficients of one replica (TP group x pipeline stages), in ms.

    Per layer kind: ``dense_*`` for a dense layer, ``moe_attn_*`` for the non-expert part of an
    MoE layer (attention, router, shared experts); the routed experts come from the engine.
    """

    attn_proj: Roofline  # QKV and output projections
    dense_mlp: Roofline
    router: Roofline
    shared_experts: Roofline
    logits: Roofline
    elementwise_dense_ms_per_token: float
    elementwise_moe_ms_per_token: float
    attn_ms_per_pair: float  # core attention FLOPs per query-key pair
    attn_ms_per_kv_token: float  # KV cache read per token of context
    attn_ms_per_query_token: float  # queries read and outputs written
    dense_overhead_ms: float  # kernel launches of a dense layer
    moe_attn_overhead_ms: float  # kernel launches of an MoE layer's attention block
    tp_allreduce: Affine  # one all-reduce of the activations
    p2p: Affine  # activations to the next pipeline stage
    dense_layers: tuple[int, ...]  # per stage
    moe_layers: tuple[int, ...]  # per stage


def step_costs(plan: Plan, layout: Layout) -> StepCosts:
    """The coefficients of ``plan`` (one replica; every replica is alike)."""
    model, hw, tp = plan.model, plan.hardware, plan.parallel.tp
    bpe = DTYPE_BYTES[model.dtype]
    ms_per_flop = 1e3 / (hw.peak_tflops * 1e12 * hw.compute_efficiency)
    ms_per_byte = 1e3 / (hw.hbm_bandwidth_gbps * 1e9)
    qk_dim, v_dim = head_dims(model)
    heads = model.num_attention_heads / tp
    ranks = [layout.rank_of(tp=t) for t in range(tp)]
    gpn = hw.gpus_per_node
    kernels = cc.KERNELS_PER_FORWARD

    def proj(n: float) -> cc.OpCost:
        return cc.qkv_projection(n, model, tp) + cc.attention_output_projection(n, model, tp)

    def allreduce_ms(n: float) -> float:
        return collective_time_ms("all_reduce", n * model.hidden_size * bpe, ranks, gpn, hw)

    return StepCosts(
        attn_proj=Roofline.of(proj, hw),
        dense_mlp=Roofline.of(lambda n: cc.dense_mlp(n, model, tp), hw),
        router=Roofline.of(lambda n: cc.router(n, model), hw),
        shared_experts=Roofline.of(lambda n: cc.shared_expert_mlp(n, model, tp), hw),
        logits=Roofline.of(lambda n: cc.logits(n, model, tp), hw),
        elementwise_dense_ms_per_token=cc.elementwise(1, model, tp).hbm_bytes * ms_per_byte,
        elementwise_moe_ms_per_token=cc.elementwise(1, model, tp, mlp=False).hbm_bytes
        * ms_per_byte,
        attn_ms_per_pair=2.0 * heads * (qk_dim + v_dim) * ms_per_flop,
        attn_ms_per_kv_token=kv_bytes_per_token_layer(model, tp) * ms_per_byte,
        attn_ms_per_query_token=heads * (qk_dim + v_dim) * bpe * ms_per_byte,
        dense_overhead_ms=cc.kernel_overhead_ms(kernels["attention"] + kernels["mlp"], hw),
        moe_attn_overhead_ms=cc.kernel_overhead_ms(kernels["attention"], hw),
        tp_allreduce=Affine.of(allreduce_ms),
        p2p=Affine.of(lambda n: _p2p_ms(plan, layout, n * model.hidden_size * bpe / tp)),
        dense_layers=tuple(len(s) - m for s, m in zip(layout.stage_layers,
                                                      layout.moe_layers_per_stage, strict=True)),
        moe_layers=tuple(layout.moe_layers_per_stage),
    )  # fmt: skip


def head_dims(model: ModelSpec) -> tuple[int, int]:
    """(query/key head size, value head size), MLA included."""
    if model.mla is not None:
        return model.mla.qk_nope_head_dim + model.mla.qk_rope_head_dim, model.mla.v_head_dim
    return model.head_size, model.head_size


def _p2p_ms(plan: Plan, layout: Layout, size_bytes: float) -> float:
    """The slowest send between neighbouring stages of replica 0."""
    if layout.pp == 1:
        return 0.0
    hw, worst = plan.hardware, 0.0
    for stage in range(layout.pp - 1):
        src, dst = layout.rank_of(pp=stage), layout.rank_of(pp=stage + 1)
        link = link_for_group([src, dst], hw.gpus_per_node, hw)
        worst = max(worst, p2p_ms(size_bytes, link.bandwidth_gbps, link.latency_us))
    return worst


# ---- KV-cache capacity -------------------------------------------------------------------


@dataclass(frozen=True)
class KVCapacity:
    """KV cache of one replica: blocks, and the memory per GPU behind them (GiB)."""

    num_blocks: int
    block_size: int
    bytes_per_token: tuple[float, ...]  # per stage, per GPU (all its layers)
    free_gib: tuple[float, ...]  # per stage, per GPU: what the cache may use
    weights_gib: tuple[float, ...]
    activations_gib: tuple[float, ...]

    @property
    def tokens(self) -> int:
        """Tokens the cache holds."""
        return self.num_blocks * self.block_size

    @property
    def kv_cache_gib(self) -> float:
        """Cache memory on the busiest GPU when every block is in use."""
        return max(b * self.tokens for b in self.bytes_per_token) / GIB


def kv_capacity(plan: Plan, layout: Layout) -> KVCapacity:
    """KV-cache blocks of one replica (module docstring; ``num_gpu_blocks`` overrides)."""
    model, par, hw = plan.model, plan.parallel, plan.hardware
    req = plan.workload.requests
    counts = count_params(model)
    usable = req.gpu_memory_utilization * (hw.memory_gib - hw.memory_reserved_gib) * GIB
    per_layer = kv_bytes_per_token_layer(model, par.tp)
    bpe = DTYPE_BYTES[model.dtype]
    bytes_per_token, free, weights, acts = [], [], [], []
    for stage, layers in enumerate(layout.stage_layers):
        layers = [i for i in layers if i < model.num_layers]
        dense, experts = stage_params_per_gpu(plan, layout, counts, stage)
        w = (dense + experts) * bpe
        a = max((layer_activation_bytes(model, par, i, req.max_num_batched_tokens, 1, "none")
                 for i in layers), default=0.0)  # fmt: skip
        if stage == layout.pp - 1:
            a += 4 * req.max_batch_size * model.vocab_size / par.tp
        if model.moe is not None and any(model.is_moe_layer(i) for i in layers):
            a += 2 * req.max_num_batched_tokens * model.moe.top_k * model.hidden_size * bpe
        bytes_per_token.append(per_layer * len(layers))
        free.append(usable - w - a)
        weights.append(w / GIB)
        acts.append(a / GIB)
    tokens = min(f / b for f, b in zip(free, bytes_per_token, strict=True) if b > 0)
    blocks = req.num_gpu_blocks or max(0, int(tokens // req.kv_block_size))
    return KVCapacity(blocks, req.kv_block_size, tuple(bytes_per_token),
                      tuple(f / GIB for f in free), tuple(weights), tuple(acts))  # fmt: skip

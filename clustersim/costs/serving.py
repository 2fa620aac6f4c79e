"""Costs of serving: per-step op times of one replica and its KV-cache capacity.

A serving *step* runs one forward pass of a batch whose requests each contribute ``q`` new
tokens on top of ``c`` tokens already in their KV cache (decode: ``q = 1``; a prefill chunk:
``q`` prompt tokens). A step is timed from a few sums over its requests, never from per-token
work:

* ``tokens`` = sum of ``q``: every token-wise kernel (norms, attention projections, MLP,
  router, shared experts, residual adds) is timed by the calibrated per-kernel model
  (:class:`clustersim.costs.kernels.KernelTimer`): decode, with few tokens, is bound by
  reading the weights (and, in eager mode, by kernel launches), prefill by FLOPs;
* the KV-cache write (vLLM's ``reshape_and_cache``: the step's new keys and values, MLA: the
  latent, copied into the paged cache), one plain stream kernel per layer; an engine that
  fuses element-wise kernels (``workload.requests.fused_elementwise``: TensorRT-LLM's
  QKV preprocessing kernel) applies the rotary embedding in the same kernel (one
  element-wise kernel: the rotary embedding's pass, plus the cache's bytes at the
  plain-stream rate);
* MLA decode steps run absorbed: the key/value up-projection as two batched GEMMs (one
  kernel more, the same weights) and core attention in the latent space
  (:func:`decode_flops_per_pair`);
* core attention (causal, flash): ``pairs`` = sum of ``q*c + q*(q+1)/2`` query-key pairs at
  ``2 * heads/t * (d_qk + d_v)`` FLOPs each, at the FlashAttention efficiency of the step's
  mean query length ``tokens / seqs``; or the KV cache read (``kv_read`` = sum of ``c + q``
  tokens at the cache's bytes per token and layer, MLA: the latent) plus the queries and
  outputs, at the decode-attention fraction of HBM bandwidth, whichever is longer; a
  ``per_head`` decode kernel (``workload.requests.decode_attention``) reads each GQA K/V head
  once per query head, the re-reads from L2 (:meth:`KernelTimer.decode_kv_ms_per_byte`);
* output layer: a GEMM for ``seqs`` rows (one sampled token per scheduled request), plus
  the engine's host time per step that the GPU waits for (``workload.requests.step_host_us``:
  input preparation and sampling run eagerly between two forward passes), charged with the
  output layer, on the last stage, once per micro-batch (once per step without pipelining);
* TP all-reduce of the activations (``tokens * h`` elements), two per dense layer, one per
  MoE layer; replayed from a CUDA graph, the lower of the calibrated collective (its per-call
  base latency replaced by one graph launch) and NCCL's low-latency (LL) ring inside a node
  (:func:`low_latency_all_reduce_ms`), which small decode messages use; pipeline send of
  ``tokens * h / t`` elements between stages;
* launches: decode-only steps replay CUDA graphs when ``workload.requests.cuda_graphs`` (the
  serving engines' default), other steps launch eagerly
  (:func:`clustersim.costs.kernels.uses_graphs`).

The routed experts and their all-to-alls depend on the sampled routing and are timed by the
engine (``engine/serving_moe.py``) with the same kernel model.

**KV-cache capacity** (vLLM's rule, :func:`clustersim.costs.memory.serving_memory`, the one
serving memory model that the audit reports too): of ``gpu_memory_utilization x (memory_gib -
memory_reserved_gib)`` per GPU, what remains after the weights, one step's activations (at most
``max_num_batched_tokens`` tokens, plus fp32 logits of ``max_batch_size`` rows on the last
stage) and the MoE all-to-all buffers holds the cache. All stages hold the same tokens, so the
replica's capacity is the smallest over stages of free bytes / (cache bytes per token of that
stage's layers), rounded down to whole blocks of ``kv_block_size`` tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from clustersim.costs import nccl
from clustersim.costs.comm import collective_time_ms, link_for_group, p2p_ms
from clustersim.costs.compute import kv_heads_per_gpu
from clustersim.costs.kernels import ROTARY, STREAM, KernelTimer, uses_graphs
from clustersim.costs.memory import (
    DTYPE_BYTES,
    GIB,
    kv_cache_bytes_per_token_layer,
    serving_memory,
)
from clustersim.layout import Layout
from clustersim.spec.schema import HardwareSpec, ModelSpec, Plan


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


@dataclass(frozen=True, slots=True)
class LowerOf:
    """The smaller of two affine times (two protocols of one collective), in ms; either may
    itself be a :class:`LowerOf` (the lowest of several)."""

    first: Affine | LowerOf
    second: Affine | LowerOf

    def time_ms(self, tokens):
        """The time for ``tokens`` (a float or a numpy array)."""
        return np.minimum(self.first.time_ms(tokens), self.second.time_ms(tokens))

    def scalar_ms(self, tokens: float) -> float:
        """:meth:`time_ms` for one Python number."""
        a, b = self.first.scalar_ms(tokens), self.second.scalar_ms(tokens)
        return a if a < b else b


def kv_bytes_per_token_layer(model: ModelSpec, tp: int, kv_dtype: str | None = None) -> float:
    """KV-cache bytes one GPU stores per token and layer (memory.py's rule: GQA keeps at least
    one K/V head per GPU; MLA keeps the latent, not split by TP), in ``kv_dtype``."""
    return kv_cache_bytes_per_token_layer(model, tp, kv_dtype)


@dataclass(frozen=True)
class StepCosts:
    """Per-step cost model of one replica (TP group x pipeline stages), in ms.

    :meth:`parts` gives the token-wise times of a micro-batch of ``tokens`` over ``seqs``
    requests; :meth:`core_ms` its core attention per layer. The routed experts come from the
    engine.
    """

    eager: KernelTimer
    graph: KernelTimer
    cuda_graphs: bool
    attn_flops_per_pair: float  # core attention FLOPs per query-key pair
    attn_flops_per_pair_decode: float  # the same in decode steps (MLA: in the latent space)
    attn_heads: float  # query heads of one GPU: exps per query-key pair (softmax)
    attn_bytes_per_kv_token: float  # KV cache read per token of context
    attn_bytes_per_query_token: float  # queries read and outputs written
    cache_write_bytes_per_token: float  # new K/V (MLA: latent) read and written to the cache
    tp_allreduce: Affine | LowerOf  # one all-reduce of the activations (eager launch); the
    # lowest of NCCL's protocols' affine times (tp_allreduce_envelope)
    tp_allreduce_graph: Affine | LowerOf  # replayed from a CUDA graph: no per-call host time;
    # the same envelope, and NCCL's LL for small messages
    p2p: Affine  # activations to the next pipeline stage
    dense_layers: tuple[int, ...]  # per stage
    moe_layers: tuple[int, ...]  # per stage
    kv_rereads: float = 1.0  # reads of each cached K/V byte per decode step (per_head kernel)
    step_host_ms: float = 0.0  # host work between steps the GPU waits for (with the logits)

    def timer(self, tokens: float, seqs: float) -> KernelTimer:
        """The kernel timer of a step: CUDA graphs for decode-only steps when enabled."""
        return self.graph if uses_graphs(self.cuda_graphs, tokens, seqs) else self.eager

    def parts(self, tokens: float, seqs: float) -> tuple[float, ...]:
        """Dense layer, MoE layer's attention block, logits, one TP all-reduce, pipeline send
        (core attention excluded), then the core attention's ms per pair, per KV byte term
        and its floor, for a micro-batch of ``tokens`` new tokens of ``seqs`` requests."""
        k = self.timer(tokens, seqs)
        decode = tokens == seqs  # one new token per request: MLA runs absorbed
        block = float(k.attention_block_ms(tokens, absorbed=decode))
        if k.fused:  # one kernel rotates the queries and keys and writes the cache
            cache = self.cache_write_bytes_per_token
            block += float(k.fused_memory_ms(tokens, k.rope_bytes_per_token, ROTARY, cache))
        else:
            block += float(k.memory_ms(tokens, self.cache_write_bytes_per_token, STREAM))
        graphs = k is self.graph
        allreduce = (self.tp_allreduce_graph if graphs else self.tp_allreduce).scalar_ms(tokens)
        dense = block + float(k.dense_mlp_ms(tokens)) + 2 * allreduce
        attn = block + float(k.moe_block_ms(tokens)) + allreduce
        logits = float(k.logits_ms(seqs)) + self.step_host_ms
        flops_per_pair = self.attn_flops_per_pair_decode if decode else self.attn_flops_per_pair
        # one exp per pair and query head of this GPU, in decode (MLA absorbed) too
        per_pair, per_query = k.attention_ms_per_pair(flops_per_pair, self.attn_heads)
        per_kv_byte = k.decode_kv_ms_per_byte(self.kv_rereads) if decode else k.kv_ms_per_byte
        return (
            dense,
            attn,
            logits,
            allreduce,
            self.p2p.scalar_ms(tokens),
            per_pair,
            per_query,
            per_kv_byte,
            k.fixed_ms + k.gap_ms,
            k.launch_ms,
            k.framework_ms,
        )


def core_attention_ms(parts, pairs, kv_tokens, tokens, costs: StepCosts, vmax=max):
    """Core attention of one layer from a micro-batch's sums (``pairs`` and ``kv_tokens`` may
    be arrays over decode steps): the FLOPs (``pairs`` plus ``half_seq`` per query row) or the
    bytes read, whichever is longer, plus the kernel's fixed time, issued as one kernel
    (:meth:`KernelTimer.issue`)."""
    per_pair, per_query, per_kv_byte, fixed, launch, framework = parts[5:11]
    kv_bytes = kv_tokens * costs.attn_bytes_per_kv_token
    kv_bytes = kv_bytes + tokens * costs.attn_bytes_per_query_token
    gpu = vmax(pairs * per_pair + tokens * per_query, kv_bytes * per_kv_byte) + fixed
    return vmax(gpu, launch) + framework


def step_costs(plan: Plan, layout: Layout) -> StepCosts:
    """The cost model of ``plan`` (one replica; every replica is alike)."""
    model, hw, tp = plan.model, plan.hardware, plan.parallel.tp
    bpe = DTYPE_BYTES[model.dtype]
    qk_dim, v_dim = head_dims(model)
    heads = model.num_attention_heads / tp
    ranks = [layout.rank_of(tp=t) for t in range(tp)]
    gpn = hw.gpus_per_node
    par = plan.parallel

    def timer(graphs: bool) -> KernelTimer:
        return KernelTimer(
            model,
            hw,
            tp,
            par.expert_tp,
            graphs=graphs,
            training=False,
            fused=plan.workload.requests.fused_elementwise,
        )

    graph_hw = graph_replay_hardware(hw)

    def low_latency_ms(n: float) -> float:
        return low_latency_all_reduce_ms(n * model.hidden_size * bpe, ranks, gpn, hw)

    graph_allreduce = tp_allreduce_envelope(model.hidden_size * bpe, ranks, gpn, graph_hw)
    if tp > 1 and low_latency_ms(1) < float("inf"):
        graph_allreduce = LowerOf(graph_allreduce, Affine.of(low_latency_ms))

    return StepCosts(
        eager=timer(False),
        graph=timer(True),
        cuda_graphs=plan.workload.requests.cuda_graphs,
        attn_flops_per_pair=2.0 * heads * (qk_dim + v_dim),
        attn_flops_per_pair_decode=decode_flops_per_pair(model, tp),
        attn_heads=heads,
        attn_bytes_per_kv_token=kv_bytes_per_token_layer(
            model, tp, plan.workload.requests.kv_dtype
        ),
        attn_bytes_per_query_token=heads * (qk_dim + v_dim) * bpe,
        cache_write_bytes_per_token=2.0
        * kv_bytes_per_token_layer(model, tp, plan.workload.requests.kv_dtype),
        tp_allreduce=tp_allreduce_envelope(model.hidden_size * bpe, ranks, gpn, hw),
        tp_allreduce_graph=graph_allreduce,
        p2p=Affine.of(lambda n: _p2p_ms(plan, layout, n * model.hidden_size * bpe / tp)),
        dense_layers=tuple(
            len(s) - m
            for s, m in zip(layout.stage_layers, layout.moe_layers_per_stage, strict=True)
        ),
        moe_layers=tuple(layout.moe_layers_per_stage),
        kv_rereads=decode_kv_rereads(model, tp, plan.workload.requests.decode_attention),
        step_host_ms=plan.workload.requests.step_host_us * 1e-3,
    )


def tp_allreduce_envelope(
    bytes_per_token: float, ranks: list[int], gpus_per_node: int, hw: HardwareSpec
) -> Affine | LowerOf:
    """The TP all-reduce of ``bytes_per_token`` x tokens as a function of tokens: one affine
    time per NCCL protocol and the lowest of them (NCCL's tuner) when the group runs NCCL's
    protocols (``collectives.intra_node_protocols``, a group inside one node): each protocol's
    time is affine in the message, their minimum is not; else the one affine time."""

    def at(protocol: str | None) -> Affine:
        return Affine.of(
            lambda n: collective_time_ms(
                "all_reduce", n * bytes_per_token, ranks, gpus_per_node, hw, protocol=protocol
            )
        )

    if len(ranks) <= 1 or not hw.calibration.collectives.intra_node_protocols:
        return at(None)
    envelope: Affine | LowerOf = at(nccl.PROTOCOLS[0])
    for protocol in nccl.PROTOCOLS[1:]:
        envelope = LowerOf(envelope, at(protocol))
    return envelope


def decode_kv_rereads(model: ModelSpec, tp: int, kernel: str) -> float:
    """Times a decode step reads each cached K/V byte on one GPU: the query heads per K/V
    head (``heads / t`` over :func:`~clustersim.costs.compute.kv_heads_per_gpu`) for a
    ``per_head`` kernel, which launches one thread block per query head and sequence (each
    reads its group's K/V head: TensorRT-LLM's masked MHA kernel
    ``decoderMaskedMultiheadAttention``, vLLM's ``paged_attention_v1/v2``); 1 for a
    ``grouped`` kernel (FlashAttention, FlashInfer, TensorRT-LLM's XQA) and for MLA (one
    latent shared by all heads, read once by FlashMLA-style kernels)."""
    if kernel != "per_head" or model.mla is not None:
        return 1.0
    return (model.num_attention_heads / tp) / kv_heads_per_gpu(model, tp)


def graph_replay_hardware(hw: HardwareSpec) -> HardwareSpec:
    """``hw`` as a CUDA-graph replay sees it: a collective's fixed per-call time (the
    calibrated base latency, mostly host-side launch and synchronisation of an eager call) is
    replaced by one graph launch when that is shorter; its per-step latency and bandwidth are
    unchanged."""
    cal = hw.calibration
    launch_us = cal.kernel.graph_launch_us
    coll = cal.collectives
    collectives = coll.model_copy(
        update={  # never more than the eager call's own fixed time
            "intra_node_base_latency_us": min(launch_us, coll.intra_node_base_latency_us),
            "inter_node_base_latency_us": min(launch_us, coll.inter_node_base_latency_us),
        }
    )
    return hw.model_copy(
        update={"calibration": cal.model_copy(update={"collectives": collectives})}
    )


# NCCL's own latency model of its LL ("low latency") protocol over NVLink, ring algorithm
# (src/graph/tuning.cc: baseLat Ring/LL 6.6 us, hwLat NVLink Ring/LL 0.6 us per step); LL sends
# 4 bytes of data with a 4-byte flag in every 8-byte store, half the link's bandwidth.
LL_BASE_US = nccl.RING_BASE_US["LL"]
LL_STEP_US = nccl.RING_NVLINK_STEP_US["LL"]
LL_BANDWIDTH_SHARE = nccl.LL_BANDWIDTH_SHARE


def low_latency_all_reduce_ms(
    size_bytes: float, ranks: list[int], gpus_per_node: int, hw: HardwareSpec
) -> float:
    """All-reduce of a small message inside one node replayed from a CUDA graph, with the
    low-latency protocol serving engines use for TP activations (NCCL's LL ring, or a custom
    all-reduce at least as fast): ``6.6 + 2(n-1) * 0.6 * scale`` µs of GPU-side latency
    (``scale`` = ``collectives.intra_node_step_latency_scale``) plus ``2(n-1)/n * S`` at half
    the calibrated NVLink bus bandwidth. Infinite (not applicable) for a group that spans
    nodes; 0 for one GPU."""
    n = len(ranks)
    if n <= 1:
        return 0.0
    if link_for_group(ranks, gpus_per_node, hw).crosses_nodes:
        return float("inf")
    bus_gbps = link_for_group(ranks, gpus_per_node, hw).bandwidth_gbps * LL_BANDWIDTH_SHARE
    steps = 2 * (n - 1)
    # the same calibrated per-step latency as the ring model (costs.comm.intra_ring_ms)
    step_us = LL_STEP_US * hw.calibration.collectives.intra_node_step_latency_scale
    return (LL_BASE_US + steps * step_us) * 1e-3 + steps / n * size_bytes / (bus_gbps * 1e6)


def decode_flops_per_pair(model: ModelSpec, tp: int) -> float:
    """Core-attention FLOPs per query-key pair of a decode step on one GPU: ``2 * heads/t *
    (d_qk + d_v)``; MLA decodes absorbed (FlashMLA, FlashInfer MLA), scoring and summing in
    the latent space: ``2 * heads/t * (2 * kv_lora_rank + qk_rope_head_dim)`` (queries against
    the cached latent and its rotary part, then the probabilities times the latent)."""
    heads = model.num_attention_heads / tp
    if model.mla is not None:
        return 2.0 * heads * (2 * model.mla.kv_lora_rank + model.mla.qk_rope_head_dim)
    qk_dim, v_dim = head_dims(model)
    return 2.0 * heads * (qk_dim + v_dim)


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
    """KV cache of one replica: blocks, and the memory per GPU behind them (GiB), per stage.

    The numbers of :func:`clustersim.costs.memory.serving_memory`, which the audit reports
    too (``clustersim check`` and ``run`` print the same memory)."""

    num_blocks: int
    block_size: int
    bytes_per_token: tuple[float, ...]  # per stage, per GPU (all its layers)
    free_gib: tuple[float, ...]  # per stage, per GPU: what the cache may use
    weights_gib: tuple[float, ...]
    activations_gib: tuple[float, ...]
    buffers_gib: tuple[float, ...] = ()  # MoE all-to-all buffers (absent in older traces)

    @property
    def tokens(self) -> int:
        """Tokens the cache holds."""
        return self.num_blocks * self.block_size

    @property
    def stage_kv_gib(self) -> tuple[float, ...]:
        """Per stage: cache memory per GPU, every block allocated."""
        return tuple(b * self.tokens / GIB for b in self.bytes_per_token)

    @property
    def peak_stage(self) -> int:
        """The stage whose GPUs hold the most (weights + activations + buffers + cache), the
        first on ties: the memory report's peak stage."""
        buffers = self.buffers_gib or (0.0,) * len(self.weights_gib)
        parts = zip(self.weights_gib, self.activations_gib, buffers, self.stage_kv_gib, strict=True)
        totals = [w + a + b + kv for w, a, b, kv in parts]
        return totals.index(max(totals))

    @property
    def kv_cache_gib(self) -> float:
        """Cache memory per GPU of the peak stage (what ``check`` reports as KV)."""
        return self.stage_kv_gib[self.peak_stage]


def kv_capacity(plan: Plan, layout: Layout) -> KVCapacity:
    """KV-cache blocks of one replica: :func:`~clustersim.costs.memory.serving_memory`
    (module docstring; ``num_gpu_blocks`` overrides)."""
    mem = serving_memory(plan, layout)
    return KVCapacity(
        mem.num_blocks,
        mem.block_size,
        mem.kv_bytes_per_token,
        mem.free_gib,
        mem.weights_gib,
        mem.activations_gib,
        mem.buffers_gib,
    )

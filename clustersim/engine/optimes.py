"""Op times the engine needs, looked up in ``costs`` once per (lane, micro-batch).

A micro-batch is a list of sequence lengths (packed, variable-length attention): linear ops
scale with the total token count, core attention with the sum of squared lengths. Every
layer of a kind (dense / MoE) has the same per-layer times, so one lookup serves all layers.

Per layer and direction the lane (a TP group in lockstep) runs:
attention block (QKV, core attention, output projection; plus router and shared experts in an
MoE layer), the dense MLP or the routed experts, and two TP collectives (all-reduce, or
all-gather + reduce-scatter with sequence parallelism), all timed analytically.
Backward = 2 x forward compute; recompute adds the forward again (full) or the core attention
forward (selective) to the backward. Communication volumes of the backward equal the forward's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from clustersim.costs import compute as cc
from clustersim.costs.comm import collective_time_ms, link_for_group, p2p_ms
from clustersim.spec.schema import Plan

GRAD_BYTES = 4  # Megatron reduces fp32 main gradients (bf16/fp16 training)
OPTIMIZER_BYTES_PER_PARAM = 36  # Adam step: reads p,g,m,v,master (2+4+4+4+4), writes p,m,v,master


@dataclass(frozen=True)
class LayerTimes:
    """Forward and backward times (ms) of one layer kind for one lane and micro-batch."""

    attn_fwd_ms: float
    mlp_fwd_ms: float  # dense MLP; 0 for MoE layers (experts are timed per rank)
    tp_comm_ms: float  # the layer's TP collectives, per direction
    recompute_ms: float  # compute added to the backward
    recompute_comm_ms: float = 0.0  # TP collectives of a full recompute

    @property
    def attn_bwd_ms(self) -> float:
        """Backward of the attention block (2 x forward)."""
        return cc.BACKWARD_FACTOR * self.attn_fwd_ms

    @property
    def mlp_bwd_ms(self) -> float:
        """Backward of the dense MLP (2 x forward)."""
        return cc.BACKWARD_FACTOR * self.mlp_fwd_ms


class MicrobatchCosts:
    """Times of every op of one micro-batch on one lane (TP group ``ranks``)."""

    def __init__(self, plan: Plan, ranks: list[int], seq_lens: np.ndarray):
        self.plan = plan
        self.ranks = ranks
        self.seq_lens = seq_lens
        self.tokens = int(seq_lens.sum())
        self._tp = plan.parallel.tp

    def _attention_cost(self, moe_layer: bool) -> cc.OpCost:
        model, tokens = self.plan.model, self.tokens
        cost = cc.qkv_projection(tokens, model, self._tp)
        cost = cost + cc.attention_output_projection(tokens, model, self._tp)
        cost = cost + self._core_attention
        if moe_layer:
            cost = cost + cc.router(tokens, model)
            if model.moe and model.moe.num_shared_experts:
                cost = cost + cc.shared_expert_mlp(tokens, model, self._tp)
        return cost

    @cached_property
    def _core_attention(self) -> cc.OpCost:
        """Core attention over the micro-batch's sequences (the quadratic term)."""
        flash = self.plan.parallel.flash_attention
        lens, counts = np.unique(self.seq_lens, return_counts=True)
        total = cc.ZERO_OP
        for s, n in zip(lens.tolist(), counts.tolist(), strict=True):
            total = total + cc.core_attention(n, s, self.plan.model, self._tp, flash=flash)
        return total

    def _tp_comm_ms(self, moe_layer: bool) -> float:
        """TP collectives per layer and direction on the activations [tokens, h]: two in a
        dense layer (after attention and after the MLP), one in an MoE layer (after attention;
        the experts' tokens move by all-to-all and ETP collectives instead)."""
        if self._tp == 1:
            return 0.0
        plan = self.plan
        size = self.tokens * plan.model.hidden_size * cc.DTYPE_BYTES[plan.model.dtype]
        gpn, hw = plan.hardware.gpus_per_node, plan.hardware
        if plan.parallel.sequence_parallel:
            one = collective_time_ms("all_gather", size, self.ranks, gpn, hw)
            one += collective_time_ms("reduce_scatter", size, self.ranks, gpn, hw)
        else:
            one = collective_time_ms("all_reduce", size, self.ranks, gpn, hw)
        return one if moe_layer else 2 * one

    def _layer(self, moe_layer: bool) -> LayerTimes:
        hw, model = self.plan.hardware, self.plan.model
        sp = self.plan.parallel.sequence_parallel
        elementwise = cc.elementwise(self.tokens, model, self._tp, sp, mlp=not moe_layer)
        attn = self._attention_cost(moe_layer).time_ms(hw) + elementwise.time_ms(hw)
        attn += cc.kernel_overhead_ms(cc.KERNELS_PER_FORWARD["attention"], hw)
        mlp = 0.0
        if not moe_layer:
            mlp = cc.dense_mlp(self.tokens, model, self._tp).time_ms(hw)
            mlp += cc.kernel_overhead_ms(cc.KERNELS_PER_FORWARD["mlp"], hw)
        recompute, tp_comm = self.plan.parallel.recompute, self._tp_comm_ms(moe_layer)
        extra_comm = 0.0
        if recompute == "full":  # the forward again, TP collectives included
            extra, extra_comm = attn + mlp, tp_comm  # experts: added per rank by the engine
        elif recompute == "selective":
            extra = self._core_attention.time_ms(hw)
        else:
            extra = 0.0
        return LayerTimes(attn, mlp, tp_comm, extra, extra_comm)

    @cached_property
    def dense(self) -> LayerTimes:
        """Times of a dense layer."""
        return self._layer(moe_layer=False)

    @cached_property
    def moe(self) -> LayerTimes:
        """Times of an MoE layer (experts excluded)."""
        return self._layer(moe_layer=True)

    @cached_property
    def logits_fwd_ms(self) -> float:
        """Output layer (logits) forward on the last stage."""
        return cc.logits(self.tokens, self.plan.model, self._tp).time_ms(self.plan.hardware)

    @cached_property
    def p2p_bytes(self) -> float:
        """Activation (or gradient) bytes sent between stages, scattered over TP."""
        model = self.plan.model
        return self.tokens * model.hidden_size * cc.DTYPE_BYTES[model.dtype] / self._tp


class ExpertTimer:
    """Vectorised expert GEMM times: time(tokens) = max(a * tokens, b * tokens + w) per rank.

    The coefficients come from :func:`costs.compute.expert_mlp` (FLOPs linear in tokens; HBM
    bytes linear in tokens plus the weights of the experts that got tokens).
    """

    def __init__(self, plan: Plan):
        model, hw, etp = plan.model, plan.hardware, plan.parallel.expert_tp
        one, two = cc.expert_mlp(1, model, etp, 1), cc.expert_mlp(2, model, etp, 1)
        flop_rate = hw.peak_tflops * 1e12 * hw.compute_efficiency
        byte_rate = hw.hbm_bandwidth_gbps * 1e9
        self.ms_per_token_compute = one.flops / flop_rate * 1e3
        per_token_bytes = two.hbm_bytes - one.hbm_bytes
        self.ms_per_token_memory = per_token_bytes / byte_rate * 1e3
        self.ms_per_expert_weights = (one.hbm_bytes - per_token_bytes) / byte_rate * 1e3
        self.overhead_ms = cc.kernel_overhead_ms(cc.KERNELS_PER_FORWARD["experts"], hw)

    def forward_ms_one(self, tokens: float, active_experts: float) -> float:
        """Forward time of one rank's expert GEMMs (scalar version of :meth:`forward_ms`)."""
        if tokens <= 0:
            return 0.0
        compute = tokens * self.ms_per_token_compute
        memory = tokens * self.ms_per_token_memory + active_experts * self.ms_per_expert_weights
        return (compute if compute > memory else memory) + self.overhead_ms

    def forward_ms(self, tokens: np.ndarray, active_experts: np.ndarray) -> np.ndarray:
        """Forward time of each rank's expert GEMMs for its token count."""
        compute = tokens * self.ms_per_token_compute
        memory = tokens * self.ms_per_token_memory + active_experts * self.ms_per_expert_weights
        return np.where(tokens > 0, np.maximum(compute, memory) + self.overhead_ms, 0.0)


def p2p_time_ms(plan: Plan, src: int, dst: int, size_bytes: float) -> float:
    """Point-to-point transfer between two GPUs (NVLink inside a node, else the network)."""
    link = link_for_group([src, dst], plan.hardware.gpus_per_node, plan.hardware)
    return p2p_ms(size_bytes, link.bandwidth_gbps, link.latency_us)


def optimizer_ms(plan: Plan, params_per_gpu: float) -> float:
    """Adam step: HBM-bound pass over the parameters this GPU updates."""
    return cc.op_time_ms(0.0, params_per_gpu * OPTIMIZER_BYTES_PER_PARAM, plan.hardware)

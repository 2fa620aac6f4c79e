"""Op times the engine needs, looked up in ``costs`` once per (lane, micro-batch).

A micro-batch is a list of sequence lengths (packed, variable-length attention): linear ops
scale with the total token count, core attention with the sum of squared lengths. Every
layer of a kind (dense / MoE) has the same per-layer times, so one lookup serves all layers.

Per layer and direction the lane (a TP group in lockstep) runs:
attention block (QKV, core attention, output projection; plus router and shared experts in an
MoE layer), the dense MLP or the routed experts, and two TP collectives (all-reduce, or
all-gather + reduce-scatter with sequence parallelism), all timed analytically.
Backward = 2 x forward compute; recompute adds the forward again (full) or, selective, the
forward of ``parallel.recompute_modules`` (default: core attention) to the backward.
Communication volumes of the backward equal the forward's.
A backward split into input and weight gradients (DualPipe's B and W) gives W the forward time
of the weighted ops (a weight-gradient GEMM has the forward's shape) and B the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from clustersim.costs import compute as cc
from clustersim.costs.comm import collective_time_ms
from clustersim.costs.context_parallel import RingAttention, ring_attention
from clustersim.costs.kernels import KernelTimer
from clustersim.spec.schema import Plan

# Megatron reduces FP32 main gradients under BF16 / FP8 (arguments.py forces
# accumulate_allreduce_grads_in_fp32 for bf16) and FP16 ones under FP16 (the flag's default);
# the engine takes the type from costs/precision.training_bytes_per_param.
GRAD_BYTES = 4
OPTIMIZER_BYTES_PER_PARAM = 36  # Adam step: reads p,g,m,v,master (2+4+4+4+4), writes p,m,v,master


@dataclass(frozen=True)
class LayerTimes:
    """Forward and backward times (ms) of one layer kind for one lane and micro-batch."""

    attn_fwd_ms: float
    mlp_fwd_ms: float  # dense MLP; 0 for MoE layers (experts are timed per rank)
    tp_comm_ms: float  # the layer's TP collectives, per direction
    recompute_ms: float  # compute added to the backward
    recompute_comm_ms: float = 0.0  # TP collectives of a full recompute
    ring: RingAttention | None = None  # context parallelism's ring attention (cp > 1)
    recompute_ring: bool = False  # the recompute runs the ring attention again
    core_attn_fwd_ms: float = 0.0  # the core attention's part of attn_fwd_ms
    core_bwd_ratio: float = cc.BACKWARD_FACTOR  # its backward time over its forward time
    # the weight-gradient share of the backward (DualPipe's W): the forward time of the
    # layer's weighted ops (attention block without core attention, router and shared
    # experts, dense MLP); core attention has no weights, its backward is all input gradients
    weights_ms: float = 0.0

    @property
    def attn_bwd_ms(self) -> float:
        """Backward of the attention block: 2 x the forward of its GEMMs and element-wise
        kernels, ``core_bwd_ratio`` x the core attention's forward (FlashAttention's backward
        recomputes the scores: 2.5 x the forward's matmul FLOPs, at a lower rate)."""
        core = self.core_attn_fwd_ms
        return cc.BACKWARD_FACTOR * (self.attn_fwd_ms - core) + self.core_bwd_ratio * core

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
        self._tp, self._cp = plan.parallel.tp, plan.parallel.cp
        # context parallelism: each CP rank holds 1/cp of every sequence (2 of its 2 cp chunks)
        self.tokens = int(seq_lens.sum()) if self._cp == 1 else float(seq_lens.sum()) / self._cp
        self._kernels = kernel_timer(plan)

    @cached_property
    def _core_attention_ms(self) -> float:
        """Core attention over the micro-batch's sequences (the quadratic term), one kernel
        per distinct length; with context parallelism this rank's 1/cp share of it (causal
        load balancing gives every CP rank the same share)."""
        flash = self.plan.parallel.flash_attention
        lens, counts = np.unique(self.seq_lens, return_counts=True)
        total = 0.0
        for s, n in zip(lens.tolist(), counts.tolist(), strict=True):
            # flash kernels skip the masked half of causal attention; unfused ones do not
            op = cc.core_attention(n, s, self.plan.model, self._tp, causal=flash, flash=flash)
            op = op.scaled(1.0 / self._cp) if self._cp > 1 else op
            keys = (s + 1) / 2 if flash else s  # keys per query: causal sees half on average
            total += float(self._kernels.core_attention_ms(op.flops, op.hbm_bytes, keys, flash))
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
        k, tokens = self._kernels, self.tokens
        # a dense layer's pre-MLP norm feeds its FC1 alone: fused norm + linear under FP8
        fused_mlp = not moe_layer
        attn = float(k.attention_block_ms(tokens, mlp_input_fp8=fused_mlp))
        attn += self._core_attention_ms
        mlp = 0.0
        if moe_layer:
            attn += float(k.moe_block_ms(tokens))
        else:
            mlp = float(k.dense_mlp_ms(tokens, input_fp8=True))
        recompute, tp_comm = self.plan.parallel.recompute, self._tp_comm_ms(moe_layer)
        extra_comm = 0.0
        if recompute == "full":  # the forward again, TP collectives included
            extra, extra_comm = attn + mlp, tp_comm  # experts: added per rank by the engine
        else:  # selective: the forward of the named modules (none: nothing)
            extra = self._selective_ms(moe_layer, mlp)
        ring = self._ring if self._cp > 1 else None
        weights = attn - self._core_attention_ms + mlp
        return LayerTimes(
            attn,
            mlp,
            tp_comm,
            extra,
            extra_comm,
            ring,
            recompute != "none",
            core_attn_fwd_ms=self._core_attention_ms,
            core_bwd_ratio=self._core_bwd_ratio,
            weights_ms=weights,
        )

    def _selective_ms(self, moe_layer: bool, mlp_ms: float) -> float:
        """Forward time the backward of one layer runs again under selective recompute
        (``parallel.recompute_modules``, default core attention) on the attention lane: core
        attention, MLA's up-projections (``mla_up_proj``), a dense layer's MLP (``mlp``; an
        MoE layer's experts are not an MLP module), the norms that are modules of their own
        (``layernorm``). The experts' activation (``moe_act``) is
        added per rank with the experts' own times (:meth:`ExpertTimer.recompute_ms`)."""
        modules = self.plan.parallel.selective_modules
        extra = self._core_attention_ms if "core_attn" in modules else 0.0
        if "mla_up_proj" in modules:
            extra += float(self._kernels.mla_up_proj_ms(self.tokens))
        if "mlp" in modules and not moe_layer:
            extra += mlp_ms
        if "layernorm" in modules:
            extra += float(self._kernels.standalone_norms_ms(self.tokens, moe_layer))
        return extra

    @property
    def _core_bwd_ratio(self) -> float:
        """Backward over forward time of the core attention: the calibrated FlashAttention
        ratio (``attention.backward_ratio``) with fused kernels, 2 for unfused attention
        (its backward is two GEMMs per forward GEMM, like every other layer)."""
        if not self.plan.parallel.flash_attention:
            return cc.BACKWARD_FACTOR
        return self.plan.hardware.calibration.attention.backward_ratio

    @cached_property
    def _ring(self) -> RingAttention:
        """Ring attention of this rank's CP group (the ranks at its TP slot, every CP rank)."""
        par, first = self.plan.parallel, self.ranks[0]
        base = first - self._tp * ((first // self._tp) % self._cp)
        group = [base + self._tp * j for j in range(self._cp)]
        return ring_attention(
            self.tokens,
            self._core_attention_ms,
            self.plan.model,
            par.tp,
            group,
            self.plan.hardware,
            self._core_bwd_ratio,
        )

    @cached_property
    def dense(self) -> LayerTimes:
        """Times of a dense layer."""
        return self._layer(moe_layer=False)

    @cached_property
    def moe(self) -> LayerTimes:
        """Times of an MoE layer (experts excluded)."""
        return self._layer(moe_layer=True)

    @property
    def _heads(self) -> int:
        """Output layers run on the last stage: the model's, and one per MTP module
        (``model.mtp_layers``: each computes the logits and loss of its own hidden states)."""
        return 1 + self.plan.model.mtp_layers

    @cached_property
    def logits_fwd_ms(self) -> float:
        """Output layer (logits GEMM and cross-entropy loss) forward on the last stage."""
        k = self._kernels
        one = float(k.logits_ms(self.tokens)) + float(k.cross_entropy_ms(self.tokens))
        return self._heads * one

    @cached_property
    def logits_bwd_ms(self) -> float:
        """Output layer backward: the loss's backward, then two GEMMs per forward GEMM."""
        k = self._kernels
        gemms = cc.BACKWARD_FACTOR * float(k.logits_ms(self.tokens))
        return self._heads * (gemms + float(k.cross_entropy_ms(self.tokens, backward=True)))

    @cached_property
    def logits_weights_ms(self) -> float:
        """The output layer's weight-gradient GEMM (DualPipe's W share of its backward)."""
        return self._heads * float(self._kernels.logits_ms(self.tokens))

    @cached_property
    def p2p_bytes(self) -> float:
        """Activation (or gradient) bytes sent between stages, scattered over TP."""
        model = self.plan.model
        return self.tokens * model.hidden_size * cc.DTYPE_BYTES[model.dtype] / self._tp


def kernel_timer(plan: Plan, graphs: bool = False) -> KernelTimer:
    """The kernel timer of one GPU of ``plan``'s TP groups (training: eager launches)."""
    par = plan.parallel
    return KernelTimer(
        plan.model,
        plan.hardware,
        par.tp,
        par.expert_tp,
        sequence_parallel=par.sequence_parallel,
        graphs=graphs,
        training=plan.workload.mode == "training",
        fp8_dispatch=par.moe_dispatcher == "deepep",
        fused=plan.workload.mode == "inference" and plan.workload.requests.fused_elementwise,
        fused_cross_entropy=par.fused_cross_entropy,
    )


class ExpertTimer:
    """Vectorised forward time of each rank's routed experts for its received token copies
    and active experts (:meth:`KernelTimer.experts_ms`), plus the dropless synchronisation
    when experts have no capacity.

    Dropless synchronisation (Megatron-Core's all-to-all dispatcher, ``cuda_sync_point``):
    the host copies the per-expert token counts to host memory and waits for them before it
    can size the all-to-all and the grouped GEMM, so the GPU drains its queue, waits the
    device-to-host round trip (``moe.dropless_sync_us``) and then the host's launch of the
    next kernel (``kernel.launch_us + kernel.framework_us``). Once per MoE layer and forward
    pass (the backward reuses the forward's counts; a full recompute pays it again).
    """

    def __init__(self, plan: Plan, graphs: bool = False, sync: bool = True):
        self.kernels = kernel_timer(plan, graphs)
        # Megatron-Core's ``moe_act`` selective recompute: the activation runs again
        self.recompute_act = "moe_act" in plan.parallel.selective_modules
        moe = plan.model.moe
        # sync also marks Megatron-Core's training dispatcher (serving engines fuse the sort):
        # copies from several sources (EP x ETP ranks) re-sorted for several local experts
        ep, etp = plan.parallel.ep, plan.parallel.expert_tp
        self.chunk_sort = sync and moe is not None and ep * etp > 1 and moe.num_experts > ep
        dropless = sync and moe is not None and moe.capacity_factor is None
        cal = plan.hardware.calibration
        relaunch_us = cal.kernel.launch_us + cal.kernel.framework_us
        sync_us = cal.moe.dropless_sync_us + relaunch_us if dropless else 0.0
        self.sync_ms = sync_us * 1e-3

    def forward_ms_one(self, tokens: float, active_experts: float) -> float:
        """Forward time of one rank's expert GEMMs (scalar version of :meth:`forward_ms`)."""
        if tokens <= 0:
            return 0.0
        ms = self.kernels.experts_ms(tokens, active_experts, self.chunk_sort)
        return float(ms) + self.sync_ms

    def compute_ms(self, tokens: np.ndarray, active_experts: np.ndarray) -> np.ndarray:
        """Forward kernel time of each rank's experts (no synchronisation)."""
        ms = self.kernels.experts_ms(tokens, active_experts, self.chunk_sort)
        return np.where(tokens > 0, ms, 0.0)

    def recompute_ms(self, tokens: np.ndarray) -> np.ndarray:
        """Forward time each rank's backward runs again under selective recompute: the
        experts' activation with ``moe_act``, else nothing."""
        if not self.recompute_act:
            return np.zeros_like(np.asarray(tokens, dtype=float))
        ms = self.kernels.experts_activation_ms(tokens)
        return np.where(tokens > 0, ms, 0.0)

    def forward_ms(self, tokens: np.ndarray, active_experts: np.ndarray) -> np.ndarray:
        """Forward time of each rank's expert GEMMs for its token count."""
        ms = self.kernels.experts_ms(tokens, active_experts, self.chunk_sort)
        return np.where(tokens > 0, ms + self.sync_ms, 0.0)


def optimizer_ms(plan: Plan, params_per_gpu: float) -> float:
    """Adam step: HBM-bound pass over the parameters this GPU updates."""
    return cc.op_time_ms(0.0, params_per_gpu * OPTIMIZER_BYTES_PER_PARAM, plan.hardware)

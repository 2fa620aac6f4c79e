"""Roofline bounds: the throughput a plan could reach at the GPUs' peak FLOP/s and HBM
bandwidth, with no communication, no pipeline bubble and no kernel overhead.

``roofline_throughput_tokens_per_ms`` is what a "theoretical throughput" claim is held
against; ``roofline_ratio_pct`` = simulated / bound x 100 says how much of it the plan reaches.
Both are bounds the simulation can never beat:

* training: an iteration's model FLOPs (causal attention, no recompute) spread evenly over all
  GPUs at peak, or every data-parallel replica reading its dense (non-expert) weights once per
  micro-batch at full HBM bandwidth, whichever takes longer;
* serving: every processed token (prompt or output) costs at least one forward pass at a
  context of one token (projections, FFN of the activated experts, logits) at peak FLOP/s, or
  a step of at most ``max_num_batched_tokens`` tokens per pipeline stage in flight reads the
  replica's dense weights at full HBM bandwidth, whichever is slower.

FP8 models (``model.dtype: fp8``) are bounded at the GPU's FP8 peak (no GEMM runs faster) and
read one FP8 copy of their weights (costs/precision.py), so the bounds stay bounds.
"""

from __future__ import annotations

from clustersim.costs import precision
from clustersim.costs.compute import (
    ACTIVATION_MATRICES,
    head_dims,
    model_flops_per_iteration,
    qkv_shapes,
)
from clustersim.spec.schema import HardwareSpec, ModelSpec, Plan


def peak_tflops(model: ModelSpec, hw: HardwareSpec) -> float:
    """The fastest any GEMM of ``model`` runs on ``hw``: the FP8 peak for FP8 models."""
    if precision.is_fp8(model) and hw.fp8_peak_tflops is not None:
        return hw.fp8_peak_tflops
    return hw.peak_tflops


def dense_weight_bytes(model: ModelSpec) -> float:
    """Bytes of the weights every token passes through whatever its routing: attention
    projections of every layer, dense-layer FFNs, the logits (expert weights excluded)."""
    h = model.hidden_size
    _qk, v_dim = head_dims(model)
    attention = sum(k * n for k, n in qkv_shapes(model, 1)) + model.num_attention_heads * v_dim * h
    phi = ACTIVATION_MATRICES[model.activation]
    dense = sum(
        phi * h * model.dense_ffn for i in range(model.num_layers) if not model.is_moe_layer(i)
    )
    params = model.num_layers * attention + dense + model.vocab_size * h
    return params * precision.inference_weight_bytes(model)


def training_roofline(plan: Plan, tokens: float, lengths: dict[int, int]) -> float:
    """Tokens per ms of one training iteration at the roofline (module docstring); ``lengths``
    maps each sequence length of the iteration to its number of sequences."""
    hw, par = plan.hardware, plan.parallel
    flops = sum(
        model_flops_per_iteration(plan.model, c, s, causal=True) for s, c in lengths.items()
    )
    gpus = par.world_size
    compute_ms = flops / (gpus * peak_tflops(plan.model, hw) * 1e12) * 1e3
    reads = dense_weight_bytes(plan.model) * par.num_microbatches * par.dp
    memory_ms = reads / (gpus * hw.hbm_bandwidth_gbps * 1e9) * 1e3
    return tokens / max(compute_ms, memory_ms)


def serving_roofline(plan: Plan) -> float:
    """Tokens (prompt + output) per ms a serving deployment could process at the roofline
    (disaggregated: the sum of the pools' bounds)."""
    hw, par, req = plan.hardware, plan.parallel, plan.workload.requests
    if par.disaggregated:  # each pool processes at most its own bound's tokens
        return sum(serving_roofline(plan.pool(name)) for name in ("prefill", "decode"))
    per_token = model_flops_per_iteration(plan.model, 1, 1, causal=True) / 3  # forward only
    compute = par.world_size * peak_tflops(plan.model, hw) * 1e12 / per_token / 1e3
    replica_gpus = par.world_size // par.dp
    step_ms = dense_weight_bytes(plan.model) / (replica_gpus * hw.hbm_bandwidth_gbps * 1e9) * 1e3
    memory = par.dp * req.max_num_batched_tokens * par.pp / step_ms
    return min(compute, memory)


def bound_metrics(bound: float, throughput: float | None) -> dict[str, float | None]:
    """The two metrics every run reports: the bound, and simulated / bound in %."""
    ratio = None if throughput is None else 100 * throughput / bound
    return {"roofline_throughput_tokens_per_ms": bound, "roofline_ratio_pct": ratio}

"""Number formats: bytes per element and per parameter of each ``model.dtype`` and FP8 recipe.

``model.dtype: fp8`` trains (or serves) with FP8 GEMMs under one of three recipes
(``model.fp8_recipe``), as Transformer Engine / Megatron-Core implement them:

* ``tensorwise``: one FP32 scale per tensor (delayed or current scaling); no per-element
  overhead;
* ``blockwise``: DeepSeek-V3's scaling, one FP32 scale per 1 x 128 block of activations and
  gradients and per 128 x 128 block of weights: 4/128 bytes per activation element, 4/128^2
  per weight element;
* ``mxfp8``: OCP microscaling (Blackwell tensor cores), one E8M0 byte per 32 elements of every
  FP8 tensor: 1/32 byte per element.

What stays in higher precision (all recipes): activations between kernels (norms, residual,
attention, router, all BF16), core attention, the router and the output layer (logits); the
master weights (FP32), the gradients reduced over data parallelism (FP32 main gradients) and
the Adam moments (FP32). What is FP8: the inputs of the linear layers (QKV, attention output
projection, MLP / shared and routed experts) and, with FP8 primary weights (Megatron-Core's
``--fp8-param-gather``, what its FP8 recipes run), the model's weights: a row-wise and a
column-wise (transposed) copy, as the forward and the backward GEMMs need both layouts.
"""

from __future__ import annotations

from clustersim.spec.schema import ModelSpec

# Bytes of one activation, gradient or BF16/FP16/FP32 weight element. FP8 plans keep BF16
# between kernels: only the GEMMs' operands are FP8.
ACTIVATION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 2}
# Bytes of one KV-cache element (workload.requests.kv_dtype).
KV_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}
FP8_BYTES = 1.0
# Scale bytes per FP8 element (activations / gradients, weights) of each recipe.
ACTIVATION_SCALE_BYTES = {"tensorwise": 0.0, "blockwise": 4 / 128, "mxfp8": 1 / 32}
WEIGHT_SCALE_BYTES = {"tensorwise": 0.0, "blockwise": 4 / 128**2, "mxfp8": 1 / 32}
# Copies of an FP8 weight (and of a quantised activation) training keeps: row-wise for the
# forward GEMM, column-wise for the backward ones. Inference keeps the row-wise one only.
TRAINING_FP8_COPIES = 2
# Training bytes per parameter (weights, gradients, optimizer states) of the 16/32-bit types
# (Megatron distributed-optimizer table; reference.md).
TRAINING_BYTES_PER_PARAM = {
    "bf16": (2.0, 4.0, 12.0),
    "fp16": (2.0, 2.0, 16.0),
    "fp32": (4.0, 4.0, 8.0),
}
# FP8: FP32 main gradients (4) and FP32 master weights + Adam m, v (12), as BF16 training.
FP8_GRAD_BYTES, FP8_OPTIMIZER_BYTES = 4.0, 12.0


def is_fp8(model: ModelSpec) -> bool:
    """Whether the model's linear layers run FP8 GEMMs."""
    return model.dtype == "fp8"


def activation_bytes(model: ModelSpec) -> float:
    """Bytes of one activation element between kernels (BF16 for FP8 plans)."""
    return ACTIVATION_BYTES[model.dtype]


def fp8_activation_bytes(model: ModelSpec) -> float:
    """Bytes of one quantised activation element (FP8 + its share of the scales)."""
    return FP8_BYTES + ACTIVATION_SCALE_BYTES[model.fp8_recipe or "tensorwise"]


def fp8_weight_bytes(model: ModelSpec) -> float:
    """Bytes of one copy of an FP8 weight element (FP8 + its share of the scales)."""
    return FP8_BYTES + WEIGHT_SCALE_BYTES[model.fp8_recipe or "tensorwise"]


def linear_input_bytes(model: ModelSpec) -> float:
    """Bytes per element of a linear layer's input saved for the backward (the weight-gradient
    GEMM): the quantised FP8 copy under FP8, else the activation itself."""
    return fp8_activation_bytes(model) if is_fp8(model) else activation_bytes(model)


def training_bytes_per_param(model: ModelSpec) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) bytes per parameter in training. FP8: two FP8
    copies of the weights with their scales (module docstring), FP32 gradients, FP32 master
    weights and Adam moments."""
    if is_fp8(model):
        return TRAINING_FP8_COPIES * fp8_weight_bytes(model), FP8_GRAD_BYTES, FP8_OPTIMIZER_BYTES
    return TRAINING_BYTES_PER_PARAM[model.dtype]


def inference_weight_bytes(model: ModelSpec) -> float:
    """Bytes per parameter served: one FP8 copy (+ scales) under FP8, else the dtype's."""
    return fp8_weight_bytes(model) if is_fp8(model) else ACTIVATION_BYTES[model.dtype]


def param_gather_bytes(model: ModelSpec) -> float:
    """Bytes per parameter the distributed optimizer all-gathers after its step: FP8 primary
    weights gather one FP8 copy (the transposed one is made locally), else the weights."""
    return fp8_weight_bytes(model) if is_fp8(model) else ACTIVATION_BYTES[model.dtype]


def kv_bytes(model: ModelSpec, kv_dtype: str | None) -> float:
    """Bytes of one KV-cache element: ``kv_dtype`` if set, else the activations' type."""
    return KV_BYTES[kv_dtype] if kv_dtype else KV_BYTES["bf16" if is_fp8(model) else model.dtype]


# Large FP8 GEMMs reach a smaller fraction of their (doubled) peak than BF16 ones: the default
# ``gemm.fp8_efficiency`` is this ratio times the generation's BF16 ``gemm.efficiency``, fitted
# on the FP8-over-BF16 speedups of MoE Parallel Folding Table 2 (Mixtral-8x22B on 128 H100,
# TE delayed scaling: 575.1 / 458.3 and 631.7 / 487.7 TFLOP/s per GPU): the simulated speedup
# of the two plans matches both within 0.1 % at an FP8 efficiency of 0.662 (H100: 0.79 x
# 0.8382; refitted when the memory-bound kernels got their own classes, which made the
# quantise passes cheaper, and again when Transformer Engine's norm + quantise fusion removed
# the QKV input's quantise pass; VALIDATION.md). Fitting the speedup rather than the FP8 rows'
# TFLOP/s keeps the BF16 model's own error out of the FP8 figure.
FP8_EFFICIENCY_RATIO = 0.79


def fp8_gemm_efficiency(bf16_efficiency: float, fp8_efficiency: float | None) -> float:
    """Fraction of the FP8 peak large FP8 GEMMs reach: ``gemm.fp8_efficiency`` if set, else
    ``FP8_EFFICIENCY_RATIO`` x the BF16 efficiency."""
    return fp8_efficiency if fp8_efficiency is not None else FP8_EFFICIENCY_RATIO * bf16_efficiency

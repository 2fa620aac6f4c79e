"""Compute cost of transformer ops: FLOPs, HBM bytes and roofline time on one GPU.

Every op is a set of GEMMs. A GEMM of an (m x k) by a (k x n) matrix costs ``2·m·n·k`` FLOPs and
reads and writes ``(m·k + k·n + m·n)`` elements of HBM (inputs, weights, output, each once:
the ideal-tiling lower bound). Element-wise kernels (norms, activation, residual, dropout) are
not counted. Token-wise ops take ``tokens`` (= b·s for a micro-batch) so the engine can pass
each GPU's own count; core attention takes ``b`` and ``s`` because it grows with s².

Per-GPU shapes under tensor parallelism ``tp`` (Megatron): query heads, FFN width, vocabulary
and expert FFN width (by ``etp``) are split; key/value heads split down to one head per GPU;
the router and MLA's low-rank down-projections are replicated (every TP rank runs them whole).

Backward = 2 x forward (data gradient + weight gradient GEMMs), for FLOPs and bytes alike.
Time is the roofline :func:`op_time_ms`: max(FLOPs / (peak · compute_efficiency),
bytes / HBM bandwidth).

Core attention counts the full s x s score matrix, 4·b·s²·h FLOPs forward for multi-head
attention, as Korthikanti et al. 2022 and Narayanan et al. 2021 do; ``causal=True`` halves it
as Megatron's ``num_floating_point_operations`` does (the masked half is skipped by flash
attention kernels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from clustersim.costs import precision
from clustersim.spec.schema import HardwareSpec, ModelSpec

DTYPE_BYTES = precision.ACTIVATION_BYTES  # activations (fp8: BF16 between GEMMs)
BACKWARD_FACTOR = 2.0
ACTIVATION_MATRICES = {"swiglu": 3, "gelu": 2}  # phi: weight matrices per MLP


@dataclass(frozen=True, slots=True)
class OpCost:
    """FLOPs and HBM bytes (read + written) of one op on one GPU."""

    flops: float
    hbm_bytes: float

    def __add__(self, other: OpCost) -> OpCost:
        """Cost of running both ops."""
        return OpCost(self.flops + other.flops, self.hbm_bytes + other.hbm_bytes)

    def scaled(self, factor: float) -> OpCost:
        """Cost of ``factor`` times the work."""
        return OpCost(self.flops * factor, self.hbm_bytes * factor)

    def time_ms(self, hw: HardwareSpec) -> float:
        """Roofline time on ``hw`` (:func:`op_time_ms`)."""
        return op_time_ms(self.flops, self.hbm_bytes, hw)


ZERO_OP = OpCost(0.0, 0.0)


def op_time_ms(flops: float, hbm_bytes: float, hw: HardwareSpec) -> float:
    """Roofline at the calibrated large-GEMM and streaming efficiencies, in ms:
    max(flops / (peak · gemm efficiency), bytes / (HBM bandwidth · memory efficiency)).
    Per-kernel times (shape, launch) are :mod:`clustersim.costs.kernels`'."""
    cal = hw.calibration
    compute_s = flops / (hw.peak_tflops * 1e12 * cal.gemm.efficiency)
    memory_s = hbm_bytes / (hw.hbm_bandwidth_gbps * 1e9 * cal.memory.efficiency)
    return max(compute_s, memory_s) * 1e3


def ridge_point_flops_per_byte(hw: HardwareSpec) -> float:
    """Arithmetic intensity (FLOP/byte) above which an op is compute-bound on ``hw``."""
    cal = hw.calibration
    rate = hw.peak_tflops * 1e12 * cal.gemm.efficiency
    return rate / (hw.hbm_bandwidth_gbps * 1e9 * cal.memory.efficiency)


def backward(forward: OpCost) -> OpCost:
    """Backward cost of an op: 2 x its forward (data and weight gradients)."""
    return forward.scaled(BACKWARD_FACTOR)


def gemm(m: float, n: float, k: float, bytes_per_element: float) -> OpCost:
    """(m x k) @ (k x n): 2·m·n·k FLOPs, (m·k + k·n + m·n) elements moved."""
    return OpCost(2.0 * m * n * k, (m * k + k * n + m * n) * bytes_per_element)


def _linears(tokens: float, shapes: list[tuple[float, float]], bpe: float) -> OpCost:
    """Tokens through a chain of (in_features, out_features) weight matrices."""
    total = ZERO_OP
    for k, n in shapes:
        total += gemm(tokens, n, k, bpe)
    return total


def _bpe(model: ModelSpec) -> int:
    return DTYPE_BYTES[model.dtype]


# ---- attention ---------------------------------------------------------------------------


def head_dims(model: ModelSpec) -> tuple[int, int]:
    """(query/key head size, value head size)."""
    if model.mla is not None:
        mla = model.mla
        return mla.qk_nope_head_dim + mla.qk_rope_head_dim, mla.v_head_dim
    return model.head_size, model.head_size


def kv_heads_per_gpu(model: ModelSpec, tp: int) -> float:
    """Key/value heads one GPU computes: split by TP, at least one; MLA: one per query head."""
    if model.mla is not None:
        return model.num_attention_heads / tp
    return max(model.kv_heads / tp, 1.0)


def qkv_shapes(model: ModelSpec, tp: int) -> list[tuple[float, float]]:
    """Weight shapes of the query/key/value projections on one GPU."""
    h, heads = model.hidden_size, model.num_attention_heads / tp
    qk_dim, v_dim = head_dims(model)
    mla = model.mla
    if mla is None:
        return [(h, heads * qk_dim + 2 * kv_heads_per_gpu(model, tp) * qk_dim)]
    if mla.q_lora_rank is None:
        q_shapes = [(h, heads * qk_dim)]
    else:
        q_shapes = [(h, mla.q_lora_rank), (mla.q_lora_rank, heads * qk_dim)]
    kv_down = (h, mla.kv_lora_rank + mla.qk_rope_head_dim)
    kv_up = (mla.kv_lora_rank, heads * (mla.qk_nope_head_dim + v_dim))
    return [*q_shapes, kv_down, kv_up]


def qkv_projection(tokens: float, model: ModelSpec, tp: int = 1) -> OpCost:
    """Query/key/value projections (GQA: smaller K/V; MLA: low-rank down and up projections)."""
    return _linears(tokens, qkv_shapes(model, tp), _bpe(model))


def attention_output_projection(tokens: float, model: ModelSpec, tp: int = 1) -> OpCost:
    """Output projection of attention: heads/tp · v_head_dim -> hidden."""
    v_dim = head_dims(model)[1]
    shape = (model.num_attention_heads / tp * v_dim, model.hidden_size)
    return _linears(tokens, [shape], _bpe(model))


def core_attention(
    b: float,
    s: float,
    model: ModelSpec,
    tp: int = 1,
    *,
    causal: bool = False,
    flash: bool = True,
) -> OpCost:
    """Scores Q·Kᵀ and context P·V for ``b`` sequences of length ``s``.

    FLOPs 2·b·s²·(heads/tp)·(qk_dim + v_dim), = 4·b·s²·h/tp for multi-head attention; halved
    when ``causal``. Bytes: Q, K, V read and the context written; without flash attention the
    s x s scores are also written, read by softmax, written and read again (4 passes).
    """
    heads, kv_heads = model.num_attention_heads / tp, kv_heads_per_gpu(model, tp)
    qk_dim, v_dim = head_dims(model)
    flops = 2.0 * b * s * s * heads * (qk_dim + v_dim) * (0.5 if causal else 1.0)
    elements = b * s * (heads * qk_dim + kv_heads * (qk_dim + v_dim) + heads * v_dim)
    if not flash:
        elements += 4.0 * b * heads * s * s
    return OpCost(flops, elements * _bpe(model))


# ---- MLP, experts, router, logits --------------------------------------------------------


def mlp(
    tokens: float,
    hidden_size: int,
    ffn_hidden_size: float,
    activation: Literal["swiglu", "gelu"],
    bytes_per_element: float,
    tp: int = 1,
) -> OpCost:
    """An MLP: hidden -> (phi-1)·ffn/tp -> ffn/tp -> hidden; phi·2·tokens·h·ffn/tp FLOPs."""
    ffn = ffn_hidden_size / tp
    up = (ACTIVATION_MATRICES[activation] - 1) * ffn
    return _linears(tokens, [(hidden_size, up), (ffn, hidden_size)], bytes_per_element)


def dense_mlp(tokens: float, model: ModelSpec, tp: int = 1) -> OpCost:
    """The MLP of a dense layer (``model.dense_ffn`` wide)."""
    return mlp(tokens, model.hidden_size, model.dense_ffn, model.activation, _bpe(model), tp)


def shared_expert_mlp(tokens: float, model: ModelSpec, tp: int = 1) -> OpCost:
    """All shared experts of an MoE layer, as one MLP of their summed width (split by TP)."""
    moe = model.moe
    if moe is None or moe.num_shared_experts == 0:
        return ZERO_OP
    width = moe.num_shared_experts * (moe.shared_expert_ffn_hidden_size or model.ffn_hidden_size)
    return mlp(tokens, model.hidden_size, width, model.activation, _bpe(model), tp)


def expert_mlp(
    tokens: float, model: ModelSpec, etp: int = 1, num_active_experts: int = 1
) -> OpCost:
    """Grouped expert GEMMs for ``tokens`` routed token copies on one GPU.

    FLOPs phi·2·tokens·h·ffn/etp whatever the split among experts; bytes: the tokens' input,
    intermediate and output activations plus the weights of the ``num_active_experts`` experts
    that received at least one token (weights dominate at small token counts: decode is
    memory-bound).
    """
    if tokens <= 0 or num_active_experts <= 0:
        return ZERO_OP
    h, ffn = model.hidden_size, model.ffn_hidden_size / etp
    up = (ACTIVATION_MATRICES[model.activation] - 1) * ffn
    flops = 2.0 * tokens * (h * up + ffn * h)
    activations = tokens * (h + up + ffn + h)
    weights = num_active_experts * (h * up + ffn * h)
    return OpCost(flops, (activations + weights) * _bpe(model))


def router(tokens: float, model: ModelSpec) -> OpCost:
    """Gating GEMM: 2·tokens·h·E FLOPs (replicated over TP); 0 for dense models."""
    if model.moe is None:
        return ZERO_OP
    return gemm(tokens, model.moe.num_experts, model.hidden_size, _bpe(model))


def logits(tokens: float, model: ModelSpec, tp: int = 1) -> OpCost:
    """Output layer: 2·tokens·h·V/tp FLOPs."""
    return gemm(tokens, model.vocab_size / tp, model.hidden_size, _bpe(model))


def elementwise(
    tokens: float, model: ModelSpec, tp: int = 1, sequence_parallel: bool = False, mlp: bool = True
) -> OpCost:
    """Memory-bound element-wise kernels of one layer's forward (no FLOPs counted).

    Per token (Megatron's fused kernels): two layernorms (read + write h each), two
    bias-dropout-residual adds (read 2h, write h, 1-byte mask: ~3.5h each), and the MLP
    activation (GeLU: read + write ffn/tp; SwiGLU: read 2 ffn/tp, write ffn/tp). Without
    sequence parallelism the h-wide kernels run on the whole sequence on every TP rank; with it
    each rank runs 1/tp of them. ``mlp=False`` leaves out the MLP activation (MoE layers count
    theirs inside the expert GEMMs). These kernels cannot hide behind GEMMs, so their time adds
    to the GEMMs' (see :func:`op_time_ms`).
    """
    h_passes = 2 * 2 + 2 * 3.5
    h_elements = h_passes * model.hidden_size / (tp if sequence_parallel else 1)
    ffn = model.dense_ffn / tp
    act_passes = {"gelu": 2, "swiglu": 3}[model.activation] if mlp else 0
    return OpCost(0.0, tokens * (h_elements + act_passes * ffn) * _bpe(model))


# ---- a whole layer and the whole model ---------------------------------------------------


def layer_forward_costs(
    model: ModelSpec,
    layer: int,
    b: float,
    s: float,
    tp: int = 1,
    *,
    etp: int | None = None,
    causal: bool = False,
    flash: bool = True,
) -> dict[str, OpCost]:
    """Forward cost of each op of 0-based ``layer`` for b sequences of length s on one GPU.

    Keys: ``qkv``, ``core_attention``, ``attention_output``, then ``mlp`` for a dense layer or
    ``router``, ``experts``, ``shared_experts`` for an MoE layer. The expert entry is every
    routed copy of these tokens (b·s·k) on one GPU with all E experts active (EP = 1); under
    expert parallelism the engine calls :func:`expert_mlp` with each GPU's own token count.
    """
    tokens = b * s
    costs = {
        "qkv": qkv_projection(tokens, model, tp),
        "core_attention": core_attention(b, s, model, tp, causal=causal, flash=flash),
        "attention_output": attention_output_projection(tokens, model, tp),
    }
    moe = model.moe
    if moe is None or not model.is_moe_layer(layer):
        costs["mlp"] = dense_mlp(tokens, model, tp)
        return costs
    costs["router"] = router(tokens, model)
    expert_tp = tp if etp is None else etp
    costs["experts"] = expert_mlp(tokens * moe.top_k, model, expert_tp, moe.num_experts)
    costs["shared_experts"] = shared_expert_mlp(tokens, model, tp)
    return costs


def _mlp_width(model: ModelSpec, layer: int) -> float:
    """Active FFN width per token of a layer: dense width, or k routed + shared experts."""
    moe = model.moe
    if moe is None or not model.is_moe_layer(layer):
        return model.dense_ffn
    shared = moe.num_shared_experts * (moe.shared_expert_ffn_hidden_size or model.ffn_hidden_size)
    return moe.top_k * model.ffn_hidden_size + shared


def model_flops_per_iteration(
    model: ModelSpec,
    global_batch_size: int,
    seq_len: float,
    *,
    recompute: Literal["none", "selective", "full"] = "none",
    causal: bool | None = None,
) -> float:
    """Model FLOPs of one training iteration (forward + backward of B sequences of length s).

    Megatron's per-token form: B·s·[3·sum over layers of (attention projections + phi·2·h·ffn
    active) + 3·L·core attention + 3·2·h·V·(1 + MTP)] (MTP modules are layers of
    ``num_layers`` and each runs the output layer too, as Megatron counts them). For a dense
    GPT (gelu, ffn = 4h, MHA) this is Korthikanti et al. 2022 Eq. 7,
    72·B·L·s·h²·(1 + s/(6h) + V/(12hL)). ``recompute="full"`` adds one forward of every
    layer (not the logits): Narayanan et al. 2021 Eq. 3, 96·B·s·L·h²·(1 + s/(6h) +
    V/(16Lh)), i.e. hardware FLOPs; ``"selective"`` adds one forward
    of core attention. ``causal`` halves core attention; default (None): False for dense
    models, as the two papers count, True for MoE models, as Megatron counts. The router
    (2·h·E per token) is left out, as in Megatron.
    """
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute must be none, selective or full, got {recompute!r}")
    if causal is None:
        causal = model.moe is not None
    extra_layers = 1 if recompute == "full" else 0
    extra_core = 1 if recompute in ("full", "selective") else 0
    qk_dim, v_dim = head_dims(model)
    projections = 2.0 * sum(k * n for k, n in qkv_shapes(model, 1))
    projections += 2.0 * model.num_attention_heads * v_dim * model.hidden_size
    phi = ACTIVATION_MATRICES[model.activation]
    mlp_flops = sum(
        2.0 * phi * model.hidden_size * _mlp_width(model, i) for i in range(model.num_layers)
    )
    core = 2.0 * seq_len * model.num_attention_heads * (qk_dim + v_dim) * (0.5 if causal else 1.0)
    per_token = (3 + extra_layers) * (model.num_layers * projections + mlp_flops)
    per_token += (3 + extra_core) * model.num_layers * core
    per_token += 3 * 2.0 * model.hidden_size * model.vocab_size * (1 + model.mtp_layers)
    return global_batch_size * seq_len * per_token

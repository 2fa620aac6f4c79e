"""Memory per GPU, per pipeline stage, for training and inference. GiB = 2^30 bytes.

Every GPU of a pipeline stage holds the same amount (TP, CP, DP and EP ranks are symmetric), so
the report has one entry per stage and the peak is the largest. Rules (reference.md, "Memory
per GPU"; symbols as there, ``s`` the longest sequence of the workload):

**Parameters** (Megatron ``theoretical_memory_usage.py``): on stage ``i`` only the layers
``layout.stage_layers[i]``. TP-sharded (attention, dense MLP, shared experts, embedding on the
first stage, output layer on the last) divide by ``t``; with GQA the K/V projections divide by
``min(t, n_kv)`` only, because each GPU keeps at least one key/value head. With tied embeddings
and ``p > 1`` the last stage still holds a copy of the embedding matrix for the output layer
(as Megatron does). Replicated (norms, router, final norm) are not divided. Routed experts
divide by ``etp * ep``. DualPipe: a GPU of stage ``i`` holds model stages ``i`` and
``p - 1 - i`` (two chunks, 2x the parameters; the DualPipe README's table), and their
gradients and optimizer states.

**Training bytes per parameter** (Megatron distributed-optimizer table): bf16 2 + 4 (fp32
grad) + 12 (fp32 master, Adam m, v) = 18; fp16 2 + 2 + 16; fp32 4 + 4 + 8. The distributed
optimizer divides the optimizer part by the data-parallel size: ``d * cp`` for dense
parameters, ``edp`` for expert parameters (giving 6 + 12/d for bf16). Inference holds the
weights only (2 bytes in bf16/fp16, 4 in fp32).

**Activations (training)**: :func:`layer_activation_bytes`, Korthikanti et al. 2022 Table 2
generalised to GQA/MLA attention, SwiGLU and MoE (see there), times the layer-micro-batches in
flight (:func:`inflight_microbatches`). Under the interleaved schedule each chunk micro-batch in
flight holds its own chunk's layers: the peak is the largest sum over the stage's step order
(:func:`_interleaved_layer_bytes`), which for equal chunks is the whole-stage product. The
first stage also keeps the embedding output,
2*s*b*h bytes (/t with SP) per in-flight micro-batch (an upper bound of Korthikanti's 1-byte
dropout mask); the last stage the output-layer activations of Korthikanti Sec. 4.3,
4*s*b*h/t' (final-norm output and projection input, t' = t with SP, else 1) + 4*s*b*V/t (fp32
logits, vocab-parallel), for one micro-batch (GPipe: all ``m``). Transient working memory
(the layer being recomputed under full recompute, backward temporaries) is not counted,
as in Table 2. CP divides ``s`` by ``cp``. Table 2 assumes 16-bit activations; fp32 doubles it.

**Buffers (approximate)**: gradient buckets, 2 x ``grad_bucket_mb`` MiB (double buffered)
when gradients are reduced over more than one rank; and on stages with MoE layers the
all-to-all dispatch and combine buffers, 2 x T*k*h*2 bytes for the T tokens of one micro-batch
held by the GPU (s*b, /t with SP).

**Inference** (serving): one model, :func:`serving_memory`, shared by the audit and the
serving engine (``costs/serving.py``, ``kv_capacity``), after vLLM. Of
``gpu_memory_utilization x (memory_gib - memory_reserved_gib)`` per GPU, the weights (2 bytes
per parameter in bf16/fp16), the activations of one forward step and the MoE all-to-all
buffers are taken first; what remains holds the paged KV cache, which the engine allocates in
full. One step computes at most ``max_num_batched_tokens`` tokens (with ``chunked_prefill:
false`` a lone prompt longer than the budget runs alone, so the longest prompt if larger):
activations are one layer's inference working set (:func:`inference_layer_bytes`: nothing
is kept for a backward; without flash attention the scores of those tokens against the
longest context are added),
plus fp32 logits of ``max_batch_size`` rows on the last stage (4*B*V/t); all-to-all buffers
as in training, for the step's tokens. KV cache per token and layer:
2*n_kv'*d_head elements (n_kv' = max(1, n_kv/t)); MLA keeps ``kv_lora_rank +
qk_rope_head_dim`` elements, not sharded by TP; CP divides tokens. The cache holds the
smallest over stages of free bytes / bytes per token, in whole blocks of ``kv_block_size``
(``num_gpu_blocks`` overrides). Request lengths are those the plan serves: the rows of the
request trace with ``arrival: trace`` (read once, cached), else the longest (and the mean of)
``prompt_len`` + ``output_len``. The plan is out of memory only when the cache cannot hold one
request of the longest length (the scheduler's rule: ceil((L - 1) / block) blocks for L
tokens, the last sampled token is never cached), i.e. when vLLM refuses to start; otherwise
the cache is what the memory allows, and fewer concurrent longest requests than
``max_batch_size`` only limits the batch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clustersim.costs import precision
from clustersim.costs.params import MLP_MATRICES, ParamCounts, count_params
from clustersim.costs.schedules import stage_steps
from clustersim.costs.sharding import largest_unit, layer_units, shard_sizes
from clustersim.layout import Layout
from clustersim.spec.lengths import read_lengths
from clustersim.spec.request_trace import read_request_trace
from clustersim.spec.schema import LengthSpec, ModelSpec, ParallelSpec, Plan

GIB = 2**30
MIB = 2**20
# Bytes of one activation element (fp8 models: BF16 between GEMMs; costs/precision.py).
DTYPE_BYTES = precision.ACTIVATION_BYTES
# Bytes per (token x MLP width) stored by the MLP: GeLU keeps the fc1 output and the GeLU output
# (2 + 2); SwiGLU keeps the fc1 output of width 2*ffn (gate and up, 4) and the product (2).
MLP_ACTIVATION_BYTES = {"gelu": 4, "swiglu": 6}


@dataclass(frozen=True)
class StageMemory:
    """Memory of one GPU of pipeline stage ``stage``, in GiB."""

    stage: int
    num_layers: int
    inflight_microbatches: float
    params_per_gpu: float
    params_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    kv_cache_gib: float
    buffers_gib: float

    @property
    def total_gib(self) -> float:
        """Everything this GPU holds at its peak."""
        return (
            self.params_gib
            + self.grads_gib
            + self.optimizer_gib
            + self.activations_gib
            + self.kv_cache_gib
            + self.buffers_gib
        )

    def to_dict(self) -> dict[str, Any]:
        """The stage as plain JSON-ready values, with ``total_gib``."""
        return {**asdict(self), "total_gib": self.total_gib}


@dataclass(frozen=True)
class MemoryReport:
    """Memory per GPU of a plan: every stage; the breakdown fields are the peak stage's."""

    stages: list[StageMemory]
    peak_stage: int
    capacity_gib: float
    seq_len_tokens: int
    serving: ServingMemory | None = None  # inference: the KV-cache model behind the stages

    @property
    def peak(self) -> StageMemory:
        """The stage whose GPUs hold the most."""
        return self.stages[self.peak_stage]

    @property
    def memory_per_gpu_gib(self) -> float:
        """Peak memory per GPU over the stages."""
        return self.peak.total_gib

    @property
    def fits(self) -> bool:
        """Whether the peak fits the memory the GPU leaves to the model; in serving also that
        the KV cache holds one request of the longest length (else vLLM refuses to start)."""
        fits = self.memory_per_gpu_gib <= self.capacity_gib
        return fits and (self.serving is None or self.serving.starts)

    @property
    def params_gib(self) -> float:
        """Weights of one GPU of the peak stage."""
        return self.peak.params_gib

    @property
    def grads_gib(self) -> float:
        """Gradients of one GPU of the peak stage."""
        return self.peak.grads_gib

    @property
    def optimizer_gib(self) -> float:
        """Optimizer states of one GPU of the peak stage."""
        return self.peak.optimizer_gib

    @property
    def activations_gib(self) -> float:
        """Activations of one GPU of the peak stage."""
        return self.peak.activations_gib

    @property
    def kv_cache_gib(self) -> float:
        """KV cache of one GPU of the peak stage."""
        return self.peak.kv_cache_gib

    @property
    def buffers_gib(self) -> float:
        """Communication buffers of one GPU of the peak stage."""
        return self.peak.buffers_gib

    def to_dict(self) -> dict[str, Any]:
        """The ``memory`` object of the output contract, plus the per-stage list."""
        keys = (
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
            "seq_len_tokens",
        )
        out: dict[str, Any] = {k: getattr(self, k) for k in keys}
        out["stages"] = [stage.to_dict() for stage in self.stages]
        if self.serving is not None:
            out["serving"] = self.serving.to_dict()
        return out


def memory_per_gpu(plan: Plan, layout: Layout) -> MemoryReport:
    """Memory per GPU of every pipeline stage of ``plan``, and the peak (module docstring).

    Raises ValueError when a serving plan's request lengths cannot be known (an unreadable
    request trace, a length distribution without a maximum)."""
    counts = count_params(plan.model)
    hw = plan.hardware
    serving = None
    if plan.workload.mode == "inference":
        serving = serving_memory(plan, layout, counts)
        stages = serving.stage_memory()
        seq_len = serving.lengths.longest_request
    else:
        stages = [_stage_memory(plan, layout, counts, i) for i in range(layout.num_stages)]
        seq_len = _train_seq_len(plan)
    peak = max(stages, key=lambda st: st.total_gib)
    return MemoryReport(
        stages=stages,
        peak_stage=peak.stage,
        capacity_gib=hw.memory_gib - hw.memory_reserved_gib,
        seq_len_tokens=seq_len,
        serving=serving,
    )


# ---- parameters -------------------------------------------------------------------------


def stage_params_per_gpu(
    plan: Plan, layout: Layout, counts: ParamCounts, stage: int
) -> tuple[float, float]:
    """Parameters one GPU of ``stage`` holds: (dense and replicated, routed experts); under
    DualPipe those of both model stages it holds (``Layout.held_stages``: 2x)."""
    held = layout.held_stages(stage)
    if len(held) > 1:
        parts = [_model_stage_params(plan, layout, counts, s) for s in held]
        return sum(d for d, _ in parts), sum(e for _, e in parts)
    return _model_stage_params(plan, layout, counts, stage)


def _model_stage_params(
    plan: Plan, layout: Layout, counts: ParamCounts, stage: int
) -> tuple[float, float]:
    """Parameters of model stage ``stage`` on one of its GPUs: (dense and replicated, routed
    experts)."""
    model, t = plan.model, layout.tp
    num_stages = layout.num_stages
    sums = counts.layers(_layers_of(plan, layout, stage))
    kv_shards = min(t, model.kv_heads)
    sharded = sums.attention - sums.attention_kv + sums.dense_mlp + sums.shared_experts
    replicated = sums.norms + sums.router
    if stage == 0:
        sharded += counts.embedding
    if stage == num_stages - 1:
        replicated += counts.final_norm
        sharded += counts.output
        if model.tie_embeddings and num_stages > 1:
            sharded += counts.embedding  # the output layer's copy of the tied matrix
    dense = sharded / t + sums.attention_kv / kv_shards + replicated
    return dense, sums.routed_experts / (layout.etp * layout.ep)


def _layers_of(plan: Plan, layout: Layout, stage: int) -> np.ndarray:
    """Layers of ``stage`` that the model has (an explicit split past the last layer, which the
    audit reports, does not invent layers)."""
    return layout.stage_layer_arrays[stage]


def _one_layer_per_kind(plan: Plan, layers: np.ndarray) -> list[tuple[int, int]]:
    """``(count, representative layer)`` for the MoE and the dense layers among ``layers``: a
    layer's memory depends only on its kind, so deep models cost two evaluations, not one per
    layer."""
    is_moe = plan.model.moe_layer_mask()[layers]
    return [(len(kind), int(kind[0])) for kind in (layers[is_moe], layers[~is_moe]) if len(kind)]


def _held_layers(plan: Plan, layout: Layout, stage: int) -> np.ndarray:
    """Layers the GPUs of ``stage`` hold: its own, under DualPipe also those of its second
    chunk (``Layout.held_stages``)."""
    return np.concatenate([_layers_of(plan, layout, s) for s in layout.held_stages(stage)])


def _has_moe_layer(plan: Plan, layout: Layout, stage: int) -> bool:
    """Whether ``stage`` holds an MoE layer."""
    return bool(plan.model.moe_layer_mask()[_held_layers(plan, layout, stage)].any())


def _expert_dp(layout: Layout) -> int:
    """Expert data-parallel size; 1 (no optimizer sharding, conservative) if folding fails."""
    return layout.edp or 1


# ---- activations ------------------------------------------------------------------------


def layer_activation_bytes(
    model: ModelSpec,
    par: ParallelSpec,
    layer: int,
    seq_len_tokens: float,
    batch: int,
    recompute: str | None = None,
) -> float:
    """Activation bytes one GPU stores for one layer and one micro-batch (Korthikanti Table 2).

    For a GPT layer (MHA, GeLU, ffn = 4h) this is exactly Table 2: 10*sbh replicated
    (2 layernorm inputs 4, attention input 2 and dropout mask 1, MLP input 2 and dropout
    mask 1), 24*sbh/t TP-sharded (Q, K, V, projection input 8; fc1 and GeLU outputs 16) and
    5*a*s^2*b/t attention scores. Generalised: Q/K/V/projection-input sizes follow the real head
    counts and dimensions (GQA keeps at least one K/V head per GPU; MLA uses its head dims), the
    MLP stores ``MLP_ACTIVATION_BYTES`` per token and width. MoE layers scale the MLP part
    (replicated and sharded) by ``top_k`` (as llm-analysis does; no published formula) and add
    the shared experts' intermediate. The expert intermediate divides by ``etp`` without SP;
    with SP each GPU holds s*b/t tokens, the ETP all-gather multiplies them by ``etp`` and the
    expert width divides by ``etp``, so it divides by ``t`` like everything else.

    The scores are absent with flash attention or selective recompute; full recompute keeps
    only the layer input, 2*sbh (/t with SP). Selective recompute of named modules
    (``parallel.recompute_modules``; Megatron-Core discards a recomputed module's outputs and
    keeps its input) drops what they produce: ``mla_up_proj`` MLA's Q, K and V (the latents
    they are recomputed from are the inputs of the up-projections), ``mlp`` a dense layer's
    MLP intermediate (its input is counted with the layer), ``moe_act`` the experts'
    activation output (fc2's input); ``layernorm`` is not credited (the norms' outputs are
    the next linear layers' saved inputs). ``seq_len_tokens`` is per GPU (already /cp).
    """
    recompute = recompute or par.recompute
    if recompute == par.recompute:
        modules = par.selective_modules
    else:
        modules = ("core_attn",) if recompute == "selective" else ()
    s, b, h, t = seq_len_tokens, batch, model.hidden_size, par.tp
    sp_div = t if par.sequence_parallel else 1
    scale = DTYPE_BYTES[model.dtype] / 2
    if recompute == "full":
        return scale * 2 * s * b * h / sp_div
    # The inputs of the linear layers (attention input, projection input, MLP input, fc2
    # input) are stored as ``lin`` bytes per element: 2 (x scale) in 16/32-bit training, the
    # quantised FP8 copy (+ scales) under FP8 (costs/precision.py); the rest as Korthikanti.
    lin = precision.linear_input_bytes(model) / scale
    # Replicated across TP ranks without SP: layernorm inputs 4, attention input and dropout
    # mask 1; the MLP input and dropout mask 1 are added with the MLP below.
    replicated = (5 + lin) * s * b * h
    per_gpu = _attention_bytes_per_gpu(model, t, s * b, lin, "mla_up_proj" in modules)
    # bytes per token and unit of MLP width: GeLU keeps its input (2) and fc2's input (lin);
    # SwiGLU its gate and up outputs (4) and fc2's input (lin)
    per_width = (MLP_ACTIVATION_BYTES[model.activation] - 2 + lin) * s * b
    moe = model.moe
    if moe is not None and model.is_moe_layer(layer):
        expert_div = t if par.sequence_parallel else par.expert_tp
        replicated += moe.top_k * (1 + lin) * s * b * h
        expert_width = per_width - (lin * s * b if "moe_act" in modules else 0.0)
        per_gpu += moe.top_k * expert_width * model.ffn_hidden_size / expert_div
        shared_ffn = moe.shared_expert_ffn_hidden_size or model.ffn_hidden_size
        per_gpu += per_width * moe.num_shared_experts * shared_ffn / t
    else:
        replicated += (1 + lin) * s * b * h
        if "mlp" not in modules:
            per_gpu += per_width * model.dense_ffn / t
    per_gpu += replicated / sp_div
    if recompute == "none" and not par.flash_attention:
        per_gpu += 5 * model.num_attention_heads * s * s * b / t
    return scale * per_gpu


def inference_layer_bytes(model: ModelSpec, par: ParallelSpec, layer: int, tokens: float) -> float:
    """Peak live activation bytes of one layer's inference forward for ``tokens`` on one GPU.

    Per token, in the model's element size: the residual stream and the normed input (2h)
    plus the larger of the attention block (its QKV output, (a/t)*d_qk + 2*max(1, n_kv/t)*d_qk
    elements, MLA: the up-projected K and V of a/t heads, and the attention output (a/t)*d_v)
    and the MLP (its up output (phi-1)*ffn/t and activation output ffn/t: phi*ffn/t); an MoE
    layer routes ``top_k`` copies of each token through the expert MLP (each copy h + phi*ffn/etp)
    and adds its shared experts (phi*shared/t). Tensors of other layers are freed."""
    t, h = par.tp, model.hidden_size
    qk, v = (
        (model.mla.qk_nope_head_dim + model.mla.qk_rope_head_dim, model.mla.v_head_dim)
        if model.mla is not None
        else (model.head_size, model.head_size)
    )
    heads = model.num_attention_heads / t
    kv_heads = heads if model.mla is not None else max(1.0, model.kv_heads / t)
    attention = heads * qk + kv_heads * (qk + v) + heads * v
    phi = MLP_MATRICES[model.activation]
    moe = model.moe
    if moe is not None and model.is_moe_layer(layer):
        mlp = moe.top_k * (h + phi * model.ffn_hidden_size / par.expert_tp)
        if moe.num_shared_experts:
            shared = moe.shared_expert_ffn_hidden_size or model.ffn_hidden_size
            mlp += phi * moe.num_shared_experts * shared / t
    else:
        mlp = phi * model.dense_ffn / t
    return DTYPE_BYTES[model.dtype] * tokens * (2 * h + max(attention, mlp))


def _attention_bytes_per_gpu(
    model: ModelSpec, t: int, tokens: float, lin: float = 2.0, up_recomputed: bool = False
) -> float:
    """Bytes of Q, K, V and the output-projection input one GPU stores for ``tokens`` (the
    projection input at ``lin`` bytes per element, the rest at 2).

    Q and the projection input hold a/t heads; K and V max(1, n_kv/t) heads (a GPU keeps at
    least one K/V head); MLA expands K and V to all ``a`` heads of its own head dims, unless
    ``up_recomputed`` (the ``mla_up_proj`` recompute: Q, K and V are not kept). For MHA
    this is Korthikanti's 8*sbh/t.
    """
    q_heads = model.num_attention_heads / t
    if model.mla is not None:
        qk = model.mla.qk_nope_head_dim + model.mla.qk_rope_head_dim
        v = model.mla.v_head_dim
        kept = 0.0 if up_recomputed else 2 * (2 * qk + v)
        return tokens * q_heads * (kept + lin * v)
    kv_heads = max(1.0, model.kv_heads / t)
    return tokens * model.head_size * (2 * (q_heads + 2 * kv_heads) + lin * q_heads)


def inflight_microbatches(plan: Plan, stage: int, num_stages: int | None = None) -> float:
    """Micro-batches whose activations stage ``stage`` holds at its peak, in whole-stage units.

    GPipe: all ``m``. 1F1B: ``min(p - i, m)``. Interleaved (v > 1): Megatron's schedule runs
    ``2(p-i-1) + (v-1)p`` warm-up chunk forwards before its first backward, so it holds that
    plus one chunk micro-batches (at most ``m*v``), each 1/v of the stage's layers when the
    chunks are equal (uneven chunks: :func:`_interleaved_layer_bytes`). On stage 0
    this is ``p * (1 + (p-1)/(p*v))`` micro-batches, the reference factor. DualPipe: ``p + 1``
    chunk micro-batches on every device (the DualPipe README's table), each one model stage's
    layers: ``p - i`` of its first chunk (model stage ``i``) and ``i + 1`` of its second (model
    stage ``p - 1 - i``), i.e. 1F1B's ``p - position`` for each (costs/schedules.py).
    """
    par = plan.parallel
    p = num_stages or par.pp
    m, v = par.num_microbatches, par.virtual_stages
    if par.schedule == "gpipe":
        return float(m)
    if par.schedule == "dualpipe":  # in chunk (model-stage) units; see _stage_activation_bytes
        return float(p + 1)
    if par.schedule == "interleaved" and v > 1:
        chunks = min(m * v, 2 * (p - stage - 1) + (v - 1) * p + 1)
        return chunks / v
    return float(min(p - stage, m))


def _layers_activation_bytes(plan: Plan, layers: np.ndarray, s: float, b: int) -> float:
    """Activation bytes of ``layers`` for one micro-batch: a layer's bytes depend only on
    whether it is an MoE layer, so each kind is computed once (plans may have many layers)."""
    model, par = plan.model, plan.parallel
    return sum(
        n * layer_activation_bytes(model, par, i, s, b)
        for n, i in _one_layer_per_kind(plan, layers)
    )


def _stage_activation_bytes(plan: Plan, layout: Layout, stage: int, inflight: float) -> float:
    """Training activations of one GPU of ``stage``: layers, embedding output, logits. Under
    DualPipe the sum over the two model stages it holds, ``p - s`` micro-batches of model stage
    ``s`` (:func:`inflight_microbatches`)."""
    held = layout.held_stages(stage)
    if len(held) > 1:
        p = layout.num_stages
        return sum(_model_stage_activation_bytes(plan, layout, s, float(p - s)) for s in held)
    return _model_stage_activation_bytes(plan, layout, stage, inflight)


def _model_stage_activation_bytes(plan: Plan, layout: Layout, stage: int, inflight: float) -> float:
    """Activations of model stage ``stage`` for ``inflight`` micro-batches on one GPU."""
    model, par = plan.model, plan.parallel
    s, b, h = _train_seq_len(plan) / par.cp, par.micro_batch_size, model.hidden_size
    sp_div = par.tp if par.sequence_parallel else 1
    scale = DTYPE_BYTES[model.dtype] / 2
    if par.schedule == "interleaved" and par.virtual_stages > 1:
        total = _interleaved_layer_bytes(plan, layout, stage, s, b)
    else:
        total = inflight * _layers_activation_bytes(plan, _layers_of(plan, layout, stage), s, b)
    if stage == 0:
        total += inflight * scale * 2 * s * b * h / sp_div
    if stage == layout.num_stages - 1:
        held = par.num_microbatches if par.schedule == "gpipe" else 1
        heads = 1 + model.mtp_layers  # fp32 logits of the output layer and each MTP module
        total += held * (
            scale * 4 * s * b * h / sp_div + heads * 4 * s * b * model.vocab_size / par.tp
        )
    return total


def _interleaved_layer_bytes(plan: Plan, layout: Layout, stage: int, s: float, b: int) -> float:
    """Peak layer activation bytes of one GPU of ``stage`` under the interleaved schedule: walk
    the stage's step order (:func:`~clustersim.costs.schedules.stage_steps`), holding a chunk
    micro-batch's activations, those of ITS chunk's layers (``Layout.chunk_layers``), from its
    forward to its backward; the largest sum at any point. Chunks of equal bytes give the
    whole-stage formula ``inflight_microbatches * stage bytes`` (used as is for them); uneven chunks
    (``layers_per_stage`` with PP x v entries) what the chunks in flight hold. Plans the audit
    refuses (micro-batches not divisible by PP, layers that do not split into the chunks) keep
    the whole-stage formula."""
    par = plan.parallel
    p, m, v = layout.num_stages, par.num_microbatches, par.virtual_stages
    layers = _layers_of(plan, layout, stage)
    chunks = [np.asarray(layout.chunk_layers(stage, c), dtype=np.int64) for c in range(v)]
    chunks = [c[c < plan.model.num_layers] for c in chunks]
    whole = _layers_activation_bytes(plan, layers, s, b)
    inflight = inflight_microbatches(plan, stage, p)
    if p != par.pp or m % p or sum(len(c) for c in chunks) != len(layers):
        return inflight * whole
    chunk_bytes = np.array([_layers_activation_bytes(plan, c, s, b) for c in chunks])
    if np.all(chunk_bytes == chunk_bytes[0]):  # the walk's peak, in closed form: no rounding
        return inflight * whole
    steps = stage_steps("interleaved", p, m, stage, v)
    delta = np.zeros((len(steps), v))
    for i, step in enumerate(steps):
        delta[i, step.chunk] = 1.0 if step.kind == "F" else -1.0
    held = np.cumsum(delta, axis=0) @ chunk_bytes  # bytes in flight after each step
    return float(held.max())


# ---- buffers ----------------------------------------------------------------------------


def _buffer_bytes(plan: Plan, layout: Layout, stage: int) -> float:
    """Training: gradient buckets (reduced over > 1 rank; ZeRO-2/3 reduce layer by layer
    instead, counted with the gradients) and MoE all-to-all buffers."""
    par = plan.parallel
    total = 0.0
    has_moe = _has_moe_layer(plan, layout, stage)
    buckets = par.sharding in ("none", "optimizer")
    if buckets and (par.dp * par.cp > 1 or (has_moe and _expert_dp(layout) > 1)):
        total += 2 * par.grad_bucket_mb * MIB
    tokens = par.micro_batch_size * _train_seq_len(plan) / par.cp
    return total + _a2a_bytes(plan, layout, stage, tokens)


def _a2a_bytes(plan: Plan, layout: Layout, stage: int, tokens: float) -> float:
    """All-to-all dispatch and combine buffers of ``tokens`` per GPU on a stage with MoE layers
    (/t with SP): 2 x T*k*h elements."""
    model, par = plan.model, plan.parallel
    has_moe = _has_moe_layer(plan, layout, stage)
    if not has_moe or model.moe is None:
        return 0.0
    if par.sequence_parallel:
        tokens /= par.tp
    per_copy = 2 * DTYPE_BYTES[model.dtype]  # dispatch and combine, in the activations' type
    if precision.is_fp8(model) and par.moe_dispatcher == "deepep":
        per_copy = precision.fp8_activation_bytes(model) + DTYPE_BYTES[model.dtype]
    return tokens * model.moe.top_k * model.hidden_size * per_copy


# ---- one stage --------------------------------------------------------------------------


def _stage_memory(plan: Plan, layout: Layout, counts: ParamCounts, stage: int) -> StageMemory:
    """Training memory of one GPU of ``stage``: bytes per parameter by ``dp_sharding``
    (costs/sharding.py): ZeRO-1 divides the optimizer states by the shard size N, ZeRO-2 also
    the gradients and holds one layer's gradient whole before its reduce-scatter, ZeRO-3 also
    the weights and holds two layers' weights gathered (the one computing and the one
    prefetched)."""
    par = plan.parallel
    dense, experts = stage_params_per_gpu(plan, layout, counts, stage)
    w_bytes, g_bytes, o_bytes = precision.training_bytes_per_param(plan.model)
    dense_n, expert_n = shard_sizes(plan, layout)
    sharded = dense / dense_n + experts / expert_n
    whole = dense + experts
    unit = 0.0
    if par.sharding in ("gradients", "full"):
        layers = _layers_of(plan, layout, stage)
        unit = largest_unit(layer_units(plan, layout, counts, layers, (dense, experts)))
    weights = sharded + 2 * unit if par.sharding == "full" else whole
    grads = sharded + unit if par.sharding in ("gradients", "full") else whole
    inflight = inflight_microbatches(plan, stage, layout.num_stages)
    return StageMemory(
        stage=stage,
        num_layers=len(_held_layers(plan, layout, stage)),
        inflight_microbatches=inflight,
        params_per_gpu=whole,
        params_gib=weights * w_bytes / GIB,
        grads_gib=grads * g_bytes / GIB,
        optimizer_gib=o_bytes * sharded / GIB,
        activations_gib=_stage_activation_bytes(plan, layout, stage, inflight) / GIB,
        kv_cache_gib=0.0,
        buffers_gib=_buffer_bytes(plan, layout, stage) / GIB,
    )


def _longest(length: LengthSpec, path: str) -> int:
    """The longest length a distribution can produce; an error if only a file knows it."""
    if length.longest is None:
        raise ValueError(f"{path} has no known maximum; set {path}.max")
    return length.longest


def _train_seq_len(plan: Plan) -> int:
    """The longest training sequence the workload can produce, in tokens."""
    return _longest(plan.workload.seq_len, "workload.seq_len")


# ---- inference: the serving memory model (vLLM), shared by the audit and the engine -------


@dataclass(frozen=True)
class RequestLengths:
    """Token lengths of the requests a serving plan serves."""

    longest_prompt: int
    longest_request: int  # prompt + output of the longest request
    mean_request: float  # the typical request: mean prompt + mean output
    source: str  # where they come from, for messages


def request_lengths(plan: Plan) -> RequestLengths:
    """The request lengths of ``plan`` (module docstring): the trace's rows (the first ``num``
    if set, as the engine reads them) or the length distributions.

    Raises ValueError for an unreadable trace or a distribution without a known maximum."""
    req = plan.workload.requests
    if req.arrival == "trace":
        limit = req.num if "num" in req.model_fields_set else None
        path = Path(req.trace or "")
        try:
            stat = path.stat()
        except OSError:
            raise ValueError(f"request trace not found: {path}") from None
        return _trace_lengths(str(path.resolve()), stat.st_mtime_ns, stat.st_size, limit)
    prompt = _longest(req.prompt_len, "workload.requests.prompt_len")
    output = _longest(req.output_len, "workload.requests.output_len")
    mean = _mean_length(req.prompt_len, prompt) + _mean_length(req.output_len, output)
    return RequestLengths(prompt, prompt + output, mean, "prompt_len + output_len")


@functools.lru_cache(maxsize=32)
def _trace_lengths(path: str, mtime_ns: int, size: int, limit: int | None) -> RequestLengths:
    """Lengths of a request trace, read once per file version (``mtime_ns``, ``size``)."""
    del mtime_ns, size  # cache keys only
    trace = read_request_trace(path, limit)
    total = trace.prompt_tokens + trace.output_tokens
    source = f"trace {Path(path).name} ({total.size} requests)"
    return RequestLengths(
        int(trace.prompt_tokens.max()), int(total.max()), float(total.mean()), source
    )


def _mean_length(length: LengthSpec, longest: int) -> float:
    """The mean of a length distribution (lognormal: its mean, at most ``max``; empirical: the
    file's clamped mean, or ``longest`` if the file cannot be read)."""
    if length.dist == "fixed":
        return float(longest)
    if length.dist == "uniform":
        return (length.min + length.max) / 2
    if length.dist == "lognormal":
        return min(length.mean, longest)
    try:
        values = _file_lengths(length.file, length.column)
    except ValueError:
        return float(longest)
    low, high = length.min or 1, length.max or longest
    return float(sum(min(max(v, low), high) for v in values) / len(values))


@functools.lru_cache(maxsize=32)
def _file_lengths(path: str, column: str) -> tuple[int, ...]:
    return tuple(int(v) for v in read_lengths(path, column))


def kv_cache_bytes_per_token_layer(model: ModelSpec, tp: int, kv_dtype: str | None = None) -> float:
    """KV-cache bytes one GPU stores per token and layer: K and V of max(1, n_kv/t) heads
    (a GPU keeps at least one K/V head); MLA keeps its latent, not split by TP. Elements of
    ``kv_dtype`` (``workload.requests.kv_dtype``; default the activations' type)."""
    if model.mla is not None:
        elements = model.mla.kv_lora_rank + model.mla.qk_rope_head_dim
    else:
        elements = 2 * max(1.0, model.kv_heads / tp) * model.head_size
    return elements * precision.kv_bytes(model, kv_dtype)


def kv_cache_bytes(plan: Plan, layout: Layout, stage: int) -> float:
    """KV cache one GPU of ``stage`` needs for a full batch (``max_batch_size``) of requests of
    the longest length: the demand, to compare with the capacity of :func:`serving_memory`."""
    model, par = plan.model, plan.parallel
    tokens = request_lengths(plan).longest_request * plan.workload.requests.max_batch_size
    per_layer = (
        kv_cache_bytes_per_token_layer(model, par.tp, plan.workload.requests.kv_dtype) / par.cp
    )
    return len(_layers_of(plan, layout, stage)) * per_layer * tokens


def serving_step_tokens(plan: Plan, lengths: RequestLengths) -> int:
    """The most tokens one serving step computes: ``max_num_batched_tokens``; without chunked
    prefill a lone prompt longer than the budget runs alone (the scheduler's rule)."""
    req = plan.workload.requests
    if req.chunked_prefill:
        return req.max_num_batched_tokens
    return max(req.max_num_batched_tokens, lengths.longest_prompt)


@dataclass(frozen=True)
class ServingMemory:
    """Memory of one serving replica's GPUs, per pipeline stage (bytes are per GPU; GiB)."""

    usable_gib: float  # gpu_memory_utilization x (memory_gib - memory_reserved_gib)
    gpu_memory_utilization: float
    step_tokens: int  # tokens of the largest forward step
    max_batch_size: int
    lengths: RequestLengths
    layers: tuple[int, ...]
    params_per_gpu: tuple[float, ...]
    weights_gib: tuple[float, ...]
    activations_gib: tuple[float, ...]
    buffers_gib: tuple[float, ...]
    kv_bytes_per_token: tuple[float, ...]  # all the stage's layers, /cp
    num_blocks: int
    block_size: int
    blocks_overridden: bool  # workload.requests.num_gpu_blocks

    @property
    def free_gib(self) -> tuple[float, ...]:
        """Per stage: what the KV cache may use (negative when nothing is left)."""
        parts = zip(self.weights_gib, self.activations_gib, self.buffers_gib, strict=True)
        return tuple(self.usable_gib - w - a - b for w, a, b in parts)

    @property
    def limiting_stage(self) -> int:
        """The stage whose free memory allows the fewest cache tokens."""
        pairs = enumerate(zip(self.free_gib, self.kv_bytes_per_token, strict=True))
        ratios = [(f * GIB / b, i) for i, (f, b) in pairs if b > 0]
        return min(ratios)[1] if ratios else 0

    @property
    def tokens(self) -> int:
        """Tokens the replica's KV cache holds."""
        return self.num_blocks * self.block_size

    @property
    def kv_cache_gib(self) -> tuple[float, ...]:
        """Per stage: the cache memory per GPU, every block allocated (as vLLM does)."""
        return tuple(b * self.tokens / GIB for b in self.kv_bytes_per_token)

    @property
    def blocks_per_longest_request(self) -> int:
        """Blocks the longest request holds at its end (its last sampled token is never
        cached: ceil((L - 1) / block), at least 1)."""
        return max(1, -(-(self.lengths.longest_request - 1) // self.block_size))

    @property
    def longest_requests_fit(self) -> int:
        """Requests of the longest length the cache holds at once."""
        return self.num_blocks // self.blocks_per_longest_request

    @property
    def typical_requests_fit(self) -> int:
        """Requests of the mean length the cache holds at once."""
        return math.floor(self.tokens / max(self.lengths.mean_request, 1.0))

    @property
    def batch_tokens(self) -> int:
        """Cache tokens a full batch (``max_batch_size``) of the longest requests holds at most
        (whole blocks), or the whole cache if smaller."""
        full = self.max_batch_size * self.blocks_per_longest_request * self.block_size
        return min(full, self.tokens)

    @property
    def needed_gib(self) -> tuple[float, ...]:
        """Per stage: the memory the plan needs to run its batch without preemption (weights,
        activations, buffers and the cache of :attr:`batch_tokens`); the engine's cache beyond
        it only serves more requests than ``max_batch_size``."""
        parts = zip(
            self.weights_gib,
            self.activations_gib,
            self.buffers_gib,
            self.kv_bytes_per_token,
            strict=True,
        )
        return tuple(w + a + b + kv * self.batch_tokens / GIB for w, a, b, kv in parts)

    @property
    def starts(self) -> bool:
        """Whether the cache holds one request of the longest length (else vLLM refuses)."""
        return self.longest_requests_fit >= 1

    def stage_memory(self) -> list[StageMemory]:
        """The stages as :class:`StageMemory` (the report's breakdown)."""
        kv = self.kv_cache_gib
        return [
            StageMemory(
                stage=i,
                num_layers=self.layers[i],
                inflight_microbatches=1.0,
                params_per_gpu=self.params_per_gpu[i],
                params_gib=self.weights_gib[i],
                grads_gib=0.0,
                optimizer_gib=0.0,
                activations_gib=self.activations_gib[i],
                kv_cache_gib=kv[i],
                buffers_gib=self.buffers_gib[i],
            )
            for i in range(len(self.layers))
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values: the cache and the lengths it was sized for."""
        return {
            "usable_gib": self.usable_gib,
            "step_tokens": self.step_tokens,
            "kv_cache_tokens": self.tokens,
            "kv_cache_blocks": self.num_blocks,
            "kv_block_size": self.block_size,
            "kv_cache_gib": list(self.kv_cache_gib),
            "free_gib": list(self.free_gib),
            "longest_request_tokens": self.lengths.longest_request,
            "mean_request_tokens": self.lengths.mean_request,
            "longest_requests_fit": self.longest_requests_fit,
            "batch_needs_gib": max(self.needed_gib, default=0.0),
            "typical_requests_fit": self.typical_requests_fit,
            "max_batch_size": self.max_batch_size,
            "lengths_from": self.lengths.source,
        }


def serving_memory(plan: Plan, layout: Layout, counts: ParamCounts | None = None) -> ServingMemory:
    """The serving memory of ``plan`` (module docstring, "Inference"): weights, one step's
    activations and buffers, and the KV cache that the rest of the memory holds."""
    model, par, hw = plan.model, plan.parallel, plan.hardware
    req = plan.workload.requests
    counts = counts or count_params(model)
    lengths = request_lengths(plan)
    usable = req.gpu_memory_utilization * (hw.memory_gib - hw.memory_reserved_gib)
    step = serving_step_tokens(plan, lengths)
    tokens = step / par.cp  # per GPU
    bpe = precision.inference_weight_bytes(model)
    per_layer = kv_cache_bytes_per_token_layer(model, par.tp, req.kv_dtype) / par.cp
    num_stages = layout.num_stages
    layers, params, weights, acts, bufs, per_token = [], [], [], [], [], []
    for stage in range(num_stages):
        ids = _layers_of(plan, layout, stage)
        dense, experts = stage_params_per_gpu(plan, layout, counts, stage)
        kinds = _one_layer_per_kind(plan, ids)
        act = max((_serving_layer_bytes(plan, i, tokens, lengths) for _, i in kinds), default=0.0)
        if stage == num_stages - 1:
            act += 4 * req.max_batch_size * model.vocab_size / par.tp  # fp32 logits
        layers.append(len(ids))
        params.append(dense + experts)
        weights.append((dense + experts) * bpe / GIB)
        acts.append(act / GIB)
        bufs.append(_a2a_bytes(plan, layout, stage, tokens) / GIB)
        per_token.append(per_layer * len(ids))
    free = [usable - w - a - b for w, a, b in zip(weights, acts, bufs, strict=True)]
    fit = min((f * GIB / b for f, b in zip(free, per_token, strict=True) if b > 0), default=0.0)
    blocks = req.num_gpu_blocks or max(0, int(fit // req.kv_block_size))
    return ServingMemory(
        usable_gib=usable,
        gpu_memory_utilization=req.gpu_memory_utilization,
        step_tokens=step,
        max_batch_size=req.max_batch_size,
        lengths=lengths,
        layers=tuple(layers),
        params_per_gpu=tuple(params),
        weights_gib=tuple(weights),
        activations_gib=tuple(acts),
        buffers_gib=tuple(bufs),
        kv_bytes_per_token=tuple(per_token),
        num_blocks=blocks,
        block_size=req.kv_block_size,
        blocks_overridden=req.num_gpu_blocks is not None,
    )


def _serving_layer_bytes(plan: Plan, layer: int, tokens: float, lengths: RequestLengths) -> float:
    """One layer's inference working set for a step of ``tokens`` (per GPU): nothing is kept
    for a backward, so the peak is the larger of the two blocks' live tensors (:func:`
    inference_layer_bytes`); without flash attention, plus the scores of the step's tokens
    against at most the longest context (5 bytes per score, Korthikanti)."""
    model, par = plan.model, plan.parallel
    act = inference_layer_bytes(model, par, layer, tokens)
    if not par.flash_attention:
        scale = DTYPE_BYTES[model.dtype] / 2
        context = lengths.longest_request / par.cp
        act += scale * 5 * model.num_attention_heads * tokens * context / par.tp
    return act

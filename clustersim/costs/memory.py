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
divide by ``etp * ep``.

**Training bytes per parameter** (Megatron distributed-optimizer table): bf16 2 + 4 (fp32
grad) + 12 (fp32 master, Adam m, v) = 18; fp16 2 + 2 + 16; fp32 4 + 4 + 8. The distributed
optimizer divides the optimizer part by the data-parallel size: ``d * cp`` for dense
parameters, ``edp`` for expert parameters (giving 6 + 12/d for bf16). Inference holds the
weights only (2 bytes in bf16/fp16, 4 in fp32).

**Activations (training)**: :func:`layer_activation_bytes`, Korthikanti et al. 2022 Table 2
generalised to GQA/MLA attention, SwiGLU and MoE (see there), times the layer-micro-batches in
flight (:func:`inflight_microbatches`). The first stage also keeps the embedding output,
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

**Inference**: weights, KV cache and one forward working set. KV cache per stage:
2*L_stage*n_kv'*d_head*S*B*bytes with S = longest prompt + longest output (/cp),
B = ``requests.max_batch_size``, n_kv' = max(1, n_kv/t); for MLA the cache holds
``kv_lora_rank + qk_rope_head_dim`` elements per token and layer, not sharded by TP.
Activations: one layer's training activations (no recompute) for a prefill of B prompts of
the longest length, a generous bound on the forward working set (forward frees each tensor
once it is consumed), plus fp32 logits of one token per request on the last stage (4*B*V/t).
All-to-all buffers as in training, for the same prefill tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from clustersim.costs.params import ParamCounts, count_params
from clustersim.layout import Layout
from clustersim.spec.schema import LengthSpec, ModelSpec, ParallelSpec, Plan

GIB = 2**30
MIB = 2**20
# Training bytes per parameter: (weights, gradients, optimizer states) (reference.md table).
TRAINING_BYTES_PER_PARAM = {"bf16": (2, 4, 12), "fp16": (2, 2, 16), "fp32": (4, 4, 8)}
# Bytes of one weight, activation or KV-cache element.
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
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
            self.params_gib + self.grads_gib + self.optimizer_gib + self.activations_gib
            + self.kv_cache_gib + self.buffers_gib
        )  # fmt: skip

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
        """Whether the peak fits the memory the GPU leaves to the model."""
        return self.memory_per_gpu_gib <= self.capacity_gib

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
            "memory_per_gpu_gib", "params_gib", "grads_gib", "optimizer_gib", "activations_gib",
            "kv_cache_gib", "buffers_gib", "fits", "peak_stage", "capacity_gib", "seq_len_tokens",
        )  # fmt: skip
        out: dict[str, Any] = {k: getattr(self, k) for k in keys}
        out["stages"] = [stage.to_dict() for stage in self.stages]
        return out


def memory_per_gpu(plan: Plan, layout: Layout) -> MemoryReport:
    """Memory per GPU of every pipeline stage of ``plan``, and the peak (module docstring)."""
    counts = count_params(plan.model)
    inference = plan.workload.mode == "inference"
    stages = [
        _stage_memory(plan, layout, counts, i, inference) for i in range(len(layout.stage_layers))
    ]
    peak = max(stages, key=lambda st: st.total_gib)
    hw = plan.hardware
    return MemoryReport(
        stages=stages,
        peak_stage=peak.stage,
        capacity_gib=hw.memory_gib - hw.memory_reserved_gib,
        seq_len_tokens=_inference_context_len(plan) if inference else _train_seq_len(plan),
    )


# ---- parameters -------------------------------------------------------------------------


def stage_params_per_gpu(
    plan: Plan, layout: Layout, counts: ParamCounts, stage: int
) -> tuple[float, float]:
    """Parameters one GPU of ``stage`` holds: (dense and replicated, routed experts)."""
    model, t = plan.model, layout.tp
    num_stages = len(layout.stage_layers)
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


def _layers_of(plan: Plan, layout: Layout, stage: int) -> list[int]:
    """Layers of ``stage`` that the model has (an explicit split past the last layer, which the
    audit reports, does not invent layers)."""
    return [i for i in layout.stage_layers[stage] if i < plan.model.num_layers]


def _expert_dp(layout: Layout) -> int:
    """Expert data-parallel size; 1 (no optimizer sharding, conservative) if folding fails."""
    return layout.edp or 1


# ---- activations ------------------------------------------------------------------------


def layer_activation_bytes(
    model: ModelSpec, par: ParallelSpec, layer: int, seq_len_tokens: float, batch: int,
    recompute: str | None = None,
) -> float:  # fmt: skip
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
    only the layer input, 2*sbh (/t with SP). ``seq_len_tokens`` is per GPU (already /cp).
    """
    recompute = recompute or par.recompute
    s, b, h, t = seq_len_tokens, batch, model.hidden_size, par.tp
    sp_div = t if par.sequence_parallel else 1
    scale = DTYPE_BYTES[model.dtype] / 2
    if recompute == "full":
        return scale * 2 * s * b * h / sp_div
    # Replicated across TP ranks without SP: layernorm inputs 4, attention input 2 and
    # dropout mask 1; the MLP input 2 and dropout mask 1 are added with the MLP below.
    replicated = 7 * s * b * h
    per_gpu = _attention_bytes_per_gpu(model, t, s * b)
    per_width = MLP_ACTIVATION_BYTES[model.activation] * s * b  # bytes per unit of MLP width
    moe = model.moe
    if moe is not None and model.is_moe_layer(layer):
        expert_div = t if par.sequence_parallel else par.expert_tp
        replicated += moe.top_k * 3 * s * b * h
        per_gpu += moe.top_k * per_width * model.ffn_hidden_size / expert_div
        shared_ffn = moe.shared_expert_ffn_hidden_size or model.ffn_hidden_size
        per_gpu += per_width * moe.num_shared_experts * shared_ffn / t
    else:
        replicated += 3 * s * b * h
        per_gpu += per_width * model.dense_ffn / t
    per_gpu += replicated / sp_div
    if recompute == "none" and not par.flash_attention:
        per_gpu += 5 * model.num_attention_heads * s * s * b / t
    return scale * per_gpu


def _attention_bytes_per_gpu(model: ModelSpec, t: int, tokens: float) -> float:
    """Bytes of Q, K, V and the output-projection input one GPU stores for ``tokens``.

    Q and the projection input hold a/t heads; K and V max(1, n_kv/t) heads (a GPU keeps at
    least one K/V head); MLA expands K and V to all ``a`` heads of its own head dims. For MHA
    this is Korthikanti's 8*sbh/t.
    """
    q_heads = model.num_attention_heads / t
    if model.mla is not None:
        qk = model.mla.qk_nope_head_dim + model.mla.qk_rope_head_dim
        v = model.mla.v_head_dim
        return 2 * tokens * q_heads * (2 * qk + 2 * v)
    kv_heads = max(1.0, model.kv_heads / t)
    return 2 * tokens * model.head_size * (2 * q_heads + 2 * kv_heads)


def inflight_microbatches(plan: Plan, stage: int, num_stages: int | None = None) -> float:
    """Micro-batches whose activations stage ``stage`` holds at its peak, in whole-stage units.

    GPipe: all ``m``. 1F1B: ``min(p - i, m)``. Interleaved (v > 1): Megatron's schedule runs
    ``2(p-i-1) + (v-1)p`` warm-up chunk forwards before its first backward, so it holds that
    plus one chunk micro-batches (at most ``m*v``), each 1/v of the stage's layers. On stage 0
    this is ``p * (1 + (p-1)/(p*v))`` micro-batches, the reference factor.
    """
    par = plan.parallel
    p = num_stages or par.pp
    m, v = par.num_microbatches, par.virtual_stages
    if par.schedule == "gpipe":
        return float(m)
    if par.schedule == "interleaved" and v > 1:
        chunks = min(m * v, 2 * (p - stage - 1) + (v - 1) * p + 1)
        return chunks / v
    return float(min(p - stage, m))


def _stage_activation_bytes(plan: Plan, layout: Layout, stage: int, inflight: float) -> float:
    """Training activations of one GPU of ``stage``: layers, embedding output, logits."""
    model, par = plan.model, plan.parallel
    s, b, h = _train_seq_len(plan) / par.cp, par.micro_batch_size, model.hidden_size
    sp_div = par.tp if par.sequence_parallel else 1
    scale = DTYPE_BYTES[model.dtype] / 2
    layers = _layers_of(plan, layout, stage)
    total = inflight * sum(layer_activation_bytes(model, par, i, s, b) for i in layers)
    if stage == 0:
        total += inflight * scale * 2 * s * b * h / sp_div
    if stage == len(layout.stage_layers) - 1:
        held = par.num_microbatches if par.schedule == "gpipe" else 1
        total += held * (scale * 4 * s * b * h / sp_div + 4 * s * b * model.vocab_size / par.tp)
    return total


def _inference_activation_bytes(plan: Plan, layout: Layout, stage: int) -> float:
    """Forward working set of one GPU of ``stage`` in inference (module docstring)."""
    model, par = plan.model, plan.parallel
    req = plan.workload.requests
    prompt = _prompt_len(plan) / par.cp
    layers = _layers_of(plan, layout, stage)
    working = max(
        (layer_activation_bytes(model, par, i, prompt, req.max_batch_size, "none") for i in layers),
        default=0.0,
    )
    if stage == len(layout.stage_layers) - 1:
        working += 4 * req.max_batch_size * model.vocab_size / par.tp
    return working


# ---- KV cache and buffers ---------------------------------------------------------------


def kv_cache_bytes(plan: Plan, layout: Layout, stage: int) -> float:
    """KV cache of one GPU of ``stage`` for a full batch of the longest requests."""
    model, par = plan.model, plan.parallel
    req = plan.workload.requests
    tokens = _inference_context_len(plan) / par.cp * req.max_batch_size
    if model.mla is not None:
        per_token_layer = model.mla.kv_lora_rank + model.mla.qk_rope_head_dim
    else:
        per_token_layer = 2 * max(1.0, model.kv_heads / par.tp) * model.head_size
    num_layers = len(_layers_of(plan, layout, stage))
    return num_layers * per_token_layer * tokens * DTYPE_BYTES[model.dtype]


def _buffer_bytes(plan: Plan, layout: Layout, stage: int, inference: bool) -> float:
    """Gradient buckets (training, reduced over > 1 rank) and MoE all-to-all buffers."""
    model, par = plan.model, plan.parallel
    total = 0.0
    has_moe = any(model.is_moe_layer(i) for i in _layers_of(plan, layout, stage))
    reduced = par.dp * par.cp > 1 or (has_moe and _expert_dp(layout) > 1)
    if not inference and reduced:
        total += 2 * par.grad_bucket_mb * MIB
    if has_moe and model.moe is not None:
        if inference:
            req = plan.workload.requests
            tokens = req.max_batch_size * _prompt_len(plan) / par.cp
        else:
            tokens = par.micro_batch_size * _train_seq_len(plan) / par.cp
        if par.sequence_parallel:
            tokens /= par.tp
        total += 2 * tokens * model.moe.top_k * model.hidden_size * DTYPE_BYTES[model.dtype]
    return total


# ---- one stage --------------------------------------------------------------------------


def _stage_memory(
    plan: Plan, layout: Layout, counts: ParamCounts, stage: int, inference: bool
) -> StageMemory:
    """Memory of one GPU of ``stage``."""
    par, dtype = plan.parallel, plan.model.dtype
    dense, experts = stage_params_per_gpu(plan, layout, counts, stage)
    num_stages = len(layout.stage_layers)
    if inference:
        inflight = 1.0
        params_b, grads_b, optim_b = (dense + experts) * DTYPE_BYTES[dtype], 0.0, 0.0
        act_b = _inference_activation_bytes(plan, layout, stage)
        kv_b = kv_cache_bytes(plan, layout, stage)
    else:
        w_bytes, g_bytes, o_bytes = TRAINING_BYTES_PER_PARAM[dtype]
        dense_dp, expert_dp = (par.dp * par.cp, _expert_dp(layout))
        if not par.distributed_optimizer:
            dense_dp = expert_dp = 1
        params_b, grads_b = (dense + experts) * w_bytes, (dense + experts) * g_bytes
        optim_b = o_bytes * (dense / dense_dp + experts / expert_dp)
        inflight = inflight_microbatches(plan, stage, num_stages)
        act_b = _stage_activation_bytes(plan, layout, stage, inflight)
        kv_b = 0.0
    return StageMemory(
        stage=stage,
        num_layers=len(_layers_of(plan, layout, stage)),
        inflight_microbatches=inflight,
        params_per_gpu=dense + experts,
        params_gib=params_b / GIB,
        grads_gib=grads_b / GIB,
        optimizer_gib=optim_b / GIB,
        activations_gib=act_b / GIB,
        kv_cache_gib=kv_b / GIB,
        buffers_gib=_buffer_bytes(plan, layout, stage, inference) / GIB,
    )


def _longest(length: LengthSpec, path: str) -> int:
    """The longest length a distribution can produce; an error if only a file knows it."""
    if length.longest is None:
        raise ValueError(f"{path} has no known maximum; set {path}.max")
    return length.longest


def _train_seq_len(plan: Plan) -> int:
    """The longest training sequence the workload can produce, in tokens."""
    return _longest(plan.workload.seq_len, "workload.seq_len")


def _prompt_len(plan: Plan) -> int:
    """The longest prompt of the inference workload, in tokens."""
    return _longest(plan.workload.requests.prompt_len, "workload.requests.prompt_len")


def _inference_context_len(plan: Plan) -> int:
    """Longest prompt + longest output: the most tokens one request keeps in the KV cache."""
    output = _longest(plan.workload.requests.output_len, "workload.requests.output_len")
    return _prompt_len(plan) + output

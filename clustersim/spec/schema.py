"""The plan-file schema: frozen, validated pydantic models.

Field names follow the input contract in the design document. Every field carries its unit in
its name (``_gib``, ``_gbps``, ``_us``, ``_ms``, ``_pct``). Presets are merged in by the loader
(``spec.load``) before these models validate, so every model here describes a fully resolved
plan.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

# Bounds of the plan's numbers (PlanError messages show them as "valid: ..."). Every float
# is finite (``_Strict`` rejects inf and NaN); every count has an upper bound, so that
# products of them (GPUs x layers x micro-batches, tokens x top-k x capacity factor) stay far
# inside int64 and a typo such as ``tp: 2**40`` is a plan error, not an overflow or an
# out-of-memory crash.
MAX_DEGREE = 2**20
"""Parallel degrees, their product (the world size), GPUs of the cluster, micro-batches."""
MAX_LAYERS = 2**16
"""Model layers (and layer-frequency / leading-dense counts)."""
MAX_WIDTH = 2**20
"""Hidden, FFN and head sizes, latent ranks."""
MAX_HEADS = 2**16
"""Attention and key/value heads."""
MAX_VOCAB = 2**24
"""Vocabulary size."""
MAX_EXPERTS = 2**16
"""Routed and shared experts per MoE layer."""
MAX_TOKENS = 2**24
"""Sequence, prompt and output lengths (tokens)."""
MAX_REQUESTS = 2**24
"""Requests of a serving workload."""
MAX_CAPACITY_FACTOR = 1e6
"""Capacity factor: far above any useful value (cf >= E / k is already dropless)."""
MAX_ROUTER_SKEW = 10.0
"""Zipf exponent of expert popularity: at 10 the top expert already takes >= 99.9 % of the
tokens of top-1 routing; larger values add nothing but floating-point underflow."""
MAX_RATE = 1e9
"""Bandwidths (GB/s), TFLOP/s, memory (GiB), request rates (1/s)."""
MAX_TIME_US = 1e6
"""Latencies and fixed times per kernel or message (us): at most one second."""

Degree = Annotated[int, Field(gt=0, le=MAX_DEGREE)]
Width = Annotated[int, Field(gt=0, le=MAX_WIDTH)]
Tokens = Annotated[int, Field(gt=0, le=MAX_TOKENS)]
Rate = Annotated[float, Field(gt=0, le=MAX_RATE)]
TimeUs = Annotated[float, Field(ge=0, le=MAX_TIME_US)]
Count = Annotated[int, Field(gt=0, le=2**63 - 1)]


class _Strict(BaseModel):
    """Base: unknown keys are errors, instances are immutable, floats are finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class MoESpec(_Strict):
    """Mixture-of-Experts part of a model (absent for dense models)."""

    num_experts: int = Field(gt=0, le=MAX_EXPERTS, description="Routed experts per MoE layer.")
    top_k: int = Field(2, gt=0, le=MAX_EXPERTS, description="Experts each token is routed to.")
    capacity_factor: float | None = Field(
        None, gt=0, le=MAX_CAPACITY_FACTOR,
        description="Capacity = ceil(T*k/E*cf) per expert; null = dropless.",
    )  # fmt: skip
    layer_freq: int = Field(
        1, gt=0, le=MAX_LAYERS, description="Every k-th layer (after first_k_dense) is MoE."
    )
    first_k_dense: int = Field(
        0, ge=0, le=MAX_LAYERS, description="Leading layers that stay dense."
    )
    router_skew: float = Field(
        0.0, ge=0, le=MAX_ROUTER_SKEW, description="0 = uniform expert popularity."
    )
    num_shared_experts: int = Field(
        0, ge=0, le=MAX_EXPERTS, description="Always-active experts per MoE layer."
    )
    shared_expert_ffn_hidden_size: Width | None = Field(
        None, description="FFN width of a shared expert; default = the model's ffn_hidden_size."
    )
    routing: Literal["sampled", "even"] = Field(
        "sampled",
        description="sampled: each token's experts drawn from the skewed popularity (default); "
        "even: every token's copies spread evenly (no sampling, perfect balance).",
    )
    drop_policy: Literal["probs", "position"] = "probs"
    pad_to_capacity: bool = False
    max_nodes_per_token: Degree | None = Field(
        None, description="Node-limited routing: a token's experts lie on at most M nodes."
    )
    routing_sampler: Literal["auto", "tokens", "counts"] = Field(
        "auto",
        description="tokens: draw every token's experts (exact); counts: draw counts per "
        "source rank (cost independent of tokens; exact for C(E,k) <= 8192, exact means "
        "otherwise; node-limited routing in dropless batches only); auto: counts where "
        "cheaper and possible.",
    )

    @model_validator(mode="after")
    def _top_k_fits(self) -> MoESpec:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        if self.routing_sampler == "counts" and self.max_nodes_per_token is not None:
            raise ValueError(
                "routing_sampler 'counts' does not model max_nodes_per_token; use 'auto' or "
                "'tokens'"
            )
        return self


class MLASpec(_Strict):
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank query and key/value projections."""

    q_lora_rank: Width | None = Field(None, description="null = full-rank query.")
    kv_lora_rank: Width
    qk_nope_head_dim: Width
    qk_rope_head_dim: Width
    v_head_dim: Width


class ModelSpec(_Strict):
    """Transformer shape. ``ffn_hidden_size`` is per expert for MoE layers."""

    name: str = "custom"
    preset: str | None = Field(None, description="Model preset the fields below override.")
    num_layers: int = Field(gt=0, le=MAX_LAYERS)
    hidden_size: Width
    num_attention_heads: int = Field(gt=0, le=MAX_HEADS)
    num_kv_heads: Annotated[int, Field(gt=0, le=MAX_HEADS)] | None = Field(
        None, description="Default: num_attention_heads."
    )
    head_dim: Width | None = Field(None, description="Default: hidden/heads.")
    ffn_hidden_size: Width
    dense_ffn_hidden_size: Width | None = Field(
        None, description="FFN width of the dense layers of an MoE model; default ffn_hidden_size."
    )
    vocab_size: int = Field(gt=0, le=MAX_VOCAB)
    activation: Literal["swiglu", "gelu"] = "swiglu"
    dtype: Literal["bf16", "fp16", "fp32", "fp8"] = Field(
        "bf16", description="Number format; fp8: FP8 GEMMs under fp8_recipe (BF16 elsewhere)."
    )
    fp8_recipe: Literal["tensorwise", "blockwise", "mxfp8"] | None = Field(
        None,
        description="dtype fp8: per-tensor, 1x128/128x128 block (DeepSeek-V3) or MXFP8 "
        "scaling; default blockwise on Hopper, mxfp8 on Blackwell.",
    )
    tie_embeddings: bool = False
    mla: MLASpec | None = Field(None, description="Latent attention instead of GQA/MHA.")
    moe: MoESpec | None = None
    mtp_layers: int = Field(
        0,
        ge=0,
        le=MAX_LAYERS,
        description="Multi-token prediction modules (DeepSeek-V3, Megatron-Core's "
        "mtp_num_layers), counted in num_layers as its last layers: each also runs the "
        "output layer and loss on its own hidden states, on the last pipeline stage "
        "(training; serving runs them as ordinary layers).",
    )

    @model_validator(mode="after")
    def _mtp_inside(self) -> ModelSpec:
        if self.mtp_layers >= self.num_layers:
            raise ValueError(
                f"mtp_layers ({self.mtp_layers}) counts the last layers of num_layers "
                f"({self.num_layers}): it must be smaller (valid: 0 to {self.num_layers - 1})"
            )
        return self

    @property
    def kv_heads(self) -> int:
        """Key/value heads (grouped-query attention), defaulting to the attention heads."""
        return self.num_kv_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        """Size of one attention head."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def dense_ffn(self) -> int:
        """FFN width of a dense (non-MoE) layer."""
        return self.dense_ffn_hidden_size or self.ffn_hidden_size

    def is_moe_layer(self, layer: int) -> bool:
        """Whether 0-based ``layer`` is an MoE layer."""
        if self.moe is None or layer < self.moe.first_k_dense:
            return False
        return (layer - self.moe.first_k_dense) % self.moe.layer_freq == 0

    def moe_layer_mask(self) -> np.ndarray:
        """Read-only boolean array: ``mask[i]`` is whether layer ``i`` is an MoE layer (one
        array per layer pattern, so per-layer questions stay vectorised for deep models)."""
        if self.moe is None:
            return _layer_mask(self.num_layers, self.num_layers, 1)
        return _layer_mask(self.num_layers, self.moe.first_k_dense, self.moe.layer_freq)

    @property
    def num_moe_layers(self) -> int:
        """MoE layers in the whole model."""
        return int(self.moe_layer_mask().sum())


class LinkSpec(_Strict):
    """A link class: per-GPU, per-direction bandwidth and per-message latency."""

    bandwidth_gbps: Rate = Field(
        description="GB/s (gigabytes, not gigabits: a 400 Gb/s NIC is 50 GB/s), per GPU and "
        "direction."
    )
    latency_us: TimeUs = Field(description="Per-message latency, microseconds.")


class GemmCalibration(_Strict):
    """Dense GEMM speed: ``time = max(2mnk / (peak * efficiency * shape), bytes / (HBM *
    memory_efficiency))`` with ``shape = prod over m, n, k of x / (x + half_dim)`` (small or
    skinny GEMMs fill fewer tiles and waves)."""

    efficiency: float = Field(gt=0, le=1, description="Fraction of peak FLOP/s of large GEMMs.")
    half_dim: float = Field(
        ge=0, le=1e9, description="GEMM dimension at which its shape factor is 1/2."
    )
    memory_efficiency: float = Field(
        gt=0, le=1, description="Fraction of HBM bandwidth a GEMM reaches reading its operands."
    )
    fp8_efficiency: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Fraction of the FP8 peak large FP8 GEMMs reach; null = the fitted default "
        "(costs/precision.py).",
    )


class MemoryCalibration(_Strict):
    """Memory-bound kernels: plain streams (residual adds, permutes, the optimizer step) and
    element-wise kernels with reductions or transcendentals (norms, rotary embedding,
    activation functions, softmax/top-k), which reach less."""

    efficiency: float = Field(gt=0, le=1, description="Fraction of HBM bandwidth of streams.")
    elementwise_efficiency: float = Field(
        gt=0, le=1, description="Fraction of HBM bandwidth of rotary, activations, softmax."
    )
    rotary_efficiency: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Fraction of HBM bandwidth of the rotary embedding (gathers each "
        "position's cos/sin row, half-row rotations); null: elementwise_efficiency.",
    )
    norm_efficiency: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Fraction of HBM bandwidth of layer/RMS norms (row reductions); "
        "null: elementwise_efficiency.",
    )
    l2_mb: float | None = Field(
        None,
        gt=0,
        description="L2 cache size, MB (10^6 bytes; stated, not fitted): a norm or plain "
        "stream whose bytes fit in it runs from L2; null: no L2 term.",
    )
    l2_speedup: float | None = Field(
        None,
        ge=1,
        le=10,
        description="Rate factor of norms and plain streams whose bytes fit in the L2 cache "
        "(l2_mb) over their HBM rate; null: no L2 term.",
    )
    row_gbps: float | None = Field(
        None,
        gt=0,
        description="GB/s one thread block moves on its own: a kernel run as one block per "
        "token row (activation, rotary embedding, norms) takes at least one row's bytes at "
        "this rate; null: no such floor.",
    )


class KernelCalibration(_Strict):
    """Fixed time per kernel: GPU-side floor and host launch (eager vs CUDA graphs).

    A kernel occupies the GPU for ``fixed_us + work``, followed by ``graph_launch_us`` of
    kernel-to-kernel latency before the next one starts (what a CUDA-graph replay pays per
    kernel); in eager mode the host needs ``launch_us`` to issue it and the stream advances
    by the larger of the two (kernels shorter than their launch leave the GPU waiting), plus
    ``framework_us``."""

    fixed_us: float = Field(ge=0, le=MAX_TIME_US, description="GPU time of an empty kernel.")
    stream_fixed_us: float | None = Field(
        None,
        ge=0,
        le=MAX_TIME_US,
        description="GPU time of an empty plain stream kernel (residual add, permute, "
        "cache write); null: fixed_us.",
    )
    norm_fixed_us: float | None = Field(
        None,
        ge=0,
        le=MAX_TIME_US,
        description="GPU time of an empty norm kernel; null: fixed_us.",
    )
    launch_us: float = Field(
        ge=0, le=MAX_TIME_US, description="Host time per kernel launch, eager mode."
    )
    graph_launch_us: float = Field(
        ge=0,
        le=MAX_TIME_US,
        description="Kernel-to-kernel GPU latency: the time per kernel of a CUDA-graph "
        "replay beyond its GPU time (also paid, hidden or not, in eager mode).",
    )
    framework_us: float = Field(
        0.0,
        ge=0,
        le=MAX_TIME_US,
        description="Eager framework time per kernel that never overlaps the GPU "
        "(Python, autograd bookkeeping); 0 under CUDA graphs.",
    )

    @model_validator(mode="after")
    def _graphs_not_slower(self) -> KernelCalibration:
        if self.graph_launch_us > self.launch_us:
            raise ValueError(
                f"graph_launch_us ({self.graph_launch_us}) cannot exceed launch_us "
                f"({self.launch_us}): replaying a CUDA graph is never slower than launching"
            )
        return self


class AttentionCalibration(_Strict):
    """Core attention (FlashAttention): prefill compute-bound, decode KV-read bound."""

    efficiency: float = Field(gt=0, le=1, description="Fraction of peak at long sequences.")
    half_seq: float = Field(ge=0, le=1e9, description="Query length at which efficiency is halved.")
    decode_memory_efficiency: float = Field(
        gt=0, le=1, description="Fraction of HBM bandwidth reached reading the KV cache."
    )
    decode_l2_gbps: float | None = Field(
        None,
        gt=0,
        le=MAX_RATE,
        description="Rate (GB/s) at which a per-query-head decode kernel "
        "(workload.requests.decode_attention: per_head) re-reads the K/V of a shared GQA "
        "head from the L2 cache; null: no such bound.",
    )
    backward_ratio: float = Field(
        ge=1,
        le=10,
        description="Backward time over forward time of fused (flash) attention in training.",
    )
    exp_tflops: float | None = Field(
        None,
        gt=0,
        le=1e4,
        description="Special-function (exp) rate of the GPU, 10^12 per second (stated: SMs x 16 "
        "per clock x clock): each query-key pair of flash attention costs one exp per head on "
        "top of its matmul FLOPs; null: no such term.",
    )


class MoECalibration(_Strict):
    """MoE layer overheads not captured by GEMMs and collectives, and the DeepEP dispatcher.

    With ``parallel.moe_dispatcher: deepep`` the EP dispatch and combine take
    ``deepep_latency_us + max(NVLink bytes / deepep_intra_node_gbps, RDMA bytes /
    deepep_inter_node_gbps)`` of the busiest GPU (DeepEP's "bottleneck bandwidth")."""

    dropless_sync_us: float = Field(
        ge=0,
        le=MAX_TIME_US,
        description="Host-device synchronisation per MoE layer and direction, dropless.",
    )
    deepep_intra_node_gbps: float = Field(
        gt=0, le=MAX_RATE, description="DeepEP NVLink bandwidth per GPU."
    )
    deepep_inter_node_gbps: float = Field(
        gt=0, le=MAX_RATE, description="DeepEP RDMA bandwidth per GPU."
    )
    deepep_latency_us: float = Field(
        ge=0, le=MAX_TIME_US, description="DeepEP fixed time per dispatch/combine."
    )


class CollectiveCalibration(_Strict):
    """Achieved NCCL bandwidth and latency per link class (``clustersim.costs.comm``).

    A collective of ``steps`` ring/tree steps moving ``f * S`` bytes per GPU over a link class
    takes ``base_latency_us + steps * latency_us + f * S / (bandwidth * efficiency)``: the
    bus bandwidth grows with the message as ``B_eff * S / (S + S_half)``, ``S_half = base *
    B_eff / f``. Point-to-point transfers (pipeline sends, all-to-all) use ``p2p_efficiency``
    and pay ``base_latency_us + latency_us`` once. A group within one node uses the intra-node
    values; one that spans nodes the inter-node ones. ``latency_us`` null: the link's own
    ``latency_us`` (LinkSpec). ``intra_node_protocols``: ring collectives inside a node with
    NCCL's protocols instead (field description)."""

    intra_node_efficiency: float = Field(
        gt=0, le=1, description="Large-message bus bandwidth / NVLink bandwidth."
    )
    inter_node_efficiency: float = Field(
        gt=0, le=1, description="Large-message bus bandwidth / network bandwidth (per NIC)."
    )
    intra_node_latency_us: float | None = Field(
        ge=0,
        le=MAX_TIME_US,
        description="Latency per ring/tree step, NVLink; null = the link's latency_us.",
    )
    inter_node_latency_us: float | None = Field(
        ge=0,
        le=MAX_TIME_US,
        description="Latency per ring/tree step, network; null = the link's latency_us.",
    )
    intra_node_base_latency_us: float = Field(
        0.0,
        ge=0,
        le=MAX_TIME_US,
        description="Fixed time per collective within a node (launch, sync).",
    )
    inter_node_base_latency_us: float = Field(
        0.0,
        ge=0,
        le=MAX_TIME_US,
        description="Fixed time per collective spanning nodes (launch, sync).",
    )
    intra_node_p2p_efficiency: float = Field(
        1.0, gt=0, le=1, description="Send/receive and all-to-all bandwidth / NVLink bandwidth."
    )
    intra_node_protocols: bool = Field(
        False,
        description=(
            "Ring all-reduce / reduce-scatter / all-gather inside a node as NCCL's tuner runs "
            "them: the fastest of its LL, LL128 and Simple protocols, each with NCCL's own "
            "base and per-step latencies (clustersim.costs.nccl), the Simple protocol at "
            "intra_node_efficiency, plus intra_node_base_latency_us per call; "
            "intra_node_latency_us then applies to send/receive and all-to-all only."
        ),
    )
    inter_node_p2p_efficiency: float = Field(
        1.0, gt=0, le=1, description="Send/receive and all-to-all bandwidth / network bandwidth."
    )
    intra_node_efficiency_gpu_exponent: float = Field(
        0.0,
        ge=-1,
        le=1,
        description=(
            "With intra_node_protocols: the Simple protocol's bus bandwidth of a ring over n "
            "GPUs of one node is intra_node_efficiency x (n / 8)^exponent (capped at the "
            "link's bandwidth); 0 = the same efficiency for every GPU count."
        ),
    )
    intra_node_step_latency_scale: float = Field(
        1.0,
        ge=0,
        le=4,
        description=(
            "With intra_node_protocols: factor on NCCL's per-step NVLink latency (tuning.cc "
            "hwLat, Ring: LL 0.6 / LL128 1.9 / Simple 3.4 µs per step) of a ring inside a "
            "node; 1 = NCCL's table."
        ),
    )


class CalibrationSpec(_Strict):
    """Fitted cost-model parameters of one GPU generation (``clustersim calibrate``)."""

    generation: str = Field(description="Data file these values come from (a100, h100, ...).")
    source: str = ""
    gemm: GemmCalibration
    memory: MemoryCalibration
    kernel: KernelCalibration
    attention: AttentionCalibration
    moe: MoECalibration
    collectives: CollectiveCalibration


class TopologySpec(_Strict):
    """The network as shared links (``clustersim.engine.network``): every node's NVLink
    domain, its NICs and the uplinks of its leaf (and pod) are links that concurrent
    collectives share max-min fairly. Each NIC runs at ``inter_node.bandwidth_gbps`` per
    direction; a leaf's uplinks carry ``nodes_per_leaf x nics_per_node x NIC bandwidth /
    oversubscription`` (per tier)."""

    kind: Literal["non_blocking", "rail_optimized", "fat_tree"] = Field(
        "non_blocking",
        description="non_blocking: only NVLink and NICs are shared; rail_optimized: GPU i of "
        "every node on rail i, a leaf group is a scalable unit of nodes; fat_tree: leaf "
        "switches of nodes_per_leaf nodes under spines.",
    )
    nics_per_node: Degree | None = Field(
        None, description="Network ports of one node (null = gpus_per_node, one NIC per GPU)."
    )
    oversubscription: float = Field(
        1.0,
        ge=1.0,
        le=64.0,
        description="Down / up bandwidth of a leaf (and pod) switch; 1.0 = non-blocking.",
    )
    tiers: Literal[2, 3] = Field(2, description="Switch tiers: 2 leaf-spine, 3 adds pods/core.")
    nodes_per_leaf: Degree = Field(
        32, description="Nodes one leaf group connects in one hop (DGX SuperPOD unit: 32)."
    )
    leaves_per_pod: Degree = Field(8, description="Leaf groups per pod (tiers: 3 only).")


class HardwareSpec(_Strict):
    """The cluster: GPU figures (from a preset, overridable) and its size."""

    gpu: str = "custom"
    num_nodes: Degree
    gpus_per_node: Degree
    memory_gib: Rate
    peak_tflops: Rate = Field(description="Dense BF16/FP16 peak, TFLOP/s.")
    fp8_peak_tflops: Rate | None = Field(
        None, description="Dense FP8 peak, TFLOP/s; null = no FP8 tensor cores (A100)."
    )
    architecture: Literal["ampere", "hopper", "blackwell"] | None = Field(
        None, description="GPU architecture (picks the default FP8 recipe); from the preset."
    )
    hbm_bandwidth_gbps: Rate = Field(description="HBM bandwidth in GB/s (gigabytes per second).")
    intra_node: LinkSpec = Field(description="NVLink: GB/s per GPU and direction, latency us.")
    inter_node: LinkSpec = Field(
        description="Network: GB/s per GPU and direction (a 400 Gb/s NIC = 50 GB/s), latency us."
    )
    calibration: CalibrationSpec = Field(
        description="Cost-model parameters; default: the data file of the GPU's generation."
    )
    memory_reserved_gib: float = Field(
        0.0, ge=0, le=MAX_RATE,
        description="Memory not available to the model (CUDA context, allocator).",
    )  # fmt: skip
    topology: TopologySpec | None = Field(
        None,
        description="Shared-link network model (or a preset name); null = each collective "
        "alone at its link's bandwidth (no contention).",
    )
    nvlink_domain_gpus: Degree | None = Field(
        None,
        description="GPUs that share one NVLink (NVSwitch) domain, whole nodes; a group inside "
        "one domain runs at intra_node figures (GB200 NVL72: 72). Null = gpus_per_node.",
    )

    @model_validator(mode="after")
    def _cluster_size(self) -> HardwareSpec:
        if self.num_gpus > MAX_DEGREE:
            raise ValueError(
                f"num_nodes x gpus_per_node = {self.num_gpus} GPUs; at most {MAX_DEGREE} "
                f"are simulated"
            )
        domain = self.nvlink_domain_gpus
        if domain is not None and domain % self.gpus_per_node:
            raise ValueError(
                f"nvlink_domain_gpus = {domain} is not a multiple of gpus_per_node = "
                f"{self.gpus_per_node}: an NVLink domain is made of whole nodes"
            )
        return self

    @property
    def nvlink_domain(self) -> int:
        """GPUs of one NVLink domain (``nvlink_domain_gpus``, default ``gpus_per_node``)."""
        return self.nvlink_domain_gpus or self.gpus_per_node

    @property
    def num_gpus(self) -> int:
        """GPUs the cluster has."""
        return self.num_nodes * self.gpus_per_node


RecomputeModule = Literal["core_attn", "mla_up_proj", "mlp", "moe_act", "layernorm"]
RECOMPUTE_MODULES: tuple[str, ...] = ("core_attn", "mla_up_proj", "mlp", "moe_act", "layernorm")


class ParallelSpec(_Strict):
    """Parallel degrees and training-system options."""

    tp: Degree
    pp: Degree
    dp: Degree
    cp: Degree = 1
    ep: Degree = 1
    etp: Degree | None = Field(None, description="Expert tensor parallel size; default = tp.")
    micro_batch_size: Degree = 1
    num_microbatches: Degree = Field(1, description="Gradient accumulation steps.")
    schedule: Literal["gpipe", "1f1b", "interleaved", "dualpipe"] = Field(
        "1f1b",
        description="Pipeline schedule; dualpipe: DeepSeek's bidirectional DualPipe (pp even, "
        "num_microbatches even and >= 2 x pp; every GPU holds two model stages).",
    )
    virtual_stages: int = Field(1, gt=0, le=MAX_LAYERS)
    layers_per_stage: list[Annotated[int, Field(gt=0, le=MAX_LAYERS)]] | None = Field(
        None, max_length=MAX_DEGREE,
        description="Explicit layer split: one entry per pipeline stage, or with "
        "virtual_stages v > 1 one per virtual stage (pp x v entries in Megatron's order: the "
        "first chunks of stages 0..pp-1, then the second chunks, ...); default even.",
    )  # fmt: skip
    sequence_parallel: bool = False
    flash_attention: bool = True
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_modules: list[RecomputeModule] | None = Field(
        None,
        max_length=len(RECOMPUTE_MODULES),
        description="Megatron-Core's selective recompute (--recompute-modules), used with "
        "recompute: selective only (as Megatron ignores it under other granularities): the "
        "modules whose forward the backward runs again. core_attn: core attention; "
        "mla_up_proj: MLA's query and key/value up-projections with their latent norms and "
        "the rotary embedding; mlp: a dense layer's MLP; moe_act: the routed experts' "
        "activation; layernorm: the norms that are modules of their own (MLA's input norm, "
        "an MoE layer's pre-MLP norm). Default: [core_attn], Megatron's default.",
    )
    fused_cross_entropy: bool = Field(
        False,
        description="Transformer Engine's fused cross-entropy (Megatron-Core "
        "--cross-entropy-loss-fusion --cross-entropy-fusion-impl te): the loss reads the "
        "logits twice and writes their gradient in its forward, the backward scales it "
        "(10 bytes per logit); default: Megatron's unfused vocab-parallel loss (52).",
    )
    distributed_optimizer: bool = Field(
        False, description="Megatron's distributed optimizer: an alias of dp_sharding: optimizer."
    )
    dp_sharding: Literal["none", "optimizer", "gradients", "full"] | None = Field(
        None,
        description="Sharded data parallelism: ZeRO-1 (optimizer states), ZeRO-2 (+ gradients), "
        "ZeRO-3 / FSDP (+ parameters, gathered per layer); default: optimizer with "
        "distributed_optimizer, else none.",
    )
    dp_shard_group: Degree | None = Field(
        None,
        description="HSDP: shard over groups of this many DP ranks (dividing dp), replicate "
        "across them; default: all of DP.",
    )
    overlap_communication: bool = True
    grad_bucket_mb: float = Field(
        40.0,
        gt=0,
        le=MAX_RATE,
        description="Gradient bucket (MiB of gradients, dense and expert together) of the "
        "first model chunk of the first pipeline stage; with the distributed optimizer and "
        "overlap also the buckets of its parameter gather. Every other chunk is one bucket "
        "(Megatron-Core).",
    )
    overlap_ep_comm: bool = Field(
        False,
        description="Megatron-Core EP all-to-all overlap: in the 1F1B steady state the "
        "dispatch/combine of one micro-batch runs under the compute of the other; under "
        "dualpipe the same inside each F&B step.",
    )
    moe_dispatcher: Literal["alltoall", "deepep"] = Field(
        "alltoall", description="MoE token dispatcher: NCCL all-to-all, or DeepEP kernels."
    )
    device_max_connections: int | None = Field(
        None,
        ge=1,
        le=32,
        description="CUDA_DEVICE_MAX_CONNECTIONS: hardware work queues the GPU's streams "
        "share. With 1, kernels start in issue order, so a ZeRO-2/3 collective issued while "
        "the previous one still runs holds back the compute issued after it. Default: "
        "Megatron-LM's setting, 1 with tp or cp > 1 on GPUs before Blackwell, else CUDA's 8.",
    )
    forward_prefetch: bool = Field(
        False,
        description="ZeRO-3 (dp_sharding: full): issue layer i's forward all-gather before "
        "layer i-1 computes (PyTorch FSDP forward_prefetch, FSDP2 "
        "set_modules_to_forward_prefetch). Default: PyTorch FSDP's default, the gather is "
        "issued in layer i's pre-forward hook: it still overlaps layer i-1 with several "
        "hardware queues, not with one (device_max_connections 1), where every forward "
        "gather is then exposed.",
    )
    prefill: ParallelSpec | None = Field(
        None,
        description="Disaggregated serving: the prefill pool's parallel block (with "
        "parallel.decode; the top-level fields then mirror the decode pool).",
    )
    decode: ParallelSpec | None = Field(
        None, description="Disaggregated serving: the decode pool's parallel block."
    )

    @model_validator(mode="before")
    @classmethod
    def _pools_alone(cls, data: Any) -> Any:
        """With ``prefill`` and ``decode``, the top level holds nothing else (fields equal to
        the decode pool's, as a dumped plan has them, are accepted); placeholders for the
        required degrees are mirrored from the decode pool after validation."""
        if not isinstance(data, dict) or (
            data.get("prefill") is None and data.get("decode") is None
        ):
            return data
        if data.get("prefill") is None or data.get("decode") is None:
            given = "prefill" if data.get("prefill") is not None else "decode"
            other = "decode" if given == "prefill" else "prefill"
            raise ValueError(
                f"parallel.{given} needs parallel.{other}: a disaggregated deployment "
                "sets both pools (or neither)"
            )
        decode = data["decode"]
        extra = sorted(
            k
            for k, v in data.items()
            if k not in ("prefill", "decode")
            and not (isinstance(decode, dict) and k in decode and decode[k] == v)
        )
        if extra:
            raise ValueError(
                f"parallel.{extra[0]}: with parallel.prefill and parallel.decode set "
                f"{', '.join(extra)} inside each pool (parallel.prefill.{extra[0]}, "
                f"parallel.decode.{extra[0]})"
            )
        return {"tp": 1, "pp": 1, "dp": 1, "prefill": data["prefill"], "decode": decode}

    @model_validator(mode="after")
    def _mirror_decode_pool(self) -> ParallelSpec:
        pools = (self.prefill, self.decode)
        if all(p is None for p in pools):
            return self
        for name, pool in zip(("prefill", "decode"), pools, strict=True):
            if pool.prefill is not None or pool.decode is not None:
                raise ValueError(f"parallel.{name} cannot itself hold prefill or decode pools")
        for name in type(self).model_fields:
            if name not in ("prefill", "decode"):
                object.__setattr__(self, name, getattr(self.decode, name))
        return self

    @model_validator(mode="after")
    def _world_size_bounded(self) -> ParallelSpec:
        if self.world_size > MAX_DEGREE:
            raise ValueError(
                f"tp x cp x dp x pp = {self.world_size} GPUs; at most {MAX_DEGREE} are simulated"
            )
        return self

    @model_validator(mode="after")
    def _sharding_consistent(self) -> ParallelSpec:
        if self.dp_sharding == "none" and self.distributed_optimizer:
            raise ValueError(
                "distributed_optimizer: true shards the optimizer states; it contradicts "
                "dp_sharding: none (valid: optimizer, gradients, full)"
            )
        if self.dp_shard_group is not None:
            if self.sharding == "none":
                raise ValueError("dp_shard_group needs dp_sharding (optimizer, gradients or full)")
            if self.dp % self.dp_shard_group:
                raise ValueError(
                    f"dp_shard_group ({self.dp_shard_group}) must divide dp ({self.dp})"
                )
        return self

    @property
    def selective_modules(self) -> tuple[str, ...]:
        """Modules a selective recompute runs again in the backward (``recompute_modules``,
        default core attention); none under ``recompute`` none or full (full recomputes the
        whole layer)."""
        if self.recompute != "selective":
            return ()
        if self.recompute_modules is None:
            return ("core_attn",)
        return tuple(dict.fromkeys(self.recompute_modules))

    @property
    def sharding(self) -> Literal["none", "optimizer", "gradients", "full"]:
        """What data parallelism shards: ``dp_sharding``, or ``optimizer`` under
        ``distributed_optimizer`` (its alias), else ``none``."""
        if self.dp_sharding is not None:
            return self.dp_sharding
        return "optimizer" if self.distributed_optimizer else "none"

    @property
    def shard_group(self) -> int:
        """DP ranks one shard group spans (HSDP: ``dp_shard_group``; default all of DP)."""
        return self.dp_shard_group or self.dp

    @property
    def expert_tp(self) -> int:
        """ETP, defaulting to TP as in Megatron-Core."""
        return self.etp if self.etp is not None else self.tp

    @property
    def disaggregated(self) -> bool:
        """Whether prefill and decode run on separate pools (``prefill`` and ``decode``)."""
        return self.decode is not None

    @property
    def pool_world_size(self) -> int:
        """GPUs of this block's own layout: TP x CP x DP x PP."""
        return self.tp * self.cp * self.dp * self.pp

    @property
    def world_size(self) -> int:
        """GPUs the plan uses: TP x CP x DP x PP; disaggregated, both pools together."""
        if self.decode is not None and self.prefill is not None:
            return self.prefill.pool_world_size + self.decode.pool_world_size
        return self.tp * self.cp * self.dp * self.pp


class LengthSpec(_Strict):
    """A distribution of token counts (sequence, prompt or output lengths)."""

    dist: Literal["fixed", "uniform", "lognormal", "empirical"] = "fixed"
    value: Tokens | None = Field(None, description="fixed: the length.")
    min: Tokens | None = None
    max: Tokens | None = None
    mean: Annotated[float, Field(gt=0, le=MAX_TOKENS)] | None = Field(
        None, description="lognormal: mean length."
    )
    sigma: Annotated[float, Field(gt=0, le=10)] | None = Field(
        None, description="lognormal: sigma of log-length."
    )
    file: str | None = Field(None, description="empirical: CSV or Arrow file of lengths.")
    column: str | None = Field(None, description="empirical: column name.")

    @model_validator(mode="after")
    def _complete(self) -> LengthSpec:
        need = {
            "fixed": ["value"],
            "uniform": ["min", "max"],
            "lognormal": ["mean", "sigma", "max"],
            "empirical": ["file", "column"],
        }[self.dist]
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(f"dist '{self.dist}' needs {', '.join(missing)}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is larger than max ({self.max})")
        return self

    @property
    def longest(self) -> int | None:
        """The longest length the distribution can produce (None if only a file knows)."""
        return self.value if self.dist == "fixed" else self.max


class PoolRequestsSpec(_Strict):
    """Batch limits of one pool of a disaggregated deployment (``workload.requests.prefill``
    or ``.decode``); a field left out (null) is the plan's own ``workload.requests`` value."""

    max_batch_size: int | None = Field(
        None,
        gt=0,
        le=MAX_DEGREE,
        description="max_num_seqs of this pool's replicas (default: workload.requests').",
    )
    max_num_batched_tokens: int | None = Field(
        None,
        gt=0,
        le=2**30,
        description="Token budget of one step of this pool's replicas (default: "
        "workload.requests').",
    )

    def overrides(self) -> dict[str, int]:
        """The limits this block sets."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class RequestsSpec(_Strict):
    """Inference request stream, and how each replica schedules it (vLLM-like defaults).

    Arrivals: ``poisson`` (exponential gaps), ``gamma`` (gamma gaps with coefficient of
    variation ``arrival_cv``: 1 = Poisson, > 1 burstier), ``uniform`` (evenly spaced) at
    ``rate_per_s``, or ``trace``: a CSV or Arrow IPC file with one request per row and the
    columns ``arrived_at`` (seconds), ``num_prefill_tokens`` and ``num_decode_tokens`` (the
    format of the Splitwise/Azure traces, ``traces/README.md``); every row is used unless
    ``num`` is given explicitly.
    """

    num: int = Field(
        1000,
        gt=0,
        le=MAX_REQUESTS,
        description="Requests to simulate (arrival: trace: the first num rows if set).",
    )
    arrival: Literal["poisson", "gamma", "uniform", "trace"] = "poisson"
    rate_per_s: Rate = 20.0
    arrival_cv: float = Field(
        1.0,
        gt=0,
        le=1e3,
        description="gamma: coefficient of variation of the gaps between arrivals.",
    )
    trace: str | None = Field(
        None,
        description="arrival: trace: CSV or Arrow file (arrived_at, num_prefill_tokens, "
        "num_decode_tokens).",
    )
    prompt_len: LengthSpec = LengthSpec(dist="fixed", value=1024)
    output_len: LengthSpec = LengthSpec(dist="fixed", value=128)
    max_batch_size: int = Field(
        64,
        gt=0,
        le=MAX_DEGREE,
        description="max_num_seqs: requests in one step of a replica (all micro-batches).",
    )
    max_num_batched_tokens: int = Field(
        8192,
        gt=0,
        le=2**30,
        description="Token budget of one step of a replica (prefill chunks + decodes).",
    )
    chunked_prefill: bool = Field(
        True,
        description="Split long prompts over steps and mix them with decodes (vLLM V1); "
        "false: prefill-only steps take priority over decode steps (vLLM V0).",
    )
    kv_block_size: int = Field(
        16, gt=0, le=MAX_TOKENS, description="Tokens per paged KV-cache block."
    )
    kv_dtype: Literal["bf16", "fp16", "fp32", "fp8"] | None = Field(
        None, description="KV-cache element type; default: the activations' (bf16 for fp8 models)."
    )
    cuda_graphs: bool = Field(
        True, description="Decode steps replay CUDA graphs (serving engines' default)."
    )
    decode_attention: Literal["grouped", "per_head"] = Field(
        "grouped",
        description="Decode attention kernel: grouped (FlashAttention, FlashInfer, "
        "TensorRT-LLM XQA: each K/V head read once for all its query heads) or per_head (one "
        "thread block per query head, which re-reads its shared K/V head: TensorRT-LLM's "
        "masked MHA kernel, vLLM's PagedAttention v1/v2).",
    )
    fused_elementwise: bool = Field(
        False,
        description="The engine compiles its layers and fuses element-wise kernels into their "
        "neighbours (TensorRT-LLM engines, torch.compile): the activation into the up "
        "projection's epilogue, each FP8 quantise into the kernel producing its input, the "
        "residual add into the next norm, the rotary embedding into the KV-cache write; "
        "false: one kernel each (vLLM-style layers).",
    )
    step_host_us: float = Field(
        0.0,
        ge=0,
        le=MAX_TIME_US,
        description="Host time per engine step that the GPU waits for: work the engine runs "
        "eagerly between two forward passes (input preparation, sampling, scheduling), "
        "outside any CUDA graph and not overlapped with the GPU (e.g. SGLang's bench_latency "
        "of v0.3; VALIDATION.md gives the fitted value); 0: none or hidden (an overlap "
        "scheduler, a compiled step).",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of GPU memory for weights, activations and KV cache."
    )
    num_gpu_blocks: Annotated[int, Field(gt=0, le=2**40)] | None = Field(
        None, description="KV-cache blocks per replica; default: what fits in the memory left."
    )
    dispatch: Literal["round_robin", "least_loaded"] = Field(
        "round_robin", description="How arriving requests are sent to data-parallel replicas."
    )
    prefill: PoolRequestsSpec | None = Field(
        None,
        description="Disaggregated plans: the prefill pool's own batch limits "
        "(max_batch_size, max_num_batched_tokens); default: the ones above.",
    )
    decode: PoolRequestsSpec | None = Field(
        None,
        description="Disaggregated plans: the decode pool's own batch limits "
        "(max_batch_size, max_num_batched_tokens); default: the ones above.",
    )

    @model_validator(mode="after")
    def _trace_given(self) -> RequestsSpec:
        if self.arrival == "trace" and not self.trace:
            raise ValueError("arrival 'trace' needs trace (a CSV or Arrow file of requests)")
        return self


class WorkloadSpec(_Strict):
    """What the plan runs: training iterations or an inference request stream."""

    mode: Literal["training", "inference"] = "training"
    seq_len: LengthSpec = LengthSpec(dist="fixed", value=4096)
    requests: RequestsSpec = RequestsSpec()


class TargetsSpec(_Strict):
    """Requirements the plan must meet; each is optional."""

    latency_ms_max: PositiveFloat | None = None
    ttft_ms_max: PositiveFloat | None = None
    tpot_ms_max: PositiveFloat | None = None
    ttft_ms_p99_max: PositiveFloat | None = Field(
        None,
        description="Serving SLO: a request is good only if its TTFT (ms) is at most this; "
        "met when the p99 TTFT is (at least 99% of requests good on TTFT).",
    )
    tpot_ms_p99_max: PositiveFloat | None = Field(
        None,
        description="Serving SLO: a request is good only if its TPOT (ms) is at most this; "
        "met when the p99 TPOT is.",
    )
    ttft_ms_p50_max: PositiveFloat | None = Field(
        None, description="Serving SLO on the median: p50 TTFT (ms) at most this."
    )
    tpot_ms_p50_max: PositiveFloat | None = Field(
        None, description="Serving SLO on the median: p50 TPOT (ms) at most this."
    )
    throughput_tokens_per_ms_min: PositiveFloat | None = None
    comm_overhead_pct_max: float | None = Field(None, ge=0)
    load_balance_pct_min: float | None = Field(None, ge=0, le=100)
    gpu_utilization_pct_min: float | None = Field(None, ge=0, le=100)
    memory_per_gpu_gib_max: PositiveFloat | None = None


FormulaFactor = Literal["tp", "cp", "dp", "pp", "ep", "etp", "edp"]


class GpuFormulaClaim(_Strict):
    """A claimed product of parallel degrees giving the GPU count, such as "EP 16 x TP 4 = 64":
    ``{factors: [ep, tp], value: 64}``. Checked as arithmetic (the product of the plan's
    degrees) and against the layout (GPUs used = TP x CP x DP x PP)."""

    factors: list[FormulaFactor] = Field(min_length=1, max_length=8)
    value: Count


class RelativeClaims(_Strict):
    """Claims about this plan against the plan it is compared with (``clustersim compare``):
    changes are this plan's value relative to the other one's."""

    latency_change_pct: float | None = Field(
        None, ge=-100, le=1e6, description="100 x (latency / other's latency - 1); -75 = 4x faster."
    )
    iteration_time_change_pct: float | None = Field(None, ge=-100, le=1e6)
    throughput_ratio: PositiveFloat | None = Field(
        None, le=1e9, description="Throughput / the other plan's throughput."
    )
    gpu_utilization_pct_min_per_gpu: float | None = Field(
        None, ge=0, le=100, description="Every GPU at least this busy (a lower bound)."
    )
    expert_utilization_pct: float | None = Field(
        None, ge=0, le=100, description="Share of (layer, expert) pairs that receive tokens."
    )


# the relative claims that need the other plan; the rest are decided by this plan's simulation
RELATIVE_BASELINE_CLAIMS = ("latency_change_pct", "iteration_time_change_pct", "throughput_ratio")


class ClaimsSpec(_Strict):
    """Numbers the plan's authors assert; each is checked against the computed value."""

    total_gpus: Count | None = None
    gpus_per_stage: Count | None = None
    total_experts: Count | None = None
    ep_groups: Count | None = None
    experts_per_gpu: float | None = Field(None, gt=0)
    experts_per_gpu_per_layer: float | None = Field(None, gt=0)
    layers_per_stage: Count | list[Count] | None = None
    memory_per_gpu_gib: PositiveFloat | None = None
    params_gib: PositiveFloat | None = None
    optimizer_gib: PositiveFloat | None = None
    activations_gib: PositiveFloat | None = None
    latency_ms: PositiveFloat | None = None
    ttft_ms: PositiveFloat | None = None
    tpot_ms: PositiveFloat | None = None
    throughput_tokens_per_ms: PositiveFloat | None = None
    comm_overhead_pct: float | None = Field(None, ge=0)
    load_balance_pct: float | None = Field(None, ge=0, le=100)
    gpu_utilization_pct: float | None = Field(None, ge=0, le=100)
    experts_per_ep_group: float | None = Field(
        None, gt=0, description="Routed experts an EP group holds: experts x MoE layers of a stage."
    )
    modules_per_gpu: float | None = Field(
        None,
        gt=0,
        description="Mean over GPUs of the layer modules a GPU holds (a shard counts as one): "
        "per layer of its stage one attention block, one dense FFN or its routed experts "
        "(+ shared experts).",
    )
    modules_per_gpu_variance: float | None = Field(
        None, ge=0, description="Variance over GPUs of modules_per_gpu."
    )
    gpus_by_formula: GpuFormulaClaim | None = None
    peak_bandwidth_gbps: PositiveFloat | None = Field(
        None, description="A peak bandwidth of the hardware (GB/s), checked against the preset."
    )
    peak_bandwidth_link: Literal["hbm", "intra_node", "inter_node"] | None = Field(
        None, description="Which bandwidth peak_bandwidth_gbps names; default: any of them."
    )
    comm_to_compute_pct: float | None = Field(
        None, ge=0, description="All communication time / compute time, in %."
    )
    comm_step_share_pct: float | None = Field(
        None, ge=0, le=100, description="Serving: share of step time in TP/EP/PP communication."
    )
    roofline_throughput_tokens_per_ms: PositiveFloat | None = Field(
        None, description="Theoretical throughput (peak FLOP/s and HBM, no comm, no bubble)."
    )
    relative: RelativeClaims | None = None


class Plan(_Strict):
    """A whole deployment plan: model, cluster, parallel strategy, workload, targets, claims."""

    name: str = "plan"
    seed: int = Field(0, ge=0, le=2**63 - 1)
    model: ModelSpec
    hardware: HardwareSpec
    parallel: ParallelSpec
    workload: WorkloadSpec = WorkloadSpec()
    targets: TargetsSpec = TargetsSpec()
    claims: ClaimsSpec = ClaimsSpec()
    # fields the loader derived because the plan left them out (reported as assumptions)
    _derived: dict[str, str] = PrivateAttr(default_factory=dict)

    def pool(self, name: Literal["prefill", "decode"]) -> Plan:
        """One pool of a disaggregated deployment as a plan of its own: this plan with
        ``parallel`` = the pool's block (its GPUs are ranks ``pool_first_rank(name)`` on)
        and ``workload.requests`` with the pool's own batch limits
        (``workload.requests.<name>``) in place."""
        block = getattr(self.parallel, name)
        if block is None:
            raise ValueError(f"parallel.{name} is not set: the plan is not disaggregated")
        req = self.workload.requests
        limits = getattr(req, name)
        own = req.model_copy(
            update={**(limits.overrides() if limits else {}), "prefill": None, "decode": None}
        )
        workload = self.workload.model_copy(update={"requests": own})
        pooled = self.model_copy(
            update={"parallel": block, "workload": workload, "name": f"{self.name} ({name})"}
        )
        pooled._derived = dict(self._derived)
        return pooled

    def pool_first_rank(self, name: Literal["prefill", "decode"]) -> int:
        """The first global rank of a pool: the prefill pool first, then the decode pool."""
        prefill = self.parallel.prefill
        return 0 if name == "prefill" or prefill is None else prefill.pool_world_size

    @property
    def derived(self) -> dict[str, str]:
        """Field path -> how the loader derived it (``spec.load``), e.g. ``parallel.dp``."""
        return dict(self._derived)

    @model_validator(mode="after")
    def _pools_serve(self) -> Plan:
        if self.parallel.disaggregated and self.workload.mode != "inference":
            raise ValueError(
                "parallel.prefill and parallel.decode (disaggregated serving) need "
                f"workload.mode: inference (mode is {self.workload.mode}); a training plan "
                "sets one parallel block"
            )
        return self

    @field_validator("workload")
    @classmethod
    def _pool_limits_need_pools(cls, workload: WorkloadSpec, info: ValidationInfo):
        """``workload.requests.prefill`` / ``.decode`` only with both pools (an error located
        at ``workload``, the field the plan has to change or the pools it lacks)."""
        parallel = info.data.get("parallel")
        if parallel is None:  # parallel failed on its own: reported there
            return workload
        for name in ("prefill", "decode"):
            if getattr(workload.requests, name) is not None and not parallel.disaggregated:
                raise ValueError(
                    f"workload.requests.{name} (the batch limits of a {name} pool) needs a "
                    "disaggregated plan: set parallel.prefill and parallel.decode, or move "
                    "its limits up to workload.requests"
                )
        return workload

    @model_validator(mode="after")
    def _recompute_modules_exist(self) -> Plan:
        if "mla_up_proj" in self.parallel.selective_modules and self.model.mla is None:
            raise ValueError(
                "parallel.recompute_modules: mla_up_proj recomputes MLA's up-projections; "
                f"model {self.model.name} has no model.mla (valid: core_attn, mlp, moe_act, "
                "layernorm)"
            )
        return self

    @model_validator(mode="after")
    def _fp8_supported(self) -> Plan:
        model, hw = self.model, self.hardware
        if model.dtype != "fp8":
            if model.fp8_recipe is not None:
                raise ValueError(
                    f"model.fp8_recipe ({model.fp8_recipe}) needs model.dtype: fp8 "
                    f"(dtype is {model.dtype})"
                )
            return self
        if hw.fp8_peak_tflops is None:
            raise ValueError(
                f"model.dtype fp8 needs a GPU with FP8 tensor cores: {hw.gpu} has none "
                f"(valid there: bf16, fp16, fp32; or set hardware.fp8_peak_tflops)"
            )
        if model.fp8_recipe is None:
            raise ValueError(
                "model.dtype fp8 needs model.fp8_recipe (tensorwise, blockwise or mxfp8) on a "
                "GPU without hardware.architecture"
            )
        if model.fp8_recipe == "mxfp8" and hw.architecture not in (None, "blackwell"):
            raise ValueError(
                f"model.fp8_recipe mxfp8 needs Blackwell tensor cores; {hw.gpu} is "
                f"{hw.architecture} (valid there: tensorwise, blockwise)"
            )
        return self


@lru_cache(maxsize=64)
def _layer_mask(num_layers: int, first_k_dense: int, layer_freq: int) -> np.ndarray:
    """MoE layers of a model: from ``first_k_dense`` on, every ``layer_freq``-th layer."""
    index = np.arange(num_layers)
    mask = (index >= first_k_dense) & ((index - first_k_dense) % layer_freq == 0)
    mask.flags.writeable = False
    return mask

"""Time of the GPU kernels of one transformer layer, from the calibrated per-kernel model.

Every kernel is timed on its own (``hardware.calibration``, one data file per GPU generation,
fitted by ``clustersim calibrate``):

* a GEMM ``(m x k) @ (k x n)``: ``max(2mnk / (peak * e * shape), bytes / (HBM * mu_g))`` with
  ``shape = prod over x in (m, n, k) of x / (x + half_dim)``: small or skinny GEMMs (decode,
  small experts) fill fewer tiles and waves, large ones reach ``e`` of peak; ``bytes`` =
  ``(mk + kn + mn)`` elements (inputs, weights and output once);
* a grouped GEMM over ``a`` experts and ``r`` token copies: compute at the shape factor of
  ``r / a`` tokens per expert, memory reading ``a`` experts' weights; one kernel in serving
  (vLLM / SGLang fused MoE), ``a`` GEMM kernels of ``r / a`` rows in training (Transformer
  Engine's grouped linear, Megatron-Core's ``--moe-grouped-gemm``: multi-stream cuBLAS, one
  GEMM per local expert, each expert's input quantised on its own under FP8), so each launch
  pays its fixed time and host cost;
* a memory-bound kernel: ``bytes / (HBM * mu_c) + fixed_c`` for its class ``c``: plain
  streams (residual adds, permutes, KV-cache writes: ``memory.efficiency``,
  ``kernel.stream_fixed_us``), norms (row reductions: ``memory.norm_efficiency``,
  ``kernel.norm_fixed_us``), the rotary embedding (``memory.rotary_efficiency``: it gathers
  each position's cos/sin row and rotates half-rows, and reaches less of HBM than the
  activation; null: the element-wise fraction) and other element-wise kernels (activation,
  softmax/top-k: ``memory.elementwise_efficiency``), the last two with ``kernel.fixed_us``,
  each class fitted on its own Vidur operators. Norms and plain streams whose bytes fit in
  the L2 cache (``memory.l2_mb``: their input was just written, or re-read, and stays
  resident) run ``memory.l2_speedup`` times faster: ``bytes / (HBM * mu_c * l2_speedup) +
  fixed_c`` (Vidur: both classes peak at working sets of 10-40 MB, above the HBM rate they
  reach on larger tensors; the rotary embedding and activation show no such step, so their
  classes keep one rate). The activation, the rotary embedding and the norms run one thread
  block per token row (vLLM's ``act_and_mul``, ``rotary_embedding`` and ``rms_norm``
  kernels: ``grid(num_tokens)``): a block alone moves ``memory.row_gbps``, so such a kernel
  takes at least one row's bytes at that rate, ``max(bytes / (HBM * mu), row_bytes /
  row_rate) + fixed`` (Vidur: SiLU-and-mul over 1-64 tokens of a 28,672-wide row takes 15 µs
  on H100 whatever the token count, ~11 GB/s per row; an RMS norm of one 8,192-wide token
  6 µs, of a 4,096-wide one 4 µs);
* core attention (FlashAttention): ``(flops / (peak * e_attn) + exps / exp_rate) * (s +
  half_seq) / s`` for ``s`` keys per query (every query row costs ``half_seq`` pairs more:
  ``(pairs + half_seq * queries)`` pairs of work; each pair and head costs its matmul FLOPs,
  ``2 (d_qk + d_v)``, and one exp of the softmax at the GPU's special-function rate
  ``attention.exp_tflops``, which is why small heads reach a lower share of peak: FA3 H100 at
  16k non-causal 497 / 648 / ~750 TFLOP/s for head dims 64 / 128 / 256), or the KV-cache
  read at ``mu_attn`` of HBM bandwidth (decode), whichever is longer;

each plus its class's fixed GPU time (``fixed_us``; the measured duration of a tiny kernel).
Between two dependent kernels the GPU also waits ``graph_launch_us`` (the kernel-to-kernel
latency of the GPU front end, which a CUDA-graph replay pays too). The stream advances per
kernel by ``GPU time + graph_launch_us`` under CUDA graphs, and in eager mode by the larger of
that and the host's ``launch_us``, plus ``framework_us``: kernels shorter than their launch
leave the GPU waiting, which is what makes small-batch eager decode slow and CUDA graphs fast
(never slower: the graph time is a lower bound of the eager one).

Kernels of a layer's forward (Megatron-Core / vLLM, fused where they fuse): input norm, QKV
GEMM(s) (MLA: the low-rank down and up projections, and an RMSNorm of each latent), rotary
embedding, core attention, output projection, residual add, post-attention
norm; dense MLP: up (gate and up fused), activation, down, residual add; MoE: router GEMM,
softmax/top-k, shared experts (up, activation, down), residual add; routed experts (per rank):
permute, grouped up, activation, grouped down, unpermute. With sequence parallelism the
hidden-wide element-wise kernels run on ``1/tp`` of the tokens. The backward of a layer takes
``BACKWARD_FACTOR`` times its forward (two GEMMs per forward GEMM).

A serving engine that compiles its layers (``fused``: ``workload.requests.fused_elementwise``;
TensorRT-LLM's engines, torch.compile) fuses the element-wise kernels into their neighbours:
the MLP activation into the up projection's epilogue, each FP8 quantise into the kernel that
produces the GEMM's input, the residual add into the next norm (one kernel: the norm's pass
plus the residual's bytes at the plain-stream rate), the rotary embedding into the KV-cache
write (``clustersim.costs.serving``). A dense layer then runs 6 kernels (+ core attention and
the cache write) instead of 10 (14 under FP8), which matters most where kernels are short:
eager decode and prefill of few tokens (launch-bound), and the element-wise passes over large
prefill batches (memory-bound).
"""

from __future__ import annotations

import numpy as np

from clustersim.costs import compute as cc
from clustersim.costs import precision
from clustersim.spec.schema import HardwareSpec, ModelSpec

RESIDUAL_PASSES = 3.0  # residual add: read 2h, write h (per token, x h; no dropout)
NORM_PASSES = 2.0  # read h, write h
TOPK_BYTES = 4 * 2  # fp32 router logits: softmax/top-k read and write E values per token
PERMUTE_PASSES = 2.0  # a token copy of h elements read and written once (permute, unpermute)
# Vocabulary-parallel cross-entropy (Megatron's unfused ``vocab_parallel_cross_entropy``), bytes
# per logit on this GPU: forward casts the bf16 logits to fp32 (read 2, write 4), then max
# (read 4), subtract the max (read + write 8), exp (8), sum (4), divide by the sum (8) = 38;
# backward scales the saved softmax by the loss gradient (read + write 8) and casts it back to
# bf16 (read 4, write 2) = 14. Reductions and exp: the element-wise efficiency.
CROSS_ENTROPY_FWD_BYTES = 38.0
CROSS_ENTROPY_BWD_BYTES = 14.0
# Transformer Engine's fused cross-entropy (Megatron-Core ``--cross-entropy-loss-fusion
# --cross-entropy-fusion-impl te``; TE's Triton kernels, ``common/triton/cross_entropy.py``),
# bytes per bf16 logit: the forward's online-softmax kernel reads the logits (2) and its
# second kernel reads them again and writes the gradient in place (2 + 2); the backward
# scales the stored gradient by the loss gradient (read 2, write 2).
FUSED_CROSS_ENTROPY_FWD_BYTES = (2.0, 4.0)
FUSED_CROSS_ENTROPY_BWD_BYTES = 4.0
DEFAULT_GRAPH_BATCH_MAX = 512  # vLLM's largest captured decode batch
# Memory-bound kernel classes, each with its fitted HBM fraction and fixed GPU time
STREAM = "stream"  # residual adds, permutes, KV-cache writes: memory.efficiency, stream_fixed_us
ELEMENTWISE = "elementwise"  # activation, softmax: elementwise_efficiency, fixed_us
ROTARY = "rotary"  # rotary embedding: rotary_efficiency, fixed_us
NORM = "norm"  # layer/RMS norms (row reductions): norm_efficiency, norm_fixed_us
MEMORY_KINDS = (STREAM, ELEMENTWISE, ROTARY, NORM)
L2_KINDS = (STREAM, NORM)  # classes that run faster from L2 (memory.l2_speedup)
# classes run as one thread block per token row (vLLM: activation, rotary embedding, RMS norm)
ROW_KINDS = (ELEMENTWISE, ROTARY, NORM)


class KernelTimer:
    """Forward kernel times of one GPU of a TP group, for a model on ``hw``.

    ``graphs``: launches are CUDA-graph replays (serving decode) instead of eager launches.
    Methods take a token count (a float or a numpy array) and return ms; zero tokens cost 0.
    """

    def __init__(
        self,
        model: ModelSpec,
        hw: HardwareSpec,
        tp: int = 1,
        etp: int | None = None,
        *,
        sequence_parallel: bool = False,
        graphs: bool = False,
        training: bool = True,
        fp8_dispatch: bool = False,
        fused: bool = False,
        fused_cross_entropy: bool = False,
    ):
        cal = hw.calibration
        self.fused_cross_entropy = fused_cross_entropy
        # a compiled engine (TensorRT-LLM, torch.compile) fuses element-wise kernels into
        # their neighbours (``workload.requests.fused_elementwise``; module docstring)
        self.fused = fused
        self.model, self.hw, self.tp = model, hw, tp
        self.etp = tp if etp is None else etp
        self.bpe = precision.activation_bytes(model)
        self.fp8 = precision.is_fp8(model) and hw.fp8_peak_tflops is not None
        if self.fp8:
            fp8_eff = precision.fp8_gemm_efficiency(cal.gemm.efficiency, cal.gemm.fp8_efficiency)
            self._fp8_flop_s = hw.fp8_peak_tflops * 1e12 * fp8_eff
            self._fp8_in = precision.fp8_activation_bytes(model)
            self._fp8_w = precision.fp8_weight_bytes(model)
            copies = precision.TRAINING_FP8_COPIES if training else 1
            # quantise kernel: read the BF16 input, write its FP8 copies (+ scales)
            self._quantise_bytes = self.bpe + copies * self._fp8_in
        # Transformer Engine (training) fuses the quantise of a GEMM's input into the norm
        # before it (LayerNormLinear: ``with_quantized_norm``, the norm kernel writes the FP8
        # copies): Megatron-Core's fused norm + linear layers (QKV, MLA's q/kv up-projections,
        # a dense MLP's FC1) skip their quantise kernel; module docstring
        self.fuse_quantise = self.fp8 and training
        # DeepSeek-V3 (Sec. 3.3.3): the tokens are quantised before the dispatch (DeepEP moves
        # FP8), so the experts' FC1 input arrives in FP8 (training: only the column-wise copy
        # for the weight gradient is written after the dispatch)
        self.fp8_dispatch = self.fp8 and training and fp8_dispatch
        # Transformer Engine's grouped linear (Megatron-Core training, ``--moe-grouped-gemm``)
        # runs one GEMM per local expert (multi-stream cuBLAS), each input quantised on its
        # own under FP8; serving engines' fused MoE kernels are one launch for all experts
        self.per_expert_launch = training
        self._fp8_copies = copies if self.fp8 else 1
        self._flop_s = hw.peak_tflops * 1e12 * cal.gemm.efficiency
        hbm = hw.hbm_bandwidth_gbps * 1e9
        self._byte_s = hbm * cal.memory.efficiency
        elem_eff = cal.memory.elementwise_efficiency
        self._elementwise_byte_s = hbm * elem_eff
        norm_eff = cal.memory.norm_efficiency or cal.memory.elementwise_efficiency
        self._gemm_byte_s = hbm * cal.gemm.memory_efficiency
        self._half = cal.gemm.half_dim
        self._fixed_ms = cal.kernel.fixed_us * 1e-3
        stream_fixed = cal.kernel.stream_fixed_us
        norm_fixed = cal.kernel.norm_fixed_us
        # memory-bound kernel classes: (bytes per second, fixed ms)
        self._memory_class = {
            STREAM: (self._byte_s, self._fixed_ms if stream_fixed is None else stream_fixed * 1e-3),
            ELEMENTWISE: (self._elementwise_byte_s, self._fixed_ms),
            ROTARY: (hbm * (cal.memory.rotary_efficiency or elem_eff), self._fixed_ms),
            NORM: (hbm * norm_eff, self._fixed_ms if norm_fixed is None else norm_fixed * 1e-3),
        }
        # norms and plain streams whose bytes fit in L2 (none without both fields)
        l2_mb, l2_speedup = cal.memory.l2_mb, cal.memory.l2_speedup
        self._l2_bytes = 0.0 if l2_mb is None or l2_speedup is None else l2_mb * 1e6
        self._l2_speedup = 1.0 if l2_speedup is None else l2_speedup
        row_gbps = cal.memory.row_gbps  # one thread block's rate (element-wise row kernels)
        self._row_byte_s = float("inf") if row_gbps is None else row_gbps * 1e9
        # GPU-side latency between dependent kernels (both modes); the host's launch only in
        # eager mode (a graph replay issues every kernel of the step at once)
        self._gap_ms = cal.kernel.graph_launch_us * 1e-3
        self._launch_ms = 0.0 if graphs else cal.kernel.launch_us * 1e-3
        self._framework_ms = 0.0 if graphs else cal.kernel.framework_us * 1e-3
        self._attn_flop_s = hw.peak_tflops * 1e12 * cal.attention.efficiency
        exp_tflops = cal.attention.exp_tflops
        self._exp_s = 0.0 if exp_tflops is None else 1.0 / (exp_tflops * 1e12)  # s per exp
        self._attn_half = cal.attention.half_seq
        self._kv_byte_s = hw.hbm_bandwidth_gbps * 1e9 * cal.attention.decode_memory_efficiency
        l2_gbps = cal.attention.decode_l2_gbps
        self._l2_byte_s = float("inf") if l2_gbps is None else l2_gbps * 1e9
        self._h_tokens_share = 1.0 / tp if sequence_parallel else 1.0
        self._qkv = cc.qkv_shapes(model, tp)
        mla = model.mla
        self._latent_norms: tuple[float, ...] = ()
        if mla is not None:
            q_lora = () if mla.q_lora_rank is None else (float(mla.q_lora_rank),)
            self._latent_norms = (*q_lora, float(mla.kv_lora_rank))
        h = model.hidden_size
        qk_dim, v_dim = cc.head_dims(model)
        self._out = (model.num_attention_heads / tp * v_dim, h)
        # flash attention: matmul FLOPs per exp (one per query-key pair and head)
        self._flops_per_exp = 2.0 * (qk_dim + v_dim)
        self._attn_s_per_flop = 1.0 / self._attn_flop_s + self._exp_s / self._flops_per_exp
        # rotary embedding rewrites the queries and keys of this GPU's heads
        self._rope_elements = (
            model.num_attention_heads / tp + cc.kv_heads_per_gpu(model, tp)
        ) * qk_dim
        phi = cc.ACTIVATION_MATRICES[model.activation]
        self._phi = phi

    # ---- shapes (what each kernel moves or multiplies, per token) ------------------------
    @property
    def qkv_shapes(self) -> list[tuple[float, float]]:
        """(in, out) features of the query/key/value projection GEMM(s) on this GPU."""
        return list(self._qkv)

    @property
    def output_shape(self) -> tuple[float, float]:
        """(in, out) features of the attention output projection on this GPU."""
        return self._out

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices per MLP (phi): 3 for SwiGLU, 2 for GeLU."""
        return self._phi

    @property
    def rope_bytes_per_token(self) -> float:
        """Bytes the rotary embedding reads and writes per token."""
        return 2 * self._rope_elements * self.bpe

    # ---- single kernels -----------------------------------------------------------------
    def issue(self, gpu_ms, tokens):
        """Stream time of kernels of GPU time ``gpu_ms`` (0 where ``tokens`` is 0)."""
        if _scalar(gpu_ms, tokens):  # the engine's per-micro-batch path: plain floats
            if tokens <= 0:
                return 0.0
            busy = gpu_ms + self._gap_ms
            return (busy if busy > self._launch_ms else self._launch_ms) + self._framework_ms
        ms = np.maximum(gpu_ms + self._gap_ms, self._launch_ms) + self._framework_ms
        return np.where(tokens > 0, ms, 0.0)

    def _shape(self, x):
        return x / (x + self._half)

    def gemm_gpu_ms(self, m, n: float, k: float, groups=1.0, fp8: bool = False):
        """GPU time of a (grouped) GEMM: ``groups`` experts share ``m`` token rows. ``fp8``
        (on an FP8 model): FP8 operands (+ scales) at the FP8 peak and its efficiency,
        BF16 output."""
        scalar = _scalar(m, groups)
        if scalar:
            per = max(m / max(groups, 1.0), 1e-9)
        else:
            per = np.maximum(m / np.maximum(groups, 1.0), 1e-9)
        if fp8 and self.fp8:
            rate, in_bytes, w_bytes = self._fp8_flop_s, self._fp8_in, self._fp8_w
        else:
            rate, in_bytes, w_bytes = self._flop_s, self.bpe, self.bpe
        compute = 2.0 * m * n * k / (rate * self._shape(per) * self._shape(n) * self._shape(k))
        memory = (m * k * in_bytes + groups * k * n * w_bytes + m * n * self.bpe) / (
            self._gemm_byte_s
        )
        longer = max(compute, memory) if scalar else np.maximum(compute, memory)
        return longer * 1e3 + self._fixed_ms

    def gemm_ms(self, m, n: float, k: float, groups=1.0):
        """Stream time of a (grouped) GEMM kernel in the activations' type."""
        return self.issue(self.gemm_gpu_ms(m, n, k, groups), m)

    def memory_gpu_ms(self, nbytes, kind: str = STREAM, row_bytes=0.0):
        """GPU time of a memory-bound kernel of class ``kind`` moving ``nbytes``:
        ``nbytes / (HBM * mu_kind) + fixed_kind`` (:data:`MEMORY_KINDS`); norms and plain
        streams (:data:`L2_KINDS`) whose ``nbytes`` fit in the L2 cache move them
        ``memory.l2_speedup`` times faster; an element-wise kernel takes at least one row of
        ``row_bytes`` (the bytes of one token) at one thread block's ``memory.row_gbps``."""
        rate, fixed_ms = self._memory_class[kind]
        if type(nbytes) in _NUMBERS and type(row_bytes) in _NUMBERS:  # the engine's path
            if kind in L2_KINDS and self._l2_bytes and nbytes <= self._l2_bytes:
                rate = rate * self._l2_speedup
            ms = nbytes / rate * 1e3
            if row_bytes and kind in ROW_KINDS:
                row_ms = row_bytes / self._row_byte_s * 1e3
                if row_ms > ms:
                    ms = row_ms
            return ms + fixed_ms
        if kind in L2_KINDS and self._l2_bytes:
            rate = np.where(nbytes <= self._l2_bytes, rate * self._l2_speedup, rate)
        stream_ms = nbytes / rate * 1e3
        if kind in ROW_KINDS:
            stream_ms = np.maximum(stream_ms, row_bytes / self._row_byte_s * 1e3)
        return stream_ms + fixed_ms

    def linear_ms(self, m, n: float, k: float, groups=1.0, quantised: bool = False):
        """Stream time of a linear layer's GEMM: under FP8, the quantise kernel of its input
        (read BF16, write the FP8 copies: a memory-bound element-wise pass) and the FP8 GEMM;
        ``quantised``: the input arrives in FP8 (the kernel before it wrote the copies)."""
        if not self.fp8:
            return self.gemm_ms(m, n, k, groups)
        if quantised or self.fused:  # the kernel before it wrote the FP8 input
            return self.issue(self.gemm_gpu_ms(m, n, k, groups, fp8=True), m)
        quantise = self.stream_ms(m, k * self._quantise_bytes, elementwise=True)
        return quantise + self.issue(self.gemm_gpu_ms(m, n, k, groups, fp8=True), m)

    def stream_gpu_ms(self, nbytes, elementwise: bool = False, row_bytes=0.0):
        """GPU time of a memory-bound kernel moving ``nbytes`` (``elementwise``: rotary
        embedding, activation or softmax, at the element-wise efficiency, rows of
        ``row_bytes``; else a plain stream)."""
        if elementwise:
            return self.memory_gpu_ms(nbytes, ELEMENTWISE, row_bytes)
        return self.memory_gpu_ms(nbytes, STREAM)

    def stream_ms(
        self, tokens, bytes_per_token: float, elementwise: bool = False, per_row: bool = False
    ):
        """Stream time of a memory-bound kernel over ``tokens``; ``per_row``: an element-wise
        kernel run as one thread block per token (vLLM's activation and rotary embedding),
        at least one token's bytes at one block's rate. Reductions over the whole tensor
        (cross-entropy), tiled casts (FP8 quantise) and softmax/top-k have no such floor."""
        row_bytes = bytes_per_token if per_row else 0.0
        gpu = self.stream_gpu_ms(tokens * bytes_per_token, elementwise, row_bytes)
        return self.issue(gpu, tokens)

    def rope_ms(self, tokens, per_row: bool = True):
        """Stream time of the rotary embedding over ``tokens`` (class :data:`ROTARY`);
        ``per_row``: one thread block per token (vLLM's kernel), at least one token's bytes
        at one block's rate."""
        rope = self.rope_bytes_per_token
        gpu = self.memory_gpu_ms(tokens * rope, ROTARY, rope if per_row else 0.0)
        return self.issue(gpu, tokens)

    def memory_ms(self, tokens, bytes_per_token: float, kind: str = STREAM, row_bytes=None):
        """Stream time of a memory-bound kernel of class ``kind`` over ``tokens``; a norm runs
        one thread block per token row of ``row_bytes`` (default ``bytes_per_token``)."""
        row = (bytes_per_token if row_bytes is None else row_bytes) if kind == NORM else 0.0
        return self.issue(self.memory_gpu_ms(tokens * bytes_per_token, kind, row), tokens)

    def fused_memory_ms(self, tokens, bytes_per_token: float, kind: str, stream_bytes: float):
        """Stream time of one kernel of class ``kind`` moving ``bytes_per_token`` that also
        carries a fused neighbour's ``stream_bytes`` per token at the plain-stream rate (no
        second fixed time or launch): never more than the two kernels it replaces. An
        element-wise one (the rotary embedding fused into the KV-cache write) runs one thread
        block per token (:meth:`stream_ms`, ``per_row``)."""
        gpu = self.memory_gpu_ms(tokens * bytes_per_token, kind, bytes_per_token)
        # the neighbour's bytes at the rate its own kernel would move them (L2 or HBM)
        neighbour = (
            self.memory_gpu_ms(tokens * stream_bytes, STREAM) - self._memory_class[STREAM][1]
        )
        return self.issue(gpu + neighbour, tokens)

    # ---- blocks of a layer ---------------------------------------------------------------
    def _h_kernel(self, tokens, passes: float, kind: str):
        """A hidden-wide kernel (norm, residual add) under sequence parallelism."""
        row = passes * self.model.hidden_size * self.bpe  # one token's row, whole
        return self.memory_ms(tokens, row * self._h_tokens_share, kind, row)

    def _norm(self, tokens, quantised: bool = False):
        """The hidden-wide norm; ``quantised``: fused with the next GEMM's quantise (it writes
        the FP8 copies instead of a BF16 output: ``fuse_quantise``). A ``fused`` engine also
        adds the residual in it: one kernel, the norm's pass (read the sum, write the
        normalised output, in FP8 when an FP8 GEMM follows) at the norm class's rate and fixed
        time, plus the residual's own bytes (read the residual, write the new one) at the
        plain-stream rate, so never more than the two kernels it replaces."""
        if self.fused:
            h = self.model.hidden_size * self._h_tokens_share
            out = self._fp8_in if self.fp8 else self.bpe
            return self.fused_memory_ms(tokens, h * (self.bpe + out), NORM, 2 * h * self.bpe)
        if quantised and self.fuse_quantise:
            row = self.model.hidden_size * self._quantise_bytes
            return self.memory_ms(tokens, row * self._h_tokens_share, NORM, row)
        return self._h_kernel(tokens, NORM_PASSES, NORM)

    def _residual(self, tokens):
        """The residual add (part of the next norm in a ``fused`` engine)."""
        if self.fused:
            return 0.0 * tokens
        return self._h_kernel(tokens, RESIDUAL_PASSES, STREAM)

    def attention_block_ms(self, tokens, absorbed: bool = False, mlp_input_fp8: bool = False):
        """Input norm, QKV, rotary embedding, output projection, residual add, post-attention
        norm (core attention excluded). ``absorbed`` (MLA decode, as serving engines run it):
        the key/value up-projection is applied as two batched GEMMs, the key part to the
        queries before attention and the value part to its output (the same weights, one
        kernel more). With ``fuse_quantise`` the input norm writes the QKV GEMM's FP8 input
        (Megatron-Core's TELayerNormColumnParallelLinear; MLA: its input norm is a separate
        TENorm and the q/kv down-projections quantise their own input, the latent norms are
        fused into the up-projections), and with ``mlp_input_fp8`` (a dense layer: its FC1 is
        a fused norm + linear too) so does the post-attention norm."""
        mla = self.model.mla
        total = self._norm(tokens, quantised=mla is None)
        shapes = self._qkv
        if absorbed and self.model.mla is not None:
            mla, heads = self.model.mla, self.model.num_attention_heads / self.tp
            k_up, _ = shapes[-1]
            shapes = [
                *shapes[:-1],
                (k_up, heads * mla.qk_nope_head_dim),
                (k_up, heads * mla.v_head_dim),
            ]
        fused = self.fuse_quantise
        for k, n in shapes:
            after_norm = fused and (mla is None or k in self._latent_norms)
            total = total + self.linear_ms(tokens, n, k, quantised=after_norm)
        total = self._with_latent_norms(total, tokens)
        if not self.fused:  # fused: applied by the KV-cache write (serving's cache kernel)
            total = total + self.rope_ms(tokens)
        total = total + self.linear_ms(tokens, self._out[1], self._out[0])
        total = total + self._residual(tokens)
        return total + self._norm(tokens, quantised=mlp_input_fp8)

    def mla_up_proj_ms(self, tokens):
        """MLA's query and key/value up-projections with the norms of their latents and the
        rotary embedding, as :meth:`attention_block_ms` times them: what Megatron-Core's
        ``mla_up_proj`` selective recompute (``qkv_up_proj_and_rope_apply``) runs again in
        the backward; 0 for a model without MLA."""
        if self.model.mla is None:
            return 0.0 * tokens
        fused = self.fuse_quantise
        total = 0.0 * tokens
        for k, n in self._qkv:
            if k in self._latent_norms:  # an up-projection (its input is a latent)
                total = total + self.linear_ms(tokens, n, k, quantised=fused)
        total = self._with_latent_norms(total, tokens)
        return total + self.rope_ms(tokens, per_row=False)

    def _with_latent_norms(self, total, tokens):
        """``total`` plus MLA's RMSNorm of each low-rank latent (none without MLA); with
        ``fuse_quantise`` it writes the up-projection's FP8 input."""
        per_element = self._quantise_bytes if self.fuse_quantise else NORM_PASSES * self.bpe
        for width in self._latent_norms:
            total = total + self.memory_ms(tokens, per_element * width, NORM)
        return total

    def standalone_norms_ms(self, tokens, moe_layer: bool):
        """The layer's norms that are modules of their own in Megatron-Core's Transformer
        Engine layer specs (not fused into the next linear layer): the input norm of an MLA
        layer and the pre-MLP norm of an MoE layer (it feeds the router and the dispatch),
        each one norm pass; what the ``layernorm`` selective recompute runs again."""
        count = int(self.model.mla is not None) + int(moe_layer)
        return count * self._norm(tokens)

    def mlp_ms(self, tokens, ffn: float, tp: int, input_fp8: bool = False):
        """An MLP of width ``ffn`` split over ``tp``: up, activation, down, residual add;
        ``input_fp8``: its input comes quantised from the norm before it (``fuse_quantise``)."""
        width = ffn / tp
        h = self.model.hidden_size
        quantised = input_fp8 and self.fuse_quantise
        total = self.linear_ms(tokens, (self._phi - 1) * width, h, quantised=quantised)
        total = total + self._activation(tokens, width)
        total = total + self.linear_ms(tokens, h, width)
        return total + self._residual(tokens)

    def _activation(self, tokens, width: float):
        """The MLP activation over ``width`` features (SwiGLU reads gate and up); none in a
        ``fused`` engine, where the up projection's epilogue applies it."""
        if self.fused:
            return 0.0 * tokens
        return self.stream_ms(tokens, self._phi * width * self.bpe, elementwise=True, per_row=True)

    def dense_mlp_ms(self, tokens, input_fp8: bool = False):
        """The MLP of a dense layer (``input_fp8``: see :meth:`mlp_ms`)."""
        return self.mlp_ms(tokens, self.model.dense_ffn, self.tp, input_fp8)

    def moe_block_ms(self, tokens):
        """The non-expert part of an MoE layer on the attention lane: router GEMM (replicated
        over TP), softmax/top-k, shared experts, residual add; with ``fp8_dispatch`` the
        quantise of the GPU's tokens (one row-wise FP8 copy) before the dispatch."""
        moe, h = self.model.moe, self.model.hidden_size
        if moe is None:
            return 0.0 * tokens
        total = self.gemm_ms(tokens, moe.num_experts, h)
        total = total + self.stream_ms(tokens, moe.num_experts * TOPK_BYTES, elementwise=True)
        if self.fp8_dispatch:  # quantise this GPU's share of the tokens before the dispatch
            per_token = h * (self.bpe + self._fp8_in) * self._h_tokens_share
            total = total + self.stream_ms(tokens, per_token, elementwise=True)
        if moe.num_shared_experts:
            width = moe.num_shared_experts * (
                moe.shared_expert_ffn_hidden_size or self.model.ffn_hidden_size
            )
            total = total + self.mlp_ms(tokens, width, self.tp)
        else:
            total = total + self._residual(tokens)
        return total

    def experts_ms(self, copies, active_experts, chunk_sort: bool = False):
        """One rank's routed experts for ``copies`` received token copies over
        ``active_experts`` experts: permute, grouped up, activation, grouped down, unpermute
        (the FFN split by ETP). ``chunk_sort``: Megatron-Core's all-to-all dispatcher also
        re-sorts the received copies from source-rank order into expert order before the
        grouped GEMM and back after it (``sort_chunks_by_idxs``, when a rank holds several
        experts and receives copies from several EP x ETP ranks): two more permute passes
        over the copies. ``fp8_dispatch``: the copies arrive quantised, so FC1 has no quantise
        kernel, only (training) a pass writing the column-wise copy from the row-wise one."""
        h, width = self.model.hidden_size, self.model.ffn_hidden_size / self.etp
        up = (self._phi - 1) * width
        groups = np.maximum(active_experts, 1.0)
        permutes = 2 if chunk_sort else 1
        total = permutes * self.stream_ms(copies, PERMUTE_PASSES * h * self.bpe)
        if self.fp8_dispatch:  # FP8 copies arrive; write the column-wise one (read 1, write 1)
            extra = self._fp8_copies - 1
            if extra:
                per_copy = h * self._fp8_in * (1 + extra)
                total = total + self.stream_ms(copies, per_copy, elementwise=True)
            total = total + self._grouped_linear_ms(copies, up, h, groups, quantised=True)
        else:
            total = total + self._grouped_linear_ms(copies, up, h, groups)
        total = total + self._activation(copies, width)
        total = total + self._grouped_linear_ms(copies, h, width, groups)
        return total + permutes * self.stream_ms(copies, PERMUTE_PASSES * h * self.bpe)

    def experts_activation_ms(self, copies):
        """The routed experts' activation kernel over ``copies`` token copies (part of
        :meth:`experts_ms`): what Megatron-Core's ``moe_act`` selective recompute runs again
        in the backward."""
        return self._activation(copies, self.model.ffn_hidden_size / self.etp)

    def _grouped_linear_ms(self, copies, n: float, k: float, groups, quantised: bool = False):
        """Stream time of a grouped linear layer over ``groups`` experts sharing ``copies``
        token rows: one grouped kernel (serving's fused MoE), or with ``per_expert_launch``
        one linear per expert of ``copies / groups`` rows (its own quantise kernel under
        FP8, its own launch and fixed time): the same FLOPs and bytes, ``groups`` launches."""
        if not self.per_expert_launch:
            return self.linear_ms(copies, n, k, groups, quantised=quantised)
        per = copies / groups
        return groups * self.linear_ms(per, n, k, 1.0, quantised=quantised)

    def logits_ms(self, rows):
        """Output layer GEMM for ``rows`` tokens."""
        return self.gemm_ms(rows, self.model.vocab_size / self.tp, self.model.hidden_size)

    def cross_entropy_ms(self, rows, backward: bool = False):
        """Vocabulary-parallel cross-entropy over ``rows`` tokens' logits on this GPU (its
        ``vocab / tp`` columns; the two scalar all-reduces per token are not charged): the
        forward's, or with ``backward`` the backward's memory passes
        (``CROSS_ENTROPY_FWD_BYTES`` / ``CROSS_ENTROPY_BWD_BYTES`` per logit; with
        ``fused_cross_entropy`` Transformer Engine's kernels,
        ``FUSED_CROSS_ENTROPY_FWD_BYTES`` / ``FUSED_CROSS_ENTROPY_BWD_BYTES``)."""
        logits = self.model.vocab_size / self.tp
        if self.fused_cross_entropy:  # Transformer Engine's kernels: two forward, one backward
            passes = (FUSED_CROSS_ENTROPY_BWD_BYTES,) if backward else FUSED_CROSS_ENTROPY_FWD_BYTES
            total = 0.0 * rows
            for per_logit in passes:
                total = total + self.stream_ms(rows, per_logit * logits, elementwise=True)
            return total
        per_logit = CROSS_ENTROPY_BWD_BYTES if backward else CROSS_ENTROPY_FWD_BYTES
        return self.stream_ms(rows, per_logit * logits, elementwise=True)

    # ---- core attention ------------------------------------------------------------------
    def core_attention_gpu_ms(self, flops, hbm_bytes, keys_per_query, flash: bool = True):
        """GPU time of core attention: ``flops`` at the FlashAttention efficiency
        ``e_attn * s / (s + half_seq)`` for ``s`` keys per query (the sequence length,
        non-causal; half of it, causal), plus one exp per ``2 (d_qk + d_v)`` FLOPs (a
        query-key pair of one head) at ``attention.exp_tflops`` over the same ``(s +
        half_seq) / s`` pairs, or ``hbm_bytes`` (the KV cache, queries, outputs) read,
        whichever is longer. Equivalently, every query row costs ``half_seq`` key pairs more
        (:meth:`attention_ms_per_pair`). Without flash attention the score GEMMs run at the
        GEMM efficiency and the s x s passes at the memory-bound rate."""
        if flash:
            compute = flops * (1.0 + self._attn_half / keys_per_query) * self._attn_s_per_flop
            memory = hbm_bytes / self._kv_byte_s
        else:
            compute = flops / (self._flop_s * self._shape(keys_per_query) ** 2)
            memory = hbm_bytes / self._byte_s
        if _scalar(compute, memory):
            return max(compute, memory) * 1e3 + self._fixed_ms
        return np.maximum(compute, memory) * 1e3 + self._fixed_ms

    def core_attention_ms(self, flops, hbm_bytes, keys_per_query, flash: bool = True):
        """Stream time of core attention (one kernel with flash attention, else four:
        scores, softmax, dropout, context)."""
        gpu = self.core_attention_gpu_ms(flops, hbm_bytes, keys_per_query, flash)
        if flash:
            return self.issue(gpu, flops + hbm_bytes)
        return 4 * self.issue(gpu / 4, flops + hbm_bytes)

    def attention_ms_per_pair(
        self, flops_per_pair: float, exps_per_pair: float | None = None
    ) -> tuple[float, float]:
        """FlashAttention compute time per query-key pair and per query row (the
        ``half_seq`` pairs each row costs extra), for ``flops_per_pair`` FLOPs and
        ``exps_per_pair`` exps (one per head; default: the FLOPs over ``2 (d_qk + d_v)``)
        per pair."""
        if exps_per_pair is None:
            exps_per_pair = flops_per_pair / self._flops_per_exp
        per_pair = 1e3 * (flops_per_pair / self._attn_flop_s + exps_per_pair * self._exp_s)
        return per_pair, per_pair * self._attn_half

    @property
    def kv_ms_per_byte(self) -> float:
        """Decode attention time per byte of KV cache read."""
        return 1e3 / self._kv_byte_s

    def decode_kv_ms_per_byte(self, rereads: float = 1.0) -> float:
        """Decode attention time per byte of KV cache when each byte is read ``rereads``
        times: by a per-query-head kernel (one thread block per query head and sequence, as
        TensorRT-LLM's masked MHA kernel and vLLM's PagedAttention launch it), every query
        head of a GQA group reads the group's K/V head itself. The first read comes from HBM
        (:attr:`kv_ms_per_byte`); the others hit the L2 cache, which delivers all
        ``rereads`` reads at ``attention.decode_l2_gbps``: ``max(1 / (HBM * mu_attn),
        rereads / L2)`` per byte. A grouped kernel (``rereads`` = 1) moves the same bytes
        through L2 as from HBM and is bound by HBM alone (the L2 rate is only measured for
        re-reads)."""
        hbm = 1e3 / self._kv_byte_s
        if rereads <= 1.0:
            return hbm
        return max(hbm, rereads * 1e3 / self._l2_byte_s)

    @property
    def fixed_ms(self) -> float:
        """GPU time of an empty kernel."""
        return self._fixed_ms

    @property
    def gap_ms(self) -> float:
        """GPU-side latency between two dependent kernels (``graph_launch_us``)."""
        return self._gap_ms

    @property
    def launch_ms(self) -> float:
        """Host time to issue one kernel (eager launch; 0 under graph replay)."""
        return self._launch_ms

    @property
    def framework_ms(self) -> float:
        """Framework time per kernel that never overlaps the GPU (eager only)."""
        return self._framework_ms


_NUMBERS = (float, int)


def _scalar(a, b) -> bool:
    """Whether both values are plain Python numbers (no numpy array or scalar): then the
    kernel formulas run in Python arithmetic, much faster than numpy on one number."""
    return type(a) in _NUMBERS and type(b) in _NUMBERS


def uses_graphs(cuda_graphs: bool, tokens: float, seqs: float) -> bool:
    """Whether a serving step replays a CUDA graph: decode-only batches (one new token per
    request) up to vLLM's largest captured batch, when the plan enables graphs."""
    return cuda_graphs and tokens == seqs and seqs <= DEFAULT_GRAPH_BATCH_MAX

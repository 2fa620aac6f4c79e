"""Parameter counts of a transformer (dense or Mixture-of-Experts), per component and per layer.

What is counted (weights only, no biases, no position embeddings: the models modelled here
use none; the GPT shapes of Narayanan et al. 2021 do, see ``tests/test_params.py`` for why the
difference stays under 1%):

* attention, GQA/MHA: Q and O are ``h x a*d`` and K and V are ``h x n_kv*d`` (``d`` the head
  size), i.e. ``h*d*(2a + 2*n_kv)``;
* attention, MLA (DeepSeek-V2/V3): query down ``h*q_lora`` and up ``q_lora*a*(nope+rope)``
  (or one full-rank ``h*a*(nope+rope)`` when ``q_lora_rank`` is null), key/value down
  ``h*(kv_lora+rope)`` and up ``kv_lora*a*(nope+v)``, output ``a*v*h``. The two small latent
  RMSNorms (``q_lora + kv_lora`` weights per layer, 2,048 for DeepSeek-V3) are left out;
* MLP: ``phi*h*ffn`` with ``phi`` = 3 matrices for SwiGLU, 2 for GeLU. A dense layer has one
  MLP of ``dense_ffn``; an MoE layer has ``E`` routed experts, ``num_shared`` shared experts of
  ``shared_ffn`` and a router ``h*E`` instead;
* norms: two of ``h`` per layer, plus the final norm ``h``;
* embedding ``V*h`` and output layer ``V*h`` (0 when ``tie_embeddings``).

Active parameters per token count only ``top_k`` of the routed experts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from clustersim.spec.schema import ModelSpec

# Weight matrices of one MLP (reference.md, "Compute and time": phi = 3 SwiGLU, 2 otherwise).
MLP_MATRICES = {"swiglu": 3, "gelu": 2}


@dataclass(frozen=True)
class LayerSums:
    """Parameters of a set of transformer layers, summed per component."""

    attention: int = 0
    attention_kv: int = 0
    dense_mlp: int = 0
    routed_experts: int = 0
    shared_experts: int = 0
    router: int = 0
    norms: int = 0

    @property
    def total(self) -> int:
        """All parameters of these layers (``attention_kv`` is part of ``attention``)."""
        return (
            self.attention
            + self.dense_mlp
            + self.routed_experts
            + self.shared_experts
            + self.router
            + self.norms
        )


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model. Per-layer fields count one layer of the kind that has them."""

    attention: int
    attention_kv: int
    dense_mlp: int
    routed_experts: int
    routed_expert: int
    shared_experts: int
    router: int
    norms: int
    embedding: int
    output: int
    final_norm: int
    top_k: int
    moe_layers: np.ndarray = field(compare=False, repr=False)
    """Read-only boolean array: whether each layer is an MoE layer."""

    @property
    def num_layers(self) -> int:
        """Transformer layers in the model."""
        return len(self.moe_layers)

    def _kinds(self, indices: Iterable[int]) -> tuple[int, int]:
        """(layers, MoE layers) among ``indices``, vectorised (models may be deep)."""
        if isinstance(indices, np.ndarray):
            idx = indices.astype(np.int64, copy=False)
        else:
            idx = np.fromiter(indices, dtype=np.int64)
        return len(idx), int(self.moe_layers[idx].sum())

    def layer(self, index: int) -> LayerSums:
        """The parameters of 0-based layer ``index``, per component."""
        if self.moe_layers[index]:
            return LayerSums(
                attention=self.attention,
                attention_kv=self.attention_kv,
                routed_experts=self.routed_experts,
                shared_experts=self.shared_experts,
                router=self.router,
                norms=self.norms,
            )
        return LayerSums(
            attention=self.attention,
            attention_kv=self.attention_kv,
            dense_mlp=self.dense_mlp,
            norms=self.norms,
        )

    def layers(self, indices: Iterable[int]) -> LayerSums:
        """The parameters of the layers ``indices`` (0-based), summed per component."""
        n_all, n_moe = self._kinds(indices)
        n_dense = n_all - n_moe
        return LayerSums(
            attention=n_all * self.attention,
            attention_kv=n_all * self.attention_kv,
            dense_mlp=n_dense * self.dense_mlp,
            routed_experts=n_moe * self.routed_experts,
            shared_experts=n_moe * self.shared_experts,
            router=n_moe * self.router,
            norms=n_all * self.norms,
        )

    def layers_total(self, indices: Iterable[int]) -> int:
        """All parameters of the layers ``indices``."""
        return self.layers(indices).total

    def layers_active(self, indices: Iterable[int]) -> int:
        """Parameters of the layers ``indices`` that one token uses (``top_k`` routed experts)."""
        indices = list(indices)
        n_moe = self._kinds(indices)[1]
        sums = self.layers(indices)
        return sums.total - sums.routed_experts + n_moe * self.top_k * self.routed_expert

    @property
    def non_layer(self) -> int:
        """Embedding, output layer and final norm."""
        return self.embedding + self.output + self.final_norm

    @property
    def total(self) -> int:
        """All parameters of the model."""
        return self.layers_total(range(self.num_layers)) + self.non_layer

    @property
    def active_per_token(self) -> int:
        """Parameters one token uses: every layer, but only ``top_k`` routed experts."""
        return self.layers_active(range(self.num_layers)) + self.non_layer


def attention_params(model: ModelSpec) -> tuple[int, int]:
    """Attention weights of one layer, and the part of them that is the K and V projections.

    The K/V part is what tensor parallelism replicates when TP exceeds the key/value heads
    (GQA); it is 0 for MLA, whose projections are all counted as TP-sharded.
    """
    h, heads = model.hidden_size, model.num_attention_heads
    mla = model.mla
    if mla is None:
        d = model.head_size
        kv = 2 * h * d * model.kv_heads
        return 2 * h * d * heads + kv, kv
    qk_head = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    if mla.q_lora_rank is None:
        query = h * heads * qk_head
    else:
        query = h * mla.q_lora_rank + mla.q_lora_rank * heads * qk_head
    kv_down = h * (mla.kv_lora_rank + mla.qk_rope_head_dim)
    kv_up = mla.kv_lora_rank * heads * (mla.qk_nope_head_dim + mla.v_head_dim)
    out = heads * mla.v_head_dim * h
    return query + kv_down + kv_up + out, 0


def count_params(model: ModelSpec) -> ParamCounts:
    """Parameter counts of ``model`` per component (see the module docstring for the rules)."""
    h, vocab = model.hidden_size, model.vocab_size
    phi = MLP_MATRICES[model.activation]
    attention, attention_kv = attention_params(model)
    moe = model.moe
    routed_expert = phi * h * model.ffn_hidden_size if moe else 0
    shared = 0
    if moe and moe.num_shared_experts:
        shared_ffn = moe.shared_expert_ffn_hidden_size or model.ffn_hidden_size
        shared = moe.num_shared_experts * phi * h * shared_ffn
    return ParamCounts(
        attention=attention,
        attention_kv=attention_kv,
        dense_mlp=phi * h * model.dense_ffn,
        routed_experts=moe.num_experts * routed_expert if moe else 0,
        routed_expert=routed_expert,
        shared_experts=shared,
        router=h * moe.num_experts if moe else 0,
        norms=2 * h,
        embedding=vocab * h,
        output=0 if model.tie_embeddings else vocab * h,
        final_norm=h,
        top_k=moe.top_k if moe else 0,
        moe_layers=model.moe_layer_mask(),
    )

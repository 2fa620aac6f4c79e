"""Context parallelism (``parallel.cp``): ring attention over the CP group.

Megatron-Core (Transformer Engine's ``AttnFuncWithCPAndKVP2P``) splits every sequence into
``2 cp`` chunks and gives CP rank ``i`` chunks ``i`` and ``2 cp - 1 - i`` (causal load
balancing: every rank gets the same share of the causal attention work). Linear layers then
see ``s / cp`` tokens per sequence on each rank; core attention runs as ``cp`` ring steps: at
step ``j`` a rank computes its queries against the key/value block it holds while passing that
block to the next rank of the ring and receiving the previous rank's, so the transfer of
every block but the last overlaps the attention of the one before.

Per layer and GPU (``T`` = the rank's tokens, ``n_kv`` key/value heads per GPU, head sizes
``d_qk``, ``d_v``, ``b`` bytes per element)::

    KV block                  B = T * n_kv * (d_qk + d_v) * b
    forward bytes sent        (cp - 1) * B
    backward bytes sent       2 (cp - 1) * B        (K/V again, and their gradients dK/dV)
    exposed forward time      (cp - 1) * max(0, p2p(B) - A / cp)
    exposed backward time     (cp - 1) * max(0, p2p(2 B) - 2 A / cp)

with ``A`` the rank's core-attention forward time (1/cp of the sequence's causal attention)
and ``p2p`` a send at the ring's slowest link (the CP group's, intra- or inter-node). With
MLA, Megatron passes the decompressed per-head keys and values (``n_kv`` = heads / TP).
"""

from __future__ import annotations

from dataclasses import dataclass

from clustersim.costs.comm import p2p_link, p2p_ms
from clustersim.costs.compute import DTYPE_BYTES, head_dims, kv_heads_per_gpu
from clustersim.spec.schema import HardwareSpec, ModelSpec


@dataclass(frozen=True)
class RingAttention:
    """Ring-attention communication of one layer on one GPU of a CP group."""

    block_bytes: float  # one K/V block (the rank's tokens)
    fwd_bytes: float  # bytes sent per layer, forward
    bwd_bytes: float  # bytes sent per layer, backward
    fwd_exposed_ms: float  # transfer time not hidden under attention, forward
    bwd_exposed_ms: float  # backward


def kv_block_bytes(tokens: float, model: ModelSpec, tp: int) -> float:
    """Bytes of the keys and values of ``tokens`` tokens on one GPU of a TP group."""
    qk_dim, v_dim = head_dims(model)
    return tokens * kv_heads_per_gpu(model, tp) * (qk_dim + v_dim) * DTYPE_BYTES[model.dtype]


def ring_attention(
    tokens: float,
    core_attention_fwd_ms: float,
    model: ModelSpec,
    tp: int,
    cp_group: list[int],
    hw: HardwareSpec,
    backward_factor: float = 2.0,
) -> RingAttention:
    """Bytes and exposed time of ring attention for a rank with ``tokens`` tokens (its share
    of the sequences) and core attention forward time ``core_attention_fwd_ms`` (its share),
    over the ranks ``cp_group``."""
    cp = len(cp_group)
    block = kv_block_bytes(tokens, model, tp)
    if cp <= 1:
        return RingAttention(block, 0.0, 0.0, 0.0, 0.0)
    link = p2p_link(cp_group, hw.gpus_per_node, hw)
    step_fwd = p2p_ms(block, link.bandwidth_gbps, link.latency_us)
    step_bwd = p2p_ms(2 * block, link.bandwidth_gbps, link.latency_us)
    compute_fwd = core_attention_fwd_ms / cp
    compute_bwd = backward_factor * core_attention_fwd_ms / cp
    return RingAttention(
        block,
        (cp - 1) * block,
        2 * (cp - 1) * block,
        (cp - 1) * max(0.0, step_fwd - compute_fwd),
        (cp - 1) * max(0.0, step_bwd - compute_bwd),
    )

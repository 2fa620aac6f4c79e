"""Gating model: how popular each expert of an MoE layer is.

Skew law (``router_skew`` = s >= 0). Expert ``e`` of layer ``l`` has popularity

    p_e ∝ (rank_e + 1) ** (-s)

a Zipf law with exponent s over the experts' popularity ranks 0..E-1; s = 0 is uniform. The
rank order is a random permutation drawn, per layer, from a generator seeded by ``(seed,
layer)`` (a stream separate from the per-token draws), so the hot experts differ from layer to
layer while a layer's popularity stays fixed for the whole run.

Each token then picks its top-k experts as the top-k of ``log p_e + Gumbel noise`` (per-token
noise), i.e. k experts sampled without replacement in proportion to ``p`` (see
:mod:`clustersim.routing.kernels`). With k = 1, expert e gets a fraction p_e of the tokens, so the
expected max/mean expert load is ``E * p_max = E / H(E, s)`` with ``H`` the generalised harmonic
number ``sum_{r=1}^{E} r^-s``:

    =======  =====  =====  =====  =====  =====  =====
    s        0      0.1    0.2    0.35   0.5    1.0
    E = 8    1.00   1.14   1.29   1.55   1.83   2.94
    E = 64   1.00   1.37   1.87   2.90   4.38   13.5
    E = 256  1.00   1.57   2.44   4.60   8.37   41.8
    =======  =====  =====  =====  =====  =====  =====

(:func:`max_to_mean_load` computes it). Observed routers sit at max/mean ≈ 1.5-1.7 with an
auxiliary loss and ≈ 1.04 with bias-based balancing (reference.md, "Routing"): s ≈ 0.35 for
E = 8, s ≈ 0.15 for E = 64, s ≈ 0.01-0.02 for bias-based balancing.
With k > 1 the sampled loads are flatter than p because a token takes each expert at most once.

Node-limited routing (``max_nodes_per_token`` = M, as in DeepSeek-V3): experts are grouped by
node; a token first picks M distinct nodes in proportion to their popularity mass (without
replacement, the same sequential sampler), then its k experts among the experts of those nodes
in proportion to ``p``. DeepSeek-V3 picks the nodes by the highest sums of per-token affinities;
without a model of affinities, sampling the nodes by mass is the documented substitute.
"""

from __future__ import annotations

import numpy as np

_POPULARITY_STREAM = 0x90B  # spawn key separating the popularity stream from token draws


def zipf_weights(num_experts: int, router_skew: float) -> np.ndarray:
    """Popularity of the experts ranked 0..E-1: ``(rank + 1) ** -router_skew``, summing to 1."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be at least 1, got {num_experts}")
    if not router_skew >= 0:
        raise ValueError(f"router_skew must be >= 0, got {router_skew}")
    weights = np.arange(1, num_experts + 1, dtype=np.float64) ** -float(router_skew)
    return weights / weights.sum()


def expert_popularity(num_experts: int, router_skew: float, seed: int, layer: int) -> np.ndarray:
    """Popularity (E,) of the experts of ``layer``: Zipf weights in a per-layer random order."""
    if seed < 0 or layer < 0:
        raise ValueError(f"seed and layer must be >= 0, got {seed} and {layer}")
    seq = np.random.SeedSequence([seed, layer], spawn_key=(_POPULARITY_STREAM,))
    rank_of_expert = np.random.default_rng(seq).permutation(num_experts)
    return zipf_weights(num_experts, router_skew)[rank_of_expert]


def group_popularity(popularity: np.ndarray, experts_per_group: int) -> np.ndarray:
    """Total popularity of consecutive groups of ``experts_per_group`` experts (e.g. nodes)."""
    if experts_per_group < 1 or popularity.size % experts_per_group:
        raise ValueError(
            f"{popularity.size} experts do not split into groups of {experts_per_group}"
        )
    return popularity.reshape(-1, experts_per_group).sum(axis=1)


def max_to_mean_load(num_experts: int, router_skew: float) -> float:
    """Expected max/mean expert load under top-1 routing: ``E * p_max``."""
    return float(num_experts * zipf_weights(num_experts, router_skew)[0])

"""Count-level routing: tokens per (source rank, expert) without drawing each token.

Under the gating model every token independently gets a k-subset ``S`` of the experts with
probability ``P(S)`` (the top-k of Gumbel-perturbed log-popularities; order does not matter for
counts). So the number of tokens of source rank ``s`` that get each subset is exactly
``Multinomial(T_s, P)``, and the assignments per expert are sums of those counts. When the
number of subsets ``C(E, k)`` is small (Mixtral: E = 8, k = 2 gives 28) this costs
O(ranks x C) instead of O(T x k) and has exactly the distribution of per-token sampling.

``P(S)`` sums, over the k! orders of S, the product of sequential pick probabilities
``p_e / (1 - mass already picked)``; it is computed by dynamic programming over the 2^k
partial sets of every subset at once.
"""

from __future__ import annotations

import itertools
import math
from functools import cached_property

import numpy as np

MAX_SUBSETS = 8192  # largest C(E, k) sampled by counts
_NS_PER_SUBSET_DRAW = 80  # rough cost of one multinomial category per source rank
_NS_PER_TOKEN_PICK = 20  # rough cost of one per-token pick (uniform + kernel)
_NS_PER_BINOMIAL = 120  # rough cost of one binomial draw of the projected counts


def num_subsets(num_experts: int, top_k: int) -> int:
    """C(E, k): the k-subsets of E experts."""
    return math.comb(num_experts, top_k)


def counts_are_cheaper(num_experts: int, top_k: int, num_sources: int, num_tokens: int) -> bool:
    """Whether count-level sampling is feasible and cheaper than per-token sampling."""
    subsets = num_subsets(num_experts, top_k)
    if subsets > MAX_SUBSETS:
        return False
    return num_sources * subsets * _NS_PER_SUBSET_DRAW < num_tokens * top_k * _NS_PER_TOKEN_PICK


def projected_is_cheaper(
    num_experts: int, top_k: int, num_sources: int, num_tokens: int | np.ndarray
) -> bool | np.ndarray:
    """Whether projected counts (one binomial per source rank and expert) cost less than
    per-token sampling (:mod:`clustersim.routing.projected`)."""
    return num_sources * num_experts * _NS_PER_BINOMIAL < np.asarray(num_tokens) * top_k * (
        _NS_PER_TOKEN_PICK
    )


def subset_probabilities(popularity: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """P(a token's top-k set is each row of ``subsets`` (C, k)), for popularity (E,) > 0."""
    p = np.asarray(popularity, dtype=np.float64)
    p = p / p.sum()
    members = p[subsets]  # (C, k)
    k = subsets.shape[1]
    # The mass left after picks P is sum(p) - sum(P), which cancels to 0 or below under a
    # strong skew (numpy then refused the negative probabilities: "pvals < 0"). With Q the m
    # most popular experts (m = |P|) it equals R[m] + sum(Q \ P) - sum(P \ Q), R[m] the
    # mass of all but Q summed from the smallest: every term is at most ~E times the result.
    order = np.argsort(-p, kind="stable")
    rank = np.empty(p.size, np.int64)
    rank[order] = np.arange(p.size)
    tail = np.append(np.cumsum(p[order][::-1])[::-1], 0.0)  # tail[m]: all but the top m
    reach = np.zeros((1 << k, subsets.shape[0]))  # reach[mask]: P(first picks = that part)
    reach[0] = 1.0
    for mask in range(1 << k):
        picked = [j for j in range(k) if mask >> j & 1]
        m = len(picked)
        if m == k:
            continue
        chosen = subsets[:, picked]  # (C, m)
        outside = np.where(rank[chosen] >= m, members[:, picked], 0.0).sum(axis=1)
        missed = np.zeros(subsets.shape[0])
        for top in order[:m]:
            missed += np.where((chosen == top).any(axis=1), 0.0, p[top])
        left = tail[m] + missed - outside
        for j in range(k):
            if not mask >> j & 1:
                share = np.divide(members[:, j], left, out=np.zeros_like(left), where=left > 0)
                reach[mask | 1 << j] += reach[mask] * share
    return np.clip(reach[-1], 0.0, None)


class SubsetSampler:
    """The k-subsets of E experts and their probabilities under one popularity vector."""

    def __init__(self, popularity: np.ndarray, top_k: int) -> None:
        num_experts = np.asarray(popularity).size
        if num_subsets(num_experts, top_k) > MAX_SUBSETS:
            raise ValueError(
                f"C({num_experts}, {top_k}) subsets exceed {MAX_SUBSETS}; sample tokens instead"
            )
        self.num_experts = num_experts
        combos = itertools.combinations(range(num_experts), top_k)
        self.subsets = np.array(list(combos), dtype=np.int64).reshape(-1, top_k)
        probs = subset_probabilities(popularity, self.subsets)
        self.probabilities = probs / probs.sum()

    def sample_counts(self, rng: np.random.Generator, tokens: np.ndarray) -> np.ndarray:
        """Assignments (S, E) int64 of each source rank's ``tokens[s]`` tokens to each expert."""
        return self.sample_counts_many(rng, np.asarray(tokens)[None])[0]

    def sample_counts_many(self, rng: np.random.Generator, tokens: np.ndarray) -> np.ndarray:
        """:meth:`sample_counts` for a batch: ``tokens`` (B, S) -> assignments (B, S, E)."""
        per_subset = rng.multinomial(tokens, self.probabilities)  # (B, S, C)
        return np.rint(per_subset @ self._incidence).astype(np.int64)

    @cached_property
    def _incidence(self) -> np.ndarray:
        """(C, E): 1.0 where subset c holds expert e (a matrix product sums the subsets'
        counts per expert ~10x faster than a bincount over C x k slots; C x E x 8 bytes)."""
        incidence = np.zeros((self.subsets.shape[0], self.num_experts))
        np.put_along_axis(incidence, self.subsets, 1.0, axis=1)
        return incidence

"""Count-level node-limited routing (``max_nodes_per_token``, DeepSeek-V3's M = 4 nodes).

A token first picks M of the G nodes (groups of experts) without replacement in proportion to
their popularity mass, then its k experts among the experts of those nodes
(:mod:`clustersim.routing.gating`). At the count level, per source rank:

1. the number of its tokens that pick each set of M nodes is exactly
   ``Multinomial(T_s, P)`` over the C(G, M) node sets (their probabilities by the subset
   dynamic programme of :mod:`clustersim.routing.subsets`);
2. given ``n_c`` tokens on node set c, their expected assignments to each expert are
   ``n_c pi^c_e``, with ``pi^c`` the exact top-k inclusion probabilities among the allowed
   experts (:func:`clustersim.routing.inclusion.inclusion_probabilities_within`), and their
   variances ``n_c pi^c_e (1 - pi^c_e)``;
3. the source's counts are then drawn from the Gaussian with the summed means and variances
   and a covariance that keeps the total ``T_s k`` (:func:`projected.gaussian_rank_counts`).

Exact: the distribution of node sets (what makes node-limited routing cheap in traffic), every
mean. Approximate: within a node set the covariance is Hajek's rank-one form summed over the
source's node sets as one term (tests compare per-rank variances with the per-token sampler).
Used only for the engine's dropless batches with large counts (``normal_fits``).
"""

from __future__ import annotations

import numpy as np

from clustersim.routing.inclusion import inclusion_probabilities_within
from clustersim.routing.projected import MIN_NORMAL_SD, gaussian_rank_counts
from clustersim.routing.subsets import MAX_SUBSETS, SubsetSampler, num_subsets


def node_sets_fit(num_groups: int, nodes_per_token: int) -> bool:
    """Whether the C(G, M) node sets are few enough to enumerate."""
    return num_subsets(num_groups, nodes_per_token) <= MAX_SUBSETS


class NodeLimitedSampler:
    """Node-set multinomials and per-set inclusion probabilities of one popularity vector."""

    def __init__(
        self, popularity: np.ndarray, top_k: int, group_of: np.ndarray, nodes_per_token: int
    ) -> None:
        p = np.asarray(popularity, dtype=np.float64)
        self.top_k = int(top_k)
        group_mass = np.bincount(group_of, weights=p)
        self.node_sets = SubsetSampler(group_mass, nodes_per_token)
        allowed = (group_of[None, :] == self.node_sets.subsets[:, :, None]).any(axis=1)
        self.inclusion = inclusion_probabilities_within(p, top_k, allowed)  # (C, E)
        self._variance = self.inclusion * (1.0 - self.inclusion)

    def normal_fits(self, tokens: np.ndarray, ep: int) -> bool:
        """Whether, with the expected node-set counts, every per-(source, EP rank) standard
        deviation that is not 0 and every per-row expert one is at least MIN_NORMAL_SD."""
        tokens = np.asarray(tokens)
        if tokens.size == 0 or self.inclusion.max() >= 1.0:
            return False
        expected = self.node_sets.probabilities @ self._variance  # per token, (E,)
        per_rank = expected.reshape(ep, -1).sum(axis=1)
        smallest_source = float(tokens.min()) * float(per_rank[per_rank > 0].min())
        smallest_row = float(tokens.sum(axis=1).min()) * float(expected[expected > 0].min())
        return min(smallest_source, smallest_row) >= MIN_NORMAL_SD**2

    def sample_rank_counts_many(
        self, rng: np.random.Generator, tokens: np.ndarray, ep: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Assignments (B, S, ep) from each source rank to each EP rank and per expert (B, E)
        for ``tokens`` (B, S) (see the module docstring)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        per_set = rng.multinomial(tokens, self.node_sets.probabilities).astype(np.float64)
        flat = per_set.reshape(-1, per_set.shape[-1])
        mean = (flat @ self.inclusion).reshape(*tokens.shape, -1)  # (B, S, E)
        variance = (flat @ self._variance).reshape(mean.shape)
        return gaussian_rank_counts(rng, mean, variance, tokens, ep, self.top_k)

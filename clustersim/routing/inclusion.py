"""Inclusion probabilities of top-k routing: P(expert e is among a token's k experts).

Under the gating model a token's k experts are sampled without replacement in proportion to
the popularity ``p`` (the top-k of Gumbel-perturbed log-popularities). Equivalently every
expert ``f`` "arrives" at an independent time ``A_f ~ Exp(rate p_f)`` and the token takes the k
first arrivals. Expert e is taken iff fewer than k others arrive before it:

    pi_e = integral_0^inf p_e exp(-p_e t) P(N_{-e}(t) <= k - 1) dt

with ``N_{-e}(t)`` the number of the other experts arrived by t, a Poisson-binomial count of
the probabilities ``1 - exp(-p_f t)``. The integral is computed by composite Gauss-Legendre
quadrature after ``t = tau u / (1 - u)`` (``tau``: the time by which k arrivals are expected),
the Poisson-binomial CDFs of all leave-one-out sets at once from prefix and suffix products of
the generating polynomials truncated at degree k - 1 (a numba kernel, imported when called).
Cost O(Q E k) for Q = 512 nodes; accuracy ~1e-15 against exact subset enumeration (tests), and
``sum(pi) = k`` is checked.
"""

from __future__ import annotations

from functools import cache

import numpy as np

_PANELS = 32  # quadrature panels on u in [0, 1)
_NODES_PER_PANEL = 16
_SUM_TOLERANCE = 1e-6  # |sum(pi) - k| / k accepted before the final renormalisation


@cache
def _quadrature() -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss-Legendre nodes and weights on [0, 1)."""
    x, w = np.polynomial.legendre.leggauss(_NODES_PER_PANEL)
    edges = np.linspace(0.0, 1.0, _PANELS + 1)
    half = np.diff(edges) / 2
    nodes = (edges[:-1, None] + half[:, None] * (x[None, :] + 1)).ravel()
    weights = (half[:, None] * w[None, :]).ravel()
    return nodes, weights


def _expected_arrival_time(p: np.ndarray, k: int) -> float:
    """The time tau at which k arrivals are expected: sum(1 - exp(-p tau)) = k (bisection)."""
    lo, hi = 0.0, 1.0
    while np.sum(-np.expm1(-p * hi)) < k:
        hi *= 2.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if np.sum(-np.expm1(-p * mid)) < k:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def inclusion_probabilities(popularity: np.ndarray, top_k: int) -> np.ndarray:
    """pi (E,): probability that each expert is among a token's ``top_k`` experts.

    ``popularity`` (E,) > 0 (normalised here). ``sum(pi) == top_k``; ``pi = 1`` everywhere when
    ``top_k == E``.
    """
    p = np.asarray(popularity, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or not np.all(np.isfinite(p)) or np.any(p <= 0):
        raise ValueError("popularity must be a non-empty 1-D array of finite values > 0")
    num_experts, k = p.size, int(top_k)
    if not 1 <= k <= num_experts:
        raise ValueError(f"top_k must lie in [1, {num_experts}], got {top_k}")
    if k == num_experts:
        return np.ones(num_experts)
    p = p / p.sum()
    tau = _expected_arrival_time(p, k)
    u, w = _quadrature()
    t = tau * u / (1.0 - u)  # (Q,)
    dt = w * tau / (1.0 - u) ** 2
    arrived = -np.expm1(-np.outer(t, p))  # (Q, E): 1 - exp(-p_f t)
    cdf = np.empty((num_experts, t.size))  # P(N_{-e}(t) <= k - 1)
    from clustersim.routing import kernels

    kernels._leave_one_out_cdf(arrived, k, cdf)
    density = p[:, None] * np.exp(-np.outer(p, t))  # (E, Q)
    pi = np.clip((density * cdf) @ dt, 0.0, 1.0)
    if abs(pi.sum() - k) > _SUM_TOLERANCE * k:
        raise ArithmeticError(f"inclusion probabilities sum to {pi.sum():.9f}, not {k}")
    return pi * (k / pi.sum())

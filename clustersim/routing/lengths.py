"""Sequence-length sampling and packing sequences into micro-batches.

Distributions (``LengthSpec.dist``), all returning int64 token counts >= 1:

- ``fixed``: every length is ``value``.
- ``uniform``: integers drawn uniformly from [min, max], both ends included.
- ``lognormal``: ``exp(N(mu, sigma^2))`` with ``mu = log(mean) - sigma^2 / 2``, so that the mean
  of the *unclamped* distribution is ``mean``; rounded to the nearest integer and clamped to
  [min (default 1), max]. Clamping moves the sample mean when much mass lies outside.
- ``empirical``: resampled with replacement from a column of a CSV or Arrow file
  (:func:`clustersim.spec.lengths.read_lengths`), clamped to [min, max] where given.
"""

from __future__ import annotations

import numpy as np

from clustersim.spec.lengths import read_lengths
from clustersim.spec.schema import LengthSpec


def sample_lengths(
    spec: LengthSpec,
    n: int,
    rng: np.random.Generator,
    *,
    empirical_lengths: np.ndarray | None = None,
) -> np.ndarray:
    """``n`` lengths (int64) drawn from ``spec`` with ``rng``.

    For ``empirical``, ``empirical_lengths`` may hold the file's column already read (to avoid
    reading the file on every call); otherwise the file is read here.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if spec.dist == "fixed":
        return np.full(n, spec.value, dtype=np.int64)
    if spec.dist == "uniform":
        return rng.integers(spec.min, spec.max, size=n, endpoint=True, dtype=np.int64)
    if spec.dist == "lognormal":
        mu = np.log(spec.mean) - spec.sigma**2 / 2
        draws = np.rint(rng.lognormal(mu, spec.sigma, size=n))
        return np.clip(draws, spec.min or 1, spec.max).astype(np.int64)
    values = empirical_lengths
    if values is None:
        values = read_lengths(spec.file, spec.column)
    values = np.asarray(values, dtype=np.int64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("empirical lengths must be a non-empty 1-D array")
    draws = values[rng.integers(0, values.size, size=n)]
    if spec.min is not None or spec.max is not None:
        draws = np.clip(draws, spec.min, spec.max)
    return draws


def pack_microbatches(
    lengths: np.ndarray,
    micro_batch_size: int | None = None,
    token_budget: int | None = None,
) -> list[np.ndarray]:
    """Split sequence lengths, in order, into micro-batches (arrays of lengths).

    Exactly one rule: ``micro_batch_size`` sequences per micro-batch (the last may hold fewer),
    or a greedy ``token_budget``: sequences join the current micro-batch while its tokens stay
    within the budget; a sequence longer than the budget gets a micro-batch of its own.
    Concatenating the result gives ``lengths`` back.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    if (micro_batch_size is None) == (token_budget is None):
        raise ValueError("give exactly one of micro_batch_size and token_budget")
    if micro_batch_size is not None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        return [lengths[i : i + micro_batch_size] for i in range(0, lengths.size, micro_batch_size)]
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    return [lengths[lo:hi] for lo, hi in _greedy_bounds(lengths.tolist(), token_budget)]


def _greedy_bounds(lengths: list[int], token_budget: int) -> list[tuple[int, int]]:
    """[lo, hi) row ranges of the greedy token-budget packing."""
    bounds, lo, tokens = [], 0, 0
    for i, length in enumerate(lengths):
        if i > lo and tokens + length > token_budget:
            bounds.append((lo, i))
            lo, tokens = i, 0
        tokens += length
    if lengths:
        bounds.append((lo, len(lengths)))
    return bounds

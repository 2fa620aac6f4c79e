"""Load-balance and drop metrics of routed tokens."""

from __future__ import annotations

import numpy as np


def load_balance_pct(tokens_per_expert: np.ndarray) -> float:
    """Mean expert load / max expert load x 100 (100 when no expert has a token)."""
    loads = np.asarray(tokens_per_expert, dtype=np.float64)
    if loads.size == 0 or loads.max() <= 0:
        return 100.0
    return float(loads.mean() / loads.max() * 100.0)


def max_to_mean_load(tokens_per_expert: np.ndarray) -> float:
    """Max expert load / mean expert load (1 when no expert has a token)."""
    return 100.0 / load_balance_pct(tokens_per_expert)


def dropped_tokens_pct(dropped_tokens: int, routed_tokens: int) -> float:
    """Dropped token-expert assignments as a share of all routed ones, in % (0 if none)."""
    if routed_tokens <= 0:
        return 0.0
    return 100.0 * dropped_tokens / routed_tokens

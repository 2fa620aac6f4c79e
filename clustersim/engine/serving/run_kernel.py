"""The round times of a run of identical decode steps, as one compiled loop.

A run of ``K`` decode steps differs from step to step only in the context the attention
reads: step ``j`` adds ``n x j`` to the batch's ``pairs`` and ``kv`` sums. :func:`run_rounds`
evaluates, for every ``j``, exactly the operations of
:func:`clustersim.costs.serving.core_attention_ms` and ``fixed + layers x core`` (the same
IEEE operations in the same order, so the same numbers as the numpy expressions they
replace), and the running sum of the round times (numpy's ``cumsum`` order). Numba is imported
only when a run is first timed.
"""

from __future__ import annotations

import numpy as np

_KERNEL = None


def run_rounds(steps: int, n: float, pairs: float, kv: float, k: tuple) -> tuple:
    """(round times, their running sums), each of length ``steps``; ``k`` = (KV bytes per
    token, query bytes x n, ms per pair, query ms x n, ms per KV byte, kernel fixed ms, launch
    ms, framework ms, fixed round ms, layers)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _compile()
    rounds = np.empty(steps)
    cum = np.empty(steps)
    _KERNEL(steps, n, pairs, kv, *k, rounds, cum)
    return rounds, cum


def _compile():
    from numba import njit

    @njit(cache=True)
    def kernel(steps, n, pairs, kv, kv_byte, query_bytes, per_pair, query_ms, per_kv_byte,
               fixed, launch, framework, round_fixed, layers, rounds, cum):  # fmt: skip
        acc = 0.0
        for j in range(steps):
            grown = n * float(j)
            kv_bytes = (kv + grown) * kv_byte
            kv_bytes = kv_bytes + query_bytes
            flops_ms = (pairs + grown) * per_pair + query_ms
            bytes_ms = kv_bytes * per_kv_byte
            gpu = (flops_ms if flops_ms >= bytes_ms else bytes_ms) + fixed
            core = (gpu if gpu >= launch else launch) + framework
            r = round_fixed + layers * core
            rounds[j] = r
            acc = acc + r if j else r
            cum[j] = acc

    return kernel

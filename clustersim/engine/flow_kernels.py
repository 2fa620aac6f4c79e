"""Numba kernel of the flow solver (``engine.flows``): max-min fair levels of one connected
group of flows, straight from the flow set's CSR arrays.

``engine.flows.max_min_rates`` is the reference (dense weights, numpy); this kernel runs the
same progressive filling on the group's (flow, link) entries without building the dense
matrix: links are numbered locally through a scratch map (``local_of`` over all links, -1
outside a call, restored on return). Per round the free flows' demand per link is summed in
flow order, every free flow rises to the lowest link level or cap, and flows at their cap or
on a saturated link freeze; their use leaves the links' residual capacity. Sums run in a
fixed order, so results are deterministic; they agree with the reference to rounding (the
reference subtracts a frozen set's use through one matrix product).

Imported by ``engine.flows`` inside the function that needs it, so importing the engine never
imports numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit

EPS = 1e-12
TOL = 1e-9


@njit(cache=True)
def max_min_group(group, ptr, link, unit, caps, capacity, local_of, out):  # noqa: PLR0912
    """Max-min fair levels of the flows ``group`` (sorted flow ids) into ``out``: flow ``f``
    puts ``unit[e] * level`` on link ``link[e]`` for its entries ``e`` in
    ``ptr[f]:ptr[f+1]``, its level at most ``caps[f]``, links at most ``capacity``."""
    m = group.shape[0]
    count = 0
    for i in range(m):
        f = group[i]
        count += ptr[f + 1] - ptr[f]
    used = np.empty(count, dtype=np.int64)  # global ids of the group's links
    col = np.empty(count, dtype=np.int64)  # local link of each entry
    row_start = np.empty(m + 1, dtype=np.int64)
    n_links = 0
    k = 0
    for i in range(m):
        f = group[i]
        row_start[i] = k
        for e in range(ptr[f], ptr[f + 1]):
            ln = link[e]
            if local_of[ln] < 0:
                local_of[ln] = n_links
                used[n_links] = ln
                n_links += 1
            col[k] = local_of[ln]
            k += 1
    row_start[m] = k
    residual = np.empty(n_links)
    for j in range(n_links):
        residual[j] = capacity[used[j]]
    demand = np.empty(n_links)
    link_level = np.empty(n_links)
    saturated = np.zeros(n_links, dtype=np.bool_)
    free = np.ones(m, dtype=np.bool_)
    frozen = np.zeros(m, dtype=np.bool_)
    left = m
    while left > 0:
        demand[:n_links] = 0.0
        for i in range(m):
            if free[i]:
                f = group[i]
                base = ptr[f] - row_start[i]
                for k in range(row_start[i], row_start[i + 1]):
                    demand[col[k]] += unit[base + k]
        level = np.inf
        for j in range(n_links):
            if demand[j] > EPS:
                link_level[j] = residual[j] / demand[j]
                if link_level[j] < level:
                    level = link_level[j]
            else:
                link_level[j] = np.inf
        min_cap = np.inf
        for i in range(m):
            if free[i] and caps[group[i]] < min_cap:
                min_cap = caps[group[i]]
        if min_cap < level:
            level = min_cap
        if level < 0.0:
            level = 0.0
        bound = level * (1 + TOL) + EPS
        for j in range(n_links):
            saturated[j] = demand[j] > EPS and link_level[j] <= bound
        any_frozen = False
        for i in range(m):
            frozen[i] = False
            if not free[i]:
                continue
            out[i] = level
            f = group[i]
            if caps[f] <= bound:
                frozen[i] = True
            else:
                base = ptr[f] - row_start[i]
                for k in range(row_start[i], row_start[i + 1]):
                    if saturated[col[k]] and unit[base + k] > EPS:
                        frozen[i] = True
                        break
            any_frozen = any_frozen or frozen[i]
        if not any_frozen:  # numerical safety: freeze the tightest flow
            for i in range(m):
                if free[i] and caps[group[i]] == min_cap:
                    frozen[i] = True
        for i in range(m):
            if frozen[i]:
                f = group[i]
                base = ptr[f] - row_start[i]
                for k in range(row_start[i], row_start[i + 1]):
                    residual[col[k]] -= unit[base + k] * out[i]
                free[i] = False
                left -= 1
        for j in range(n_links):
            if residual[j] < 0.0:
                residual[j] = 0.0
    for j in range(n_links):
        local_of[used[j]] = -1

"""Numba kernels of token routing: top-k sampling, counting, capacity drops.

Every kernel is a private ``@njit(cache=True)`` function over arrays and scalars; randomness
enters as arrays of uniforms drawn by the caller; outputs are written into arrays the caller
allocates. The validating wrappers live in :mod:`clustersim.routing.dispatch` and import this
module inside their functions, so ``import clustersim.routing`` never imports numba.

Sampling k experts without replacement (``_sample_topk``)
---------------------------------------------------------
Per token, experts are picked one after another in proportion to popularity; a pick that lands
on an expert already chosen (or outside the token's allowed node group) is rejected and drawn
again. Sequential sampling proportional to popularity with duplicates rejected has exactly the
distribution of the top-k of (log-popularity + Gumbel noise), with ~k draws per token instead
of E noise values.

A single pick is Walker's alias method (O(1): one column, one threshold), the table built by
Vose's method in ``_build_table``; it is exact like inverse-CDF search and 3-4x faster at
E = 64. Each pick uses *one* uniform. A rejected draw does not consume a new one: given the
(column, branch) the uniform reached, its rescaled position within that branch is again
uniform on [0, 1) and independent of everything drawn before, so it is reused ("recycled").
Every recycling spends ``log2(n / branch width)`` of the uniform's 53 bits; the kernel tracks
the spent resolution and, after ``max_rejections`` rejections or once fewer than ~32 bits are
left, falls back to an exact conditional draw: an O(E) scan of the cumulative popularity over
the experts still allowed, with the recycled uniform. Both paths sample the same conditional
distribution, so the result is exact (up to 2^-32 resolution) and deterministic in the
uniforms.

When k > E/2 (e.g. E = 8, k = 8) rejections would dominate; each token then picks by
inverse-CDF scans over a pool of its allowed experts, removing each pick from the pool: O(k E)
per token, exact as well, and 4x faster there.

Priority keys (drop policy "probs"): after a pick is accepted, the recycled uniform ``w`` is
again fresh. It draws the pick's place in the *exponential race* equivalent to Gumbel-top-k:
expert e "arrives" at ``A_e = Exp(1) / p_e``, and ``A_e = exp(-G_e)`` for its Gumbel-perturbed
log-popularity ``G_e``, so the first k arrivals are the top-k experts. Top-down (memoryless):
``A_1 = -log(w_1) / Z``, ``A_{j+1} = A_j - log(w_{j+1}) / Z_j`` with ``Z`` the allowed mass and
``Z_j`` the allowed mass not yet chosen. The key is ``-A_j`` (= ``-exp(-G_j)``, ordered like
the perturbed logit ``G_j``); ``(experts, keys)`` has the joint distribution of the top-k
experts and their perturbed logits. One log per pick.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_ONE_BELOW = 1.0 - 2.0**-53  # largest double below 1
_TINY = 1e-300  # keeps log(w) finite when w rounds to 0
_MIN_SCALE = 2.0**-21  # recycle while >= 32 of the 53 bits of resolution are left
_SMALL_GROUP = 64  # "probs" drops: groups up to this size are sorted in a scratch buffer


@njit(cache=True)
def _build_table(weights, table_out):
    """Sampling table (3, n) of positive weights: cumulative sums, alias thresholds, aliases.

    Rows 1-2 are Walker's alias table built by Vose's method: item i is kept with probability
    ``table[1, i]`` and replaced by item ``int(table[2, i])`` otherwise.
    """
    n = weights.size
    scaled = weights * (n / weights.sum())
    small = np.empty(n, np.int64)
    large = np.empty(n, np.int64)
    num_small = 0
    num_large = 0
    acc = 0.0
    for i in range(n):
        acc += weights[i]
        table_out[0, i] = acc
        table_out[2, i] = i
        if scaled[i] < 1.0:
            small[num_small] = i
            num_small += 1
        else:
            large[num_large] = i
            num_large += 1
    while num_small > 0 and num_large > 0:
        num_small -= 1
        num_large -= 1
        lo, hi = small[num_small], large[num_large]
        table_out[1, lo] = scaled[lo]
        table_out[2, lo] = hi
        scaled[hi] = (scaled[hi] + scaled[lo]) - 1.0
        if scaled[hi] < 1.0:
            small[num_small] = hi
            num_small += 1
        else:
            large[num_large] = hi
            num_large += 1
    for i in range(num_large):
        table_out[1, large[i]] = 1.0
    for i in range(num_small):  # left over only by rounding
        table_out[1, small[i]] = 1.0


@njit(cache=True)
def _width(table, e):
    """Weight of item e, from the cumulative sums."""
    return table[0, e] - (table[0, e - 1] if e > 0 else 0.0)


@njit(cache=True)
def _unit(u):
    """u clamped into [0, 1)."""
    return min(max(u, 0.0), _ONE_BELOW)


@njit(cache=True)
def _blocked(e, chosen, group_of, group_ok):
    return chosen[e] or not group_ok[group_of[e]]


@njit(cache=True)
def _scan_draw(table, u, chosen, group_of, group_ok):
    """Exact draw among unblocked items proportional to their weight, by an O(n) scan."""
    n = table.shape[1]
    mass = 0.0
    for e in range(n):
        if not _blocked(e, chosen, group_of, group_ok):
            mass += _width(table, e)
    x = u * mass
    acc = 0.0
    last = -1
    for e in range(n):
        if _blocked(e, chosen, group_of, group_ok):
            continue
        width = _width(table, e)
        if width <= 0.0:
            continue
        last = e
        if x < acc + width:
            return e, _unit((x - acc) / width)
        acc += width
    return last, _unit(u)


@njit(cache=True)
def _draw(table, u, chosen, group_of, group_ok, max_rejections):
    """One item proportional to weight among unblocked ones; returns (item, recycled uniform).

    Returns item -1 when it gives up (too many rejections, or resolution spent); the caller
    then calls ``_scan_draw`` with the recycled uniform. (Calling it from here keeps LLVM from
    inlining this function, and a call passing arrays costs reference counting: every draw
    became ~5x slower.)

    Alias method: column ``i = floor(u n)``, then ``f = u n - i`` picks i or its alias. Given the
    (column, branch) reached, the rescaled position inside the branch is a fresh uniform.
    """
    n = table.shape[1]
    scale = 1.0
    rejections = 0
    while True:
        x = u * n
        i = min(int(x), n - 1)
        f = x - i
        keep = table[1, i]
        if f < keep:
            e = i
            u = _unit(f / keep)
            branch = keep
        else:
            e = int(table[2, i])
            u = _unit((f - keep) / (1.0 - keep))
            branch = 1.0 - keep
        if not _blocked(e, chosen, group_of, group_ok):
            return e, u
        scale *= branch / n
        rejections += 1
        if rejections > max_rejections or scale < _MIN_SCALE:
            return -1, u


@njit(cache=True)
def _sample_topk(
    table,
    uniforms,
    group_of,
    group_table,
    group_uniforms,
    max_rejections,
    want_keys,
    experts_out,
    keys_out,
):
    """k distinct experts per token; group-limited when group_uniforms has columns.

    table: (3, E) sampling table of the popularity (``_build_table``); uniforms: (T, k);
    group_of: (E,) group of each expert; group_table: (3, G) table of the group masses;
    group_uniforms: (T, M), M = 0 for no limit. Writes experts_out (T, k) and, if want_keys,
    keys_out (T, k). Tokens pick by rejection when k <= E/2, by pool scans otherwise.

    Longer than the other kernels on purpose: per-token helpers taking arrays cost numba
    reference counting per array per call, which tripled the time per token. ``level`` (all 0)
    and ``always`` ([True]) let ``_draw`` pick groups, which are not grouped themselves.
    """
    num_tokens, k = uniforms.shape
    n = table.shape[1]
    num_groups = group_table.shape[1]
    chosen = np.zeros(n, np.bool_)
    group_ok = np.ones(num_groups, np.bool_)
    group_chosen = np.zeros(num_groups, np.bool_)
    level = np.zeros(num_groups, np.int64)
    always = np.ones(1, np.bool_)
    pool_w = np.empty(n, np.float64)
    pool_id = np.empty(n, np.int64)
    by_scan = 2 * k > n
    total = table[0, n - 1]
    for t in range(num_tokens):
        mass = total
        if group_uniforms.shape[1] > 0:  # node-limited: choose the token's groups first
            for g in range(num_groups):
                group_ok[g] = False
            mass = 0.0
            for i in range(group_uniforms.shape[1]):
                u = group_uniforms[t, i]
                g, w = _draw(group_table, u, group_chosen, level, always, max_rejections)
                if g < 0:
                    g, w = _scan_draw(group_table, w, group_chosen, level, always)
                group_chosen[g] = True
                group_ok[g] = True
                mass += _width(group_table, g)
            for g in range(num_groups):
                group_chosen[g] = False
        arrival = 0.0
        w = 0.0
        if by_scan:  # pool of the allowed experts; a pick is replaced by the pool's last one
            m = 0
            mass = 0.0
            for e in range(n):
                if group_ok[group_of[e]]:
                    pool_w[m] = _width(table, e)
                    pool_id[m] = e
                    mass += pool_w[m]
                    m += 1
        for j in range(k):
            if by_scan:
                x = uniforms[t, j] * mass
                acc = 0.0
                i = 0
                while i < m - 1 and x >= acc + pool_w[i]:
                    acc += pool_w[i]
                    i += 1
                e = pool_id[i]
                width = pool_w[i]
                w = _unit((x - acc) / width)
                m -= 1
                pool_w[i] = pool_w[m]
                pool_id[i] = pool_id[m]
            else:  # the first alias draw inline; _draw repeats it only on a rejection
                x = uniforms[t, j] * n
                i = min(int(x), n - 1)
                f = x - i
                keep = table[1, i]
                e = i if f < keep else int(table[2, i])
                if _blocked(e, chosen, group_of, group_ok):
                    e, w = _draw(table, uniforms[t, j], chosen, group_of, group_ok, max_rejections)
                    if e < 0:
                        e, w = _scan_draw(table, w, chosen, group_of, group_ok)
                elif want_keys:
                    w = _unit(f / keep) if f < keep else _unit((f - keep) / (1.0 - keep))
                chosen[e] = True
                width = _width(table, e)
            experts_out[t, j] = e
            if want_keys:
                arrival -= math.log(max(w, _TINY)) / max(mass, width)
                keys_out[t, j] = -arrival
            mass -= width
        if not by_scan:
            for j in range(k):
                chosen[experts_out[t, j]] = False


@njit(cache=True)
def _count_by_source(experts, token_offsets, counts_out):
    """counts_out[s, e] += assignments to expert e of the tokens of source s."""
    k = experts.shape[1]
    for s in range(token_offsets.size - 1):
        for t in range(token_offsets[s], token_offsets[s + 1]):
            for j in range(k):
                counts_out[s, experts[t, j]] += 1


@njit(cache=True)
def _keep_first(experts, token_offsets, capacity, num_experts, kept_out):
    """Drop policy "position": per source and expert, keep the earliest ``capacity[s]`` tokens."""
    k = experts.shape[1]
    seen = np.zeros(num_experts, np.int64)
    for s in range(token_offsets.size - 1):
        seen[:] = 0
        for t in range(token_offsets[s], token_offsets[s + 1]):
            for j in range(k):
                e = experts[t, j]
                kept_out[t, j] = seen[e] < capacity[s]
                seen[e] += 1


@njit(cache=True)
def _keep_highest(experts, keys, token_offsets, counts, capacity, kept_out):
    """Drop policy "probs": per source and expert, keep the ``capacity[s]`` highest keys.

    Only experts over capacity are examined: their assignments are gathered by expert, the
    capacity-th highest key found (sort of a small group in a scratch buffer, partition of a
    large one); keys above it are kept, then keys equal to it in token order until full.
    One function, no per-expert helper: helper calls passing arrays cost more than the work.
    """
    k = experts.shape[1]
    num_experts = counts.shape[1]
    start = np.zeros(num_experts + 1, np.int64)
    fill = np.zeros(num_experts, np.int64)
    most = 0
    for s in range(token_offsets.size - 1):
        most = max(most, (token_offsets[s + 1] - token_offsets[s]) * k)
    flat = np.empty(most, np.int64)
    values = np.empty(most, np.float64)
    scratch = np.empty(_SMALL_GROUP, np.float64)
    for s in range(token_offsets.size - 1):
        lo, hi, cap = token_offsets[s], token_offsets[s + 1], capacity[s]
        for t in range(lo, hi):
            for j in range(k):
                kept_out[t, j] = True
        for e in range(num_experts):
            start[e + 1] = start[e] + (counts[s, e] if counts[s, e] > cap else 0)
            fill[e] = start[e]
        if start[num_experts] == 0:
            continue
        for t in range(lo, hi):
            for j in range(k):
                e = experts[t, j]
                if counts[s, e] > cap:
                    flat[fill[e]] = t * k + j
                    values[fill[e]] = keys[t, j]
                    fill[e] += 1
        for e in range(num_experts):
            a, b = start[e], start[e + 1]
            if b == a:
                continue
            threshold = np.inf
            if 0 < cap <= _SMALL_GROUP and b - a <= _SMALL_GROUP:
                scratch[: b - a] = values[a:b]
                scratch[: b - a].sort()
                threshold = scratch[b - a - cap]
            elif cap > 0:
                threshold = np.partition(values[a:b], b - a - cap)[b - a - cap]
            room = cap
            for i in range(a, b):
                keep = values[i] > threshold
                kept_out[flat[i] // k, flat[i] % k] = keep
                room -= keep
            for i in range(a, b):
                if room > 0 and values[i] == threshold:
                    kept_out[flat[i] // k, flat[i] % k] = True
                    room -= 1


@njit(cache=True)
def _leave_one_out_cdf(arrived, k, cdf_out):
    """cdf_out[e, q] = P(at most k - 1 of the items other than e are set) for independent items
    set with probabilities ``arrived[q, f]`` (Q, E): Poisson-binomial CDFs of every
    leave-one-out set, from prefix and suffix generating polynomials truncated at degree k - 1
    (O(Q E k); used by :mod:`clustersim.routing.inclusion`)."""
    num_points, n = arrived.shape
    prefix = np.empty((n + 1, k))
    suffix = np.empty((n + 1, k))
    for q in range(num_points):
        prefix[0, :] = 0.0
        prefix[0, 0] = 1.0
        suffix[n, :] = 0.0
        suffix[n, 0] = 1.0
        for e in range(n):
            a = arrived[q, e]
            for m in range(k - 1, 0, -1):
                prefix[e + 1, m] = prefix[e, m] * (1.0 - a) + prefix[e, m - 1] * a
            prefix[e + 1, 0] = prefix[e, 0] * (1.0 - a)
            b = n - 1 - e
            a = arrived[q, b]
            for m in range(k - 1, 0, -1):
                suffix[b, m] = suffix[b + 1, m] * (1.0 - a) + suffix[b + 1, m - 1] * a
            suffix[b, 0] = suffix[b + 1, 0] * (1.0 - a)
        for e in range(n):
            total = 0.0
            below = 0.0  # sum_{b <= k-1-a} suffix[e+1, b], built from a = k-1 down to 0
            for a in range(k - 1, -1, -1):
                below += suffix[e + 1, k - 1 - a]
                total += prefix[e, a] * below
            cdf_out[e, q] = total

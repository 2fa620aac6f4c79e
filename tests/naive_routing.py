"""Slow, readable pure-Python references of the routing kernels (clustersim.routing.kernels).

Each function takes plain lists or arrays and returns lists; the kernels must agree with them
exactly on the same inputs (the same drawn uniforms). They follow the documented algorithms
step by step, with no attention to speed. Also here, for the statistical tests: exact
probabilities of ordered top-k picks by enumeration, and a chi-square p-value.
"""

from __future__ import annotations

import itertools
import math

ONE_BELOW = 1.0 - 2.0**-53
TINY = 1e-300
MIN_SCALE = 2.0**-21


def unit(u: float) -> float:
    """u clamped into [0, 1)."""
    return min(max(u, 0.0), ONE_BELOW)


def alias_probabilities(table) -> list[float]:
    """The probability of each item that an alias table (3, n) implies."""
    n = len(table[0])
    probs = [0.0] * n
    for i in range(n):
        probs[i] += table[1][i] / n
        probs[int(table[2][i])] += (1.0 - table[1][i]) / n
    return probs


def widths(table) -> list[float]:
    """Item weights recovered from the cumulative row of a table, as the kernels do."""
    cumulative = list(table[0])
    return [c - (cumulative[i - 1] if i > 0 else 0.0) for i, c in enumerate(cumulative)]


def scan_draw(weights: list[float], u: float, allowed: list[bool]) -> tuple[int, float]:
    """Inverse-CDF draw among allowed items; returns (item, rescaled uniform)."""
    mass = sum(w for w, ok in zip(weights, allowed, strict=True) if ok)
    x = u * mass
    acc, last = 0.0, -1
    for e, (w, ok) in enumerate(zip(weights, allowed, strict=True)):
        if not ok or w <= 0.0:
            continue
        last = e
        if x < acc + w:
            return e, unit((x - acc) / w)
        acc += w
    return last, unit(u)


def alias_draw(table, u: float, allowed: list[bool], max_rejections: int) -> tuple[int, float]:
    """Alias draw, recycling the uniform on a rejection, scanning when giving up."""
    n = len(table[0])
    scale, rejections = 1.0, 0
    while True:
        x = u * n
        column = min(int(x), n - 1)
        f = x - column
        keep = table[1][column]
        if f < keep:
            item, u, branch = column, unit(f / keep), keep
        else:
            item, u, branch = int(table[2][column]), unit((f - keep) / (1.0 - keep)), 1.0 - keep
        if allowed[item]:
            return item, u
        scale *= branch / n
        rejections += 1
        if rejections > max_rejections or scale < MIN_SCALE:
            return scan_draw(widths(table), u, allowed)


def sample_topk(
    table, uniforms, group_of, group_table, group_uniforms, max_rejections
) -> tuple[list[list[int]], list[list[float]]]:
    """Experts and keys per token, as ``kernels._sample_topk`` picks them."""
    num_experts = len(table[0])
    weight = widths(table)
    all_experts, all_keys = [], []
    for t, row in enumerate(uniforms):
        group_ok = [True] * len(group_table[0])
        mass = table[0][-1]
        if len(group_uniforms[t]):
            group_ok = [False] * len(group_table[0])
            mass = 0.0
            for u in group_uniforms[t]:
                g, _ = alias_draw(group_table, u, [not ok for ok in group_ok], max_rejections)
                group_ok[g] = True
                mass += widths(group_table)[g]
        allowed = [group_ok[group_of[e]] for e in range(num_experts)]
        if 2 * len(row) > num_experts:
            experts, keys = _token_by_pool(weight, row, allowed)
        else:
            experts, keys = _token_by_rejection(table, row, allowed, mass, max_rejections)
        all_experts.append(experts)
        all_keys.append(keys)
    return all_experts, all_keys


def _token_by_rejection(table, row, allowed, mass, max_rejections):
    weight = widths(table)
    experts, keys, arrival = [], [], 0.0
    for u in row:
        e, w = alias_draw(table, u, allowed, max_rejections)
        allowed = allowed.copy()
        allowed[e] = False
        experts.append(e)
        arrival -= math.log(max(w, TINY)) / max(mass, weight[e])
        keys.append(-arrival)
        mass -= weight[e]
    return experts, keys


def _token_by_pool(weight, row, allowed):
    pool = [(weight[e], e) for e in range(len(weight)) if allowed[e]]
    mass = 0.0
    for w, _ in pool:
        mass += w
    experts, keys, arrival = [], [], 0.0
    for u in row:
        x = u * mass
        acc, i = 0.0, 0
        while i < len(pool) - 1 and x >= acc + pool[i][0]:
            acc += pool[i][0]
            i += 1
        w_i, e = pool[i]
        w = unit((x - acc) / w_i)
        experts.append(e)
        arrival -= math.log(max(w, TINY)) / max(mass, w_i)
        keys.append(-arrival)
        mass -= w_i
        pool[i] = pool[-1]  # the pool's last expert takes the pick's place
        pool.pop()
    return experts, keys


def count_by_source(experts, token_offsets, num_experts) -> list[list[int]]:
    """counts[s][e]: assignments of source s's tokens to expert e."""
    counts = [[0] * num_experts for _ in range(len(token_offsets) - 1)]
    for s in range(len(token_offsets) - 1):
        for t in range(token_offsets[s], token_offsets[s + 1]):
            for e in experts[t]:
                counts[s][e] += 1
    return counts


def keep_first(experts, token_offsets, capacity) -> list[list[bool]]:
    """Policy "position": each expert keeps its earliest capacity[s] tokens of source s."""
    kept = []
    for s in range(len(token_offsets) - 1):
        seen: dict[int, int] = {}
        for t in range(token_offsets[s], token_offsets[s + 1]):
            kept.append([seen.get(e, 0) < capacity[s] for e in experts[t]])
            for e in experts[t]:
                seen[e] = seen.get(e, 0) + 1
    return kept


def keep_highest(experts, keys, token_offsets, capacity) -> list[list[bool]]:
    """Policy "probs": each expert keeps the capacity[s] highest keys (earlier token on ties)."""
    kept = [[True] * len(row) for row in experts]
    for s in range(len(token_offsets) - 1):
        by_expert: dict[int, list[tuple[float, int, int]]] = {}
        for t in range(token_offsets[s], token_offsets[s + 1]):
            for j, e in enumerate(experts[t]):
                by_expert.setdefault(e, []).append((-keys[t][j], t, j))
        for members in by_expert.values():
            for _, t, j in sorted(members)[capacity[s] :]:
                kept[t][j] = False
    return kept


def dispatch_matrix(counts, ep) -> list[list[int]]:
    """[s][r]: assignments from source s to the experts of EP rank r."""
    per_rank = len(counts[0]) // ep
    return [[sum(row[r * per_rank : (r + 1) * per_rank]) for r in range(ep)] for row in counts]


def ordered_pick_probabilities(weights, k, allowed=None) -> dict[tuple[int, ...], float]:
    """P(the picks are e_1, ..., e_k in this order), sampling without replacement by weight."""
    items = [e for e in range(len(weights)) if allowed is None or allowed[e]]
    total = sum(weights[e] for e in items)
    probs = {}
    for order in itertools.permutations(items, k):
        p, left = 1.0, total
        for e in order:
            p *= weights[e] / left
            left -= weights[e]
        probs[order] = p
    return probs


def node_limited_pick_probabilities(weights, node_of, m, k) -> dict[tuple[int, ...], float]:
    """P(ordered expert picks) when m nodes are first picked by mass, then k of their experts."""
    num_nodes = max(node_of) + 1
    node_mass = [
        sum(w for w, n in zip(weights, node_of, strict=True) if n == g) for g in range(num_nodes)
    ]
    probs: dict[tuple[int, ...], float] = {}
    for nodes, p_nodes in ordered_pick_probabilities(node_mass, m).items():
        allowed = [node_of[e] in nodes for e in range(len(weights))]
        for order, p in ordered_pick_probabilities(weights, k, allowed).items():
            probs[order] = probs.get(order, 0.0) + p_nodes * p
    return probs


def chi2_sf(statistic: float, dof: int) -> float:
    """P(X > statistic) for X ~ chi-square(dof): regularised upper incomplete gamma Q(dof/2, x/2).

    Series for x < a + 1, Lentz's continued fraction otherwise (Numerical Recipes 6.2).
    """
    a, x = dof / 2, statistic / 2
    if x <= 0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1 / a
        ap = a
        while abs(term) > abs(total) * 1e-15:
            ap += 1
            term *= x / ap
            total += term
        return 1 - total * math.exp(log_front)
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_front) * h


def chi_square_p(observed: dict, expected_probs: dict, draws: int) -> float:
    """p-value of observed category counts against expected probabilities."""
    assert set(observed) <= set(expected_probs)
    statistic = sum(
        (observed.get(c, 0) - draws * p) ** 2 / (draws * p) for c, p in expected_probs.items()
    )
    return chi2_sf(statistic, len(expected_probs) - 1)

"""Pipeline schedules (``costs.schedules``) against their definitions and closed forms.

Pure functions, no simulation: every stage runs each (micro-batch, chunk) forward and backward
exactly once, in an order that respects the data dependencies; 1F1B has ``min(p - s - 1, m)``
warm-up forwards and at most ``p - s`` micro-batches in flight; the interleaved order matches
Megatron-Core's ``forward_backward_pipelining_with_interleaving`` on a case written out by hand;
and a unit-time list scheduling of the steps reproduces the bubble closed forms exactly
(rational arithmetic).
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import pytest

from clustersim.costs.schedules import Step, bubble_fraction, stage_steps

CASES = (
    [("gpipe", p, m, 1) for p in (1, 2, 3, 4, 8) for m in (1, 2, p, 2 * p + 1)]
    + [("1f1b", p, m, 1) for p in (1, 2, 3, 4, 8) for m in (1, 2, p, 2 * p + 1)]
    + [("interleaved", p, m, v) for p in (1, 2, 3, 4) for v in (1, 2, 3) for m in (p, 2 * p, 3 * p)]
)


def _ids(case: tuple) -> str:
    schedule, p, m, v = case
    return f"{schedule}-p{p}-m{m}-v{v}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_each_forward_and_backward_exactly_once_backward_after_forward(case):
    schedule, p, m, v = case
    expected = {(mb, c) for mb in range(m) for c in range(v)}
    for stage in range(p):
        steps = stage_steps(schedule, p, m, stage, v)
        assert len(steps) == 2 * m * v
        for kind in ("F", "B"):
            counts = Counter((s.microbatch, s.chunk) for s in steps if s.kind == kind)
            assert set(counts) == expected
            assert set(counts.values()) == {1}
        position = {(s.kind, s.microbatch, s.chunk): i for i, s in enumerate(steps)}
        for mb, c in expected:
            assert position[("F", mb, c)] < position[("B", mb, c)]


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 8, 16])
def test_1f1b_warmup_steady_cooldown(p, m):
    """1F1B = w forwards, (m - w) x (F, B), w backwards, with w = min(p - s - 1, m)."""
    for stage in range(p):
        w = min(p - stage - 1, m)
        expected = [Step("F", i, 0) for i in range(w)]
        for i in range(m - w):
            expected += [Step("F", w + i, 0), Step("B", i, 0)]
        expected += [Step("B", i, 0) for i in range(m - w, m)]
        steps = stage_steps("1f1b", p, m, stage)
        assert steps == expected
        leading_forwards = next((i for i, s in enumerate(steps) if s.kind == "B"), len(steps))
        assert leading_forwards == min(p - stage, m)  # the warm-up plus the first steady F


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
def test_1f1b_at_most_p_minus_s_in_flight(p, m):
    """Micro-batches whose forward ran and backward did not: at most p - s (the memory bound
    of 1F1B), reached when m >= p - s; GPipe holds all m."""
    for stage in range(p):
        for schedule, bound in (("1f1b", min(p - stage, m)), ("gpipe", m)):
            in_flight, peak = 0, 0
            for step in stage_steps(schedule, p, m, stage):
                in_flight += 1 if step.kind == "F" else -1
                peak = max(peak, in_flight)
            assert peak == bound


def _f(mb: int, chunk: int) -> Step:
    return Step("F", mb, chunk)


def _b(mb: int, chunk: int) -> Step:
    return Step("B", mb, chunk)


def test_interleaved_matches_megatron_order_by_hand():
    """p = 2, v = 2, m = 4, written out from Megatron-Core's rules: warm-up
    2(p - s - 1) + (v - 1)p virtual micro-batches; the k-th forward runs chunk (k mod pv) div p
    of micro-batch (k div pv) p + k mod p; backwards run the chunks in reverse."""
    stage0 = [
        _f(0, 0),
        _f(1, 0),
        _f(0, 1),
        _f(1, 1),  # warm-up: 2 * 1 + 1 * 2 = 4
        _f(2, 0),
        _b(0, 1),
        _f(3, 0),
        _b(1, 1),
        _f(2, 1),
        _b(0, 0),
        _f(3, 1),
        _b(1, 0),
        _b(2, 1),
        _b(3, 1),
        _b(2, 0),
        _b(3, 0),  # cool-down
    ]
    stage1 = [
        _f(0, 0),
        _f(1, 0),  # warm-up: 0 + 1 * 2 = 2
        _f(0, 1),
        _b(0, 1),
        _f(1, 1),
        _b(1, 1),
        _f(2, 0),
        _b(0, 0),
        _f(3, 0),
        _b(1, 0),
        _f(2, 1),
        _b(2, 1),
        _f(3, 1),
        _b(3, 1),
        _b(2, 0),
        _b(3, 0),
    ]
    assert stage_steps("interleaved", 2, 4, 0, 2) == stage0
    assert stage_steps("interleaved", 2, 4, 1, 2) == stage1


def test_interleaved_warmup_capped_at_all_forwards():
    """p = 4, v = 2, m = 4: stage 0's warm-up 2*3 + 4 = 10 exceeds the 8 virtual
    micro-batches, so it runs every forward first (current Megatron-Core; older versions did
    this for every stage whenever m == p)."""
    steps = stage_steps("interleaved", 4, 4, 0, 2)
    assert [s.kind for s in steps] == ["F"] * 8 + ["B"] * 8
    last = stage_steps("interleaved", 4, 4, 3, 2)
    assert [s.kind for s in last[:5]] == ["F"] * 5  # warm-up 0 + 4, then the first steady F
    assert last[5].kind == "B"


def test_invalid_arguments():
    with pytest.raises(ValueError, match="divisible"):
        stage_steps("interleaved", 4, 6, 0, 2)
    with pytest.raises(ValueError, match="outside"):
        stage_steps("1f1b", 2, 4, 2)
    with pytest.raises(ValueError, match="unknown schedule"):
        stage_steps("zb-v", 2, 4, 0)


def test_bubble_fraction_values():
    assert bubble_fraction("gpipe", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("1f1b", 8, 32) == pytest.approx(7 / 39)
    assert bubble_fraction("1f1b", 1, 5) == 0.0
    assert bubble_fraction("interleaved", 4, 8, 2) == pytest.approx(3 / 19)
    assert bubble_fraction("interleaved", 8, 16, 3) == pytest.approx(7 / 55)
    assert bubble_fraction("interleaved", 4, 8, 1) == bubble_fraction("1f1b", 4, 8)


def _makespan(schedule: str, p: int, m: int, v: int, t_f: Fraction, t_b: Fraction) -> Fraction:
    """List-schedule every stage's steps in order with exact times: a chunk's forward takes
    t_f / v, its backward t_b / v; communication is free. A forward needs the previous virtual
    stage's forward of the micro-batch, a backward the next virtual stage's backward (the last
    virtual stage: its own forward). Fails if the orders deadlock."""
    orders = [stage_steps(schedule, p, m, s, v) for s in range(p)]
    done: dict[tuple, Fraction] = {}
    position, free = [0] * p, [Fraction(0)] * p
    progress = True
    while progress:
        progress = False
        for s in range(p):
            while position[s] < len(orders[s]):
                step = orders[s][position[s]]
                vstage = step.chunk * p + s
                if step.kind == "F":
                    needs = [("F", step.microbatch, vstage - 1)] if vstage > 0 else []
                elif vstage < p * v - 1:
                    needs = [("B", step.microbatch, vstage + 1)]
                else:
                    needs = [("F", step.microbatch, vstage)]
                if any(n not in done for n in needs):
                    break
                start = max([free[s]] + [done[n] for n in needs])
                free[s] = start + (t_f if step.kind == "F" else t_b) / v
                done[(step.kind, step.microbatch, vstage)] = free[s]
                position[s] += 1
                progress = True
    assert position == [len(o) for o in orders], "the schedule deadlocks"
    return max(free)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_unit_time_makespan_gives_closed_form_bubble(case):
    """With free communication and equal steps the iteration takes (m + p - 1)(t_f + t_b)
    (GPipe, 1F1B) or (m + (p - 1)/v)(t_f + t_b) (interleaved), i.e. the bubble is exactly
    (p - 1)/(m + p - 1), resp. (p - 1)/(v m + p - 1) of it."""
    schedule, p, m, v = case
    for t_f, t_b in ((Fraction(1), Fraction(2)), (Fraction(1), Fraction(1))):
        total = _makespan(schedule, p, m, v, t_f, t_b)
        effective_v = v if schedule == "interleaved" else 1
        assert total == (m + Fraction(p - 1, effective_v)) * (t_f + t_b)
        busy = m * (t_f + t_b)
        closed = bubble_fraction(schedule, p, m, v)
        assert float(1 - busy / total) == pytest.approx(closed, rel=1e-12, abs=1e-15)

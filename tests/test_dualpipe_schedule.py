"""DualPipe's step order (``engine.schedules``) against the DualPipe README's table.

Pure functions, no simulation. A list scheduling of every device's steps with exact times (F,
a full backward B = F + W split into I = F and W where the schedule defers W, F&B for an
overlapped pair, free communication) gives each device an idle time of exactly
``(p/2 - 1)(F&B + B - 3W)`` (the table's bubble) whenever W <= F; every device holds ``p + 1``
chunk micro-batches at its peak (1F1B's stage 0 holds ``p``); each device runs every
(micro-batch, chunk) forward and backward once, micro-batches from both ends.
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustersim.engine.training.schedules import (
    Step,
    dualpipe_bubble,
    dualpipe_position,
    overlapped_pairs,
    stage_steps,
)

CASES = [(p, m) for p in (2, 4, 6, 8) for m in (2 * p, 2 * p + 2, 4 * p)]


def _steps(p: int, m: int) -> list[list[Step]]:
    return [stage_steps("dualpipe", p, m, s) for s in range(p)]


@pytest.mark.parametrize(("p", "m"), CASES)
def test_every_chunk_forward_and_backward_once(p, m):
    for stage, steps in enumerate(_steps(p, m)):
        forwards = Counter((s.microbatch, s.chunk) for s in steps if s.kind == "F")
        backwards = Counter((s.microbatch, s.chunk) for s in steps if s.kind in "BI")
        weights = Counter((s.microbatch, s.chunk) for s in steps if s.kind == "W")
        # chunk 0 runs the first m/2 micro-batches (fed at device 0), chunk 1 the others
        expected = {(mb, int(mb >= m // 2)) for mb in range(m)}
        assert set(forwards) == set(backwards) == expected
        assert set(forwards.values()) == set(backwards.values()) == {1}
        deferred = {(s.microbatch, s.chunk) for s in steps if s.kind == "I"}
        assert weights == Counter(deferred)  # each deferred weight gradient runs once
        at = {(s.kind, s.microbatch): i for i, s in enumerate(steps)}
        for mb, _ in expected:
            back = at.get(("B", mb), at.get(("I", mb)))
            assert at[("F", mb)] < back
            if ("W", mb) in at:
                assert back < at[("W", mb)]
        # W is first in first out over the deferred backwards
        order_i = [s.microbatch for s in steps if s.kind == "I"]
        assert [s.microbatch for s in steps if s.kind == "W"] == order_i
        for i in overlapped_pairs("dualpipe", p, m, stage):
            assert steps[i].kind == "F" and steps[i + 1].kind == "B"
            assert steps[i].chunk != steps[i + 1].chunk  # the two directions


def test_small_case_by_hand():
    """p = 2, m = 4 from DualPipe.step: device 0 (first half, h = 0, a middle device):
    phase 2 F0 F1; phase 4 (i = 0, middle: not overlapped) F0 B1, then F1&B0; phase 6
    B1, then B0 with its weights deferred; phase 8 W."""

    def step(kind: str):
        return lambda mb, chunk: Step(kind, mb, chunk)

    f, b, i, w = (step(k) for k in "FBIW")
    assert stage_steps("dualpipe", 2, 4, 0) == [
        f(0, 0), f(2, 1), f(1, 0), b(2, 1), f(3, 1), b(0, 0), b(3, 1), i(1, 0), w(1, 0),
    ]  # fmt: skip
    assert overlapped_pairs("dualpipe", 2, 4, 0) == [4]
    # device 1 mirrors it: its phase 0 is the pipeline fed at device 1 (chunk 1)
    assert stage_steps("dualpipe", 2, 4, 1) == [
        f(2, 1), f(0, 0), f(3, 1), b(0, 0), f(1, 0), b(2, 1), b(1, 0), i(3, 1), w(3, 1),
    ]  # fmt: skip


def test_invalid_arguments():
    for p, m in ((3, 6), (4, 6), (4, 9), (2, 2)):
        with pytest.raises(ValueError, match="dualpipe needs pp even"):
            stage_steps("dualpipe", p, m, 0)
    with pytest.raises(ValueError, match="dualpipe_bubble"):
        from clustersim.engine.training.schedules import bubble_fraction

        bubble_fraction("dualpipe", 4, 8)


def makespan_and_busy(p: int, m: int, f, b, w, fb) -> tuple[Fraction, list[Fraction]]:
    """List-schedule every device's steps in order: a pair starts when both of its inputs are
    there (DualPipe receives both, then computes) and takes ``fb``; F takes ``f``, B ``b``,
    I ``b - w``, W ``w``. A forward needs the previous position's forward of its pipeline,
    a backward the next position's backward (the last position: its own forward), W its I."""
    orders = _steps(p, m)
    pairs = [set(overlapped_pairs("dualpipe", p, m, s)) for s in range(p)]
    done: dict[tuple, Fraction] = {}
    position, free, busy = [0] * p, [Fraction(0)] * p, [Fraction(0)] * p

    def needs(step: Step, stage: int) -> list[tuple]:
        q = dualpipe_position(p, stage, step.chunk)
        if step.kind == "F":
            return [("F", step.microbatch, q - 1)] if q > 0 else []
        if step.kind == "W":
            return [("B", step.microbatch, q)]
        return [("B", step.microbatch, q + 1)] if q < p - 1 else [("F", step.microbatch, q)]

    progress = True
    while progress:
        progress = False
        for s in range(p):
            while position[s] < len(orders[s]):
                i = position[s]
                group = [i, i + 1] if i in pairs[s] else [i]
                wanted = [n for j in group for n in needs(orders[s][j], s)]
                if any(n not in done for n in wanted):
                    break
                kind = orders[s][i].kind
                duration = fb if len(group) == 2 else {"F": f, "B": b, "I": b - w, "W": w}[kind]
                free[s] = max([free[s]] + [done[n] for n in wanted]) + duration
                busy[s] += duration
                for j in group:
                    step = orders[s][j]
                    key = "B" if step.kind in "BI" else step.kind
                    done[(key, step.microbatch, dualpipe_position(p, s, step.chunk))] = free[s]
                position[s] += len(group)
                progress = True
    assert position == [len(o) for o in orders], "the schedule deadlocks"
    return max(free), busy


@settings(max_examples=40, deadline=None)
@given(
    p=st.sampled_from([2, 4, 6, 8, 10]),
    extra=st.integers(0, 4),
    f=st.integers(2, 8),
    w_share=st.fractions(0, 1),
    overlap=st.fractions(0, 1),
)
def test_bubble_is_the_readme_closed_form(p, extra, f, w_share, overlap):
    """With B = F + W (the input gradients cost a forward), W <= F and F&B between max(F, B)
    (full overlap) and F + B (none), the idle time of the busiest-waiting device is exactly
    (p/2 - 1)(F&B + B - 3W)."""
    m = 2 * p + 2 * extra
    f = Fraction(f)
    w = f * w_share
    b = f + w
    fb = max(f, b) + (f + b - max(f, b)) * overlap
    total, busy = makespan_and_busy(p, m, f, b, w, fb)
    idle = max(total - x for x in busy)
    assert idle == (Fraction(p, 2) - 1) * (fb + b - 3 * w)
    assert float(idle) == pytest.approx(dualpipe_bubble(p, float(fb), float(b), float(w)))


@pytest.mark.parametrize("p", [4, 8])
def test_bubble_against_1f1b_table_row(p):
    """The README's comparison at F = 1, B = 2, W = 1, F&B = F + B (no overlap): DualPipe
    idles (p/2 - 1)(3 + 2 - 3) = p - 2 per device, 1F1B (p - 1)(F + B) = 3(p - 1)."""
    total, busy = makespan_and_busy(p, 2 * p, Fraction(1), Fraction(2), Fraction(1), Fraction(3))
    assert max(total - x for x in busy) == p - 2
    assert p - 2 < 3 * (p - 1)


@pytest.mark.parametrize(("p", "m"), CASES)
def test_activations_held_peak_is_p_plus_one(p, m):
    """Chunk micro-batches whose forward ran and whose backward (B or I) did not: at most
    p + 1 on every device (the README's 'PP + 1'), split p - s of chunk 0 and s + 1 of chunk
    1 at the peak -- 1F1B's p - position for each chunk's model stage."""
    for stage, steps in enumerate(_steps(p, m)):
        held, peak, at_peak = [0, 0], 0, set()
        for step in steps:
            if step.kind == "F":
                held[step.chunk] += 1
            elif step.kind in "BI":
                held[step.chunk] -= 1
            if sum(held) > peak:
                peak, at_peak = sum(held), set()
            if sum(held) == peak:
                at_peak.add(tuple(held))
        assert peak == p + 1
        assert at_peak == {(p - stage, stage + 1)}

"""Pipeline schedules as pure functions: the order of forward/backward steps on each stage.

A step runs one model chunk of one micro-batch in one direction. Chunk ``c`` of stage ``s`` is
virtual stage ``c * p + s``; activations flow forward through virtual stages 0 .. v*p - 1 and
gradients back. Orders follow Megatron-Core (``schedules.py``):

* ``gpipe``: every forward, then every backward;
* ``1f1b``: ``min(p - s - 1, m)`` warm-up forwards, then one forward / one backward, then the
  remaining backwards;
* ``interleaved``: ``v`` chunks per stage, warm-up of ``2 (p - s - 1) + (v - 1) p`` virtual
  micro-batches; the k-th forward runs chunk ``(k mod pv) div p`` of micro-batch
  ``(k div pv) p + k mod p`` (backward: chunks in reverse). Needs ``m`` divisible by ``p``.

With communication free and equal step times the bubble is ``(p-1)/(m+p-1)`` of the iteration for
GPipe and 1F1B and ``(p-1)/(v m + p - 1)`` for the interleaved schedule (each chunk takes 1/v of
the time, so the fill and drain shrink v-fold).
"""

from __future__ import annotations

from typing import Literal, NamedTuple


class Step(NamedTuple):
    """One schedule step: direction, micro-batch, model chunk (0 unless interleaved)."""

    kind: Literal["F", "B"]
    microbatch: int
    chunk: int


def stage_steps(schedule: str, p: int, m: int, stage: int, v: int = 1) -> list[Step]:
    """The ordered steps of pipeline stage ``stage`` (0-based) under ``schedule``."""
    if not 0 <= stage < p:
        raise ValueError(f"stage {stage} outside 0..{p - 1}")
    if schedule == "gpipe":
        return [Step("F", i, 0) for i in range(m)] + [Step("B", i, 0) for i in range(m)]
    if schedule == "1f1b":
        return _one_f_one_b(p, m, stage)
    if schedule == "interleaved":
        return _interleaved(p, m, stage, v)
    raise ValueError(f"unknown schedule {schedule!r}; valid: gpipe, 1f1b, interleaved")


def _one_f_one_b(p: int, m: int, stage: int) -> list[Step]:
    warmup = min(p - stage - 1, m)
    steps = [Step("F", i, 0) for i in range(warmup)]
    for i in range(m - warmup):
        steps += [Step("F", warmup + i, 0), Step("B", i, 0)]
    steps += [Step("B", i, 0) for i in range(m - warmup, m)]
    return steps


def _interleaved(p: int, m: int, stage: int, v: int) -> list[Step]:
    if m % p:
        raise ValueError(f"the interleaved schedule needs micro-batches ({m}) divisible by p ({p})")
    total = m * v
    warmup = min((p - stage - 1) * 2 + (v - 1) * p, total)

    def forward(k: int) -> Step:
        in_group = k % (p * v)
        return Step("F", (k // (p * v)) * p + in_group % p, in_group // p)

    def backward(k: int) -> Step:
        in_group = k % (p * v)
        return Step("B", (k // (p * v)) * p + in_group % p, v - 1 - in_group // p)

    steps = [forward(k) for k in range(warmup)]
    for k in range(total - warmup):
        steps += [forward(warmup + k), backward(k)]
    steps += [backward(k) for k in range(total - warmup, total)]
    return steps


def bubble_fraction(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Closed-form idle fraction of the iteration with free communication and equal steps."""
    if schedule == "interleaved":
        return (p - 1) / (v * m + p - 1)
    return (p - 1) / (m + p - 1)

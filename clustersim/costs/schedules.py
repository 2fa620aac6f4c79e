"""Pipeline schedules as pure functions: the order of forward/backward steps on each stage.

A step runs one model chunk of one micro-batch in one direction. Chunk ``c`` of stage ``s`` is
virtual stage ``c * p + s``; activations flow forward through virtual stages 0 .. v*p - 1 and
gradients back. Orders follow Megatron-Core (``schedules.py``):

* ``gpipe``: every forward, then every backward;
* ``1f1b``: ``min(p - s - 1, m)`` warm-up forwards, then one forward / one backward, then the
  remaining backwards;
* ``interleaved``: ``v`` chunks per stage, warm-up of ``2 (p - s - 1) + (v - 1) p`` virtual
  micro-batches; the k-th forward runs chunk ``(k mod pv) div p`` of micro-batch
  ``(k div pv) p + k mod p`` (backward: chunks in reverse). Needs ``m`` divisible by ``p``;
* ``dualpipe``: DeepSeek's bidirectional pipeline (DeepSeek-V3 technical report Sec. 3.2.1;
  the step order of ``DualPipe.step`` in github.com/deepseek-ai/DualPipe, eight phases, below).
  Device ``s`` holds two model chunks: chunk 0 is model stage ``s`` of the pipeline fed at
  device 0 (micro-batches ``0 .. m/2 - 1``), chunk 1 is model stage ``p - 1 - s`` of the
  pipeline fed at device ``p - 1`` (micro-batches ``m/2 .. m - 1``). Besides ``F`` and ``B``
  (a full backward) it has ``I`` (the backward for the inputs only, its weight gradients
  deferred) and ``W`` (the oldest deferred weight gradients, first in first out), and runs
  forward/backward pairs of different micro-batches as one overlapped ``F&B`` step
  (:func:`overlapped_pairs`). Needs ``p`` even and ``m`` even with ``m >= 2 p``.

With communication free and equal step times the bubble is ``(p-1)/(m+p-1)`` of the iteration for
GPipe and 1F1B and ``(p-1)/(v m + p - 1)`` for the interleaved schedule (each chunk takes 1/v of
the time, so the fill and drain shrink v-fold). DualPipe's bubble (the idle time of each
device) is ``(p/2 - 1)(F&B + B - 3W)`` (its README's table) when a backward for the inputs takes
as long as the forward (B = F + W) and W <= F; every device holds ``p + 1`` chunk micro-batches
at its peak (``p - s`` of chunk 0, ``s + 1`` of chunk 1), 1F1B's ``p`` on stage 0.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

DUALPIPE_RULE = "dualpipe needs pp even and num_microbatches even and at least 2 x pp"


class Step(NamedTuple):
    """One schedule step: direction, micro-batch, model chunk (0 unless interleaved or
    DualPipe). ``B`` is a full backward; ``I`` / ``W`` split one into its input and its
    weight gradients (DualPipe only)."""

    kind: Literal["F", "B", "I", "W"]
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
    if schedule == "dualpipe":
        return _dualpipe(p, m, stage)[0]
    raise ValueError(f"unknown schedule {schedule!r}; valid: gpipe, 1f1b, interleaved, dualpipe")


def overlapped_pairs(schedule: str, p: int, m: int, stage: int, v: int = 1) -> list[int]:
    """Indices ``i`` of the steps of ``stage`` where steps ``i`` (a forward) and ``i + 1`` (a
    backward of another micro-batch) run as one overlapped ``F&B`` step: DualPipe's
    ``_forward_backward_chunk`` calls; empty for the other schedules (whose overlap, if any,
    is the engine's ``overlap_ep_comm`` rule)."""
    if schedule != "dualpipe":
        return []
    return _dualpipe(p, m, stage)[1]


def dualpipe_position(p: int, stage: int, chunk: int) -> int:
    """Model stage (position along its pipeline) of DualPipe chunk ``chunk`` of ``stage``."""
    return stage if chunk == 0 else p - 1 - stage


def dualpipe_valid(p: int, m: int) -> bool:
    """DualPipe's own assertions (``DualPipe.step``): p even, m even and ``m >= 2 p``."""
    return p % 2 == 0 and m > 0 and m % 2 == 0 and m >= 2 * p


def _dualpipe(p: int, m: int, stage: int) -> tuple[list[Step], list[int]]:
    """The steps of device ``stage`` under DualPipe and its overlapped pairs, phase by phase as
    ``DualPipe.step`` runs them (its comments name the phases; ``phase`` 0 is the pipeline fed
    at device 0 on the first half of the devices and the other one on the second half)."""
    if not dualpipe_valid(p, m):
        raise ValueError(f"{DUALPIPE_RULE} (pp {p}, num_microbatches {m})")
    half_p, half_m = p // 2, m // 2
    second = int(stage >= half_p)
    h = min(stage, p - 1 - stage)  # distance from the nearer end
    middle = stage in (half_p - 1, half_p)
    next_f, next_b = [0, 0], [0, 0]  # per chunk: the next micro-batch index
    deferred: list[tuple[int, int]] = []  # weight gradients waiting for a W (FIFO)
    steps: list[Step] = []
    pairs: list[int] = []

    def forward(phase: int) -> None:
        chunk = phase ^ second
        steps.append(Step("F", chunk * half_m + next_f[chunk], chunk))
        next_f[chunk] += 1

    def backward(phase: int, defer_weights: bool = False) -> None:
        chunk = phase ^ second
        mb = chunk * half_m + next_b[chunk]
        next_b[chunk] += 1
        steps.append(Step("I" if defer_weights else "B", mb, chunk))
        if defer_weights:
            deferred.append((mb, chunk))

    def weights() -> None:
        mb, chunk = deferred.pop(0)
        steps.append(Step("W", mb, chunk))

    def forward_backward(phase0: int, phase1: int) -> None:
        pairs.append(len(steps))
        forward(phase0)
        backward(phase1)

    for _ in range(2 * (half_p - h - 1)):  # 1: nF0
        forward(0)
    for _ in range(h + 1):  # 2: nF0F1
        forward(0)
        forward(1)
    for _ in range(half_p - h - 1):  # 3: nB1W1F1 (zero bubble)
        backward(1, defer_weights=True)
        weights()
        forward(1)
    for i in range(half_m - p + h + 1):  # 4 (main): nF0B1F1B0
        if i == 0 and middle:  # DualPipe does not overlap these two, to shorten the bubble
            forward(0)
            backward(1)
        else:
            forward_backward(0, 1)
        forward_backward(1, 0)
    for _ in range(half_p - h - 1):  # 5: nB1F1B0
        backward(1)
        forward_backward(1, 0)
    defer = False
    for i in range(h + 1):  # 6: nB1B0 (the second half defers weight gradients)
        if i == (h + 1) // 2 and h % 2 == 1:
            defer = True
        backward(1, defer)
        if i == (h + 1) // 2 and h % 2 == 0:
            defer = True
        backward(0, defer)
    for _ in range(half_p - h - 1):  # 7: nWB0 (zero bubble)
        weights()
        backward(0, defer_weights=True)
    for _ in range(h + 1):  # 8: nW
        weights()
    assert not deferred
    return steps, pairs


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
    if schedule == "dualpipe":
        raise ValueError("DualPipe's bubble depends on F, B, W and F&B: dualpipe_bubble")
    return (p - 1) / (m + p - 1)


def dualpipe_bubble(p: int, f_and_b: float, b: float, w: float) -> float:
    """DualPipe's idle time per device, ``(p/2 - 1)(F&B + B - 3W)`` (DualPipe README's table;
    exact for this order when B = F + W and W <= F)."""
    return (p / 2 - 1) * (f_and_b + b - 3 * w)

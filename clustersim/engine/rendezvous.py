"""Collectives across lanes: every member arrives, the last arrival fixes the duration, all
members are released together. One shared SimPy event per collective instance, never per byte.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import simpy
from simpy.events import NORMAL


def trigger_at(event: simpy.Event, value: Any, delay_ms: float) -> None:
    """Trigger a pending ``event`` with ``value`` after ``delay_ms`` (what a Timeout does),
    without a second event and a callback."""
    event._ok = True
    event._value = value
    event.env.schedule(event, NORMAL, delay_ms)


class Rendezvous:
    """Meeting points keyed by collective instance (op, group, layer, micro-batch, ...).

    ``arrive`` returns an event that fires when the collective ends; its value is
    ``(start_ms, end_ms, info)`` where ``start_ms`` is the latest ``ready_at`` of the members
    (the slowest member gates everyone) and ``info`` whatever ``timing`` returned besides the
    duration. A member may arrive *before* it is ready (``ready_at`` > now) — a lane that knows
    its compute will end at ``ready_at`` joins at once instead of waiting for a timeout, which
    saves an event per collective; the collective still starts only when everyone is ready.
    A member may also arrive *after* it was ready (``ready_at`` < now): a process that drives
    several lanes waits for the slowest of them, but each lane keeps its own clock, so the
    start is the latest ``ready_at``, never the arrival time. The shared event then fires no
    earlier than now; its value, not the firing time, is what members use.
    """

    def __init__(self, env: simpy.Environment):
        self.env = env
        self._open: dict[Any, tuple[simpy.Event, list[Any], int]] = {}
        self.completed = 0

    def arrive(
        self,
        key: Any,
        expected: int,
        ready_at: float,
        timing: Callable[..., tuple[float, Any]],
        *args: Any,
    ) -> simpy.Event:
        """Join collective ``key`` of ``expected`` members; ``timing(payloads, *args)`` gives
        ``(duration_ms, info)`` once everyone is there."""
        entry = self._open.get(key)
        if entry is None:
            entry = (self.env.event(), [])
            self._open[key] = entry
        done, ready = entry
        ready.append(ready_at)
        if len(ready) == expected:
            del self._open[key]
            duration_ms, info = timing(ready, *args)
            start = max(ready)
            end = start + duration_ms
            trigger_at(done, (start, end, info), max(0.0, end - self.env.now))
            self.completed += 1
        return done

    @property
    def pending(self) -> int:
        """Collectives still waiting for members (non-zero at the end means a deadlock)."""
        return len(self._open)

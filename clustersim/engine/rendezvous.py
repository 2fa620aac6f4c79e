"""Collectives across lanes: every member arrives, the last arrival fixes the duration, all
members are released together. One shared SimPy event per collective instance, never per byte.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import simpy


class Rendezvous:
    """Meeting points keyed by collective instance (op, group, layer, micro-batch, ...).

    ``arrive`` returns an event that fires when the collective ends; its value is
    ``(start_ms, end_ms, info)`` where ``start_ms`` is the last arrival (the slowest member gates
    everyone) and ``info`` whatever ``timing`` returned besides the duration.
    """

    def __init__(self, env: simpy.Environment):
        self.env = env
        self._open: dict[Any, tuple[simpy.Event, list[Any], int]] = {}
        self.completed = 0

    def arrive(
        self,
        key: Any,
        expected: int,
        payload: Any,
        timing: Callable[[list[Any]], tuple[float, Any]],
    ) -> simpy.Event:
        """Join collective ``key`` of ``expected`` members; ``timing(payloads)`` gives
        ``(duration_ms, info)`` once everyone is there."""
        entry = self._open.get(key)
        if entry is None:
            entry = (self.env.event(), [], expected)
            self._open[key] = entry
        done, payloads, _ = entry
        payloads.append(payload)
        if len(payloads) == expected:
            del self._open[key]
            duration_ms, info = timing(payloads)
            start = self.env.now
            value = (start, start + duration_ms, info)
            release = self.env.timeout(duration_ms)
            release.callbacks.append(lambda _event: done.succeed(value))
            self.completed += 1
        return done

    @property
    def pending(self) -> int:
        """Collectives still waiting for members (non-zero at the end means a deadlock)."""
        return len(self._open)

"""The serving engine's event loop: a heap of timed callbacks, in SimPy's order.

The serving simulation needs only timeouts with a callback and "run this now, after what is
already due now"; a general process framework costs more than the engine's own work per
event. :class:`EventLoop` keeps SimPy's semantics exactly, so that the engine gives the same
results as it did as SimPy processes: an entry due at ``now + delay`` (computed as that sum,
like ``simpy.Environment.timeout``), ordered by time, then priority (``URGENT`` before
``NORMAL``: process starts before timeouts), then the order in which entries were scheduled.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from itertools import count

URGENT = 0
NORMAL = 1


class EventLoop:
    """Timed callbacks (module docstring)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, int, Callable[[], None]]] = []
        self._order = count()

    def call_later(self, delay: float, fn: Callable[[], None], priority: int = NORMAL) -> None:
        """Call ``fn()`` at ``now + delay`` (``delay >= 0``)."""
        heapq.heappush(self._queue, (self.now + delay, priority, next(self._order), fn))

    def call_soon(self, fn: Callable[[], None], priority: int = NORMAL) -> None:
        """Call ``fn()`` at ``now``, after the entries already due now."""
        heapq.heappush(self._queue, (self.now, priority, next(self._order), fn))

    def call_soon_or_now(self, fn: Callable[[], None]) -> None:
        """:meth:`call_soon`, or ``fn()`` at once when no other entry is due now (the same
        order: it would be the next entry run)."""
        queue = self._queue
        if queue and queue[0][0] <= self.now:
            heapq.heappush(queue, (self.now, NORMAL, next(self._order), fn))
        else:
            fn()

    def advance_if_next(self, delay: float) -> bool:
        """Whether an entry due at ``now + delay`` would be the next one run (no entry is
        due at or before that time); if so, ``now`` moves there and the caller runs what
        the entry would have (the same order, without the entry)."""
        at = self.now + delay
        queue = self._queue
        if queue and queue[0][0] <= at:
            return False
        self.now = at
        return True

    def run(self) -> None:
        """Run until no entry is left; an exception of a callback stops the loop."""
        queue, pop = self._queue, heapq.heappop
        while queue:
            self.now, _, _, fn = pop(queue)
            fn()

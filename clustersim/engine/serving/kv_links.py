"""KV transfers sharing ports: processor sharing per port, max-min fair across ports.

A disaggregated deployment's KV transfer (:mod:`clustersim.engine.serving.disagg`) leaves a
prefill replica through one *port* (that replica's NVLink port, or its network port when the
transfer crosses NVLink domains) and enters a decode replica through one (the same kinds).
Every transfer on a port has that port's bandwidth when alone (a port's kind fixes its link),
so the state works in fractions of full speed: a transfer has ``work_ms`` of data time left at
full speed and progresses at ``rate`` (0 < rate <= 1) of it; a port carries at most full speed
in all, ``sum(rate) <= 1`` over the transfers on it. Rates are the max-min fair allocation
(progressive filling: every transfer rises at the same pace until a port is full or it runs at
full speed; those on a full port stop rising), the allocation
:func:`clustersim.engine.flows.max_min_rates` computes for unit link weights and capacities.

Rates change only when a transfer starts or its data ends (one re-solve per such event, over
the transfers in flight; no per-token work). A transfer alone on its ports runs at exactly
full speed (rate 1.0), so its data ends ``work_ms`` after its start, as an unshared link gives.
Transfers whose data has ended leave lazily, at the next start or :meth:`PortSharing.expire`.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from clustersim.engine.flows import max_min_rates

EPS_MS = 1e-9  # data ending within this of now has ended (float sums of rate x time)


def max_min_fractions(ports_of: dict[int, tuple[Hashable, ...]]) -> dict[int, float]:
    """Max-min fair fractions of full speed for transfers ``{id: ports}``, every port of
    capacity 1, every transfer at most 1: the flow solver's progressive filling
    (:func:`clustersim.engine.flows.max_min_rates`) with unit weights and capacities."""
    index: dict[Hashable, int] = {}
    for ports in ports_of.values():
        for port in ports:
            index.setdefault(port, len(index))
    weights = np.zeros((len(ports_of), len(index)))
    for row, ports in enumerate(ports_of.values()):
        weights[row, [index[p] for p in ports]] = 1.0
    rates = max_min_rates(weights, np.ones(len(ports_of)), np.ones(len(index)))
    return {tid: float(rate) for tid, rate in zip(ports_of, rates, strict=True)}


class _Transfer:
    __slots__ = ("ports", "left_ms", "rate", "data_end_ms", "full_speed")

    def __init__(self, ports: tuple[Hashable, ...], work_ms: float, now_ms: float):
        self.ports = ports
        self.left_ms = work_ms  # data time left at full speed, as of PortSharing.since_ms
        self.rate = 0.0
        self.data_end_ms = now_ms + work_ms
        self.full_speed = True  # ran at rate 1.0 since it started


class PortSharing:
    """The transfers in flight over shared ports and their rates (module docstring)."""

    def __init__(self) -> None:
        self.active: dict[int, _Transfer] = {}
        self.since_ms = 0.0

    def start(
        self, now_ms: float, tid: int, work_ms: float, ports: tuple[Hashable, ...]
    ) -> list[int]:
        """Transfer ``tid`` starts at ``now_ms`` with ``work_ms`` of data time at full speed
        over ``ports``. Returns the transfers whose data end moved (``tid`` among them)."""
        self._advance(now_ms)
        self._drop_ended(now_ms)
        self.active[tid] = _Transfer(ports, max(work_ms, 0.0), now_ms)
        return self._resolve(now_ms, new=tid)

    def expire(self, now_ms: float) -> list[int]:
        """Transfers whose data ended by ``now_ms`` leave their ports; returns those whose
        data end moved as the others speed up."""
        self._advance(now_ms)
        if not self._drop_ended(now_ms):
            return []
        return self._resolve(now_ms)

    def data_end_ms(self, tid: int) -> float:
        """When ``tid``'s last byte leaves at its present rate."""
        return self.active[tid].data_end_ms

    def full_speed(self, tid: int) -> bool:
        """Whether ``tid`` has run at full speed since it started (its data end is then
        exactly its start + work)."""
        return self.active[tid].full_speed

    def next_change_ms(self) -> float | None:
        """The earliest data end that changes another transfer's rate: the earliest data end
        while any transfer runs below full speed; None when none does (then an ending
        transfer frees nothing anyone waits for)."""
        if all(t.rate >= 1.0 for t in self.active.values()):
            return None
        return min(t.data_end_ms for t in self.active.values())

    # ---- internals ---------------------------------------------------------------------------
    def _advance(self, now_ms: float) -> None:
        elapsed = now_ms - self.since_ms
        if elapsed > 0.0:
            for t in self.active.values():
                t.left_ms = max(0.0, t.left_ms - t.rate * elapsed)
        self.since_ms = max(self.since_ms, now_ms)

    def _drop_ended(self, now_ms: float) -> bool:
        ended = [tid for tid, t in self.active.items() if t.data_end_ms <= now_ms + EPS_MS]
        for tid in ended:
            del self.active[tid]
        return bool(ended)

    def _resolve(self, now_ms: float, new: int | None = None) -> list[int]:
        rates = max_min_fractions({tid: t.ports for tid, t in self.active.items()})
        moved = []
        for tid, t in self.active.items():
            rate = rates[tid]
            if tid != new and rate == t.rate:
                continue
            t.rate = rate
            if rate < 1.0:
                t.full_speed = False
            if not (tid == new and rate >= 1.0):  # a newcomer at full speed: start + work
                t.data_end_ms = now_ms + t.left_ms / rate
            moved.append(tid)
        return moved

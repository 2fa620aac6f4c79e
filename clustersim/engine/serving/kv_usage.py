"""KV-cache use over time: the blocks each replica holds, sampled where its batch changes.

An engine appends one *segment* per member replica each time it commits a step or a run of
decode steps (``Engine._commit``; nothing per token): the replica, the round's start and end
(ms) and the blocks in use at its start (after the step's blocks were allocated) and at its
end (before the finished requests' blocks are freed). Within a segment the use is taken to
grow linearly from the first figure to the second (a run of decode steps adds a block per
request every ``block_size`` tokens: the same approximation as the engine's
``kv_area``, whose integral these segments reproduce); between segments it changes at once
(blocks freed at a commit, allocated at the next step). A replica whose engine is idle holds
no segment: the metrics count that time as empty (held blocks of a disaggregated prefill
replica whose engine idles while their transfer runs are not counted, as in ``kv_area``).

Recording is off unless asked for (:func:`record_kv_usage` before ``run``, then
:func:`collect_kv_usage`): the engines test one attribute per commit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class KVUsage:
    """KV-cache blocks in use over time: one row per segment (module docstring), with the
    replica's global index (a disaggregated run: the prefill pool's replicas first), and the
    blocks of every replica's cache."""

    replica: np.ndarray  # int32 per segment
    start_ms: np.ndarray  # float64 per segment
    end_ms: np.ndarray  # float64 per segment
    used_start: np.ndarray  # int64 per segment: blocks in use at the segment's start
    used_end: np.ndarray  # int64 per segment: ... at its end (before freeing)
    blocks: np.ndarray  # int64 per replica: blocks of its KV cache

    @classmethod
    def from_rows(cls, rows: list[tuple], blocks: np.ndarray, offset: int = 0) -> KVUsage:
        """From the engines' ``(replica, start_ms, end_ms, used_start, used_end)`` tuples
        (replica indices shifted by ``offset``)."""
        if rows:
            replica, start, end, used0, used1 = zip(*rows, strict=True)
        else:
            replica = start = end = used0 = used1 = ()
        return cls(
            np.asarray(replica, dtype=np.int32) + np.int32(offset),
            np.asarray(start, dtype=np.float64),
            np.asarray(end, dtype=np.float64),
            np.asarray(used0, dtype=np.int64),
            np.asarray(used1, dtype=np.int64),
            np.asarray(blocks, dtype=np.int64),
        )

    @classmethod
    def concat(cls, parts: list[KVUsage]) -> KVUsage:
        """The segments of several pools (already numbered globally), in pool order."""
        return cls(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("replica", "start_ms", "end_ms", "used_start", "used_end", "blocks")
            )
        )

    @property
    def num_segments(self) -> int:
        return int(self.replica.size)

    def utilization_pct(self) -> tuple[np.ndarray, np.ndarray]:
        """Per segment: the share of its replica's blocks in use at its start and end (%)."""
        cap = self.blocks[self.replica].astype(np.float64)
        return 100 * self.used_start / cap, 100 * self.used_end / cap


def _pools(sim) -> list[tuple[object, int, int, int]]:
    """(holder of ``kv_series``, first global replica, blocks per replica, replicas) of each
    pool of ``sim`` (a colocated simulation is its own single pool)."""
    prefill, decode = getattr(sim, "prefill", None), getattr(sim, "decode", None)
    if prefill is None or decode is None:
        return [(sim, 0, sim.kv.num_blocks, len(sim.schedulers))]
    first = len(prefill.schedulers)
    return [
        (prefill, 0, prefill.kv.num_blocks, first),
        (decode, first, decode.kv.num_blocks, len(decode.schedulers)),
    ]


def record_kv_usage(sim) -> None:
    """Make the engines of ``sim`` (a ``ServingSim`` or ``DisaggregatedSim``, before
    ``run``) record their KV-cache segments."""
    for holder, *_ in _pools(sim):
        holder.kv_series = []


def collect_kv_usage(sim) -> KVUsage | None:
    """The segments ``sim`` recorded (after ``run``); None when it did not record."""
    parts = []
    for holder, first, blocks, replicas in _pools(sim):
        rows = holder.kv_series
        if rows is None:
            return None
        parts.append(KVUsage.from_rows(rows, np.full(replicas, blocks), first))
    return parts[0] if len(parts) == 1 else KVUsage.concat(parts)

"""Buffered event rows in numpy columns: what the engine did, on which lane, when.

The engine appends one row per compute op or collective of a lane (a TP group driven in
lockstep). Rows go into preallocated numpy columns that double when full; appending costs one
Python call, never a dict per row. Metrics (``analysis.metrics``) read the columns; an optional
``sink`` (the trace writer) receives every chunk of columns as it is frozen. Per-GPU
differences inside a lane (expert GEMMs of unequal size) are kept as a per-rank idle
adjustment, so the metrics still speak of every GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

import numpy as np


class Kind(IntEnum):
    """Row kinds. Blocking communication stalls the lane's compute; async overlaps it."""

    COMPUTE = 0
    COMM = 1
    COMM_ASYNC = 2


class Op(IntEnum):
    """Op codes of event rows (names appear in traces and reports)."""

    ATTN_FWD = 0
    ATTN_BWD = 1
    MLP_FWD = 2
    MLP_BWD = 3
    EXPERT_FWD = 4
    EXPERT_BWD = 5
    LOGITS_FWD = 6
    LOGITS_BWD = 7
    OPTIMIZER = 8
    TP_COMM = 9
    A2A_DISPATCH = 10
    A2A_COMBINE = 11
    ETP_COMM = 12
    P2P_SEND = 13
    GRAD_REDUCE = 14
    EXPERT_GRAD_REDUCE = 15
    PARAM_GATHER = 16
    RECOMPUTE = 17


_COLUMNS = {
    "lane": np.int32,
    "kind": np.int8,
    "op": np.int16,
    "start_ms": np.float64,
    "end_ms": np.float64,
    "layer": np.int32,
    "microbatch": np.int32,
    "bytes": np.float64,
}


class Recorder:
    """Append-only event rows: tuples in a list, frozen into numpy column chunks of
    ``chunk_rows`` rows (one list append per row is the cheapest thing Python can do)."""

    def __init__(self, world_size: int, chunk_rows: int = 1 << 16):
        self._rows: list[tuple] = []
        self._chunks: list[dict[str, np.ndarray]] = []
        self._chunk_rows = chunk_rows
        self._frozen = 0
        self.rank_idle_ms = np.zeros(world_size)  # lane compute time a rank spent waiting
        self.sink: Callable[[dict[str, np.ndarray]], None] | None = None  # gets each chunk

    @property
    def size(self) -> int:
        """Rows recorded."""
        return self._frozen + len(self._rows)

    def add(
        self,
        lane: int,
        kind: int,
        op: int,
        start_ms: float,
        end_ms: float,
        layer: int = -1,
        microbatch: int = -1,
        nbytes: float = 0.0,
    ) -> None:
        """Append one row."""
        rows = self._rows
        rows.append((lane, kind, op, start_ms, end_ms, layer, microbatch, nbytes))
        if len(rows) >= self._chunk_rows:
            self._freeze()

    def _freeze(self) -> None:
        if not self._rows:
            return
        table = np.array(self._rows, dtype=np.float64)
        chunk = {name: table[:, i].astype(dtype)
                 for i, (name, dtype) in enumerate(_COLUMNS.items())}  # fmt: skip
        self._chunks.append(chunk)
        self._frozen += len(self._rows)
        self._rows = []
        if self.sink is not None:
            self.sink(chunk)

    def flush(self) -> None:
        """Freeze the pending rows (handing them to the sink)."""
        self._freeze()

    def columns(self) -> dict[str, np.ndarray]:
        """Every row so far, one numpy array per column."""
        self._freeze()
        if not self._chunks:
            return {name: np.empty(0, dtype) for name, dtype in _COLUMNS.items()}
        if len(self._chunks) > 1:
            merged = {name: np.concatenate([c[name] for c in self._chunks]) for name in _COLUMNS}
            self._chunks = [merged]
        return self._chunks[0]

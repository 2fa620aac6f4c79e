"""Buffered event rows in numpy columns: what the engine did, on which lane, when.

The engine appends one row per compute op or collective of a lane (a TP group driven in
lockstep). Rows go into preallocated numpy columns that double when full; appending costs one
Python call, never a dict per row. Metrics (``analysis.metrics``) and the trace writer read
the columns. Per-GPU differences inside a lane (expert GEMMs of unequal size) are kept as a
per-rank idle adjustment, so the metrics still speak of every GPU.
"""

from __future__ import annotations

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
    """Append-only numpy columns of event rows, plus per-rank compute adjustments."""

    def __init__(self, world_size: int, capacity: int = 1 << 14):
        self._cols = {name: np.empty(capacity, dtype) for name, dtype in _COLUMNS.items()}
        self.size = 0
        self.rank_idle_ms = np.zeros(world_size)  # lane compute time a rank spent waiting

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
        i = self.size
        if i == len(self._cols["lane"]):
            self._grow()
        cols = self._cols
        cols["lane"][i] = lane
        cols["kind"][i] = kind
        cols["op"][i] = op
        cols["start_ms"][i] = start_ms
        cols["end_ms"][i] = end_ms
        cols["layer"][i] = layer
        cols["microbatch"][i] = microbatch
        cols["bytes"][i] = nbytes
        self.size = i + 1

    def _grow(self) -> None:
        for name, col in self._cols.items():
            bigger = np.empty(2 * len(col), col.dtype)
            bigger[: len(col)] = col
            self._cols[name] = bigger

    def columns(self) -> dict[str, np.ndarray]:
        """Views of the filled part of every column."""
        return {name: col[: self.size] for name, col in self._cols.items()}

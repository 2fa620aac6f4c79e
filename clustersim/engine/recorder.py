"""Buffered event rows in numpy columns: what the engine did, on which lane, when.

The engine appends one row per compute op or collective of a lane (a TP group driven in
lockstep). A cohort of lanes that meet in every all-to-all appends one *block* per op: the
rows of all its lanes at once, as arrays of start and end times (``add_block``; ``add`` is a
block of one row). Blocks are frozen into numpy column chunks of about ``chunk_rows`` rows;
appending costs one Python call, never a dict per row. Metrics (``analysis.metrics``) read
the columns; an optional ``sink`` (the trace writer) receives every chunk of columns as it is
frozen. Per-GPU differences inside a lane (expert GEMMs of unequal size) are kept as a
per-rank idle adjustment, so the metrics still speak of every GPU.
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
    CP_COMM = 18  # ring attention of context parallelism: K/V blocks around the CP group


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
    """Append-only event rows: blocks of rows as arrays, frozen in recording order into numpy
    column chunks of about ``chunk_rows`` rows."""

    def __init__(
        self,
        world_size: int,
        chunk_rows: int = 1 << 16,
        sink: Callable[[dict[str, np.ndarray]], None] | None = None,
    ):
        self._blocks: list[tuple] = []
        self._block_rows = 0
        self._chunks: list[dict[str, np.ndarray]] = []
        self._chunk_rows = chunk_rows
        self._frozen = 0
        self.rank_idle_ms = np.zeros(world_size)  # lane compute time a rank spent waiting
        self.sink = sink  # gets each chunk of columns as it is frozen (e.g. a trace writer)

    @property
    def size(self) -> int:
        """Rows recorded."""
        return self._frozen + self._block_rows

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
        self.add_block(
            np.array([lane], np.int32),
            kind,
            op,
            np.array([start_ms]),
            np.array([end_ms]),
            layer,
            microbatch,
            nbytes,
        )

    def add_block(
        self,
        lanes: np.ndarray,
        kind: int,
        op: int,
        start_ms: np.ndarray,
        end_ms: np.ndarray,
        layer: int = -1,
        microbatch: int = -1,
        nbytes: float | np.ndarray = 0.0,
    ) -> None:
        """Append one row per lane of ``lanes``: the same op, per-lane start and end times
        (arrays of the same length) and bytes (one value for all, or an array)."""
        self._blocks.append((lanes, kind, op, start_ms, end_ms, layer, microbatch, nbytes))
        self._block_rows += len(lanes)
        if self._block_rows >= self._chunk_rows:
            self._freeze()

    def _freeze(self) -> None:
        blocks = self._blocks
        if not blocks:
            return
        counts = np.fromiter((len(b[0]) for b in blocks), np.int64, len(blocks))
        scalars = np.array([(b[1], b[2], b[5], b[6]) for b in blocks], dtype=np.int64)
        nbytes = np.repeat(
            np.fromiter(
                (0.0 if isinstance(b[7], np.ndarray) else b[7] for b in blocks),
                np.float64,
                len(blocks),
            ),
            counts,
        )
        offsets = np.concatenate(([0], np.cumsum(counts)))
        for i, b in enumerate(blocks):
            if isinstance(b[7], np.ndarray):
                nbytes[offsets[i] : offsets[i + 1]] = b[7]
        chunk = {
            "lane": np.concatenate([b[0] for b in blocks]).astype(np.int32),
            "kind": np.repeat(scalars[:, 0], counts).astype(np.int8),
            "op": np.repeat(scalars[:, 1], counts).astype(np.int16),
            "start_ms": np.concatenate([b[3] for b in blocks]).astype(np.float64),
            "end_ms": np.concatenate([b[4] for b in blocks]).astype(np.float64),
            "layer": np.repeat(scalars[:, 2], counts).astype(np.int32),
            "microbatch": np.repeat(scalars[:, 3], counts).astype(np.int32),
            "bytes": nbytes,
        }
        self._chunks.append(chunk)
        self._frozen += int(offsets[-1])
        self._blocks, self._block_rows = [], 0
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


class Tally(Recorder):
    """A recorder that keeps no rows, only their count and the per-rank idle adjustment: for
    a pass whose rows nobody reads (the shared-link model's first pass, which needs only the
    iteration's timing and its flows)."""

    def add_block(
        self,
        lanes: np.ndarray,
        kind: int,
        op: int,
        start_ms: np.ndarray,
        end_ms: np.ndarray,
        layer: int = -1,
        microbatch: int = -1,
        nbytes: float | np.ndarray = 0.0,
    ) -> None:
        """Count the block's rows; keep nothing."""
        self._block_rows += len(lanes)

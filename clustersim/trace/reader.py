"""Trace reader: opens a trace, checks that it is a complete clustersim trace of a version it
understands, and hands out record batches (all of them, or one at a time) with bounded memory.

Every problem with the file (missing, not Arrow, truncated, damaged, foreign, newer version,
incomplete) raises :class:`TraceError` with one message naming the file and what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from clustersim.spec import Plan, PlanError, plan_from_dict
from clustersim.trace import schema as S


class TraceError(Exception):
    """A trace file that cannot be used (the message says which and why)."""


class TraceReader:
    """An open trace file. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = None
        self._projected: dict[tuple[str, ...], pa.ipc.RecordBatchFileReader] = {}
        if not self.path.exists():
            raise TraceError(f"{self.path}: file not found")
        if self.path.is_dir():
            raise TraceError(f"{self.path}: is a directory, expected a trace file (.arrow)")
        try:
            self._file = pa.OSFile(str(self.path), "rb")
            self._reader = pa.ipc.open_file(self._file)
        except (pa.ArrowException, OSError) as exc:
            self.close()
            raise TraceError(f"{self.path}: not a complete Arrow IPC file (truncated, damaged or "
                             f"another format): {_short(exc)}") from None  # fmt: skip
        try:
            self._check_schema(self._reader.schema)
            self._index = self._read_index()
        except TraceError:
            self.close()
            raise
        self.metadata = self._decode(self._reader.schema.metadata)

    # ---- checks ----------------------------------------------------------------------------
    def _check_schema(self, found: pa.Schema) -> None:
        meta = found.metadata or {}
        if S.META_VERSION not in meta:
            raise TraceError(f"{self.path}: an Arrow file, but not a clustersim trace (no "
                             f"'{S.META_VERSION.decode()}' in its metadata)")  # fmt: skip
        try:
            version = int(meta[S.META_VERSION])
        except ValueError:
            raise TraceError(f"{self.path}: unreadable trace version "
                             f"{meta[S.META_VERSION]!r}") from None  # fmt: skip
        if version > S.VERSION:
            raise TraceError(f"{self.path}: trace format version {version} was written by a newer "
                             f"clustersim; this one reads versions up to {S.VERSION} (upgrade "
                             f"clustersim)")  # fmt: skip
        if version < 1 or not found.remove_metadata().equals(S.schema()):
            raise TraceError(f"{self.path}: columns do not match trace format version {version} "
                             f"(damaged or not written by clustersim)")  # fmt: skip
        self.version = version

    def _read_index(self) -> np.ndarray:
        n = self._reader.num_record_batches
        last = self._get(n - 1) if n else None
        if last is None or last.num_rows == 0 or _names(last, "op")[-1] != "batch_index":
            raise TraceError(f"{self.path}: incomplete trace (no batch index at its end; the run "
                             f"that wrote it did not finish)")  # fmt: skip
        self.summary = last
        index = np.asarray(last.column("values")[last.num_rows - 1].values, dtype=np.float64)
        if len(index) != n - 1:
            raise TraceError(f"{self.path}: damaged trace (batch index lists {len(index)} batches, "
                             f"the file has {n - 1})")  # fmt: skip
        return index

    def _decode(self, meta: dict[bytes, bytes]) -> dict[str, Any]:
        try:
            return {
                "version": self.version,
                "plan": json.loads(meta[S.META_PLAN]),
                "seed": int(meta[S.META_SEED]),
                "run": json.loads(meta[S.META_RUN]),
            }
        except (KeyError, ValueError) as exc:
            raise TraceError(f"{self.path}: damaged trace metadata ({_short(exc)})") from None

    # ---- access ----------------------------------------------------------------------------
    @property
    def num_batches(self) -> int:
        """Record batches of rows (the batch index not counted)."""
        return len(self._index)

    @property
    def batch_min_start_s(self) -> np.ndarray:
        """Earliest ``start_s`` of the timed rows of each batch (NaN for batches without)."""
        return self._index

    def summary_rows(self, op: str) -> list[dict[str, Any]]:
        """The ``summary`` rows with this op (from the last batch), as dicts."""
        ops = _names(self.summary, "op")
        return [self.summary.slice(i, 1).to_pylist()[0] for i, name in enumerate(ops) if name == op]

    def _get(self, i: int, reader: pa.ipc.RecordBatchFileReader | None = None) -> pa.RecordBatch:
        try:
            return (reader or self._reader).get_batch(i)
        except (pa.ArrowException, OSError) as exc:
            raise TraceError(f"{self.path}: damaged trace (record batch {i} unreadable: "
                             f"{_short(exc)})") from None  # fmt: skip

    def _columns_reader(self, columns: tuple[str, ...]) -> pa.ipc.RecordBatchFileReader:
        """A second view of the file that reads only ``columns`` from disk (in schema order)."""
        reader = self._projected.get(columns)
        if reader is None:
            try:
                fields = sorted(S.COLUMNS.index(c) for c in set(columns))
            except ValueError:
                raise KeyError(f"unknown trace column in {list(columns)}") from None
            options = pa.ipc.IpcReadOptions(included_fields=fields, use_threads=False)
            try:
                if self._file is None:
                    raise OSError("the reader is closed")
                reader = pa.ipc.open_file(self._file, options=options)
            except (pa.ArrowException, OSError) as exc:
                raise TraceError(f"{self.path}: damaged trace ({_short(exc)})") from None
            self._projected[columns] = reader
        return reader

    def batch(self, i: int, columns: Sequence[str] | None = None) -> pa.RecordBatch:
        """Record batch ``i`` (0 <= i < num_batches), optionally only some columns (only those
        are read from the file)."""
        if columns is None:
            return self._get(i)
        columns = tuple(columns)
        batch = self._get(i, self._columns_reader(columns))
        return batch if batch.schema.names == list(columns) else batch.select(list(columns))

    def batches(self, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Every record batch in file order (one in memory at a time)."""
        for i in range(self.num_batches):
            yield self.batch(i, columns)

    def plan(self) -> Plan:
        """The resolved plan the trace was recorded with."""
        try:
            return plan_from_dict(self.metadata["plan"], f"{self.path} (recorded plan)")
        except PlanError as exc:
            raise TraceError(exc.render()) from None

    def close(self) -> None:
        """Release the file."""
        self._projected.clear()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _names(batch: pa.RecordBatch, column: str) -> list[str]:
    return batch.column(column).to_pylist()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

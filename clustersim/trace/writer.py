"""Streaming, atomic trace writer.

:class:`TraceWriter` is a context manager. Event rows arrive as numpy column chunks and are
written at once as Arrow record batches; the few other rows (workload, routing, summary) are
buffered and written in batches of ``batch_rows``. Memory stays bounded by one batch whatever
the run's length.

The file is written through :func:`clustersim.spec.outputs.atomic_output`: a unique temporary
name in the target's directory (``tempfile.mkstemp``; concurrent writers of one path never
share it), fsync-ed and renamed to its final name only when the block exits normally; on any
exception (``KeyboardInterrupt`` and the CLI's SIGTERM included) the temporary file is removed
and the exception propagates. A target that is a directory, FIFO or device is refused
(:class:`~clustersim.spec.outputs.OutputError`) before anything is opened.

The last record batch holds the ``summary`` rows and, last, the
*batch index*: the earliest ``start_s`` of the timed rows of every earlier batch, which lets
readers merge batches into time order with bounded memory; a file without it is incomplete.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from clustersim.spec.outputs import atomic_output, temp_files
from clustersim.trace import schema as S

_INT32 = np.int32


def partial_files(path: str | Path) -> list[Path]:
    """The temporary files of unfinished writers of ``path`` (empty once they have ended)."""
    return temp_files(path)


class TraceWriter:
    """Write one trace file: ``with TraceWriter(path, metadata) as w: w.write_events(...)``."""

    def __init__(self, path: str | Path, metadata: dict[bytes, bytes], batch_rows: int = 1 << 16):
        self.path = Path(path)
        self.partial: Path | None = None  # the temporary file, while writing
        self._output = None
        metadata = {k: v for k, v in metadata.items() if k != S.META_CHECKSUM}
        if int(metadata.get(S.META_VERSION, S.VERSION)) >= 2:
            metadata[S.META_CHECKSUM] = S.metadata_checksum(metadata)
            self._checksums = True
        else:  # a version-1 file (tests of old files) has no checksums
            self._checksums = False
        self._schema = S.schema(metadata)
        self._batch_rows = batch_rows
        self._rows: list[tuple] = []
        self._bulk: list[dict[str, Any]] = []  # pieces of ``add_rows``, written together
        self._bulk_rows = 0
        self._summary: list[tuple] = []
        self._min_start: list[float] = []
        self._file: pa.NativeFile | None = None
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self.rows_written = 0
        self.bytes_written = 0

    # ---- context manager -------------------------------------------------------------------
    def __enter__(self) -> TraceWriter:
        self._output = atomic_output(self.path)
        self.partial = self._output.__enter__()
        try:
            self._file = pa.OSFile(str(self.partial), "wb")
            self._writer = pa.ipc.new_file(self._file, self._schema)
        except BaseException as exc:
            self._abort(exc)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._finish()
            except BaseException as err:
                self._abort(err)
                raise
            output, self._output = self._output, None
            output.__exit__(None, None, None)  # fsync, rename
        else:
            self._abort(exc)

    def _finish(self) -> None:
        self._flush_rows()
        self._flush_bulk()
        index = np.asarray(self._min_start, dtype=np.float64)
        self._write_table(self._summary + [(S.KIND_CODE["summary"], S.OP_CODE["batch_index"], -1,
                                            -1, -1, -1, -1, -1, None, None, 0.0,
                                            float(len(index)), index)])  # fmt: skip
        self._writer.close()
        self.bytes_written = self._file.tell()
        self._file.close()

    def _abort(self, exc: BaseException) -> None:
        for closer in (self._writer, self._file):
            try:
                if closer is not None:
                    closer.close()
            except Exception:  # noqa: S110 - the original error matters, not this one
                pass
        output, self._output = self._output, None
        if output is not None:  # removes the temporary file
            output.__exit__(type(exc), exc, exc.__traceback__)

    # ---- event rows ------------------------------------------------------------------------
    def write_events(
        self,
        kind: np.ndarray,
        op: np.ndarray,
        start_s: np.ndarray,
        end_s: np.ndarray,
        ints: dict[str, np.ndarray],
        nbytes: np.ndarray,
    ) -> None:
        """One record batch of event rows (sorted here by ``schema.event_sort_key``).
        ``kind``/``op`` are codes of ``schema.KINDS`` / ``schema.OPS``; ``ints`` holds the int32
        columns (lane, gpu, group, replica, layer, microbatch)."""
        n = len(kind)
        if n == 0:
            return
        order = np.argsort(S.event_sort_key(start_s, kind), kind="stable")
        kind, op, start_s, end_s, nbytes = (a[order] for a in (kind, op, start_s, end_s, nbytes))
        ints = {c: ints[c][order] for c in S.INT_COLUMNS}
        arrays = [
            *_code_arrays(kind, op),
            *(pa.array(ints[c].astype(_INT32, copy=False)) for c in S.INT_COLUMNS),
            pa.array(start_s), pa.array(end_s), pa.array(nbytes.astype(np.float64, copy=False)),
            pa.nulls(n, pa.float64()), pa.nulls(n, pa.list_(pa.float64())),
        ]  # fmt: skip
        self._write_batch(pa.RecordBatch.from_arrays(arrays, schema=self._schema),
                          float(start_s[0]))  # fmt: skip

    # ---- other rows ------------------------------------------------------------------------
    def add_row(
        self,
        kind: str,
        op: str,
        *,
        lane: int = -1,
        gpu: int = -1,
        group: int = -1,
        replica: int = -1,
        layer: int = -1,
        microbatch: int = -1,
        start_s: float | None = None,
        end_s: float | None = None,
        nbytes: float = 0.0,
        value: float | None = None,
        values: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        """Buffer one workload, route, summary or request row (written in batches; summary
        rows go into the last batch)."""
        row = (S.KIND_CODE[kind], S.OP_CODE[op], lane, gpu, group, replica, layer, microbatch,
               start_s, end_s, nbytes, value, values)  # fmt: skip
        if kind == "summary":
            self._summary.append(row)
            return
        if self._bulk:  # keep the order rows were added in
            self._flush_bulk()
        self._rows.append(row)
        if len(self._rows) >= self._batch_rows:
            self._flush_rows()

    def add_rows(
        self,
        kind: str,
        op: str,
        *,
        layer: np.ndarray,
        microbatch: np.ndarray,
        group: np.ndarray,
        replica: np.ndarray | None = None,
        value: np.ndarray | None = None,
        values: np.ndarray | None = None,
        start_s: np.ndarray | None = None,
        end_s: np.ndarray | None = None,
        nbytes: np.ndarray | None = None,
    ) -> None:
        """Buffer ``n`` rows of one kind and op at once (workload, route or serving rows):
        int columns as arrays of ``n``, ``value`` (n,) and / or ``values`` (n, width), and for
        timed rows ``start_s`` and ``end_s`` (n,) (null when omitted) and ``nbytes`` (n,) (0)."""
        if kind == "summary":
            raise ValueError("summary rows are added one by one (add_row)")
        if self._rows:
            self._flush_rows()
        n = len(layer)
        self._bulk.append({"kind": S.KIND_CODE[kind], "op": S.OP_CODE[op], "n": n,
                           "layer": layer, "microbatch": microbatch, "group": group,
                           "replica": np.full(n, -1) if replica is None else replica,
                           "value": value, "values": values, "start_s": start_s,
                           "end_s": end_s, "nbytes": nbytes})  # fmt: skip
        self._bulk_rows += n
        if self._bulk_rows >= self._batch_rows:
            self._flush_bulk()

    def _flush_bulk(self) -> None:
        pieces, self._bulk, self._bulk_rows = self._bulk, [], 0
        if not pieces:
            return
        counts = np.array([p["n"] for p in pieces])
        n = int(counts.sum())

        def ints(name: str) -> pa.Array:
            return pa.array(np.concatenate([np.asarray(p[name]) for p in pieces]).astype(_INT32))

        scalar = [np.full(p["n"], np.nan) if p["value"] is None else
                  np.asarray(p["value"], np.float64) for p in pieces]  # fmt: skip
        value = np.concatenate(scalar)
        widths = np.repeat([0 if p["values"] is None else np.shape(p["values"])[1]
                            for p in pieces], counts)  # fmt: skip
        flat = [np.asarray(p["values"], np.float64).ravel() for p in pieces
                if p["values"] is not None]  # fmt: skip
        null_list = np.repeat([p["values"] is None for p in pieces], counts)
        no_value = np.repeat([p["value"] is None for p in pieces], counts)
        minus_one = pa.array(np.full(n, -1, dtype=_INT32))

        def floats(name: str, missing: float) -> np.ndarray:
            return np.concatenate([np.full(p["n"], missing) if p.get(name) is None else
                                   np.asarray(p[name], np.float64) for p in pieces])  # fmt: skip

        untimed = np.repeat([p.get("start_s") is None for p in pieces], counts)
        start, end = floats("start_s", np.nan), floats("end_s", np.nan)
        timed = not untimed.all()
        arrays = [
            *_code_arrays(np.repeat([p["kind"] for p in pieces], counts),
                          np.repeat([p["op"] for p in pieces], counts)),  # fmt: skip
            minus_one, minus_one, ints("group"), ints("replica"), ints("layer"),
            ints("microbatch"),
            pa.array(start, mask=untimed) if timed else pa.nulls(n, pa.float64()),
            pa.array(end, mask=untimed) if timed else pa.nulls(n, pa.float64()),
            pa.array(floats("nbytes", 0.0)), pa.array(value, mask=no_value),
            _lists_from(widths, flat, null_list),
        ]  # fmt: skip
        first = float(np.nanmin(start)) if timed else float("nan")
        self._write_batch(pa.RecordBatch.from_arrays(arrays, schema=self._schema), first)

    def _flush_rows(self) -> None:
        if self._rows:
            rows, self._rows = self._rows, []
            self._write_table(rows)

    def _write_table(self, rows: list[tuple]) -> None:
        cols = list(zip(*rows, strict=True))
        values = [None if v is None else np.asarray(v, dtype=np.float64) for v in cols[12]]
        arrays = [
            *_code_arrays(np.array(cols[0]), np.array(cols[1])),
            *(pa.array(cols[i], pa.int32()) for i in range(2, 8)),
            pa.array(cols[8], pa.float64()), pa.array(cols[9], pa.float64()),
            pa.array(cols[10], pa.float64()), pa.array(cols[11], pa.float64()),
            _list_array(values),
        ]  # fmt: skip
        summary = S.KIND_CODE["summary"]
        starts = [s for s, k in zip(cols[8], cols[0], strict=True)
                  if s is not None and k != summary]  # fmt: skip
        batch = pa.RecordBatch.from_arrays(arrays, schema=self._schema)
        self._write_batch(batch, min(starts) if starts else float("nan"))

    def _write_batch(self, batch: pa.RecordBatch, min_start_s: float) -> None:
        if self._checksums:
            meta = {S.BATCH_CHECKSUM: S.batch_checksums(batch)}
            self._writer.write_batch(batch, custom_metadata=meta)
        else:
            self._writer.write_batch(batch)
        self._min_start.append(min_start_s)
        self.rows_written += batch.num_rows


def _code_arrays(kind: np.ndarray, op: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """The dictionary-encoded ``kind`` and ``op`` columns from codes of ``schema.KINDS`` /
    ``schema.OPS``."""
    return (
        pa.DictionaryArray.from_arrays(pa.array(kind.astype(np.int8, copy=False)),
                                       S.KIND_DICTIONARY),
        pa.DictionaryArray.from_arrays(pa.array(op.astype(np.int8, copy=False)),
                                       S.OP_DICTIONARY),
    )  # fmt: skip


def _list_array(values: list[np.ndarray | None]) -> pa.Array:
    """A list<float64> array from numpy arrays (None = null) without per-element Python work."""
    lengths = [0 if v is None else len(v) for v in values]
    return _lists_from(lengths, [v for v in values if v is not None],
                       np.array([v is None for v in values], dtype=bool))  # fmt: skip


def _lists_from(lengths, parts: list[np.ndarray], null: np.ndarray) -> pa.Array:
    """A list<float64> array of rows of ``lengths`` (0 for null rows) whose values, in row
    order, are the concatenated ``parts``."""
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    flat = np.concatenate(parts) if parts else np.empty(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float64()),
                                    mask=pa.array(null, pa.bool_()))  # fmt: skip


def describe(writer: TraceWriter) -> dict[str, Any]:
    """Rows and bytes a finished writer wrote (for reports)."""
    return {"path": str(writer.path), "rows": writer.rows_written, "bytes": writer.bytes_written}

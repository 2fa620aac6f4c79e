"""Trace reader: opens a trace, checks that it is a complete clustersim trace of a version it
understands, and hands out record batches (all of them, or one at a time) with bounded memory.

Every problem with the file (missing, not a regular file, not Arrow, truncated, damaged,
foreign, newer version, incomplete) raises :class:`TraceError` with one message naming the file
and what is wrong.

Every batch is checked before it is handed out, so that no consumer (numba kernels index
arrays with these columns unchecked) ever sees a damaged one: its checksums (format version 2:
the CRC-32 of each column read, ``schema.BATCH_CHECKSUM``; the schema metadata has its own),
Arrow's full validation (buffer sizes, list offsets, dictionary indices), every index column
within the table it indexes (``lane`` < lanes, ``gpu`` and ``group`` < GPUs, ``replica`` < DP
replicas, ``layer`` < layers, ``microbatch`` < micro-batches or requests; -1 = none), and the
times of event rows (finite, ``0 <= start_s <= end_s``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from clustersim.spec import Plan, PlanError, plan_from_dict
from clustersim.spec.files import check_input_file
from clustersim.trace import schema as S

_EVENT_KIND_NAMES = frozenset(S.EVENT_KINDS)


class TraceError(Exception):
    """A trace file that cannot be used (the message says which and why)."""


class TraceReader:
    """An open trace file. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = None
        self._projected: dict[tuple[str, ...], pa.ipc.RecordBatchFileReader] = {}
        try:  # before opening: a FIFO would block, a device never end
            check_input_file(self.path, None, "a trace file (.arrow)")
        except ValueError as exc:
            raise TraceError(f"{self.path}: {exc}") from None
        try:
            self._file = pa.OSFile(str(self.path), "rb")
            self._reader = pa.ipc.open_file(self._file)
        except (pa.ArrowException, OSError) as exc:
            self.close()
            raise TraceError(f"{self.path}: not a complete Arrow IPC file (truncated, damaged or "
                             f"another format): {_short(exc)}") from None  # fmt: skip
        try:
            self._check_schema(self._reader.schema)
            self.metadata = self._decode(self._reader.schema.metadata)
            self._bounds = self._index_bounds()
            self._index = self._read_index()
        except TraceError:
            self.close()
            raise

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
        self.checksums = version >= 2
        if not self.checksums:
            if S.META_CHECKSUM in meta:  # a damaged version number
                raise TraceError(f"{self.path}: damaged trace metadata (version {version} "
                                 f"with checksums)")  # fmt: skip
        elif meta.get(S.META_CHECKSUM) != S.metadata_checksum(meta):
            raise TraceError(f"{self.path}: damaged trace metadata (checksum mismatch)")

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
            out = {
                "version": self.version,
                "plan": json.loads(meta[S.META_PLAN]),
                "seed": int(meta[S.META_SEED]),
                "run": json.loads(meta[S.META_RUN]),
            }
        except (KeyError, ValueError, RecursionError) as exc:
            raise TraceError(f"{self.path}: damaged trace metadata ({_short(exc)})") from None
        for key in ("plan", "run"):
            if not isinstance(out[key], dict):
                raise TraceError(f"{self.path}: damaged trace metadata (clustersim.{key} is "
                                 f"{type(out[key]).__name__}, expected a JSON object)")  # fmt: skip
        return out

    def _index_bounds(self) -> dict[str, int]:
        """Exclusive upper bound of every index column (its lower bound is -1, "none"),
        from the recorded plan and run."""
        plan, run = self.metadata["plan"], self.metadata["run"]

        def count(*keys: str, default: int | None = None) -> int:
            node: Any = plan
            for key in keys:
                node = node.get(key) if isinstance(node, dict) else None
            if node is None and default is not None:
                return default
            if isinstance(node, bool) or not isinstance(node, int) or not 1 <= node < 2**31:
                raise TraceError(f"{self.path}: damaged trace metadata (plan field "
                                 f"{'.'.join(keys)} = {node!r})")  # fmt: skip
            return node

        par = ("parallel",)
        gpus = math.prod(count(*par, k, default=1) for k in ("tp", "cp", "dp", "pp"))
        replicas = count(*par, "dp")
        pools = plan.get("parallel") if isinstance(plan.get("parallel"), dict) else {}
        if isinstance(pools.get("prefill"), dict) and isinstance(pools.get("decode"), dict):
            # disaggregated serving: both pools' GPUs and replicas (prefill first)
            gpus = sum(
                math.prod(count("parallel", pool, k, default=1) for k in ("tp", "cp", "dp", "pp"))
                for pool in ("prefill", "decode")
            )
            replicas = sum(count("parallel", pool, "dp") for pool in ("prefill", "decode"))
        lanes = run.get("lanes")
        requests = run.get("num_requests", 0)
        if not isinstance(requests, int) or isinstance(requests, bool) or requests < 0:
            raise TraceError(f"{self.path}: damaged trace metadata (num_requests = {requests!r})")
        return {
            "lane": len(lanes) if isinstance(lanes, list) else gpus,
            "gpu": gpus,
            "group": max(gpus, _network_links(run)),
            "replica": replicas,
            "layer": count("model", "num_layers"),
            "microbatch": max(count(*par, "num_microbatches", default=1), requests),
        }

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
        """Record batch ``i``, checked (module docstring) before anything else sees it."""
        try:
            batch, meta = (reader or self._reader).get_batch_with_custom_metadata(i)
            batch.validate()  # sizes of the buffers, before the checksums read them
        except (pa.ArrowException, OSError) as exc:
            raise TraceError(f"{self.path}: damaged trace (record batch {i} unreadable: "
                             f"{_short(exc)})") from None  # fmt: skip
        if self.checksums:
            self._verify(i, batch, meta)
        elif meta is not None and S.BATCH_CHECKSUM in meta:
            raise self._damaged(i, f"checksums in a version-{self.version} file")
        try:
            batch.validate(full=True)
        except pa.ArrowException as exc:
            raise self._damaged(i, f"invalid: {_short(exc)}") from None
        self._check_indices(i, batch)
        return batch

    def _damaged(self, i: int, what: str) -> TraceError:
        return TraceError(f"{self.path}: damaged trace (record batch {i}: {what})")

    def _verify(self, i: int, batch: pa.RecordBatch, meta: Any) -> None:
        """Compare each column's CRC-32 with the one the writer stored with the batch."""
        stored = meta.get(S.BATCH_CHECKSUM) if meta is not None else None
        if stored is None:
            raise self._damaged(i, "no checksum")
        sums = stored.split(b",")
        if len(sums) != len(S.COLUMNS):
            raise self._damaged(i, "checksum list of the wrong length")
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            if b"%08x" % S.column_checksum(column) != sums[S.COLUMNS.index(name)]:
                raise self._damaged(i, f"checksum mismatch in column '{name}'")

    def _check_indices(self, i: int, batch: pa.RecordBatch) -> None:
        """Every index column within its table; event rows with finite, ordered times."""
        names = batch.schema.names
        for name, bound in self._bounds.items():
            if name not in names or batch.num_rows == 0:
                continue
            values = batch.column(name).to_numpy(zero_copy_only=False)
            low, high = int(values.min()), int(values.max())
            if low < -1 or high >= bound:
                bad = low if low < -1 else high
                raise self._damaged(i, f"{name} {bad} out of range (valid: -1 to {bound - 1})")
        if "kind" not in names or "start_s" not in names or "end_s" not in names:
            return
        kind = batch.column("kind")
        words = kind.dictionary.to_pylist()
        is_event = np.array([w in _EVENT_KIND_NAMES for w in words] + [False], dtype=bool)
        codes = kind.indices.to_numpy(zero_copy_only=False)
        events = is_event[codes] if len(words) else np.zeros(len(codes), bool)
        if not events.any():
            return
        start = batch.column("start_s").to_numpy(zero_copy_only=False)[events]
        end = batch.column("end_s").to_numpy(zero_copy_only=False)[events]
        good = np.isfinite(start) & np.isfinite(end) & (start >= 0) & (end >= start)
        if not good.all():
            first = int(np.argmin(good))
            row = int(np.flatnonzero(events)[first])
            raise self._damaged(i, f"event row {row} has times {float(start[first])!r} to "
                                   f"{float(end[first])!r} s")  # fmt: skip

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


def _network_links(run: dict[str, Any]) -> int:
    """Links of a v3 run with shared links (``link`` rows index them by ``group``)."""
    network = run.get("network")
    links = network.get("links") if isinstance(network, dict) else None
    return len(links) if isinstance(links, list) else 0


def _names(batch: pa.RecordBatch, column: str) -> list[str]:
    return batch.column(column).to_pylist()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

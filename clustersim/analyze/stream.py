"""Reading a trace's event rows back in time order, chunk by chunk, with bounded memory.

The writer stores rows in the order the engine recorded them, which is close to, but not
exactly, time order (a collective is recorded when it ends, a backward block after it ran).
The trace's batch index gives the earliest start of every batch, so after reading batch ``b``
every row that starts before the earliest start of all later batches is final: those rows are
released in order, the rest stay in sorted *runs* (one per batch, as slices, no copies) until a
later watermark releases them. Memory is bounded by the rows recorded while the longest-open
event of the run was in flight (a small fraction of a run; it does not grow with its length).

Order: by ``start_s``; at equal starts asynchronous rows (``comm_async``) come first, then the
file order (stable sorts). The writer already sorts every batch, so a batch is re-sorted only
when it is not (a trace from another writer; the check is one pass of a numba kernel, no key
array is built); runs are merged only where they interleave. Only the event columns are read
from the file (the whole batch again only for a batch that also holds other rows), and they
are handed on as zero-copy numpy views of the record batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa

from clustersim.trace import schema as S
from clustersim.trace.reader import TraceError, TraceReader

EVENT_COLUMNS = ("kind", "op", "lane", "group", "layer", "microbatch", "start_s", "end_s", "bytes")
_EVENT_KINDS = np.array([k in S.EVENT_KINDS for k in S.KINDS] + [False])  # code -1: unknown
_LAST_EVENT_KIND = max(S.KIND_CODE[k] for k in S.EVENT_KINDS)


class _Codes:
    """Dictionary columns re-coded to positions in ``schema.KINDS`` / ``schema.OPS``."""

    def __init__(self, path: str):
        self.path = path
        self._cache: dict[tuple[str, tuple], np.ndarray] = {}

    def __call__(self, column: pa.Array, names: tuple[str, ...], what: str) -> np.ndarray:
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        words = tuple(column.dictionary.to_pylist())
        indices = column.indices.to_numpy(zero_copy_only=False)
        if words == names[: len(words)]:  # written by this version: codes are positions already
            return indices
        lookup = self._cache.get((what, words))
        if lookup is None:
            unknown = [w for w in words if w not in names]
            if unknown:
                raise TraceError(
                    f"{self.path}: unknown {what} {unknown[0]!r} (damaged trace, or "
                    f"written by another clustersim)"
                )
            lookup = np.array([names.index(w) for w in words], dtype=np.int8)
            self._cache[(what, words)] = lookup
        return lookup[indices]


def _watermarks(index: np.ndarray) -> np.ndarray:
    """``w[b]``: the earliest start of every batch after ``b`` (inf for the last)."""
    starts = np.where(np.isnan(index), np.inf, index)
    suffix = np.minimum.accumulate(starts[::-1])[::-1]
    return np.append(suffix[1:], np.inf)


def event_columns(batch: pa.RecordBatch, codes: _Codes) -> dict[str, np.ndarray]:
    """The event columns of a batch as numpy arrays (kind and op as schema codes)."""
    cols = {
        "kind": codes(batch.column("kind"), S.KINDS, "kind"),
        "op": codes(batch.column("op"), S.OPS, "op"),
    }
    for name in EVENT_COLUMNS[2:]:
        cols[name] = batch.column(name).to_numpy(zero_copy_only=False)
    return cols


def time_ordered(
    reader: TraceReader,
    on_other: Callable[[pa.RecordBatch, np.ndarray, np.ndarray], None] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Event rows (kinds compute, comm, comm_async) in time order, in chunks of numpy columns.
    Other rows go to ``on_other(batch, kind_codes, op_codes)`` as they are read."""
    from clustersim.analyze.kernels import _sorted_by_key

    codes = _Codes(str(reader.path))
    marks = _watermarks(reader.batch_min_start_s)
    runs: list[dict[str, np.ndarray]] = []
    for b in range(reader.num_batches):
        batch = reader.batch(b, EVENT_COLUMNS)  # reads only these columns
        kind = codes(batch.column("kind"), S.KINDS, "kind")
        if batch.num_rows and (kind.min() < 0 or kind.max() > _LAST_EVENT_KIND):
            is_event = _EVENT_KINDS[kind]
            if on_other is not None and not is_event.all():
                others = reader.batch(b).filter(pa.array(~is_event))
                on_other(others, kind[~is_event], codes(others.column("op"), S.OPS, "op"))
            batch = batch.filter(pa.array(is_event))
        if batch.num_rows:
            cols = event_columns(batch, codes)
            if not _sorted_by_key(cols["start_s"].view(np.uint64), cols["kind"]):
                order = np.argsort(S.event_sort_key(cols["start_s"], cols["kind"]), kind="stable")
                cols = {name: col[order] for name, col in cols.items()}
            runs.append(cols)
        limit = np.inf if b == reader.num_batches - 1 else marks[b]
        out = _release(runs, limit)
        if out is not None:
            yield out


def _release(runs: list[dict[str, np.ndarray]], limit: float) -> dict[str, np.ndarray] | None:
    """Take every row that starts before ``limit`` out of the sorted runs, in order."""
    from clustersim.analyze.kernels import _count_before

    if not runs:
        return None
    if np.isinf(limit):
        cut = [len(r["start_s"]) for r in runs]
    else:
        wkey = np.uint64(np.float64(limit).view(np.uint64)) << np.uint64(1)
        cut = [int(_count_before(r["start_s"].view(np.uint64), wkey)) for r in runs]
    parts = [{n: c[:k] for n, c in r.items()} for r, k in zip(runs, cut, strict=True) if k]
    runs[:] = [
        {n: c[k:] for n, c in r.items()}
        for r, k in zip(runs, cut, strict=True)
        if k < len(r["start_s"])
    ]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    merged = {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}
    order = np.argsort(S.event_sort_key(merged["start_s"], merged["kind"]), kind="stable")
    return {n: c[order] for n, c in merged.items()}

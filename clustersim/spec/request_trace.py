"""Reading a request trace: one inference request per row, from a CSV or Arrow IPC file.

Columns (the processed Splitwise / Azure LLM inference traces, ``traces/README.md``):

* ``arrived_at``: arrival time in seconds (any origin; the simulation starts at the first);
* ``num_prefill_tokens``: prompt tokens (a positive whole number);
* ``num_decode_tokens``: output tokens to generate (a positive whole number).

Other columns are ignored. Rows need not be sorted: they are put in arrival order (stable, so
ties keep their file order). Token counts are whole numbers from 1 to ``MAX_TOKENS``, arrival
times finite, from 0 to ``MAX_ARRIVAL_S``; the file a regular file of at most
``files.DATA_MAX_BYTES``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

import numpy as np

from clustersim.spec.files import DATA_MAX_BYTES, check_input_file
from clustersim.spec.schema import MAX_TOKENS

COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")
MAX_ARRIVAL_S = 1e9
"""Latest arrival time (s, about 31 years)."""


class RequestTrace(NamedTuple):
    """Requests in arrival order: arrival (s from the first), prompt and output tokens."""

    arrival_s: np.ndarray  # float64
    prompt_tokens: np.ndarray  # int64
    output_tokens: np.ndarray  # int64


def read_request_trace(path: str | Path, limit: int | None = None) -> RequestTrace:
    """The requests of a CSV or Arrow trace file (the first ``limit`` rows in arrival order).

    Raises ValueError with a readable message for a missing file or column, or values that are
    not numbers, negative times or token counts that are not positive whole numbers.
    """
    path = Path(path)
    try:
        check_input_file(path, DATA_MAX_BYTES, "a CSV or Arrow request trace")
    except ValueError as exc:
        raise ValueError(f"request trace {path}: {exc}") from None
    if path.suffix.lower() in (".arrow", ".feather", ".ipc"):
        columns = _read_arrow(path)
    else:
        columns = _read_csv(path)
    arrival, prompt, output = (columns[name] for name in COLUMNS)
    if arrival.size == 0:
        raise ValueError(f"request trace {path} has no rows")
    bad = ~(np.isfinite(arrival) & (arrival >= 0) & (arrival <= MAX_ARRIVAL_S))
    valid = f"finite times >= 0 and <= {MAX_ARRIVAL_S:g} (seconds)"
    _refuse(path, "arrived_at", arrival, bad, valid)
    for name, values in (("num_prefill_tokens", prompt), ("num_decode_tokens", output)):
        bad = ~((values >= 1) & (values <= MAX_TOKENS) & (values == np.floor(values)))
        _refuse(path, name, values, bad, f"positive whole numbers of tokens up to {MAX_TOKENS}")
    order = np.argsort(arrival, kind="stable")[:limit]
    arrival = arrival[order]
    return RequestTrace(
        arrival - arrival[0], prompt[order].astype(np.int64), output[order].astype(np.int64)
    )


def _refuse(path: Path, column: str, values: np.ndarray, bad: np.ndarray, valid: str) -> None:
    """ValueError naming the file, the column, the first bad row (1-based, in file order, the
    header not counted) and its value, unless no row is ``bad``."""
    rows = np.flatnonzero(bad)
    if rows.size:
        more = f" and {rows.size - 1} more" if rows.size > 1 else ""
        raise ValueError(f"request trace {path}: column '{column}' row {rows[0] + 1}{more}: "
                         f"got {float(values[rows[0]])!r}; valid: {valid}")  # fmt: skip


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None) or []
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"request trace {path} lacks column(s) {', '.join(missing)} "
                f"(columns: {', '.join(header)})"
            )
        index = [header.index(c) for c in COLUMNS]
        try:
            rows = [[float(row[i]) for i in index] for row in reader if row]
        except (ValueError, IndexError):
            raise ValueError(f"request trace {path} holds a value that is not a number") from None
    table = np.array(rows, dtype=np.float64).reshape(-1, len(COLUMNS))
    return {name: table[:, i] for i, name in enumerate(COLUMNS)}


def _read_arrow(path: Path) -> dict[str, np.ndarray]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        table = ipc.open_file(pa.memory_map(str(path))).read_all()
    except pa.ArrowInvalid as exc:
        raise ValueError(f"not a readable Arrow IPC file: {exc}") from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(
            f"request trace {path} lacks column(s) {', '.join(missing)} "
            f"(columns: {', '.join(table.column_names)})"
        )
    try:
        return {name: table.column(name).to_numpy().astype(np.float64) for name in COLUMNS}
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise ValueError(
            f"request trace {path}: columns {', '.join(COLUMNS)} must be numbers "
            f"without nulls ({exc})"
        ) from None

"""Reading a column of token counts from a CSV or Arrow file (empirical length distributions)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from clustersim.spec.files import DATA_MAX_BYTES, check_input_file
from clustersim.spec.schema import MAX_TOKENS


def read_lengths(path: str | Path, column: str) -> np.ndarray:
    """The positive integer lengths in ``column`` of a CSV or Arrow IPC file, as int64.

    Raises ValueError with a readable message for a missing file (or one that is not a
    regular file, or too large), a missing column, or a column that holds anything but whole
    numbers from 1 to ``MAX_TOKENS``.
    """
    path = Path(path)
    try:
        check_input_file(path, DATA_MAX_BYTES, "a CSV or Arrow file of lengths")
    except ValueError as exc:
        raise ValueError(f"length file: {exc}") from None
    if path.suffix.lower() in (".arrow", ".feather", ".ipc"):
        values = _read_arrow_column(path, column)
    else:
        values = _read_csv_column(path, column)
    if values.size == 0:
        raise ValueError(f"column '{column}' is empty")
    bad = np.flatnonzero(~((values >= 1) & (values <= MAX_TOKENS) & (values == np.floor(values))))
    if bad.size:
        raise ValueError(f"column '{column}' row {bad[0] + 1}: got {float(values[bad[0]])!r}; "
                         f"valid: positive whole numbers of tokens up to {MAX_TOKENS}")  # fmt: skip
    return values.astype(np.int64)


def _read_csv_column(path: Path, column: str) -> np.ndarray:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or column not in reader.fieldnames:
            have = ", ".join(reader.fieldnames or [])
            raise ValueError(f"no column '{column}' in the file (columns: {have})")
        try:
            return np.array([float(row[column]) for row in reader], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"column '{column}' holds a value that is not a number") from None


def _read_arrow_column(path: Path, column: str) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        table = ipc.open_file(pa.memory_map(str(path))).read_all()
    except pa.ArrowInvalid as exc:
        raise ValueError(f"not a readable Arrow IPC file: {exc}") from None
    if column not in table.column_names:
        have = ", ".join(table.column_names)
        raise ValueError(f"no column '{column}' in the file (columns: {have})")
    try:
        return table.column(column).to_numpy().astype(np.float64)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise ValueError(f"column '{column}' must hold numbers without nulls ({exc})") from None

"""Input files of a plan (the plan itself, length files, request traces) and traces: regular
files only, of bounded size, checked before they are opened.

``os.stat`` never blocks, whereas opening a FIFO for reading waits for a writer and reading a
device such as ``/dev/zero`` never ends; so every input is stat-ed first and refused unless it
is a regular file no larger than its limit, then opened without blocking and checked again on
the open descriptor (the path may have been replaced in between).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PLAN_MAX_BYTES = 16 * 2**20
"""Largest plan file read (YAML or JSON); real plans are a few kB."""
DATA_MAX_BYTES = 4 * 2**30
"""Largest length file or request trace read (CSV or Arrow)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def _check_stat(st: os.stat_result, max_bytes: int | None, expected: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = _kind(st.st_mode)
        raise ValueError(f"is {kind}, expected {expected}" if kind.startswith("a ")
                         else f"{kind}, expected {expected}")  # fmt: skip
    if max_bytes is not None and st.st_size > max_bytes:
        raise ValueError(f"file of {_size(st.st_size)}; at most {_size(max_bytes)} is read")


def check_input_file(
    path: str | Path, max_bytes: int | None = DATA_MAX_BYTES, expected: str = "a regular file"
) -> os.stat_result:
    """Raise ValueError (a message without the path) unless ``path`` is an existing regular
    file of at most ``max_bytes`` bytes (None: any size). Never opens the file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except OSError as exc:
        raise ValueError(f"cannot read file: {exc.strerror or exc}") from None
    _check_stat(st, max_bytes, expected)
    return st


def read_input_bytes(
    path: str | Path, max_bytes: int = PLAN_MAX_BYTES, expected: str = "a regular file"
) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (ValueError otherwise), read
    without ever blocking on a FIFO or device."""
    check_input_file(path, max_bytes, expected)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise ValueError(f"cannot read file: {exc.strerror or exc}") from None
    try:
        _check_stat(os.fstat(fd), max_bytes, expected)  # replaced since the stat above?
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise ValueError(f"cannot read file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if total > max_bytes:
        raise ValueError(f"file grew past {_size(max_bytes)} while read")
    return b"".join(chunks)


def read_input_text(
    path: str | Path, max_bytes: int = PLAN_MAX_BYTES, expected: str = "a regular file"
) -> str:
    """:func:`read_input_bytes` decoded as UTF-8 (ValueError if it is not)."""
    data = read_input_bytes(path, max_bytes, expected)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start}: {data[exc.start]:#04x})") from None

"""Output files (traces, Perfetto JSON, plots, search tables, reports, calibration files):
regular files only, never one of the command's inputs, written atomically.

:func:`check_output` refuses (:class:`OutputError`, a message naming the path) a target that
exists and is not a regular file (a directory, FIFO, device or socket: ``os.stat`` never
blocks, so a FIFO is refused without waiting for a reader) or that is the same file as one of
``inputs`` (compared by device and inode, so links and other spellings of a path count).

:func:`atomic_output` yields a fresh temporary path made with ``tempfile.mkstemp`` in the
target's own directory (two concurrent writers never share one), and when the block ends
normally fsyncs it and renames it over the target (atomic on POSIX): a reader sees the old
file or the whole new one, never a mix. On any exception -- ``KeyboardInterrupt`` and the
CLI's SIGTERM included -- the temporary file is removed and the exception propagates.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

TEMP_SUFFIX = ".tmp"
"""Suffix of the temporary names (``.<name>.<random>.tmp`` next to the target)."""


class OutputError(ValueError):
    """An output path that cannot be written; the message names it."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def check_output(path: str | Path, inputs: Iterable[str | Path | None] = ()) -> Path:
    """``path`` as a Path if it may be written: absent, or an existing regular file that is
    none of ``inputs``; :class:`OutputError` otherwise. Never opens anything."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    if path.name in ("", ".", "..") or str(path).endswith(os.sep):
        raise OutputError(f"cannot write {path}: expected a file name, not a directory")
    if st is None:
        return path
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"cannot write {path}: it is {_kind(st.st_mode)}; outputs are "
                          "regular files")  # fmt: skip
    for item in inputs:
        if item is None:
            continue
        try:
            other = os.stat(item)
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            same = "" if str(item) == str(path) else f" (the same file as {item})"
            raise OutputError(
                f"cannot write {path}: it is an input of this command{same}; "
                "choose another output file"
            )
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | Path, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """``with atomic_output(out) as tmp: write(tmp)`` -- see the module docstring. Creates the
    target's directory if missing."""
    path = check_output(path, inputs)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open would not
        finally:
            os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have closed or replaced it
            os.fsync(f.fileno())
        check_output(path)  # replaced by a FIFO or directory meanwhile?
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # the rename itself is durable once the directory is
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def temp_files(path: str | Path) -> list[Path]:
    """The temporary files of writers of ``path`` now present (tests, cleanup checks)."""
    path = Path(path)
    try:
        return sorted(path.parent.glob(f".{glob_escape(path.name)}.*{TEMP_SUFFIX}"))
    except OSError:
        return []


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    import glob

    return glob.escape(name)


def write_text_atomic(
    path: str | Path, text: str, inputs: Iterable[str | Path | None] = ()
) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_output`."""
    with atomic_output(path, inputs) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


__all__ = [
    "OutputError",
    "atomic_output",
    "check_output",
    "temp_files",
    "write_text_atomic",
]

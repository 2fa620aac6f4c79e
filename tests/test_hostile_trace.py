"""Hostile and careless trace input (issue 13): damaged bytes, edited columns and metadata,
files that are not regular files. The reader refuses with one TraceError naming the batch, or
returns exactly the data that was written; ``analyze`` never crashes (exit code 0 or 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clustersim.trace import VERSION, TraceError, TraceReader, TraceWriter
from clustersim.trace import schema as S


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clustersim.cli", *args],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    """A real trace of the default plan, written by the engine."""
    path = tmp_path_factory.mktemp("trace") / "t.arrow"
    proc = _cli("run", "--trace-file", str(path))
    assert proc.returncode == 0 and path.exists(), proc.stdout + proc.stderr
    return path


@pytest.fixture(scope="module")
def contents(trace) -> list[pa.RecordBatch]:
    return _read_all(trace)


def _read_all(path: Path) -> list[pa.RecordBatch]:
    with TraceReader(path) as reader:
        out = list(reader.batches())
        out.append(reader.summary)
        reader.plan()
        return out


def _flip(data: bytes, position: int, bit: int) -> bytes:
    damaged = bytearray(data)
    damaged[position % len(damaged)] ^= 1 << bit
    return bytes(damaged)


def _refused_or_intact(path: Path, contents: list[pa.RecordBatch]) -> bool:
    """True if the reader refused the file (TraceError), False if it returned the original
    data; any other outcome fails."""
    try:
        found = _read_all(path)
    except TraceError as exc:
        message = str(exc)
        assert message.startswith(str(path)) and "\n" not in message
        return True
    assert len(found) == len(contents)
    for got, want in zip(found, contents, strict=True):
        assert got.schema.equals(want.schema)
        for a, b in zip(got.columns, want.columns, strict=True):
            assert _same(a, b)
    return False


def _same(a: pa.Array, b: pa.Array) -> bool:
    """Equal values (NaN equal to NaN; what lies under nulls is not a value)."""
    if a.equals(b):
        return True
    if a.type != b.type or len(a) != len(b) or a.null_count != b.null_count:
        return False
    if not a.is_null().equals(b.is_null()):
        return False
    if pa.types.is_list(a.type):
        return a.value_lengths().equals(b.value_lengths()) and _same(a.flatten(), b.flatten())
    if pa.types.is_floating(a.type):
        return np.array_equal(a.to_numpy(zero_copy_only=False),
                              b.to_numpy(zero_copy_only=False), equal_nan=True)  # fmt: skip
    return False


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(position=st.integers(min_value=0, max_value=2**40), bit=st.integers(0, 7))
def test_bit_flip_is_refused_or_harmless(tmp_path_factory, trace, contents, position, bit):
    path = tmp_path_factory.mktemp("flip") / "f.arrow"
    path.write_bytes(_flip(trace.read_bytes(), position, bit))
    _refused_or_intact(path, contents)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(position=st.integers(min_value=0, max_value=2**40), byte=st.integers(1, 255))
def test_byte_change_is_refused_or_harmless_long(tmp_path_factory, trace, contents, position,
                                                 byte):  # fmt: skip
    data = bytearray(trace.read_bytes())
    data[position % len(data)] ^= byte
    path = tmp_path_factory.mktemp("flip") / "f.arrow"
    path.write_bytes(bytes(data))
    _refused_or_intact(path, contents)


def test_most_flips_are_detected(tmp_path, trace, contents):
    data = trace.read_bytes()
    rng = np.random.default_rng(13)
    path = tmp_path / "f.arrow"
    refused = 0
    for _ in range(60):
        path.write_bytes(_flip(data, int(rng.integers(len(data))), int(rng.integers(8))))
        refused += _refused_or_intact(path, contents)
    assert refused >= 30  # the rest hit bytes no reader uses (and changed nothing)


_ANALYZE_ALL = """
import json, sys
from clustersim.analyze import analyze
from clustersim.trace import TraceError
for path in sys.argv[1:]:
    try:
        result = analyze(path).to_dict()
    except TraceError as exc:
        print(json.dumps({"path": path, "error": str(exc)}), flush=True)
        continue
    result["trace"]["path"] = None
    print(json.dumps({"path": path, "result": result}), flush=True)
"""


@pytest.mark.parametrize("count", [12, pytest.param(200, marks=pytest.mark.slow)])
def test_analyze_of_flipped_traces_never_crashes(tmp_path, trace, count):
    """In a subprocess (a crash in a compiled kernel would kill pytest): each flipped trace
    gives the original figures or one TraceError naming the file; no other exception, no
    crash."""
    data = trace.read_bytes()
    rng = np.random.default_rng(count)
    paths = [str(trace)]
    for k in range(count):
        path = tmp_path / f"f{k}.arrow"
        path.write_bytes(_flip(data, int(rng.integers(len(data))), int(rng.integers(8))))
        paths.append(str(path))
    proc = subprocess.run([sys.executable, "-c", _ANALYZE_ALL, *paths], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["path"] for line in lines] == paths
    base = lines[0]["result"]
    for line in lines[1:]:
        if "error" in line:
            assert line["error"].startswith(line["path"] + ": ")
        else:
            assert line["result"] == base


def _rewrite(src: Path, dst: Path, edit, *, checksums: str, metadata=None) -> None:
    """Copy a trace with pyarrow, ``edit(i, batch)`` changing batches; ``checksums``: "keep"
    the stored ones, "recompute" them (a deliberate edit), or "drop" them."""
    reader = pa.ipc.open_file(str(src))
    schema = reader.schema
    if metadata is not None:
        schema = schema.with_metadata(metadata(dict(schema.metadata)))
    with pa.ipc.new_file(str(dst), schema) as writer:
        for i in range(reader.num_record_batches):
            batch, meta = reader.get_batch_with_custom_metadata(i)
            batch = edit(i, batch)
            if checksums == "recompute":
                meta = {S.BATCH_CHECKSUM: S.batch_checksums(batch)}
            elif checksums == "drop":
                meta = None
            writer.write_batch(batch, custom_metadata=meta)


def _set_column(name: str, value, rows=slice(0, 1)):
    def edit(i: int, batch: pa.RecordBatch) -> pa.RecordBatch:
        if i != 0:
            return batch
        column = batch.column(name).to_numpy(zero_copy_only=False).copy()
        column[rows] = value
        arrays = [pa.array(column, batch.schema.field(name).type) if n == name
                  else batch.column(n) for n in batch.schema.names]  # fmt: skip
        return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)

    return edit


EDITS = {
    "group 2**30": (_set_column("group", 2**30), "group 1073741824 out of range"),
    "group -7": (_set_column("group", -7), "group -7 out of range"),
    "lane 2**20": (_set_column("lane", 2**20), "lane 1048576 out of range"),
    "gpu 99": (_set_column("gpu", 99), "gpu 99 out of range"),
    "replica 4": (_set_column("replica", 4), "replica 4 out of range"),
    "layer 32": (_set_column("layer", 32), "layer 32 out of range"),
    "microbatch 2**31-1": (_set_column("microbatch", 2**31 - 1), "microbatch"),
    "start nan": (_set_column("start_s", np.nan), "times nan"),
    "end before start": (_set_column("end_s", -1.0), "times"),
}


@pytest.mark.parametrize("case", list(EDITS))
@pytest.mark.parametrize("checksums", ["keep", "recompute", "drop"])
def test_edited_column_is_refused_naming_the_batch(tmp_path, trace, case, checksums):
    edit, words = EDITS[case]
    path = tmp_path / "edited.arrow"
    _rewrite(trace, path, edit, checksums=checksums)
    with pytest.raises(TraceError) as info:
        _read_all(path)
    message = str(info.value)
    batch = "" if checksums == "drop" else "0: "  # "drop": the summary batch, read first
    assert message.startswith(f"{path}: damaged trace (record batch {batch}")
    expected = {"keep": "checksum mismatch", "drop": "no checksum", "recompute": words}
    assert expected[checksums] in message


def test_out_of_range_dictionary_code_is_refused(tmp_path, trace):
    def edit(i: int, batch: pa.RecordBatch) -> pa.RecordBatch:
        if i != 0:
            return batch
        op = batch.column("op")
        codes = op.indices.to_numpy().copy()
        codes[0] = 120
        new = pa.DictionaryArray.from_arrays(pa.array(codes, pa.int8()), op.dictionary,
                                             safe=False)  # fmt: skip
        arrays = [new if n == "op" else batch.column(n) for n in batch.schema.names]
        return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)

    path = tmp_path / "edited.arrow"
    _rewrite(trace, path, edit, checksums="recompute")
    with pytest.raises(TraceError, match=r"record batch 0: invalid"):
        _read_all(path)


@pytest.mark.parametrize("command", ["analyze", "replay"])
def test_cli_refuses_group_2_30_with_exit_2(tmp_path, trace, command):
    """The crash of issue 13: ``group`` = 2**30 written with pyarrow (checksums recomputed, as a
    deliberate edit would) segfaulted analyze and replay."""
    path = tmp_path / "edited.arrow"
    _rewrite(trace, path, EDITS["group 2**30"][0], checksums="recompute")
    proc = _cli(command, str(path))
    assert proc.returncode == 2, (proc.returncode, proc.stdout + proc.stderr[-2000:])
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "record batch 0" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        (S.META_PLAN, b"[]", "clustersim.plan is list"),
        (S.META_PLAN, b"null", "clustersim.plan is NoneType"),
        (S.META_RUN, b"[]", "clustersim.run is list"),
        (S.META_PLAN, b'{"parallel": {"tp": -1}}', "parallel.tp"),
        (S.META_SEED, b"x", "damaged trace metadata"),
    ],
)
@pytest.mark.parametrize("checksum", ["keep", "recompute"])
def test_edited_metadata_is_refused(tmp_path, trace, key, value, words, checksum):
    def metadata(meta: dict[bytes, bytes]) -> dict[bytes, bytes]:
        meta[key] = value
        if checksum == "recompute":
            meta[S.META_CHECKSUM] = S.metadata_checksum(meta)
        return meta

    path = tmp_path / "edited.arrow"
    _rewrite(trace, path, lambda i, b: b, checksums="keep", metadata=metadata)
    with pytest.raises(TraceError) as info:
        _read_all(path)
    assert (words if checksum == "recompute" else "checksum mismatch") in str(info.value)


def test_version_1_files_are_read_without_checksums(tmp_path, trace, contents):
    """A version-1 trace (no checksums) is still read, with every other check; a file that
    claims version 1 but carries checksums (a damaged version number) is refused."""

    def v1(meta: dict[bytes, bytes]) -> dict[bytes, bytes]:
        meta[S.META_VERSION] = b"1"
        del meta[S.META_CHECKSUM]
        return meta

    old = tmp_path / "v1.arrow"
    _rewrite(trace, old, lambda i, b: b, checksums="drop", metadata=v1)
    with TraceReader(old) as reader:
        assert reader.version == 1 and not reader.checksums
    assert _refused_or_intact(old, contents) is False
    damaged = tmp_path / "v1-damaged.arrow"
    _rewrite(trace, damaged, EDITS["group 2**30"][0], checksums="drop", metadata=v1)
    with pytest.raises(TraceError, match="group 1073741824 out of range"):
        _read_all(damaged)
    lying = tmp_path / "v1-lying.arrow"

    def claims_v1(meta: dict[bytes, bytes]) -> dict[bytes, bytes]:
        meta[S.META_VERSION] = b"1"
        return meta

    _rewrite(trace, lying, lambda i, b: b, checksums="keep", metadata=claims_v1)
    with pytest.raises(TraceError, match="version 1 with checksums"):
        _read_all(lying)
    assert VERSION == 3  # v3 added the shared-link rows; v1 and v2 files are still read


def _without_blocking(fn) -> BaseException | None:
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            result.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    assert result, "blocked"
    return result[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_fifo_trace_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "t.arrow"
    os.mkfifo(fifo)
    exc = _without_blocking(lambda: TraceReader(fifo))
    assert isinstance(exc, TraceError) and "FIFO" in str(exc)


def test_device_trace_is_refused():
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    exc = _without_blocking(lambda: TraceReader("/dev/zero"))
    assert isinstance(exc, TraceError) and "character device" in str(exc)


def test_writer_checksums_every_batch(trace):
    reader = pa.ipc.open_file(str(trace))
    meta = reader.schema.metadata
    assert meta[S.META_VERSION] == str(VERSION).encode()
    assert meta[S.META_CHECKSUM] == S.metadata_checksum(meta)
    for i in range(reader.num_record_batches):
        batch, custom = reader.get_batch_with_custom_metadata(i)
        assert custom[S.BATCH_CHECKSUM] == S.batch_checksums(batch)


def test_checksum_is_independent_of_slicing_and_layout():
    values = pa.array([1.0, None, 3.0, 4.0])
    lists = pa.array([[1.0], None, [], [2.0, 3.0]], pa.list_(pa.float64()))
    words = pa.DictionaryArray.from_arrays(pa.array([0, 1, 1], pa.int8()), S.KIND_DICTIONARY)
    for array in (values, lists, words):
        sliced = pa.concat_arrays([array.slice(0, 1), array.slice(1)])
        assert S.column_checksum(sliced) == S.column_checksum(array)
        assert S.column_checksum(array.slice(1)) != S.column_checksum(array)


def test_traces_of_same_plan_and_seed_are_identical(tmp_path, trace):
    """Byte for byte, apart from the creation time and the metadata checksum over it."""
    other = tmp_path / "again.arrow"
    assert _cli("run", "--trace-file", str(other)).returncode == 0
    a, b = trace.read_bytes(), other.read_bytes()
    assert len(a) == len(b)
    differ = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))
    stamp = len("2026-01-01T00:00:00Z") + 8  # created_utc and the checksum, twice each
    assert differ.size <= 2 * stamp


def test_small_writer_round_trip_with_checksums(tmp_path):
    """Every kind of batch the writer makes (events, bulk rows, single rows, summary)."""
    from clustersim.spec import load_plan

    plan = load_plan(None)
    meta = S.encode_metadata(plan.model_dump(mode="json"), 0, {"mode": "training"})
    path = tmp_path / "w.arrow"
    with TraceWriter(path, meta, batch_rows=3) as w:
        n = 5
        w.write_events(np.zeros(n, np.int8), np.zeros(n, np.int8), np.arange(n, dtype=float),
                       np.arange(n, dtype=float) + 1,
                       {c: np.zeros(n, np.int32) for c in S.INT_COLUMNS}, np.ones(n))  # fmt: skip
        w.add_rows("route", "expert_tokens", layer=np.arange(4), microbatch=np.zeros(4),
                   group=np.zeros(4), values=np.ones((4, 8)))  # fmt: skip
        w.add_rows("route", "dropped_tokens", layer=np.arange(4), microbatch=np.zeros(4),
                   group=np.zeros(4), value=np.array([0.0, np.nan, 1.0, 2.0]))  # fmt: skip
        for m in range(4):
            w.add_row("workload", "seq_lens", replica=0, microbatch=m, value=3.0, values=[1, 2])
        w.add_row("summary", "iteration", start_s=0.0, end_s=2.0)
    with TraceReader(path) as reader:
        assert reader.checksums and reader.num_batches >= 4
        rows = sum(b.num_rows for b in reader.batches())
    assert rows == 5 + 8 + 4

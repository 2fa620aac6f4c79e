"""The trace format: writer and reader, atomic writes, and every kind of bad file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from clustersim.cli import app
from clustersim.spec import load_plan
from clustersim.trace import VERSION, TraceError, TraceReader, TraceWriter
from clustersim.trace import schema as S
from clustersim.trace.writer import partial_files

PLAN = load_plan(None)


def _meta(version: int = VERSION) -> dict[bytes, bytes]:
    meta = S.encode_metadata(PLAN.model_dump(mode="json"), PLAN.seed, {"mode": "training"})
    meta[S.META_VERSION] = str(version).encode()
    return meta


def _events(n: int, t0: float = 0.0) -> dict:
    rng = np.random.default_rng(n)
    start = t0 + np.sort(rng.random(n))[::-1].copy()  # written in reverse time order
    ints = {c: np.arange(n, dtype=np.int32) % 4 for c in S.INT_COLUMNS}
    return {
        "kind": (np.arange(n) % 3).astype(np.int8),
        "op": np.zeros(n, np.int8),
        "start_s": start,
        "end_s": start + 0.5,
        "ints": ints,
        "nbytes": np.ones(n),
    }


def _write(path: Path, version: int = VERSION, batches: int = 2) -> None:
    with TraceWriter(path, _meta(version)) as w:
        for b in range(batches):
            w.write_events(**_events(100, t0=b))
        w.add_row("workload", "seq_lens", replica=0, microbatch=0, value=3.0, values=[1, 2])
        w.add_row("route", "dropped_tokens", layer=1, microbatch=0, group=0, value=0.0)
        w.add_row("summary", "iteration", start_s=0.0, end_s=2.0)


def test_round_trip(tmp_path):
    path = tmp_path / "t.arrow"
    _write(path)
    assert not partial_files(path)
    with TraceReader(path) as r:
        assert r.version == VERSION and r.metadata["seed"] == PLAN.seed
        assert r.metadata["plan"]["name"] == PLAN.name
        assert r.plan() == PLAN  # the resolved plan round-trips
        assert r.num_batches == 3  # two event batches, one of other rows; summary is last
        np.testing.assert_allclose(
            r.batch_min_start_s[:2],
            [_events(100)["start_s"].min(), 1 + _events(100)["start_s"].min()],
        )
        first = r.batch(0)
        assert first.num_rows == 100
        # event batches are sorted by (start, asynchronous first)
        key = S.event_sort_key(
            first.column("start_s").to_numpy(), first.column("kind").indices.to_numpy()
        )
        assert (np.diff(key.astype(np.float64)) >= 0).all()
        other = r.batch(2).to_pylist()
        assert other[0]["kind"] == "workload" and other[0]["values"] == [1.0, 2.0]
        assert other[1]["op"] == "dropped_tokens" and other[1]["values"] is None
        assert r.summary_rows("iteration")[0]["end_s"] == 2.0


def test_dictionaries_and_schema_are_stable():
    """Codes are positions in the published name lists; engine op names are all there."""
    from clustersim.engine.recorder import Kind, Op

    assert S.KINDS[:3] == tuple(k.name.lower() for k in Kind)
    assert tuple(o.name.lower() for o in Op) == S.ENGINE_OPS
    assert "request" in S.KINDS  # reserved for serving
    assert S.schema().names == list(S.COLUMNS)


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_no_file(tmp_path, error):
    path = tmp_path / "t.arrow"
    with pytest.raises(type(error)), TraceWriter(path, _meta()) as w:
        w.write_events(**_events(50))
        assert partial_files(path) == [w.partial] and not path.exists()
        raise error
    assert not path.exists() and not partial_files(path)


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.arrow"
    _write(good)
    data = good.read_bytes()
    files = {}
    files["truncated"] = tmp_path / "truncated.arrow"
    files["truncated"].write_bytes(data[: len(data) // 2])
    damaged = bytearray(data)
    damaged[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    files["damaged"] = tmp_path / "damaged.arrow"
    files["damaged"].write_bytes(bytes(damaged))
    files["not arrow"] = tmp_path / "plan.arrow"
    files["not arrow"].write_text("name: x\n")
    files["empty"] = tmp_path / "empty.arrow"
    files["empty"].write_bytes(b"")
    foreign = tmp_path / "foreign.arrow"
    with pa.ipc.new_file(str(foreign), pa.schema([("x", pa.int64())])) as w:
        w.write_batch(pa.record_batch([pa.array([1, 2])], names=["x"]))
    files["foreign"] = foreign
    files["newer"] = tmp_path / "newer.arrow"
    _write(files["newer"], version=VERSION + 1)
    incomplete = tmp_path / "incomplete.arrow"  # complete Arrow file, but no batch index
    with pa.ipc.new_file(str(incomplete), S.schema(_meta())) as w:
        pass
    files["incomplete"] = incomplete
    files["missing"] = tmp_path / "missing.arrow"
    return files


WORDS = {
    "truncated": "not a complete Arrow",
    "damaged": "damaged",
    "not arrow": "not a complete",
    "empty": "not a complete",
    "foreign": "not a clustersim trace",
    "newer": "newer clustersim",
    "incomplete": "incomplete",
    "missing": "not found",
}


def _read_all(path: Path) -> None:
    from clustersim.analyze import analyze

    with TraceReader(path) as r:
        for _ in r.batches():
            pass
    analyze(path)


@pytest.mark.parametrize("case", list(WORDS))
def test_bad_files_raise_one_trace_error(tmp_path, case):
    path = _bad_files(tmp_path)[case]
    with pytest.raises(TraceError) as info:
        _read_all(path)
    message = str(info.value)
    assert str(path) in message and WORDS[case] in message and "\n" not in message


@pytest.mark.parametrize("command", ["analyze", "replay"])
@pytest.mark.parametrize("case", ["truncated", "foreign", "newer", "missing"])
def test_cli_rejects_bad_files_with_exit_2(tmp_path, command, case):
    path = _bad_files(tmp_path)[case]
    result = CliRunner().invoke(app, [command, str(path)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_interrupted_cli_run_leaves_no_trace(tmp_path):
    """Ctrl-C (SIGINT) while `clustersim run --trace` writes: no file under the final name,
    no partial file, exit code 130."""
    import signal
    import time

    out = tmp_path / "run.arrow"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clustersim.cli",
            "run",
            "--set",
            "parallel.num_microbatches=512",
            "--trace-file",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not partial_files(out) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    assert not out.exists() and not partial_files(out)


def test_metadata_is_json(tmp_path):
    path = tmp_path / "t.arrow"
    _write(path)
    meta = pa.ipc.open_file(str(path)).schema.metadata
    assert json.loads(meta[S.META_PLAN])["parallel"]["tp"] == PLAN.parallel.tp
    assert int(meta[S.META_VERSION]) == VERSION

"""Issue 13, the CLI side: one error boundary (exit 3, --debug), safe outputs (regular files,
never an input, unique temporary names, removed on SIGTERM), escaped rich output, strict JSON,
the work estimate, search option checks, and a small fuzz of option values."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clustersim import cli
from clustersim.spec.outputs import OutputError, atomic_output, check_output, temp_files
from clustersim.trace import TraceReader

ENV = {**os.environ, "COLUMNS": "200"}


def _cli(*args: str, timeout: float = 120, env: dict | None = None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "clustersim.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or ENV,
        cwd=cwd,
    )


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["clustersim", *args])
    monkeypatch.setattr(cli, "_debug", False)
    with pytest.raises(SystemExit) as info:
        cli.main()
    out, err = capsys.readouterr()
    return info.value.code, out, err


# ---- the error boundary ------------------------------------------------------------------
def _boom(*args, **kwargs):
    raise RuntimeError("boom\nsecond line")


def test_internal_error_is_exit_3_and_one_line(monkeypatch, capsys):
    monkeypatch.setattr("clustersim.run.evaluate.evaluate", _boom)
    code, _, err = _main(monkeypatch, capsys, "check", "--static")
    assert code == 3
    assert err.strip().count("\n") == 0, err
    assert err.startswith("internal error: RuntimeError: boom second line (please report")
    assert "Traceback" not in err


@pytest.mark.parametrize("how", ["option", "env"])
def test_debug_shows_the_traceback(monkeypatch, capsys, how):
    monkeypatch.setattr("clustersim.run.evaluate.evaluate", _boom)
    if how == "env":
        monkeypatch.setenv("CLUSTERSIM_DEBUG", "1")
        args = ("check", "--static")
    else:
        monkeypatch.delenv("CLUSTERSIM_DEBUG", raising=False)
        args = ("--debug", "check", "--static")
    code, _, err = _main(monkeypatch, capsys, *args)
    assert code == 3
    assert "Traceback" in err and "RuntimeError: boom" in err


def test_help_documents_exit_codes():
    out = _cli("--help").stdout
    assert "Exit codes" in out and "130" in out and "internal error" in out


def test_validate_malformed_csv_is_exit_2(monkeypatch, capsys):
    """A packaged CSV with a missing column surfaces as a KeyError deep in a fit."""

    def malformed(*args, **kwargs):
        raise KeyError("latency_us")

    monkeypatch.setattr("clustersim.calibration.validate.run_validation", malformed)
    code, _, err = _main(monkeypatch, capsys, "validate", "--set-name", "kernels")
    assert code == 2, err
    assert "unusable measurements" in err and "latency_us" in err and "Traceback" not in err


def test_non_ascii_name_on_an_ascii_terminal():
    env = {**ENV, "PYTHONIOENCODING": "ascii"}
    proc = _cli("check", "--static", "--set", "name=plän-ü", env=env)
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr and "pl\\xe4n" in proc.stdout


# ---- outputs -------------------------------------------------------------------------------
def test_check_output_refuses_special_files_and_inputs(tmp_path):
    plan = tmp_path / "p.yaml"
    plan.write_text("x")
    with pytest.raises(OutputError, match="directory"):
        check_output(tmp_path, [])
    with pytest.raises(OutputError, match="input"):
        check_output(plan, [plan])
    link = tmp_path / "link.yaml"
    link.symlink_to(plan)
    with pytest.raises(OutputError, match="same file"):
        check_output(link, [plan])
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="FIFO"):
        check_output(fifo)
    assert check_output(tmp_path / "new.arrow", [plan]) == tmp_path / "new.arrow"


def test_atomic_output_removes_its_temporary_file(tmp_path):
    out = tmp_path / "o.txt"
    with pytest.raises(KeyboardInterrupt), atomic_output(out) as tmp:
        tmp.write_text("half")
        assert temp_files(out) == [tmp]
        raise KeyboardInterrupt
    assert not out.exists() and temp_files(out) == []
    with atomic_output(out) as tmp:
        tmp.write_text("whole")
    assert out.read_text() == "whole" and temp_files(out) == []
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture()
def plan_file(tmp_path) -> Path:
    import yaml

    from clustersim.spec import load_plan

    data = load_plan(None, ()).model_dump(mode="json")
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("verb", ["run", "check", "search"])
def test_output_equal_to_input_is_refused(plan_file, verb):
    before = plan_file.read_bytes()
    args = {
        "run": ("run", str(plan_file), "--trace-file", str(plan_file)),
        "check": ("check", str(plan_file), "--static", "-o", str(plan_file)),
        "search": ("search", str(plan_file), "-o", str(plan_file), "--limit", "0"),
    }[verb]
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert "input of this command" in proc.stderr and "Traceback" not in proc.stderr
    assert plan_file.read_bytes() == before


def test_analyze_perfetto_over_its_trace_is_refused(tmp_path):
    trace = tmp_path / "t.arrow"
    assert _cli("run", "--trace-file", str(trace)).returncode in (0, 1)
    before = trace.read_bytes()
    proc = _cli("analyze", str(trace), "--perfetto", str(trace))
    assert proc.returncode == 2 and "input of this command" in proc.stderr
    assert trace.read_bytes() == before


@pytest.mark.parametrize("option", ["--trace-file", "-o"])
def test_fifo_or_directory_output_refused_without_blocking(tmp_path, option):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    verb = ("run",) if option == "--trace-file" else ("check", "--static")
    proc = _cli(*verb, option, str(fifo), timeout=60)
    assert proc.returncode == 2 and "FIFO" in proc.stderr, proc.stderr
    assert fifo.is_fifo()
    proc = _cli(*verb, option, str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "directory" in proc.stderr, proc.stderr


def test_two_concurrent_writers_each_leave_a_valid_file(tmp_path):
    out = tmp_path / "same.arrow"
    args = ["run", "--set", "parallel.num_microbatches=64", "--trace-file", str(out)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "clustersim.cli", *args, "--set", f"seed={seed}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for seed in (1, 2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode in (0, 1), err
    with TraceReader(out) as reader:  # whole and valid: one of the two runs
        assert reader.metadata["seed"] in (1, 2)
    assert temp_files(out) == []


def test_sigterm_of_a_traced_run_leaves_no_temporary_file(tmp_path):
    out = tmp_path / "run.arrow"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clustersim.cli", "run", "--set",
         "parallel.num_microbatches=512", "--trace-file", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not temp_files(out) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert b"Traceback" not in err and b"terminated" in err
    assert not out.exists() and temp_files(out) == []


# ---- printing ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["[/bold]", "run [old]", "ablation [/w shared]"])
def test_rich_markup_in_a_plan_name_prints_literally(plan_file, name):
    import yaml

    data = yaml.safe_load(plan_file.read_text())
    plan_file.write_text(yaml.safe_dump({**data, "name": name}))
    proc = _cli("check", "--static", str(plan_file))
    assert proc.returncode in (0, 1), proc.stderr
    assert proc.stdout.startswith(name + ":"), proc.stdout[:200]


def test_json_is_strict_with_non_finite_values(monkeypatch, capsys):
    from clustersim.run import evaluate as ev

    real = ev.Verdict.to_dict

    def to_dict(self):
        data = real(self)
        data["metrics"] = {"iteration_time_ms": float("inf"), "mfu_pct": float("nan")}
        return data

    monkeypatch.setattr(ev.Verdict, "to_dict", to_dict)
    code, out, err = _main(monkeypatch, capsys, "check", "--static", "--json")
    assert code in (0, 1), err
    data = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data["metrics"] == {"iteration_time_ms": None, "mfu_pct": None}


# ---- work estimate -------------------------------------------------------------------------
def test_work_estimate_refuses_and_max_events_forces(monkeypatch, capsys):
    from clustersim.run.workload import DEFAULT_MAX_EVENTS

    code, _, err = _main(monkeypatch, capsys, "run", "--set", "parallel.num_microbatches=100000")
    assert code == 2 and "--max-events 51200000" in err, err
    assert f"{DEFAULT_MAX_EVENTS:,}" in err
    # the same refusal with a small limit, and the override lets a run through
    code, _, err = _main(monkeypatch, capsys, "run", "--max-events", "100")
    assert code == 2 and "--max-events 4096" in err
    code, out, err = _main(monkeypatch, capsys, "run", "--max-events", "4096")
    assert code in (0, 1) and "events simulated" in out


def test_static_check_skips_the_estimate(monkeypatch, capsys):
    code, _, err = _main(
        monkeypatch, capsys, "check", "--static", "--set", "parallel.num_microbatches=100000"
    )
    assert code in (0, 1), err


# ---- search options ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--gpus", "0"), "--gpus"),
        (("--gpus", str(2**40)), "--gpus"),
        (("--seed", "-1"), "--seed"),
        (("--tp", "0,2"), "--tp"),
        (("--schedules", "zigzag"), "--schedules"),
    ],
)
def test_search_option_validation(monkeypatch, capsys, tmp_path, args, message):
    out = tmp_path / "s.parquet"
    code, _, err = _main(monkeypatch, capsys, "search", "-o", str(out), *args)
    assert code == 2 and message in err, err
    assert not out.exists()


def test_search_resume_on_a_table_missing_a_column(monkeypatch, capsys, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "s.parquet"
    pq.write_table(pa.table({"candidate_id": ["a"]}), out)
    code, _, err = _main(monkeypatch, capsys, "search", "-o", str(out), "--resume")
    assert code == 2 and "missing column" in err, err


def test_search_workers_die_with_the_parent(tmp_path):
    """SIGTERM of search: exit 143, no worker left behind."""
    out = tmp_path / "s.parquet"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clustersim.cli", "search", "--workers", "2", "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    children: list[int] = []
    while time.monotonic() < deadline and len(children) < 2:
        children = _children(proc.pid)
        time.sleep(0.05)
    assert children, "no workers started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(c) for c in children):
        time.sleep(0.1)
    assert not any(_alive(c) for c in children)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


# ---- fuzz ----------------------------------------------------------------------------------
_VALUES = st.one_of(
    st.integers(min_value=-5, max_value=64).map(str),  # small: a search stays cheap
    st.integers(min_value=2**25, max_value=2**64).map(str),  # refused before any work
    st.sampled_from(["", "nan", "inf", "-inf", "1e400", "0x10", "[/bold]", "é", "1,2,,3", "-"]),
)
_OPTIONS = st.sampled_from(
    [
        ("search", "--gpus"),
        ("search", "--seed"),
        ("search", "--tp"),
        ("search", "--workers"),
        ("search", "--limit"),
        ("check", "--max-events"),
        ("analyze", "--window"),
    ]
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(option=_OPTIONS, value=_VALUES)
def test_fuzz_option_values(monkeypatch, capsys, tmp_path, option, value):
    verb, flag = option
    args = [verb, f"{flag}={value}"]
    if verb == "search":  # never simulate: a missing trace or no candidate budget
        args += ["--limit", "0", "-o", str(tmp_path / "fuzz.parquet"), "--schedules", "1f1b"]
        args += ["--recompute", "none", "--mbs", "1", "--pp", "1,2"]
    elif verb == "analyze":
        args.insert(1, str(tmp_path / "missing.arrow"))
    else:  # audit only: the option is parsed and validated, nothing simulated
        args += ["--static"]
    code, _, err = _main(monkeypatch, capsys, *args)
    assert code in (0, 1, 2), (args, code, err)
    assert "Traceback" not in err and "internal error" not in err, (args, err)

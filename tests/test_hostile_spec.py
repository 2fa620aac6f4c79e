"""Hostile and careless plan input (issue 13): every bad number, type, key or file is a
PlanError naming the field (and what is valid), never another exception, a hang or a silently
wrong number."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clustersim.spec import PlanError, load_plan, plan_from_dict
from clustersim.spec.load import MAX_DEPTH
from clustersim.spec.request_trace import read_request_trace

BASE: dict[str, Any] = {
    "name": "hostile",
    "seed": 0,
    "model": {"preset": "mixtral-8x7b"},
    "hardware": {"gpu": "H100-SXM", "num_nodes": 2, "gpus_per_node": 8},
    "parallel": {"tp": 2, "pp": 2, "dp": 4, "ep": 8, "etp": 1},
}


def _leaves(node: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(node, dict):
        out = [path] if path else []
        for key, value in node.items():
            out += _leaves(value, (*path, key))
        return out
    return [path]


RESOLVED = load_plan(None, []).model_dump(mode="json")  # every field the schema has
PATHS = sorted(set(_leaves(RESOLVED)) - {("name",), ("model", "name"), ("hardware", "gpu")})

HOSTILE = st.one_of(
    st.sampled_from([2**20 + 1, 2**31, 2**40, 2**63, 2**64, 2**100, 1e17, 1e30, 1e308, -1, 0,
                     -0.0, 0.5, 1.5, math.inf, -math.inf, math.nan, "", "x", "1e9", "1e17",
                     True, False, None, [], {}, [1, [2]], {"a": 1}, [math.nan]]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
)  # fmt: skip


def _set(raw: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    node = raw
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node.get(key), dict | None) else node
        if not isinstance(node, dict):
            break
    node[path[-1]] = value
    return raw


def _finite(node: Any) -> bool:
    if isinstance(node, dict):
        return all(_finite(v) for v in node.values())
    if isinstance(node, list):
        return all(_finite(v) for v in node)
    if isinstance(node, float):
        return math.isfinite(node)
    if isinstance(node, int) and not isinstance(node, bool):
        return abs(node) < 2**63
    return True


def _check_edit(path: tuple[str, ...], value: Any) -> None:
    dotted = ".".join(path)
    try:
        plan = plan_from_dict(_set(BASE, path, value), "fuzz.yaml")
    except PlanError as exc:
        names = [issue.path for issue in exc.issues]
        related = [n for n in names if n and (n == dotted or dotted.startswith(n + ".")
                                              or n.startswith(dotted + "."))]  # fmt: skip
        assert related, (dotted, value, exc.render())
        assert exc.render().startswith("fuzz.yaml: ")
        return
    assert _finite(plan.model_dump(mode="json")), (dotted, value)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(PATHS), value=HOSTILE)
@example(path=("model", "preset"), value=None)  # no preset: the error names model.preset
def test_random_field_edit_is_a_plan_error_naming_the_field(path, value):
    _check_edit(path, value)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(PATHS), value=HOSTILE)
def test_random_field_edit_long(path, value):
    _check_edit(path, value)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(PATHS), value=HOSTILE, as_json=st.booleans())
def test_random_field_edit_in_a_file(tmp_path_factory, path, value, as_json):
    """The same edits through a YAML or JSON file (inf and NaN as .inf / Infinity)."""
    folder = tmp_path_factory.mktemp("plans")
    raw = _set(BASE, path, value)
    file = folder / ("plan.json" if as_json else "plan.yaml")
    file.write_text(json.dumps(raw) if as_json else yaml.safe_dump(raw))
    try:
        load_plan(file)
    except PlanError as exc:
        assert str(file) in exc.render()


@pytest.mark.parametrize(
    ("override", "field", "words"),
    [
        ("model.moe.capacity_factor=1.0e+17", "model.moe.capacity_factor", "<= 1000000"),
        ("model.moe.router_skew=100", "model.moe.router_skew", "<= 10"),
        ("hardware.intra_node.latency_us=.inf", "hardware.intra_node.latency_us", "finite"),
        ("hardware.inter_node.bandwidth_gbps=.nan", "hardware.inter_node.bandwidth_gbps", "finite"),
        ("hardware.calibration.gemm.efficiency=2", "hardware.calibration.gemm.efficiency", "<= 1"),
        ("hardware.calibration.kernel.fixed_us=.inf", "hardware.calibration.kernel.fixed_us",
         "finite"),
        ("parallel.tp=1099511627776", "parallel.tp", "<= 1048576"),
        ("parallel.num_microbatches=1000000000", "parallel.num_microbatches", "<= 1048576"),
        ("model.num_layers=1000000000", "model.num_layers", "<= 65536"),
        ("workload.requests.num=10000000000", "workload.requests.num", "<="),
        ("workload.requests.rate_per_s=-1", "workload.requests.rate_per_s", "> 0"),
        ("seed=-1", "seed", ">= 0"),
        ("parallel.dp=300000", "parallel", "at most 1048576"),
    ],
)  # fmt: skip
def test_out_of_range_number_names_field_and_range(override, field, words):
    with pytest.raises(PlanError) as info:
        load_plan(None, [override])
    issue = info.value.issues[0]
    assert issue.path == field
    assert words in issue.render()


def test_duplicate_yaml_key_is_refused_with_lines(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(BASE, sort_keys=False) + "parallel: {tp: 16, pp: 1, dp: 1}\n")
    with pytest.raises(PlanError) as info:
        load_plan(path)
    issue = info.value.issues[0]
    first = next(i for i, line in enumerate(path.read_text().splitlines(), 1)
                 if line.startswith("parallel:"))  # fmt: skip
    last = len(path.read_text().splitlines())
    assert issue.path == "parallel" and "duplicate key" in issue.message
    assert f"lines {first}, {last}" in issue.message


def test_duplicate_nested_key_and_json_key(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("parallel:\n  tp: 2\n  tp: 4\n")
    with pytest.raises(PlanError, match=r"parallel\.tp: duplicate key \(lines 2, 3\)"):
        load_plan(path)
    path = tmp_path / "p.json"
    path.write_text('{"name": "a",\n "parallel": {"tp": 1},\n "parallel": {"tp": 2}}')
    with pytest.raises(PlanError, match=r"parallel: duplicate key \(lines 2, 3\)"):
        load_plan(path)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    raw = copy.deepcopy(BASE)
    text = yaml.safe_dump(raw, sort_keys=False).replace("parallel:", "parallel: &par")
    text += "targets: {}\n"
    path = tmp_path / "p.yaml"
    path.write_text(text)
    assert load_plan(path).parallel.tp == 2


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 100_000])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_deep_nesting_is_a_plan_error(tmp_path, depth, suffix):
    path = tmp_path / f"p{suffix}"
    path.write_text('{"name": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(PlanError, match="nest"):
        load_plan(path)


def test_deep_block_yaml_names_the_path(tmp_path):
    lines = [f"{'  ' * i}k{i}:" for i in range(MAX_DEPTH + 2)]
    path = tmp_path / "p.yaml"
    path.write_text("\n".join(lines) + " 1\n")
    with pytest.raises(PlanError, match=r"k0\.k1\.k2.*nested more than"):
        load_plan(path)


def _without_blocking(fn) -> BaseException | None:
    """Run ``fn`` on a thread; fail if it is still running after 20 s (blocked on a FIFO)."""
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
def test_fifo_plan_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "plan.yaml"
    os.mkfifo(fifo)
    exc = _without_blocking(lambda: load_plan(fifo))
    assert isinstance(exc, PlanError) and "FIFO" in str(exc)


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null"])
def test_device_plan_is_refused(path):
    if not os.path.exists(path):
        pytest.skip(f"no {path}")
    exc = _without_blocking(lambda: load_plan(path))
    assert isinstance(exc, PlanError) and "character device" in str(exc)


def test_directory_and_huge_plan_are_refused(tmp_path):
    with pytest.raises(PlanError, match="is a directory"):
        load_plan(tmp_path)
    big = tmp_path / "big.yaml"
    with big.open("wb") as f:
        f.truncate(64 * 2**20)  # sparse
    with pytest.raises(PlanError, match="at most"):
        load_plan(big)


@pytest.mark.parametrize(
    ("row", "column"),
    [
        ("0,inf,5", "num_prefill_tokens"),
        ("0,1e30,5", "num_prefill_tokens"),
        ("0,nan,5", "num_prefill_tokens"),
        ("0,10,-3", "num_decode_tokens"),
        ("0,10,2.5", "num_decode_tokens"),
        ("inf,10,5", "arrived_at"),
        ("nan,10,5", "arrived_at"),
        ("1e300,10,5", "arrived_at"),
    ],
)
def test_request_trace_values_are_checked(tmp_path, row, column):
    path = tmp_path / "t.csv"
    path.write_text(f"arrived_at,num_prefill_tokens,num_decode_tokens\n0,3,4\n{row}\n")
    with pytest.raises(ValueError) as info:
        read_request_trace(path)
    message = str(info.value)
    assert str(path) in message and f"'{column}' row 2" in message and "valid:" in message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_request_trace_fifo_is_a_plan_error(tmp_path):
    os.mkfifo(tmp_path / "t.csv")
    raw = copy.deepcopy(BASE)
    raw["workload"] = {"mode": "inference", "requests": {"arrival": "trace", "trace": "t.csv"}}
    exc = _without_blocking(lambda: plan_from_dict(raw, "p.yaml", tmp_path))
    assert isinstance(exc, PlanError)
    assert exc.issues[0].path == "workload.requests.trace" and "FIFO" in str(exc)


def test_length_file_values_are_checked(tmp_path):
    (tmp_path / "l.csv").write_text("n\n10\n1e30\n")
    raw = copy.deepcopy(BASE)
    raw["workload"] = {"seq_len": {"dist": "empirical", "file": "l.csv", "column": "n"}}
    with pytest.raises(PlanError) as info:
        plan_from_dict(raw, "p.yaml", tmp_path)
    assert info.value.issues[0].path == "workload.seq_len.file"
    assert "row 2" in str(info.value) and "1e+30" in str(info.value)


def test_capacity_never_overflows():
    from clustersim.routing.dispatch import megatron_capacity

    cap = megatron_capacity(np.array([2**40, 1, 0]), 8, 8, 1e6)
    assert (cap >= 0).all() and cap[0] > 2**40 and cap[2] == 0
    assert (megatron_capacity(np.array([2**62]), 8, 8, 1e6) > 0).all()


@pytest.mark.parametrize("skew", [10.0, 40.0, 100.0])
def test_strong_skew_probabilities_stay_valid(skew):
    """The k-subset probabilities never go negative (numpy: "pvals < 0") and keep the two
    most popular experts as the likeliest pair."""
    import itertools

    from clustersim.routing.gating import zipf_weights
    from clustersim.routing.subsets import subset_probabilities

    subsets = np.array(list(itertools.combinations(range(8), 2)))
    probs = subset_probabilities(zipf_weights(8, skew), subsets)
    assert (probs >= 0).all() and abs(probs.sum() - 1) < 1e-9
    assert subsets[probs.argmax()].tolist() == [0, 1]
    np.random.default_rng(0).multinomial(100, probs / probs.sum())


@pytest.mark.parametrize("mode", ["tokens", "counts"])
def test_largest_skew_routes(mode):
    from clustersim.routing.router import Router
    from clustersim.spec.schema import MAX_ROUTER_SKEW, MoESpec

    moe = MoESpec(num_experts=8, top_k=2, router_skew=MAX_ROUTER_SKEW, capacity_factor=1e6)
    outcome = Router(moe, 8, 0, mode=mode).route(0, 0, np.full(8, 4096))
    assert outcome.routed_tokens == 8 * 4096 * 2 and outcome.dropped_tokens == 0


@pytest.mark.parametrize(
    "override",
    ["model.moe.capacity_factor=1.0e+17",
     *(pytest.param(o, marks=pytest.mark.slow) for o in ("hardware.intra_node.latency_us=.inf",
       "model.moe.router_skew=100", "parallel.tp=1099511627776"))],
)  # fmt: skip
def test_cli_check_exits_2_without_traceback(override):
    proc = subprocess.run(
        [sys.executable, "-m", "clustersim.cli", "check", "--set", override],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert override.split("=")[0] in proc.stdout + proc.stderr


def test_plans_in_repo_still_load():
    for path in Path(__file__).parents[1].glob("examples/**/*.yaml"):
        try:
            load_plan(path)
        except PlanError as exc:  # some examples are wrong on purpose; never by our bounds
            assert "less than or equal" not in str(exc) and "finite" not in str(exc), str(exc)

"""One verdict everywhere (issue 12): check, run, compare (against itself and its pair), replay
and search's evaluation of the same plan give the same findings, metrics and exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clustersim.cli import app
from clustersim.explore.backends import simulate_candidate
from clustersim.spec import load_plan

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SEEDS = CONFIGS / "seeds"
PLANS = sorted(p.name for p in SEEDS.glob("*.yaml"))
EXAMPLES = sorted(p.name for p in CONFIGS.glob("*.yaml"))  # example plans beside the seeds
FAST = ("000_required.yaml", "001_current.yaml", "001_required.yaml", "002_current.yaml")
PAIRS = {p: p.replace("current", "required") for p in PLANS if "current" in p}
PAIRS.update({v: k for k, v in PAIRS.items()})


def _json(*args: str) -> tuple[dict, int]:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout), result.exit_code


def _key(data: dict) -> tuple:
    """The verdict, less the relative claims (``claims.relative.*``): compare decides those
    against the other plan, check lists them as undecided."""
    relative = "claims.relative."
    findings = [
        (f["node"], f["severity"], f["message"])
        for f in data["findings"]
        if not f["node"].startswith(relative)
    ]
    unchecked = [u for u in data["unchecked"] if not u.startswith(relative)]
    return findings, data["metrics"], unchecked, data["exit_code"], data["assumptions"]


def _same_verdict(name: str, folder: Path = SEEDS) -> None:
    path = str(folder / name)
    check, check_rc = _json("check", path)
    run, run_rc = _json("run", path)
    assert check_rc == run_rc == check["exit_code"]
    assert _key(check) == _key(run)
    assert check["layout"] == run["layout"] and check["simulation_note"] == run["simulation_note"]
    pair = PAIRS.get(name, name) if folder == SEEDS else None
    if pair is not None and (SEEDS / pair).exists():
        both, rc = _json("compare", path, str(SEEDS / pair))
        assert (
            _key(both["results"][0]) == _key(check)
            and both["results"][0]["layout"] == check["layout"]
        )
        assert rc == max(r["exit_code"] for r in both["results"])
    row = simulate_candidate(load_plan(path).model_dump(mode="json"))
    if check["metrics"]["latency_ms"] is None:
        assert row["status"] == "unsupported"
    else:
        assert row["exit_code"] == check["exit_code"]
        assert row["latency_ms"] == pytest.approx(check["metrics"]["latency_ms"])
        failed = {f["node"].removeprefix("targets.") for f in check["findings"]}
        assert set((row["failed_targets"] or "").split(",")) - {""} <= failed


@pytest.mark.parametrize("name", FAST)
def test_every_verb_gives_the_same_verdict(name):
    _same_verdict(name)


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_verb_gives_the_same_verdict_on_the_examples(name):
    _same_verdict(name, CONFIGS)


@pytest.mark.slow
@pytest.mark.parametrize("name", [p for p in PLANS if p not in FAST])
def test_every_verb_gives_the_same_verdict_slow(name):
    _same_verdict(name)


def test_compare_against_itself_is_check():
    path = str(SEEDS / "001_current.yaml")
    check, _ = _json("check", path)
    both, rc = _json("compare", path, path)
    assert [_key(r) for r in both["results"]] == [_key(check)] * 2 and rc == check["exit_code"]


@pytest.mark.parametrize("name", PLANS)
def test_static_lists_every_claim_it_cannot_decide(name):
    data, _ = _json("check", str(SEEDS / name), "--static")
    decided = {f["node"] for f in data["findings"]}
    plan = load_plan(SEEDS / name)
    simulated = {
        "latency_ms", "ttft_ms", "tpot_ms", "throughput_tokens_per_ms", "comm_overhead_pct",
        "load_balance_pct", "gpu_utilization_pct",
    }  # fmt: skip
    for claim, value in plan.claims.model_dump(exclude_none=True).items():
        node = f"claims.{claim}"
        if claim in simulated:
            assert node in data["unchecked"], node
        elif node not in decided:  # a static claim that holds, or one the audit cannot count
            assert node in data["unchecked"] or _holds(data, claim, value), node
    assert data["metrics"]["latency_ms"] is None and data["simulation_note"]


def _holds(data: dict, claim: str, value) -> bool:
    lay, mem = data["layout"], data["memory"] or {}
    computed = {**lay, **mem, "total_gpus": lay["world_size"]}.get(claim)
    return (
        computed is None
        or computed == value
        or claim.endswith("_gib")
        or claim in ("total_experts", "gpus_per_stage", "layers_per_stage")
    )

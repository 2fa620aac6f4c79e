"""The coverage table of docs/seed-reviews/README.md: every row's command still gives the
stated verdict on its node (run in-process: evaluate for check, compare for compare)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

from clustersim.explore.compare import compare
from clustersim.run.evaluate import evaluate
from clustersim.spec import load_plan

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "docs" / "seed-reviews" / "README.md"
ROW = re.compile(
    r"^\| (\d{3}_\w+) \| `([\w.]+)` \| (.*) \| `(clustersim [^`]+)` \| (.*) \| (\w+) \|$"
)


def rows() -> list[tuple[str, str, str, str]]:
    out = []
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        m = ROW.match(line)
        if m:
            out.append((m[1], m[2], m[4], m[6]))
    return out


@cache
def verdict_of(command: str):
    words = command.split()
    if words[1] == "check":
        return evaluate(load_plan(ROOT / words[2]))
    assert words[1] == "compare", command
    plans = [load_plan(ROOT / w) for w in words[2:]]
    return compare(plans, attribution=False).results[-1]


def test_the_table_covers_every_seed_plan():
    found = {r[0] for r in rows()}
    assert found == {p.stem for p in (ROOT / "configs" / "seeds").glob("*.yaml")}
    assert len(rows()) > 60


@pytest.mark.parametrize("plan, node, command, verdict", rows(), ids=lambda x: str(x)[:40])
def test_row_verdict_holds(plan, node, command, verdict):
    assert plan in command
    v = verdict_of(command)
    found = [f for f in v.findings if f.node == node]
    if node in v.unchecked:
        got = "undecided"
    elif found:
        got = found[0].severity
    else:
        got = "correct"
    assert got == verdict, (node, [f.message for f in found])

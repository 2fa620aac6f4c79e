"""Shared fixtures: a small valid plan as a dict, and a helper that writes one to a YAML file."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

DATA_DIR = Path(__file__).parent / "data"

_PLAN: dict[str, Any] = {
    "name": "test-mixtral-2x8",
    "seed": 0,
    "model": {"preset": "mixtral-8x7b"},
    "hardware": {"gpu": "H100-SXM", "num_nodes": 2, "gpus_per_node": 8},
    "parallel": {"tp": 2, "pp": 2, "dp": 4, "ep": 8, "etp": 1},
}


@pytest.fixture
def plan_dict() -> dict[str, Any]:
    """Mixtral-8x7B preset on 2 x 8 H100-SXM, tp2 pp2 dp4 ep8 etp1 (a fresh copy per test)."""
    return copy.deepcopy(_PLAN)


@pytest.fixture
def write_plan(tmp_path: Path) -> Callable[..., Path]:
    """``write_plan(d, name="plan.yaml")`` writes ``d`` as YAML under tmp_path; returns the path."""

    def write(data: Any, name: str = "plan.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    return write

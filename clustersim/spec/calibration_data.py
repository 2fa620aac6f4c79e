"""The packaged calibration data files: one YAML file of fitted cost-model parameters per GPU
generation (``clustersim/spec/calibration/<generation>.yaml``), written by
``clustersim calibrate`` and read as package data (works from an installed wheel)."""

from __future__ import annotations

import copy
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

PACKAGE = "clustersim.spec"
FOLDER = "calibration"


def calibration_dir() -> Path:
    """Folder of the packaged data files (for ``clustersim calibrate --write``)."""
    return Path(str(resources.files(PACKAGE).joinpath(FOLDER)))


@cache
def calibration_generations() -> tuple[str, ...]:
    """Generations with a data file, sorted."""
    folder = resources.files(PACKAGE).joinpath(FOLDER)
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")))


@cache
def _load(generation: str) -> dict[str, Any] | None:
    if generation not in calibration_generations():
        return None
    text = resources.files(PACKAGE).joinpath(FOLDER, f"{generation}.yaml").read_text()
    return yaml.safe_load(text)


def reload() -> None:
    """Forget the files read so far (after ``clustersim calibrate --write`` rewrote them)."""
    _load.cache_clear()
    calibration_generations.cache_clear()


def calibration_data(generation: str) -> dict[str, Any] | None:
    """The parameters of ``generation`` as nested dicts (a fresh copy), or None if unknown."""
    data = _load(generation)
    return copy.deepcopy(data) if data is not None else None

"""Moved: the validation against published measurements now lives in
``clustersim.calibration`` (``validate``: the sets, fits and leave-one-out; ``sets_training``:
the Narayanan et al. 2021 plans). This module re-exports the names older code imported."""

from __future__ import annotations

from clustersim.calibration.sets_training import chunks_for, dense_plan, dense_table
from clustersim.calibration.validate import RowResult, SetResult, run_validation

plan_for = dense_plan

__all__ = ["RowResult", "SetResult", "chunks_for", "dense_plan", "dense_table", "plan_for",
           "run_validation"]  # fmt: skip

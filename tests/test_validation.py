"""Calibration against Narayanan et al. 2021 Table 1: the published TFLOP/s per GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from clustersim.analysis.validation import chunks_for, plan_for, read_rows, validate, validate_row

CSV = Path(__file__).resolve().parent.parent / "configs" / "validation" / "narayanan2021_table1.csv"
ROWS = read_rows(CSV)


def test_plans_reproduce_the_table():
    # 1T row: 3072 GPUs = TP 8 x PP 64 x DP 6; 3072 sequences / DP 6 = 512 micro-batches of 1.
    plan = plan_for(ROWS[-1])
    assert plan.parallel.world_size == 3072 and plan.parallel.dp == 6
    assert plan.parallel.num_microbatches == 512
    # 128 layers / 64 stages = 2 per stage -> 2 chunks of 1 layer (interleaved).
    assert plan.parallel.virtual_stages == 2 and plan.parallel.schedule == "interleaved"
    assert chunks_for(15, 4) == 3 and chunks_for(6, 1) == 1


@pytest.mark.parametrize("index", range(5))
def test_small_rows_within_15_pct(index):
    row = validate_row(ROWS[index])
    assert abs(row.error_pct) <= 15.0, row


@pytest.mark.slow
def test_whole_table_goal():
    """Every row within +-15%, mean absolute error <= 8% (the calibration goal)."""
    errors = [abs(r.error_pct) for r in validate(CSV)]
    assert max(errors) <= 15.0 and sum(errors) / len(errors) <= 8.0

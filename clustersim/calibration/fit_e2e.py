"""End-to-end parameters: 1-D deterministic fits with leave-one-out (refit without the row).

A few cost-model parameters cannot be measured kernel by kernel and are fitted on end-to-end
rows (``VALIDATION.md``): ``kernel.framework_us`` (dense training), ``kernel.launch_us``
(eager serving decode) and
``kernel.graph_launch_us`` (CUDA-graph serving decode). Each is one number fitted by a 1-D
search over the rows of one set.

Every row is simulated once per grid value of the parameter it depends on; between grid values
its predicted *time* (the inverse of a rate) is interpolated linearly (exact where the time is
linear in the parameter: every kernel carries the overhead on the critical path). The fit is
the value of a fine grid (``FINE_STEPS`` points over the grid's range) that minimises the mean
|relative error| of the fitted rows; ties go to the smallest value (deterministic). The
out-of-sample prediction of a fitted row uses the value refitted without it; rows that fit no
parameter are out of sample by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FINE_STEPS = 2001


@dataclass(frozen=True)
class Curve:
    """One row's prediction as a function of a parameter: ``times`` (metric for ``time`` rows,
    1 / metric for ``rate`` rows) at ``grid`` values."""

    grid: tuple[float, ...]
    times: tuple[float, ...]
    rate: bool

    def metric(self, value: float | np.ndarray) -> np.ndarray:
        """The predicted metric at ``value`` (linear interpolation in time)."""
        t = np.interp(value, self.grid, self.times)
        return 1.0 / t if self.rate else t

    @classmethod
    def of(cls, grid: Sequence[float], metrics: Sequence[float], rate: bool) -> Curve:
        """From predicted metrics at the grid values."""
        m = np.asarray(metrics, dtype=float)
        return cls(tuple(float(g) for g in grid), tuple(1.0 / m if rate else m), rate)


def fine_grid(grid: Sequence[float]) -> np.ndarray:
    """The values the 1-D search tries."""
    return np.linspace(min(grid), max(grid), FINE_STEPS)


def fit_1d(curves: Sequence[Curve], published: Sequence[float]) -> float:
    """The value minimising the mean |relative error| of ``curves`` against ``published``
    (the smallest such value of the fine grid)."""
    if not curves:
        raise ValueError("no rows to fit")
    xs = fine_grid(curves[0].grid)
    pred = np.stack([c.metric(xs) for c in curves])
    pub = np.asarray(published, dtype=float)[:, None]
    cost = np.mean(np.abs(pred / pub - 1.0), axis=0)
    return float(xs[int(np.argmin(cost))])


@dataclass(frozen=True)
class LooFit:
    """A parameter fitted on all its rows, and refitted without each of them."""

    name: str
    value: float
    without: dict[str, float]  # row id -> value fitted without that row
    grid: tuple[float, ...]


def fit_with_loo(
    name: str, ids: Sequence[str], curves: Sequence[Curve], published: Sequence[float]
) -> LooFit:
    """Fit ``name`` on every row, and leave each row out in turn (refit, no reuse of the full
    fit). With a single row there is nothing to refit on: its left-out value is NaN."""
    value = fit_1d(curves, published)
    without: dict[str, float] = {}
    for i, rid in enumerate(ids):
        rest = [j for j in range(len(ids)) if j != i]
        without[rid] = (
            fit_1d([curves[j] for j in rest], [published[j] for j in rest])
            if rest
            else float("nan")
        )
    return LooFit(name, value, without, tuple(curves[0].grid))


# ---- rows of the end-to-end sets --------------------------------------------------------------


@dataclass(frozen=True)
class E2ERow:
    """One published end-to-end measurement that clustersim can express.

    ``rate``: the metric is inversely proportional to time (throughput, TFLOP/s, MFU);
    ``param``: the end-to-end parameter its prediction depends on (None: none);
    ``fits``: whether the row takes part in fitting ``param`` (else it is out of sample by
    construction); ``cost``: relative simulation cost (the largest rows are started first).
    """

    row_id: str
    label: str
    metric: str
    published: float
    rate: bool
    param: str | None
    fits: bool
    note: str = ""
    cost: float = 1.0


@dataclass(frozen=True)
class Skipped:
    """A row of the data set that clustersim cannot express, and why."""

    row_id: str
    label: str
    reason: str


def nested(values: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{"kernel.launch_us": 5}`` -> ``{"kernel": {"launch_us": 5}}`` (calibration overrides)."""
    out: dict[str, dict[str, float]] = {}
    for dotted, value in values.items():
        section, name = dotted.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out

"""Fitting the cost model's calibration parameters to published measurements.

``clustersim calibrate`` (``calibrate.py``) runs the component fits and writes the packaged data
files ``clustersim/spec/calibration/<generation>.yaml``:

* ``fit_kernels``: GEMM and memory-bound kernel parameters from Vidur's per-operator profiles
  (``measurements/vidur_<gpu>.csv``);
* ``fit_attention``: FlashAttention efficiency from published TFLOP/s
  (``measurements/flash_attention.csv``);
* ``fit_comm`` (when present): collectives and DeepEP.

This module holds what the fits share: the measurement folder, a small deterministic
least-squares solver (numpy only) and error summaries. ``measurements/README.md`` documents the
data sets and their CSV formats.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from clustersim.spec.errors import PlanError, PlanIssue

PACKAGE = "clustersim.calibration"
MEASUREMENTS = "measurements"


def read_measurements(name: str, folder: Path | None = None) -> list[dict[str, str]]:
    """Rows of the CSV file ``name`` from ``folder``, or from the packaged measurements.

    Raises PlanError (one clear message) when the file is missing or not a CSV with a header.
    """
    if folder is None:
        source = f"{PACKAGE}/{MEASUREMENTS}/{name}"
        ref = resources.files(PACKAGE).joinpath(MEASUREMENTS, name)
        if not ref.is_file():
            raise PlanError(source, "packaged measurement file not found")
        text = ref.read_text(encoding="utf-8")
    else:
        path = Path(folder) / name
        source = str(path)
        if not path.is_file():
            raise PlanError(source, "measurement file not found")
        text = path.read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise PlanError(source, "no data rows")
    return rows


def require_columns(rows: list[dict[str, str]], columns: Sequence[str], source: str) -> None:
    """PlanError naming the missing columns, if any."""
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise PlanError(source, [PlanIssue("", "missing columns", ", ".join(missing))])


def number(row: dict[str, str], column: str, source: str, line: int) -> float:
    """A float cell; PlanError naming the row and column when it is not a number."""
    text = row.get(column)
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        issue = PlanIssue(f"row {line}, column {column}", "not a number", text)
        raise PlanError(source, [issue]) from None


# ---- least squares ------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A fitted parameter and its range: ``kind`` ``fraction`` maps to (0, 1) by a logistic,
    ``positive`` to (0, inf) by exp."""

    name: str
    kind: str  # "fraction" or "positive"
    start: float

    def to_value(self, z: float) -> float:
        """Parameter value of the unconstrained coordinate ``z``."""
        z = min(max(z, -60.0), 60.0)
        if self.kind == "fraction":
            return float(1.0 / (1.0 + np.exp(-z)))
        return float(np.exp(z))

    def to_z(self, value: float) -> float:
        """Unconstrained coordinate of ``value``."""
        if self.kind == "fraction":
            value = min(max(value, 1e-6), 1 - 1e-6)
            return float(np.log(value / (1 - value)))
        return float(np.log(max(value, 1e-9)))


def least_squares(
    residuals: Callable[[dict[str, float]], np.ndarray],
    params: Sequence[Param],
    grid: int = 9,
    iterations: int = 100,
) -> dict[str, float]:
    """Parameter values minimising ``sum(residuals(values)**2)``: the best point of a coarse
    grid around the starts, then Levenberg-Marquardt with a central-difference Jacobian, in
    unconstrained coordinates. Deterministic (no randomness)."""

    def values(z: np.ndarray) -> dict[str, float]:
        return {p.name: p.to_value(float(zi)) for p, zi in zip(params, z, strict=True)}

    def cost(z: np.ndarray) -> float:
        r = residuals(values(z))
        return float(np.sum(r * r))

    z0 = np.array([p.to_z(p.start) for p in params])
    offsets = np.linspace(-3.0, 3.0, grid)
    mesh = np.stack(np.meshgrid(*[offsets] * len(params), indexing="ij"), -1)
    candidates = z0 + mesh.reshape(-1, len(params))
    z = min(candidates, key=cost)
    damping, step = 1e-3, 1e-5
    current = cost(z)
    for _ in range(iterations):
        r = residuals(values(z))
        jac = np.empty((r.size, len(params)))
        for i in range(len(params)):
            dz = np.zeros(len(params))
            dz[i] = step
            jac[:, i] = (residuals(values(z + dz)) - residuals(values(z - dz))) / (2 * step)
        gram, grad = jac.T @ jac, jac.T @ r
        previous = current
        while damping < 1e12:
            delta = np.linalg.solve(gram + damping * np.diag(np.diag(gram) + 1e-12), -grad)
            trial_cost = cost(z + delta)
            if trial_cost < current:
                z, current = z + delta, trial_cost
                damping = max(damping / 10, 1e-9)
                break
            damping *= 10
        if previous - current <= 1e-12 * max(previous, 1e-30):
            break
    return values(z)


# ---- error summaries ----------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorSummary:
    """Relative errors ``predicted / measured - 1`` of one group of measurements."""

    n: int
    median: float
    mean: float
    worst: float  # the largest |error|, signed

    @classmethod
    def of(cls, errors: np.ndarray) -> ErrorSummary:
        """Summary of an array of relative errors."""
        errors = np.asarray(errors, dtype=float)
        if errors.size == 0:
            return cls(0, float("nan"), float("nan"), float("nan"))
        mag = np.abs(errors)
        worst = float(errors[int(np.argmax(mag))])
        return cls(int(errors.size), float(np.median(mag)), float(mag.mean()), worst)

    def to_dict(self) -> dict[str, float]:
        """Plain numbers, rounded for reports."""
        return {
            "n": self.n,
            "median": round(self.median, 4),
            "mean": round(self.mean, 4),
            "worst": round(self.worst, 4),
        }


@dataclass(frozen=True)
class GroupErrors:
    """In-sample and out-of-sample errors of one group (an operator, a FlashAttention panel)."""

    name: str
    in_sample: ErrorSummary
    out_of_sample: ErrorSummary

    def to_dict(self) -> dict:
        """Plain numbers for ``--json``."""
        return {
            "name": self.name,
            "in_sample": self.in_sample.to_dict(),
            "out_of_sample": self.out_of_sample.to_dict(),
        }


def group_errors(
    names: np.ndarray, in_sample: np.ndarray, out_of_sample: np.ndarray, order: Sequence[str]
) -> list[GroupErrors]:
    """Per-group summaries (in ``order``) plus an ``all`` row."""
    out = [
        GroupErrors(
            n, ErrorSummary.of(in_sample[names == n]), ErrorSummary.of(out_of_sample[names == n])
        )
        for n in order
        if np.any(names == n)
    ]
    out.append(GroupErrors("all", ErrorSummary.of(in_sample), ErrorSummary.of(out_of_sample)))
    return out

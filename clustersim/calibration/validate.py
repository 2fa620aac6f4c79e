"""``clustersim validate``: per data set, in-sample and out-of-sample errors.

Sets (``SETS``):

* ``dense``: Narayanan et al. 2021 Table 1 (A100); fits ``kernel.framework_us``;
* ``moe``: MoE training rows of ``training_moe.csv`` clustersim can express (H100, B200,
  GB200); no row fits anything (out of sample by construction; ``framework_us`` from the dense
  set);
* ``fsdp``: the FSDP baselines of ``training_moe.csv`` (Liu et al. 2025), as ZeRO-3 over all
  of DP; they fit nothing;
* ``serving``: ``serving.csv`` rows clustersim can express; eager decode rows fit
  ``kernel.launch_us``, CUDA-graph decode rows ``kernel.graph_launch_us`` (gpt-fast) or
  SGLang's per-step host time (``sglang.step_host_us``, a plan value: fitted first, the other
  SGLang rows carry it); TensorRT-LLM
  decode-throughput rows of GQA models ``attention.decode_l2_gbps`` (the L2 re-read rate of
  its per-query-head decode kernel); the other TensorRT-LLM rows fit nothing;
* ``kernels``: the component fits of ``fit_kernels`` (Vidur operator profiles) and
  ``fit_attention`` (FlashAttention papers), leave-one-model / one-panel out;
* ``collectives``: ``fit_comm`` (NCCL, Vidur collectives, DeepEP), leave-one-configuration out;
* ``flows``: ``comm_flows``: comm.csv's NCCL bus bandwidths and DeepEP figures as flows over
  the rows' topologies (NVLink ports, NICs per node, uplinks) through the shared-link solver,
  a few physical parameters per family, leave-one-row out.

The end-to-end sets run on the packaged calibration data files (what users get), with the
fitted end-to-end parameters laid over them; fits run in order (``framework_us`` first: the
MoE and serving sets use its value). Everything is read from package data
(``clustersim/calibration/measurements``), so it works from an installed wheel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clustersim.calibration.fit_e2e import Curve, E2ERow, LooFit, Skipped, fit_with_loo

SETS = ("dense", "moe", "fsdp", "serving", "kernels", "collectives", "flows")
TITLES = {
    "dense": "Dense training: Narayanan et al. 2021 Table 1 (Megatron-LM, A100-80GB)",
    "moe": "MoE training: MoE Parallel Folding (Liu et al. 2025) + Megatron-MoE-ModelZoo (H100) "
    "+ NeMo performance summaries (B200, GB200)",
    "fsdp": "MoE training, FSDP baselines of MoE Parallel Folding (Liu et al. 2025, H100)",
    "serving": "Serving: TensorRT-LLM A100 FP16 and H100 FP8, gpt-fast, SGLang #1401",
    "kernels": "Kernels: Vidur operator profiles + FlashAttention (component fits)",
    "collectives": "Collectives: NCCL / Vidur collectives / DeepEP (component fit)",
    "flows": "Collectives as flows over the rows' links (shared-link model): NCCL bus "
    "bandwidth, DeepEP",
}
# Grid of each end-to-end parameter (µs). Times are exactly linear in framework_us for the
# dense plans (every kernel on the critical path, no overlap), so its two ends suffice.
GRIDS: dict[str, tuple[float, ...]] = {
    "kernel.framework_us": (0.0, 60.0),
    # µs; the serving step is affine in it (host time once per step), so two points are exact
    "sglang.step_host_us": (0.0, 4000.0),
    "kernel.launch_us": (0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0, 40.0, 60.0),
    "kernel.graph_launch_us": (
        0.0,
        0.5,
        1.0,
        1.5,
        2.0,
        3.0,
        4.0,
        5.0,
        6.0,
        8.0,
        10.0,
        12.0,
        16.0,
        24.0,
    ),
    # GB/s; the decode time is affine in 1 / rate where the L2 re-reads bind, so the grid is
    # dense around the fitted value (~4.4 TB/s) and the interpolation error stays < 0.5 %
    "attention.decode_l2_gbps": (
        2000.0,
        2500.0,
        3000.0,
        3500.0,
        3750.0,
        4000.0,
        4250.0,
        4500.0,
        4750.0,
        5000.0,
        5500.0,
        6000.0,
        7000.0,
        8000.0,
        10000.0,
    ),
}
QUICK_MAX_GPUS = {"dense": 1536, "moe": 256}


@dataclass(frozen=True)
class RowResult:
    """A published row, its in-sample and out-of-sample predictions."""

    row_id: str
    label: str
    metric: str
    published: float
    in_sample: float
    out_of_sample: float
    param: str | None
    fits: bool
    param_without: float | None = None  # the parameter refitted without this row
    note: str = ""

    @property
    def error_in(self) -> float:
        """Signed relative error in sample, %."""
        return 100 * (self.in_sample / self.published - 1)

    @property
    def error_oos(self) -> float:
        """Signed relative error out of sample, %."""
        return 100 * (self.out_of_sample / self.published - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        out = self.__dict__.copy()
        out.update(error_in_pct=round(self.error_in, 3), error_oos_pct=round(self.error_oos, 3))
        return out


@dataclass(frozen=True)
class GroupResult:
    """A group of a component set (an operator, a data set): errors in %."""

    name: str
    n: int
    in_mean: float
    in_worst: float
    oos_mean: float
    oos_worst: float
    in_median: float = math.nan  # median |error| (the kernel goal is stated on medians)
    oos_median: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return self.__dict__.copy()


@dataclass
class SetResult:
    """One data set's validation."""

    name: str
    title: str
    status: str = "ok"  # "ok" or "pending: <why>"
    rows: list[RowResult] = field(default_factory=list)
    groups: list[GroupResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    params: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, float | int | None]:
        """Mean and worst |error| (%), in sample and out of sample."""
        if self.rows:
            e_in = np.array([abs(r.error_in) for r in self.rows])
            e_oos = np.array([abs(r.error_oos) for r in self.rows])
            return {
                "n": len(self.rows),
                "in_mean": float(e_in.mean()),
                "in_worst": float(e_in.max()),
                "oos_mean": float(e_oos.mean()),
                "oos_worst": float(e_oos.max()),
            }
        if self.groups:
            n = sum(g.n for g in self.groups)
            return {
                "n": n,
                "in_mean": sum(g.in_mean * g.n for g in self.groups) / n,
                "in_worst": max(abs(g.in_worst) for g in self.groups),
                "oos_mean": sum(g.oos_mean * g.n for g in self.groups) / n,
                "oos_worst": max(abs(g.oos_worst) for g in self.groups),
            }
        return {"n": 0, "in_mean": None, "in_worst": None, "oos_mean": None, "oos_worst": None}

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "name": self.name,
            "title": self.title,
            "status": self.status,
            "summary": self.summary(),
            "params": self.params,
            "notes": self.notes,
            "rows": [r.to_dict() for r in self.rows],
            "groups": [g.to_dict() for g in self.groups],
            "skipped": [s.__dict__ for s in self.skipped],
        }


# ---- predictions (run in worker processes) ---------------------------------------------------


def predict(set_name: str, row_id: str, values: dict[str, float]) -> float:
    """Predicted metric of one row under calibration overrides ``values``."""
    if set_name == "dense":
        from clustersim.calibration.sets_training import predict_dense

        return predict_dense(row_id, values)
    if set_name in ("moe", "fsdp"):
        from clustersim.calibration.sets_training import predict_moe

        return predict_moe(row_id, values)
    from clustersim.calibration.sets_serving import predict_serving

    return predict_serving(row_id, values)


def _task(args: tuple[str, str, tuple[tuple[str, float], ...]]) -> float:
    set_name, row_id, values = args
    try:
        return predict(set_name, row_id, dict(values))
    except Exception as exc:  # re-raised as a plain error: PlanError does not pickle
        raise RuntimeError(f"{set_name} {row_id} {dict(values)}: {exc}") from None


Task = tuple[str, str, tuple[tuple[str, float], ...]]
Progress = Callable[[str, int, int], None]


class Runner:
    """Runs prediction tasks, in ``workers`` processes (1: inline), largest first."""

    def __init__(self, workers: int, progress: Progress | None = None):
        self.workers = max(1, workers)
        self.progress = progress
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Runner:
        if self.workers > 1:
            self._pool = ProcessPoolExecutor(max_workers=self.workers)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def run(self, label: str, tasks: Sequence[Task], costs: Sequence[float]) -> list[float]:
        """Results of ``tasks`` in their order."""
        order = sorted(range(len(tasks)), key=lambda i: -costs[i])
        out: list[float] = [math.nan] * len(tasks)
        done = 0
        if self.progress:
            self.progress(label, 0, len(tasks))
        if self._pool is None:
            for i in order:
                out[i] = _task(tasks[i])
                done += 1
                if self.progress:
                    self.progress(label, done, len(tasks))
            return out
        futures = {self._pool.submit(_task, tasks[i]): i for i in order}
        from concurrent.futures import as_completed

        for fut in as_completed(futures):
            out[futures[fut]] = fut.result()
            done += 1
            if self.progress:
                self.progress(label, done, len(tasks))
        return out


def _curves(
    runner: Runner, set_name: str, rows: Sequence[E2ERow], fixed: dict[str, float]
) -> dict[str, Curve]:
    """Each row's prediction over the grid of its parameter (one point if it has none)."""
    tasks: list[Task] = []
    costs: list[float] = []
    where: list[tuple[str, float]] = []
    for r in rows:
        grid = GRIDS[r.param] if r.param else (0.0,)
        for g in grid:
            values = dict(fixed)
            if r.param:
                values[r.param] = g
            tasks.append((set_name, r.row_id, tuple(sorted(values.items()))))
            costs.append(r.cost)
            where.append((r.row_id, g))
    results = runner.run(set_name, tasks, costs)
    by_row: dict[str, list[float]] = {}
    for (rid, _), value in zip(where, results, strict=True):
        by_row.setdefault(rid, []).append(value)
    out = {}
    for r in rows:
        grid = GRIDS[r.param] if r.param else (0.0, 1.0)
        vals = by_row[r.row_id] if r.param else by_row[r.row_id] * 2
        out[r.row_id] = Curve.of(grid, vals, r.rate)
    return out


def _fit_params(rows: Sequence[E2ERow], curves: dict[str, Curve]) -> dict[str, LooFit]:
    fits = {}
    for param in dict.fromkeys(r.param for r in rows if r.param and r.fits):
        sel = [r for r in rows if r.param == param and r.fits]
        fits[param] = fit_with_loo(
            param,
            [r.row_id for r in sel],
            [curves[r.row_id] for r in sel],
            [r.published for r in sel],
        )
    return fits


def evaluate_e2e(
    name: str,
    rows: Sequence[E2ERow],
    skipped: Sequence[Skipped],
    runner: Runner,
    fixed: dict[str, float],
) -> tuple[SetResult, dict[str, LooFit]]:
    """Simulate, fit and leave each fitted row out: the set's result and its fits."""
    curves = _curves(runner, name, rows, fixed)
    fits = _fit_params(rows, curves)
    results = []
    for r in rows:
        c = curves[r.row_id]
        fit = fits.get(r.param) if r.param else None
        x = fit.value if fit else (fixed.get(r.param, 0.0) if r.param else 0.0)
        if r.param and fit is None and r.param not in fixed:
            x = _file_value(r.param)
        in_sample = float(c.metric(x))
        x_oos = fit.without.get(r.row_id, x) if fit and r.fits else x
        oos = float(c.metric(x_oos)) if not math.isnan(x_oos) else math.nan
        without = x_oos if fit and r.fits else None
        results.append(
            RowResult(
                r.row_id,
                r.label,
                r.metric,
                r.published,
                in_sample,
                oos,
                r.param,
                r.fits,
                without,
                r.note,
            )
        )
    res = SetResult(name, TITLES[name], rows=results, skipped=list(skipped))
    res.params = {**{k: v for k, v in fixed.items()}, **{k: f.value for k, f in fits.items()}}
    return res, fits


def _file_value(param: str) -> float:
    """A parameter's value in the h100 data file (used when no row of the set fits it)."""
    from clustersim.spec.calibration_data import calibration_data

    section, name = param.split(".", 1)
    data = calibration_data("h100") or {}
    return float(data.get(section, {}).get(name, 0.0))


# ---- component sets ---------------------------------------------------------------------------


def _group(name: str, errs_in: np.ndarray, errs_oos: np.ndarray) -> GroupResult:
    def worst(e: np.ndarray) -> float:
        return float(100 * e[int(np.argmax(np.abs(e)))]) if e.size else math.nan

    return GroupResult(
        name,
        int(errs_in.size),
        float(100 * np.mean(np.abs(errs_in))),
        worst(errs_in),
        float(100 * np.nanmean(np.abs(errs_oos))),
        worst(np.nan_to_num(errs_oos)),
        float(100 * np.median(np.abs(errs_in))),
        float(100 * np.nanmedian(np.abs(errs_oos))),
    )


def kernels_set() -> SetResult:
    """Vidur operator profiles (fit_kernels) and FlashAttention (fit_attention), per group."""
    res = SetResult("kernels", TITLES["kernels"])
    try:
        from clustersim.calibration import fit_attention, fit_kernels
    except ImportError as exc:  # pragma: no cover - the modules ship with the package
        res.status = f"pending: {exc}"
        return res
    for gen in ("a100", "h100"):
        kernel = fit_kernels.fit(gen)
        res.params.update({f"{gen}:{k}": v for k, v in kernel.values.items()})
        for g in kernel.errors:
            if g.name not in AGGREGATES:
                res.groups.append(_summary_group(f"{gen} vidur {g.name}", g))
        decode = {"attention.decode_memory_efficiency": kernel.values["memory.efficiency"]}
        cal = fit_kernels.with_values(
            fit_kernels.base_calibration(gen), {**kernel.values, **decode}
        )
        att = fit_attention.fit(gen, cal)
        res.params.update({f"{gen}:{k}": v for k, v in att.values.items()})
        for g in att.errors:
            if g.name not in AGGREGATES:
                res.groups.append(_summary_group(f"{gen} flash-attn {g.name}", g))
        if att.backward is not None:  # one ratio per generation vs each shape's measured one
            name = f"{gen} flash-attn backward / forward"
            res.groups.append(_summary_group(name, att.backward.errors))
    res.notes.append(
        "out of sample: leave one Vidur model file / one FlashAttention panel (backward "
        "ratio: one shape) out (the component modules' own folds); means weighted by row count"
    )
    return res


AGGREGATES = ("all", "GEMMs", "memory-bound")  # summaries of other groups (not counted twice)


def _summary_group(name: str, g: Any) -> GroupResult:
    return GroupResult(
        name,
        g.in_sample.n,
        100 * g.in_sample.mean,
        100 * g.in_sample.worst,
        100 * g.out_of_sample.mean,
        100 * g.out_of_sample.worst,
        100 * g.in_sample.median,
        100 * g.out_of_sample.median,
    )


def collectives_set() -> SetResult:
    """fit_comm's per-row measured / in-sample / out-of-sample times, per generation and set."""
    res = SetResult("collectives", TITLES["collectives"])
    try:
        from clustersim.calibration import fit_comm
    except ImportError as exc:
        res.status = f"pending: fit_comm not available ({exc})"
        return res
    if not hasattr(fit_comm, "comm_rows"):
        res.status = "pending: fit_comm has no comm_rows()"
        return res
    for gen in fit_comm.GENERATIONS:
        rows = fit_comm.comm_rows(gen)
        for key in dict.fromkeys((r.dataset, r.fitted) for r in rows):
            sel = [r for r in rows if (r.dataset, r.fitted) == key]
            e_in = np.array([r.error_in_sample for r in sel])
            e_oos = np.array([r.error_oos for r in sel])
            kind = "fitted" if key[1] else "derived"
            res.groups.append(_group(f"{gen} {key[0]} ({kind})", e_in, e_oos))
        for section, values in fit_comm.fit(gen).items():
            if isinstance(values, dict):
                res.params.update({f"{gen}:{section}.{k}": v for k, v in values.items()})
        if gen in ("a100", "h100"):  # a property of Vidur's harness, not of the GPU's data file
            res.params[f"{gen}:vidur_harness.floor_us"] = fit_comm.harness_floor_us(gen)
        res.skipped += [Skipped(*entry) for entry in fit_comm.not_expressible(gen)]
    res.notes.append(
        "derived rows: predicted from another generation's fit or a stated "
        "figure, never fitted (out of sample by construction)"
    )
    res.notes.append(
        "Vidur all-reduce rows on 3+ GPUs: the time Vidur's harness records, at least its "
        "per-call floor (vidur_harness.floor_us, refitted with each fold): rank 0's NCCL "
        "kernel waits for the last rank's launch while the collective is shorter"
    )
    return res


def flows_set() -> SetResult:
    """comm_flows: every NCCL bus-bandwidth and DeepEP row as flows, in its own metric."""
    from clustersim.calibration import comm_flows

    res = SetResult("flows", TITLES["flows"])
    groups: dict[str, list[Any]] = {}
    for family in ("nccl", "deepep"):
        fitted, rows = comm_flows.family_rows(family)
        res.params.update({f"{family}.{k}": round(v, 4) for k, v in fitted.values.items()})
        for r in rows:
            c = r.case
            groups.setdefault(comm_flows.group_of(c), []).append(r)
            if c.component:  # fits the harness cost; its group shows it, the summary not
                continue
            res.rows.append(
                RowResult(
                    c.row_id,
                    c.label,
                    c.metric,
                    c.published,
                    r.in_sample,
                    r.out_of_sample,
                    None,
                    True,
                    note=c.note,
                )
            )
    for name, rows in groups.items():
        e_in = np.array([r.error_in for r in rows])
        e_oos = np.array([r.error_oos for r in rows])
        res.groups.append(_group(name, e_in, e_oos))
    res.notes.append(
        "errors in the published metric (bus bandwidth, DeepEP bandwidth, low-latency µs); "
        "every row enters its family's fit; out of sample: the family refitted without the row"
    )
    res.notes.extend(comm_flows.NOTES)
    return res


# ---- the whole validation ---------------------------------------------------------------------


def _quick(name: str, rows: list[E2ERow]) -> list[E2ERow]:
    limit = QUICK_MAX_GPUS.get(name)
    if limit is None:
        return rows
    from clustersim.calibration import sets_training as st

    if name == "dense":
        keep = {st.dense_id(r) for r in st.dense_table() if r["num_gpus"] <= limit}
    else:
        keep = {
            r["row_id"] for r in st.moe_table() if r["num_gpus"] and int(r["num_gpus"]) <= limit
        }
    return [r for r in rows if r.row_id in keep]


def calibration_sources() -> dict[str, str]:
    """``source`` of each packaged calibration data file (placeholder or fitted)."""
    from clustersim.spec.calibration_data import calibration_data, calibration_generations

    return {
        g: str((calibration_data(g) or {}).get("source", "")) for g in calibration_generations()
    }


def run_validation(
    sets: Sequence[str] = SETS,
    quick: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
) -> list[SetResult]:
    """Validate ``sets`` (in ``SETS`` order). ``workers``: processes (default: CPU count,
    at most 4); ``quick``: leave out the largest training rows."""
    from clustersim.calibration import sets_serving as sv
    from clustersim.calibration import sets_training as st

    unknown = [s for s in sets if s not in SETS]
    if unknown:
        raise ValueError(f"unknown set(s) {', '.join(unknown)} (have: {', '.join(SETS)})")
    wanted = [s for s in SETS if s in sets]
    workers = workers if workers is not None else min(os.cpu_count() or 1, 4)
    out: list[SetResult] = []
    fixed: dict[str, float] = {}
    with Runner(workers, progress) as runner:
        needs_dense = any(s in wanted for s in ("dense", "moe", "fsdp", "serving"))
        if needs_dense:
            rows = st.dense_rows()
            rows = _quick("dense", rows) if quick else rows
            dense, fits = evaluate_e2e("dense", rows, [], runner, {})
            fixed[st.FRAMEWORK] = fits[st.FRAMEWORK].value
            dense.notes.append(
                "fits kernel.framework_us (leave-one-out: refit without the row, predict it)"
            )
            if "dense" in wanted:
                out.append(dense)
        if "moe" in wanted:
            rows, skipped = st.moe_rows()
            rows = _quick("moe", rows) if quick else rows
            res, _ = evaluate_e2e("moe", rows, skipped, runner, fixed)
            res.notes.append(
                "token-drop rows fit no parameter: out of sample by construction "
                "(kernel.framework_us from the dense set)"
            )
            res.notes.extend(st.MOE_ASSUMPTIONS)
            res.notes.append(st.DEEPSEEK_ASSUMPTION)
            res.notes.append(st.HAI_LLM_ASSUMPTION)
            out.append(res)
        if "fsdp" in wanted:
            rows = st.fsdp_rows()
            rows = _quick("moe", rows) if quick else rows
            res, _ = evaluate_e2e("fsdp", rows, [], runner, fixed)
            res.notes.append(
                "fit no parameter: out of sample by construction (kernel.framework_us from the "
                "dense set)"
            )
            res.notes.append(st.FSDP_ASSUMPTION)
            out.append(res)
        if "serving" in wanted:
            rows, skipped = sv.serving_rows()
            # SGLang's per-step host time first (its graph rows): the eager SGLang rows, which
            # fit kernel.launch_us, and S0143 carry the fitted value
            own = [r for r in rows if r.param == sv.STEP_HOST and r.fits]
            serving_fixed = dict(fixed)
            if own:
                _, step_fits = evaluate_e2e("serving", own, [], runner, fixed)
                serving_fixed[sv.STEP_HOST] = step_fits[sv.STEP_HOST].value
            res, _ = evaluate_e2e("serving", rows, skipped, runner, serving_fixed)
            res.notes.append(
                "TensorRT-LLM rows fit no parameter (out of sample by construction) except the "
                "GQA decode-throughput rows, which fit attention.decode_l2_gbps (leave-one-out)"
            )
            out.append(res)
    component = (("kernels", kernels_set), ("collectives", collectives_set), ("flows", flows_set))
    for name, build in component:
        if name not in wanted:
            continue
        if progress:
            progress(name, 0, 1)
        try:
            out.append(build())
        except Exception as exc:  # a component module mid-change must not sink the others
            out.append(
                SetResult(
                    name,
                    TITLES[name],
                    status=f"pending: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                )
            )
        if progress:
            progress(name, 1, 1)
    return out


# ---- printing ---------------------------------------------------------------------------------


def _fmt(x: Any, spec: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec) if isinstance(x, int | float) else str(x)


def print_results(results: Sequence[SetResult], show_skipped: bool = True) -> None:
    """A table per set, its summary, fitted parameters and the rows left out with why."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 130))
    sources = calibration_sources()
    console.print(
        "calibration data files: " + ", ".join(f"{g}: {s or '?'}" for g, s in sources.items())
    )
    for res in results:
        console.rule(f"[bold]{res.name}[/bold]: {res.title}")
        if res.status != "ok":
            console.print(f"[yellow]{res.status}[/yellow]")
            continue
        if res.rows:
            table = Table(title_justify="left")
            for col in (
                "row",
                "configuration",
                "metric",
                "published",
                "in-sample",
                "err %",
                "out-of-sample",
                "err %",
                "fits",
            ):
                table.add_column(
                    col,
                    justify="left"
                    if col in ("row", "configuration", "metric", "fits")
                    else "right",
                )
            for r in res.rows:
                fits = (
                    f"{r.param.split('.')[-1]} (w/o: {_fmt(r.param_without, '.2f')})"
                    if r.fits and r.param
                    else "-"
                )
                table.add_row(
                    r.row_id,
                    r.label + (f" [dim]{r.note}[/dim]" if r.note else ""),
                    r.metric,
                    f"{r.published:g}",
                    _fmt(r.in_sample, ".4g"),
                    f"{r.error_in:+.1f}",
                    _fmt(r.out_of_sample, ".4g"),
                    _fmt(r.error_oos, "+.1f"),
                    fits,
                )
            console.print(table)
        if res.groups:
            table = Table(title_justify="left")
            for col in (
                "group",
                "n",
                "in median |err| %",
                "in mean |err| %",
                "in worst %",
                "oos median |err| %",
                "oos mean |err| %",
                "oos worst %",
            ):
                table.add_column(col, justify="left" if col == "group" else "right")
            for g in res.groups:
                table.add_row(
                    g.name,
                    str(g.n),
                    _fmt(g.in_median),
                    _fmt(g.in_mean),
                    _fmt(g.in_worst, "+.1f"),
                    _fmt(g.oos_median),
                    _fmt(g.oos_mean),
                    _fmt(g.oos_worst, "+.1f"),
                )
            console.print(table)
        s = res.summary()
        console.print(
            f"[bold]{res.name}[/bold]: {s['n']} rows; in sample mean |error| "
            f"{_fmt(s['in_mean'])}%, worst {_fmt(s['in_worst'])}%; out of sample "
            f"mean {_fmt(s['oos_mean'])}%, worst {_fmt(s['oos_worst'])}%"
        )
        if res.params:
            console.print(
                "parameters: " + ", ".join(f"{k} = {_fmt(v, 'g')}" for k, v in res.params.items())
            )
        for note in res.notes:
            console.print(f"[dim]- {note}[/dim]")
        if res.skipped and show_skipped:
            by_reason: dict[str, list[str]] = {}
            for sk in res.skipped:
                by_reason.setdefault(sk.reason, []).append(sk.row_id)
            console.print(f"not expressible: {len(res.skipped)} rows")
            for reason, ids in by_reason.items():
                console.print(f"  {_ranges(ids)}: {reason}")


def _ranges(ids: list[str]) -> str:
    """``T0001, T0002, T0003, T0007`` -> ``T0001-T0003, T0007``."""
    parts: list[str] = []
    start = prev = None
    for rid in ids:
        num = int(rid[1:]) if rid[1:].isdigit() else None
        if start is not None and num is not None and prev is not None and num == prev[1] + 1:
            prev = (rid, num)
            continue
        if start is not None:
            parts.append(start[0] if start == prev else f"{start[0]}-{prev[0]}")
        start = prev = (rid, num) if num is not None else (rid, -10)
    if start is not None:
        parts.append(start[0] if start == prev else f"{start[0]}-{prev[0]}")
    return ", ".join(parts)


class progress_bar:  # noqa: N801 - used as a context manager like open()
    """A rich progress bar on stderr with one task per set; yields the ``progress`` callback."""

    def __init__(self) -> None:
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> Progress:
        from rich.console import Console
        from rich.progress import Progress as RichProgress

        self._progress = RichProgress(console=Console(stderr=True), transient=True)
        self._progress.start()
        return self.update

    def update(self, label: str, done: int, total: int) -> None:
        """Report ``done`` of ``total`` simulations of set ``label``."""
        if label not in self._tasks:
            self._tasks[label] = self._progress.add_task(f"validate {label}", total=total)
        self._progress.update(self._tasks[label], completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

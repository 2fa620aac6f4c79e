"""Fit the FlashAttention parameters to published forward-pass throughput.

Data: ``measurements/flash_attention.csv`` (TFLOP/s read from the FlashAttention-2/-3 papers;
see ``flash_attention.md``). A generation uses one kernel's per-shape forward FP16/BF16 rows:
A100 the FlashAttention-2 A100 rows, H100 the FlashAttention-3 H100 rows (arXiv v1 figures).

Each row is priced by ``KernelTimer.core_attention_gpu_ms`` exactly as the simulator calls it:
``flops`` the authors' count ``4 * batch * seq^2 * head_dim * heads``, halved for causal rows
(the authors halve it too, as ``costs.compute.core_attention`` does), ``hbm_bytes`` the Q, K,
V reads and the output write, and ``query_len`` the keys per query: the sequence length, or
``(seq + 1) / 2`` for causal rows (as the engine passes it for causal training and prefill).
So the achieved rate is ``peak * efficiency * s / (s + half_seq)`` for ``s`` keys per query
whatever the batch: the benchmarks keep
``batch * seq = 16k``, so short sequences come with large batches and ``half_seq`` measures
the loss of short queries at a full GPU, not a single short request's latency. Causal and
non-causal rows are fitted together. The head dimension enters through the softmax: each
query-key pair of a head costs one exp at the GPU's special-function rate
``attention.exp_tflops`` (:data:`EXP_TFLOPS`, stated, not fitted) on top of its ``4 d`` matmul
FLOPs, so small heads reach a lower share of peak (FA3 H100, 16k non-causal: 497 / 648
TFLOP/s for head dims 64 / 128); each row is priced on a model of its head dimension.

Least squares on log time over ``efficiency`` and ``half_seq``; out-of-sample errors leave
one (head dimension, causal) panel out and refit. A100 has three FlashAttention-2 rows at
2k-8k tokens, which cannot pin ``half_seq``: it comes from FlashAttention-2's full sweep on H100
(the same kernel, ``HALF_SEQ_FROM``) and only the efficiency is fitted to the A100 rows.
``decode_memory_efficiency`` has no measurement here: it is set to the fitted stream
efficiency ``memory.efficiency`` (``calibrate`` does this).

``backward_ratio``: the backward's time over the forward's time of the same shape (the
authors count the backward as 2.5 x the forward's FLOPs: five matmuls instead of two, the
scores recomputed; so the ratio is 2.5 x forward TFLOP/s / backward TFLOP/s, or 3.5 x
forward / ``fwd_bwd`` TFLOP/s - 1 for a forward + backward row). One value per generation, the
geometric mean over every shape of the generation's kernel and GPU that has both a forward
row and a backward (or forward + backward) row; out of sample: each pair predicted by the
mean of the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clustersim.calibration import (
    ErrorSummary,
    GroupErrors,
    Param,
    group_errors,
    least_squares,
    number,
    read_measurements,
    require_columns,
)
from clustersim.calibration.fit_kernels import FIT_PRESETS, hardware, with_values
from clustersim.costs.kernels import KernelTimer
from clustersim.spec.errors import PlanError
from clustersim.spec.schema import CalibrationSpec, ModelSpec

CSV_NAME = "flash_attention.csv"
COLUMNS = (
    "row_id",
    "kernel",
    "gpu",
    "dtype",
    "direction",
    "causal",
    "head_dim",
    "seq_len",
    "batch_size",
    "num_heads",
    "tflops",
)
# Which rows serve a generation: (kernel, gpu name prefix).
SELECTION = {"a100": ("FA2", "A100"), "h100": ("FA3", "H100")}
# Generations whose rows cannot pin ``half_seq`` (A100: three FA2 rows, all at 2k-8k tokens)
# take it from the same kernel's full sequence sweep on another GPU: FlashAttention-2 on H100,
# measured by the FlashAttention-3 authors (same code and tiling, 512-16k).
HALF_SEQ_FROM = {"a100": ("FA2", "H100", "h100")}  # kernel, GPU prefix, priced on
DTYPES = ("fp16", "bf16", "fp16/bf16")
PARAMS = (
    Param("attention.efficiency", "fraction", 0.6),
    Param("attention.half_seq", "positive", 256.0),
)
ROUNDING = {"attention.efficiency": 4, "attention.half_seq": 1}
# Special-function (exp) rate, 10^12 per second: SMs x 16 SFU results per clock x boost clock.
# A100: 108 x 16 x 1.41 GHz; H100 SXM5: 3.9 (FlashAttention-3 paper, arXiv:2407.08608 §3.1:
# "989 TFLOPS of FP16 matmul but only 3.9 TFLOPS of special functions"); H200 / H800: the same
# die; B200: H100's rate per SM and clock over 148 SMs (no Blackwell measurement).
EXP_TFLOPS = {"a100": 2.44, "h100": 3.9, "h200": 3.9, "h800": 3.9, "b200": 4.37}
BYTES_PER_ELEMENT = 2  # FP16/BF16


@dataclass
class AttentionRows:
    """Per-shape forward measurements of one kernel on one GPU."""

    generation: str
    source: str
    kernel: str
    row_id: np.ndarray
    panel: np.ndarray  # "hd128 causal", ...
    head_dim: np.ndarray
    flops: np.ndarray
    hbm_bytes: np.ndarray
    query_len: np.ndarray
    measured_ms: np.ndarray

    def subset(self, mask: np.ndarray) -> AttentionRows:
        """The rows where ``mask`` holds."""
        arrays = {
            f: getattr(self, f)[mask]
            for f in ("row_id", "panel", "head_dim", "flops", "hbm_bytes", "query_len")
            + ("measured_ms",)
        }
        return AttentionRows(self.generation, self.source, self.kernel, **arrays)

    def predict_ms(self, cal: CalibrationSpec) -> np.ndarray:
        """KernelTimer's GPU time of every row under ``cal`` (a model of the row's head
        dimension: 16 heads)."""
        out = np.empty(self.flops.size)
        hw = hardware(self.generation, cal)
        for hd in dict.fromkeys(self.head_dim.tolist()):
            model = ModelSpec(
                num_layers=1,
                hidden_size=16 * int(hd),
                num_attention_heads=16,
                ffn_hidden_size=64 * int(hd),
                vocab_size=32000,
                dtype="bf16",
            )
            rows = self.head_dim == hd
            timer = KernelTimer(model, hw)
            out[rows] = timer.core_attention_gpu_ms(
                self.flops[rows], self.hbm_bytes[rows], self.query_len[rows]
            )
        return out


def load_rows(
    generation: str, folder: Path | None = None, selection: tuple[str, str] | None = None
) -> AttentionRows:
    """The forward FP16/BF16 per-shape rows that serve ``generation`` (or of ``selection``,
    a (kernel, GPU prefix) pair, priced on ``generation``'s hardware)."""
    if generation not in SELECTION:
        raise PlanError(
            "calibrate",
            f"no attention measurements for {generation!r} (have: {', '.join(SELECTION)})",
        )
    source = str(Path(folder) / CSV_NAME) if folder is not None else f"measurements/{CSV_NAME}"
    rows = read_measurements(CSV_NAME, folder)
    require_columns(rows, COLUMNS, source)
    kernel, gpu = selection or SELECTION[generation]
    out: dict[str, list] = {k: [] for k in ("id", "panel", "hd", "flops", "bytes", "q", "ms")}
    for line, row in enumerate(rows, start=2):
        per_shape = all(row[c].strip() for c in ("head_dim", "seq_len", "batch_size", "num_heads"))
        if not (
            row["kernel"] == kernel
            and row["gpu"].startswith(gpu)
            and per_shape
            and row["direction"] == "fwd"
            and row["dtype"] in DTYPES
        ):
            continue
        hd, s, b, heads, tflops = (
            number(row, c, source, line)
            for c in ("head_dim", "seq_len", "batch_size", "num_heads", "tflops")
        )
        causal = row["causal"].strip().lower() == "true"
        flops = 4.0 * b * s * s * hd * heads * (0.5 if causal else 1.0)
        out["id"].append(row["row_id"])
        out["panel"].append(f"hd{int(hd)} {'causal' if causal else 'non-causal'}")
        out["hd"].append(hd)
        out["flops"].append(flops)
        out["bytes"].append(4.0 * b * s * heads * hd * BYTES_PER_ELEMENT)
        out["q"].append((s + 1) / 2 if causal else s)  # keys per query, as the engine passes
        out["ms"].append(flops / (tflops * 1e12) * 1e3)
    if not out["id"]:
        raise PlanError(source, f"no forward FP16/BF16 {kernel} rows for {gpu}")
    a = {k: np.array(v) for k, v in out.items()}
    return AttentionRows(
        generation,
        source,
        kernel,
        a["id"],
        a["panel"],
        a["hd"],
        a["flops"],
        a["bytes"],
        a["q"],
        a["ms"],
    )


def fit_values(
    rows: AttentionRows, cal: CalibrationSpec, half_seq: float | None = None
) -> dict[str, float]:
    """Fitted ``attention.efficiency`` and ``attention.half_seq`` (rounded); with
    ``half_seq`` given, only the efficiency is fitted. The stated ``attention.exp_tflops``
    of ``rows``' generation is among the values."""
    log_measured = np.log(rows.measured_ms)
    fixed = {"attention.exp_tflops": EXP_TFLOPS[rows.generation]}
    if half_seq is not None:
        fixed["attention.half_seq"] = half_seq
    params = PARAMS if half_seq is None else PARAMS[:1]

    def residuals(values: dict[str, float]) -> np.ndarray:
        return np.log(rows.predict_ms(with_values(cal, {**values, **fixed}))) - log_measured

    values = {**least_squares(residuals, params), **fixed}
    return {k: round(v, ROUNDING.get(k, 4)) for k, v in values.items()}


@dataclass
class AttentionFit:
    """Fitted attention parameters of one generation and their errors."""

    generation: str
    source: str
    kernel: str
    values: dict[str, float]
    half_seq_from: str  # "" when fitted on the generation's own rows
    errors: list[GroupErrors]  # per panel, then "all"
    folds: dict[str, dict[str, float]]  # panel (or row) left out -> refitted values
    backward: BackwardFit | None = None


@dataclass
class BackwardFit:
    """``attention.backward_ratio`` and how well one ratio fits every measured shape."""

    ratio: float
    shapes: list[str]  # "hd128 non-causal 4096", one per measured pair
    measured: np.ndarray  # the ratio of each shape
    errors: GroupErrors  # predicted / measured - 1, in sample and leave-one-shape-out


def backward_ratios(generation: str, folder: Path | None = None) -> tuple[list[str], np.ndarray]:
    """Per shape of ``generation``'s kernel and GPU with a forward and a backward (or forward +
    backward) FP16/BF16 row: the backward time over the forward time."""
    source = str(Path(folder) / CSV_NAME) if folder is not None else f"measurements/{CSV_NAME}"
    rows = read_measurements(CSV_NAME, folder)
    require_columns(rows, COLUMNS, source)
    kernel, gpu = SELECTION[generation]
    by_shape: dict[tuple, dict[str, float]] = {}
    for line, row in enumerate(rows, start=2):
        shape = tuple(row[c].strip() for c in ("causal", "head_dim", "seq_len", "batch_size"))
        if not (
            row["kernel"] == kernel
            and row["gpu"].startswith(gpu)
            and all(shape[1:])
            and row["dtype"] in DTYPES
        ):
            continue
        by_shape.setdefault(shape, {})[row["direction"]] = number(row, "tflops", source, line)
    names, ratios = [], []
    for (causal, hd, seq, _), rates in by_shape.items():
        if "fwd" not in rates:
            continue
        if "bwd" in rates:
            ratio = 2.5 * rates["fwd"] / rates["bwd"]
        elif "fwd_bwd" in rates:
            ratio = 3.5 * rates["fwd"] / rates["fwd_bwd"] - 1.0
        else:
            continue
        kind = "causal" if causal.lower() == "true" else "non-causal"
        names.append(f"hd{hd} {kind} {seq}")
        ratios.append(ratio)
    if not ratios:
        raise PlanError(source, f"no {kernel} {gpu} shape with forward and backward rows")
    return names, np.array(ratios)


def fit_backward(generation: str, folder: Path | None = None) -> BackwardFit:
    """The geometric-mean backward ratio of ``generation`` and its errors (module docstring)."""
    names, measured = backward_ratios(generation, folder)
    logs = np.log(measured)
    ratio = round(float(np.exp(logs.mean())), 3)
    in_err = ratio / measured - 1.0
    if len(logs) > 1:
        others = (logs.sum() - logs) / (len(logs) - 1)
        oos_err = np.exp(others) / measured - 1.0
    else:
        oos_err = np.full(in_err.shape, np.nan)
    errors = GroupErrors("backward", ErrorSummary.of(in_err), ErrorSummary.of(oos_err))
    return BackwardFit(ratio, names, measured, errors)


def fit(generation: str, cal: CalibrationSpec, folder: Path | None = None) -> AttentionFit:
    """Fit ``generation``'s attention parameters; ``cal`` gives the other parameters (the
    kernel fit's ``fixed_us``)."""
    if generation not in FIT_PRESETS:
        raise PlanError("calibrate", f"no hardware preset for {generation!r}")
    rows = load_rows(generation, folder)
    half_seq, half_seq_from = None, ""
    if generation in HALF_SEQ_FROM:
        kernel, gpu, priced_on = HALF_SEQ_FROM[generation]
        sweep = load_rows(priced_on, folder, (kernel, gpu))
        half_seq = fit_values(sweep, cal)["attention.half_seq"]
        half_seq_from = f"{kernel} {gpu}"
    values = fit_values(rows, cal, half_seq)
    in_err = rows.predict_ms(with_values(cal, values)) / rows.measured_ms - 1.0
    panels = list(dict.fromkeys(rows.panel))
    labels = rows.panel if len(panels) > 1 else rows.row_id
    oos_err = np.full(in_err.shape, np.nan)
    folds: dict[str, dict[str, float]] = {}
    if len(rows.row_id) > 2:
        for label in dict.fromkeys(labels):
            held = labels == label
            folds[str(label)] = fit_values(rows.subset(~held), cal, half_seq)
            predicted = rows.subset(held).predict_ms(with_values(cal, folds[str(label)]))
            oos_err[held] = predicted / rows.measured_ms[held] - 1.0
    errors = group_errors(rows.panel, in_err, oos_err, panels)
    backward = fit_backward(generation, folder)
    values["attention.backward_ratio"] = backward.ratio
    return AttentionFit(
        generation, rows.source, rows.kernel, values, half_seq_from, errors, folds, backward
    )

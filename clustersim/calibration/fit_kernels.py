"""Fit the GEMM and memory-bound kernel parameters to Vidur's per-operator GPU times.

Data: ``measurements/vidur_<gpu>.csv`` (Vidur, Microsoft, MIT licence): the median CUDA kernel
time of each operator of a Llama-style layer, per model, tensor-parallel degree and token count
(no launch overhead). Each operator is predicted by the simulator's own ``KernelTimer``
(``clustersim.costs.kernels``) built on a trial calibration, so the model fitted is the model
run:

* GEMMs (``attn_pre_proj`` = QKV, ``attn_post_proj``, ``mlp_up_proj`` = gate+up,
  ``mlp_down_proj``): ``KernelTimer.gemm_gpu_ms`` with the shapes KernelTimer uses for the
  model and TP degree;
* memory-bound kernels (``input_layernorm``, ``post_attention_layernorm``, ``attn_rope``,
  ``mlp_act``, ``add``): ``KernelTimer.stream_gpu_ms`` of the bytes KernelTimer charges per
  token (norms ``NORM_PASSES * h``, rotary embedding ``2 * rope elements``, activation
  ``phi * ffn / tp``, residual add ``RESIDUAL_PASSES * h`` elements).

One step per kernel class, each a least-squares fit on log time of its own operators, two
parameters (an HBM fraction and a fixed GPU time: ``time = bytes / (HBM * mu) + fixed``) per
memory-bound class and one more each for the element-wise kernels and the norms: the
activation and the rotary embedding together, ``memory.elementwise_efficiency`` (activation),
``memory.rotary_efficiency`` (rotary embedding), their shared ``kernel.fixed_us`` and one
thread block's rate ``memory.row_gbps`` (a floor of one token row's bytes: vLLM runs these
kernels one block per token); ``memory.norm_efficiency``, ``kernel.norm_fixed_us`` and the L2
rate factor ``memory.l2_speedup`` on the two norms (row reductions, one block per token too:
they take the row rate; a norm whose bytes fit in the L2 cache, ``memory.l2_mb`` =
:data:`L2_CACHE_MB`, moves them ``l2_speedup`` times faster); ``memory.efficiency`` and
``kernel.stream_fixed_us`` on the residual adds (plain streams, the same L2 factor; Vidur's
times have 1 µs resolution, which bounds the relative error of the smallest adds);
``gemm.memory_efficiency`` measured directly as the HBM fraction one-token GEMMs reach reading
their weights (it would otherwise trade off against the shape parameter); ``gemm.efficiency``
and ``gemm.half_dim`` by least squares on the GEMMs. Out-of-sample errors:
k-fold by model file (refit without one model's rows, predict them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
from clustersim.costs.kernels import (
    ELEMENTWISE,
    NORM,
    NORM_PASSES,
    RESIDUAL_PASSES,
    ROTARY,
    STREAM,
    KernelTimer,
)
from clustersim.spec.calibration_data import calibration_data
from clustersim.spec.errors import PlanError
from clustersim.spec.presets import GPU_PRESETS
from clustersim.spec.schema import CalibrationSpec, HardwareSpec, ModelSpec

GEMM_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
MEMORY_OPS = ("input_layernorm", "post_attention_layernorm", "attn_rope", "mlp_act", "add")
ALL_OPS = (
    "emb",
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
CONFIG_COLUMNS = (
    "n_head",
    "n_kv_head",
    "n_embd",
    "n_expanded_embd",
    "vocab_size",
    "use_gated_mlp",
    "num_tokens",
    "num_tensor_parallel_workers",
)
# GPUs profiled by Vidur, and the preset giving their peak FLOP/s and HBM bandwidth.
FIT_PRESETS = {"a100": "A100-80GB", "h100": "H100-SXM"}
VIDUR_DTYPE = "fp16"  # Vidur profiles the models in torch.float16
# L2 cache size of each generation, MB (stated, not fitted): NVIDIA A100 Tensor Core GPU
# Architecture whitepaper (40 MB), NVIDIA H100 Tensor Core GPU Architecture whitepaper (50 MB
# on H100 SXM5; H200 and H800 are the same GH100 die), B200: 126 MB (two dies, measured by
# Chips and Cheese, "Nvidia's B200: Keeping the CUDA Juggernaut Rolling").
L2_CACHE_MB = {"a100": 40.0, "h100": 50.0, "h200": 50.0, "h800": 50.0, "b200": 126.0}


@dataclass
class ProfileGroup:
    """The rows of one model at one TP degree: token counts and per-op median times."""

    model: str
    spec: ModelSpec
    tp: int
    tokens: np.ndarray
    times_ms: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class KernelData:
    """Vidur's profiles of one GPU generation."""

    generation: str
    source: str
    groups: list[ProfileGroup]

    @property
    def models(self) -> list[str]:
        """Model files, in order of first appearance (the folds)."""
        return list(dict.fromkeys(g.model for g in self.groups))


def csv_name(generation: str) -> str:
    """File name of a generation's profiles."""
    return f"vidur_{generation}.csv"


def load_profiles(generation: str, folder: Path | None = None) -> KernelData:
    """Vidur's profiles of ``generation`` (packaged, or ``folder/vidur_<generation>.csv``)."""
    name = csv_name(generation)
    source = str(Path(folder) / name) if folder is not None else f"measurements/{name}"
    rows = read_measurements(name, folder)
    require_columns(rows, ("model", *CONFIG_COLUMNS, *GEMM_OPS, *MEMORY_OPS), source)
    by_key: dict[tuple, list[tuple[float, dict[str, float]]]] = {}
    for line, row in enumerate(rows, start=2):
        cfg = {c: number(row, c, source, line) for c in CONFIG_COLUMNS if c != "use_gated_mlp"}
        gated = str(row["use_gated_mlp"]).strip().lower() in ("true", "1", "yes")
        times = {op: number(row, op, source, line) for op in (*GEMM_OPS, *MEMORY_OPS)}
        key = (
            row["model"],
            gated,
            *(int(cfg[c]) for c in CONFIG_COLUMNS if c not in ("use_gated_mlp", "num_tokens")),
        )
        by_key.setdefault(key, []).append((cfg["num_tokens"], times))
    groups = []
    for key, entries in by_key.items():
        model, gated, n_head, n_kv_head, n_embd, n_expanded, vocab, tp = key
        if min(n_head, n_kv_head, n_embd, n_expanded, vocab, tp) <= 0 or n_embd % n_head:
            raise PlanError(source, f"model {model!r}: impossible shape {key[2:]}")
        spec = ModelSpec(
            name=model,
            num_layers=1,
            hidden_size=n_embd,
            num_attention_heads=n_head,
            num_kv_heads=n_kv_head,
            ffn_hidden_size=n_expanded,
            vocab_size=vocab,
            activation="swiglu" if gated else "gelu",
            dtype=VIDUR_DTYPE,
        )
        tokens = np.array([t for t, _ in entries])
        times = {op: np.array([tm[op] for _, tm in entries]) for op in (*GEMM_OPS, *MEMORY_OPS)}
        groups.append(ProfileGroup(model, spec, tp, tokens, times))
    return KernelData(generation, source, groups)


# ---- the model: KernelTimer on a trial calibration ----------------------------------------


def hardware(generation: str, calibration: CalibrationSpec) -> HardwareSpec:
    """One 8-GPU node of the generation's profiled GPU with ``calibration``."""
    preset = GPU_PRESETS[FIT_PRESETS[generation]]
    return HardwareSpec(
        gpu=FIT_PRESETS[generation], num_nodes=1, gpus_per_node=8, calibration=calibration, **preset
    )


def base_calibration(generation: str) -> CalibrationSpec:
    """The generation's packaged calibration (the starting point of a fit)."""
    data = calibration_data(generation)
    if data is None:
        raise PlanError("calibrate", f"no packaged calibration data file for {generation!r}")
    return CalibrationSpec.model_validate(data)


def with_values(cal: CalibrationSpec, values: dict[str, float]) -> CalibrationSpec:
    """``cal`` with ``section.field`` values replaced (no validation: a trial point)."""
    sections: dict[str, dict[str, float]] = {}
    for dotted, value in values.items():
        section, name = dotted.split(".")
        sections.setdefault(section, {})[name] = value
    update = {s: getattr(cal, s).model_copy(update=v) for s, v in sections.items()}
    return cal.model_copy(update=update)


ELEMENTWISE_OPS = ("attn_rope", "mlp_act")
NORM_OPS = ("input_layernorm", "post_attention_layernorm")
STREAM_OPS = ("add",)
# KernelTimer's memory-bound kernel classes and the Vidur operators that measure each
MEMORY_CLASSES = {
    ELEMENTWISE: ("mlp_act",),
    ROTARY: ("attn_rope",),
    NORM: NORM_OPS,
    STREAM: STREAM_OPS,
}


def op_shape(timer: KernelTimer, op: str) -> tuple[float, float] | float:
    """How KernelTimer prices one Vidur operator per token: ``(n, k)`` of a GEMM with one row
    per token, or the bytes a memory-bound kernel moves per token."""
    h, bpe = timer.model.hidden_size, timer.bpe
    width = timer.model.ffn_hidden_size / timer.tp
    if op == "attn_pre_proj":
        if len(timer.qkv_shapes) != 1:
            raise PlanError("calibrate", "profiles of latent-attention models are not supported")
        k, n = timer.qkv_shapes[0]
        return n, k
    out_in, out_features = timer.output_shape
    phi = timer.mlp_matrices
    shapes = {
        "attn_post_proj": (out_features, out_in),
        "mlp_up_proj": ((phi - 1) * width, h),
        "mlp_down_proj": (h, width),
        "input_layernorm": NORM_PASSES * h * bpe,
        "post_attention_layernorm": NORM_PASSES * h * bpe,
        "attn_rope": timer.rope_bytes_per_token,
        "mlp_act": phi * width * bpe,
        "add": RESIDUAL_PASSES * h * bpe,
    }
    return shapes[op]


@dataclass
class Design:
    """Every (row, operator) of a fit, priced the way KernelTimer prices it: GEMM rows with
    their ``m, n, k``, memory-bound rows with their bytes."""

    generation: str
    spec: ModelSpec  # any profiled model: gives KernelTimer its element size
    op: np.ndarray
    model: np.ndarray
    measured_ms: np.ndarray
    is_gemm: np.ndarray
    m: np.ndarray
    n: np.ndarray
    k: np.ndarray
    nbytes: np.ndarray

    def subset(self, mask: np.ndarray) -> Design:
        """The rows where ``mask`` holds."""
        arrays = {
            f: getattr(self, f)[mask]
            for f in ("op", "model", "measured_ms", "is_gemm", "m", "n", "k", "nbytes")
        }
        return Design(self.generation, self.spec, **arrays)

    def predict_ms(self, cal: CalibrationSpec) -> np.ndarray:
        """KernelTimer's GPU time (no launch) of every row under ``cal``."""
        timer = KernelTimer(self.spec, hardware(self.generation, cal), 1)
        out = np.empty(self.op.size)
        g = self.is_gemm
        out[g] = timer.gemm_gpu_ms(self.m[g], self.n[g], self.k[g])
        for kind, ops in MEMORY_CLASSES.items():
            rows = np.isin(self.op, ops)
            if rows.any():
                nbytes = self.nbytes[rows]
                out[rows] = timer.memory_gpu_ms(nbytes, kind, nbytes / self.m[rows])
        return out


def design(data: KernelData, ops: tuple[str, ...]) -> Design:
    """The rows of ``ops`` with their KernelTimer shapes (from one timer per model and TP)."""
    cal = base_calibration(data.generation)
    hw = hardware(data.generation, cal)
    cols: dict[str, list] = {c: [] for c in ("op", "model", "ms", "gemm", "m", "n", "k", "b")}
    bpe = None
    for g in data.groups:
        timer = KernelTimer(g.spec, hw, g.tp)
        if bpe not in (None, timer.bpe):
            raise PlanError(data.source, "profiles of several data types in one file")
        bpe = timer.bpe
        size = g.tokens.size
        for op in ops:
            shape = op_shape(timer, op)
            gemm = isinstance(shape, tuple)
            n, k = shape if gemm else (0.0, 0.0)
            cols["op"].append(np.full(size, op))
            cols["model"].append(np.full(size, g.model))
            cols["ms"].append(g.times_ms[op])
            cols["gemm"].append(np.full(size, gemm))
            cols["m"].append(g.tokens)
            cols["n"].append(np.full(size, float(n)))
            cols["k"].append(np.full(size, float(k)))
            cols["b"].append(g.tokens * (0.0 if gemm else shape))
    arr = {key: np.concatenate(v) for key, v in cols.items()}
    keep = arr["ms"] > 0  # a kernel the profiler did not see
    arr = {key: v[keep] for key, v in arr.items()}
    return Design(
        data.generation,
        data.groups[0].spec,
        arr["op"],
        arr["model"],
        arr["ms"],
        arr["gemm"],
        arr["m"],
        arr["n"],
        arr["k"],
        arr["b"],
    )


# ---- the fit --------------------------------------------------------------------------------

# The fitting stages of the memory-bound classes, in order: the Vidur operators of each and
# the parameters fitted on them (the activation and the rotary embedding share the fixed
# time and the row rate, each with its own HBM fraction; the norms fit the L2 factor and
# take the row rate, the plain streams take both)
MEMORY_STAGES = (
    (
        ELEMENTWISE_OPS,
        (
            Param("memory.elementwise_efficiency", "fraction", 0.5),
            Param("memory.rotary_efficiency", "fraction", 0.5),
            Param("kernel.fixed_us", "positive", 3.0),
            Param("memory.row_gbps", "positive", 10.0),
        ),
    ),
    (
        NORM_OPS,
        (
            Param("memory.norm_efficiency", "fraction", 0.5),
            Param("kernel.norm_fixed_us", "positive", 3.0),
            Param("memory.l2_speedup", "positive", 1.3),
        ),
    ),
    (
        STREAM_OPS,
        (
            Param("memory.efficiency", "fraction", 0.8),
            Param("kernel.stream_fixed_us", "positive", 1.5),
        ),
    ),
)
GEMM_PARAMS = (
    Param("gemm.efficiency", "fraction", 0.7),
    Param("gemm.half_dim", "positive", 64.0),
)
GEMV_TOKENS = 1  # the weight-read measurement: GEMMs of one token row


def weight_read_efficiency(rows: Design, cal: CalibrationSpec) -> float:
    """Fraction of HBM bandwidth a one-token GEMM reaches reading its weights (median over
    the GEMM rows at ``GEMV_TOKENS`` tokens, after the kernel floor): measured directly, so
    it does not trade off against the GEMM shape parameters."""
    timer = KernelTimer(rows.spec, hardware(rows.generation, cal), 1)
    gemv = rows.is_gemm & (rows.m == GEMV_TOKENS)
    if not gemv.any():
        raise PlanError("calibrate", f"no {GEMV_TOKENS}-token GEMM rows to measure weight reads")
    m, n, k = rows.m[gemv], rows.n[gemv], rows.k[gemv]
    nbytes = (m * k + k * n + m * n) * timer.bpe
    busy_s = (rows.measured_ms[gemv] - timer.fixed_ms) * 1e-3
    peak = timer.hw.hbm_bandwidth_gbps * 1e9
    return float(min(1.0, np.median(nbytes / busy_s / peak)))


def _stage(rows: Design, cal: CalibrationSpec, params) -> dict[str, float]:
    log_measured = np.log(rows.measured_ms)

    def residuals(values: dict[str, float]) -> np.ndarray:
        return np.log(rows.predict_ms(with_values(cal, values))) - log_measured

    return least_squares(residuals, params)


def fit_values(rows: Design, cal: CalibrationSpec) -> dict[str, float]:
    """The fitted ``section.field`` values, one kernel class at a time (module docstring);
    the norms' L2 factor is fitted before the plain streams, which take it. The stated L2
    size ``memory.l2_mb`` is among the values."""
    memory: dict[str, float] = {"memory.l2_mb": L2_CACHE_MB[rows.generation]}
    for ops, params in MEMORY_STAGES:
        members = np.isin(rows.op, ops)
        if members.any():
            trial = with_values(cal, memory)
            memory.update(_stage(rows.subset(members), trial, params))
    cal = with_values(cal, memory)
    weights = {"gemm.memory_efficiency": weight_read_efficiency(rows, cal)}
    gemm = _stage(rows.subset(rows.is_gemm), with_values(cal, weights), GEMM_PARAMS)
    return {**memory, **weights, **gemm}


@dataclass
class KernelFit:
    """Fitted kernel parameters of one generation and their errors."""

    generation: str
    source: str
    values: dict[str, float]  # "section.field" -> value (rounded as written to the data file)
    errors: list[GroupErrors]  # per operator, then "GEMMs", "memory-bound", "all"
    folds: dict[str, dict[str, float]]  # model file left out -> values refitted without it

    def sections(self) -> dict[str, dict[str, float]]:
        """The values as data-file sections."""
        out: dict[str, dict[str, float]] = {}
        for dotted, value in self.values.items():
            section, name = dotted.split(".")
            out.setdefault(section, {})[name] = value
        return out


ROUNDING = {
    "memory.efficiency": 4,
    "gemm.memory_efficiency": 4,
    "memory.elementwise_efficiency": 4,
    "memory.rotary_efficiency": 4,
    "memory.norm_efficiency": 4,
    "memory.l2_speedup": 4,
    "memory.l2_mb": 1,
    "memory.row_gbps": 2,
    "kernel.fixed_us": 3,
    "kernel.norm_fixed_us": 3,
    "kernel.stream_fixed_us": 3,
    "gemm.efficiency": 4,
    "gemm.half_dim": 2,
}


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, ROUNDING[k]) for k, v in values.items()}


def fit(generation: str, folder: Path | None = None, cross_validate: bool = True) -> KernelFit:
    """Fit ``generation`` (``a100`` or ``h100``) to its Vidur profiles; with ``cross_validate``
    also refit without each model file to get out-of-sample errors."""
    if generation not in FIT_PRESETS:
        raise PlanError(
            "calibrate",
            f"no kernel measurements for {generation!r} (have: {', '.join(FIT_PRESETS)})",
        )
    data = load_profiles(generation, folder)
    return fit_data(data, base_calibration(generation), cross_validate)


def fit_data(data: KernelData, cal: CalibrationSpec, cross_validate: bool = True) -> KernelFit:
    """Fit loaded profiles, starting from calibration ``cal`` (launch fields are kept)."""
    ops = (*MEMORY_OPS, *GEMM_OPS)
    rows = design(data, ops)
    values = _rounded(fit_values(rows, cal))
    in_err = rows.predict_ms(with_values(cal, values)) / rows.measured_ms - 1.0
    oos_err = np.full(in_err.shape, np.nan)
    folds: dict[str, dict[str, float]] = {}
    if cross_validate and len(data.models) > 1:
        for model in data.models:
            held = rows.model == model
            folds[model] = _rounded(fit_values(rows.subset(~held), cal))
            fold_rows = rows.subset(held)
            predicted = fold_rows.predict_ms(with_values(cal, folds[model]))
            oos_err[held] = predicted / fold_rows.measured_ms - 1.0
    errors = group_errors(rows.op, in_err, oos_err, ops)
    errors[-1:-1] = [
        GroupErrors(name, ErrorSummary.of(in_err[mask]), ErrorSummary.of(oos_err[mask]))
        for name, mask in (("GEMMs", rows.is_gemm), ("memory-bound", ~rows.is_gemm))
    ]
    return KernelFit(data.generation, data.source, values, errors, folds)

"""The kernel and attention fits of ``clustersim calibrate``: reproducible from the packaged
measurements, recover known parameters, never faster than the hardware, and honest errors."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from clustersim.calibration import fit_attention, fit_kernels
from clustersim.calibration.calibrate import DERIVED
from clustersim.cli import app
from clustersim.costs import compute as cc
from clustersim.costs.kernels import KernelTimer
from clustersim.spec.calibration_data import calibration_data, calibration_generations
from clustersim.spec.presets import GPU_GENERATION, GPU_PRESETS
from clustersim.spec.schema import CalibrationSpec, HardwareSpec, ModelSpec

FITTED = ("a100", "h100")


@cache
def kernel_fit(generation: str, cross_validate: bool = False) -> fit_kernels.KernelFit:
    return fit_kernels.fit(generation, cross_validate=cross_validate)


def errors_by_name(fit) -> dict:
    return {e.name: e for e in fit.errors}


@pytest.mark.parametrize("generation", FITTED)
def test_fit_reproduces_packaged_values(generation):
    data = calibration_data(generation)
    fit = kernel_fit(generation)
    for dotted, value in fit.values.items():
        section, name = dotted.split(".")
        assert data[section][name] == value, dotted
    cal = CalibrationSpec.model_validate(data)
    attention = fit_attention.fit(generation, cal)
    for dotted, value in attention.values.items():
        assert data["attention"][dotted.split(".")[1]] == value, dotted
    assert data["attention"]["decode_memory_efficiency"] == data["memory"]["efficiency"]


@pytest.mark.parametrize("generation", sorted(DERIVED))
def test_derived_generations_take_their_source_values(generation):
    data, source = calibration_data(generation), calibration_data(DERIVED[generation][0])
    own_fields = ("decode_l2_gbps", "l2_mb", "exp_tflops")  # the generation's own hardware
    for section in ("gemm", "memory", "attention"):
        own = {k: v for k, v in data[section].items() if k not in own_fields}
        assert own == {k: v for k, v in source[section].items() if k not in own_fields}
    assert data["memory"]["l2_mb"] == fit_kernels.L2_CACHE_MB[generation]
    assert data["attention"]["exp_tflops"] == fit_attention.EXP_TFLOPS[generation]
    # the L2 re-read rate of per-head decode attention: measured on A100 and H100 only; the
    # H100 die's (H200, H800) take it, B200 (another die, no row) has none
    want_l2 = source["attention"]["decode_l2_gbps"] if generation in ("h200", "h800") else None
    assert data["attention"]["decode_l2_gbps"] == want_l2
    assert data["kernel"]["fixed_us"] == source["kernel"]["fixed_us"]
    assert DERIVED[generation][0] in data["source"] or "h100" in data["source"]


def test_synthetic_kernel_times_are_recovered():
    data = fit_kernels.load_profiles("h100")
    rows = fit_kernels.design(data, (*fit_kernels.MEMORY_OPS, *fit_kernels.GEMM_OPS))
    rows = rows.subset(np.arange(rows.op.size) % 7 == 0)  # a sample keeps the test fast
    base = fit_kernels.base_calibration("h100")
    truth = {
        "memory.efficiency": 0.9,
        "memory.elementwise_efficiency": 0.45,
        "memory.rotary_efficiency": 0.4,
        "memory.norm_efficiency": 0.35,
        "memory.l2_speedup": 1.25,
        "gemm.memory_efficiency": 0.71,
        "kernel.fixed_us": 3.3,
        "kernel.stream_fixed_us": 1.2,
        "kernel.norm_fixed_us": 4.1,
        "gemm.efficiency": 0.64,
        "gemm.half_dim": 150.0,
    }
    rows.measured_ms = rows.predict_ms(fit_kernels.with_values(base, truth))
    fitted = fit_kernels.fit_values(rows, base)
    for name, value in truth.items():
        assert fitted[name] == pytest.approx(value, rel=0.01), name


def test_synthetic_attention_times_are_recovered():
    cal = fit_kernels.base_calibration("h100")
    rows = fit_attention.load_rows("h100")
    truth = {"attention.efficiency": 0.55, "attention.half_seq": 400.0}
    rows.measured_ms = rows.predict_ms(fit_kernels.with_values(cal, truth))
    fitted = fit_attention.fit_values(rows, cal)
    for name, value in truth.items():
        assert fitted[name] == pytest.approx(value, rel=0.01), name


def _preset_of(generation: str) -> str:
    return next(gpu for gpu, g in GPU_GENERATION.items() if g == generation)


@settings(max_examples=200, deadline=None)
@given(
    m=st.integers(1, 65536),
    n=st.integers(1, 65536),
    k=st.integers(1, 65536),
    dtype=st.sampled_from(sorted(cc.DTYPE_BYTES)),
    generation=st.sampled_from(calibration_generations()),
)
def test_gemm_never_beats_peak_or_bandwidth(m, n, k, dtype, generation):
    gpu = _preset_of(generation)
    cal = CalibrationSpec.model_validate(calibration_data(generation))
    hw = HardwareSpec(gpu=gpu, num_nodes=1, gpus_per_node=8, calibration=cal, **GPU_PRESETS[gpu])
    model = ModelSpec(
        num_layers=1,
        hidden_size=1024,
        num_attention_heads=8,
        ffn_hidden_size=4096,
        vocab_size=32000,
        dtype=dtype,
    )
    ms = float(KernelTimer(model, hw).gemm_gpu_ms(float(m), n, k))
    floor_compute_ms = 2.0 * m * n * k / (hw.peak_tflops * 1e12) * 1e3
    floor_memory_ms = (
        (m * k + k * n + m * n) * cc.DTYPE_BYTES[dtype] / (hw.hbm_bandwidth_gbps * 1e9) * 1e3
    )
    assert ms >= floor_compute_ms * (1 - 1e-9)
    assert ms >= floor_memory_ms * (1 - 1e-9)


@pytest.mark.parametrize("generation", FITTED)
def test_gemm_errors(generation):
    """GEMMs: median |error| within 10 % over all GEMM rows, and per GEMM operator within 10 %
    (A100) or 13 % (H100: mlp_down_proj is 12 %)."""
    errors = errors_by_name(kernel_fit(generation))
    assert errors["GEMMs"].in_sample.median <= 0.10
    limit = 0.10 if generation == "a100" else 0.13
    for op in fit_kernels.GEMM_OPS:
        assert errors[op].in_sample.median <= limit, op


@pytest.mark.parametrize("generation", FITTED)
def test_memory_bound_errors_stay_bounded(generation):
    """The memory-bound classes, each ``bytes / (HBM * mu) + fixed`` with its own two
    parameters and, for norms and residual adds, the L2 factor (measured: rotary 6-7 %,
    activation 4 %, residual add 6-7 %, norms 5-6 % median |error| in sample; norms 11-16 %
    before the L2 term; out of sample within a point: VALIDATION.md)."""
    errors = errors_by_name(kernel_fit(generation))
    for op in fit_kernels.MEMORY_OPS:
        assert errors[op].in_sample.median <= 0.10, op
    assert errors["memory-bound"].in_sample.median <= 0.10


@pytest.mark.parametrize("generation", FITTED)
def test_memory_bound_time_is_bytes_over_bandwidth_plus_fixed(generation):
    """Every memory-bound class prices ``bytes / (eff x HBM) + fixed`` (closed form from the
    data file; norms and plain streams whose bytes fit in L2 at ``l2_speedup`` x that rate),
    and a larger HBM bandwidth never makes a kernel slower."""
    from clustersim.costs.kernels import MEMORY_KINDS

    data = calibration_data(generation)
    cal = CalibrationSpec.model_validate(data)
    hw = fit_kernels.hardware(generation, cal)
    spec = fit_kernels.load_profiles(generation).groups[0].spec
    timer = KernelTimer(spec, hw)
    mem, kern = data["memory"], data["kernel"]
    expected = {
        "stream": (mem["efficiency"], kern["stream_fixed_us"]),
        "elementwise": (mem["elementwise_efficiency"], kern["fixed_us"]),
        "rotary": (mem["rotary_efficiency"], kern["fixed_us"]),
        "norm": (mem["norm_efficiency"], kern["norm_fixed_us"]),
    }
    faster = KernelTimer(
        spec, hw.model_copy(update={"hbm_bandwidth_gbps": 2 * hw.hbm_bandwidth_gbps})
    )
    for kind in MEMORY_KINDS:
        eff, fixed_us = expected[kind]
        for nbytes in (0.0, 1e3, 1e6, 3e8):
            resident = kind in ("stream", "norm") and nbytes <= mem["l2_mb"] * 1e6
            eff_l2 = eff * (mem["l2_speedup"] if resident else 1.0)
            want = nbytes / (eff_l2 * hw.hbm_bandwidth_gbps * 1e9) * 1e3 + fixed_us * 1e-3
            assert float(timer.memory_gpu_ms(nbytes, kind)) == pytest.approx(want, rel=1e-12)
            assert faster.memory_gpu_ms(nbytes, kind) <= timer.memory_gpu_ms(nbytes, kind)


OPERATOR_GAP = "H100 mlp_down_proj stays 11.3 % off (measurements/README.md)"


@pytest.mark.parametrize(
    "generation",
    ["a100", pytest.param("h100", marks=pytest.mark.xfail(strict=True, reason=OPERATOR_GAP))],
)
def test_every_operator_median_within_10_percent(generation):
    errors = errors_by_name(kernel_fit(generation))
    for op in (*fit_kernels.GEMM_OPS, *fit_kernels.MEMORY_OPS):
        assert errors[op].in_sample.median <= 0.10, op


def test_out_of_sample_errors_come_from_refits():
    generation = "h100"  # three model files: three refits (A100's five take longer)
    fit = kernel_fit(generation, cross_validate=True)
    assert set(fit.folds) == set(fit_kernels.load_profiles(generation).models)
    assert any(fold != fit.values for fold in fit.folds.values())
    everything = errors_by_name(fit)["all"]
    assert everything.out_of_sample.n == everything.in_sample.n
    assert everything.out_of_sample.mean >= everything.in_sample.mean


@pytest.mark.parametrize("generation", FITTED)
def test_attention_fit_errors(generation):
    cal = CalibrationSpec.model_validate(calibration_data(generation))
    fit = fit_attention.fit(generation, cal)
    everything = errors_by_name(fit)["all"]
    assert everything.in_sample.median <= 0.20
    assert everything.out_of_sample.mean >= everything.in_sample.mean
    assert any(fold != fit.values for fold in fit.folds.values())
    assert (fit.half_seq_from != "") == (generation == "a100")


def test_cli_rewrites_the_packaged_files_byte_identically(tmp_path):
    from clustersim.spec.calibration_data import calibration_dir

    generations = ["h100", "h800"]  # one fit and one derived file keep the test fast
    args = ["calibrate", "--out", str(tmp_path), "--json"]
    result = CliRunner().invoke(app, [*args, *(f"--generation={g}" for g in generations)])
    assert result.exit_code == 0, result.output
    for generation in generations:
        written = (tmp_path / f"{generation}.yaml").read_text()
        assert written == (calibration_dir() / f"{generation}.yaml").read_text(), generation


def test_cli_bad_measurements_exit_2(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["calibrate", "--measurements", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert "not found" in missing.output
    (tmp_path / "vidur_h100.csv").write_text("model,n_head\nx,1\n")
    bad = runner.invoke(app, ["calibrate", "-g", "h100", "--measurements", str(tmp_path)])
    assert bad.exit_code == 2
    assert "missing columns" in bad.output
    assert "Traceback" not in bad.output


def _timer(generation: str, model: ModelSpec, **updates) -> KernelTimer:
    """A KernelTimer on ``generation``'s GPU with ``section.field`` calibration overrides."""
    cal = fit_kernels.with_values(
        CalibrationSpec.model_validate(calibration_data(generation)), updates
    )
    gpu = _preset_of(generation)
    hw = HardwareSpec(gpu=gpu, num_nodes=1, gpus_per_node=8, calibration=cal, **GPU_PRESETS[gpu])
    return KernelTimer(model, hw)


SMALL_MODEL = ModelSpec(
    num_layers=1,
    hidden_size=1024,
    num_attention_heads=8,
    ffn_hidden_size=4096,
    vocab_size=32000,
    dtype="bf16",
)


def test_l2_resident_norm_and_stream_hand_computed():
    """H100 (3,350 GB/s), norm at 0.4 of HBM with 3 µs fixed, L2 of 50 MB, L2 factor 1.5:
    a 40 MB norm takes 40e6 / (3350e9 x 0.4 x 1.5) = 19.90050 µs + 3 = 22.90050 µs; a 60 MB
    one does not fit: 60e6 / (3350e9 x 0.4) = 44.77612 µs + 3 = 47.77612 µs. The element-wise class
    (activation, rotary) has no L2 term; without ``l2_mb`` nothing is resident."""
    updates = {
        "memory.norm_efficiency": 0.4,
        "kernel.norm_fixed_us": 3.0,
        "memory.efficiency": 1.0,
        "kernel.stream_fixed_us": 1.0,
        "memory.elementwise_efficiency": 0.5,
        "kernel.fixed_us": 2.0,
        "memory.l2_mb": 50.0,
        "memory.l2_speedup": 1.5,
    }
    timer = _timer("h100", SMALL_MODEL, **updates)
    assert timer.memory_gpu_ms(40e6, "norm") == pytest.approx(22.90050e-3, abs=1e-8)
    assert timer.memory_gpu_ms(60e6, "norm") == pytest.approx(47.77612e-3, abs=1e-8)
    # a plain stream at the full HBM rate: 40e6 / (3350e9 x 1.5) = 7.96020 µs + 1
    assert timer.memory_gpu_ms(40e6, "stream") == pytest.approx(8.96020e-3, abs=1e-8)
    # element-wise: 40e6 / (3350e9 x 0.5) = 23.88060 µs + 2, resident or not
    assert timer.memory_gpu_ms(40e6, "elementwise") == pytest.approx(25.88060e-3, abs=1e-8)
    # the array path prices the same as the scalar one, on both sides of the L2 size
    sizes = np.array([40e6, 50e6, 50e6 + 1, 60e6])
    scalar = [timer.memory_gpu_ms(float(b), "norm") for b in sizes]
    assert timer.memory_gpu_ms(sizes, "norm") == pytest.approx(scalar, rel=1e-15)
    no_l2 = _timer("h100", SMALL_MODEL, **{**updates, "memory.l2_mb": None})
    assert no_l2.memory_gpu_ms(40e6, "norm") == pytest.approx(
        40e6 / (3350e9 * 0.4) * 1e3 + 3e-3, rel=1e-12
    )


@settings(max_examples=100, deadline=None)
@given(
    nbytes=st.floats(0, 1e10),
    grow=st.floats(1.0, 4.0),
    kind=st.sampled_from(["stream", "norm", "elementwise", "rotary"]),
    generation=st.sampled_from(calibration_generations()),
)
def test_memory_bound_time_never_falls_with_bytes(nbytes, grow, kind, generation):
    """Leaving the L2 cache only slows a kernel down: time never falls as bytes grow."""
    timer = _timer(generation, SMALL_MODEL)
    assert timer.memory_gpu_ms(nbytes * grow, kind) >= timer.memory_gpu_ms(nbytes, kind)


def test_attention_exp_term_hand_computed():
    """Flash attention of 1e12 FLOPs of head dim 128 (one exp per
    2 x (128 + 128) = 512 FLOPs) on H100 at efficiency 0.5, half_seq 0, exp rate 4e12/s:
    1e12 / (989e12 x 0.5) = 2.0222 ms of matmul + 1e12 / 512 / 4e12 = 0.48828 ms of exps.
    Head dim 64 (one exp per 256 FLOPs) pays twice the exps for the same FLOPs: 0.97656 ms."""
    updates = {
        "attention.efficiency": 0.5,
        "attention.half_seq": 0.0,
        "attention.exp_tflops": 4.0,
        "kernel.fixed_us": 0.0,
    }
    heads128 = _timer("h100", SMALL_MODEL, **updates)  # 1024 / 8 heads = 128
    heads64 = _timer("h100", SMALL_MODEL.model_copy(update={"num_attention_heads": 16}), **updates)
    matmul_ms = 1e12 / (989e12 * 0.5) * 1e3
    ms = heads128.core_attention_gpu_ms(1e12, 0.0, 4096.0)
    assert ms == pytest.approx(matmul_ms + 1e12 / 512 / 4e12 * 1e3, rel=1e-12)
    ms64 = heads64.core_attention_gpu_ms(1e12, 0.0, 4096.0)
    assert ms64 == pytest.approx(matmul_ms + 1e12 / 256 / 4e12 * 1e3, rel=1e-12)
    # per pair (serving's path): 8 heads x 512 FLOPs and 8 exps per pair
    per_pair, per_query = heads128.attention_ms_per_pair(8 * 512.0, 8.0)
    assert per_pair == pytest.approx((8 * 512 / (989e12 * 0.5) + 8 / 4e12) * 1e3, rel=1e-12)
    assert per_query == 0.0  # half_seq 0
    # without the exp rate the term is gone
    plain = _timer("h100", SMALL_MODEL, **{**updates, "attention.exp_tflops": None})
    assert plain.core_attention_gpu_ms(1e12, 0.0, 4096.0) == pytest.approx(matmul_ms, rel=1e-12)


@pytest.mark.parametrize("generation", FITTED)
def test_attention_never_beats_peak(generation):
    """Flash attention never runs above the GPU's dense peak, whatever the head dimension,
    sequence or exp term."""
    for heads in (4, 8, 16, 32):
        model = SMALL_MODEL.model_copy(update={"num_attention_heads": heads})
        timer = _timer(generation, model)
        for keys in (1.0, 128.0, 4096.0, 1e6):
            ms = timer.core_attention_gpu_ms(1e12, 0.0, keys)
            peak = _timer(generation, model).hw.peak_tflops * 1e12
            assert ms >= 1e12 / peak * 1e3


def test_elementwise_row_floor_hand_computed():
    """One thread block per token row: H100, element-wise at 0.5 of HBM with 2 µs fixed and
    10 GB/s per block. SiLU-and-mul of one token over a 28,672-wide row reads 2 and writes 1
    rows of 2 bytes: 172,032 bytes, 17.2032 µs at one block's 10 GB/s (51.4 ns at 0.5 x
    3,350 GB/s) + 2 = 19.2032 µs. 4,096 such rows stream 704.6 MB: 420.63 µs + 2, above the
    floor. Plain streams have no row floor (norms: the next test)."""
    updates = {
        "memory.elementwise_efficiency": 0.5,
        "kernel.fixed_us": 2.0,
        "memory.row_gbps": 10.0,
    }
    timer = _timer("h100", SMALL_MODEL, **updates)
    row = 3 * 28672 * 2.0
    assert timer.memory_gpu_ms(row, "elementwise", row) == pytest.approx(19.2032e-3, rel=1e-12)
    many = 4096 * row
    want = many / (0.5 * 3350e9) * 1e3 + 2e-3
    assert timer.memory_gpu_ms(many, "elementwise", row) == pytest.approx(want, rel=1e-12)
    # arrays price as scalars; stream_ms with per_row takes each token as one row (the
    # activation and the rotary embedding), without it there is no floor (cross-entropy)
    tokens = np.array([1.0, 4096.0])
    gpu = timer.memory_gpu_ms(tokens * row, "elementwise", row)
    assert gpu == pytest.approx([19.2032e-3, want], rel=1e-12)
    assert float(timer.stream_ms(1.0, row, elementwise=True, per_row=True)) == pytest.approx(
        float(timer.issue(19.2032e-3, 1.0)), rel=1e-12
    )
    plain = row / (0.5 * 3350e9) * 1e3 + 2e-3
    assert float(timer.stream_ms(1.0, row, elementwise=True)) == pytest.approx(
        float(timer.issue(plain, 1.0)), rel=1e-12
    )
    stream_rate = 3350e9 * timer.hw.calibration.memory.efficiency
    assert timer.memory_gpu_ms(row, "stream", row) == pytest.approx(
        timer.memory_gpu_ms(row, "stream"), rel=1e-15
    )
    assert timer.memory_gpu_ms(1e9, "stream", 1e9) < 1e9 / 10e9 * 1e3  # no floor: HBM rate
    assert stream_rate > 10e9


def test_norm_row_floor_hand_computed():
    """vLLM's RMS norm runs one thread block per token too: H100, norm at 0.4 of HBM with
    3 µs fixed, 10 GB/s per block, no L2 term. One token of a 8,192-wide row (read and write
    2 bytes each: 32,768 bytes) takes 32,768 / 10e9 = 3.2768 µs + 3 = 6.2768 µs (the stream
    alone: 32,768 / (0.4 x 3,350e9) = 0.0245 µs); 4,096 tokens stream 134.2 MB in
    134,217,728 / 1,340e9 = 100.1625 µs + 3, above the floor. Under sequence parallelism
    (TP 2) each rank normalises half the tokens, whole rows: the floor is the whole row's."""
    updates = {
        "memory.norm_efficiency": 0.4,
        "kernel.norm_fixed_us": 3.0,
        "memory.row_gbps": 10.0,
        "memory.l2_mb": None,
    }
    model = SMALL_MODEL.model_copy(update={"hidden_size": 8192, "num_attention_heads": 64})
    timer = _timer("h100", model, **updates)
    row = 2 * 8192 * 2.0
    assert timer.memory_gpu_ms(row, "norm", row) == pytest.approx(6.2768e-3, rel=1e-12)
    many = 4096 * row
    assert timer.memory_gpu_ms(many, "norm", row) == pytest.approx(103.16250e-3, rel=1e-6)
    # the layer's norm kernel (memory_ms of class norm) takes each token as one row
    assert float(timer._norm(1.0)) == pytest.approx(float(timer.issue(6.2768e-3, 1.0)), rel=1e-12)
    cal = timer.hw.calibration
    sp = KernelTimer(
        model, timer.hw.model_copy(update={"calibration": cal}), 2, sequence_parallel=True
    )
    assert float(sp._norm(2.0)) == pytest.approx(float(timer.issue(6.2768e-3, 2.0)), rel=1e-12)
    # without a row rate there is no floor
    plain = _timer("h100", model, **{**updates, "memory.row_gbps": None})
    want = row / (0.4 * 3350e9) * 1e3 + 3e-3
    assert plain.memory_gpu_ms(row, "norm", row) == pytest.approx(want, rel=1e-12)


def test_rotary_class_hand_computed():
    """The rotary embedding has its own HBM fraction and shares the element-wise fixed time
    and row rate: H100, rotary at 0.25 of HBM, element-wise 0.5, 2 µs fixed, 10 GB/s per
    block. SMALL_MODEL rotates 8 query and 8 key heads of 128 per token (read and write, 2
    bytes): 8,192 bytes a token. 4,096 tokens: 33,554,432 / (0.25 x 3,350e9) = 40.0650 µs
    + 2; one token: the row, 8,192 / 10e9 = 0.8192 µs + 2 = 2.8192 µs. Without
    ``rotary_efficiency`` the element-wise fraction prices it: 20.0325 µs + 2."""
    updates = {
        "memory.rotary_efficiency": 0.25,
        "memory.elementwise_efficiency": 0.5,
        "kernel.fixed_us": 2.0,
        "memory.row_gbps": 10.0,
    }
    timer = _timer("h100", SMALL_MODEL, **updates)
    assert timer.rope_bytes_per_token == 8192.0
    assert float(timer.rope_ms(4096.0)) == pytest.approx(
        float(timer.issue(42.0650e-3, 4096.0)), rel=1e-5
    )
    assert float(timer.rope_ms(1.0)) == pytest.approx(float(timer.issue(2.8192e-3, 1.0)), rel=1e-12)
    fallback = _timer("h100", SMALL_MODEL, **{**updates, "memory.rotary_efficiency": None})
    assert float(fallback.rope_ms(4096.0)) == pytest.approx(
        float(timer.issue(22.03250e-3, 4096.0)), rel=1e-5
    )

"""`clustersim validate`: plans of every expressible row, leave-one-out refits, package data."""

from __future__ import annotations

import csv
import math
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from clustersim.audit.checks import audit
from clustersim.calibration import sets_serving as sv
from clustersim.calibration import sets_training as st
from clustersim.calibration import validate as v
from clustersim.calibration.fit_e2e import Curve, fit_with_loo
from clustersim.engine.serving.sim import check_serving_supported
from clustersim.engine.training.sim import check_supported
from clustersim.layout import Layout

ROOT = Path(__file__).resolve().parent.parent


# ---- leave-one-out ---------------------------------------------------------------------------


def test_loo_refits_without_the_row():
    # three rows whose best parameter differs: the third pulls the joint fit up
    grid = (0.0, 10.0)
    curves = [
        Curve.of(grid, [100.0, 50.0], rate=False),
        Curve.of(grid, [100.0, 60.0], False),
        Curve.of(grid, [100.0, 20.0], False),
    ]
    published = [80.0, 80.0, 60.0]
    fit = fit_with_loo("p", ["a", "b", "c"], curves, published)
    assert set(fit.without) == {"a", "b", "c"}
    assert any(not math.isclose(x, fit.value) for x in fit.without.values())
    # the value without c is fitted on a and b only
    alone = fit_with_loo("p", ["a", "b"], curves[:2], published[:2]).value
    assert fit.without["c"] == alone
    assert curves[2].metric(fit.without["c"]) != curves[2].metric(fit.value)


def test_serving_launch_fit_is_refitted_per_row():
    ids = ("S0137", "S0141")  # eager decode rows: they fit kernel.launch_us
    rows = [r for r in sv.serving_rows()[0] if r.row_id in ids]
    assert all(r.fits and r.param == sv.LAUNCH for r in rows)
    with v.Runner(1) as runner:
        res, fits = v.evaluate_e2e("serving", rows, [], runner, {})
    fit = fits[sv.LAUNCH]
    changed = [r for r in res.rows if not math.isclose(r.param_without, fit.value)]
    assert changed, "some row's refitted value must differ from the full fit"
    for r in changed:  # its out-of-sample prediction uses the value fitted without it
        assert r.out_of_sample != pytest.approx(r.in_sample, rel=1e-9)
        assert r.out_of_sample == pytest.approx(
            v.predict("serving", r.row_id, {sv.LAUNCH: r.param_without}), rel=0.05
        )


# ---- every expressible row builds a valid plan; the rest say why -----------------------------


def test_dense_rows_build_plans():
    for row in st.dense_table():
        plan = st.dense_plan(row)
        assert plan.parallel.world_size == int(row["num_gpus"])
        check_supported(plan, audit(plan).layout)
    plan = st.dense_plan(st.dense_table()[-1])  # 1T: TP 8 x PP 64 x DP 6, 512 micro-batches
    assert plan.parallel.num_microbatches == 512 and plan.parallel.virtual_stages == 2
    assert st.chunks_for(15, 4) == 3 and st.chunks_for(6, 1) == 1


def test_moe_rows_build_plans_and_the_rest_have_reasons():
    rows, skipped = st.moe_rows()
    assert len(rows) + len(skipped) == len(st.moe_table())
    assert all(s.reason == "FSDP baseline: in the fsdp set" for s in skipped if s.row_id in {
        r.row_id for r in st.fsdp_rows()})  # fmt: skip
    assert all(s.reason for s in skipped)
    expressible = {"T0005", "T0010", "T0015", "T0018", "T0094", "T0021", "T0022", "T0096"}
    expressible |= {"T0158", "T0162"}  # FP8 on B200 / GB200
    expressible |= {"T0084", "T0091"}  # context parallelism (Parallel Folding Table 5)
    assert expressible <= {r.row_id for r in rows}
    fsdp = {r.row_id for r in st.fsdp_rows()}  # Liu et al.'s FSDP baselines: their own set
    assert {"T0001", "T0002", "T0016", "T0034"} <= fsdp
    assert not fsdp & {r.row_id for r in rows}
    assert {"T0078", "T0100", "T0157"} <= {s.row_id for s in skipped}
    assert {"T0098", "T0099", "T0120"} <= {r.row_id for r in rows}  # DeepSeek-V3
    for r in rows:
        plan = st.moe_plan(next(x for x in st.moe_table() if x["row_id"] == r.row_id))
        assert plan.parallel.world_size == plan.hardware.num_gpus
        check_supported(plan, audit(plan).layout)


def test_fp8_rows_reproduce_table2_speedups():
    """The packaged FP8 GEMM efficiency (costs/precision.py) is fitted on Table 2's FP8/BF16
    speedups (575.1 / 458.3 and 631.7 / 487.7 TFLOP/s): the simulated speedups of the same
    plans agree within 1 %; the FP8 rows are tensorwise FP8 plans at GBS 256."""
    table = {r["row_id"]: r for r in st.moe_table()}
    for fp8_id, bf16_id in (("T0021", "T0004"), ("T0022", "T0005")):
        plan = st.moe_plan(table[fp8_id])
        assert (plan.model.dtype, plan.model.fp8_recipe) == ("fp8", "tensorwise")
        assert st.gbs(table[fp8_id]) == 256
        bf16 = st.predict_moe(bf16_id, {}) * st.MFU_PEAK_TFLOPS / 100  # MFU row -> TFLOP/s
        published = float(table[fp8_id]["value"]) / float(
            table[f"T00{int(fp8_id[1:]) - 2}"]["value"]
        )
        assert st.predict_moe(fp8_id, {}) / bf16 == pytest.approx(published, rel=0.01)


def test_liu_rows_take_the_modelzoo_vpp_of_their_time():
    """Liu et al. print no VPP; the ModelZoo benchmark configurations of April 2025 (78fd4d6)
    ran Qwen2-57B-A14B at TP 2 / PP 4 / EP 4 with VPP 7 (28 layers: one per model chunk) and
    Mixtral-8x22B at TP 2 / PP 8 / EP 8 with VPP 1. Models it did not carry keep 1F1B; rows
    that print a VPP keep theirs; rows without a pipeline have no chunks."""
    table = {r["row_id"]: r for r in st.moe_table()}
    for rid in ("T0009", "T0010", "T0043", "T0048"):  # Qwen2-57B MCore / Folding, PP 4
        plan = st.moe_plan(table[rid])
        par, layout = plan.parallel, Layout(plan)
        assert (par.pp, par.virtual_stages, par.schedule) == (4, 7, "interleaved")
        chunks = [layout.chunk_layers(s, c) for s in range(4) for c in range(7)]
        assert sorted(x for chunk in chunks for x in chunk) == list(range(28))
        assert all(len(chunk) == 1 for chunk in chunks)
    for rid, pp in (("T0005", 8), ("T0017", 8), ("T0015", 8)):  # Mixtral, Llama3, G8T8
        par = st.moe_plan(table[rid]).parallel
        assert (par.pp, par.virtual_stages, par.schedule) == (pp, 1, "1f1b")
    assert st.moe_plan(table["T0097"]).parallel.virtual_stages == 7  # printed by the ModelZoo
    assert st.moe_plan(table["T0008"]).parallel.virtual_stages == 1  # Qwen2 TP + EP + DP, PP 1


def test_rows_use_their_system_and_sharding():
    """FSDP baselines shard everything over DP (ZeRO-3); DGX-B200 rows run on B200 nodes of 8,
    DGX-GB200 rows on GB200 trays of 4 in one NVL72 domain, per-tensor FP8 as tensorwise."""
    table = {r["row_id"]: r for r in st.moe_table()}
    assert st.moe_plan(table["T0002"]).parallel.sharding == "full"
    assert st.moe_plan(table["T0005"]).parallel.sharding == "optimizer"
    b200, gb200 = st.moe_plan(table["T0158"]), st.moe_plan(table["T0162"])
    assert (b200.hardware.gpu, b200.hardware.gpus_per_node) == ("B200", 8)
    assert (gb200.hardware.gpu, gb200.hardware.gpus_per_node) == ("GB200", 4)
    assert gb200.hardware.nvlink_domain == st.RACK_GPUS_USED  # its 64 GPUs: one rack
    assert b200.model.fp8_recipe == gb200.model.fp8_recipe == "tensorwise"


def test_deepseek_v3_h800_pretraining_row_is_a_dualpipe_plan():
    """T0164 (DeepSeek-V3 report: 180K H800 GPU-hours per trillion tokens): PP16 DualPipe,
    EP64, DP128 ZeRO-1, FP8 blockwise, GBS 15,360 of 4K tokens; its prediction is
    1e12 / (tokens/s/GPU x 3600). T0165 (3.7 days) repeats it; the totals are not runs."""
    table = {r["row_id"]: r for r in st.moe_table()}
    plan = st.moe_plan(table["T0164"])
    par = plan.parallel
    assert (par.schedule, par.pp, par.ep, par.dp, par.tp) == ("dualpipe", 16, 64, 128, 1)
    assert (par.num_microbatches, par.sharding, par.overlap_ep_comm) == (120, "optimizer", True)
    assert (plan.model.dtype, plan.model.fp8_recipe, par.moe_dispatcher) == (
        "fp8",
        "blockwise",
        "deepep",
    )
    rows, skipped = st.moe_rows()
    row = next(r for r in rows if r.row_id == "T0164")
    assert not row.rate  # GPU-hours grow with the iteration time
    reasons = {s.row_id: s.reason for s in skipped}
    assert "same run as T0164" in reasons["T0165"]
    assert "T0166" in reasons and "T0169" in reasons


def test_serving_rows_build_plans_and_the_rest_have_reasons():
    rows, skipped = sv.serving_rows()
    assert len(rows) + len(skipped) == len(sv.serving_table())
    assert all(s.reason for s in skipped)
    for r in rows:
        plan = sv.serving_plan(next(x for x in sv.serving_table() if x["row_id"] == r.row_id))
        check_serving_supported(plan, audit(plan).layout)
        assert plan.workload.requests.max_batch_size == plan.workload.requests.num


def test_h100_fp8_serving_row_states_the_sources_configuration():
    """S0062 (TensorRT-LLM v0.6.1 'H100 GPUs (FP8)' peak-throughput table): LLaMA-70B, TP 4,
    batch 480, 128 in / 2048 out, built with --enable_fp8 --fp8_kv_cache; S0086 (low-latency
    table, FP8, KV cache type not stated): batch 1, 128 in / 1 out, TP 4."""
    table = {r["row_id"]: r for r in sv.serving_table()}
    plan = sv.serving_plan(table["S0062"])
    req = plan.workload.requests
    assert (plan.model.dtype, plan.model.fp8_recipe, req.kv_dtype) == ("fp8", "tensorwise", "fp8")
    assert plan.hardware.gpu == "H100-SXM"  # 80 GB HBM3: the SXM part
    assert plan.parallel.tp == 4
    assert (plan.model.num_layers, plan.model.hidden_size, plan.model.num_kv_heads) == (80, 8192, 8)
    assert (req.num, req.max_batch_size) == (480, 480)
    assert (req.prompt_len.value, req.output_len.value) == (128, 2048)
    assert req.cuda_graphs is False
    assert req.num_gpu_blocks == 480 * math.ceil((128 + 2048) / 16)  # the whole static batch
    ttft = sv.serving_plan(table["S0086"])
    assert (ttft.model.dtype, ttft.model.fp8_recipe) == ("fp8", "tensorwise")
    assert ttft.workload.requests.kv_dtype is None  # plan default (BF16 for FP8 models)
    assert (ttft.workload.requests.num, ttft.parallel.tp) == (1, 4)
    assert (ttft.workload.requests.prompt_len.value, ttft.workload.requests.output_len.value) == (
        128,
        1,
    )
    assert sv.setup(table["S0086"])["kind"] == "ttft"
    # trtllm-bench rows (engine-chosen batch) stay out, with the reason.
    assert "max batch size" in (sv.serving_reason(table["S0001"]) or "")


# ---- shortcuts used to keep validate fast are exact ------------------------------------------


def test_microbatch_extrapolation_matches_full_simulation():
    row = next(r for r in st.dense_table() if r["params_billion"] == 39.1)  # m = 48, PP 2
    plan = st.dense_plan(row)
    assert plan.parallel.num_microbatches > 5 * plan.parallel.pp
    assert st.iteration_ms(plan) == pytest.approx(
        st.iteration_ms(plan, extrapolate=False), rel=1e-9
    )


def test_dense_time_is_linear_in_framework_us():
    row = st.dense_table()[1]
    t = [st.iteration_ms(st.dense_plan(row, {st.FRAMEWORK: f})) for f in (0.0, 30.0, 60.0)]
    assert t[1] == pytest.approx((t[0] + t[2]) / 2, rel=1e-9)


# ---- package data ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["narayanan2021_table1.csv", "training_moe.csv", "serving.csv"])
def test_measurements_are_package_data(name):
    ref = resources.files("clustersim.calibration").joinpath("measurements", name)
    assert ref.is_file()
    rows = list(csv.DictReader(ref.read_text(encoding="utf-8").splitlines()))
    assert rows and all(r.get("row_id") or r.get("params_billion") for r in rows)


def test_validate_reads_no_source_tree_path():
    for module in (v, st, sv):
        text = Path(module.__file__).read_text()
        assert "configs/validation" not in text and "/work/shared" not in text
        assert "__file__" not in text


def test_narayanan_copy_matches_configs():
    copy = ROOT / "configs" / "validation" / "narayanan2021_table1.csv"
    if not copy.is_file():
        pytest.skip("configs/validation is not in this checkout")
    packaged = resources.files("clustersim.calibration").joinpath(
        "measurements", "narayanan2021_table1.csv"
    )
    assert packaged.read_text() == copy.read_text()


# ---- whole sets ------------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_validation_reports_every_set():
    results = v.run_validation(("dense", "moe", "serving"), quick=True, workers=1)
    assert [r.name for r in results] == ["dense", "moe", "serving"]
    for res in results:
        s = res.summary()
        assert s["n"] == len(res.rows) > 0
        assert np.isfinite([s["in_mean"], s["oos_mean"]]).all()
    assert "kernel.framework_us" in results[0].params


def test_deepseek_v3_61_layers_over_pp8_vpp4_by_hand():
    """T0098 (PP8 x VPP4, MTP 1 layer): 61 decoder layers + embedding + MTP + loss in 32
    virtual stages, Megatron order. Counting embedding and loss as one slot each gives 64
    slots, 2 per stage: stage 0 = embedding + 1 layer, stages 1..30 = 2 layers, stage 31 =
    MTP (the +1 MoE layer) + loss: ModelZoo's published 'Et|(tt|)*30mL'."""
    table = {r["row_id"]: r for r in st.moe_table()}
    plan = st.moe_plan(table["T0098"])
    par = plan.parallel
    assert (par.pp, par.virtual_stages) == (8, 4)
    assert par.layers_per_stage == [1] + [2] * 30 + [1]
    assert plan.model.num_layers == 62  # 61 + the MTP block as one more MoE layer
    assert par.moe_dispatcher == "deepep"
    # MTP unstated: the source's TFLOP/s over tokens/s of the run, 338e12 / 1297 = 260.6
    # GFLOP/token, is Megatron's count with MTP; 782e12 / 3139 = 249.1 ('w/o MTP') is without.
    assert st.has_mtp(table["T0120"]) and st.has_mtp(table["T0119"])
    assert not st.has_mtp(table["T0135"])
    # Without MTP, 63 slots: the one-slot shortfall comes off the last stage that keeps a
    # layer after the shortfall, stage 30 (stage 31 holds loss + 1 layer).
    no_mtp = st.moe_plan(table["T0136"]).parallel  # PP8 x VPP4, 'w/o MTP'
    assert no_mtp.layers_per_stage == [1] + [2] * 29 + [1, 1]
    # PP16, no VPP: 63 slots, 4 per stage: 3 + 4 x 14 + (4 - loss - 1 short) = 61.
    assert st.layout_61(61, 16, mtp=False) == [3] + [4] * 14 + [2]
    # Row says 'w/ MTP': 64 slots, 4 per stage, MTP counted in the last one.
    assert st.layout_61(61, 16, mtp=True) == [3] + [4] * 14 + [3]


def test_megatron_bridge_rows_take_their_recipe_dispatcher():
    """Megatron-Bridge's DeepSeek-V3 tables print no dispatcher; its performance recipes
    enable DeepEP with the EP all-to-all overlap on DGX-H100 and the all-to-all dispatcher
    without overlap on Blackwell (B200 / GB200 / GB300)."""
    table = {r["row_id"]: r for r in st.moe_table()}
    for row_id in ("T0119", "T0120", "T0121"):  # DGX-H100
        par = st.moe_plan(table[row_id]).parallel
        assert (par.moe_dispatcher, par.overlap_ep_comm) == ("deepep", True), row_id
    for row_id in ("T0128", "T0134", "T0140"):  # DGX-B200, DGX-GB200, DGX-GB300
        par = st.moe_plan(table[row_id]).parallel
        assert (par.moe_dispatcher, par.overlap_ep_comm) == ("alltoall", False), row_id


def test_bridge_recipe_layout_of_16_virtual_stages():
    """deepseek_v3.py's layout_map for (PP, VPP) = (16, 1) / (8, 2) / (4, 4): embedding + 4
    decoder layers, 14 x 4, then 1 decoder layer with the MTP module and the loss."""
    assert st.bridge_layout_16(61, mtp=True) == [4] * 15 + [2]
    assert st.bridge_layout_16(61, mtp=False) == [4] * 15 + [1]
    assert sum(st.bridge_layout_16(61, mtp=True)) == 62


@pytest.mark.parametrize(
    ("row_id", "capacity", "pad"),
    [("T0128", 1.0, True), ("T0138", None, False), ("T0146", None, False)],
)
def test_b200_rows_run_their_recipe(row_id, capacity, pad):
    """DGX-B200 DeepSeek-V3 rows: recompute_modules [mla_up_proj] (every release's B200
    recipe), the recipe's 16-stage layout with the MTP module and its head, token-drop padded
    to capacity in 25.09 (apply_moe_token_drop), dropless in 25.11 / 26.02 (the footnote)."""
    row = next(r for r in st.moe_table() if r["row_id"] == row_id)
    plan = st.moe_plan(row)
    assert plan.parallel.recompute == "selective"
    assert plan.parallel.selective_modules == ("mla_up_proj",)
    assert plan.parallel.layers_per_stage == [4] * 15 + [2]
    assert plan.model.mtp_layers == 1 and plan.model.num_layers == 62
    assert plan.model.moe.capacity_factor == capacity
    assert plan.model.moe.pad_to_capacity is pad


def test_stated_recompute_modules_of_the_case_study_rows():
    """T0098 / T0099's notes state Yan et al.'s case-study recompute: mlp, mla_up_proj,
    moe_act, layernorm; Megatron-Bridge rows use the provider's fused (TE) cross-entropy."""
    table = {r["row_id"]: r for r in st.moe_table()}
    plan = st.moe_plan(table["T0098"])
    assert set(plan.parallel.selective_modules) == {"mlp", "mla_up_proj", "moe_act", "layernorm"}
    assert not plan.parallel.fused_cross_entropy
    assert st.moe_plan(table["T0146"]).parallel.fused_cross_entropy


def test_deepseek_tokens_per_gpu_is_tokens_over_time():
    """tokens/s/GPU = GBS x seq / iteration time / GPUs (the Megatron-Bridge definition)."""
    table = {r["row_id"]: r for r in st.moe_table()}
    r = table["T0134"]
    t_s = st.iteration_ms(st.moe_plan(r)) / 1e3
    expected = 4096 * 4096 / t_s / 256
    assert st.moe_metric(r, {}) == pytest.approx(expected, rel=1e-9)


def test_grace_blackwell_ep_groups_stay_inside_a_rack() -> None:
    """256 GB200 / GB300 GPUs are four racks of 64 used GPUs: every EP 32 / 64 group of the
    published layouts lies inside one NVLink domain (packed by 72 it would not)."""
    from clustersim.calibration import sets_training as st
    from clustersim.layout import Layout

    rows = {r["row_id"]: r for r in st.moe_table()}
    for row_id, ep in (("T0135", 64), ("T0131", 32)):
        plan = st.moe_plan(rows[row_id])
        assert plan.parallel.ep == ep and plan.parallel.world_size == 256
        assert plan.hardware.nvlink_domain_gpus == 64
        for group in Layout(plan).groups("ep"):
            assert len({rank // 64 for rank in group}) == 1

"""Training validation sets: dense GPT (Narayanan et al. 2021) and MoE (``training_moe.csv``).

Both read the packaged measurements (``clustersim/calibration/measurements``), build one plan
per expressible row, and predict the source's own metric with the source's FLOP convention.

Dense, Narayanan et al. 2021 Table 1 (A100-80GB, Megatron-LM of 2021): micro-batch 1,
interleaved schedule with the smallest v >= 2 dividing the layers per stage (1F1B if PP = 1),
full recomputation, no sequence parallelism, no flash attention, no distributed optimizer, no
communication overlap; TFLOP/s per GPU with the paper's Eq. 3 (recompute forward included,
full attention). The free parameter is ``kernel.framework_us``.

MoE, Liu et al. 2025 (MoE Parallel Folding, Megatron-Core on H100) and Megatron-MoE-ModelZoo:
see :data:`MOE_ASSUMPTIONS`. The metric is the source's MFU (model FLOPs / 989.5 TFLOP/s) or
model TFLOP/s per GPU, with Megatron-Core's FLOP count (``model_flops_per_iteration``: no
recompute term, causal attention, router left out). No MoE row fits an end-to-end parameter
(``kernel.framework_us`` comes from the dense set; the dropless synchronisation is a stated
physical value, ``calibrate.DROPLESS_SYNC_US``): every row is out of sample.

For a long pipeline run the iteration time is exactly linear in the number of micro-batches
once the schedule is in steady state (m >= 2 PP, deterministic routing, fixed lengths), so
:func:`iteration_ms` simulates 2 PP and 3 PP micro-batches and extrapolates when m > 5 PP
(agrees with the full simulation to 1e-12 relative; a test checks it).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from clustersim.calibration import read_measurements
from clustersim.calibration.fit_e2e import E2ERow, Skipped, nested
from clustersim.costs.compute import model_flops_per_iteration
from clustersim.run.simulate import simulate
from clustersim.spec import plan_from_dict
from clustersim.spec.schema import RECOMPUTE_MODULES, Plan

DENSE_CSV = "narayanan2021_table1.csv"
MOE_CSV = "training_moe.csv"
DENSE_SEQ_LEN = 2048
DENSE_VOCAB = 51200
MFU_PEAK_TFLOPS = 989.5  # Liu et al. 2025: MFU relative to 989.5 TFLOP/s BF16 dense

FRAMEWORK = "kernel.framework_us"
# The GPU preset of each system column (first match wins: GB200 before B200), and the GPUs
# per node the plan uses: 8 per DGX / HGX node; 4 per Grace-Blackwell compute tray, 72 of them
# in one NVLink domain (the presets' nvlink_domain_gpus).
GPU_OF_SYSTEM = (
    ("GB300", "GB300"),
    ("GB200", "GB200"),
    ("B200", "B200"),
    ("H800", "H800"),
    ("H100", "H100-SXM"),
)
GPUS_PER_NODE = {"GB300": 4, "GB200": 4, "B200": 8, "H800": 8, "H100-SXM": 8}
# GPUs a job uses per NVL72 rack when its size is a multiple of 64 (256 GPUs = 4 racks x 64):
# the published Grace-Blackwell runs choose EP 32 / 64 so that the all-to-all stays inside a
# rack's NVLink domain, which a 256-GPU job can only do with 64 GPUs placed per rack (packing
# 72, 72, 72, 40 would split every other EP group over InfiniBand).
RACK_GPUS_USED = 64
FP8_SPEEDUP_ROWS = ("T0021", "T0022")  # the packaged FP8 efficiency is fitted on their speedup
TABLE2_GBS = 256  # Liu et al. 2025 Table 2 prints no GBS; its BF16 rows are Table 3's (256)
# The FP8 recipe of a row's precision column (Transformer Engine's names).
FP8_RECIPES = (
    ("TE DELAYED SCALING", "tensorwise"),
    ("PER-TENSOR", "tensorwise"),
    ("BLOCKWISE", "blockwise"),
    ("BLOCK-WISE", "blockwise"),
    ("MXFP8", "mxfp8"),
    ("FP8-MX", "mxfp8"),
)

MOE_ASSUMPTIONS = (
    "H100-SXM nodes of 8 GPUs (Eos DGX H100); BF16; sequence parallelism when TP > 1; "
    "distributed optimizer with overlapped grad-reduce / param-gather; flash attention; "
    "no activation recomputation; all-to-all token dispatcher",
    "micro-batch size 1 (not stated in the paper; ModelZoo default); VPP not stated by the "
    "paper: the ModelZoo benchmark configuration of the model at the time (April 2025, "
    "78fd4d6: Qwen2-57B-A14B VPP 7, one layer per model chunk; Mixtral-8x22B VPP 1), else "
    "Megatron's default, no interleaving (Llama3-8x70B, Mixtral-8x22B-G8T8); rows that state "
    "their VPP (ModelZoo) use it",
    "token-drop with capacity factor 1.0 as balanced routing (routing: even): the aux-loss "
    "balanced router with CF 1.0 caps every expert at its balanced share; dropless ModelZoo "
    "rows also use even routing (the aux-loss imbalance is not published)",
    "ETP not printed: 1 for 'MCore w/ Folding' rows (folding decouples it), TP otherwise "
    "(Megatron-Core's default before folding)",
    "Llama3-8x70B = Llama-3-70B with every MLP upcycled to 8 experts, top-2 (the paper does "
    "not print top-k); Mixtral-8x22B-G8T8 = Mixtral-8x22B with 64 experts of FFN 2048, top-8",
    "Table 2 rows (FP8 vs BF16) at GBS 256, as the same runs in Table 3; FP8 rows: Table "
    "2's 'FP8 (TE delayed scaling)' as recipe tensorwise, ModelZoo's 'FP8 blockwise' as "
    "blockwise; FP8 primary weights (--fp8-param-gather); the packaged FP8 GEMM efficiency is "
    "fitted on the FP8/BF16 speedups of T0021/T0019 and T0022/T0020 (costs/precision.py), so "
    "those two rows are in sample",
    "NeMo performance-summary rows (Mixtral-8x7B on DGX-B200 / DGX-GB200, per-tensor FP8): "
    "B200 nodes of 8; GB200 trays of 4 in one NVL72 domain; the other assumptions as above",
)

# ---- model shapes the presets lack ----------------------------------------------------------

MOE_MODELS: dict[str, dict[str, Any]] = {
    "Mixtral-8x7B": {"preset": "mixtral-8x7b"},
    "DeepSeek-V3": {"preset": "deepseek-v3"},
    "Mixtral-8x22B": {"preset": "mixtral-8x22b"},
    # Liu et al. 2025 §4.1: fine-grained upcycling, 8 -> 64 experts of 1/8 the FFN, top-8.
    "Mixtral-8x22B-G8T8": {
        "preset": "mixtral-8x22b",
        "name": "mixtral-8x22b-g8t8",
        "ffn_hidden_size": 2048,
        "moe": {"num_experts": 64, "top_k": 8},
    },
    # Qwen/Qwen2-57B-A14B config.json: 64 experts of 2560, top-8, one shared expert of 20480.
    "Qwen2-57B-A14B": {
        "name": "qwen2-57b-a14b",
        "num_layers": 28,
        "hidden_size": 3584,
        "num_attention_heads": 28,
        "num_kv_heads": 4,
        "ffn_hidden_size": 2560,
        "vocab_size": 151936,
        "moe": {
            "num_experts": 64,
            "top_k": 8,
            "num_shared_experts": 1,
            "shared_expert_ffn_hidden_size": 20480,
        },
    },
    # meta-llama/Meta-Llama-3-70B config.json, every MLP upcycled to 8 experts, top-2.
    "Llama3-8x70B": {
        "name": "llama3-8x70b",
        "num_layers": 80,
        "hidden_size": 8192,
        "num_attention_heads": 64,
        "num_kv_heads": 8,
        "ffn_hidden_size": 28672,
        "vocab_size": 128256,
        "moe": {"num_experts": 8, "top_k": 2},
    },
}


def _int(text: str, default: int | None = None) -> int | None:
    text = (text or "").strip()
    return int(text) if text else default


# ---- dense: Narayanan et al. 2021 -----------------------------------------------------------


@cache
def dense_table() -> tuple[dict[str, float], ...]:
    """The rows of Table 1 as numbers (packaged copy)."""
    rows = read_measurements(DENSE_CSV)
    return tuple({k: float(v) for k, v in r.items()} for r in rows)


def dense_id(row: dict[str, float]) -> str:
    """Row id of a Table 1 row, e.g. ``N-145.6B``."""
    return f"N-{row['params_billion']:g}B"


def chunks_for(layers_per_stage: int, pp: int) -> int:
    """Model chunks per GPU: the smallest v >= 2 dividing the layers per stage (1 if PP = 1)."""
    if pp == 1:
        return 1
    return next((v for v in range(2, layers_per_stage + 1) if layers_per_stage % v == 0), 1)


def dense_plan(
    row: dict[str, float],
    values: dict[str, float] | None = None,
    microbatches: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> Plan:
    """The plan of one Table 1 row; ``values``: calibration overrides (``section.field``)."""
    tp, pp, gpus = int(row["tp"]), int(row["pp"]), int(row["num_gpus"])
    layers, dp = int(row["num_layers"]), gpus // (tp * pp)
    v = chunks_for(layers // pp, pp)
    raw: dict[str, Any] = {
        "name": f"narayanan2021-{row['params_billion']:g}b",
        "model": {
            "name": f"gpt-{row['params_billion']:g}b",
            "num_layers": layers,
            "hidden_size": int(row["hidden_size"]),
            "num_attention_heads": int(row["num_attention_heads"]),
            "ffn_hidden_size": 4 * int(row["hidden_size"]),
            "vocab_size": DENSE_VOCAB,
            "activation": "gelu",
            "tie_embeddings": True,
        },
        "hardware": {
            "gpu": "A100-80GB",
            "num_nodes": -(-gpus // 8),
            "gpus_per_node": 8,
            "calibration": nested(values or {}),
        },
        "parallel": {
            "tp": tp,
            "pp": pp,
            "dp": dp,
            "micro_batch_size": 1,
            "num_microbatches": microbatches or int(row["global_batch_size"]) // dp,
            "schedule": "interleaved" if v > 1 else "1f1b",
            "virtual_stages": v,
            "recompute": "full",
            "flash_attention": False,
            "sequence_parallel": False,
            "distributed_optimizer": False,
            "overlap_communication": False,
        },
        "workload": {"mode": "training", "seq_len": {"dist": "fixed", "value": DENSE_SEQ_LEN}},
    }
    for path, value in (overrides or {}).items():
        section, key = path.split(".", 1)
        raw.setdefault(section, {})[key] = value
    return plan_from_dict(raw, "validation")


def iteration_ms(plan: Plan, extrapolate: bool = True) -> float:
    """Simulated iteration time; for m > 5 PP micro-batches, from 2 PP and 3 PP by linear
    extrapolation (exact in steady state; pass ``extrapolate=False`` for the full run).
    DualPipe plans always run in full: their time per micro-batch between 2 PP and 5 PP is
    not constant (T0164: 130-149 ms from one 16 micro-batches to the next, 1F1B's plan
    148.5 ms each time), so the extrapolation would be off by a few percent."""
    par = plan.parallel
    m, pp = par.num_microbatches, par.pp
    if not extrapolate or m <= 5 * pp or par.schedule == "dualpipe":
        return float(simulate(plan).metrics["iteration_time_ms"])
    t = {}
    for k in (2 * pp, 3 * pp):
        variant = plan.model_copy(
            update={"parallel": par.model_copy(update={"num_microbatches": k})}
        )
        t[k] = float(simulate(variant).metrics["iteration_time_ms"])
    slope = (t[3 * pp] - t[2 * pp]) / pp
    return t[2 * pp] + slope * (m - 2 * pp)


def dense_tflops(row: dict[str, float], values: dict[str, float]) -> float:
    """Predicted TFLOP/s per GPU (Narayanan et al. Eq. 3 FLOPs / simulated time / GPUs)."""
    plan = dense_plan(row, values)
    flops = model_flops_per_iteration(
        plan.model, int(row["global_batch_size"]), DENSE_SEQ_LEN, recompute="full"
    )
    return flops / (iteration_ms(plan) / 1e3) / row["num_gpus"] / 1e12


def dense_rows() -> list[E2ERow]:
    """Every Table 1 row (all are expressible); each fits ``kernel.framework_us``."""
    out = []
    for r in dense_table():
        label = (
            f"GPT {r['params_billion']:g}B, {int(r['num_gpus'])} GPUs, "
            f"TP{int(r['tp'])} PP{int(r['pp'])}"
        )
        cost = r["num_gpus"] * r["global_batch_size"] / 1e5
        out.append(
            E2ERow(
                dense_id(r),
                label,
                "TFLOP/s/GPU",
                r["achieved_tflops_per_gpu"],
                rate=True,
                param=FRAMEWORK,
                fits=True,
                cost=cost,
            )
        )
    return out


def predict_dense(row_id: str, values: dict[str, float]) -> float:
    """Prediction of dense row ``row_id`` under calibration ``values``."""
    row = next(r for r in dense_table() if dense_id(r) == row_id)
    return dense_tflops(row, values)


# ---- MoE training: training_moe.csv ---------------------------------------------------------


@cache
def moe_table() -> tuple[dict[str, str], ...]:
    """Every row of ``training_moe.csv`` (packaged copy, unmodified)."""
    return tuple(read_measurements(MOE_CSV))


DUPLICATES = {  # the same run in another unit, counted once
    "T0019": "T0004",
    "T0020": "T0005",
    "T0165": "T0164",
}
DUPLICATE_WHY = {
    "T0165": "days = GPU-hours / 2,048 GPUs / 24",
}


def moe_reason(r: dict[str, str]) -> str | None:
    """Why row ``r`` cannot be simulated (None: it can)."""
    precision = r["precision"].upper()
    deepseek = deepseek_reason(r)
    if deepseek:
        return deepseek
    if "FP8" in precision and fp8_recipe(r) is None:
        return f"{r['precision']}: FP8 recipe not recognised"
    if gpu_preset(r) is None:
        return f"{r['gpu']}: no GPU preset"
    if deepseek is None and r["metric"] not in ("MFU", "model_TFLOPS_per_GPU"):
        return f"metric {r['metric']} of a configuration that is not simulated"
    if not r["gbs"] and "Table 2" not in r["source_location"]:
        return "global batch size not stated"
    if r["row_id"] in DUPLICATES:
        why = DUPLICATE_WHY.get(r["row_id"], "TFLOP/s = MFU x 989.5")
        return f"same run as {DUPLICATES[r['row_id']]} ({why}); counted once"
    if not r["num_gpus"]:
        return "GPU count unresolved in the source (printed 128, likely 256)"
    if not r["tp"]:
        return "parallel configuration not stated (text endpoint)"
    if "ambiguous" in r["reliability"] and "page break" in r["notes"]:
        return "method attribution uncertain (values across a page break in the transcription)"
    if _model_key(r) not in MOE_MODELS:
        return f"no model shape for {r['model']}"
    return None


def _is_deepseek(r: dict[str, str]) -> bool:
    return r["model"].upper().startswith("DEEPSEEK-V3")


def deepseek_reason(r: dict[str, str]) -> str | None:
    """Why a DeepSeek-V3 / Kimi K2 row cannot be simulated: None for other models, "" for an
    expressible DeepSeek-V3 row (Megatron-Core / Megatron-Bridge with a stated configuration)."""
    if "KIMI" in r["model"].upper():
        return "Kimi K2: no model shape packaged (384 experts, 64 heads); NeMo AutoModel FSDP2 run"
    if not _is_deepseek(r):
        return None
    framework = r["framework"]
    if "HAI-LLM" in framework:
        if r["row_id"] in DUPLICATES:
            return ""  # expressible, but moe_reason names the row it repeats
        if r["metric"] not in DEEPSEEK_METRICS:
            return (
                f"metric {r['metric']} totals phases of different batch sizes, sequence "
                "lengths or configurations (pre-training is in T0164)"
            )
        return ""
    if "AutoModel" in framework:
        return "PyTorch FSDP2 + EP backend (NeMo AutoModel): its PP x FSDP layout is not Megatron's"
    if not r["tp"] or not r["gbs"]:
        return "parallel configuration not stated (headline number only)"
    if "HybridEP" in r["dispatcher_kernel"]:
        return "HybridEP dispatcher (NVL72-aware) not modelled"
    if "'Et|(tt|)*30L'" in r["notes"]:
        return (
            "stated layout 'Et|(tt|)*30L' leaves the last virtual stage with no layer (loss only)"
        )
    stage_ranks = int(r["num_gpus"]) // int(r["pp"])
    if int(r["ep"]) > stage_ranks:
        return f"EP {r['ep']} exceeds the {stage_ranks} ranks of a PP stage (config as printed)"
    if r["metric"] not in DEEPSEEK_METRICS:
        return f"metric {r['metric']} not simulated"
    return ""


DEEPSEEK_METRICS = {
    "model_TFLOPS_per_GPU": "TFLOP/s/GPU",
    "tokens_per_sec_per_GPU": "tokens/s/GPU",
    "GPU_hours_per_trillion_tokens": "GPU-h/1e12 tokens",
}
HAI_LLM_GBS = 15360  # DeepSeek-V3 Sec. 4.2: 3072 -> 15360 over the first 469B of 14.8T tokens
HAI_LLM_ASSUMPTION = (
    "DeepSeek-V3 pre-training on 2,048 H800 (T0164, DeepSeek-V3 report Sec. 3.2): PP16 with "
    "schedule: dualpipe, EP64, ZeRO-1 over DP128, no TP, FP8 blockwise, GBS 15,360 (the batch "
    "of all but the first 469B of 14.8T tokens) of 4K sequences, micro-batch 1 (not stated: "
    "120 micro-batches), MTP depth 1 as +1 MoE layer, layers by layout_61 over 16 stages, "
    "DeepEP kernels (the open version of its all-to-all, FP8 dispatch of tokens quantised "
    "before it; the IB+NVLink forwarding on 20 SMs is not modelled) with the all-to-all "
    "overlapped in DualPipe's F&B steps, force-balanced "
    "routing, no recomputation (the report recomputes RMSNorm and MLA up-projections only); "
    "GPU-hours per 1e12 tokens = 1e12 / (tokens/s/GPU x 3600)"
)
DEEPSEEK_ASSUMPTION = (
    "DeepSeek-V3 rows (Megatron-Core / Megatron-Bridge): the deepseek-v3 preset (MLA, 256 "
    "experts top-8, 1 shared, first 3 dense, node-limited routing M=4); force-balanced routing "
    "(routing: even); layers over PP x VPP virtual stages by layout_61 (Megatron's "
    "account_for_embedding/loss_in_pipeline_split: embedding and loss count as one layer each, "
    "ceil(slots / stages) per stage, the shortfall taken from the last stages; this reproduces "
    "the published 'Et|(tt|)*30mL' for PP8 x VPP4 with MTP); MTP only where the row says so "
    "(T0098/T0099 'MTP 1 layer', 'w/ MTP') or where the source's own TFLOP/s over tokens/s "
    "of the run is ~260 GFLOP/token (Megatron's count with MTP; ~250 without), else off; "
    "one more MoE layer on the last virtual stage with its own output layer and loss "
    "(model.mtp_layers: 1; Megatron's count: MTP layers as MoE layers, logits x (1 + MTP)); "
    "Megatron-Bridge rows whose PP / VPP / EP are those of their release's performance "
    "recipe (BRIDGE_PERF_RECIPES) take its selective recompute_modules and, for 16 virtual "
    "stages, its own layout (embedding + 4, 14 x 4, 1 + MTP + loss), else no recomputation "
    "and layout_61; the 25.11 / 26.02 rows token-dropless (their tables' footnote), 25.09 "
    "tokendrop rows padded to capacity (apply_moe_token_drop); no CUDA graphs; DeepEP where "
    "the row names it or, for Megatron-Bridge rows that print "
    "no dispatcher, where its performance recipe enables it (DGX-H100: DeepEP with EP "
    "all-to-all overlap; Blackwell: the all-to-all dispatcher), else the all-to-all "
    "dispatcher; EP all-to-all overlap (overlap_ep_comm) where the row or that recipe states "
    "it (T0098/T0099, DGX-H100 Megatron-Bridge), else off; "
    "tokens/s/GPU = GBS x seq / iteration time / GPUs"
)


MTP_GFLOP_PER_TOKEN = 255.0  # between Megatron's count without MTP (~249.7) and with (~260.3)
_SAME_RUN = ("model", "gpu", "num_gpus", "tp", "pp", "ep", "vpp", "gbs", "precision", "source")


def _paired_gflop_per_token(r: dict[str, str]) -> float | None:
    """The source's own model FLOPs per token of row ``r``'s run: its TFLOP/s/GPU over its
    tokens/s/GPU, from the adjacent row of the other metric (None: no such pair)."""
    table = moe_table()
    i = next(k for k, x in enumerate(table) if x["row_id"] == r["row_id"])
    for other in table[max(i - 1, 0) : i + 2]:
        if other is r or any(other[k] != r[k] for k in _SAME_RUN):
            continue
        pair = {other["metric"]: float(other["value"]), r["metric"]: float(r["value"])}
        if set(pair) == {"model_TFLOPS_per_GPU", "tokens_per_sec_per_GPU"}:
            return 1e3 * pair["model_TFLOPS_per_GPU"] / pair["tokens_per_sec_per_GPU"]
    return None


def has_mtp(r: dict[str, str]) -> bool:
    """Whether DeepSeek-V3 row ``r`` ran with an MTP module (depth 1): as stated ('MTP 1 layer',
    'w/ MTP', 'w/o MTP'), else as the source's own FLOPs per token of the run show (Megatron
    counts ~260 GFLOP/token with MTP, ~250 without; :data:`MTP_GFLOP_PER_TOKEN`)."""
    variant = r["method_or_variant"].strip()
    if "MTP 1 layer" in r["notes"] or "MTP depth 1" in r["notes"] or variant == "w/ MTP":
        return True
    if variant == "w/o MTP":
        return False
    gflop = _paired_gflop_per_token(r)
    return gflop is not None and gflop > MTP_GFLOP_PER_TOKEN


def layout_61(num_layers: int, stages: int, mtp: bool) -> list[int]:
    """Decoder layers per virtual stage (Megatron order), the MTP layer included in the last.

    Embedding (first stage) and loss (last stage) count as one layer each, as Megatron's
    ``account_for_embedding_in_pipeline_split`` / ``account_for_loss_in_pipeline_split``; each
    stage gets ceil(slots / stages) slots and the shortfall is taken one slot per stage from the
    last stages backwards, never leaving a stage without a layer."""
    slots = num_layers + int(mtp) + 2
    per = -(-slots // stages)
    layers = [per] * stages
    layers[0] -= 1
    layers[-1] -= 1
    short, i = per * stages - slots, stages - 1
    for _ in range(4 * stages):
        if short == 0:
            break
        if layers[i] > 1:
            layers[i] -= 1
            short -= 1
        i = i - 1 if i > 0 else stages - 1
    if short or min(layers) < 1:
        raise ValueError(f"{num_layers} layers do not fill {stages} virtual stages")
    return layers


def gbs(r: dict[str, str]) -> int:
    """Global batch of row ``r``; Table 2 of Liu et al. (FP8 vs BF16) prints none: its BF16
    rows are Table 3's runs (GBS 256), so 256."""
    if "HAI-LLM" in r["framework"]:
        return HAI_LLM_GBS
    given = _int(r["gbs"])
    if given is None and "Table 2" in r["source_location"]:
        return TABLE2_GBS
    if given is None:
        raise ValueError(f"row {r['row_id']} has no global batch size")
    return given


def gpu_preset(r: dict[str, str]) -> str | None:
    """The GPU preset of row ``r``'s system (None: none matches)."""
    gpu = r["gpu"].upper()
    return next((preset for key, preset in GPU_OF_SYSTEM if key in gpu), None)


def _fsdp(r: dict[str, str]) -> bool:
    """Whether row ``r`` is one of Liu et al.'s FSDP baselines (ZeRO-3 over all of DP)."""
    return r["method_or_variant"].startswith("FSDP")


def fp8_recipe(r: dict[str, str]) -> str | None:
    """The FP8 recipe of row ``r`` (None for a BF16 row or an unknown recipe)."""
    precision = r["precision"].upper()
    return next((name for key, name in FP8_RECIPES if key in precision), None)


# Liu et al. 2025 print no VPP. Their runs are the Megatron-MoE-ModelZoo benchmark
# configurations of the same authors at the time of the paper (runtime_configs/benchmarking/
# runtime.conf at 78fd4d6, April 2025: Qwen2-57B-A14B TP 2 / PP 4 / EP 4 / VPP 7, GBS 256 on
# 64 GPUs; Mixtral-8x22B TP 2 / PP 8 / EP 8 / VPP 1, GBS 256 on 128 GPUs, the paper's Table 3
# runs); models the ModelZoo did not carry (Llama3-8x70B, Mixtral-8x22B-G8T8) keep
# Megatron's default, no interleaving.
LIU_SOURCE = "Liu et al. 2025, MoE Parallel Folding"
MODELZOO_VPP_2025_04 = {"Qwen2-57B-A14B": 7, "Mixtral-8x22B": 1}


def _vpp(r: dict[str, str]) -> int:
    """Model chunks per pipeline stage: the row's VPP; for a pipelined Liu et al. row that
    prints none, the ModelZoo benchmark configuration's of its model at the time
    (:data:`MODELZOO_VPP_2025_04`); else Megatron's default (none: 1)."""
    stated = _int(r["vpp"])
    if stated:
        return stated
    if r["source"].startswith(LIU_SOURCE) and (_int(r["pp"]) or 1) > 1:
        return MODELZOO_VPP_2025_04.get(r["model"], 1)
    return 1


def moe_plan(r: dict[str, str], values: dict[str, float] | None = None) -> Plan:
    """The plan of one expressible ``training_moe.csv`` row."""
    model = {
        k: (dict(v) if isinstance(v, dict) else v) for k, v in MOE_MODELS[_model_key(r)].items()
    }
    dropless = "dropless" in r["method_or_variant"]
    moe = dict(model.get("moe", {}))
    pad = "pad-expert-input-to-capacity" in r["method_or_variant"]
    moe.update(routing="even", capacity_factor=None if dropless else 1.0, pad_to_capacity=pad)
    model["moe"] = moe
    recipe = fp8_recipe(r)
    if recipe is not None:
        model.update(dtype="fp8", fp8_recipe=recipe)
    gpus, tp, pp, cp = int(r["num_gpus"]), int(r["tp"]), _int(r["pp"], 1), _int(r["cp"], 1)
    gpu = gpu_preset(r)
    per_node = GPUS_PER_NODE[gpu]
    ep = _int(r["ep"], 1)
    etp = _int(r["etp"]) or (1 if "Folding" in r["method_or_variant"] else tp)
    dp, mbs = gpus // (tp * pp * cp), _int(r["mbs"], 1)
    vpp = _vpp(r)
    raw: dict[str, Any] = {
        "name": f"{r['row_id']}-{r['model']}",
        "model": model,
        "hardware": {
            "gpu": gpu,
            "num_nodes": -(-gpus // per_node),
            "gpus_per_node": per_node,
            "calibration": nested(values or {}),
            **_rack_placement(gpu, gpus),
        },
        "parallel": {
            "tp": tp,
            "pp": pp,
            "dp": dp,
            "cp": cp,
            "ep": ep,
            "etp": etp,
            "micro_batch_size": mbs,
            "num_microbatches": gbs(r) // (dp * mbs),
            "schedule": "interleaved" if vpp > 1 else "1f1b",
            "virtual_stages": vpp,
            "sequence_parallel": tp > 1,
            "dp_sharding": "full" if _fsdp(r) else "optimizer",
            "overlap_communication": True,
            "recompute": "none",
            "flash_attention": True,
            "moe_dispatcher": "alltoall",
        },
        "workload": {"mode": "training", "seq_len": {"dist": "fixed", "value": int(r["seq_len"])}},
    }
    if _is_deepseek(r):
        _deepseek_parallel(r, raw)
    return plan_from_dict(raw, f"training_moe.csv {r['row_id']}")


def _rack_placement(gpu: str, gpus: int) -> dict[str, int]:
    """The NVLink domain a Grace-Blackwell job uses: ``RACK_GPUS_USED`` GPUs of each rack
    when the job is a whole number of such racks, else the preset's (72)."""
    if gpu in ("GB200", "GB300") and gpus % RACK_GPUS_USED == 0:
        return {"nvlink_domain_gpus": RACK_GPUS_USED}
    return {}


def _split_text(r: dict[str, str]) -> str:
    """Run-length text of the row's layers per virtual stage, e.g. '1, 2x30, 1'."""
    split = moe_plan(r).parallel.layers_per_stage or []
    runs: list[list[int]] = []
    for n in split:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    return ", ".join(f"{n}x{k}" if k > 1 else str(n) for n, k in runs)


def _model_key(r: dict[str, str]) -> str:
    return "DeepSeek-V3" if _is_deepseek(r) else r["model"]


def _deepseek_parallel(r: dict[str, str], raw: dict[str, Any]) -> None:
    """Layout, MTP layer, recomputation, dropping and dispatcher of a DeepSeek-V3 row (see
    DEEPSEEK_ASSUMPTION and :data:`BRIDGE_PERF_RECIPES`)."""
    par, mtp = raw["parallel"], has_mtp(r)
    layers = _layers(raw["model"])
    raw["model"].update(num_layers=layers + int(mtp), mtp_layers=int(mtp))
    recipe = bridge_perf_recipe(r)
    stages = par["pp"] * par["virtual_stages"]
    if recipe is not None and stages == BRIDGE_LAYOUT_STAGES:
        split = bridge_layout_16(layers, mtp)
    else:
        split = layout_61(layers, stages, mtp)
    par["layers_per_stage"] = split
    stated = stated_recompute_modules(r)
    if recipe is not None or stated:
        par.update(recompute="selective", recompute_modules=list(stated or recipe))
    container = _bridge_container(r)
    if container:  # Megatron-Bridge's DeepSeek provider: cross_entropy_fusion_impl "te"
        par["fused_cross_entropy"] = True
    if container in BRIDGE_DROPLESS_CONTAINERS:  # the page's footnote: token-dropless
        raw["model"]["moe"].update(capacity_factor=None, pad_to_capacity=False)
    elif container and r["method_or_variant"].strip() == "tokendrop":
        # apply_moe_token_drop's defaults: capacity factor 1.0, padded to capacity
        raw["model"]["moe"].update(capacity_factor=1.0, pad_to_capacity=True)
    recipe = _bridge_recipe(r)
    if "DeepEP" in r["dispatcher_kernel"] or recipe == "deepep+overlap":
        par["moe_dispatcher"] = "deepep"
    par["overlap_ep_comm"] = "EP A2A overlap" in r["notes"] or recipe == "deepep+overlap"
    if "DualPipe" in r["dispatcher_kernel"]:  # DeepSeek's own run (HAI_LLM_ASSUMPTION)
        par.update(schedule="dualpipe", moe_dispatcher="deepep", overlap_ep_comm=True)


# Megatron-Bridge's DeepSeek-V3 performance recipes (scripts/performance/configs/deepseek/
# deepseek_llm_pretrain.py, commit 0132842): deepseek_v3_h100_1024gpus_{bf16,fp8}_config set
# enable_deepep=True and set_moe_a2a_overlap_overrides (EP all-to-all overlap); the B200 /
# GB200 configs enable_deepep=False, no overlap (the all-to-all dispatcher, the default).
BRIDGE_RECIPE_BY_SYSTEM = {"DGX-H100": "deepep+overlap"}


def _bridge_recipe(r: dict[str, str]) -> str:
    """The dispatcher of a Megatron-Bridge row whose table does not print it, from the
    performance recipe of its system ("" when none applies)."""
    if not r["framework"].startswith("Megatron-Bridge") or r["dispatcher_kernel"].strip():
        return ""
    return BRIDGE_RECIPE_BY_SYSTEM.get(r["gpu"].strip(), "")


# Megatron-Bridge's DeepSeek-V3 performance recipes behind the performance-summary tables, per
# system and NeMo container (the Megatron-Bridge release of the container): 25.09 =
# v0.1.0rc4 (scripts/performance/run_script.py: recompute_modules per GPU), 25.11 = v0.2.0
# and 26.02 = v0.3.0 (scripts/performance/configs/deepseek/workload_base_configs.py /
# deepseek_workload_base_configs.py). Each entry: (PP, VPP, EP) of a recipe and its
# recompute_modules (recompute_granularity "selective" in every recipe). A row takes them
# only where its printed PP, VPP and EP are the recipe's (the 25.11 GB300 rows at PP 2 / EP
# 32 and the GB200 MXFP8 row at PP 8 / EP 32 match no recipe of that release: left as before).
BRIDGE_PERF_RECIPES: dict[tuple[str, str], dict[tuple[int, int, int], tuple[str, ...]]] = {
    ("DGX-H100", "25.09"): {(8, 4, 64): ("mla_up_proj", "mlp")},
    ("DGX-B200", "25.09"): {(16, 1, 8): ("mla_up_proj",)},
    ("DGX-GB200", "25.09"): {(4, 4, 64): ("mla_up_proj",)},  # the token-drop recipe
    ("DGX-B200", "25.11"): {(16, 1, 8): ("mla_up_proj",)},
    ("DGX-GB200", "25.11"): {(4, 4, 64): ("mla_up_proj",)},
    ("DGX-GB300", "25.11"): {(4, 4, 64): ("moe_act",)},
    ("DGX-B200", "26.02"): {(16, 1, 8): ("mla_up_proj",)},
    ("DGX-GB200", "26.02"): {(4, 4, 64): ("mla_up_proj",)},
    ("DGX-GB300", "26.02"): {(2, 8, 32): ("mla_up_proj",), (4, 4, 64): ("moe_act",)},
}
# The 25.11 / 26.02 tables' footnote: "MoE benchmarks force-balance token distribution among
# experts and are token-dropless" (25.09 labels each row dropless or tokendrop).
BRIDGE_DROPLESS_CONTAINERS = ("25.11", "26.02")
# The recipes' own layout for 16 virtual stages (deepseek_v3.py's layout_map for (PP, VPP) =
# (16, 1), (8, 2), (4, 4), the same in all three releases; v0.3.0's GB300 pp_layout
# "Et*4|(t*4|)*14tmL" is it too): embedding + 4 decoder layers, 14 x 4, 1 + MTP + loss.
BRIDGE_LAYOUT_STAGES = 16


def _bridge_container(r: dict[str, str]) -> str:
    """The NeMo container of a Megatron-Bridge row ("25.09", ...; "" for other sources)."""
    framework = r["framework"]
    if not framework.startswith("Megatron-Bridge") or "container" not in framework:
        return ""
    return framework.split("container")[1].strip(" )")


def bridge_perf_recipe(r: dict[str, str]) -> tuple[str, ...] | None:
    """The recompute_modules of the Megatron-Bridge performance recipe row ``r`` ran (None:
    not a Megatron-Bridge row, or no recipe of its release has its PP / VPP / EP)."""
    recipes = BRIDGE_PERF_RECIPES.get((r["gpu"].strip(), _bridge_container(r)), {})
    key = (_int(r["pp"], 1), _int(r["vpp"]) or 1, _int(r["ep"], 1))
    return recipes.get(key)


_STATED_RECOMPUTE = re.compile(r"recompute ((?:[a-z_]+/)*[a-z_]+)")


def stated_recompute_modules(r: dict[str, str]) -> tuple[str, ...]:
    """The selective recompute modules row ``r``'s notes state ('recompute mlp/mla_up_proj/
    moe_act/layernorm', the case study of Yan et al. 2026 behind T0098 / T0099); () if none."""
    found = _STATED_RECOMPUTE.search(r["notes"])
    if found is None:
        return ()
    modules = tuple(found.group(1).split("/"))
    unknown = set(modules) - set(RECOMPUTE_MODULES)
    if unknown:
        raise ValueError(f"row {r['row_id']}: recompute modules {sorted(unknown)} not modelled")
    return modules


def bridge_layout_16(num_layers: int, mtp: bool) -> list[int]:
    """Decoder layers per virtual stage of the Megatron-Bridge recipes' 16-stage layout:
    4 on the first (with the embedding), 4 on each of the 14 middle ones, the rest (1 of 61)
    on the last, with the MTP layer (and the loss)."""
    middle = 4 * (BRIDGE_LAYOUT_STAGES - 2)
    last = num_layers - 4 - middle
    if last < 1:
        raise ValueError(f"{num_layers} layers do not fill the 16-stage recipe layout")
    return [4] + [4] * (BRIDGE_LAYOUT_STAGES - 2) + [last + int(mtp)]


def _layers(model: dict[str, Any]) -> int:
    if "num_layers" in model:
        return int(model["num_layers"])
    from clustersim.spec.presets import MODEL_PRESETS

    return int(MODEL_PRESETS[model["preset"]]["num_layers"])


def moe_metric(r: dict[str, str], values: dict[str, float]) -> float:
    """Predicted MFU (%) or model TFLOP/s per GPU, Megatron-Core's FLOP count."""
    plan = moe_plan(r, values)
    t_s = iteration_ms(plan) / 1e3
    if r["metric"] == "tokens_per_sec_per_GPU":
        return gbs(r) * int(r["seq_len"]) / t_s / int(r["num_gpus"])
    if r["metric"] == "GPU_hours_per_trillion_tokens":
        tokens_per_gpu_s = gbs(r) * int(r["seq_len"]) / t_s / int(r["num_gpus"])
        return 1e12 / tokens_per_gpu_s / 3600
    # Megatron's count: the MTP module (model.mtp_layers) as a layer, its logits too
    flops = model_flops_per_iteration(plan.model, gbs(r), int(r["seq_len"]))
    tflops = flops / t_s / int(r["num_gpus"]) / 1e12
    return 100 * tflops / MFU_PEAK_TFLOPS if r["metric"] == "MFU" else tflops


def _moe_label(r: dict[str, str]) -> str:
    par = f"TP{r['tp']} PP{r['pp'] or 1} EP{r['ep'] or 1}"
    if r["etp"]:
        par += f" ETP{r['etp']}"
    return f"{r['model']} {r['method_or_variant'][:24]}, {r['num_gpus']} GPUs {par} GBS{gbs(r)}"


FSDP_ASSUMPTION = (
    "FSDP / FSDP + EP baselines as dp_sharding: full over all DP ranks (the sharding degree is "
    "not printed), the parallel sizes as printed in Table 3, token-drop with CF 1.0 as even "
    "routing, CUDA_DEVICE_MAX_CONNECTIONS=1 with TP > 1 (Megatron-LM's validate_args asserted "
    "it then, FSDP or not: parallel.device_max_connections default), PyTorch FSDP's default "
    "forward (no explicit forward prefetch: parallel.forward_prefetch false; the paper's "
    "FSDP is PyTorch FSDP, Zhao et al. 2023), the other assumptions as in the moe set"
)


def fsdp_rows() -> list[E2ERow]:
    """Liu et al.'s FSDP baselines (the ``fsdp`` set): expressible, fit nothing."""
    return [
        E2ERow(
            r["row_id"],
            _moe_label(r),
            "MFU %",
            float(r["value"]),
            rate=True,
            param=None,
            fits=False,
            cost=_moe_cost(r),
        )  # fmt: skip
        for r in moe_table()
        if _fsdp(r) and moe_reason(r) is None
    ]


def moe_rows() -> tuple[list[E2ERow], list[Skipped]]:
    """Expressible rows (none fits an end-to-end parameter) and the rest with why; the FSDP
    baselines are their own set (:func:`fsdp_rows`)."""
    rows, skipped = [], []
    for r in moe_table():
        reason = moe_reason(r)
        if reason is None and _fsdp(r):
            reason = "FSDP baseline: in the fsdp set"
        if reason is not None:
            skipped.append(
                Skipped(r["row_id"], f"{r['model']} {r['method_or_variant']}"[:60], reason)
            )
            continue
        unit = "MFU %" if r["metric"] == "MFU" else DEEPSEEK_METRICS[r["metric"]]
        time_like = r["metric"] == "GPU_hours_per_trillion_tokens"  # proportional to time
        note = "approx. ('should be around')" if "approx" in r["reliability"] else ""
        if _is_deepseek(r):
            note = f"layers/stage {_split_text(r)}"
            if has_mtp(r):
                stated = "MTP" in r["notes"] + r["method_or_variant"]
                note += f", MTP ({'stated' if stated else 'from FLOPs/token'}) as +1 MoE layer"
        if r["row_id"] in FP8_SPEEDUP_ROWS:
            note = "in sample: the FP8 efficiency is fitted on its speedup over BF16"
        rows.append(
            E2ERow(
                r["row_id"],
                _moe_label(r),
                unit,
                float(r["value"]),
                rate=not time_like,
                param=None,
                fits=False,
                note=note,
                cost=_moe_cost(r),
            )
        )
    return rows, skipped


def _moe_cost(r: dict[str, str]) -> float:
    """Relative simulation cost: layer-chunks x micro-batches simulated per stage."""
    model = MOE_MODELS[_model_key(r)]
    pp = _int(r["pp"], 1)
    dp = int(r["num_gpus"]) // (int(r["tp"]) * pp)
    m = gbs(r) // (dp * _int(r["mbs"], 1))
    m = 5 * pp if m > 5 * pp else m
    return _layers(model) * m * pp / 1e4


def predict_moe(row_id: str, values: dict[str, float]) -> float:
    """Prediction of MoE row ``row_id`` under calibration ``values``."""
    row = next(r for r in moe_table() if r["row_id"] == row_id)
    return moe_metric(row, values)

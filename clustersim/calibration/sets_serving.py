"""Serving validation set: ``serving.csv`` rows clustersim can express.

* TensorRT-LLM v0.6.1 ``performance.md``, A100 FP16: peak-throughput rows (static batching:
  ``batch_size`` requests of ISL/OSL tokens arriving at t = 0, one prefill step, then decode)
  and batch-1 first-token latency (output length 1). CUDA graphs off (gptSessionBenchmark).
* The same page's H100 FP8 tables (S0053-S0068 peak throughput, S0082-S0089 first-token
  latency; same gptSessionBenchmark methodology, batch/ISL/OSL stated per row): "H100 (80 GB
  HBM3)" is the SXM part (H100-SXM preset); ``model.dtype: fp8`` with the per-tensor recipe
  (``tensorwise``: one scale per tensor, TensorRT-LLM's FP8 quantisation of that version);
  the throughput rows were built with ``--fp8_kv_cache`` (``kv_dtype: fp8``), the latency rows
  do not state it (plan default: BF16 KV cache). Unit: out tok/s/GPU, as the page prints it.
* TensorRT-LLM ``trtllm-bench`` rows (S0001-S0052, offline max load) are not simulated: the
  engine's max batch size and token budget come from its own heuristic and are not stated
  (nor the EP size of the MoE rows); nor are the DeepSeek-V3 PD-disaggregated services.
* gpt-fast (A100-80GB, batch 1, compile + CUDA graphs): decode tokens/s = 1000 / TPOT.
* SGLang PR #1401 (batch 1, input 128, output 8): median decode step with and without CUDA
  graphs. The PR does not name the GPU; H100-SXM is assumed (the 7.06 ms graph step reads the
  16 GB of Llama-3-8B weights at 2.3 TB/s, more than an A100's 2.0 TB/s peak).
* metaseq PR #270 (OPT-175B on 8 A100, incremental decoding, n_best 1) is listed but not
  simulated: batch and lengths are not stated (as for the vLLM rows), and the batch-1 reading
  cannot hold: 66 ms per token for 43.75 GB of FP16 weights per GPU is 0.66 TB/s, a third of
  an A100's bandwidth, so the work per step (batch x context) or the code path is not the one
  clustersim would be given. :func:`setup` keeps the former assumption (batch 1, 128/64) for
  anyone who wants to rerun it.

Free parameters: ``kernel.launch_us`` (eager decode rows: SGLang without graphs),
``kernel.graph_launch_us`` (graph rows: gpt-fast) and SGLang's per-step host time
(``workload.requests.step_host_us``, :data:`STEP_HOST`): its bench_latency times each decode
step from the host, and between two replays of the CUDA graph the engine prepares the next
batch's inputs and samples eagerly (``prepare_for_decode``, the graph runner's input copies,
the sampler), which the GPU waits for; gpt-fast compiles sampling into its step. The two
Llama-3-8B graph rows (S0135, S0139) fit it leave-one-out; the eager SGLang rows carry the
fitted value (they fit ``launch_us``), and DeepSeek-Coder-V2-Lite (S0143) is predicted with it
out of sample. The TensorRT-LLM rows depend on ``launch_us`` (eager) but do not fit it (out of
sample); their C++ runtime has no such per-step Python work (``step_host_us`` 0).
TensorRT-LLM v0.6.1 decodes with its masked multi-head attention kernel
(``decoderMaskedMultiheadAttention``: one thread block per query head and sequence, each
reading its K/V head; the measured extra decode time grows with query heads x context, as
such a kernel's does, not with K/V heads as a grouped kernel's would), so its plans state
``decode_attention: per_head``; the decode-throughput rows of its GQA models (LLaMA-70B,
Falcon-180B: 8 and 29 query heads per K/V head) fit ``attention.decode_l2_gbps``, the rate at
which those re-reads come from the L2 cache (leave-one-out like the launch times).

The static-batch rows (TensorRT-LLM gptSessionBenchmark) get a KV cache of exactly their
batch's full lengths (``num_gpu_blocks`` = batch x ceil((ISL + OSL) / 16)): the engine
allocates it up front and the published run fit, so no request waits or is preempted, where
the vLLM-style memory rule (``gpu_memory_utilization``) could leave a few requests out.

Metric definitions follow the sources: TensorRT-LLM "out tok/s" = batch x OSL / (prefill +
decode time), read as per GPU like the H100 table of the same page (the A100 header omits
"/GPU"; a per-group reading would put LLaMA-70B at under a quarter of the A100's FLOP rate);
first-token latency = TTFT of one request; decode latency / tokens/s = the median TPOT.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from clustersim.calibration import read_measurements
from clustersim.calibration.fit_e2e import E2ERow, Skipped, nested
from clustersim.run.serving import simulate_serving
from clustersim.spec import plan_from_dict
from clustersim.spec.schema import Plan

SERVING_CSV = "serving.csv"
KV_BLOCK = 16  # tokens per KV-cache block (the plan default)
LAUNCH = "kernel.launch_us"
GRAPH_LAUNCH = "kernel.graph_launch_us"
DECODE_L2 = "attention.decode_l2_gbps"
# SGLang v0.3's host time per decode step outside the forward pass (a plan value,
# ``workload.requests.step_host_us``, not a GPU calibration): fitted on the Llama-3-8B graph rows
STEP_HOST = "sglang.step_host_us"
GPT_FAST_FUSED = False

SERVING_MODELS: dict[str, dict[str, Any]] = {
    # EleutherAI/gpt-j-6b config.json (parallel attention/MLP not modelled: same FLOPs/bytes).
    "GPT-J 6B": {
        "name": "gpt-j-6b",
        "num_layers": 28,
        "hidden_size": 4096,
        "num_attention_heads": 16,
        "ffn_hidden_size": 16384,
        "vocab_size": 50400,
        "activation": "gelu",
    },
    "LLaMA 7B": {"preset": "llama-2-7b"},
    "Llama-2-7B": {"preset": "llama-2-7b"},
    # meta-llama/Llama-2-70b-hf config.json.
    "Llama-2-70B": {
        "name": "llama-2-70b",
        "num_layers": 80,
        "hidden_size": 8192,
        "num_attention_heads": 64,
        "num_kv_heads": 8,
        "ffn_hidden_size": 28672,
        "vocab_size": 32000,
    },
    "LLaMA 70B": {
        "name": "llama-2-70b",
        "num_layers": 80,
        "hidden_size": 8192,
        "num_attention_heads": 64,
        "num_kv_heads": 8,
        "ffn_hidden_size": 28672,
        "vocab_size": 32000,
    },
    # tiiuae/falcon-180B config.json (8 KV heads, GeLU MLP of 4h).
    "Falcon 180B": {
        "name": "falcon-180b",
        "num_layers": 80,
        "hidden_size": 14848,
        "num_attention_heads": 232,
        "num_kv_heads": 8,
        "ffn_hidden_size": 59392,
        "vocab_size": 65024,
        "activation": "gelu",
    },
    # meta-llama/Meta-Llama-3-8B config.json.
    "Meta-Llama-3-8B": {
        "name": "llama-3-8b",
        "num_layers": 32,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_kv_heads": 8,
        "ffn_hidden_size": 14336,
        "vocab_size": 128256,
    },
    # deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct config.json (MLA, 64 experts top-6 + 2 shared).
    "DeepSeek-Coder-V2-Lite-Instruct (MoE, MLA)": {
        "name": "deepseek-coder-v2-lite",
        "num_layers": 27,
        "hidden_size": 2048,
        "num_attention_heads": 16,
        "ffn_hidden_size": 1408,
        "dense_ffn_hidden_size": 10944,
        "vocab_size": 102400,
        "mla": {
            "kv_lora_rank": 512,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
        },
        "moe": {"num_experts": 64, "top_k": 6, "first_k_dense": 1, "num_shared_experts": 2},
    },
    # facebook/opt-175b (metaseq): 96 layers, hidden 12288, 96 heads, ReLU MLP of 4h.
    "OPT-175B (metaseq)": {
        "name": "opt-175b",
        "num_layers": 96,
        "hidden_size": 12288,
        "num_attention_heads": 96,
        "ffn_hidden_size": 49152,
        "vocab_size": 50272,
        "activation": "gelu",
        "tie_embeddings": True,
    },
}

# Row id -> (kind, GPU preset, batch, ISL, OSL, cuda graphs). kind: throughput | ttft |
# decode_tok_s | decode_ms.
_TRT_THROUGHPUT = {f"S00{n}" for n in range(69, 82)}
_TRT_TTFT = {f"S00{n}" for n in range(90, 98)}
# The same page's H100 FP8 tables (same gptSessionBenchmark methodology, stated batch/ISL/OSL).
_TRT_H100_THROUGHPUT = {f"S00{n}" for n in range(53, 69)}
_TRT_H100_TTFT = {f"S00{n}" for n in range(82, 90)}
_TRT_BENCH = {f"S00{n:02d}" for n in range(1, 53)}
_GPT_FAST = {f"S01{n}" for n in range(27, 34)}
_GRAPH_STEP = {"S0135": True, "S0137": False, "S0139": True, "S0141": False, "S0143": True}
# the SGLang rows of a dense model with CUDA graphs: their step is the graph replay plus the
# per-step host work, so they fit STEP_HOST; S0143 (MoE + MLA) predicts with it out of sample
_STEP_HOST_FIT = ("S0135", "S0139")
_METASEQ = {"S0145": False, "S0146": True}
DUPLICATES = {
    "S0136": "S0135",
    "S0138": "S0137",
    "S0140": "S0139",
    "S0142": "S0141",
    "S0144": "S0143",
}


@cache
def serving_table() -> tuple[dict[str, str], ...]:
    """Every row of ``serving.csv`` (packaged copy, unmodified)."""
    return tuple(read_measurements(SERVING_CSV))


def _int(text: str) -> int:
    return int(float(text))


def setup(r: dict[str, str]) -> dict[str, Any]:
    """How row ``r`` is simulated (None fields: not expressible)."""
    rid = r["row_id"]
    if rid in _TRT_THROUGHPUT | _TRT_TTFT | _TRT_H100_THROUGHPUT | _TRT_H100_TTFT:
        kind = "throughput" if rid in _TRT_THROUGHPUT | _TRT_H100_THROUGHPUT else "ttft"
        return {
            "kind": kind,
            "gpu": "H100-SXM" if rid in _TRT_H100_THROUGHPUT | _TRT_H100_TTFT else "A100-80GB",
            "batch": _int(r["batch_size"]),
            "isl": _int(r["isl"]),
            "osl": _int(r["osl"]),
            "graphs": False,
            "decode_attention": "per_head",
            "fused": True,
        }
    if rid in _GPT_FAST:
        return {
            "kind": "decode_tok_s",
            "gpu": "A100-80GB",
            "batch": 1,
            "isl": 5,
            "osl": 200,
            "graphs": True,
            "fused": GPT_FAST_FUSED,
        }
    if rid in _GRAPH_STEP:
        return {
            "kind": "decode_ms",
            "gpu": "H100-SXM",
            "batch": 1,
            "isl": 128,
            "osl": 8,
            "graphs": _GRAPH_STEP[rid],
            "step_host": True,
        }
    if rid in _METASEQ:
        return {
            "kind": "decode_ms",
            "gpu": "A100-80GB",
            "batch": 1,
            "isl": 128,
            "osl": 64,
            "graphs": _METASEQ[rid],
        }
    raise KeyError(rid)


def serving_reason(r: dict[str, str]) -> str | None:
    """Why row ``r`` cannot be simulated (None: it can)."""
    rid, rel = r["row_id"], r["reliability"]
    if rid in DUPLICATES:
        return f"same measurement as {DUPLICATES[rid]} (tokens/s = 1000 / ms per step)"
    if "relative" in rel:
        return "relative gain between two systems, no absolute configuration"
    if rid in _TRT_BENCH:
        return (
            "trtllm-bench offline max load: the engine's max batch size and token budget "
            "(chosen by its own heuristic from free memory) are not stated"
            + (
                "; EP size not stated"
                if "llama-4" in r["model"].lower() or "qwen3" in r["model"].lower()
                else ""
            )
        )
    if "FP8" in r["precision"].upper() and r["engine"].startswith(("SGLang", "DeepSeek")):
        return (
            "DeepSeek-V3 PD-disaggregated serving (DP attention, two-batch overlap, EPLB, "
            "redundant experts, MTP): per-phase batches of a multi-node service, not a "
            "single-engine workload clustersim can be given"
        )
    if rid in _METASEQ:
        return (
            "batch and lengths not stated (approximate values of a work-in-progress PR); a "
            "batch-1 reading puts the 43.75 GB of weights per GPU at 0.66 TB/s, a third of "
            "an A100's bandwidth, so the step's work is not known"
        )
    if rid == "S0134":
        return (
            "blog starting point: eager code of another version (no static KV cache); "
            "its gap to gpt-fast mixes several optimisations, not launch overhead alone"
        )
    if r["engine"].startswith("vLLM"):
        return (
            "vLLM server CPU overheads (API server, scheduling, input preparation) are "
            "not modelled; no batch or lengths stated"
        )
    if r["model"] not in SERVING_MODELS:
        return f"no model shape for {r['model']}"
    try:
        setup(r)
    except KeyError:
        return "workload not stated"
    return None


def serving_plan(r: dict[str, str], values: dict[str, float] | None = None) -> Plan:
    """The serving plan of one expressible row (a static batch arriving at t = 0)."""
    s = setup(r)
    tp = _int(r["tp"])
    values = dict(values or {})
    step_host_us = values.pop(STEP_HOST, 0.0) if s.get("step_host") else 0.0
    values.pop(STEP_HOST, None)
    model = {**SERVING_MODELS[r["model"]], **_precision(r)}
    batch, isl, osl = s["batch"], s["isl"], s["osl"]
    raw: dict[str, Any] = {
        "name": f"{r['row_id']}-{r['model']}",
        "model": model,
        "hardware": {
            "gpu": s["gpu"],
            "num_nodes": 1,
            "gpus_per_node": 8,
            "calibration": nested(_launch_pair(values, s["gpu"])),
        },
        "parallel": {"tp": tp, "pp": 1, "dp": 1},
        "workload": {
            "mode": "inference",
            "requests": {
                "num": batch,
                "arrival": "uniform",
                "rate_per_s": 1e9,
                "prompt_len": {"dist": "fixed", "value": isl},
                "output_len": {"dist": "fixed", "value": osl},
                "max_batch_size": batch,
                "max_num_batched_tokens": max(batch * isl, 8192),
                "chunked_prefill": False,
                "cuda_graphs": s["graphs"],
                "decode_attention": s.get("decode_attention", "grouped"),
                "fused_elementwise": s.get("fused", False),
                "gpu_memory_utilization": 0.95,
                "step_host_us": step_host_us,
                **({"kv_dtype": "fp8"} if _fp8_kv(r) else {}),
            },
        },
    }
    if s["kind"] == "throughput":  # a static engine allocates the whole batch's KV cache
        blocks = batch * -(-(isl + osl) // KV_BLOCK)
        raw["workload"]["requests"]["num_gpu_blocks"] = blocks
    return plan_from_dict(raw, f"serving.csv {r['row_id']}")


def _precision(r: dict[str, str]) -> dict[str, str]:
    """``model.dtype`` (and FP8 recipe) of row ``r``. TensorRT-LLM's FP8 engines of that
    version quantise with one scale per tensor (``tensorwise``)."""
    precision = r["precision"].upper()
    if "FP8" in precision:
        return {"dtype": "fp8", "fp8_recipe": "tensorwise"}
    return {"dtype": "fp16" if "FP16" in precision else "bf16"}


def _fp8_kv(r: dict[str, str]) -> bool:
    """Whether the source states an FP8 KV cache (``--fp8_kv_cache``: the H100 peak-throughput
    table); otherwise the plan default (BF16 for FP8 models)."""
    return "fp8_kv_cache" in r["precision"]


def _launch_pair(values: dict[str, float], gpu: str) -> dict[str, float]:
    """``values`` with the launch time not given taken from the data file and clamped so that
    a graph replay is never slower than an eager launch (the schema's rule). A row's metric
    depends on one of the two only (eager rows: launch; graph rows: decode TPOT)."""
    if LAUNCH not in values and GRAPH_LAUNCH not in values:
        return values
    from clustersim.spec.calibration_data import calibration_data
    from clustersim.spec.presets import GPU_GENERATION

    kernel = (calibration_data(GPU_GENERATION[gpu]) or {}).get("kernel", {})
    out = dict(values)
    if LAUNCH in values:
        out.setdefault(GRAPH_LAUNCH, min(float(kernel.get("graph_launch_us", 0.0)), values[LAUNCH]))
    else:
        out[LAUNCH] = max(float(kernel.get("launch_us", 0.0)), values[GRAPH_LAUNCH])
    return out


def serving_metric(r: dict[str, str], values: dict[str, float]) -> float:
    """Predicted value of row ``r`` in the source's unit."""
    s = setup(r)
    m = simulate_serving(serving_plan(r, values)).metrics
    if s["kind"] == "throughput":
        return float(m["output_tokens_per_ms"]) * 1e3 / _int(r["tp"])
    if s["kind"] == "ttft":
        return float(m["ttft_ms_p50"])
    if s["kind"] == "decode_tok_s":
        return 1e3 / float(m["tpot_ms_p50"])
    return float(m["tpot_ms_p50"])


_UNITS = {
    "throughput": "out tok/s/GPU",
    "ttft": "TTFT ms",
    "decode_tok_s": "tok/s",
    "decode_ms": "ms/token",
}


def serving_rows() -> tuple[list[E2ERow], list[Skipped]]:
    """Expressible rows and the rest with why."""
    rows, skipped = [], []
    for r in serving_table():
        reason = serving_reason(r)
        label = f"{r['model'][:28]}, {r['gpu'][:18]}, TP{r['tp'] or '?'}"
        if reason is not None:
            skipped.append(Skipped(r["row_id"], label, reason))
            continue
        s = setup(r)
        param = GRAPH_LAUNCH if s["graphs"] else LAUNCH
        fits = s["kind"] in ("decode_ms", "decode_tok_s")
        if _rereads_kv(r, s):  # GQA decode throughput of a per-head kernel: fits its L2 rate
            param, fits = DECODE_L2, True
        if s.get("step_host") and s["graphs"]:  # SGLang graph rows: the per-step host time
            param, fits = STEP_HOST, r["row_id"] in _STEP_HOST_FIT
        label += f", b{s['batch']} {s['isl']}/{s['osl']}" + (" graphs" if s["graphs"] else "")
        note = "GPU assumed H100-SXM" if r["row_id"] in _GRAPH_STEP else ""
        if "FP8" in r["precision"].upper():
            note = "FP8 tensorwise, KV " + ("FP8" if _fp8_kv(r) else "BF16 (not stated)")
        if r["row_id"] in _METASEQ:
            note = "approx.; batch 1, 128/64 assumed"
        rows.append(
            E2ERow(
                r["row_id"],
                label,
                _UNITS[s["kind"]],
                _value(r),
                rate=s["kind"] in ("throughput", "decode_tok_s"),
                param=param,
                fits=fits,
                note=note,
                cost=s["batch"] * (s["isl"] + s["osl"]) / 1e5,
            )
        )
    return rows, skipped


def _rereads_kv(r: dict[str, str], s: dict[str, Any]) -> bool:
    """Whether row ``r`` measures decode throughput with a per-query-head decode kernel on a
    GQA model (several query heads per K/V head on a GPU): then its time depends on
    ``attention.decode_l2_gbps``."""
    if s["kind"] != "throughput" or s.get("decode_attention") != "per_head":
        return False
    model = SERVING_MODELS[r["model"]]
    heads, kv_heads = model.get("num_attention_heads"), model.get("num_kv_heads")
    return kv_heads is not None and heads is not None and heads > kv_heads


def _value(r: dict[str, str]) -> float:
    return float(r["value"])


def predict_serving(row_id: str, values: dict[str, float]) -> float:
    """Prediction of serving row ``row_id`` under calibration ``values``."""
    row = next(r for r in serving_table() if r["row_id"] == row_id)
    return serving_metric(row, values)

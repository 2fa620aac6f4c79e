"""Presets for GPUs and models, with their public sources.

A plan names a preset (``hardware.gpu: H100-SXM``, ``model.preset: mixtral-8x7b``) and may
override any field of it. Figures are vendor or model-card numbers; achieved bandwidth and
FLOP/s are lower and are handled by efficiency fields, not by lowering these.
"""

from __future__ import annotations

from typing import Any

# Vendor figures (reference.md, "Hardware"). Link bandwidths are per GPU, per direction, in
# GB/s. Inter-node: one 400 Gb/s NDR NIC per GPU (50 GB/s) on Hopper; 200 Gb/s HDR (25 GB/s) on
# A100. ``peak_tflops`` is the dense BF16 peak, ``fp8_peak_tflops`` the dense FP8 one (the
# datasheets' sparse figures halved); A100 has no FP8 tensor cores. Hopper FP8 (H100/H200/H800
# SXM datasheets): 1,979 TFLOP/s dense.
GPU_PRESETS: dict[str, dict[str, Any]] = {
    "A100-40GB": {
        "memory_gib": 40,
        "peak_tflops": 312,
        "architecture": "ampere",
        "hbm_bandwidth_gbps": 1555,
        "intra_node": {"bandwidth_gbps": 300, "latency_us": 3},
        "inter_node": {"bandwidth_gbps": 25, "latency_us": 8},
    },
    "A100-80GB": {
        "memory_gib": 80,
        "peak_tflops": 312,
        "architecture": "ampere",
        "hbm_bandwidth_gbps": 2039,
        "intra_node": {"bandwidth_gbps": 300, "latency_us": 3},
        "inter_node": {"bandwidth_gbps": 25, "latency_us": 8},
    },
    "H100-SXM": {
        "memory_gib": 80,
        "peak_tflops": 989,
        "fp8_peak_tflops": 1979,
        "architecture": "hopper",
        "hbm_bandwidth_gbps": 3350,
        "intra_node": {"bandwidth_gbps": 450, "latency_us": 3},
        "inter_node": {"bandwidth_gbps": 50, "latency_us": 8},
    },
    "H200": {
        "memory_gib": 141,
        "peak_tflops": 989,
        "fp8_peak_tflops": 1979,
        "architecture": "hopper",
        "hbm_bandwidth_gbps": 4800,
        "intra_node": {"bandwidth_gbps": 450, "latency_us": 3},
        "inter_node": {"bandwidth_gbps": 50, "latency_us": 8},
    },
    # H800: NVLink cut to 400 GB/s bidirectional; ~160 GB/s achievable per direction (DeepEP).
    "H800": {
        "memory_gib": 80,
        "peak_tflops": 989,
        "fp8_peak_tflops": 1979,
        "architecture": "hopper",
        "hbm_bandwidth_gbps": 3350,
        "intra_node": {"bandwidth_gbps": 160, "latency_us": 3},
        "inter_node": {"bandwidth_gbps": 50, "latency_us": 8},
    },
    # B200 (HGX B200 datasheet): 2.25 PFLOP/s dense BF16, HBM3e 8 TB/s, 180 GB; NVLink 5
    # 1.8 TB/s bidirectional (900 GB/s per direction); one 400 Gb/s NIC per GPU.
    "B200": {
        "memory_gib": 180,
        "peak_tflops": 2250,
        "fp8_peak_tflops": 4500,
        "architecture": "blackwell",
        "hbm_bandwidth_gbps": 8000,
        "intra_node": {"bandwidth_gbps": 900, "latency_us": 3},
        "inter_node": {"bandwidth_gbps": 50, "latency_us": 8},
    },
    # GB200 NVL72 datasheet (per GPU = rack / 72): FP8 720 PFLOP/s sparse -> 5,000 TFLOP/s
    # dense per GPU; FP16/BF16 360 PFLOP/s sparse -> 2,500 dense; HBM3e 13.4 TB -> 186 GB,
    # 576 TB/s -> 8 TB/s; fifth-generation NVLink 130 TB/s -> 1.8 TB/s bidirectional (900 GB/s
    # per direction) between all 72 GPUs of the rack (one NVLink domain of 18 compute trays
    # of 4 GPUs); one 400 Gb/s ConnectX-7 NIC per GPU.
    "GB200": {
        "memory_gib": 186,
        "peak_tflops": 2500,
        "fp8_peak_tflops": 5000,
        "architecture": "blackwell",
        "hbm_bandwidth_gbps": 8000,
        "intra_node": {"bandwidth_gbps": 900, "latency_us": 3},
        "inter_node": {"bandwidth_gbps": 50, "latency_us": 8},
        "nvlink_domain_gpus": 72,
    },
    # GB300 NVL72 datasheet (per GPU = rack / 72): FP8 720 PFLOP/s sparse -> 5,000 dense;
    # FP16/BF16 360 PFLOP/s sparse -> 2,500 dense; HBM3e 20.7 TB -> 288 GB, 576 TB/s -> 8 TB/s;
    # NVLink 130 TB/s -> 900 GB/s per direction; one 800 Gb/s ConnectX-8 NIC per GPU (100 GB/s).
    "GB300": {
        "memory_gib": 288,
        "peak_tflops": 2500,
        "fp8_peak_tflops": 5000,
        "architecture": "blackwell",
        "hbm_bandwidth_gbps": 8000,
        "intra_node": {"bandwidth_gbps": 900, "latency_us": 3},
        "inter_node": {"bandwidth_gbps": 100, "latency_us": 8},
        "nvlink_domain_gpus": 72,
    },
    # H20 (HGX H20 product brief): Hopper with 148 TFLOP/s dense BF16 and 296 dense FP8, 96 GB
    # HBM3 at 4.0 TB/s, NVLink 900 GB/s bidirectional (450 per direction); one 400 Gb/s NIC.
    "H20": {
        "memory_gib": 96,
        "peak_tflops": 148,
        "fp8_peak_tflops": 296,
        "architecture": "hopper",
        "hbm_bandwidth_gbps": 4000,
        "intra_node": {"bandwidth_gbps": 450, "latency_us": 3},
        "inter_node": {"bandwidth_gbps": 50, "latency_us": 8},
    },
}
# Default FP8 recipe of each architecture: DeepSeek-V3's blockwise scaling on Hopper (no MX
# hardware support), MXFP8 on Blackwell (its tensor cores scale per 32 elements).
DEFAULT_FP8_RECIPE = {"hopper": "blockwise", "blackwell": "mxfp8"}
# Network topologies (``hardware.topology: <name>``), clustersim.spec.schema.TopologySpec.
# DGX H100 SuperPOD reference architecture: 8 x 400 Gb/s compute NICs per node, one rail per
# GPU index, scalable units of 32 nodes, a non-blocking two-tier compute fabric. GB200 NVL72:
# 4 NICs per tray of 4 GPUs, racks of 18 trays (the NVLink domain is hardware.nvlink_domain_gpus).
TOPOLOGY_PRESETS: dict[str, dict[str, Any]] = {
    "non-blocking": {"kind": "non_blocking"},
    "dgx-h100-superpod": {
        "kind": "rail_optimized",
        "nics_per_node": 8,
        "oversubscription": 1.0,
        "tiers": 2,
        "nodes_per_leaf": 32,
    },
    "fat-tree-2to1": {
        "kind": "fat_tree",
        "oversubscription": 2.0,
        "tiers": 2,
        "nodes_per_leaf": 4,
    },
    "gb200-nvl72": {
        "kind": "rail_optimized",
        "nics_per_node": 4,
        "oversubscription": 1.0,
        "tiers": 2,
        "nodes_per_leaf": 18,
    },
}
# Which calibration data file (clustersim/spec/calibration/<generation>.yaml) serves each GPU.
# H200 and H800 are Hopper dies with other memory / NVLink: own files, fitted or derived.
GPU_GENERATION: dict[str, str] = {
    "A100-40GB": "a100",
    "A100-80GB": "a100",
    "H100-SXM": "h100",
    "H200": "h200",
    "H800": "h800",
    "B200": "b200",
    # Grace-Blackwell racks: the B200 generation's fractions of their own peaks (no
    # measurement of their own); H20: a Hopper die, H100's fractions of its peaks.
    "GB200": "b200",
    "GB300": "b200",
    "H20": "h100",
}
# A custom GPU without ``hardware.calibration.generation`` uses this generation's values.
DEFAULT_GENERATION = "h100"
# Vendor memory is quoted in GB (10^9); the plan speaks GiB. 80 GB cards expose ~79.6 GiB to
# CUDA, so the preset keeps the nominal figure and the memory check leaves headroom via
# hardware.memory_reserved_gib.


def _gpt(heads: int, hidden: int, layers: int) -> dict[str, Any]:
    """A GPT shape of Narayanan et al. 2021, Table 1 (GeLU MLP of 4h, vocabulary 51,200)."""
    return {
        "num_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "ffn_hidden_size": 4 * hidden,
        "vocab_size": 51200,
        "activation": "gelu",
        "tie_embeddings": True,
    }


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # mistralai/Mixtral-8x7B-v0.1 config.json: 46.7 B parameters.
    "mixtral-8x7b": {
        "num_layers": 32,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_kv_heads": 8,
        "ffn_hidden_size": 14336,
        "vocab_size": 32000,
        "moe": {"num_experts": 8, "top_k": 2},
    },
    # mistralai/Mixtral-8x22B-v0.1 config.json: 141 B parameters.
    "mixtral-8x22b": {
        "num_layers": 56,
        "hidden_size": 6144,
        "num_attention_heads": 48,
        "num_kv_heads": 8,
        "ffn_hidden_size": 16384,
        "vocab_size": 32768,
        "moe": {"num_experts": 8, "top_k": 2},
    },
    # deepseek-ai/DeepSeek-V3 config.json: 671 B parameters (+14 B MTP module, not modelled).
    "deepseek-v3": {
        "num_layers": 61,
        "hidden_size": 7168,
        "num_attention_heads": 128,
        "ffn_hidden_size": 2048,
        "dense_ffn_hidden_size": 18432,
        "vocab_size": 129280,
        "mla": {
            "q_lora_rank": 1536,
            "kv_lora_rank": 512,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
        },
        "moe": {
            "num_experts": 256,
            "top_k": 8,
            "first_k_dense": 3,
            "num_shared_experts": 1,
            "max_nodes_per_token": 4,
        },
    },
    # Qwen/Qwen3-30B-A3B config.json: 30.5 B parameters.
    "qwen3-30b-a3b": {
        "num_layers": 48,
        "hidden_size": 2048,
        "num_attention_heads": 32,
        "num_kv_heads": 4,
        "head_dim": 128,
        "ffn_hidden_size": 768,
        "vocab_size": 151936,
        "moe": {"num_experts": 128, "top_k": 8},
    },
    # Qwen/Qwen3-235B-A22B config.json: 235 B parameters.
    "qwen3-235b-a22b": {
        "num_layers": 94,
        "hidden_size": 4096,
        "num_attention_heads": 64,
        "num_kv_heads": 4,
        "head_dim": 128,
        "ffn_hidden_size": 1536,
        "vocab_size": 151936,
        "moe": {"num_experts": 128, "top_k": 8},
    },
    # meta-llama/Llama-2-7b-hf config.json: 6.7 B parameters, dense (the 7B-class serving shape).
    "llama-2-7b": {
        "num_layers": 32,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_kv_heads": 32,
        "ffn_hidden_size": 11008,
        "vocab_size": 32000,
    },
    # Dense GPT shapes of Narayanan et al. 2021, Table 1 (configs/validation/).
    "gpt-1.7b": _gpt(24, 2304, 24),
    "gpt-3.6b": _gpt(32, 3072, 30),
    "gpt-7.5b": _gpt(32, 4096, 36),
    "gpt-18.4b": _gpt(48, 6144, 40),
    "gpt-39.1b": _gpt(64, 8192, 48),
    "gpt-76.1b": _gpt(80, 10240, 60),
    "gpt-145.6b": _gpt(96, 12288, 80),
    "gpt-310.1b": _gpt(128, 16384, 96),
    "gpt-529.6b": _gpt(128, 20480, 105),
    "gpt-1t": _gpt(160, 25600, 128),
}

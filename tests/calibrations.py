"""Calibrations built by hand for tests: every parameter named, nothing read from the
packaged data files unless asked."""

from __future__ import annotations

from typing import Any

from clustersim.spec.calibration_data import calibration_data
from clustersim.spec.schema import CalibrationSpec, HardwareSpec, LinkSpec

# A calibration under which the per-kernel model reduces to the plain roofline: every GEMM
# at ``efficiency`` of peak whatever its shape, HBM at full bandwidth, kernels free.
ROOFLINE: dict[str, Any] = {
    "generation": "test",
    "gemm": {"efficiency": 0.6, "half_dim": 0.0, "memory_efficiency": 1.0},
    "memory": {"efficiency": 1.0, "elementwise_efficiency": 1.0},
    "kernel": {"fixed_us": 0.0, "launch_us": 0.0, "graph_launch_us": 0.0, "framework_us": 0.0},
    "attention": {
        "efficiency": 0.6,
        "half_seq": 0.0,
        "decode_memory_efficiency": 1.0,
        "backward_ratio": 2.0,
    },
    "moe": {
        "dropless_sync_us": 0.0,
        "deepep_intra_node_gbps": 150.0,
        "deepep_inter_node_gbps": 45.0,
        "deepep_latency_us": 0.0,
    },
    # links as in LinkSpec: full bandwidth, the link's own latency per step, no fixed cost
    "collectives": {
        "intra_node_efficiency": 1.0,
        "inter_node_efficiency": 1.0,
        "intra_node_latency_us": None,
        "inter_node_latency_us": None,
        "intra_node_base_latency_us": 0.0,
        "inter_node_base_latency_us": 0.0,
        "intra_node_p2p_efficiency": 1.0,
        "inter_node_p2p_efficiency": 1.0,
        "intra_node_protocols": False,  # the alpha-beta ring, not NCCL's protocol tables
    },
}


def calibration(
    base: dict[str, Any] | str = ROOFLINE, **sections: dict[str, Any]
) -> CalibrationSpec:
    """``base`` (a dict, or a packaged generation's name) with ``sections`` merged in."""
    data = calibration_data(base) if isinstance(base, str) else base
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for name, values in sections.items():
        merged[name] = {**merged[name], **values}
    return CalibrationSpec.model_validate(merged)


def h100_nodes(cal: CalibrationSpec) -> HardwareSpec:
    """Two nodes of eight H100-like GPUs (450 GB/s NVLink, 50 GB/s NICs) under ``cal``."""
    return HardwareSpec(
        num_nodes=2,
        gpus_per_node=8,
        memory_gib=80,
        peak_tflops=989,
        hbm_bandwidth_gbps=3350,
        intra_node=LinkSpec(bandwidth_gbps=450.0, latency_us=1.0),
        inter_node=LinkSpec(bandwidth_gbps=50.0, latency_us=8.0),
        calibration=cal,
    )

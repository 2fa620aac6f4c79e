"""Small serving plans for the serving tests, and closed-form step times to check them against.

The closed forms use the op costs of ``clustersim.costs.compute`` directly (not the engine's
coefficients): a dense model on one GPU (TP 1), layer by layer.
"""

from __future__ import annotations

import copy
from typing import Any

from clustersim.costs import compute as cc
from clustersim.costs.serving import kv_bytes_per_token_layer
from clustersim.spec.load import plan_from_dict
from clustersim.spec.schema import Plan

DENSE: dict[str, Any] = {
    "name": "test-llama-1gpu",
    "seed": 0,
    "model": {"preset": "llama-2-7b"},
    "hardware": {"gpu": "H100-SXM", "num_nodes": 1, "gpus_per_node": 1},
    "parallel": {"tp": 1, "pp": 1, "dp": 1},
    "workload": {
        "mode": "inference",
        "requests": {
            "num": 200,
            "rate_per_s": 2.0,
            "prompt_len": {"dist": "uniform", "min": 32, "max": 2048},
            "output_len": {"dist": "uniform", "min": 1, "max": 256},
        },
    },
}

MOE: dict[str, Any] = {
    "name": "test-mixtral-16",
    "seed": 0,
    "model": {"preset": "mixtral-8x7b"},
    "hardware": {"gpu": "H100-SXM", "num_nodes": 2, "gpus_per_node": 8},
    "parallel": {"tp": 2, "pp": 2, "dp": 4, "ep": 8, "etp": 1},
    "workload": copy.deepcopy(DENSE["workload"]),
}


def make_plan(base: dict[str, Any], **sections: dict[str, Any]) -> Plan:
    """``base`` with ``requests``, ``parallel``, ``hardware``, ``targets`` or ``model`` keys
    updated (one level deep; a value None removes the key)."""
    raw = copy.deepcopy(base)
    for name, changes in sections.items():
        node = raw["workload"] if name == "requests" else raw
        merged = {**node.get(name, {}), **changes}
        node[name] = {k: v for k, v in merged.items() if v is not None}
    return plan_from_dict(raw, "<test>")


def layer_ms(plan: Plan, new_tokens: int, context: int) -> float:
    """One dense layer on one GPU for one request computing ``new_tokens`` on ``context``."""
    model, hw = plan.model, plan.hardware
    n = new_tokens
    proj = (cc.qkv_projection(n, model) + cc.attention_output_projection(n, model)).time_ms(hw)
    mlp = cc.dense_mlp(n, model).time_ms(hw)
    elementwise = cc.elementwise(n, model).time_ms(hw)
    heads, d = model.num_attention_heads, model.head_size
    pairs = n * context + n * (n + 1) / 2  # causal: each new token sees the context and itself
    flops = 2 * pairs * heads * 2 * d
    kv_bytes = (context + n) * kv_bytes_per_token_layer(model, 1)
    query_bytes = n * heads * 2 * d * cc.DTYPE_BYTES[model.dtype]
    core = cc.op_time_ms(flops, kv_bytes + query_bytes, hw)
    overhead = cc.kernel_overhead_ms(cc.KERNELS_PER_FORWARD["attention"]
                                     + cc.KERNELS_PER_FORWARD["mlp"], hw)  # fmt: skip
    return proj + mlp + elementwise + core + overhead


def step_ms(plan: Plan, new_tokens: int, context: int) -> float:
    """A whole step of one request: every layer, then the logits of its one sampled token."""
    logits = cc.logits(1, plan.model).time_ms(plan.hardware)
    return plan.model.num_layers * layer_ms(plan, new_tokens, context) + logits

"""Calibration against published measurements: Narayanan et al. 2021, Table 1.

Each row (GPT shape, TP, PP, GPUs, global batch, achieved TFLOP/s per GPU) becomes a plan on
A100-80GB nodes of 8 GPUs; the simulated iteration time gives the predicted TFLOP/s per GPU
with the paper's own FLOP count (Eq. 3, which includes the recompute forward pass).

What the table leaves open, and the choice made here:

* micro-batch size 1 (the paper's large-model runs use 1; for PP = 1 rows it changes only the
  number of gradient-accumulation steps, not the per-token cost in this model);
* interleaved schedule with the smallest number of model chunks v >= 2 that divides the layers
  per stage (1F1B when PP = 1);
* full activation recomputation, no sequence parallelism, no flash attention, no distributed
  optimizer, data-parallel all-reduce after the backward pass (Megatron-LM of 2021).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clustersim.analysis.simulate import simulate
from clustersim.costs.compute import model_flops_per_iteration
from clustersim.spec import plan_from_dict
from clustersim.spec.schema import Plan

SEQ_LEN = 2048
VOCAB = 51200


@dataclass(frozen=True)
class ValidationRow:
    """One published row and the simulator's prediction for it."""

    params_billion: float
    num_gpus: int
    tp: int
    pp: int
    virtual_stages: int
    published_tflops: float
    predicted_tflops: float
    iteration_time_ms: float
    bubble_pct: float
    comm_overhead_pct: float

    @property
    def error_pct(self) -> float:
        """Signed relative error of the prediction, in %."""
        return 100 * (self.predicted_tflops - self.published_tflops) / self.published_tflops

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        out = self.__dict__.copy()
        out["error_pct"] = self.error_pct
        return out


def read_rows(path: str | Path) -> list[dict[str, float]]:
    """The CSV rows as numbers."""
    with Path(path).open(newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def chunks_for(layers_per_stage: int, pp: int) -> int:
    """Model chunks per GPU: the smallest v >= 2 dividing the layers per stage (1 if PP = 1)."""
    if pp == 1:
        return 1
    return next((v for v in range(2, layers_per_stage + 1) if layers_per_stage % v == 0), 1)


def plan_for(row: dict[str, float], overrides: dict[str, Any] | None = None) -> Plan:
    """The plan that reproduces one row of the table."""
    tp, pp, gpus = int(row["tp"]), int(row["pp"]), int(row["num_gpus"])
    layers, dp = int(row["num_layers"]), gpus // (tp * pp)
    v = chunks_for(layers // pp, pp)
    raw: dict[str, Any] = {
        "name": f"narayanan2021-{row['params_billion']:g}b",
        "model": {"name": f"gpt-{row['params_billion']:g}b", "num_layers": layers,
                  "hidden_size": int(row["hidden_size"]),
                  "num_attention_heads": int(row["num_attention_heads"]),
                  "ffn_hidden_size": 4 * int(row["hidden_size"]), "vocab_size": VOCAB,
                  "activation": "gelu", "tie_embeddings": True},
        "hardware": {"gpu": "A100-80GB", "num_nodes": -(-gpus // 8), "gpus_per_node": 8},
        "parallel": {"tp": tp, "pp": pp, "dp": dp, "micro_batch_size": 1,
                     "num_microbatches": int(row["global_batch_size"]) // dp,
                     "schedule": "interleaved" if v > 1 else "1f1b", "virtual_stages": v,
                     "recompute": "full", "flash_attention": False,
                     "sequence_parallel": False, "distributed_optimizer": False,
                     "overlap_communication": False},
        "workload": {"mode": "training", "seq_len": {"dist": "fixed", "value": SEQ_LEN}},
    }  # fmt: skip
    for path, value in (overrides or {}).items():
        section, key = path.split(".", 1)
        raw.setdefault(section, {})[key] = value
    return plan_from_dict(raw, "validation")


def validate_row(row: dict[str, float], overrides: dict[str, Any] | None = None) -> ValidationRow:
    """Simulate one row and compare with the published TFLOP/s per GPU."""
    plan = plan_for(row, overrides)
    report = simulate(plan)
    metrics = report.metrics
    flops = model_flops_per_iteration(plan.model, int(row["global_batch_size"]), SEQ_LEN,
                                      recompute="full")  # fmt: skip
    predicted = flops / (metrics["iteration_time_ms"] / 1e3) / row["num_gpus"] / 1e12
    return ValidationRow(row["params_billion"], int(row["num_gpus"]), plan.parallel.tp,
                         plan.parallel.pp, plan.parallel.virtual_stages,
                         row["achieved_tflops_per_gpu"], predicted, metrics["iteration_time_ms"],
                         metrics["bubble_pct"], metrics["comm_overhead_pct"])  # fmt: skip


def validate(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[ValidationRow]:
    """Simulate every row of the table (yields as each finishes)."""
    rows = read_rows(path)
    for i, row in enumerate(rows):
        yield validate_row(row, overrides)
        if progress:
            progress(i + 1, len(rows))

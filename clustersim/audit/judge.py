"""Judging simulated metrics: the plan's targets and its simulated claims, as findings.

The one place targets and simulated claims are judged, for training and serving alike
(:func:`clustersim.run.evaluate.evaluate` calls :func:`judge`; ``compare`` shows
:func:`target_table`).
"""

from __future__ import annotations

import math
from typing import Any

from clustersim.audit.findings import Finding
from clustersim.spec.schema import Plan

# Simulated claims: relative tolerance for times and rates, absolute points for percentages.
CLAIM_TOLERANCE_REL = 0.10
CLAIM_TOLERANCE_PCT_POINTS = 5.0
# target field -> (metric, "max" or "min")
TARGETS = {
    "latency_ms_max": ("latency_ms", "max"),
    "ttft_ms_max": ("ttft_ms_p50", "max"),
    "tpot_ms_max": ("tpot_ms_p50", "max"),
    "ttft_ms_p99_max": ("ttft_ms_p99", "max"),
    "tpot_ms_p99_max": ("tpot_ms_p99", "max"),
    "ttft_ms_p50_max": ("ttft_ms_p50", "max"),
    "tpot_ms_p50_max": ("tpot_ms_p50", "max"),
    "throughput_tokens_per_ms_min": ("throughput_tokens_per_ms", "min"),
    "comm_overhead_pct_max": ("comm_overhead_pct", "max"),
    "load_balance_pct_min": ("load_balance_pct", "min"),
    "gpu_utilization_pct_min": ("gpu_utilization_pct", "min"),
}
CLAIMS = {
    "latency_ms": "latency_ms",
    "ttft_ms": "ttft_ms_p50",
    "tpot_ms": "tpot_ms_p50",
    "throughput_tokens_per_ms": "throughput_tokens_per_ms",
    "comm_overhead_pct": "comm_overhead_pct",
    "load_balance_pct": "load_balance_pct",
    "gpu_utilization_pct": "gpu_utilization_pct",
    "comm_to_compute_pct": "comm_to_compute_pct",
    "comm_step_share_pct": "comm_step_share_pct",
    "roofline_throughput_tokens_per_ms": "roofline_throughput_tokens_per_ms",
}
# claims.relative.* that this plan's own simulation decides: claim -> metric
RELATIVE_OWN = {
    "gpu_utilization_pct_min_per_gpu": "gpu_utilization_pct_min",
    "expert_utilization_pct": "expert_utilization_pct",
}
# claims.relative.* judged against the other plan of a comparison: claim -> (metric, form)
RELATIVE_BASELINE = {
    "latency_change_pct": ("latency_ms", "change_pct"),
    "iteration_time_change_pct": ("iteration_time_ms", "change_pct"),
    "throughput_ratio": ("throughput_tokens_per_ms", "ratio"),
}
TRAINING_FIX = "change the plan (parallel degrees, micro-batches, overlap, recompute)"
SERVING_FIX = (
    "change the plan (replicas, parallel degrees, workload.requests.max_batch_size or "
    "max_num_batched_tokens, the request rate)"
)


def judge(plan: Plan, metrics: dict[str, Any], fix: str = TRAINING_FIX) -> list[Finding]:
    """Findings for the targets and simulated claims that the metrics decide."""
    out = []
    for target, (metric, sense) in TARGETS.items():
        limit, value = getattr(plan.targets, target), metrics.get(metric)
        if limit is None or value is None:
            continue
        if not meets(value, limit, sense):
            word = "above the maximum" if sense == "max" else "below the minimum"
            out.append(
                Finding(
                    f"targets.{target}",
                    "error",
                    f"simulated {metric} is {value:.4g}, {word} of {limit:g}",
                    f"{fix} or relax the target",
                    limit,
                    round(value, 4),
                )
            )
    for claim, metric in CLAIMS.items():
        claimed, value = getattr(plan.claims, claim), metrics.get(metric)
        if claimed is None or value is None:
            continue
        if metric.endswith("_pct"):
            ok = abs(claimed - value) <= CLAIM_TOLERANCE_PCT_POINTS
            tol = f"{CLAIM_TOLERANCE_PCT_POINTS:g} points"
        else:
            ok = abs(claimed - value) <= CLAIM_TOLERANCE_REL * abs(value)
            tol = f"{100 * CLAIM_TOLERANCE_REL:g}%"
        if not ok:
            out.append(
                Finding(
                    f"claims.{claim}",
                    "error",
                    f"simulated {metric} is {value:.4g}, not {claimed:g} (more than {tol} apart)",
                    f"set claims.{claim}: {value:.4g}",
                    claimed,
                    round(value, 4),
                )
            )
    out += _judge_relative_own(plan, metrics)
    return out


def _judge_relative_own(plan: Plan, metrics: dict[str, Any]) -> list[Finding]:
    rel = plan.claims.relative
    if rel is None:
        return []
    out = []
    floor, least = rel.gpu_utilization_pct_min_per_gpu, metrics.get("gpu_utilization_pct_min")
    if floor is not None and least is not None and least < floor:
        out.append(
            Finding(
                "claims.relative.gpu_utilization_pct_min_per_gpu",
                "error",
                f"the least busy GPU computes {least:.4g}% of the time (mean "
                f"{metrics.get('gpu_utilization_pct', float('nan')):.4g}%), not more than "
                f"{floor:g}% on every GPU",
                f"set claims.relative.gpu_utilization_pct_min_per_gpu: {math.floor(least)}",
                floor,
                round(least, 4),
            )
        )
    claimed, value = rel.expert_utilization_pct, metrics.get("expert_utilization_pct")
    if (
        claimed is not None
        and value is not None
        and abs(claimed - value) > CLAIM_TOLERANCE_PCT_POINTS
    ):
        out.append(
            Finding(
                "claims.relative.expert_utilization_pct",
                "error",
                f"{value:.4g}% of the (layer, expert) pairs receive tokens, not {claimed:g}% "
                f"(more than {CLAIM_TOLERANCE_PCT_POINTS:g} points apart)",
                f"set claims.relative.expert_utilization_pct: {value:.4g}",
                claimed,
                round(value, 4),
            )
        )
    return out


def judge_relative(
    plan: Plan, metrics: dict[str, Any] | None, other: dict[str, Any] | None, other_name: str
) -> tuple[list[Finding], list[str]]:
    """The relative claims of ``plan`` against the plan it is compared with (``other``'s
    metrics): the findings, and the ``claims.relative.*`` items decided (wrong or right)."""
    rel = plan.claims.relative
    if rel is None or metrics is None or other is None:
        return [], []
    out, decided = [], []
    for claim, (metric, form) in RELATIVE_BASELINE.items():
        claimed, value, base = getattr(rel, claim), metrics.get(metric), other.get(metric)
        if claimed is None or value is None or not base:
            continue
        decided.append(f"claims.relative.{claim}")
        if form == "ratio":
            computed = value / base
            ok = abs(claimed - computed) <= CLAIM_TOLERANCE_REL * computed
            why = (
                f"{metric} {value:.4g} / {base:.4g} of {other_name} = {computed:.3g}x, "
                f"not {claimed:g}x (more than {100 * CLAIM_TOLERANCE_REL:g}% apart)"
            )
        else:
            computed = 100 * (value / base - 1)
            tol = max(CLAIM_TOLERANCE_PCT_POINTS, CLAIM_TOLERANCE_REL * abs(computed))
            ok = abs(claimed - computed) <= tol
            why = (
                f"{metric} {value:.4g} vs {base:.4g} of {other_name}: {computed:+.3g}%, not "
                f"{claimed:+g}% (more than {tol:.3g} points apart)"
            )
        if not ok:
            out.append(
                Finding(
                    f"claims.relative.{claim}",
                    "error",
                    why,
                    f"set claims.relative.{claim}: {computed:.3g}",
                    claimed,
                    round(computed, 4),
                )
            )
    return out, decided


def meets(value: float, limit: float, sense: str) -> bool:
    """Whether ``value`` meets a ``max`` or ``min`` limit (the rule of targets)."""
    return value <= limit if sense == "max" else value >= limit


def target_table(
    plan: Plan, metrics: dict[str, Any] | None, memory: Any = None
) -> dict[str, dict[str, Any]]:
    """Every target the plan sets: metric, sense, limit, value and passed (None = undecided);
    ``memory`` (a MemoryReport) decides ``memory_per_gpu_gib_max``."""
    out: dict[str, dict[str, Any]] = {}
    mapping = dict(TARGETS)
    mapping["memory_per_gpu_gib_max"] = ("memory_per_gpu_gib", "max")
    for name, (metric, sense) in mapping.items():
        limit = getattr(plan.targets, name)
        if limit is None:
            continue
        if metric == "memory_per_gpu_gib":
            value = memory.memory_per_gpu_gib if memory is not None else None
        else:
            value = (metrics or {}).get(metric)
        passed = None if value is None else meets(value, limit, sense)
        out[name] = {
            "metric": metric,
            "sense": sense,
            "limit": limit,
            "value": value,
            "passed": passed,
        }
    return out


def still_unchecked(item: str, metrics: dict[str, Any]) -> bool:
    """Whether an audit's unchecked ``targets.x`` / ``claims.x`` item stays undecided (claims
    the metrics do not measure, such as ``claims.ep_groups`` of a layout that does not fold,
    stay undecided)."""
    section, name = item.split(".", 1)
    if name.startswith("relative."):
        claim = name.removeprefix("relative.")
        return claim not in RELATIVE_OWN or metrics.get(RELATIVE_OWN[claim]) is None
    table = {k: v[0] for k, v in TARGETS.items()} if section == "targets" else CLAIMS
    return name not in table or metrics.get(table[name]) is None


def report_dict(report: Any) -> dict[str, Any]:
    """The output contract's JSON for a simulated report (training or serving): the audit's
    layout and memory, then the simulated metrics, findings, undecided items, time breakdown."""
    out = report.audit.to_dict()
    out["metrics"] = report.metrics
    out["findings"] = [f.to_dict() for f in report.findings]
    out["unchecked"] = report.unchecked
    out["breakdown_ms"] = report.breakdown
    return out

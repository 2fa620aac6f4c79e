"""Concrete fixes for the audit: valid degrees, the ETP fix, memory-saving options that fit."""

from __future__ import annotations

from typing import Any

from clustersim.costs.memory import memory_per_gpu
from clustersim.layout import Layout
from clustersim.spec.schema import Plan

RECOMPUTE_ORDER = ("none", "selective", "full")


def divisors(n: int) -> list[int]:
    """Positive divisors of ``n`` in increasing order."""
    return [d for d in range(1, n + 1) if n % d == 0]


def with_parallel(plan: Plan, **changes: Any) -> Plan:
    """A copy of ``plan`` with some ``parallel`` fields changed."""
    return plan.model_copy(update={"parallel": plan.parallel.model_copy(update=changes)})


def folding_fix(plan: Plan) -> Plan | None:
    """The plan with ``etp: 1`` when that alone makes the expert layout possible, else None."""
    par = plan.parallel
    if par.expert_tp == 1 or (par.tp * par.cp * par.dp) % par.ep:
        return None
    return with_parallel(plan, etp=1)


def peak_gib(plan: Plan) -> float:
    """Peak memory per GPU of a plan, in GiB."""
    return memory_per_gpu(plan, Layout(plan)).memory_per_gpu_gib


def fits_with(plan: Plan, limit_gib: float | None) -> bool:
    """Whether the plan fits the GPU (and ``limit_gib`` when given)."""
    report = memory_per_gpu(plan, Layout(plan))
    if not report.fits:
        return False
    return limit_gib is None or report.memory_per_gpu_gib <= limit_gib


def memory_fix(plan: Plan, limit_gib: float | None) -> str:
    """The first cumulative set of memory-saving options that makes the plan fit, as text."""
    base = folding_fix(plan) or plan
    par = base.parallel
    steps: list[tuple[str, dict[str, Any]]] = []
    if par.recompute == "none":
        steps.append(("parallel.recompute: selective", {"recompute": "selective"}))
    if par.tp > 1 and not par.sequence_parallel:
        steps.append(("parallel.sequence_parallel: true", {"sequence_parallel": True}))
    if par.dp * par.cp > 1 and par.sharding == "none":
        steps.append(("parallel.distributed_optimizer: true", {"distributed_optimizer": True}))
    if par.recompute != "full":
        steps.append(("parallel.recompute: full", {"recompute": "full"}))
    if par.dp * par.cp > 1 and par.sharding != "full":  # ZeRO-3 / FSDP
        steps.append(("parallel.dp_sharding: full", {"dp_sharding": "full"}))
    said: list[str] = []
    changes: dict[str, Any] = {}
    for text, change in steps:
        if "recompute" in change:  # a later recompute level replaces an earlier one
            said = [s for s in said if not s.startswith("parallel.recompute")]
        said.append(text)
        changes.update(change)
        candidate = with_parallel(base, **changes)
        if fits_with(candidate, limit_gib):
            return f"set {', '.join(said)} (peak {peak_gib(candidate):.1f} GiB)"
    best = peak_gib(with_parallel(base, **changes)) if changes else peak_gib(base)
    return (
        f"no memory option is enough (peak {best:.1f} GiB with all of them): spread the model "
        "over more GPUs (larger parallel.pp, parallel.ep or parallel.tp) or use larger GPUs"
    )

"""The nearest valid plan ``clustersim check`` proposes: the fewest changed ``parallel`` fields
that pass the audit."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

from clustersim.audit.checks import audit
from clustersim.audit.fixes import RECOMPUTE_ORDER, divisors, with_parallel
from clustersim.spec.schema import ClaimsSpec, Plan


# ---- the nearest valid plan (check --fix) --------------------------------------------------
@dataclass
class Suggestion:
    """A valid plan near a broken one: the changed ``parallel`` fields and the whole block."""

    plan: Plan
    changes: dict[str, tuple[Any, Any]]
    memory_per_gpu_gib: float | None
    warnings: int
    checked: int

    def parallel_yaml(self) -> str:
        """The ``parallel:`` block of the suggested plan, changed fields marked."""
        data = self.plan.parallel.model_dump(mode="json", exclude_none=True)
        lines = ["parallel:"]
        for key, value in data.items():
            text = json.dumps(value) if not isinstance(value, str) else value
            note = f"  # was {_yaml_value(self.changes[key][0])}" if key in self.changes else ""
            lines.append(f"  {key}: {text}{note}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (the ``suggestion`` key of ``check --json``)."""
        return {
            "changes": {k: {"from": a, "to": b} for k, (a, b) in self.changes.items()},
            "parallel": self.plan.parallel.model_dump(mode="json", exclude_none=True),
            "yaml": self.parallel_yaml(),
            "memory_per_gpu_gib": self.memory_per_gpu_gib,
            "world_size": self.plan.parallel.world_size,
            "warnings": self.warnings,
        }


def _yaml_value(value: Any) -> str:
    return "null" if value is None else (value if isinstance(value, str) else json.dumps(value))


def nearest_valid_plan(plan: Plan, max_checks: int = 3000) -> Suggestion | None:
    """The valid plan with the fewest changed ``parallel`` fields that meets the static targets.

    Static (the auditor only; claims are ignored, they describe the plan as written). Layout
    degrees (TP, PP, DP, EP, ETP), the schedule (with its micro-batches and virtual stages) and
    the memory options (recompute, sequence parallelism, the distributed optimizer) are tried in
    order of the number of fields changed; among equals, fewer warnings, then smaller changes,
    then less memory win. None when nothing within ``max_checks`` audits is valid.
    """
    plan = plan.model_copy(update={"claims": ClaimsSpec()})
    par, model, hw = plan.parallel, plan.model, plan.hardware
    cluster = hw.num_gpus
    tps = sorted(
        {par.tp, *[d for d in divisors(model.num_attention_heads) if d <= hw.gpus_per_node]}
    )
    pps = sorted({par.pp, *[d for d in divisors(model.num_layers) if d <= cluster]})
    dps = sorted({par.dp, *divisors(cluster)})
    experts = model.moe.num_experts if model.moe else 1
    eps = sorted({par.ep, *divisors(experts)}) if model.moe else [par.ep]
    training = plan.workload.mode == "training"
    mem_opts = (
        [(rc, sp, do) for rc in RECOMPUTE_ORDER for sp in (False, True) for do in (False, True)]
        if training
        else [(par.recompute, par.sequence_parallel, par.distributed_optimizer)]
    )
    orig = {
        k: getattr(par, k)
        for k in (
            "tp",
            "pp",
            "dp",
            "ep",
            "etp",
            "schedule",
            "virtual_stages",
            "num_microbatches",
            "recompute",
            "sequence_parallel",
            "distributed_optimizer",
        )
    }
    candidates: list[tuple[int, float, dict[str, Any]]] = []
    for tp, pp, dp, ep in itertools.product(tps, pps, dps, eps):
        if tp * pp * dp > cluster:
            continue
        for etp in sorted({par.etp, 1}, key=lambda x: (x is None, x)):
            lay = {"tp": tp, "pp": pp, "dp": dp, "ep": ep, "etp": etp}
            if model.moe and (tp * dp) % (ep * (etp if etp is not None else tp)):
                continue
            if model.moe and experts % ep or model.num_attention_heads % tp:
                continue
            for sched in _fix_schedules(par, pp):
                for rc, sp, do in mem_opts:
                    cand = {
                        **lay,
                        **sched,
                        "recompute": rc,
                        "sequence_parallel": sp,
                        "distributed_optimizer": do,
                    }
                    changed = [k for k in cand if cand[k] != orig[k]]
                    size = sum(
                        abs(math.log2(cand[k] / orig[k]))
                        for k in changed
                        if isinstance(cand[k], int) and not isinstance(cand[k], bool) and orig[k]
                    )
                    candidates.append((len(changed), size, cand))
    candidates.sort(key=lambda c: (c[0], c[1], json.dumps(c[2], sort_keys=True)))
    best, best_key, checked = None, None, 0
    for distance, size, cand in candidates:
        if best is not None and distance > best_key[0]:
            break
        if checked >= max_checks:
            break
        trial = with_parallel(plan, **cand)
        if trial.parallel.layers_per_stage is not None and cand["pp"] != par.pp:
            trial = with_parallel(trial, layers_per_stage=None)
        checked += 1
        report = audit(trial)
        if report.errors:
            continue
        warnings = len(report.findings)
        mem = report.memory.memory_per_gpu_gib if report.memory else float("inf")
        key = (distance, warnings, size, mem)
        if best_key is None or key < best_key:
            best, best_key = (trial, cand, mem, warnings), key
    if best is None:
        return None
    trial, cand, mem, warnings = best
    if best_key[0] == 0:
        return None  # the plan is valid as it is
    changes = {k: (orig[k], cand[k]) for k in cand if cand[k] != orig[k]}
    return Suggestion(trial, changes, round(mem, 2), warnings, checked)


def _fix_schedules(par, pp) -> list[dict[str, Any]]:
    m = par.num_microbatches
    out = [{"schedule": par.schedule, "virtual_stages": par.virtual_stages, "num_microbatches": m}]
    plain = {
        "schedule": "1f1b" if par.schedule == "interleaved" else par.schedule,
        "virtual_stages": 1,
        "num_microbatches": m,
    }
    if plain not in out:
        out.append(plain)
    if par.schedule == "dualpipe" and pp % 2 == 0:
        fixed = {
            "schedule": "dualpipe",
            "virtual_stages": 1,
            "num_microbatches": max(2 * pp, m + m % 2),
        }
        if fixed not in out:
            out.append(fixed)
    if par.schedule == "interleaved" and pp > 1:
        fixed = {
            "schedule": "interleaved",
            "virtual_stages": max(2, par.virtual_stages),
            "num_microbatches": -(-m // pp) * pp,
        }
        if fixed not in out:
            out.append(fixed)
    return out


def suggest_fix(plan: Plan, report) -> Suggestion | None:
    """``check``'s proposal: the nearest valid plan, when the audit (``report``) finds errors
    that a change of the parallel layout can fix (claims alone are fixed by correcting them)."""
    if not any(not f.node.startswith("claims.") for f in report.errors):
        return None
    return nearest_valid_plan(plan)


def suggestion_markdown(suggestion: Suggestion | None) -> str:
    """The proposal as a Markdown section ("" when there is none)."""
    if suggestion is None:
        return ""
    changed = ", ".join(f"`parallel.{k}` {a} -> {b}" for k, (a, b) in suggestion.changes.items())
    return (
        "\n## Suggested fix: the nearest valid plan\n\n"
        f"Fewest changed fields ({len(suggestion.changes)}): {changed}; peak memory "
        f"{suggestion.memory_per_gpu_gib:g} GiB per GPU on "
        f"{suggestion.plan.parallel.world_size} GPUs (static audit).\n\n"
        f"```yaml\n{suggestion.parallel_yaml()}\n```\n"
    )

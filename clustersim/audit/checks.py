"""The plan auditor: constraints, claims and static targets, each as a :class:`Finding`.

Every check is a small function ``(ctx) -> list[Finding]``. A finding names the plan node,
shows the arithmetic in its message and gives a concrete fix. Claims and targets that need a
simulation (latency, throughput, ...) are listed in ``unchecked`` instead of being guessed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from clustersim.audit.findings import Finding
from clustersim.audit.fixes import divisors, folding_fix, memory_fix
from clustersim.costs.memory import MemoryReport, ServingMemory, memory_per_gpu
from clustersim.layout import Layout
from clustersim.spec.schema import Plan

# Claims that are counts must match exactly; estimates (GiB) may be off by this much.
ESTIMATE_TOLERANCE_PCT = 10.0
ESTIMATE_ERROR_PCT = 25.0
SIMULATED_CLAIMS = (
    "latency_ms",
    "ttft_ms",
    "tpot_ms",
    "throughput_tokens_per_ms",
    "comm_overhead_pct",
    "load_balance_pct",
    "gpu_utilization_pct",
    "comm_to_compute_pct",
    "comm_step_share_pct",
    "roofline_throughput_tokens_per_ms",
)
SIMULATED_TARGETS = (
    "latency_ms_max",
    "ttft_ms_max",
    "tpot_ms_max",
    "ttft_ms_p99_max",
    "tpot_ms_p99_max",
    "ttft_ms_p50_max",
    "tpot_ms_p50_max",
    "throughput_tokens_per_ms_min",
    "comm_overhead_pct_max",
    "load_balance_pct_min",
    "gpu_utilization_pct_min",
)
METRIC_KEYS = (
    "iteration_time_ms",
    "latency_ms",
    "latency_ms_p99",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "tpot_ms_p50",
    "throughput_tokens_per_ms",
    "throughput_tokens_per_s",
    "mfu_pct",
    "comm_overhead_pct",
    "comm_to_compute_pct",
    "bubble_pct",
    "gpu_utilization_pct",
    "load_balance_pct",
    "dropped_tokens_pct",
)


@dataclass
class AuditContext:
    """What the checks look at: the plan, its layout, and memory (when it can be computed)."""

    plan: Plan
    layout: Layout
    memory: MemoryReport | None = None
    memory_note: str = ""
    memory_error: str = ""  # why memory could not be computed from the plan's workload


@dataclass
class AuditReport:
    """The audit's result: findings plus the computed layout and memory."""

    plan: Plan
    layout: Layout
    memory: MemoryReport | None
    findings: list[Finding] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    memory_note: str = ""
    metrics: dict[str, Any] | None = None  # filled when the plan was also simulated
    simulation_note: str = ""
    assumptions: list[Any] = field(default_factory=list)  # evaluate.Assumption
    pools: dict[str, AuditReport] | None = None  # disaggregated: each pool's own audit

    @property
    def errors(self) -> list[Finding]:
        """Findings of severity ``error``."""
        return [f for f in self.findings if f.severity == "error"]

    @property
    def has_errors(self) -> bool:
        """Whether the plan needs modification."""
        return bool(self.errors)

    def layout_dict(self) -> dict[str, Any]:
        """The ``layout`` object of the output contract; disaggregated, the decode pool's
        degrees at the top level, both pools' GPUs in ``world_size`` and each pool's layout
        under ``prefill`` and ``decode``."""
        if self.pools:
            out = self.pools["decode"].layout_dict()
            out["world_size"] = self.layout.world_size
            out["disaggregated"] = True
            for name, pool in self.pools.items():
                out[name] = pool.layout_dict()
                out[name]["first_rank"] = self.plan.pool_first_rank(name)
            return out
        lay = self.layout
        return {
            "world_size": lay.world_size,
            "cluster_gpus": lay.cluster_gpus,
            "tp": lay.tp,
            "cp": lay.cp,
            "dp": lay.dp,
            "pp": lay.pp,
            "ep": lay.ep,
            "etp": lay.etp,
            "edp": lay.edp,
            "layers_per_stage": lay.layers_per_stage,
            "experts_per_gpu": lay.experts_per_gpu,
            "experts_per_gpu_per_layer": lay.experts_per_gpu_per_layer,
            "ep_groups": lay.ep_groups,
            "groups_crossing_nodes": [
                k for k in ("tp", "dp", "pp", "ep", "etp", "edp") if lay.crosses_nodes(k)
            ],
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the output contract (metrics are null until simulated);
        disaggregated, ``memory`` is the pool with the most memory per GPU and
        ``pool_memory`` has both."""
        out = self._to_dict()
        if self.pools:
            out["pool_memory"] = {
                name: pool.memory.to_dict() if pool.memory else None
                for name, pool in self.pools.items()
            }
        return out

    def _to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.name,
            "layout": self.layout_dict(),
            "memory": self.memory.to_dict() if self.memory else None,
            "memory_note": self.memory_note or None,
            "metrics": self.metrics or dict.fromkeys(METRIC_KEYS),
            "simulation_note": self.simulation_note or None,
            "findings": [f.to_dict() for f in self.findings],
            "unchecked": self.unchecked,
            "assumptions": [a.to_dict() for a in self.assumptions],
        }


def audit(plan: Plan) -> AuditReport:
    """Audit a validated plan: every constraint, claim and statically decidable target."""
    if plan.parallel.disaggregated:
        return audit_disaggregated(plan)
    ctx = AuditContext(plan, Layout(plan))
    try:
        ctx.memory, ctx.memory_note = _memory_for(plan, ctx.layout)
    except ValueError as exc:  # an unreadable request trace, a length without a maximum
        ctx.memory_error = str(exc)
        ctx.memory_note = f"not computed: {exc}"
    findings = [f for check in CHECKS for f in check(ctx)]
    unchecked = [f"claims.{k}" for k in SIMULATED_CLAIMS if getattr(plan.claims, k) is not None]
    unchecked += [f"targets.{k}" for k in SIMULATED_TARGETS if getattr(plan.targets, k) is not None]
    relative = plan.claims.relative
    if relative is not None:  # judged by the simulation, or against a baseline by compare
        unchecked += [f"claims.relative.{k}" for k, v in relative if v is not None]
    if (
        plan.claims.ep_groups is not None
        and plan.model.moe is not None
        and not ctx.layout.expert_folding_ok
    ):
        unchecked.insert(0, "claims.ep_groups")  # EP groups are only counted on a folding layout
    return AuditReport(plan, ctx.layout, ctx.memory, findings, unchecked, ctx.memory_note)


POOLS = ("prefill", "decode")
_PARALLEL_KNOB = re.compile(r"\bparallel\.(?=[a-z_]+\b)")


def audit_disaggregated(plan: Plan) -> AuditReport:
    """Audit a disaggregated plan: every check of one deployment on each pool (its layout,
    divisibility, memory per GPU; its findings name the pool's fields, ``parallel.decode.tp``,
    an out-of-memory pool ``parallel.<pool>``), the GPUs of both pools against the
    cluster's, and the claims on the decode pool (``claims.total_gpus`` on both pools)."""
    reports: dict[str, AuditReport] = {}
    findings: list[Finding] = []
    seen: dict[tuple[str, str], int] = {}
    for name in POOLS:
        pooled = plan.pool(name)
        ctx = AuditContext(pooled, Layout(pooled))
        try:
            ctx.memory, ctx.memory_note = _memory_for(pooled, ctx.layout)
        except ValueError as exc:
            ctx.memory_error = str(exc)
            ctx.memory_note = f"not computed: {exc}"
        checks = [c for c in CHECKS if c is not check_world_size]
        if name == "prefill":
            checks = [c for c in checks if c is not check_claims]
        raw = [f for check in checks for f in check(ctx)]
        if name == "decode":  # the plan's GPUs are both pools': claimed against the sum
            raw = [f for f in raw if f.node != "claims.total_gpus"]
        limits = getattr(plan.workload.requests, name)
        own = [_pool_finding(f, name, limits.overrides() if limits else {}) for f in raw]
        for f, pooled_f in zip(raw, own, strict=True):
            key = (f.node, f.message)
            if key in seen and pooled_f.node == f.node:  # in both pools alike: once, as is
                findings[seen[key]] = f
                continue
            seen[key] = len(findings)
            findings.append(pooled_f)
        reports[name] = AuditReport(pooled, ctx.layout, ctx.memory, own, [], ctx.memory_note)
    layout = Layout(plan)
    findings = _pool_world_size(plan) + findings
    claimed = plan.claims.total_gpus
    if claimed is not None and claimed != layout.world_size:
        findings.append(
            _count_claim("total_gpus", claimed, layout.world_size, "prefill + decode pools")
        )
    unchecked = [f"claims.{k}" for k in SIMULATED_CLAIMS if getattr(plan.claims, k) is not None]
    unchecked += [f"targets.{k}" for k in SIMULATED_TARGETS if getattr(plan.targets, k) is not None]
    relative = plan.claims.relative
    if relative is not None:
        unchecked += [f"claims.relative.{k}" for k, v in relative if v is not None]
    memories = [(r.memory, r.memory_note) for r in reports.values() if r.memory is not None]
    memory, note = None, "not computed: fix the parallel layout of both pools first"
    if len(memories) == len(POOLS):
        memory, note = max(memories, key=lambda m: m[0].memory_per_gpu_gib)
        pool = POOLS[[m for m, _ in memories].index(memory)]
        note = f"{pool} pool (the most per GPU)" + (f"; {note}" if note else "")
    report = AuditReport(plan, layout, memory, findings, unchecked, note)
    report.pools = reports
    return report


def _pool_finding(f: Finding, pool: str, own_limits: dict[str, int] | None = None) -> Finding:
    """A finding of one pool's audit, in the disaggregated plan's terms: ``parallel.*`` nodes
    and fixes under ``parallel.<pool>``, out of memory on ``parallel.<pool>``, the batch
    limits the pool sets itself (``own_limits``) under ``workload.requests.<pool>``, the
    message prefixed with the pool."""
    node, fix = f.node, f.fix
    if node == "parallel" or node.startswith("parallel."):
        node = f"parallel.{pool}" + node.removeprefix("parallel")
    elif node == "hardware.memory_gib":
        node = f"parallel.{pool}"
    for key in own_limits or {}:
        field = f"workload.requests.{key}"
        if node == field:
            node = f"workload.requests.{pool}.{key}"
        fix = re.sub(rf"\b{re.escape(field)}\b", f"workload.requests.{pool}.{key}", fix)
    fix = _PARALLEL_KNOB.sub(f"parallel.{pool}.", fix)
    return replace(f, node=node, message=f"{pool} pool: {f.message}", fix=fix)


def _pool_world_size(plan: Plan) -> list[Finding]:
    """GPUs of both pools against the GPUs the cluster has."""
    par, hw = plan.parallel, plan.hardware
    p, d = par.prefill.pool_world_size, par.decode.pool_world_size
    world, cluster = p + d, hw.num_gpus
    product = f"prefill {p} + decode {d} = {world}"
    if world > cluster:
        return [
            Finding(
                "parallel",
                "error",
                f"needs {world} GPUs ({product}), the cluster has {cluster} "
                f"({hw.num_nodes} nodes x {hw.gpus_per_node})",
                f"add nodes ({-(-world // hw.gpus_per_node)} nodes of {hw.gpus_per_node}), "
                "or lower parallel.prefill.dp / parallel.decode.dp",
                claimed=cluster,
                computed=world,
            )
        ]
    if world < cluster:
        return [
            Finding(
                "parallel",
                "warning",
                f"uses {world} of the cluster's {cluster} GPUs ({product}); "
                f"{cluster - world} stay idle",
                "raise parallel.prefill.dp or parallel.decode.dp to use them",
                claimed=cluster,
                computed=world,
            )
        ]
    return []


def _memory_for(plan: Plan, layout: Layout) -> tuple[MemoryReport | None, str]:
    """Memory of the plan; when expert folding is impossible only because of ETP, memory of the
    plan with ``etp: 1`` (the fix the audit proposes), and a note saying so."""
    # A dense model has no expert layers, so an EP that cannot fold does not affect its memory.
    folds = layout.expert_folding_ok or plan.model.moe is None
    if folds and not _layer_split_broken(plan):
        return memory_per_gpu(plan, layout), ""
    fixed = folding_fix(plan)
    if fixed is not None and not _layer_split_broken(plan):
        repaired = plan.model_copy(update={"parallel": plan.parallel.model_copy(update={"etp": 1})})
        return memory_per_gpu(repaired, Layout(repaired)), "computed with parallel.etp: 1"
    return None, "not computed: fix the parallel layout first"


def _layer_split_broken(plan: Plan) -> bool:
    split = plan.parallel.layers_per_stage
    if split is not None:
        entries = plan.parallel.pp * plan.parallel.virtual_stages
        return len(split) != entries or sum(split) != plan.model.num_layers
    return False


# ---- constraints -----------------------------------------------------------------------------
def check_world_size(ctx: AuditContext) -> list[Finding]:
    """World size (TP x CP x DP x PP) against the GPUs the cluster has."""
    par, hw = ctx.plan.parallel, ctx.plan.hardware
    world, cluster = par.world_size, hw.num_gpus
    product = f"TP {par.tp} x PP {par.pp} x DP {par.dp}" + (f" x CP {par.cp}" if par.cp > 1 else "")
    per_replica = par.tp * par.cp * par.pp
    if world > cluster:
        fix = f"add nodes ({-(-world // hw.gpus_per_node)} nodes of {hw.gpus_per_node})"
        if cluster % per_replica == 0:
            fix = f"set parallel.dp: {cluster // per_replica}, or " + fix
        return [
            Finding(
                "parallel",
                "error",
                f"needs {world} GPUs ({product} = {world}), the cluster has {cluster} "
                f"({hw.num_nodes} nodes x {hw.gpus_per_node})",
                fix,
                claimed=cluster,
                computed=world,
            )
        ]
    if world < cluster:
        fix = ""
        if cluster % per_replica == 0:
            fix = f"set parallel.dp: {cluster // per_replica} to use all {cluster} GPUs"
        return [
            Finding(
                "parallel",
                "warning",
                f"uses {world} of the cluster's {cluster} GPUs ({product} = {world}); "
                f"{cluster - world} stay idle",
                fix,
                claimed=cluster,
                computed=world,
            )
        ]
    return []


def check_heads(ctx: AuditContext) -> list[Finding]:
    """Attention heads (and KV heads) must split evenly over TP."""
    model, tp = ctx.plan.model, ctx.plan.parallel.tp
    out = []
    if model.num_attention_heads % tp:
        gpn = ctx.plan.hardware.gpus_per_node
        ok = [d for d in divisors(model.num_attention_heads) if d <= gpn]
        out.append(
            Finding(
                "parallel.tp",
                "error",
                f"{model.num_attention_heads} attention heads do not split over "
                f"TP {tp} ({model.num_attention_heads} / {tp} is not whole)",
                f"choose parallel.tp from {ok}",
                tp,
                None,
            )
        )
    kv = model.kv_heads
    if model.mla is None and kv % tp and tp % kv:
        out.append(
            Finding(
                "parallel.tp",
                "error",
                f"{kv} KV heads and TP {tp}: neither divides the other, so KV heads "
                "cannot be split or replicated evenly",
                f"choose parallel.tp dividing {kv} or a multiple of it",
                tp,
                None,
            )
        )
    return out


def check_layers(ctx: AuditContext) -> list[Finding]:
    """Layers must split evenly over pipeline stages (and virtual chunks), or explicitly."""
    model, par = ctx.plan.model, ctx.plan.parallel
    num_layers, pp, v = model.num_layers, par.pp, par.virtual_stages
    if par.layers_per_stage is not None:
        split = par.layers_per_stage
        entries = pp * v  # one per virtual stage, in Megatron's order
        what = f"{pp} entries" if v == 1 else f"PP x virtual_stages = {entries} entries"
        if len(split) != entries:
            return [
                Finding(
                    "parallel.layers_per_stage",
                    "error",
                    f"lists {len(split)} stages but parallel.pp is {pp}" if v == 1 else
                    f"lists {len(split)} entries but needs one per virtual stage (the first "
                    "chunks of every stage, then the second chunks, ...)",
                    f"give {what} summing to {num_layers}",
                    len(split),
                    entries,
                )
            ]  # fmt: skip
        if sum(split) != num_layers:
            return [
                Finding(
                    "parallel.layers_per_stage",
                    "error",
                    f"sums to {sum(split)} layers but the model has {num_layers}",
                    f"give {what} summing to {num_layers}",
                    sum(split),
                    num_layers,
                )
            ]
        return []
    if num_layers % (pp * v):
        chunks = f"PP {pp} x {v} virtual stages" if v > 1 else f"PP {pp}"
        # PP values that split the layers into PP x v equal chunks.
        ok = [
            d
            for d in divisors(num_layers)
            if 1 < d <= ctx.layout.world_size and num_layers % (d * v) == 0
        ]
        if v > 1:  # suggest equal chunks first; an explicit split needs PP x v entries
            vs = [x for x in divisors(num_layers // pp) if x > 1] if num_layers % pp == 0 else []
            alt = f" or parallel.virtual_stages from {vs}" if vs else ""
        else:
            alt = " or give parallel.layers_per_stage"
        return [
            Finding(
                "parallel.pp",
                "error",
                f"{num_layers} layers do not split evenly over {chunks} "
                f"({num_layers} / {pp * v} = {num_layers / (pp * v):.2f})",
                f"choose parallel.pp from {ok[:8]}{alt}",
                pp,
                None,
            )
        ]
    return []


def check_experts(ctx: AuditContext) -> list[Finding]:
    """Experts must split over EP, and EP x ETP must fold into the ranks of a stage."""
    plan, lay = ctx.plan, ctx.layout
    moe, par = plan.model.moe, plan.parallel
    if moe is None:
        if par.ep > 1:
            return [
                Finding(
                    "parallel.ep",
                    "warning",
                    f"EP {par.ep} has no effect on a dense model",
                    "set parallel.ep: 1",
                    par.ep,
                    1,
                )
            ]
        return []
    out = []
    stage_ranks = par.tp * par.cp * par.dp
    if moe.num_experts % par.ep:
        ok = [d for d in divisors(moe.num_experts) if stage_ranks % d == 0]
        out.append(
            Finding(
                "parallel.ep",
                "error",
                f"{moe.num_experts} experts do not split over EP {par.ep} "
                f"({moe.num_experts} / {par.ep} = {moe.num_experts / par.ep:.2f})",
                f"choose parallel.ep from {ok}",
                par.ep,
                None,
            )
        )
    if not lay.expert_folding_ok:
        out.append(_folding_finding(plan, stage_ranks))
    return out


def _folding_finding(plan: Plan, stage_ranks: int) -> Finding:
    par = plan.parallel
    etp = par.expert_tp
    ranks = f"TP {par.tp} x DP {par.dp}" + (f" x CP {par.cp}" if par.cp > 1 else "")
    what = f"EP {par.ep} x ETP {etp} = {par.ep * etp}"
    if etp != 1 and stage_ranks % par.ep == 0:
        source = "ETP defaults to TP" if par.etp is None else "ETP is set"
        return Finding(
            "parallel.etp",
            "error",
            f"{what} does not divide the {stage_ranks} ranks of a pipeline stage "
            f"({ranks} = {stage_ranks}); {source}",
            "valid only with expert tensor parallel size 1: set parallel.etp: 1",
            etp,
            1,
        )
    moe = plan.model.moe
    ok = [d for d in divisors(moe.num_experts) if stage_ranks % d == 0] if moe else []
    return Finding(
        "parallel.ep",
        "error",
        f"{what} cannot be formed from the {stage_ranks} ranks of a pipeline stage "
        f"({ranks} = {stage_ranks}): EP x ETP must divide it",
        f"choose parallel.ep from {ok} with parallel.etp: 1, or raise TP x DP to a "
        f"multiple of {par.ep * etp}",
        par.ep,
        None,
    )


def check_schedule(ctx: AuditContext) -> list[Finding]:
    """Schedule options that Megatron refuses, and micro-batch counts that waste the pipeline."""
    par, out = ctx.plan.parallel, []
    if par.schedule == "interleaved":
        if par.virtual_stages < 2:
            out.append(
                Finding(
                    "parallel.virtual_stages",
                    "error",
                    "the interleaved schedule needs at least 2 virtual stages per GPU",
                    "set parallel.virtual_stages: 2 (or schedule: 1f1b)",
                    par.virtual_stages,
                    2,
                )
            )
        if par.pp < 2:
            out.append(
                Finding(
                    "parallel.schedule",
                    "error",
                    "the interleaved schedule needs pipeline parallelism (PP >= 2)",
                    "set parallel.schedule: 1f1b",
                    par.schedule,
                    "1f1b",
                )
            )
        elif par.num_microbatches % par.pp:
            m = -(-par.num_microbatches // par.pp) * par.pp
            out.append(
                Finding(
                    "parallel.num_microbatches",
                    "error",
                    f"the interleaved schedule needs micro-batches divisible by PP "
                    f"({par.num_microbatches} / {par.pp} is not whole)",
                    f"set parallel.num_microbatches: {m}",
                    par.num_microbatches,
                    m,
                )
            )
    elif par.schedule == "dualpipe":
        out += _dualpipe_findings(par)
    if par.schedule != "interleaved" and par.virtual_stages > 1:
        out.append(
            Finding(
                "parallel.virtual_stages",
                "error",
                f"virtual stages only apply to the interleaved schedule, not '{par.schedule}'",
                "set parallel.schedule: interleaved",
                par.virtual_stages,
                1,
            )
        )
    few = par.num_microbatches < par.pp and par.schedule != "dualpipe"
    if ctx.plan.workload.mode == "training" and par.pp > 1 and few:
        m, p = par.num_microbatches, par.pp
        bubble = 100 * (p - 1) / (m + p - 1)
        out.append(
            Finding(
                "parallel.num_microbatches",
                "warning",
                f"{m} micro-batches for {p} stages leaves a pipeline bubble of "
                f"(p-1)/(m+p-1) = {p - 1}/{m + p - 1} = {bubble:.0f}% of the iteration",
                f"use at least {4 * p} micro-batches (bubble {100 * (p - 1) / (5 * p - 1):.0f}%)",
                m,
                4 * p,
            )
        )
    return out


def _dualpipe_findings(par) -> list[Finding]:
    """DualPipe's own assertions (``DualPipe.step``): pp even, micro-batches even and at
    least 2 x pp; and the sharding the engine simulates with it."""
    out = []
    if par.pp < 2 or par.pp % 2:
        pp = max(2, par.pp + par.pp % 2)
        out.append(
            Finding(
                "parallel.pp",
                "error",
                f"the dualpipe schedule needs an even number of pipeline stages (pp {par.pp})",
                f"set parallel.pp: {pp} (or schedule: 1f1b)",
                par.pp,
                pp,
            )
        )
    else:
        m = par.num_microbatches
        want = max(2 * par.pp, m + m % 2)
        if m % 2 or m < 2 * par.pp:
            out.append(
                Finding(
                    "parallel.num_microbatches",
                    "error",
                    f"the dualpipe schedule needs micro-batches even and at least 2 x pp = "
                    f"{2 * par.pp} (half are fed from each end), not {m}",
                    f"set parallel.num_microbatches: {want}",
                    m,
                    want,
                )
            )
    if par.sharding in ("gradients", "full"):
        out.append(
            Finding(
                "parallel.dp_sharding",
                "error",
                f"dualpipe is simulated with dp_sharding none or optimizer, not {par.sharding}",
                "set parallel.dp_sharding: optimizer (or schedule: 1f1b)",
                par.sharding,
                "optimizer",
            )
        )
    return out


def check_parallel_options(ctx: AuditContext) -> list[Finding]:
    """Megatron requirements and placement hazards: SP with MoE + TP, TP across nodes."""
    plan, par, out = ctx.plan, ctx.plan.parallel, []
    training = plan.workload.mode == "training"
    if training and plan.model.moe is not None and par.tp > 1 and not par.sequence_parallel:
        out.append(
            Finding(
                "parallel.sequence_parallel",
                "error",
                f"MoE training with TP {par.tp} requires sequence parallelism "
                "(Megatron-Core refuses to start without it)",
                "set parallel.sequence_parallel: true",
                False,
                True,
            )
        )
    if ctx.layout.crosses_nvlink_domain("tp"):
        gpn = plan.hardware.nvlink_domain
        # TP groups stay inside an NVLink domain only when TP divides its GPUs (TP <= gpn is
        # not enough: TP 4 on nodes of 6 puts ranks 4-7 on two nodes).
        heads = plan.model.num_attention_heads
        ok = [d for d in divisors(gpn) if heads % d == 0]
        unit = "node" if gpn == plan.hardware.gpus_per_node else "NVLink domain"
        out.append(
            Finding(
                "parallel.tp",
                "warning",
                f"TP {par.tp} spans {unit}s of {gpn} GPUs: every layer's TP collectives "
                f"cross the {plan.hardware.inter_node.bandwidth_gbps:g} GB/s network",
                f"choose parallel.tp from {ok} (dividing the {gpn} GPUs of a {unit})",
                par.tp,
                max(d for d in ok if d <= par.tp),
            )
        )
    return out


# ---- memory --------------------------------------------------------------------------------
def check_memory(ctx: AuditContext) -> list[Finding]:
    """Peak memory per GPU against the GPU's memory and the plan's memory target; for serving,
    whether the KV cache holds the plan's requests (:func:`check_serving_memory`)."""
    mem, plan, out = ctx.memory, ctx.plan, []
    if ctx.memory_error:
        return [
            Finding(
                "workload.requests",
                "error",
                f"memory cannot be computed: {ctx.memory_error}",
                "give a readable trace and lengths with a known maximum",
            )
        ]
    if mem is None:
        return []
    if mem.serving is not None:
        return check_serving_memory(ctx, mem, mem.serving)
    note = f" ({ctx.memory_note})" if ctx.memory_note else ""
    if not mem.fits:
        out.append(
            Finding(
                "hardware.memory_gib",
                "error",
                f"peak memory {mem.memory_per_gpu_gib:.1f} GiB per GPU (stage "
                f"{mem.peak_stage}: params {mem.params_gib:.1f} + grads "
                f"{mem.grads_gib:.1f} + optimizer {mem.optimizer_gib:.1f} + "
                f"activations {mem.activations_gib:.1f} + KV {mem.kv_cache_gib:.1f} + "
                f"buffers {mem.buffers_gib:.1f}) exceeds the {mem.capacity_gib:g} GiB "
                f"available{note}",
                memory_fix(plan, None),
                mem.capacity_gib,
                round(mem.memory_per_gpu_gib, 2),
            )
        )
    limit = plan.targets.memory_per_gpu_gib_max
    if limit is not None and mem.memory_per_gpu_gib > limit:
        out.append(
            Finding(
                "targets.memory_per_gpu_gib_max",
                "error",
                f"peak memory {mem.memory_per_gpu_gib:.1f} GiB per GPU is above the "
                f"target of {limit:g} GiB{note}",
                memory_fix(plan, limit),
                limit,
                round(mem.memory_per_gpu_gib, 2),
            )
        )
    return out


def check_serving_memory(ctx: AuditContext, mem: MemoryReport, sm: ServingMemory) -> list[Finding]:
    """Serving (vLLM's rule, ``costs/memory.py``): out of memory only when weights, one step's
    activations and buffers leave no room for the KV cache of one request of the longest length
    (vLLM refuses to start); otherwise the cache is what the memory allows, with a warning when
    fewer than ``max_batch_size`` longest requests fit at once. The numbers are those the
    serving engine uses (``costs/serving.py``, ``kv_capacity``)."""
    plan, out = ctx.plan, []
    req, lengths = plan.workload.requests, sm.lengths
    note = f" ({ctx.memory_note})" if ctx.memory_note else ""
    longest = (
        f"the longest request, {lengths.longest_request} tokens (prompt + output, {lengths.source})"
    )
    stage = sm.limiting_stage
    taken = (
        f"weights {sm.weights_gib[stage]:.1f} + activations {sm.activations_gib[stage]:.1f} "
        f"({sm.step_tokens} tokens per step) + buffers {sm.buffers_gib[stage]:.1f} GiB"
    )
    usable = (
        f"{sm.gpu_memory_utilization:g} x {mem.capacity_gib:g} GiB = {sm.usable_gib:.1f} GiB usable"
    )
    if sm.blocks_overridden and mem.memory_per_gpu_gib > mem.capacity_gib:
        out.append(
            Finding(
                "workload.requests.num_gpu_blocks",
                "error",
                f"memory per GPU {mem.memory_per_gpu_gib:.1f} GiB (stage "
                f"{mem.peak_stage}: params {mem.params_gib:.1f} + activations "
                f"{mem.activations_gib:.1f} + buffers {mem.buffers_gib:.1f} + KV "
                f"{mem.kv_cache_gib:.1f} for {req.num_gpu_blocks} blocks) exceeds the "
                f"{mem.capacity_gib:g} GiB available{note}",
                _serving_fix(plan),
                mem.capacity_gib,
                round(mem.memory_per_gpu_gib, 2),
            )
        )
    elif not sm.starts:
        if sm.weights_gib[stage] > sm.usable_gib:
            why = (
                f"the weights alone, {sm.weights_gib[stage]:.1f} GiB per GPU on stage {stage}, "
                f"exceed {usable}"
            )
        else:
            why = (
                f"on stage {stage}, {taken} of {usable} leave "
                f"{max(sm.free_gib[stage], 0.0):.2f} GiB for the KV cache: {sm.tokens} "
                f"tokens, fewer than {longest}"
            )
        out.append(
            Finding(
                "hardware.memory_gib",
                "error",
                f"out of memory: {why}; vLLM refuses to start{note}",
                _serving_fix(plan),
                sm.blocks_per_longest_request * sm.block_size,
                sm.tokens,
            )
        )
    elif sm.longest_requests_fit < req.max_batch_size:
        fit = sm.longest_requests_fit
        out.append(
            Finding(
                "workload.requests.max_batch_size",
                "warning",
                f"the KV cache holds {sm.tokens} tokens ({mem.kv_cache_gib:.1f} GiB per "
                f"GPU, what {usable} leave after {taken}): {fit} requests of "
                f"{longest} fit at once, fewer than max_batch_size {req.max_batch_size}"
                f" (of the mean length, {lengths.mean_request:.0f} tokens: "
                f"{sm.typical_requests_fit}); the rest wait or are preempted",
                f"set workload.requests.max_batch_size: {fit}, or spread the model over "
                "more GPUs (parallel.tp / parallel.pp) for a larger cache",
                req.max_batch_size,
                fit,
            )
        )
    limit = plan.targets.memory_per_gpu_gib_max
    if limit is not None and mem.memory_per_gpu_gib > limit:
        # The engine allocates its whole share; the target can still be met by a smaller
        # share as long as the plan's full batch fits in it (the cache beyond serves nothing
        # that max_batch_size admits).
        needed = max(sm.needed_gib)
        util = math.floor(100 * sm.gpu_memory_utilization * limit / mem.memory_per_gpu_gib) / 100
        allocates = (
            f"memory per GPU {mem.memory_per_gpu_gib:.1f} GiB (stage {mem.peak_stage}, "
            f"KV cache {mem.kv_cache_gib:.1f} GiB included: the engine allocates "
            f"{usable}) is above the target of {limit:g} GiB{note}"
        )
        if needed > limit:
            out.append(
                Finding(
                    "targets.memory_per_gpu_gib_max",
                    "error",
                    f"{allocates}; even max_batch_size {req.max_batch_size} requests "
                    f"of the longest length need {needed:.1f} GiB",
                    _serving_fix(plan, limit),
                    limit,
                    round(needed, 2),
                )
            )
        else:
            out.append(
                Finding(
                    "targets.memory_per_gpu_gib_max",
                    "warning",
                    f"{allocates}; max_batch_size {req.max_batch_size} requests of the "
                    f"longest length need only {needed:.1f} GiB",
                    f"set workload.requests.gpu_memory_utilization: {util:g} (a "
                    "smaller KV cache that still holds the full batch)",
                    limit,
                    round(mem.memory_per_gpu_gib, 2),
                )
            )
    return out


def _serving_fix(plan: Plan, limit_gib: float | None = None) -> str:
    """The first change that makes a serving plan fit (its KV cache holds one longest request;
    with ``limit_gib``, its full batch needs at most that): no block override, a smaller step
    budget (activations), a larger memory share, then more GPUs per replica (TP, then PP)."""
    req, par, model = plan.workload.requests, plan.parallel, plan.model
    tries: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    if req.num_gpu_blocks is not None:
        tries.append(("remove workload.requests.num_gpu_blocks", {"num_gpu_blocks": None}, {}))
    budget = req.max_num_batched_tokens // 2
    while budget >= 256:
        text = f"set workload.requests.max_num_batched_tokens: {budget}"
        text += "" if req.chunked_prefill else " with chunked_prefill: true"
        tries.append((text, {"max_num_batched_tokens": budget, "chunked_prefill": True}, {}))
        budget //= 2
    if req.gpu_memory_utilization < 0.95 and limit_gib is None:
        tries.append(
            (
                "set workload.requests.gpu_memory_utilization: 0.95",
                {"gpu_memory_utilization": 0.95},
                {},
            )
        )
    heads, kv = model.num_attention_heads, model.kv_heads
    for tp in range(par.tp + 1, plan.hardware.gpus_per_node + 1):
        if heads % tp == 0 and (kv % tp == 0 or tp % kv == 0):
            tries.append((f"set parallel.tp: {tp}", {}, {"tp": tp}))
    for pp in range(par.pp + 1, model.num_layers + 1):
        if model.num_layers % pp == 0:
            tries.append((f"set parallel.pp: {pp}", {}, {"pp": pp}))
    for text, req_change, par_change in tries:
        workload = plan.workload.model_copy(update={"requests": req.model_copy(update=req_change)})
        trial = plan.model_copy(
            update={"workload": workload, "parallel": par.model_copy(update=par_change)}
        )
        try:
            after = memory_per_gpu(trial, Layout(trial))
        except ValueError:
            continue
        if (
            after.fits
            and after.serving is not None
            and (limit_gib is None or max(after.serving.needed_gib) <= limit_gib)
        ):
            world = trial.parallel.world_size
            gpus = f"; needs {world} GPUs" if world > plan.hardware.num_gpus else ""
            return (
                f"{text} (KV cache {after.serving.tokens} tokens: "
                f"{after.serving.longest_requests_fit} longest requests{gpus})"
            )
    return (
        "spread the model over more GPUs (larger parallel.tp or parallel.pp) or use GPUs "
        "with more memory"
    )


# ---- claims --------------------------------------------------------------------------------
def check_claims(ctx: AuditContext) -> list[Finding]:
    """Every statically computable claim against the computed value."""
    plan, lay, claims, out = ctx.plan, ctx.layout, ctx.plan.claims, []
    moe, par = plan.model.moe, plan.parallel
    if claims.total_gpus is not None and claims.total_gpus != lay.world_size:
        out.append(
            _count_claim(
                "total_gpus",
                claims.total_gpus,
                lay.world_size,
                f"TP {par.tp} x PP {par.pp} x DP {par.dp}"
                + (f" x CP {par.cp}" if par.cp > 1 else "")
                + f" = {lay.world_size} GPUs",
            )
        )
    stage_gpus = lay.world_size // par.pp
    if claims.gpus_per_stage is not None and claims.gpus_per_stage != stage_gpus:
        out.append(
            _count_claim(
                "gpus_per_stage",
                claims.gpus_per_stage,
                stage_gpus,
                f"each pipeline stage holds TP {par.tp} x DP {par.dp}"
                + (f" x CP {par.cp}" if par.cp > 1 else "")
                + f" = {stage_gpus} GPUs",
            )
        )
    if moe is not None:
        total = moe.num_experts * plan.model.num_moe_layers
        per_layer = lay.experts_per_gpu_per_layer
        counts = {
            "total_experts": (
                total,
                f"{moe.num_experts} experts x {plan.model.num_moe_layers} MoE layers = {total}",
            ),
            "experts_per_gpu_per_layer": (
                per_layer,
                f"{moe.num_experts} experts / EP {par.ep} = {_num(per_layer)} per GPU per layer",
            ),
            "experts_per_gpu": (lay.experts_per_gpu, _experts_per_gpu_text(ctx)),
        }
        if lay.expert_folding_ok:
            counts["ep_groups"] = (
                lay.ep_groups,
                f"{lay.world_size} GPUs / EP {par.ep} = {lay.ep_groups} EP groups",
            )
        for name, (computed, why) in counts.items():
            claimed = getattr(claims, name)
            if claimed is not None and abs(claimed - computed) > 1e-9:
                out.append(_count_claim(name, claimed, computed, why))
    out += _layers_claim(ctx)
    out += _estimate_claims(ctx)
    out += _ep_group_claim(ctx) + _modules_claims(ctx) + _formula_claim(ctx)
    out += _bandwidth_claim(ctx)
    return out


def _ep_group_claim(ctx: AuditContext) -> list[Finding]:
    """Experts an EP group holds: every routed expert of the MoE layers of its stage (the EP
    ranks of a stage split each MoE layer's experts; ETP shards count once)."""
    plan, lay = ctx.plan, ctx.layout
    claimed, moe = plan.claims.experts_per_ep_group, plan.model.moe
    if claimed is None or moe is None:
        return []
    layers = max(lay.moe_layers_per_stage)
    computed = moe.num_experts * layers
    if abs(claimed - computed) <= 1e-9:
        return []
    why = (
        f"an EP group spans one pipeline stage: {moe.num_experts} experts x {layers} MoE "
        f"layers on a stage = {computed} (EP {plan.parallel.ep} GPUs x "
        f"{_num(lay.experts_per_gpu)} experts per GPU)"
    )
    return [_count_claim("experts_per_ep_group", claimed, computed, why)]


def modules_per_gpu(plan: Plan, layout: Layout) -> list[float]:
    """Layer modules each GPU holds, a shard counting as one module (``claims.modules_per_gpu``):
    per layer of its stage, one attention block and either one dense FFN or its routed experts
    (experts / EP) plus the shared experts. One value per GPU, in rank order."""
    model, moe = plan.model, plan.model.moe
    per_stage = []
    for layers in layout.stage_layers:
        count = 0.0
        for layer in layers:
            count += 1  # attention (a TP shard of it)
            if model.is_moe_layer(layer):
                count += layout.experts_per_gpu_per_layer + moe.num_shared_experts
            else:
                count += 1
        per_stage.append(count)
    stage_gpus = layout.world_size // layout.pp
    return [per_stage[r // stage_gpus] for r in range(layout.world_size)]


def _modules_claims(ctx: AuditContext) -> list[Finding]:
    claims = ctx.plan.claims
    if claims.modules_per_gpu is None and claims.modules_per_gpu_variance is None:
        return []
    counts = modules_per_gpu(ctx.plan, ctx.layout)
    mean = sum(counts) / len(counts)
    variance = sum((c - mean) ** 2 for c in counts) / len(counts)
    stage = ctx.layout.stage_layers[0]
    why = (
        f"each GPU holds, per layer of its stage, 1 attention block (a TP shard counts as one) "
        f"+ {_num(ctx.layout.experts_per_gpu_per_layer)} experts of an MoE layer (or 1 dense "
        f"FFN): stage 0 has {len(stage)} layers; per GPU from {_num(min(counts))} to "
        f"{_num(max(counts))}, mean {mean:.4g}, variance {variance:.4g}"
    )
    out = []
    if claims.modules_per_gpu is not None and abs(claims.modules_per_gpu - mean) > 1e-9:
        out.append(_count_claim("modules_per_gpu", claims.modules_per_gpu, _num(mean), why))
    got = claims.modules_per_gpu_variance
    if got is not None and abs(got - variance) > 1e-9:
        out.append(_count_claim("modules_per_gpu_variance", got, _num(variance), why))
    return out


def _formula_claim(ctx: AuditContext) -> list[Finding]:
    """A claimed product of degrees ("EP 16 x TP 4 = 64 GPUs"): its arithmetic, then the GPU
    count it claims against the layout's TP x CP x DP x PP."""
    plan, lay = ctx.plan, ctx.layout
    claim = plan.claims.gpus_by_formula
    if claim is None:
        return []
    par = plan.parallel
    degrees = {
        "tp": par.tp,
        "cp": par.cp,
        "dp": par.dp,
        "pp": par.pp,
        "ep": par.ep,
        "etp": par.expert_tp,
        "edp": lay.edp,
    }
    if any(degrees[f] is None for f in claim.factors):
        return [
            Finding(
                "claims.gpus_by_formula",
                "error",
                "EDP does not exist: the expert layout does not fold",
                "fix the expert layout first",
                claim.value,
                None,
            )
        ]
    product = math.prod(degrees[f] for f in claim.factors)
    text = " x ".join(f"{f.upper()} {degrees[f]}" for f in claim.factors)
    world = f"TP {par.tp} x PP {par.pp} x DP {par.dp}" + (f" x CP {par.cp}" if par.cp > 1 else "")
    world += f" = {lay.world_size}"
    fix = "set claims.gpus_by_formula: {factors: [tp, pp, dp], value: " + f"{lay.world_size}}}"
    if product != claim.value:
        return [
            Finding(
                "claims.gpus_by_formula",
                "error",
                f"{text} = {product}, not {claim.value}; the plan uses {world} GPUs",
                fix,
                claim.value,
                product,
            )
        ]
    if claim.value != lay.world_size:
        return [
            Finding(
                "claims.gpus_by_formula",
                "error",
                f"{text} = {product} is right as arithmetic, but it is not the GPU count: the "
                f"plan uses {world} GPUs (EP and ETP fold into the ranks of a stage and add "
                "none)",
                fix,
                claim.value,
                lay.world_size,
            )
        ]
    proper = ["cp", "dp", "pp", "tp"] if par.cp > 1 else ["dp", "pp", "tp"]
    if sorted(f for f in claim.factors if par.cp > 1 or f != "cp") != proper:
        return [
            Finding(
                "claims.gpus_by_formula",
                "warning",
                f"{text} = {product} equals the GPU count only by coincidence: GPUs are "
                f"{world} (EP and ETP fold into the ranks of a stage and add none)",
                fix,
                claim.value,
                lay.world_size,
            )
        ]
    return []


BANDWIDTHS = {
    "hbm": ("hardware.hbm_bandwidth_gbps", "HBM"),
    "intra_node": ("hardware.intra_node.bandwidth_gbps", "NVLink, per GPU and direction"),
    "inter_node": ("hardware.inter_node.bandwidth_gbps", "network, per GPU and direction"),
}


def _bandwidth_claim(ctx: AuditContext) -> list[Finding]:
    """A claimed peak bandwidth (GB/s) against the GPU's figures: within 10% of the named one
    (or of any, when no link is named)."""
    claims, hw = ctx.plan.claims, ctx.plan.hardware
    claimed = claims.peak_bandwidth_gbps
    if claimed is None:
        return []
    values = {
        "hbm": hw.hbm_bandwidth_gbps,
        "intra_node": hw.intra_node.bandwidth_gbps,
        "inter_node": hw.inter_node.bandwidth_gbps,
    }
    names = [claims.peak_bandwidth_link] if claims.peak_bandwidth_link else list(values)
    close = [n for n in names if abs(claimed - values[n]) <= 0.10 * values[n]]
    if close:
        return []
    listed = ", ".join(f"{BANDWIDTHS[n][1]} {values[n]:g} GB/s" for n in names)
    best = min(names, key=lambda n: abs(values[n] - claimed))
    return [
        Finding(
            "claims.peak_bandwidth_gbps",
            "error",
            f"{claimed:g} GB/s is none of the {hw.gpu} figures ({listed}; "
            f"{BANDWIDTHS[best][0]} is the nearest)",
            f"set claims.peak_bandwidth_gbps: {values[best]:g} with peak_bandwidth_link: {best}",
            claimed,
            values[best],
        )
    ]


def _experts_per_gpu_text(ctx: AuditContext) -> str:
    lay = ctx.layout
    moe_layers = lay.moe_layers_per_stage
    stage = moe_layers.index(max(moe_layers))
    text = (
        f"{_num(lay.experts_per_gpu_per_layer)} experts per layer x {moe_layers[stage]} MoE "
        f"layers on a stage = {_num(lay.experts_per_gpu)}"
    )
    if len(set(moe_layers)) > 1:
        text += f" (stage {stage}; per stage {[_num(x) for x in lay.experts_per_gpu_by_stage]})"
    return text


LABELS = {
    "total_gpus": "the GPU count",
    "gpus_per_stage": "GPUs per stage",
    "total_experts": "the expert count",
    "ep_groups": "the number of EP groups",
    "experts_per_gpu": "experts per GPU",
    "experts_per_gpu_per_layer": "experts per GPU per layer",
    "layers_per_stage": "layers per stage",
    "memory_per_gpu_gib": "peak memory per GPU",
    "params_gib": "parameter memory per GPU",
    "optimizer_gib": "optimizer memory per GPU",
    "activations_gib": "activation memory per GPU",
    "experts_per_ep_group": "experts per EP group",
    "modules_per_gpu": "modules per GPU (mean)",
    "modules_per_gpu_variance": "the variance of modules per GPU",
}


def _count_claim(name: str, claimed: Any, computed: Any, why: str) -> Finding:
    label = LABELS.get(name, name)
    return Finding(
        f"claims.{name}",
        "error",
        f"{label} is {_num(computed)}, not {_num(claimed)}: {why}",
        f"set claims.{name}: {_num(computed)}",
        claimed,
        computed,
    )


def _layers_claim(ctx: AuditContext) -> list[Finding]:
    claimed, actual = ctx.plan.claims.layers_per_stage, ctx.layout.layers_per_stage
    if claimed is None:
        return []
    expected = [claimed] * len(actual) if isinstance(claimed, int) else list(claimed)
    if expected == actual:
        return []
    computed: Any = actual[0] if len(set(actual)) == 1 else actual
    why = f"{ctx.plan.model.num_layers} layers over PP {ctx.plan.parallel.pp} stages gives {actual}"
    return [_count_claim("layers_per_stage", claimed, computed, why)]


def _estimate_claims(ctx: AuditContext) -> list[Finding]:
    mem, claims, out = ctx.memory, ctx.plan.claims, []
    if mem is None:
        return out
    for name in ("memory_per_gpu_gib", "params_gib", "optimizer_gib", "activations_gib"):
        claimed, computed = getattr(claims, name), getattr(mem, name)
        if claimed is None:
            continue
        off_pct = 100 * abs(claimed - computed) / computed if computed else float("inf")
        if off_pct <= ESTIMATE_TOLERANCE_PCT:
            continue
        severity = "error" if off_pct > ESTIMATE_ERROR_PCT else "warning"
        factor = max(claimed, computed) / max(min(claimed, computed), 1e-12)
        seq = (
            f"; at {mem.seq_len_tokens} tokens per sequence"
            if name in ("memory_per_gpu_gib", "activations_gib")
            else ""
        )
        out.append(
            Finding(
                f"claims.{name}",
                severity,
                f"{LABELS[name]} is {computed:.2f} GiB (stage {mem.peak_stage}, the "
                f"peak), not {claimed:g}: {factor:.1f}x "
                f"{'over' if claimed > computed else 'under'}estimated{seq}",
                f"set claims.{name}: {computed:.2f}",
                claimed,
                round(computed, 2),
            )
        )
    return out


def _num(x: Any) -> Any:
    return int(x) if isinstance(x, float) and x.is_integer() else x


CHECKS: tuple[Callable[[AuditContext], list[Finding]], ...] = (
    check_world_size,
    check_heads,
    check_layers,
    check_experts,
    check_schedule,
    check_parallel_options,
    check_memory,
    check_claims,
)

__all__ = ["AuditReport", "audit"]

"""``clustersim replay``: simulate a recorded workload again, under its own plan or a changed one.

The workload of a trace is what sampling produced: the sequence lengths of every micro-batch of
every replica and the routing outcome of every (MoE layer, micro-batch, EP group). Replay feeds
them to the engine instead of sampling (:class:`RecordedRouting`), so the same plan reproduces
the run exactly, and a changed plan (faster network, other schedule, more pipeline stages...)
is measured on the very same tokens.

A change that makes the recorded workload meaningless is refused (:class:`ReplayError`): the
fields in :data:`WORKLOAD_FIELDS` decide how many sequences there are, how they are grouped into
EP groups, how tokens are routed. Routes are looked up by (layer, micro-batch, EP group within
its stage), so the number of pipeline stages may change (EP groups do not span stages).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clustersim.analyze import analyze
from clustersim.analyze.serving import read_serving_result
from clustersim.audit.checks import audit
from clustersim.audit.plans import plan_changes
from clustersim.engine.errors import EngineError
from clustersim.engine.training.moe import Dispatch
from clustersim.engine.training.sim import check_supported
from clustersim.layout import Layout
from clustersim.metrics.serving import serving_metrics
from clustersim.run.evaluate import Verdict, evaluate
from clustersim.run.serving import ServingReport, simulate_serving
from clustersim.run.simulate import RunReport, simulate_workload
from clustersim.spec.load import apply_overrides, plan_from_dict
from clustersim.spec.schema import Plan
from clustersim.trace.reader import TraceError, TraceReader

# field path -> why it must stay as recorded
WORKLOAD_FIELDS = {
    "seed": "the recorded workload was drawn with it",
    "workload": "the sequence lengths are recorded",
    "model.num_layers": "routing is recorded per layer",
    "model.moe": "routing is recorded per MoE layer and expert",
    "parallel.dp": "the recorded sequences belong to this many replicas",
    "parallel.cp": "it splits the recorded sequences",
    "parallel.tp": "it sets the tokens each EP rank routes (micro-batch tokens x ETP / TP)",
    "parallel.ep": "routing is recorded per EP group",
    "parallel.etp": "it sets the EP groups and their tokens",
    "parallel.micro_batch_size": "the recorded sequences fill micro-batches of this size",
    "parallel.num_microbatches": "the recorded sequences fill this many micro-batches",
}
# inside those, fields that do not touch the recorded workload
FREE_FIELDS = ("model.moe.num_shared_experts", "model.moe.shared_expert_ffn_hidden_size")
# field path -> why a serving replay must keep it (it would otherwise draw another stream)
STREAM_FIELDS = {
    "seed": "the recorded request stream was drawn with it",
    "workload.mode": "the trace records a serving run",
    "workload.requests.num": "the recorded stream has its own requests",
    "workload.requests.arrival": "the arrival times are recorded",
    "workload.requests.rate_per_s": "the arrival times are recorded",
    "workload.requests.arrival_cv": "the arrival times are recorded",
    "workload.requests.trace": "the recorded stream replaces the request file",
    "workload.requests.prompt_len": "the prompt lengths are recorded",
    "workload.requests.output_len": "the output lengths are recorded",
}


class ReplayError(ValueError):
    """A plan change that makes the recorded workload meaningless (the message says which)."""


@dataclass
class ReplayReport:
    """A replayed run: the simulation report, the plan changes, the recorded plan and the
    metrics of the recorded run (``analysis.analyze`` on the trace)."""

    report: RunReport | ServingReport  # ServingReport when a serving trace was replayed
    changes: list[dict[str, Any]]
    recorded_plan: Plan
    recorded_metrics: dict[str, Any]
    verdict: Verdict

    def to_dict(self) -> dict[str, Any]:
        """``clustersim replay --json``: the run's JSON object plus the plan changes and the
        recorded metrics."""
        out = self.verdict.to_dict()
        out["replay"] = {"changes": self.changes, "recorded_metrics": self.recorded_metrics}
        return out


def recorded_plan(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Plan:
    """The plan recorded in a trace, with ``--set`` style overrides applied."""
    with TraceReader(path) as reader:
        raw = reader.metadata["plan"]
    source = f"{path} (recorded plan)"
    return plan_from_dict(apply_overrides(raw, overrides, source), source)


def check_replayable(recorded: Plan, new: Plan, source: str) -> list[dict[str, Any]]:
    """The plan changes, or :class:`ReplayError` naming those the recorded workload forbids."""
    changes = plan_changes(recorded, new)
    if new.parallel.expert_tp != recorded.parallel.expert_tp:  # etp: null = tp
        changes.append(
            {
                "field": "parallel.etp",
                "recorded": recorded.parallel.expert_tp,
                "new": new.parallel.expert_tp,
            }
        )
    refused: dict[str, list[dict[str, Any]]] = {}
    for change in changes:
        name = change["field"]
        prefix = next((p for p in WORKLOAD_FIELDS if name == p or name.startswith(p + ".")), None)
        if prefix is not None and name not in FREE_FIELDS:
            refused.setdefault(prefix, []).append(change)
    if refused:
        parts = [_describe(prefix, found) for prefix, found in refused.items()]
        raise ReplayError(
            f"cannot replay {source} under this plan: {'; '.join(parts)}. Simulate "
            f"the changed plan with `clustersim run` instead."
        )
    return changes


def _describe(prefix: str, found: list[dict[str, Any]]) -> str:
    why = WORKLOAD_FIELDS[prefix]
    if len(found) > 2:
        names = ", ".join(c["field"] for c in found)
        return f"{names} change, but {why}"
    return "; ".join(
        f"{c['field']} changes ({c['recorded']} -> {c['new']}), but {why}"
        for c in dict((c["field"], c) for c in found).values()
    )


class RecordedWorkload:
    """Sequence lengths and routing outcomes read back from a trace."""

    def __init__(self, reader: TraceReader, recorded: Plan):
        par = recorded.parallel
        run = reader.metadata["run"]
        self.symmetric = bool(run["symmetric"])
        self.groups_per_stage = int(run["ep_groups_per_stage"]) or 1
        copy = _copy_of(recorded)
        lengths: dict[tuple[int, int], np.ndarray] = {}
        parts: dict[tuple[int, int, int, int], dict[str, Any]] = {}
        for batch in reader.batches():
            table = batch.to_pydict() if _has_workload(batch) else None
            if table is None:
                continue
            for kind, op, rep, mb, layer, group, value, values in zip(
                table["kind"],
                table["op"],
                table["replica"],
                table["microbatch"],
                table["layer"],
                table["group"],
                table["value"],
                table["values"],
                strict=True,
            ):
                if kind == "workload" and op == "seq_lens":
                    lengths[(rep, mb)] = np.asarray(values, dtype=np.float64).astype(np.int64)
                elif kind == "route":
                    stage, in_stage = divmod(group, self.groups_per_stage)
                    key = (layer, mb, in_stage, copy(layer, stage))
                    parts.setdefault(key, {})[op] = values if values is not None else value
        try:
            self.seq_lens = [
                [lengths[(d, m)] for m in range(par.num_microbatches)] for d in range(par.dp)
            ]
        except KeyError:
            raise TraceError(f"{reader.path}: damaged trace (sequence lengths missing)") from None
        self.routes = {key: _dispatch(p, reader.path) for key, p in parts.items()}


def _copy_of(plan: Plan) -> Callable[[int, int], int]:
    """Which copy of a layer an EP group of a stage routes: 0, or under DualPipe 1 when the
    stage holds the layer as its second chunk (every layer runs on two stages)."""
    if plan.parallel.schedule != "dualpipe" or plan.model.moe is None:
        return lambda _layer, _stage: 0
    home = {i: s for s, layers in enumerate(Layout(plan).stage_layers) for i in layers}
    return lambda layer, stage: int(home.get(layer, stage) != stage)


def _has_workload(batch) -> bool:
    kinds = batch.column("kind")
    words = kinds.dictionary.to_pylist()
    codes = set(np.unique(kinds.indices.to_numpy()).tolist())
    return any(words[c] in ("workload", "route") for c in codes)


def _dispatch(p: dict[str, Any], path: Path) -> tuple[np.ndarray, Dispatch]:
    try:
        tokens = np.asarray(p["member_tokens"], dtype=np.float64)
        n = tokens.size
        a2a = np.asarray(p["a2a_tokens"], dtype=np.float64).reshape(n, n)
        return tokens, Dispatch(
            a2a,
            np.asarray(p["received_tokens"], dtype=np.float64),
            np.asarray(p["active_experts"], dtype=np.float64),
            np.asarray(p["expert_tokens"], dtype=np.float64),
            float(p["dropped_tokens"]),
            float(p["routed_tokens"]),
        )
    except (KeyError, ValueError, TypeError):
        raise TraceError(f"{path}: damaged trace (incomplete routing rows)") from None


class RecordedRouting:
    """A routing source that hands out the recorded outcomes (never samples)."""

    def __init__(self, workload: RecordedWorkload, plan: Plan):
        self.routes = workload.routes
        groups = Layout(plan).groups("ep")
        self.num_groups = len(groups)
        self.groups_per_stage = len(groups) // plan.parallel.pp
        self._copy = _copy_of(plan)
        self.elapsed_s = 0.0

    def dispatch(self, layer: int, key: int, tokens_per_member: np.ndarray) -> Dispatch:
        """The recorded dispatch of this (layer, micro-batch, EP group within its stage)."""
        mb, gid = divmod(key, self.num_groups)
        stage, in_stage = divmod(gid, self.groups_per_stage)
        found = self.routes.get((layer, mb, in_stage, self._copy(layer, stage)))
        if found is None or not np.array_equal(found[0], tokens_per_member):
            raise ReplayError(
                f"the trace has no routing for layer {layer}, micro-batch {mb}, "
                f"EP group {gid % self.groups_per_stage} with these tokens: the "
                f"plan change regroups the recorded tokens"
            )
        return found[1]


def replay(
    path: str | Path,
    plan: Plan | None = None,
    progress: Callable[[float], None] | None = None,
    trace: Path | None = None,
) -> ReplayReport:
    """Simulate the workload recorded in ``path`` under ``plan`` (default: the recorded plan).
    A serving trace is replayed by :func:`clustersim.run.replay.replay_serving`
    (its ``report`` is then a ``ServingReport``). Raises :class:`TraceError` for an unusable
    file, :class:`ReplayError` for a change the workload forbids, :class:`EngineError` for a
    plan the engine cannot simulate."""
    with TraceReader(path) as reader:
        mode = reader.metadata["run"].get("mode")
    if mode == "inference":
        return replay_serving(path, plan, progress, trace)
    with TraceReader(path) as reader:
        if mode != "training":
            raise TraceError(f"{path}: replay reads training or serving traces (mode {mode!r})")
        recorded = reader.plan()
        target = plan or recorded
        changes = check_replayable(recorded, target, str(path))
        workload = RecordedWorkload(reader, recorded)
    check_supported(target, Layout(target))

    def simulator(plan: Plan, progress, trace):
        routing = RecordedRouting(workload, plan) if plan.model.moe else None
        return simulate_workload(
            plan, audit(plan), workload.seq_lens, routing, workload.symmetric, progress, trace
        )

    verdict = replayed(target, simulator, progress, trace)
    return ReplayReport(verdict.run, changes, recorded, analyze(path).metrics, verdict)


def replayed(plan: Plan, simulator, progress, trace) -> Verdict:
    """The verdict of a replay (:func:`evaluate` with the recorded workload); a replay that
    cannot run raises, as the recorded workload allows no fallback."""
    verdict = evaluate(plan, progress=progress, trace=trace, simulator=simulator)
    if verdict.run is None:
        raise EngineError(verdict.note)
    return verdict


# ---- replay ----------------------------------------------------------------------------------
def check_serving_replayable(recorded: Plan, new: Plan, source: str) -> list[dict[str, Any]]:
    """The plan changes, or :class:`ReplayError` naming those that would draw another request
    stream (:data:`STREAM_FIELDS`)."""

    changes = plan_changes(recorded, new)
    refused: dict[str, list[dict[str, Any]]] = {}
    for change in changes:
        name = change["field"]
        prefix = next((p for p in STREAM_FIELDS if name == p or name.startswith(p + ".")), None)
        if prefix is not None:
            refused.setdefault(prefix, []).append(change)
    if refused:
        parts = []
        for prefix, found in refused.items():
            what = "; ".join(
                f"{c['field']} changes ({c['recorded']} -> {c['new']})" for c in found[:3]
            )
            more = f" and {len(found) - 3} more" if len(found) > 3 else ""
            parts.append(f"{what}{more}, but {STREAM_FIELDS[prefix]}")
        raise ReplayError(
            f"cannot replay {source} under this plan: {'; '.join(parts)}. The "
            f"replay serves the recorded requests; simulate a new request stream "
            f"with `clustersim run` instead."
        )
    return changes


def replay_serving(
    path: str | Path,
    plan: Plan | None = None,
    progress: Callable[[float], None] | None = None,
    trace: Path | None = None,
):
    """Serve the request stream recorded in ``path`` under ``plan`` (default: the recorded
    plan). Returns a :class:`~clustersim.run.replay.ReplayReport` whose ``report`` is a
    :class:`~clustersim.run.serving.ServingReport`. Raises :class:`TraceError` for an
    unusable file, ``ReplayError`` for a change that would draw another stream,
    ``EngineError`` for a plan the engine cannot simulate; with ``trace``, writes the
    replayed run's serving trace there."""

    with TraceReader(path) as reader:
        recorded, requests, res = read_serving_result(reader)
    target = plan or recorded
    changes = check_serving_replayable(recorded, target, str(path))

    def simulator(plan: Plan, progress, trace):
        return simulate_serving(plan, progress, trace, requests=requests)

    verdict = replayed(target, simulator, progress, trace)
    return ReplayReport(verdict.run, changes, recorded, serving_metrics(recorded, res), verdict)

"""DualPipe (``parallel.schedule: dualpipe``) against the DualPipe README's table.

The step order (pure functions): a list scheduling of every device's steps with exact times (F,
a full backward B = F + W split into I = F and W where the schedule defers W, F&B for an
overlapped pair, free communication) gives each device an idle time of exactly
``(p/2 - 1)(F&B + B - 3W)`` (the table's bubble) whenever W <= F; every device holds ``p + 1``
chunk micro-batches at its peak (1F1B's stage 0 holds ``p``); each device runs every
(micro-batch, chunk) forward and backward once, micro-batches from both ends.

The engine: with free communication it runs the list schedule of these steps at the cost
model's F, I, W times, and its idle time is the README's bubble (up to the output layer, which
only the last position runs) and less than half 1F1B's (p - 1)(F + B); memory per GPU of
stage s is 1F1B's of model stages s and p - 1 - s together (parameters 2x, activations
p + 1 chunks); the EP overlap in the F&B steps is never slower and changes nothing without
all-to-all time; the same seed gives the same iteration.
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustersim.audit.checks import audit
from clustersim.costs.memory import memory_per_gpu
from clustersim.costs.schedules import (
    Step,
    dualpipe_bubble,
    dualpipe_position,
    overlapped_pairs,
    stage_steps,
)
from clustersim.engine.errors import EngineError
from clustersim.engine.recorder import Kind, Op
from clustersim.engine.training.optimes import MicrobatchCosts
from clustersim.layout import Layout
from clustersim.run.simulate import simulate
from clustersim.spec import plan_from_dict

CASES = [(p, m) for p in (2, 4, 6, 8) for m in (2 * p, 2 * p + 2, 4 * p)]


def _steps(p: int, m: int) -> list[list[Step]]:
    return [stage_steps("dualpipe", p, m, s) for s in range(p)]


@pytest.mark.parametrize(("p", "m"), CASES)
def test_every_chunk_forward_and_backward_once(p, m):
    for stage, steps in enumerate(_steps(p, m)):
        forwards = Counter((s.microbatch, s.chunk) for s in steps if s.kind == "F")
        backwards = Counter((s.microbatch, s.chunk) for s in steps if s.kind in "BI")
        weights = Counter((s.microbatch, s.chunk) for s in steps if s.kind == "W")
        # chunk 0 runs the first m/2 micro-batches (fed at device 0), chunk 1 the others
        expected = {(mb, int(mb >= m // 2)) for mb in range(m)}
        assert set(forwards) == set(backwards) == expected
        assert set(forwards.values()) == set(backwards.values()) == {1}
        deferred = {(s.microbatch, s.chunk) for s in steps if s.kind == "I"}
        assert weights == Counter(deferred)  # each deferred weight gradient runs once
        at = {(s.kind, s.microbatch): i for i, s in enumerate(steps)}
        for mb, _ in expected:
            back = at.get(("B", mb), at.get(("I", mb)))
            assert at[("F", mb)] < back
            if ("W", mb) in at:
                assert back < at[("W", mb)]
        # W is first in first out over the deferred backwards
        order_i = [s.microbatch for s in steps if s.kind == "I"]
        assert [s.microbatch for s in steps if s.kind == "W"] == order_i
        for i in overlapped_pairs("dualpipe", p, m, stage):
            assert steps[i].kind == "F" and steps[i + 1].kind == "B"
            assert steps[i].chunk != steps[i + 1].chunk  # the two directions


def test_small_case_by_hand():
    """p = 2, m = 4 from DualPipe.step: device 0 (first half, h = 0, a middle device):
    phase 2 F0 F1; phase 4 (i = 0, middle: not overlapped) F0 B1, then F1&B0; phase 6
    B1, then B0 with its weights deferred; phase 8 W."""

    def step(kind: str):
        return lambda mb, chunk: Step(kind, mb, chunk)

    f, b, i, w = (step(k) for k in "FBIW")
    assert stage_steps("dualpipe", 2, 4, 0) == [
        f(0, 0), f(2, 1), f(1, 0), b(2, 1), f(3, 1), b(0, 0), b(3, 1), i(1, 0), w(1, 0),
    ]  # fmt: skip
    assert overlapped_pairs("dualpipe", 2, 4, 0) == [4]
    # device 1 mirrors it: its phase 0 is the pipeline fed at device 1 (chunk 1)
    assert stage_steps("dualpipe", 2, 4, 1) == [
        f(2, 1), f(0, 0), f(3, 1), b(0, 0), f(1, 0), b(2, 1), b(1, 0), i(3, 1), w(3, 1),
    ]  # fmt: skip


def test_invalid_arguments():
    for p, m in ((3, 6), (4, 6), (4, 9), (2, 2)):
        with pytest.raises(ValueError, match="dualpipe needs pp even"):
            stage_steps("dualpipe", p, m, 0)
    with pytest.raises(ValueError, match="dualpipe_bubble"):
        from clustersim.costs.schedules import bubble_fraction

        bubble_fraction("dualpipe", 4, 8)


def makespan_and_busy(p: int, m: int, f, b, w, fb) -> tuple[Fraction, list[Fraction]]:
    """:func:`list_schedule` with the same times on every device: F takes ``f``, B ``b``,
    I ``b - w``, W ``w`` and an F&B pair ``fb``."""
    times = {"F": f, "B": b, "I": b - w, "W": w}
    return list_schedule(
        p, m, lambda _stage, group: fb if len(group) == 2 else times[group[0].kind]
    )


def list_schedule(p: int, m: int, duration) -> tuple:
    """List-schedule every device's steps in order, ``duration(stage, steps)`` for one step
    or an F&B pair; a pair starts when both of its inputs are there (DualPipe receives both,
    then computes). A forward needs the previous position's forward of its pipeline,
    a backward the next position's backward (the last position: its own forward), W its I.
    Returns the makespan and each device's busy time."""
    orders = _steps(p, m)
    pairs = [set(overlapped_pairs("dualpipe", p, m, s)) for s in range(p)]
    done: dict[tuple, Fraction] = {}
    position, free, busy = [0] * p, [0] * p, [0] * p

    def needs(step: Step, stage: int) -> list[tuple]:
        q = dualpipe_position(p, stage, step.chunk)
        if step.kind == "F":
            return [("F", step.microbatch, q - 1)] if q > 0 else []
        if step.kind == "W":
            return [("B", step.microbatch, q)]
        return [("B", step.microbatch, q + 1)] if q < p - 1 else [("F", step.microbatch, q)]

    progress = True
    while progress:
        progress = False
        for s in range(p):
            while position[s] < len(orders[s]):
                i = position[s]
                group = [i, i + 1] if i in pairs[s] else [i]
                wanted = [n for j in group for n in needs(orders[s][j], s)]
                if any(n not in done for n in wanted):
                    break
                took = duration(s, [orders[s][j] for j in group])
                free[s] = max([free[s]] + [done[n] for n in wanted]) + took
                busy[s] += took
                for j in group:
                    step = orders[s][j]
                    key = "B" if step.kind in "BI" else step.kind
                    done[(key, step.microbatch, dualpipe_position(p, s, step.chunk))] = free[s]
                position[s] += len(group)
                progress = True
    assert position == [len(o) for o in orders], "the schedule deadlocks"
    return max(free), busy


@settings(max_examples=40, deadline=None)
@given(
    p=st.sampled_from([2, 4, 6, 8, 10]),
    extra=st.integers(0, 4),
    f=st.integers(2, 8),
    w_share=st.fractions(0, 1),
    overlap=st.fractions(0, 1),
)
def test_bubble_is_the_readme_closed_form(p, extra, f, w_share, overlap):
    """With B = F + W (the input gradients cost a forward), W <= F and F&B between max(F, B)
    (full overlap) and F + B (none), the idle time of the busiest-waiting device is exactly
    (p/2 - 1)(F&B + B - 3W)."""
    m = 2 * p + 2 * extra
    f = Fraction(f)
    w = f * w_share
    b = f + w
    fb = max(f, b) + (f + b - max(f, b)) * overlap
    total, busy = makespan_and_busy(p, m, f, b, w, fb)
    idle = max(total - x for x in busy)
    assert idle == (Fraction(p, 2) - 1) * (fb + b - 3 * w)
    assert float(idle) == pytest.approx(dualpipe_bubble(p, float(fb), float(b), float(w)))


@pytest.mark.parametrize("p", [4, 8])
def test_bubble_against_1f1b_table_row(p):
    """The README's comparison at F = 1, B = 2, W = 1, F&B = F + B (no overlap): DualPipe
    idles (p/2 - 1)(3 + 2 - 3) = p - 2 per device, 1F1B (p - 1)(F + B) = 3(p - 1)."""
    total, busy = makespan_and_busy(p, 2 * p, Fraction(1), Fraction(2), Fraction(1), Fraction(3))
    assert max(total - x for x in busy) == p - 2
    assert p - 2 < 3 * (p - 1)


@pytest.mark.parametrize(("p", "m"), CASES)
def test_activations_held_peak_is_p_plus_one(p, m):
    """Chunk micro-batches whose forward ran and whose backward (B or I) did not: at most
    p + 1 on every device (the README's 'PP + 1'), split p - s of chunk 0 and s + 1 of chunk
    1 at the peak -- 1F1B's p - position for each chunk's model stage."""
    for stage, steps in enumerate(_steps(p, m)):
        held, peak, at_peak = [0, 0], 0, set()
        for step in steps:
            if step.kind == "F":
                held[step.chunk] += 1
            elif step.kind in "BI":
                held[step.chunk] -= 1
            if sum(held) > peak:
                peak, at_peak = sum(held), set()
            if sum(held) == peak:
                at_peak.add(tuple(held))
        assert peak == p + 1
        assert at_peak == {(p - stage, stage + 1)}


# ---- the engine ------------------------------------------------------------------------------

FREE_LINK = {"bandwidth_gbps": 1e9, "latency_us": 0.0}


def dense_plan(schedule: str, p: int, m: int, seq: int = 1024, **parallel):
    """A dense model, two layers per stage, one GPU per stage, links that cost nothing."""
    return plan_from_dict(
        {
            "name": "dualpipe",
            "model": {"preset": "llama-2-7b", "num_layers": 2 * p, "vocab_size": 1024},
            "hardware": {
                "gpu": "H100-SXM",
                "num_nodes": 1,
                "gpus_per_node": p,
                "intra_node": FREE_LINK,
                "inter_node": FREE_LINK,
            },
            "parallel": {
                "tp": 1,
                "pp": p,
                "dp": 1,
                "num_microbatches": m,
                "schedule": schedule,
                **parallel,
            },
            "workload": {"mode": "training", "seq_len": {"dist": "fixed", "value": seq}},
        },
        "test",
    )


def _idle_ms(report) -> tuple[float, np.ndarray]:
    """The pipeline's end and each GPU's idle time before it (compute rows, optimizer out)."""
    cols = report.recorder.columns()
    compute = (cols["kind"] == Kind.COMPUTE) & (cols["op"] != Op.OPTIMIZER)
    end = float(cols["end_ms"][compute].max())
    lanes = cols["lane"][compute]
    busy = np.bincount(lanes, cols["end_ms"][compute] - cols["start_ms"][compute])
    return end, end - busy


def _step_ms(plan, costs: MicrobatchCosts):
    """F, B, I, W of one chunk at each position, from the cost model the engine reads."""
    layer, p = costs.dense, plan.parallel.pp
    per_layer = {
        "F": layer.attn_fwd_ms + layer.mlp_fwd_ms,
        "B": layer.attn_bwd_ms + layer.mlp_bwd_ms,
        "W": layer.weights_ms,
    }
    per_layer["I"] = per_layer["B"] - per_layer["W"]
    logits = {
        "F": costs.logits_fwd_ms,
        "B": costs.logits_bwd_ms,
        "W": costs.logits_weights_ms,
        "I": costs.logits_bwd_ms - costs.logits_weights_ms,
    }

    def duration(stage: int, group) -> float:
        total = 0.0
        for step in group:
            position = dualpipe_position(p, stage, step.chunk)
            total += 2 * per_layer[step.kind] + (logits[step.kind] if position == p - 1 else 0)
        return total

    return per_layer, duration


@pytest.mark.parametrize("p", [4, 8])
def test_engine_runs_the_list_schedule_and_the_readme_bubble(p):
    m = 2 * p
    plan = dense_plan("dualpipe", p, m)
    report = simulate(plan)
    end, idle = _idle_ms(report)
    costs = MicrobatchCosts(plan, [0], np.full(1, 1024))
    per_layer, duration = _step_ms(plan, costs)
    makespan, busy = list_schedule(p, m, duration)
    assert end - idle == pytest.approx(busy, rel=1e-9)  # every step at the cost model's times
    # the pipeline sends still take a copy's time (about 2 us); at most one per step of a
    # device lies on the critical path
    cols = report.recorder.columns()
    sends = cols["op"] == Op.P2P_SEND
    send_ms = float((cols["end_ms"] - cols["start_ms"])[sends].max())
    slack = len(stage_steps("dualpipe", p, m, 0)) * send_ms
    assert send_ms < 0.01
    assert makespan <= end <= makespan + slack
    # the README's bubbles at the chunk times (two layers; F&B = F + B without all-to-alls)
    # hold up to the output layer, which only the last position runs (m of them on its
    # device), and the sends
    f, b, w = (2 * per_layer[k] for k in "FBW")
    extra = m * (costs.logits_fwd_ms + costs.logits_bwd_ms) + 2 * slack
    assert idle.max() == pytest.approx(dualpipe_bubble(p, f + b, b, w), abs=extra)
    one_f_one_b = simulate(dense_plan("1f1b", p, m))
    _, idle_1f1b = _idle_ms(one_f_one_b)
    assert idle_1f1b.max() == pytest.approx((p - 1) * (f + b), abs=extra)
    assert idle.max() < idle_1f1b.max() / 2
    assert report.metrics["iteration_time_ms"] < one_f_one_b.metrics["iteration_time_ms"]


@pytest.mark.parametrize("p", [4, 8])
def test_memory_is_1f1b_of_both_model_stages(p):
    """Device s holds model stages s and p - 1 - s with 1F1B's p - position micro-batches
    each: parameters 2x over the pipeline, p + 1 chunks of activations."""
    dual = dense_plan("dualpipe", p, 2 * p)
    plain = dense_plan("1f1b", p, 2 * p)
    dual_mem = memory_per_gpu(dual, Layout(dual)).stages
    plain_mem = memory_per_gpu(plain, Layout(plain)).stages
    for s in range(p):
        pair = (plain_mem[s], plain_mem[p - 1 - s])
        for field in ("params_per_gpu", "params_gib", "grads_gib", "optimizer_gib"):
            assert getattr(dual_mem[s], field) == pytest.approx(
                sum(getattr(x, field) for x in pair)
            )
        assert dual_mem[s].activations_gib == pytest.approx(sum(x.activations_gib for x in pair))
        assert dual_mem[s].inflight_microbatches == p + 1
        assert dual_mem[s].num_layers == 4
    assert plain_mem[0].inflight_microbatches == p
    assert sum(x.params_per_gpu for x in dual_mem) == pytest.approx(
        2 * sum(x.params_per_gpu for x in plain_mem)
    )


def moe_plan(overlap: bool, ep: int = 8, skew: float = 0.0, routing: str = "sampled"):
    return plan_from_dict(
        {
            "name": "dualpipe-moe",
            "model": {
                "preset": "mixtral-8x7b",
                "num_layers": 4,
                "moe": {"router_skew": skew, "routing": routing},
            },
            "hardware": {"gpu": "H100-SXM", "num_nodes": 2, "gpus_per_node": 8},
            "parallel": {
                "tp": 1,
                "pp": 2,
                "dp": 8,
                "ep": ep,
                "num_microbatches": 4,
                "schedule": "dualpipe",
                "overlap_ep_comm": overlap,
            },
            "workload": {"mode": "training", "seq_len": {"dist": "fixed", "value": 4096}},
        },
        "test",
    )


@settings(max_examples=4, deadline=None)
@given(ep=st.sampled_from([2, 4, 8]), skew=st.sampled_from([0.0, 0.5]))
def test_ep_overlap_never_slower(ep, skew):
    off = simulate(moe_plan(False, ep, skew)).metrics["iteration_time_ms"]
    on = simulate(moe_plan(True, ep, skew)).metrics["iteration_time_ms"]
    assert on <= off + 1e-9


def test_ep_overlap_hides_only_in_f_and_b_steps():
    on = simulate(moe_plan(True))
    cols = on.recorder.columns()
    a2a = np.isin(cols["op"], [Op.A2A_DISPATCH, Op.A2A_COMBINE])
    hidden = a2a & (cols["kind"] == Kind.COMM_ASYNC)
    # p = 2, m = 4: one F&B step per device (test_small_case_by_hand), 2 MoE layers per
    # chunk, a dispatch and a combine per layer and step, 8 lanes per stage
    assert hidden.sum() == 2 * (2 * 2 * 2) * 8
    off = simulate(moe_plan(False)).recorder.columns()
    assert not (
        np.isin(off["op"], [Op.A2A_DISPATCH, Op.A2A_COMBINE]) & (off["kind"] == Kind.COMM_ASYNC)
    ).any()


def test_ep_overlap_equal_without_all_to_all_time():
    off = simulate(moe_plan(False, ep=1, routing="even"))
    on = simulate(moe_plan(True, ep=1, routing="even"))
    assert on.metrics["iteration_time_ms"] == off.metrics["iteration_time_ms"]


def test_same_seed_same_result():
    first, second = simulate(moe_plan(True, skew=0.5)), simulate(moe_plan(True, skew=0.5))
    assert first.metrics == second.metrics
    a, b = first.recorder.columns(), second.recorder.columns()
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("parallel", "field"),
    [
        ({"pp": 3, "num_microbatches": 6}, "parallel.pp"),
        ({"pp": 4, "num_microbatches": 6}, "parallel.num_microbatches"),
        ({"pp": 4, "num_microbatches": 9}, "parallel.num_microbatches"),
        ({"pp": 2, "num_microbatches": 4, "dp_sharding": "full"}, "parallel.dp_sharding"),
    ],
)
def test_invalid_plans_are_audit_errors(parallel, field):
    plan = plan_from_dict(
        {
            "name": "bad",
            "model": {"preset": "llama-2-7b", "num_layers": 12},
            "hardware": {"gpu": "H100-SXM", "num_nodes": 1, "gpus_per_node": 8},
            "parallel": {"tp": 1, "dp": 1, "schedule": "dualpipe", **parallel},
            "workload": {"mode": "training", "seq_len": {"dist": "fixed", "value": 1024}},
        },
        "test",
    )
    assert field in {f.node for f in audit(plan).errors}
    with pytest.raises(EngineError, match="dualpipe"):
        simulate(plan)

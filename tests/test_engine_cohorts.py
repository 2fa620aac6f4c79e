"""One process drives all lanes of a stage (a cohort), each with its own clock: the rows must
still show every EP group's all-to-all starting when *its* slowest lane is ready and lasting
the all-to-all-v time of *its* routed tokens, every lane's experts taking their own time, and
lanes of other groups not waiting for them. Expected values come from ``costs`` formulas and
the routing outcomes, never from the engine's own timing."""

from __future__ import annotations

import numpy as np
import pytest

from clustersim.costs.comm import all_to_all_v_cost
from clustersim.engine.recorder import Op, Recorder
from clustersim.engine.training.moe import dispatch_many
from clustersim.engine.training.optimes import ExpertTimer
from clustersim.engine.training.sim import TrainingSim
from clustersim.engine.training.workload import microbatch_lengths
from clustersim.layout import Layout
from clustersim.run.simulate import routing_for
from clustersim.spec import plan_from_dict

MODEL = {
    "num_layers": 4,
    "hidden_size": 512,
    "num_attention_heads": 8,
    "num_kv_heads": 4,
    "ffn_hidden_size": 1024,
    "vocab_size": 1000,
    "moe": {"num_experts": 8, "top_k": 2, "router_skew": 0.5},
}


class Keeping:
    """Wraps a routing source and keeps every outcome by (layer, micro-batch, EP group)."""

    def __init__(self, inner, num_groups: int):
        self.inner, self.num_groups, self.seen = inner, num_groups, {}

    def dispatch_many(self, layer, keys, tokens):
        out = dispatch_many(self.inner, layer, keys, tokens)
        for i, key in enumerate(np.asarray(keys).tolist()):
            mb, gid = divmod(key, self.num_groups)
            self.seen[(layer, mb, gid)] = out.item(i)
        return out


def _run(parallel: dict):
    plan = plan_from_dict(
        {
            "model": MODEL,
            "hardware": {"gpu": "H100-SXM", "num_nodes": 4, "gpus_per_node": 8},
            "parallel": {"num_microbatches": 4, **parallel},
            "workload": {"seq_len": {"dist": "uniform", "min": 64, "max": 2048}},
        },
        "test",
    )
    layout = Layout(plan)
    routing = Keeping(routing_for(plan)[0], len(layout.groups("ep")))
    rec = Recorder(plan.parallel.world_size)
    lengths = microbatch_lengths(plan, np.random.default_rng(0))
    sim = TrainingSim(plan, rec, lengths, routing, symmetric=False)
    sim.run()
    return plan, layout, sim, rec.columns(), routing.seen


def _forward_rows(cols, op, layer, mb):
    """Per lane, the forward row of ``op`` for (layer, micro-batch): the earlier of the two."""
    pick = (cols["op"] == op) & (cols["layer"] == layer) & (cols["microbatch"] == mb)
    out = {}
    for i in np.flatnonzero(pick):
        lane = int(cols["lane"][i])
        if lane not in out or cols["start_ms"][i] < cols["start_ms"][out[lane]]:
            out[lane] = i
    return out


@pytest.mark.parametrize(
    "parallel",
    [
        {"tp": 1, "pp": 2, "dp": 16, "ep": 4},  # four EP groups of four lanes per stage
        {"tp": 2, "pp": 2, "dp": 8, "ep": 4, "etp": 1},  # two lanes per EP group
    ],
)
def test_each_ep_group_meets_on_its_own_clock(parallel):
    plan, layout, sim, cols, seen = _run(parallel)
    hw, gpn = plan.hardware, plan.hardware.gpus_per_node
    act_bytes = plan.model.hidden_size * 2
    groups, timer = layout.groups("ep"), ExpertTimer(plan)
    lane_of = {r: ln.index for ln in sim.lanes for r in ln.ranks}
    checked, group_ends = 0, []
    for (layer, mb, gid), d in seen.items():
        lanes = sorted({lane_of[r] for r in groups[gid]})
        dispatch = _forward_rows(cols, Op.A2A_DISPATCH, layer, mb)
        expert = _forward_rows(cols, Op.EXPERT_FWD, layer, mb)
        combine = _forward_rows(cols, Op.A2A_COMBINE, layer, mb)
        a2a_ms = all_to_all_v_cost(d.a2a_tokens * act_bytes, groups[gid], gpn, hw).time_ms
        start = max(cols["start_ms"][dispatch[ln]] for ln in lanes)
        for ln in lanes:  # the group's slowest lane gates it; its a2a-v time follows
            assert cols["end_ms"][dispatch[ln]] == pytest.approx(start + a2a_ms, rel=1e-12)
            assert cols["start_ms"][expert[ln]] == pytest.approx(start + a2a_ms, rel=1e-12)
            # the lane's experts: its slowest rank's GEMMs on the tokens that rank received
            slots = [groups[gid].index(r) for r in sim.lanes[ln].ranks]
            want = max(
                timer.forward_ms_one(float(d.received_tokens[s]), float(d.active_experts[s]))
                for s in slots
            )
            got = cols["end_ms"][expert[ln]] - cols["start_ms"][expert[ln]]
            assert got == pytest.approx(want, rel=1e-12)
        ready = max(cols["end_ms"][expert[ln]] for ln in lanes)
        assert all(cols["start_ms"][combine[ln]] == cols["end_ms"][expert[ln]] for ln in lanes)
        for ln in lanes:
            assert cols["end_ms"][combine[ln]] == pytest.approx(ready + a2a_ms, rel=1e-12)
        group_ends.append((layer, mb, layout.coords(groups[gid][0]).pp, start + a2a_ms))
        checked += 1
    assert checked == len(groups) * plan.model.num_layers // plan.parallel.pp * 4
    # groups of the same stage, layer and micro-batch do not wait for each other
    by_key: dict[tuple, set] = {}
    for layer, mb, stage, end in group_ends:
        by_key.setdefault((layer, mb, stage), set()).add(round(end, 9))
    assert any(len(ends) > 1 for ends in by_key.values())


def test_every_lane_and_gpu_has_its_rows():
    plan, _layout, sim, cols, _seen = _run({"tp": 2, "pp": 2, "dp": 8, "ep": 4, "etp": 1})
    per_stage = plan.model.num_layers // plan.parallel.pp
    for ln in sim.lanes:
        mine = cols["lane"] == ln.index
        assert ((cols["op"] == Op.ATTN_FWD) & mine).sum() == per_stage * 4
        assert ((cols["op"] == Op.EXPERT_BWD) & mine).sum() == per_stage * 4
        assert ((cols["op"] == Op.OPTIMIZER) & mine).sum() == 1
    assert sorted(r for ln in sim.lanes for r in ln.ranks) == list(range(32))


# ---- invariants of the lane clocks, over random layouts -------------------------------------

from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clustersim.engine.recorder import Kind  # noqa: E402

layouts = st.fixed_dictionaries(
    {
        "tp": st.sampled_from([1, 2]),
        "pp": st.sampled_from([1, 2, 4]),
        "dp": st.sampled_from([2, 4]),
        "ep": st.sampled_from([2, 4]),
        "schedule": st.sampled_from(["gpipe", "1f1b"]),
        "overlap_communication": st.booleans(),
        "distributed_optimizer": st.booleans(),
    }
)


@settings(max_examples=25, deadline=None)
@given(layouts, st.integers(0, 1000))
def test_lane_clocks_are_causal(parallel, seed):
    """Whatever the layout: each lane's compute stream (compute and blocking collectives) and
    its gradient stream run one op at a time; a stage starts a micro-batch's forward only after
    its activations arrived; nothing ends after the iteration."""
    assume(parallel["tp"] * parallel["dp"] % parallel["ep"] == 0)  # EP folds into the stage
    parallel = {**parallel, "etp": 1, "num_microbatches": 4}
    plan = plan_from_dict(
        {
            "seed": seed,
            "model": MODEL,
            "hardware": {"gpu": "H100-SXM", "num_nodes": 4, "gpus_per_node": 8},
            "parallel": parallel,
            "workload": {"seq_len": {"dist": "uniform", "min": 64, "max": 2048}},
        },
        "test",
    )
    rec = Recorder(plan.parallel.world_size)
    lengths = microbatch_lengths(plan, np.random.default_rng(seed))
    sim = TrainingSim(plan, rec, lengths, routing_for(plan)[0], symmetric=False)
    result = sim.run()
    cols = rec.columns()
    lane, kind, op = cols["lane"], cols["kind"], cols["op"]
    start, end = cols["start_ms"], cols["end_ms"]
    assert (end >= start).all() and end.max() <= result.iteration_time_ms * (1 + 1e-12)
    grads = np.isin(op, [Op.GRAD_REDUCE, Op.EXPERT_GRAD_REDUCE])
    for ln in sim.lanes:
        for stream in ((lane == ln.index) & (kind != Kind.COMM_ASYNC), (lane == ln.index) & grads):
            order = np.argsort(start[stream], kind="stable")
            s, e = start[stream][order], end[stream][order]
            assert (s[1:] >= e[:-1] - 1e-9).all()
    lane_at = {(ln.stage, ln.dp): ln.index for ln in sim.lanes}
    first_layer = [layers[0] for layers in sim.layout.stage_layers]
    for ln in sim.lanes:
        if ln.stage == 0:
            continue
        sender = lane_at[(ln.stage - 1, ln.dp)]
        for mb in range(4):
            sends = (lane == sender) & (op == Op.P2P_SEND) & (cols["microbatch"] == mb)
            arrival = end[sends][np.argmin(start[sends])]  # the forward send comes first
            fwd = (
                (lane == ln.index)
                & (op == Op.ATTN_FWD)
                & (cols["microbatch"] == mb)
                & (cols["layer"] == first_layer[ln.stage])
            )
            assert start[fwd].min() >= arrival - 1e-9

"""``parallel.overlap_ep_comm``: Megatron-Core's EP all-to-all overlap (in the 1F1B steady
state the dispatch/combine of one micro-batch hides under the other's compute). Never slower
than without, equal when there is no all-to-all time, and each all-to-all's exposed part is
max(0, its time - half the partner's layer compute)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustersim.costs.schedules import stage_steps
from clustersim.engine.recorder import Kind, Op
from clustersim.run.simulate import simulate
from clustersim.spec import plan_from_dict


def plan(overlap: bool, schedule="1f1b", ep=8, pp=2, skew=0.0, routing="sampled", **parallel):
    return plan_from_dict(
        {
            "name": "overlap",
            "model": {
                "preset": "mixtral-8x7b",
                "num_layers": 4,
                "moe": {"router_skew": skew, "routing": routing},
            },
            "hardware": {"gpu": "H100-SXM", "num_nodes": 2, "gpus_per_node": 8},
            "parallel": {
                "tp": 1,
                "pp": pp,
                "dp": 16 // pp,
                "ep": ep,
                "num_microbatches": 4,
                "schedule": schedule,
                "overlap_ep_comm": overlap,
                **parallel,
            },
            "workload": {"mode": "training", "seq_len": {"dist": "fixed", "value": 4096}},
        },
        "test",
    )


@settings(max_examples=6, deadline=None)
@given(
    schedule=st.sampled_from(["1f1b", "interleaved"]),
    ep=st.sampled_from([2, 4, 8]),
    skew=st.sampled_from([0.0, 0.5]),
)
def test_overlap_is_never_slower(schedule, ep, skew):
    extra = {"virtual_stages": 2} if schedule == "interleaved" else {}
    off = simulate(plan(False, schedule, ep, skew=skew, **extra)).metrics["iteration_time_ms"]
    on = simulate(plan(True, schedule, ep, skew=skew, **extra)).metrics["iteration_time_ms"]
    assert on <= off + 1e-9


def test_overlap_equals_without_when_no_all_to_all_time():
    """EP 1: every expert is local, the all-to-alls move nothing and take no time."""
    off = simulate(plan(False, ep=1, routing="even"))
    on = simulate(plan(True, ep=1, routing="even"))
    assert on.metrics["iteration_time_ms"] == off.metrics["iteration_time_ms"]


def test_overlap_hides_a2a_in_the_steady_state_only():
    report = simulate(plan(True))
    cols = report.recorder.columns()
    a2a = np.isin(cols["op"], [Op.A2A_DISPATCH, Op.A2A_COMBINE])
    hidden = a2a & (cols["kind"] == Kind.COMM_ASYNC)
    assert hidden.any()
    # stage 0 (lanes 0..7) with PP 2, 4 micro-batches: F0 | F1 B0 F2 B1 F3 B2 | B3 -- the
    # warm-up forward (mb 0) and the last backward (mb 3) have no partner
    steps = stage_steps("1f1b", 2, 4, 0)
    assert [s.kind + str(s.microbatch) for s in steps] == [
        "F0", "F1", "B0", "F2", "B1", "F3", "B2", "B3",
    ]  # fmt: skip
    # stage 0: 6 partnered steps, stage 1 (no warm-up): all 8; 2 MoE layers per stage, 2
    # all-to-alls per layer, 8 lanes per stage
    stage0 = np.isin(cols["lane"], np.arange(8))
    assert (hidden & stage0).sum() == 8 * 6 * 2 * 2
    assert (hidden & ~stage0).sum() == 8 * 8 * 2 * 2
    bytes_total = cols["bytes"][a2a].sum()
    plain = simulate(plan(False)).recorder.columns()
    plain_a2a = np.isin(plain["op"], [Op.A2A_DISPATCH, Op.A2A_COMBINE])
    assert bytes_total == pytest.approx(plain["bytes"][plain_a2a].sum())  # same bytes moved


def test_gpipe_has_no_partners():
    off = simulate(plan(False, "gpipe")).metrics["iteration_time_ms"]
    on = simulate(plan(True, "gpipe")).metrics["iteration_time_ms"]
    assert on == off

"""Small things a user trips on: ``dp`` derived from the GPU count (stated as an assumption),
unknown keys pointed at the plan's name for a common alias, bandwidth units in the field help."""

from __future__ import annotations

import pytest

from clustersim.run.evaluate import assumptions_for
from clustersim.spec import plan_from_dict
from clustersim.spec.errors import KEY_ALIASES, PlanError
from clustersim.spec.schema import HardwareSpec, LinkSpec


def _raw(parallel: dict, nodes: int = 2) -> dict:
    return {
        "model": {"preset": "mixtral-8x7b"},
        "hardware": {"gpu": "H100-SXM", "num_nodes": nodes, "gpus_per_node": 8},
        "parallel": parallel,
    }


@pytest.mark.parametrize(("tp", "pp", "nodes"), [(2, 1, 2), (1, 2, 2), (4, 2, 4), (8, 1, 1)])
def test_dp_is_derived_from_the_gpu_count_and_stated(tp, pp, nodes):
    plan = plan_from_dict(_raw({"tp": tp, "pp": pp}, nodes), "test")
    assert plan.parallel.dp == nodes * 8 // (tp * pp)
    assert plan.parallel.world_size == plan.hardware.num_gpus
    stated = {a.field: a for a in assumptions_for(plan, True, None)}
    assert stated["parallel.dp"].value == plan.parallel.dp
    assert "derived" in stated["parallel.dp"].note


def test_given_dp_is_not_an_assumption():
    plan = plan_from_dict(_raw({"tp": 2, "pp": 1, "dp": 4}), "test")
    assert "parallel.dp" not in {a.field for a in assumptions_for(plan, True, None)}


def test_dp_that_cannot_be_derived_is_a_plan_error():
    with pytest.raises(PlanError, match=r"parallel\.dp.*not a multiple of TP x CP x PP = 3"):
        plan_from_dict(_raw({"tp": 3, "pp": 1}), "test")


@pytest.mark.parametrize(
    ("alias", "field"),
    [("expert_parallel", "ep"), ("tensor_parallel", "tp"), ("pipeline_parallel", "pp"),
     ("data_parallel", "dp"), ("context_parallel", "cp"), ("expert_model_parallel_size", "ep"),
     ("Tensor-Parallel", "tp")],
)  # fmt: skip
def test_unknown_key_suggests_the_alias(alias, field):
    raw = _raw({"tp": 2, "pp": 1, "dp": 8, alias: 2})
    with pytest.raises(PlanError, match=f"unknown key, did you mean '{field}'"):
        plan_from_dict(raw, "test")


def test_every_alias_names_a_real_field():
    from clustersim.spec.load import _fields_at  # the fields the hint is drawn from

    fields = {f for loc in [(), ("model",), ("model", "moe"), ("hardware",), ("parallel",)]
              for f in _fields_at(loc)}  # fmt: skip
    assert set(KEY_ALIASES.values()) <= fields


def test_bandwidth_fields_state_their_unit():
    for field in (LinkSpec.model_fields["bandwidth_gbps"], HardwareSpec.model_fields[
            "hbm_bandwidth_gbps"]):  # fmt: skip
        assert "GB/s" in field.description
    assert "Gb/s" in LinkSpec.model_fields["bandwidth_gbps"].description  # the NIC unit too

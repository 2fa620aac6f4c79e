"""compare A B attributes the metric differences to each changed field (issue 17)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clustersim.explore.compare import attribute, compare
from clustersim.run.evaluate import evaluate
from clustersim.spec import plan_from_dict

SEEDS = Path(__file__).resolve().parent.parent / "configs" / "seeds"
BASE = {
    "model": {
        "num_layers": 4,
        "hidden_size": 512,
        "num_attention_heads": 8,
        "num_kv_heads": 4,
        "ffn_hidden_size": 1024,
        "vocab_size": 1000,
        "moe": {"num_experts": 8, "top_k": 2},
    },
    "hardware": {"gpu": "H100-SXM", "num_nodes": 1, "gpus_per_node": 8},
    "parallel": {"tp": 1, "pp": 2, "dp": 4, "ep": 4, "num_microbatches": 4},
    "workload": {"seq_len": {"dist": "fixed", "value": 256}},
}


def make(**parallel):
    data = {**BASE, "parallel": {**BASE["parallel"], **parallel.pop("par", {})}}
    data["hardware"] = {**BASE["hardware"], **parallel}
    return plan_from_dict(data, "test")


def test_one_field_delta_is_the_metric_difference_exactly():
    a, b = make(), make(par={"num_microbatches": 8})
    result = compare([a, b])
    (entry,) = result.attribution["single"]
    assert (entry["field"], entry["from"], entry["to"]) == ("parallel.num_microbatches", 4, 8)
    ma, mb = result.results[0].metrics, result.results[1].metrics
    for metric, delta in entry["deltas"].items():
        assert delta == mb[metric] - ma[metric]
    assert result.to_dict()["attribution"] == result.attribution["single"]
    assert "what each change does alone" in result.markdown()


def test_independent_changes_add_up():
    # GPU memory does not change timing; micro-batches do: the two single deltas add up to the
    # difference of the two plans, for every metric.
    a = make()
    b = make(memory_gib=40, par={"num_microbatches": 8})
    found = attribute(a, b, evaluate(a))
    total = {
        k: evaluate(b).metrics[k] - evaluate(a).metrics[k] for k in found["single"][0]["deltas"]
    }
    for metric, diff in total.items():
        summed = sum(e["deltas"][metric] for e in found["single"])
        assert summed == pytest.approx(diff, rel=1e-12, abs=1e-12)
    # applied one after another, the steps always telescope to the whole difference
    for metric, diff in total.items():
        assert sum(e["deltas"][metric] for e in found["sequence"]) == pytest.approx(diff)


def test_invalid_single_change_is_reported():
    # 8 -> 1 experts (and top-k 2 -> 1, EP 4 -> 1): one expert with top-k 2 is not a plan
    a = make()
    data = {**BASE, "model": {**BASE["model"], "moe": {"num_experts": 1, "top_k": 1}}}
    b = plan_from_dict({**data, "parallel": {**BASE["parallel"], "ep": 1}}, "test")
    found = attribute(a, b, evaluate(a))
    single = {e["field"]: e for e in found["single"]}
    assert single["model.moe.num_experts"]["status"] == "invalid"
    assert "top_k" in single["model.moe.num_experts"]["note"]
    assert single["model.moe.top_k"]["status"] == "simulated"

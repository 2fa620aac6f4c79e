"""Loading plans: the default plan, YAML/JSON, presets, overrides, and every kind of bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from clustersim.spec import Plan, PlanError, load_plan, plan_from_dict
from clustersim.spec.load import apply_overrides

DATA_DIR = Path(__file__).parent / "data"
WritePlan = Callable[..., Path]


def plan_error(path: Path | None, overrides: list[str] | None = None) -> PlanError:
    with pytest.raises(PlanError) as info:
        load_plan(path, overrides or [])
    err = info.value
    text = str(err)
    assert "Traceback" not in text and 'File "' not in text
    return err


def bad(write_plan: WritePlan, data: Any, name: str = "plan.yaml") -> tuple[Path, PlanError]:
    path = write_plan(data, name)
    return path, plan_error(path)


def issue_paths(err: PlanError) -> list[str]:
    return [i.path for i in err.issues]


# ---- good input ----------------------------------------------------------------------------


def test_default_plan_loads() -> None:
    plan = load_plan(None)
    assert isinstance(plan, Plan)
    assert plan.model.num_layers == 32  # from the mixtral-8x7b preset
    assert plan.model.moe is not None and plan.model.moe.num_experts == 8
    assert plan.model.moe.capacity_factor == 1.25  # the plan's override of the preset
    assert plan.hardware.peak_tflops == 989  # from the H100-SXM preset
    assert plan.hardware.num_gpus == 16
    p = plan.parallel
    assert (p.tp, p.pp, p.dp, p.ep, p.expert_tp) == (2, 2, 4, 8, 1)
    assert p.world_size == 16
    assert plan.workload.seq_len.dist == "uniform" and plan.workload.seq_len.max == 4096


def test_fixture_plan_is_valid(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan = load_plan(write_plan(plan_dict))
    assert plan.name == "test-mixtral-2x8"
    assert plan.parallel.world_size == plan.hardware.num_gpus == 16
    assert plan.model.name == "mixtral-8x7b"


def test_yaml_and_json_give_the_same_plan(plan_dict: dict[str, Any], tmp_path: Path) -> None:
    y = tmp_path / "p.yaml"
    y.write_text(yaml.safe_dump(plan_dict))
    j = tmp_path / "p.json"
    j.write_text(json.dumps(plan_dict))
    yml = tmp_path / "p.yml"
    yml.write_text(yaml.safe_dump(plan_dict))
    assert load_plan(y) == load_plan(j) == load_plan(yml) == load_plan(str(y))


def test_model_preset_merge_and_overrides(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan_dict["model"] = {"preset": "mixtral-8x7b", "num_layers": 16, "moe": {"top_k": 1}}
    plan = load_plan(write_plan(plan_dict))
    assert plan.model.num_layers == 16
    assert plan.model.moe is not None
    assert plan.model.moe.top_k == 1
    assert plan.model.moe.num_experts == 8  # the rest of the nested preset survives
    assert plan.model.hidden_size == 4096
    assert plan.model.kv_heads == 8


def test_gpu_preset_merge_and_nested_override(
    plan_dict: dict[str, Any], write_plan: WritePlan
) -> None:
    plan_dict["hardware"]["intra_node"] = {"bandwidth_gbps": 300}
    plan_dict["hardware"]["memory_gib"] = 94
    hw = load_plan(write_plan(plan_dict)).hardware
    assert hw.intra_node.bandwidth_gbps == 300
    assert hw.intra_node.latency_us == 3  # kept from the preset
    assert hw.inter_node.bandwidth_gbps == 50
    assert hw.memory_gib == 94
    assert hw.hbm_bandwidth_gbps == 3350


def test_presets_are_case_insensitive(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    base = load_plan(write_plan(plan_dict, "a.yaml"))
    plan_dict["model"]["preset"] = "Mixtral-8x7B"
    plan_dict["hardware"]["gpu"] = "h100-sxm"
    other = load_plan(write_plan(plan_dict, "b.yaml"))
    naming = {"name", "preset"}  # carry the spelling the plan used
    assert other.model.model_dump(exclude=naming) == base.model.model_dump(exclude=naming)
    assert other.hardware.peak_tflops == 989
    assert other.hardware.memory_gib == 80


def test_custom_gpu_without_preset(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan_dict["hardware"] = {
        "gpu": "MI300X",
        "num_nodes": 2,
        "gpus_per_node": 8,
        "memory_gib": 192,
        "peak_tflops": 1307,
        "hbm_bandwidth_gbps": 5300,
        "intra_node": {"bandwidth_gbps": 64, "latency_us": 3},
        "inter_node": {"bandwidth_gbps": 50, "latency_us": 8},
    }
    assert load_plan(write_plan(plan_dict)).hardware.memory_gib == 192


def test_etp_defaults_to_tp(plan_dict: dict[str, Any]) -> None:
    del plan_dict["parallel"]["etp"]
    assert plan_from_dict(plan_dict, "<t>").parallel.expert_tp == 2


def test_apply_overrides() -> None:
    raw = {"parallel": {"tp": 2}, "name": "x"}
    items = ["parallel.tp=4", "model.moe.top_k=1", "name=y", "parallel.etp=null"]
    out = apply_overrides(raw, items, "src")
    assert out == {"parallel": {"tp": 4, "etp": None}, "model": {"moe": {"top_k": 1}}, "name": "y"}
    assert raw == {"parallel": {"tp": 2}, "name": "x"}  # the input is not mutated


def test_load_plan_with_overrides(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    path = write_plan(plan_dict)
    plan = load_plan(
        path,
        overrides=[
            "parallel.tp=4",
            "parallel.dp=2",
            "model.num_layers=16",
            "model.moe.capacity_factor=1.5",
            "hardware.intra_node.bandwidth_gbps=200",
            "parallel.schedule=gpipe",
        ],
    )
    assert (plan.parallel.tp, plan.parallel.dp) == (4, 2)
    assert plan.model.num_layers == 16
    assert plan.model.moe is not None and plan.model.moe.capacity_factor == 1.5
    assert plan.model.moe.num_experts == 8
    assert plan.hardware.intra_node.bandwidth_gbps == 200
    assert plan.hardware.intra_node.latency_us == 3
    assert plan.parallel.schedule == "gpipe"


def test_override_on_default_plan() -> None:
    plan = load_plan(None, ["model.preset=deepseek-v3", "model.moe=null"])
    assert plan.model.num_layers == 61
    assert plan.model.moe is None  # null replaces the preset's section


def test_empirical_length_file_fills_min_max(plan_dict: dict[str, Any], tmp_path: Path) -> None:
    csv = tmp_path / "lens.csv"
    csv.write_text((DATA_DIR / "lengths.csv").read_text())
    plan_dict["workload"] = {
        "seq_len": {"dist": "empirical", "file": "lens.csv", "column": "prompt_tokens"}
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan_dict))
    seq = load_plan(path).workload.seq_len  # relative to the plan file's directory
    assert (seq.min, seq.max) == (77, 4000)
    assert seq.longest == 4000
    assert Path(seq.file or "").is_absolute()


def test_empirical_given_max_is_kept(plan_dict: dict[str, Any]) -> None:
    plan_dict["workload"] = {
        "mode": "inference",
        "requests": {
            "output_len": {
                "dist": "empirical",
                "file": str(DATA_DIR / "lengths.csv"),
                "column": "output_tokens",
                "max": 2048,
            }
        },
    }
    out = plan_from_dict(plan_dict, "<t>").workload.requests.output_len
    assert (out.min, out.max) == (7, 2048)


# ---- bad files -----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    err = plan_error(path)
    assert str(path) in str(err)
    assert "not found" in str(err)


def test_directory(tmp_path: Path) -> None:
    err = plan_error(tmp_path)
    assert str(tmp_path) in str(err)
    assert "directory" in str(err)


def test_malformed_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nparallel:\n\ttp: 2\n")
    err = plan_error(path)
    assert str(path) in str(err)
    assert "malformed YAML" in str(err)
    assert "line 3" in str(err)


def test_malformed_yaml_unclosed_bracket(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nparallel: {tp: 2\nmodel: y\n")
    err = plan_error(path)
    assert "malformed YAML" in str(err) and "line " in str(err)


def test_malformed_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "name": "x",\n  "parallel": {"tp": 2,}\n}\n')
    err = plan_error(path)
    assert str(path) in str(err)
    assert "malformed JSON" in str(err) and "line 3" in str(err)


def test_top_level_list(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- parallel\n- model\n")
    err = plan_error(path)
    assert str(path) in str(err) and "mapping" in str(err) and "list" in str(err)


@pytest.mark.parametrize("text", ["", "\n# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    err = plan_error(path)
    assert str(path) in str(err) and "empty" in str(err)


# ---- bad fields ----------------------------------------------------------------------------


def test_unknown_top_level_key(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan_dict["parallell"] = plan_dict.pop("parallel")
    path, err = bad(write_plan, plan_dict)
    assert str(path) in str(err)
    assert "parallell" in issue_paths(err)
    assert "did you mean 'parallel'" in str(err)
    assert "parallel" in issue_paths(err)  # and the real section is reported missing


def test_unknown_model_key(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan_dict["model"]["num_layer"] = 16
    path, err = bad(write_plan, plan_dict)
    assert issue_paths(err) == ["model.num_layer"]
    assert "unknown key" in str(err)
    assert "did you mean 'num_layers'" in str(err)


def test_unknown_nested_key(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan_dict["model"]["moe"] = {"top_kk": 1}
    _, err = bad(write_plan, plan_dict)
    assert issue_paths(err) == ["model.moe.top_kk"]
    assert "did you mean 'top_k'" in str(err)


def test_unknown_parallel_key_lists_valid(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan_dict["parallel"]["tensor_parallel"] = 4
    _, err = bad(write_plan, plan_dict)
    assert issue_paths(err) == ["parallel.tensor_parallel"]
    assert "unknown key" in str(err)
    assert "tp" in err.issues[0].valid.split(", ")


def test_wrong_type(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan_dict["parallel"]["tp"] = "four"
    path, err = bad(write_plan, plan_dict)
    assert str(path) in str(err)
    assert issue_paths(err) == ["parallel.tp"]
    assert "'four'" in str(err) and "integer" in str(err)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("parallel", "tp", 0), ("hardware", "num_nodes", -1), ("parallel", "ep", -8)],
)
def test_non_positive_sizes(
    plan_dict: dict[str, Any], write_plan: WritePlan, section: str, key: str, value: int
) -> None:
    plan_dict[section][key] = value
    path, err = bad(write_plan, plan_dict)
    assert str(path) in str(err)
    assert issue_paths(err) == [f"{section}.{key}"]
    assert f"got {value}" in str(err)
    assert "greater than 0" in str(err)


def test_missing_required_field(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    del plan_dict["parallel"]["tp"]
    path, err = bad(write_plan, plan_dict)
    assert str(path) in str(err)
    assert issue_paths(err) == ["parallel.tp"]
    assert "missing" in str(err)


def test_missing_section(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    del plan_dict["hardware"]
    _, err = bad(write_plan, plan_dict)
    assert issue_paths(err) == ["hardware"]


def test_several_problems_all_reported(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan_dict["parallel"]["tp"] = 0
    plan_dict["hardware"]["num_nodes"] = -1
    _, err = bad(write_plan, plan_dict)
    assert sorted(issue_paths(err)) == ["hardware.num_nodes", "parallel.tp"]
    assert "2 problems" in str(err)


def test_unknown_model_preset(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan_dict["model"]["preset"] = "mixtral-8x7"
    path, err = bad(write_plan, plan_dict)
    assert str(path) in str(err)
    assert issue_paths(err) == ["model.preset"]
    assert "'mixtral-8x7'" in str(err)
    assert "did you mean 'mixtral-8x7b'" in str(err)
    assert "deepseek-v3" in err.issues[0].valid


def test_unknown_gpu_preset(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan_dict["hardware"]["gpu"] = "H100"
    _, err = bad(write_plan, plan_dict)
    assert issue_paths(err) == ["hardware.gpu"]
    assert "'H100'" in str(err)
    assert "did you mean 'H100-SXM'" in str(err)
    assert "H200" in err.issues[0].valid


def test_unknown_gpu_no_hint(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan_dict["hardware"]["gpu"] = "TPUv5"
    _, err = bad(write_plan, plan_dict)
    assert issue_paths(err) == ["hardware.gpu"]
    assert "did you mean" not in str(err)
    assert "H100-SXM" in str(err)  # the valid names are listed


def test_bad_literal(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan_dict["parallel"]["schedule"] = "1f2b"
    _, err = bad(write_plan, plan_dict)
    assert issue_paths(err) == ["parallel.schedule"]
    assert "'1f2b'" in str(err)
    for valid in ("gpipe", "1f1b", "interleaved"):
        assert valid in str(err)


def test_top_k_above_num_experts(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan_dict["model"]["moe"] = {"top_k": 10}
    _, err = bad(write_plan, plan_dict)
    assert issue_paths(err) == ["model.moe"]
    assert "top_k (10)" in str(err) and "num_experts (8)" in str(err)


def test_length_spec_incomplete(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan_dict["workload"] = {"seq_len": {"dist": "uniform", "min": 128}}
    _, err = bad(write_plan, plan_dict)
    assert issue_paths(err) == ["workload.seq_len"]
    assert "uniform" in str(err) and "max" in str(err)


def test_length_spec_min_above_max(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan_dict["workload"] = {"seq_len": {"dist": "uniform", "min": 500, "max": 5}}
    _, err = bad(write_plan, plan_dict)
    assert issue_paths(err) == ["workload.seq_len"]
    assert "500" in str(err) and "5" in str(err)


def test_union_field_path_has_no_pydantic_tags(
    plan_dict: dict[str, Any], write_plan: WritePlan
) -> None:
    plan_dict["claims"] = {"layers_per_stage": "abc"}
    _, err = bad(write_plan, plan_dict)
    assert issue_paths(err) == ["claims.layers_per_stage"]
    plan_dict["claims"] = {"layers_per_stage": [8, "x"]}
    _, err = bad(write_plan, plan_dict)
    assert "claims.layers_per_stage.1" in issue_paths(err)
    assert all("[" not in p and "constrained" not in p for p in issue_paths(err))


@pytest.mark.parametrize("item", ["parallel.tp", "=4", " =4"])
def test_bad_set_syntax(plan_dict: dict[str, Any], write_plan: WritePlan, item: str) -> None:
    path = write_plan(plan_dict)
    err = plan_error(path, [item])
    assert str(path) in str(err)
    assert issue_paths(err) == ["--set"]
    assert "PATH=VALUE" in str(err)


def test_override_to_bad_value_names_field(
    plan_dict: dict[str, Any], write_plan: WritePlan
) -> None:
    err = plan_error(write_plan(plan_dict), ["parallel.tp=four"])
    assert issue_paths(err) == ["parallel.tp"]


def test_empirical_missing_file(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan_dict["workload"] = {"seq_len": {"dist": "empirical", "file": "nope.csv", "column": "x"}}
    path, err = bad(write_plan, plan_dict)
    assert str(path) in str(err)
    assert issue_paths(err) == ["workload.seq_len.file"]
    assert "nope.csv" in str(err) and "not found" in str(err)


def test_empirical_missing_column(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan_dict["workload"] = {
        "seq_len": {"dist": "empirical", "file": str(DATA_DIR / "lengths.csv"), "column": "tokens"}
    }
    _, err = bad(write_plan, plan_dict)
    assert issue_paths(err) == ["workload.seq_len.file"]
    assert "'tokens'" in str(err)
    assert "prompt_tokens" in str(err)  # the columns that exist are listed


def test_empirical_bad_values(plan_dict: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("n\n10\n0\n")
    plan_dict["workload"] = {"seq_len": {"dist": "empirical", "file": "l.csv", "column": "n"}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan_dict))
    err = plan_error(path)
    assert issue_paths(err) == ["workload.seq_len.file"]
    assert "positive" in str(err)


def test_empirical_without_column(plan_dict: dict[str, Any], write_plan: WritePlan) -> None:
    plan_dict["workload"] = {"seq_len": {"dist": "empirical", "file": "x.csv"}}
    _, err = bad(write_plan, plan_dict)
    assert issue_paths(err) == ["workload.seq_len"]
    assert "column" in str(err)


def test_plan_from_dict_source_in_message(plan_dict: dict[str, Any]) -> None:
    plan_dict["parallel"]["pp"] = 0
    with pytest.raises(PlanError) as info:
        plan_from_dict(plan_dict, "my-source")
    assert str(info.value).startswith("my-source: parallel.pp")
    assert info.value.source == "my-source"

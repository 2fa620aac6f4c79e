"""Loading a plan: read YAML/JSON, merge presets, apply ``--set`` overrides, validate.

Every failure becomes a :class:`PlanError` naming the file, the field path, the bad value and
what is valid. Nothing here prints or exits.
"""

from __future__ import annotations

import copy
import json
import typing
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from clustersim.spec.calibration_data import calibration_data, calibration_generations
from clustersim.spec.errors import PlanError, PlanIssue, did_you_mean
from clustersim.spec.presets import DEFAULT_GENERATION, GPU_GENERATION, GPU_PRESETS, MODEL_PRESETS
from clustersim.spec.schema import Plan

DEFAULT_PLAN_SOURCE = "<default plan: Mixtral-8x7B on 16 x H100-SXM>"


def default_plan_text() -> str:
    """The YAML text of the embedded default plan."""
    return resources.files("clustersim.spec").joinpath("default_plan.yaml").read_text()


def load_plan(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Plan:
    """Load and validate a plan file (or the embedded default when ``path`` is None)."""
    if path is None:
        source, base_dir = DEFAULT_PLAN_SOURCE, Path.cwd()
        raw = _parse(default_plan_text(), source, ".yaml")
    else:
        source, base_dir = str(path), Path(path).resolve().parent
        raw = _parse(_read(Path(path)), source, Path(path).suffix.lower())
    raw = apply_overrides(raw, overrides, source)
    return plan_from_dict(raw, source, base_dir)


def plan_from_dict(raw: dict[str, Any], source: str, base_dir: Path | None = None) -> Plan:
    """Validate a plan given as nested dicts (presets not yet merged)."""
    resolved = _merge_presets(copy.deepcopy(raw), source)
    _resolve_length_files(resolved, base_dir or Path.cwd(), source)
    _resolve_request_trace(resolved, base_dir or Path.cwd())
    try:
        return Plan.model_validate(resolved)
    except ValidationError as exc:
        raise PlanError(source, _issues_from_pydantic(exc.errors())) from None


def _read(path: Path) -> str:
    if not path.exists():
        raise PlanError(str(path), "file not found")
    if path.is_dir():
        raise PlanError(str(path), "is a directory, expected a YAML or JSON plan file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(str(path), f"cannot read file: {exc}") from None


def _parse(text: str, source: str, suffix: str) -> dict[str, Any]:
    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise PlanError(source, f"malformed JSON at {where}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PlanError(source, f"malformed YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise PlanError(source, f"the plan must be a mapping of sections, but the file is {kind}")
    return data


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], source: str) -> dict[str, Any]:
    """Apply ``path.to.field=value`` overrides; values are parsed as YAML scalars."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path.strip():
            issue = PlanIssue("--set", "expected PATH=VALUE", item, "e.g. parallel.tp=4")
            raise PlanError(source, [issue])
        node = raw
        keys = path.strip().split(".")
        for key in keys[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = node[key] = {}
            node = child
        try:
            node[keys[-1]] = yaml.safe_load(text)
        except yaml.YAMLError:
            node[keys[-1]] = text
    return raw


def _lookup_preset(name: Any, table: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    by_lower = {k.lower(): v for k, v in table.items()}
    return by_lower.get(str(name).lower())


def _merge_presets(raw: dict[str, Any], source: str) -> dict[str, Any]:
    model = raw.get("model")
    if isinstance(model, dict) and model.get("preset") is not None:
        name = model["preset"]
        preset = _lookup_preset(name, MODEL_PRESETS)
        if preset is None:
            raise PlanError(source, [_unknown_preset("model.preset", name, MODEL_PRESETS)])
        model = _deep_merge(preset, model)
        model.setdefault("name", str(name))
        raw["model"] = model
    hardware = raw.get("hardware")
    if isinstance(hardware, dict) and "gpu" in hardware:
        preset = _lookup_preset(hardware["gpu"], GPU_PRESETS)
        if preset is not None:
            raw["hardware"] = _deep_merge(preset, hardware)
        elif not all(k in hardware for k in ("memory_gib", "peak_tflops", "hbm_bandwidth_gbps")):
            raise PlanError(source, [_unknown_preset("hardware.gpu", hardware["gpu"], GPU_PRESETS)])
    if isinstance(raw.get("hardware"), dict):
        raw["hardware"] = _merge_calibration(raw["hardware"], source)
    return raw


def _merge_calibration(hardware: dict[str, Any], source: str) -> dict[str, Any]:
    """Fill ``hardware.calibration`` from its generation's data file; the plan's own
    calibration fields override the file's."""
    given = hardware.get("calibration")
    if given is not None and not isinstance(given, dict):
        return hardware  # the schema reports the wrong type
    given = given or {}
    generation = given.get("generation")
    if generation is None:
        by_lower = {k.lower(): v for k, v in GPU_GENERATION.items()}
        generation = by_lower.get(str(hardware.get("gpu")).lower(), DEFAULT_GENERATION)
    data = calibration_data(str(generation))
    if data is None:
        issue = PlanIssue("hardware.calibration.generation", "unknown calibration data set",
                          generation, ", ".join(calibration_generations()))  # fmt: skip
        raise PlanError(source, [issue])
    out = dict(hardware)
    out["calibration"] = _deep_merge(data, {**given, "generation": str(generation)})
    return out


def _unknown_preset(path: str, name: Any, table: dict[str, Any]) -> PlanIssue:
    hint = did_you_mean(str(name), table)
    message = "unknown preset" + (f", {hint}" if hint else "")
    return PlanIssue(path, message, name, ", ".join(table))


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _length_specs(raw: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    workload = raw.get("workload")
    if not isinstance(workload, dict):
        return []
    found = [("workload.seq_len", workload.get("seq_len"))]
    requests = workload.get("requests")
    if isinstance(requests, dict):
        found += [(f"workload.requests.{k}", requests.get(k)) for k in ("prompt_len", "output_len")]
    return [(p, s) for p, s in found if isinstance(s, dict) and s.get("dist") == "empirical"]


def _resolve_length_files(raw: dict[str, Any], base_dir: Path, source: str) -> None:
    """Make empirical length files absolute and fill in their ``min``/``max`` if absent."""
    from clustersim.spec.lengths import read_lengths

    for path, spec in _length_specs(raw):
        if not isinstance(spec.get("file"), str) or not isinstance(spec.get("column"), str):
            continue  # the schema reports what is missing
        file = Path(spec["file"])
        file = file if file.is_absolute() else (base_dir / file).resolve()
        spec["file"] = str(file)
        try:
            lengths = read_lengths(file, spec["column"])
        except ValueError as exc:
            raise PlanError(source, [PlanIssue(f"{path}.file", str(exc), str(file))]) from None
        spec.setdefault("min", int(lengths.min()))
        spec.setdefault("max", int(lengths.max()))


def _resolve_request_trace(raw: dict[str, Any], base_dir: Path) -> None:
    """Make ``workload.requests.trace`` absolute, relative to the plan file (as length files)."""
    workload = raw.get("workload")
    requests = workload.get("requests") if isinstance(workload, dict) else None
    if isinstance(requests, dict) and isinstance(requests.get("trace"), str):
        file = Path(requests["trace"])
        requests["trace"] = str(file if file.is_absolute() else (base_dir / file).resolve())


def _issues_from_pydantic(errors: list[Any]) -> list[PlanIssue]:
    """One issue per field: a union field fails once per member, so merge those messages."""
    merged: dict[str, PlanIssue] = {}
    for err in errors:
        issue = _issue_from_pydantic(err)
        if issue.path in merged:
            first = merged[issue.path]
            value = first.value if first.value is not None else issue.value
            message = f"{first.message}, or {issue.message}"
            issue = PlanIssue(issue.path, message, value, first.valid or issue.valid)
        merged[issue.path] = issue
    return list(merged.values())


def _field_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """``loc`` without pydantic's union-member tags (``list[constrained-int]`` and the like)."""
    out: list[Any] = []
    cls: type[BaseModel] | None = Plan
    for part in loc:
        if isinstance(part, int):
            out.append(part)
        elif cls is not None:
            out.append(part)  # a field, or an unknown key (always the last part)
            field = cls.model_fields.get(str(part))
            cls = _model_in(field.annotation) if field else None
        # else: below a non-model field, strings are union tags, not fields
    return tuple(out)


def _issue_from_pydantic(err: Any) -> PlanIssue:
    loc = _field_loc(tuple(err["loc"]))
    path = ".".join(str(p) for p in loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        fields = _fields_at(loc[:-1])
        hint = did_you_mean(str(loc[-1]), fields)
        message = "unknown key" + (f", {hint}" if hint else "")
        return PlanIssue(path, message, None, ", ".join(sorted(fields)))
    if kind == "missing":
        return PlanIssue(path, "required field is missing")
    message = err["msg"].removeprefix("Value error, ")
    message = message[0].lower() + message[1:] if message else message
    value = err.get("input")
    if isinstance(value, dict | list):
        value = None
    return PlanIssue(path, message, value)


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the schema model found at ``loc`` (for did-you-mean hints)."""
    cls: type[BaseModel] | None = Plan
    for part in loc:
        if cls is None:
            return []
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(str(part))
        cls = _model_in(field.annotation) if field else None
    return list(cls.model_fields) if cls else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found:
            return found
    return None

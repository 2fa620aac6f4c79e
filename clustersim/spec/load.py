"""Loading a plan: read YAML/JSON, merge presets, apply ``--set`` overrides, validate.

Every failure becomes a :class:`PlanError` naming the file, the field path, the bad value and
what is valid. Nothing here prints or exits.
"""

from __future__ import annotations

import copy
import json
import math
import re
import typing
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from clustersim.spec.calibration_data import calibration_data, calibration_generations
from clustersim.spec.errors import PlanError, PlanIssue, did_you_mean, suggest_key
from clustersim.spec.files import DATA_MAX_BYTES, PLAN_MAX_BYTES, check_input_file, read_input_text
from clustersim.spec.presets import (
    DEFAULT_FP8_RECIPE,
    DEFAULT_GENERATION,
    GPU_GENERATION,
    GPU_PRESETS,
    MODEL_PRESETS,
    TOPOLOGY_PRESETS,
)
from clustersim.spec.schema import Plan

DEFAULT_PLAN_SOURCE = "<default plan: Mixtral-8x7B on 16 x H100-SXM>"

MAX_DEPTH = 32
"""Deepest nesting of mappings and lists in a plan (real plans nest 4 levels)."""


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
    _resolve_request_trace(resolved, base_dir or Path.cwd(), source)
    derived = _derive_dp(resolved, source) | _default_fp8_recipe(resolved)
    try:
        plan = Plan.model_validate(resolved)
    except ValidationError as exc:
        issues = _issues_from_pydantic(exc.errors())
        raise PlanError(source, _missing_model_preset(raw, issues) + issues) from None
    plan._derived = derived
    return plan


def _missing_model_preset(raw: dict[str, Any], issues: list[PlanIssue]) -> list[PlanIssue]:
    """Without ``model.preset`` every model field must be given: when some are missing, say
    so on the preset field (the one a user left out or set to null) before listing them."""
    model = raw.get("model")
    if not isinstance(model, dict) or model.get("preset") is not None:
        return []
    missing = [i for i in issues if i.path.startswith("model.") and "missing" in i.message]
    if not missing:
        return []
    names = ", ".join(sorted(MODEL_PRESETS))
    message = "not set, so the model's size fields must all be given"
    return [PlanIssue("model.preset", message, None, f"a preset name: {names}")]


def _derive_dp(raw: dict[str, Any], source: str) -> dict[str, str]:
    """``parallel.dp`` left out: the GPUs of the cluster over TP x CP x PP (refused when they
    do not divide). Returns the derived fields with how they were derived."""
    par, hw = raw.get("parallel"), raw.get("hardware")
    if not isinstance(par, dict) or "dp" in par or not isinstance(hw, dict):
        return {}
    if "prefill" in par or "decode" in par:  # disaggregated: each pool states its own dp
        return {}
    try:
        gpus = int(hw["num_nodes"]) * int(hw["gpus_per_node"])
        model_parallel = int(par.get("tp", 1)) * int(par.get("cp", 1)) * int(par.get("pp", 1))
    except (KeyError, TypeError, ValueError):
        return {}  # the schema reports what is missing or malformed
    if model_parallel <= 0 or gpus <= 0:
        return {}
    if gpus % model_parallel:
        issue = PlanIssue(
            "parallel.dp",
            f"required field is missing, and the {gpus} GPUs of the cluster are not a "
            f"multiple of TP x CP x PP = {model_parallel} to derive it",
            None,
            "set parallel.dp, or a cluster of a multiple of TP x CP x PP GPUs",
        )
        raise PlanError(source, [issue])
    par["dp"] = gpus // model_parallel
    return {"parallel.dp": f"derived as {gpus} GPUs / (TP x CP x PP = {model_parallel})"}


def _read(path: Path) -> str:
    """The text of a plan file: a regular file (never a FIFO or device: checked before it is
    opened) of at most ``PLAN_MAX_BYTES``, UTF-8."""
    try:
        return read_input_text(path, PLAN_MAX_BYTES, "a YAML or JSON plan file")
    except ValueError as exc:
        raise PlanError(str(path), str(exc)) from None


_TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep"


class _PlanLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe YAML loader (C parser when available); ``_parse`` composes the node tree first
    to refuse duplicate keys and deep nesting before any Python object is built."""


class _DuplicateKey(Exception):
    def __init__(self, key: str, lines: list[int]):
        self.key, self.lines = key, lines


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key, [])
        out[key] = value
    return out


def _parse(text: str, source: str, suffix: str) -> dict[str, Any]:
    try:
        if suffix == ".json":
            data = json.loads(text, object_pairs_hook=_json_pairs)
            _check_depth(data, source)
        else:
            data = _load_yaml(text, source)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise PlanError(source, f"malformed JSON at {where}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PlanError(source, f"malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise PlanError(source, f"malformed plan: {_TOO_DEEP}") from None
    except _DuplicateKey as exc:
        pattern = re.compile(r'"' + re.escape(json.dumps(exc.key)[1:-1]) + r'"\s*:')
        lines = [text.count("\n", 0, m.start()) + 1 for m in pattern.finditer(text)]
        raise PlanError(source, [_duplicate_issue(exc.key, lines)]) from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise PlanError(source, f"the plan must be a mapping of sections, but the file is {kind}")
    return data


def _duplicate_issue(path: str, lines: list[int]) -> PlanIssue:
    where = f" (lines {', '.join(map(str, lines))})" if len(lines) > 1 else ""
    return PlanIssue(path, f"duplicate key{where}: a repeated key would silently replace the "
                     f"first", None, "each key once per mapping")  # fmt: skip


def _load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (with their lines) and nesting deeper than
    ``MAX_DEPTH`` (PlanError naming the key path)."""
    loader = _PlanLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_nodes(root: yaml.Node, source: str) -> None:
    """Walk the composed YAML nodes (iteratively; a node shared through an alias once)."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str, int]] = [(root, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if id(node) in seen or not isinstance(node, yaml.CollectionNode):
            continue
        seen.add(id(node))
        if depth >= MAX_DEPTH:
            raise PlanError(source, [PlanIssue(path, _TOO_DEEP)])
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, _join(path, i), depth + 1) for i, child in enumerate(node.value))
            continue
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if (key.tag, key.value) in first:
                    issue = _duplicate_issue(_join(path, name), [first[key.tag, key.value], line])
                    raise PlanError(source, [issue])
                first[key.tag, key.value] = line
            stack.append((key, _join(path, name), depth + 1))
            stack.append((value, _join(path, name), depth + 1))


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _check_depth(data: Any, source: str) -> None:
    """Refuse nesting deeper than ``MAX_DEPTH`` (iteratively; a shared object once)."""
    seen: set[int] = set()
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if not isinstance(node, dict | list) or id(node) in seen:
            continue
        seen.add(id(node))
        if depth >= MAX_DEPTH:
            raise PlanError(source, [PlanIssue(path, _TOO_DEEP)])
        items = node.items() if isinstance(node, dict) else enumerate(node)
        stack.extend((value, _join(path, key), depth + 1) for key, value in items)


def _override_value(text: str) -> Any:
    """An override's value, parsed as YAML (its text when it is not valid YAML)."""
    try:
        return _load_yaml(text, "--set")
    except (yaml.YAMLError, RecursionError):
        return text


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
            node[keys[-1]] = _override_value(text)
        except PlanError as exc:
            issue = PlanIssue(f"--set {path.strip()}", exc.issues[0].render(), text)
            raise PlanError(source, [issue]) from None
    _check_depth(raw, source)
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
        topology = raw["hardware"].get("topology")
        if isinstance(topology, str):
            preset = _lookup_preset(topology, TOPOLOGY_PRESETS)
            if preset is None:
                issue = _unknown_preset("hardware.topology", topology, TOPOLOGY_PRESETS)
                raise PlanError(source, [issue])
            raw["hardware"] = {**raw["hardware"], "topology": dict(preset)}
    return raw


def _default_fp8_recipe(raw: dict[str, Any]) -> dict[str, str]:
    """``model.dtype: fp8`` without ``model.fp8_recipe``: the GPU architecture's default
    (blockwise on Hopper, mxfp8 on Blackwell); the schema refuses GPUs without FP8. Returns
    the derived field with how it was derived."""
    model, hardware = raw.get("model"), raw.get("hardware")
    if not isinstance(model, dict) or not isinstance(hardware, dict):
        return {}
    if model.get("dtype") == "fp8" and model.get("fp8_recipe") is None:
        arch = str(hardware.get("architecture"))
        recipe = DEFAULT_FP8_RECIPE.get(arch)
        if recipe is not None and hardware.get("fp8_peak_tflops") is not None:
            model["fp8_recipe"] = recipe
            return {"model.fp8_recipe": f"the default FP8 recipe of {arch} GPUs"}
    return {}


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


def _resolve_request_trace(raw: dict[str, Any], base_dir: Path, source: str) -> None:
    """Make ``workload.requests.trace`` absolute, relative to the plan file (as length files);
    with ``arrival: trace``, refuse one that is not a regular file or too large (its rows are
    read and checked when the requests are made; a missing file is an audit finding)."""
    workload = raw.get("workload")
    requests = workload.get("requests") if isinstance(workload, dict) else None
    if isinstance(requests, dict) and isinstance(requests.get("trace"), str):
        file = Path(requests["trace"])
        file = file if file.is_absolute() else (base_dir / file).resolve()
        requests["trace"] = str(file)
        if requests.get("arrival") == "trace" and file.exists():  # missing: an audit finding
            try:
                check_input_file(file, DATA_MAX_BYTES, "a CSV or Arrow request trace")
            except ValueError as exc:
                issue = PlanIssue("workload.requests.trace", str(exc), str(file))
                raise PlanError(source, [issue]) from None


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
        hint = suggest_key(str(loc[-1]), fields)
        message = "unknown key" + (f", {hint}" if hint else "")
        return PlanIssue(path, message, None, ", ".join(sorted(fields)))
    if kind == "missing":
        return PlanIssue(path, "required field is missing")
    message = err["msg"].removeprefix("Value error, ")
    message = message[0].lower() + message[1:] if message else message
    value = err.get("input")
    if isinstance(value, dict | list):
        value = None
    valid = _valid_range(loc) if kind in _RANGE_ERRORS else ""
    return PlanIssue(path, message, value, valid)


_RANGE_ERRORS = frozenset(("greater_than", "greater_than_equal", "less_than", "less_than_equal",
                           "finite_number", "int_parsing", "int_from_float", "int_type",
                           "float_parsing", "float_type"))  # fmt: skip


def _valid_range(loc: tuple[Any, ...]) -> str:
    """The valid values of the number at ``loc``, from the schema's bounds: ``an integer >= 1
    and <= 1048576``, ``a finite number > 0 and <= 1``."""
    cls: type[BaseModel] | None = Plan
    annotation: Any = None
    info = None
    for part in loc:
        if isinstance(part, int):
            annotation, info = _list_item(annotation), None
            continue
        if cls is None:
            return ""
        info = cls.model_fields.get(str(part))
        if info is None:
            return ""
        annotation = info.annotation
        cls = _model_in(annotation)
    bounds: dict[str, float] = {}
    _collect_bounds(list(info.metadata) if info else [], bounds)
    _collect_bounds([annotation], bounds)
    integer = int in _scalar_types(annotation)
    parts = [f"{op} {_number(bounds[key])}" for key, op in
             (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if key in bounds]  # fmt: skip
    what = "an integer" if integer else "a finite number"
    return f"{what} {' and '.join(parts)}" if parts else what


def _list_item(annotation: Any) -> Any:
    """The item type of the ``list[...]`` in ``annotation`` (None if there is none)."""
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0]
    for arg in typing.get_args(annotation):
        found = _list_item(arg)
        if found is not None:
            return found
    return None


def _collect_bounds(items: list[Any], bounds: dict[str, float]) -> None:
    """Bounds (gt, ge, lt, le) of constraint objects and ``Annotated``/union types, not looking
    inside lists (their items have their own)."""
    for item in items:
        for key in ("gt", "ge", "lt", "le"):
            value = getattr(item, key, None)
            if isinstance(value, int | float) and not isinstance(value, bool):
                bounds.setdefault(key, value)
        if hasattr(item, "metadata") and not isinstance(item, type):
            _collect_bounds(list(item.metadata), bounds)
        if typing.get_origin(item) is not list:
            _collect_bounds(list(typing.get_args(item)), bounds)


def _scalar_types(annotation: Any) -> set[type]:
    if isinstance(annotation, type):
        return {annotation}
    if typing.get_origin(annotation) is list:
        return set()
    out: set[type] = set()
    for arg in typing.get_args(annotation):
        out |= _scalar_types(arg)
    return out


def _number(value: float) -> str:
    if isinstance(value, int) or (
        math.isfinite(value) and value == int(value) and abs(value) < 1e7
    ):
        return str(int(value))
    return f"{value:g}"


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

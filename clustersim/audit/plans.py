"""Plan differences: the one flattener and the one plan diff (``compare`` and ``replay``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clustersim.spec.schema import Plan


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict keyed by dotted paths (``parallel.tp``); lists are values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def plan_differences(plans: Sequence[Plan]) -> list[dict[str, Any]]:
    """Input fields (dotted paths, in first-seen order) whose values differ between the plans:
    ``{"field", "values"}`` with one value per plan."""
    flats = [flatten(p.model_dump(mode="json", exclude_none=False)) for p in plans]
    keys: dict[str, None] = {}
    for flat in flats:
        keys.update(dict.fromkeys(flat))
    out = []
    for k in keys:
        values = [flat.get(k) for flat in flats]
        if any(v != values[0] for v in values[1:]):
            out.append({"field": k, "values": values})
    return out


def plan_changes(recorded: Plan, new: Plan) -> list[dict[str, Any]]:
    """Every field that differs from a recorded plan, sorted: ``{"field", "recorded", "new"}``."""
    return [
        {"field": d["field"], "recorded": d["values"][0], "new": d["values"][1]}
        for d in sorted(plan_differences([recorded, new]), key=lambda d: d["field"])
    ]

"""Findings: one problem in a plan, with where it is, what was claimed, what is right, the fix."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One audit result. ``node`` is the plan path (``parallel.ep``, ``claims.experts_per_gpu``)."""

    node: str
    severity: Severity
    message: str
    fix: str = ""
    claimed: Any = None
    computed: Any = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form, keys as in the output contract."""
        return asdict(self)

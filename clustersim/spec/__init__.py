"""Plan specification: schema, presets and loading with clear errors."""

from clustersim.spec.errors import PlanError, PlanIssue
from clustersim.spec.load import load_plan, plan_from_dict
from clustersim.spec.schema import Plan

__all__ = ["Plan", "PlanError", "PlanIssue", "load_plan", "plan_from_dict"]

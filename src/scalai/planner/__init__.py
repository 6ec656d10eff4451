"""Planning: pure computation of the copies between two deployments of the job state."""

from .identity import identity_plan
from .plan import Copy, Deployment, Plan, PlanStats, Window
from .planner import check_coverage, make_plan

__all__ = ["make_plan", "identity_plan", "check_coverage", "Plan", "PlanStats", "Copy", "Window", "Deployment"]

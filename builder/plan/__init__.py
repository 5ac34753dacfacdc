"""The planner: which TP x PP x EP x attention-DP layout to run a model with on a cluster, and how well it runs.

``plan_cluster(...)`` is the API; ``builder.stages.plan`` and ``dsbuild plan`` are thin callers.
"""

from builder.plan.result import LayoutPlan, PlanResult, Workload
from builder.plan.search import plan_cluster

__all__ = ["LayoutPlan", "PlanResult", "Workload", "plan_cluster"]

"""The planner: which TP x PP x EP x attention-DP layout to run a model with on a cluster, and how well it runs.

``builder.plan.search.plan_cluster(...)`` is the API; ``builder.stages.plan`` and ``dsbuild plan`` are thin callers.
The package imports nothing itself, so its light modules (the GPU and network table in ``hardware``) load without
the search's dependencies.
"""

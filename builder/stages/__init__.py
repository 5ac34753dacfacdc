"""The pipeline's stages, in order. Only this package knows the run-directory layout."""

from __future__ import annotations

from builder.pipeline import Stage


def all_stages() -> list[Stage]:
    from builder.stages import build, fetch, package, plan, quantize

    return [plan.STAGE, fetch.STAGE, quantize.STAGE, build.STAGE, package.STAGE]


def stages_through(name: str) -> list[Stage]:
    stages = all_stages()
    names = [s.name for s in stages]
    return stages[: names.index(name) + 1]

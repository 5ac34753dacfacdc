"""The pipeline's stages, in order, for a spec: plan, fetch, quantize, (draft-fetch, draft-quantize with
``--spec draft``), build, package. Their output directories are ``builder.rundir``'s."""

from __future__ import annotations

from builder.pipeline import Stage
from builder.specs import RunSpec
from builder.stages import build, draft, fetch, package, plan, quantize

STAGE_NAMES = ("plan", "fetch", "quantize", draft.DRAFT_FETCH.name, draft.DRAFT_QUANTIZE.name, "build", "package")


def all_stages(spec: RunSpec) -> list[Stage]:
    drafts = [draft.DRAFT_FETCH, draft.DRAFT_QUANTIZE] if spec.spec == "draft" else []
    return [plan.STAGE, fetch.STAGE, quantize.STAGE, *drafts, build.stage(spec), package.STAGE]


def stages_through(spec: RunSpec, name: str) -> list[Stage]:
    stages = all_stages(spec)
    names = [s.name for s in stages]
    return stages[: names.index(name) + 1]

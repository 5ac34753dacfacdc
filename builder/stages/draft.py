"""The draft model of ``--spec draft`` as an input of the pipeline like the target: the fetch and quantize stages'
own code, run on a view of the spec with the draft model in the model's place, into ``draft-weights/`` and
``draft-quantized/`` (the HF-layout checkpoint TensorRT-LLM's ``speculative_model`` loads). The build stage lays
out its reference-engine bundle.
"""

from __future__ import annotations

from dataclasses import replace

from builder.rundir import DRAFT_QUANTIZED, DRAFT_WEIGHTS
from builder.specs import RunSpec
from builder.stages import fetch, quantize


def draft_spec(spec: RunSpec) -> RunSpec:
    """The run spec with the draft model in the model's place (the target's revision, include/exclude patterns and
    --skip-mtp do not apply to it)."""
    return spec.model_copy(update={"model": spec.draft_model, "revision": "main", "include": [], "exclude": [],
                                   "skip_mtp": False})


DRAFT_FETCH = replace(fetch.STAGE, name="draft-fetch", output=DRAFT_WEIGHTS, spec_view=draft_spec, fields_of="fetch")
DRAFT_QUANTIZE = replace(quantize.STAGE, name="draft-quantize", output=DRAFT_QUANTIZED, upstream=(DRAFT_FETCH.name,),
                         spec_view=draft_spec, fields_of="quantize", inputs_as={DRAFT_FETCH.name: "fetch"})

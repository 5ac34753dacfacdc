"""quantize stage: the checkpoint in the requested weight format, in ``quantized/`` (logic in ``quantize.modes``)."""

from __future__ import annotations

from typing import Any

from builder.model.tokenizer import corpus_sha256
from builder.pipeline import Stage, StageContext
from builder.rundir import QUANTIZED
from quantize.modes import QuantJob, quantize

VERSION = "2"


def run(ctx: StageContext) -> dict[str, Any]:
    spec = ctx.spec
    return quantize(QuantJob(src=ctx.inputs["fetch"], out=ctx.out, mode=spec.quant, kv_cache_dtype=spec.kv_cache_dtype,
                             gpu=spec.gpu, hardware_file=spec.hardware_file, calib_size=spec.calib_size, calib_seq_len=spec.calib_seq_len, log=ctx.log))


def key_inputs(spec, upstream: dict[str, Any]) -> dict[str, Any]:
    """Every mode's report, and the calibrating modes' output, depend on the calibration corpus's text."""

    return {"corpus": corpus_sha256()}


STAGE = Stage(name="quantize", version=VERSION, output=QUANTIZED, upstream=("fetch",), run=run,
              tools=("torch", "safetensors", "nvidia-modelopt", "transformers"), key_inputs=key_inputs,
              describe=lambda spec, extra: f"quantize to {spec.quant}")

"""quantize stage: the checkpoint in the requested weight format, in ``quantized/`` (logic in ``quantize.modes``)."""

from __future__ import annotations

import hashlib
from typing import Any

from builder.errors import SpecError
from builder.model.tokenizer import corpus_sha256
from builder.pipeline import Stage, StageContext
from builder.rundir import QUANTIZED
from quantize.modes import QuantJob, quantize

VERSION = "3"  # 3: nvfp4 keeps the MLA projections and the indexer BF16 (ModelOpt's DeepSeek recipe)


def run(ctx: StageContext) -> dict[str, Any]:
    spec = ctx.spec
    return quantize(QuantJob(src=ctx.inputs["fetch"], out=ctx.out, mode=spec.quant, kv_cache_dtype=spec.kv_cache_dtype,
                             gpu=spec.gpu, hardware_file=spec.hardware_file, calib_size=spec.calib_size,
                             calib_seq_len=spec.calib_seq_len, act_scales=spec.act_scales, log=ctx.log))


def key_inputs(spec, upstream: dict[str, Any]) -> dict[str, Any]:
    """Every mode's report, and the calibrating modes' output, depend on the calibration corpus's text; w4afp8 with
    --act-scales on that file's bytes (the path alone would not notice a new file at the same place)."""

    out = {"corpus": corpus_sha256()}
    if spec.act_scales is not None:
        try:
            out["act_scales"] = hashlib.sha256(spec.act_scales.read_bytes()).hexdigest()
        except OSError as exc:
            raise SpecError(f"--act-scales {spec.act_scales}: {exc.strerror}") from None
    return out


STAGE = Stage(name="quantize", version=VERSION, output=QUANTIZED, upstream=("fetch",), run=run,
              tools=("torch", "safetensors", "nvidia-modelopt", "transformers"), key_inputs=key_inputs,
              describe=lambda spec, extra: f"quantize to {spec.quant}")

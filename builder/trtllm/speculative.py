"""The ``speculative_config`` block of ``llm_api.yaml`` for the pinned TensorRT-LLM.

Keys and spellings: docs/tensorrt-llm-contract.md#C-LLMARGS-8 (allow-list in
``builder/data/trtllm/1.2.1/llm_args_keys.yaml``):
- MTP: ``decoding_type: MTP``, ``num_nextn_predict_layers: N`` (TensorRT-LLM sets ``max_draft_len`` from it) and
  ``mtp_eagle_one_model: true`` (its default, written out: with a checkpoint of one MTP layer, as DeepSeek-V3.2's,
  the one module drafts all N tokens inside the target's engine, which is what the reference engine does too).
- Draft model: ``decoding_type: DraftTarget`` (the key of ``DecodingBaseConfig.from_dict``'s map; ``Draft_Target``
  is refused as an invalid decoding type), ``max_draft_len: N`` (> 0 required) and ``speculative_model``: the
  draft's HF-layout checkpoint, the run's ``draft-quantized/`` (``builder.rundir``), **relative to the deploy
  directory**. TensorRT-LLM would read a relative path against its working directory and otherwise as a Hub id
  (C-LLMARGS-11), so dsbuild's Triton ``model.py`` makes it absolute under the deploy directory before ``LLM()``
  (``DEPLOY_RELATIVE_PATHS``), and ``trtllm-serve`` is run from the run directory.
"""

from __future__ import annotations

from typing import Any

from builder.errors import SpecError
from builder.model.config import ModelConfig
from builder.rundir import DRAFT_QUANTIZED

DRAFT_DECODING_TYPE = "DraftTarget"
# LLM() arguments that name files, written relative to the deploy directory (as dotted paths into model.yaml).
DEPLOY_RELATIVE_PATHS = ("model", "tokenizer", "speculative_config.speculative_model")


def speculative_config(spec, cfg: ModelConfig) -> dict[str, Any] | None:
    if spec.spec == "none":
        return None
    if spec.spec == "mtp":
        if not cfg.num_nextn_predict_layers:
            raise SpecError(f"--spec mtp needs a model with an MTP module; {cfg.model_type} here has "
                            "num_nextn_predict_layers 0 (use --spec draft with --draft-model)")
        return {"decoding_type": "MTP", "num_nextn_predict_layers": int(spec.draft_len), "mtp_eagle_one_model": True}
    if spec.spec == "draft":
        return {"decoding_type": DRAFT_DECODING_TYPE, "max_draft_len": int(spec.draft_len),
                "speculative_model": DRAFT_QUANTIZED}
    raise SpecError(f"unknown speculative mode {spec.spec!r}")

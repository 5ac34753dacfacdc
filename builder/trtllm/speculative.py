"""The ``speculative_config`` block of ``llm_api.yaml`` for the pinned TensorRT-LLM.

Keys and spellings from NVIDIA/TensorRT-LLM ``tensorrt_llm/llmapi/llm_args.py`` (``MTPDecodingConfig``,
``DraftTargetDecodingConfig``; allow-list in ``builder/data/trtllm/1.2.1/llm_args_keys.yaml`` with its source):
- MTP: ``decoding_type: MTP``, ``num_nextn_predict_layers: N`` (TensorRT-LLM sets ``max_draft_len`` from it) and
  ``mtp_eagle_one_model: true`` (its default, written out: with a checkpoint of one MTP layer, as DeepSeek-V3.2's,
  the one module drafts all N tokens inside the target's engine, which is what the reference engine does too).
- Draft model: ``decoding_type: Draft_Target`` (the 1.2-era spelling; earlier releases said ``DraftTarget``),
  ``max_draft_len: N`` (> 0 required) and ``speculative_model``: the draft's HF-layout checkpoint, the run's
  ``draft-quantized/`` (``builder.rundir``), named relative to the run directory.
"""

from __future__ import annotations

from typing import Any

from builder.errors import SpecError
from builder.model.config import ModelConfig
from builder.rundir import DRAFT_QUANTIZED



def speculative_config(spec, cfg: ModelConfig) -> dict[str, Any] | None:
    if spec.spec == "none":
        return None
    if spec.spec == "mtp":
        if not cfg.num_nextn_predict_layers:
            raise SpecError(f"--spec mtp needs a model with an MTP module; {cfg.model_type} here has "
                            "num_nextn_predict_layers 0 (use --spec draft with --draft-model)")
        return {"decoding_type": "MTP", "num_nextn_predict_layers": int(spec.draft_len), "mtp_eagle_one_model": True}
    if spec.spec == "draft":
        return {"decoding_type": "Draft_Target", "max_draft_len": int(spec.draft_len),
                "speculative_model": DRAFT_QUANTIZED}
    raise SpecError(f"unknown speculative mode {spec.spec!r}")

"""Hook for the ``speculative_config`` block of ``llm_api.yaml`` (filled by the speculative-decoding work).

``speculative_config(spec, cfg)`` returns the block for TensorRT-LLM, or None for no speculative decoding. The
allow-list already admits ``decoding_type: MTP`` (``num_nextn_predict_layers``) and ``Draft_Target``
(``max_draft_len``, ``speculative_model``) for 1.2.1.
"""

from __future__ import annotations

from typing import Any

from builder.model.config import ModelConfig


def speculative_config(spec, cfg: ModelConfig) -> dict[str, Any] | None:
    return None

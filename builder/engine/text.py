"""Prompt text to token ids as the bundle's tokenizer files say (BOS prepended when ``add_bos_token``)."""

from __future__ import annotations

import json

from builder.errors import RequestError
from builder.engine.bundle import EngineBundle


def encode_prompt(bundle: EngineBundle, tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text).ids
    cfg_path = bundle.root / "tokenizer_config.json"
    add_bos = json.loads(cfg_path.read_text()).get("add_bos_token", False) if cfg_path.is_file() else False
    bos = bundle.cfg.raw.get("bos_token_id")
    if add_bos and bos is not None:
        ids = [int(bos)] + ids
    if not ids:
        raise RequestError("the prompt is empty after tokenization")
    return ids

"""What the endpoint needs to know about the served checkpoint, read from the Triton repository dsbuild rendered:
where the tokenizer files are (CPU flavour: ``engine_dir`` in ``config.pbtxt``; GPU flavour: ``tokenizer`` or
``model`` in ``1/model.yaml``), the context length, and the sampling defaults of ``generation_config.json``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import text_format
from tokenizers import Tokenizer
from tritonclient.grpc import model_config_pb2

from builder.errors import ServeError
from builder.model.chat_encoding import ChatEncoding
from triton_repo.interface import MODEL_NAME

# OpenAI's defaults where the checkpoint's generation_config.json says nothing.
OPENAI_TEMPERATURE, OPENAI_TOP_P = 1.0, 1.0


@dataclass(frozen=True)
class ServedModel:
    checkpoint: Path  # tokenizer files, config.json, generation_config.json
    max_seq_len: int | None  # prompt + generated tokens; None when nothing says
    defaults: dict[str, float] = field(default_factory=dict)  # temperature, top_p

    def encoding(self) -> ChatEncoding:
        return ChatEncoding.from_checkpoint(self.checkpoint)

    def tokenizer(self) -> Tokenizer:
        path = self.checkpoint / "tokenizer.json"
        if not path.is_file():
            raise ServeError(f"{path} is missing: the endpoint counts prompt tokens with the checkpoint's tokenizer")
        return Tokenizer.from_file(str(path))


def _parameters(config_pbtxt: Path) -> dict[str, str]:
    cfg = text_format.Parse(config_pbtxt.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
    return {k: v.string_value for k, v in cfg.parameters.items()}


def _context_length(checkpoint: Path, *candidates: Any) -> int | None:
    for value in candidates:
        if value not in (None, "", 0, "0"):
            return int(value)
    config = checkpoint / "config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        data = data.get("model", data)  # an engine bundle's config.json wraps the model config
        if data.get("max_position_embeddings"):
            return int(data["max_position_embeddings"])
    return None


def _defaults(checkpoint: Path) -> dict[str, float]:
    path = checkpoint / "generation_config.json"
    gen = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {"temperature": float(gen.get("temperature", OPENAI_TEMPERATURE)),
            "top_p": float(gen.get("top_p", OPENAI_TOP_P))}


def served_model(repo: Path, *, tokenizer_dir: Path | None = None, model: str = MODEL_NAME) -> ServedModel:
    """The checkpoint behind ``repo/<model>``; ``tokenizer_dir`` overrides where its files are read."""
    model_dir = Path(repo) / model
    if not (model_dir / "config.pbtxt").is_file():
        raise ServeError(f"{repo} is not a dsbuild Triton repository (no {model}/config.pbtxt)")
    params = _parameters(model_dir / "config.pbtxt")
    model_yaml = model_dir / "1" / "model.yaml"
    if "engine_dir" in params:  # CPU flavour
        checkpoint = Path(os.path.normpath(model_dir / params["engine_dir"]))
        declared = params.get("max_seq_len")
    elif model_yaml.is_file():  # GPU flavour: LLM() arguments
        llm = yaml.safe_load(model_yaml.read_text(encoding="utf-8")) or {}
        checkpoint = Path(llm.get("tokenizer") or llm["model"])
        declared = llm.get("max_seq_len")
    else:
        raise ServeError(f"{model_dir} has neither an engine_dir parameter nor 1/model.yaml")
    checkpoint = (Path(tokenizer_dir) if tokenizer_dir else checkpoint).resolve()
    if not checkpoint.is_dir():
        raise ServeError(f"the served checkpoint {checkpoint} is not a directory here; pass --tokenizer DIR")
    return ServedModel(checkpoint, _context_length(checkpoint, declared), _defaults(checkpoint))

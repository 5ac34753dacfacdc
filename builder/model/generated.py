"""Generated models (``tiny``, ``tiny-draft``: the committed trained weights; ``tiny-random``,
``tiny-draft-random``: the seeded random init), made once in the cache and keyed by everything that decides their
bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from builder.model import trained
from builder.model.config import PRESETS, generated_model
from builder.model.tiny import TINY_FORMAT_VERSION, make_tiny
from builder.model.tokenizer import corpus_sha256


def tiny_cache_key(*, seed: int, preset_name: str = "tiny") -> str:
    """Everything that decides the bytes of a generated model: for a trained one the committed weights and
    tokenizer, for a random one the preset, seed and corpus (the tokenizer is trained on it)."""
    preset, is_trained = generated_model(preset_name)
    if is_trained:
        ident = {"trained": trained.builtin_sha256(preset)}
    else:
        ident = {"seed": seed, "corpus": corpus_sha256(), "torch": torch.__version__.split("+")[0]}
    h = hashlib.sha256(json.dumps({"preset": PRESETS[preset], "format": TINY_FORMAT_VERSION, **ident},
                                  sort_keys=True).encode())
    return h.hexdigest()[:16]


def ensure_tiny(cache_root: str | Path, *, seed: int = 0, preset_name: str = "tiny") -> Path:
    """The generated model, made once and reused (keyed by everything that decides its bytes). The trained
    flavours ignore ``seed``: their weights are the committed ones (trained from the seed in their report)."""
    key = tiny_cache_key(seed=seed, preset_name=preset_name)
    preset, is_trained = generated_model(preset_name)
    label = f"{preset}-trained" if is_trained else f"{preset}-seed{seed}"
    path = Path(cache_root) / f"{label}-{key}"
    if not (path / "config.json").is_file():
        if is_trained:
            trained.export_builtin(path, preset)
        else:
            make_tiny(path, seed=seed, preset_name=preset)
    return path

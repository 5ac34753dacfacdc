"""The committed trained tiny models: weights, tokenizer and training report under ``builder/data/trained/``.

``<preset>.safetensors`` holds every tensor as the checkpoint stores it (block FP8 + ``weight_scale_inv``, BF16,
F32), without the MTP layer's copies of the embedding and head; ``<preset>.json`` is the training report (recipe,
corpus sha, held-out perplexities); ``tokenizer.json`` is the tokenizer they were trained with (shared by target
and draft). Exporting dequantizes and hands the weights to ``make_tiny(weights=...)``: re-quantizing a
power-of-two-scaled FP8 value reproduces it, so the exported checkpoint has exactly the committed values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from builder.atomic import atomic_write_json, atomic_write_text
from builder.errors import CheckpointError
from builder.model.catalog import build_catalog
from builder.model.config import tiny_config
from builder.model.safetensors_tensors import write_safetensors
from builder.model.tiny import make_tiny, stored_tensors
from quantize import fp8_block

TRAINED_DIR = Path(__file__).resolve().parent.parent / "data" / "trained"
TOKENIZER_FILE = "tokenizer.json"


def weights_file(preset: str, root: Path = TRAINED_DIR) -> Path:
    return root / f"{preset}.safetensors"


def report_file(preset: str, root: Path = TRAINED_DIR) -> Path:
    return root / f"{preset}.json"


def _require(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the trained tiny model is not in this checkout "
                              "(run `dsbuild make-tiny --train --write-builtin`, or use MODEL=tiny-random)")
    return path


def builtin_sha256(preset: str, root: Path = TRAINED_DIR) -> str:
    h = hashlib.sha256()
    for f in (weights_file(preset, root), root / TOKENIZER_FILE):
        h.update(f.name.encode() + b"\0" + _require(f).read_bytes())
    return h.hexdigest()


def _is_mtp_copy(name: str, num_hidden_layers: int) -> bool:
    parts = name.split(".")
    return (len(parts) > 3 and parts[1] == "layers" and int(parts[2]) >= num_hidden_layers
            and (name.endswith(".embed_tokens.weight") or name.endswith(".shared_head.head.weight")))


def pack(weights: dict[str, torch.Tensor], preset: str) -> dict[str, torch.Tensor]:
    """Float weights -> the tensors the checkpoint stores, MTP copies of the shared embedding/head left out."""
    cfg = tiny_config(preset)
    out: dict[str, torch.Tensor] = {}
    for spec in build_catalog(cfg):
        if spec.is_scale or _is_mtp_copy(spec.name, cfg.num_hidden_layers):
            continue
        out.update(stored_tensors(spec, weights[spec.name].float(), cfg))
    return out


def unpack(stored: dict[str, torch.Tensor], preset: str) -> dict[str, torch.Tensor]:
    """The inverse of ``pack``: name -> float32 tensor for every non-scale tensor of the catalogue."""
    cfg = tiny_config(preset)
    out: dict[str, torch.Tensor] = {}
    for name, t in stored.items():
        if name.endswith(".weight_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            t = fp8_block.dequantize(t, stored[name[: -len("weight")] + "weight_scale_inv"], dtype=torch.float32)
        out[name] = t.float()
    for i in cfg.mtp_layers:
        out[f"model.layers.{i}.embed_tokens.weight"] = out["model.embed_tokens.weight"]
        out[f"model.layers.{i}.shared_head.head.weight"] = out["lm_head.weight"]
    expected = {s.name for s in build_catalog(cfg) if not s.is_scale}
    if set(out) != expected:
        missing = sorted(expected - set(out))
        raise CheckpointError(f"trained weights for {preset} do not match its catalogue "
                              f"(missing {missing[:2]}, extra {sorted(set(out) - expected)[:2]})")
    return out


def load_builtin(preset: str, root: Path = TRAINED_DIR) -> dict[str, torch.Tensor]:
    return unpack(load_file(str(_require(weights_file(preset, root)))), preset)


def load_tokenizer(root: Path = TRAINED_DIR):
    return Tokenizer.from_file(str(_require(root / TOKENIZER_FILE)))


def write_builtin(root: Path, preset: str, weights: dict[str, torch.Tensor], tokenizer, report: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_safetensors(weights_file(preset, root), pack(weights, preset))
    atomic_write_text(root / TOKENIZER_FILE, tokenizer.to_str(pretty=True))
    atomic_write_json(report_file(preset, root), report)


def builtin_report(preset: str, root: Path = TRAINED_DIR) -> dict:
    return json.loads(_require(report_file(preset, root)).read_text())


def export_builtin(out: str | Path, preset: str, root: Path = TRAINED_DIR) -> Path:
    """The committed trained model as a checkpoint in DeepSeek-V3.2's layout (through ``make_tiny``)."""
    return make_tiny(out, preset_name=preset, weights=load_builtin(preset, root), tokenizer=load_tokenizer(root))

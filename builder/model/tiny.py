"""``make-tiny``: a small checkpoint in exactly the layout of ``deepseek-ai/DeepSeek-V3.2``.

Same tensor names (indexer and MTP module included), block-FP8 weights with float32 ``weight_scale_inv``, several
shards named with a six-digit total, ``model.safetensors.index.json``, a byte-level BPE ``tokenizer.json`` and
``generation_config.json``. Deterministic: the same seed gives the same bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from builder.atomic import atomic_write_json, staging_dir
from builder.model.catalog import Dtype, Kind, TensorSpec, build_catalog
from builder.model.config import ModelConfig, tiny_config
from builder.model.safetensors_io import shard_file_name, write_index
from builder.model.safetensors_tensors import TORCH_DTYPES, write_safetensors
from builder.model.tokenizer import train_tokenizer, write_tokenizer_files
from quantize import fp8_block

# Bump when the bytes make-tiny writes for a given seed change: it is part of every cache key of a tiny model.
TINY_FORMAT_VERSION = 3  # 3: the real checkpoint's dtypes (weights_proj BF16)
def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def init_tensor(spec: TensorSpec, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """A float32 value for one (unquantized) tensor; independent of the order tensors are made in."""
    g = _generator(seed, spec.name)
    shape = spec.shape
    if spec.kind in (Kind.NORM, Kind.FINAL_NORM, Kind.MTP_NORM):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if spec.kind is Kind.IDX_K_NORM:
        base = 1.0 if spec.name.endswith(".weight") else 0.0
        return base + 0.1 * torch.randn(shape, generator=g)
    if spec.kind is Kind.ROUTER_BIAS:
        # Non-zero so the bias-corrected expert selection is exercised.
        return 0.5 * torch.randn(shape, generator=g)
    if spec.kind in (Kind.ROUTER, Kind.IDX_WEIGHTS):
        return 0.5 * torch.randn(shape, generator=g) / shape[-1] ** 0.5
    if spec.kind in (Kind.EMBED, Kind.MTP_EMBED):
        return torch.randn(shape, generator=g)
    std = 1.0 / shape[-1] ** 0.5
    return std * torch.randn(shape, generator=g)


def make_tiny(out: str | Path, *, seed: int = 0, preset_name: str = "tiny", overrides: dict[str, Any] | None = None,
              weights: dict[str, torch.Tensor] | None = None, corpus: str | Path | None = None,
              tokenizer=None) -> Path:
    """Write the checkpoint to ``out`` atomically. ``weights`` (name -> float tensor) replaces the random init,
    so a trained model is exported through the same code path; ``tokenizer`` (the one it was trained with)
    replaces a tokenizer trained afresh on ``corpus``."""
    cfg = tiny_config(preset_name, overrides)
    out = Path(out)
    specs = build_catalog(cfg)
    groups = _shard_groups(specs, cfg)
    with staging_dir(out) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        by_name = {s.name: s for s in specs}
        for i, names in enumerate(groups, start=1):
            fname = shard_file_name(i, len(groups))
            tensors: dict[str, torch.Tensor] = {}
            for name in names:
                spec = by_name[name]
                if spec.is_scale:
                    continue
                value = weights[name].float() if weights is not None else init_tensor(spec, cfg, seed)
                tensors.update(stored_tensors(spec, value, cfg))
            for name in tensors:
                weight_map[name] = fname
                total += tensors[name].numel() * tensors[name].element_size()
            write_safetensors(tmp / fname, tensors)
        write_index(tmp, weight_map, total_size=total)
        atomic_write_json(tmp / "config.json", cfg.to_dict())
        atomic_write_json(tmp / "generation_config.json", {
            "_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "do_sample": True,
            "temperature": 0.6, "top_p": 0.95,
        })
        tok = tokenizer if tokenizer is not None else train_tokenizer(vocab_size=cfg.vocab_size, corpus=corpus)
        write_tokenizer_files(tok, tmp, model_max_length=cfg.max_position_embeddings)
    return out


def stored_tensors(spec: TensorSpec, value: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A float value as the checkpoint stores it: block FP8 plus ``weight_scale_inv``, or cast to its dtype."""
    if spec.dtype is Dtype.F8_E4M3:
        q, s = fp8_block.quantize(value, ue8m0=(cfg.quantization.scale_fmt == "ue8m0"))
        return {spec.name: q, spec.name[: -len("weight")] + "weight_scale_inv": s}
    return {spec.name: value.to(TORCH_DTYPES[spec.dtype])}


def _shard_groups(specs: list[TensorSpec], cfg: ModelConfig) -> list[list[str]]:
    """One shard for the embedding, one per decoder layer (MTP included), one for the final norm and head."""
    groups: dict[Any, list[str]] = {}
    for s in specs:
        key = ("layer", s.layer) if s.layer is not None else (("head",) if s.kind in (Kind.LM_HEAD, Kind.FINAL_NORM) else ("embed",))
        groups.setdefault(key, []).append(s.name)
    order = [("embed",)] + [("layer", i) for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers)] + [("head",)]
    return [groups[k] for k in order if k in groups]

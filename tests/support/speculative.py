"""Checkpoints that make speculative decoding's acceptance path run for real on untrained tiny models.

Random weights give ~0 % acceptance, which would leave every accept/rollback branch untested. So:
- ``planted_target``: the tiny target with its MTP module set to a *bigram* drafter (``eh_proj = [I, 0]`` keeps only
  the next token's embedding, the module's decoder layer adds nothing, the shared head is the target's norm + LM
  head): the MTP proposes the target's embedding-only prediction, and the target's layers (scaled by
  ``layer_scale``) make it right only part of the time.
- ``noisy_copy``: a draft model that is the target plus Gaussian noise (partial agreement).
Nothing here is tuned to specific numbers; tests assert acceptance is strictly between 0 and 100 %.
"""

from __future__ import annotations

from pathlib import Path

import torch

from builder.model.catalog import build_catalog
from builder.model.config import tiny_config
from builder.model.tiny import init_tensor, make_tiny


def target_weights(*, seed: int = 0, layer_scale: float = 0.3) -> dict[str, torch.Tensor]:
    cfg = tiny_config("tiny")
    w = {s.name: init_tensor(s, cfg, seed) for s in build_catalog(cfg) if not s.is_scale}
    L = cfg.num_hidden_layers
    for name in w:
        if name.startswith(f"model.layers.{L}."):
            continue
        if name.endswith(("self_attn.o_proj.weight", "down_proj.weight")):
            w[name] = w[name] * layer_scale
    h = cfg.hidden_size
    p = f"model.layers.{L}."
    w[p + "embed_tokens.weight"] = w["model.embed_tokens.weight"].clone()
    w[p + "enorm.weight"] = torch.ones(h)
    w[p + "hnorm.weight"] = torch.ones(h)
    w[p + "eh_proj.weight"] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)
    w[p + "shared_head.norm.weight"] = w["model.norm.weight"].clone()
    w[p + "shared_head.head.weight"] = w["lm_head.weight"].clone()
    for name in w:
        if name.startswith(p) and name.endswith(("self_attn.o_proj.weight", "down_proj.weight")):
            w[name] = torch.zeros_like(w[name])
    return w


def planted_target(out: Path, *, seed: int = 0, layer_scale: float = 0.3) -> Path:
    if not (out / "config.json").is_file():
        make_tiny(out, seed=seed, weights=target_weights(seed=seed, layer_scale=layer_scale))
    return out


def noisy_copy(out: Path, *, seed: int = 0, layer_scale: float = 0.3, noise: float = 0.3) -> Path:
    """A draft model with the target's architecture and weights plus relative Gaussian noise (MTP dropped)."""
    if not (out / "config.json").is_file():
        g = torch.Generator().manual_seed(1234 + seed)
        w = target_weights(seed=seed, layer_scale=layer_scale)
        cfg = tiny_config("tiny", {"num_nextn_predict_layers": 0})
        names = {s.name for s in build_catalog(cfg)}
        w = {n: t + noise * t.std() * torch.randn(t.shape, generator=g) if t.numel() > 1 else t
             for n, t in w.items() if n in names}
        make_tiny(out, seed=seed, weights=w, overrides={"num_nextn_predict_layers": 0})
    return out

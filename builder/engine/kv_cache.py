"""Per-sequence caches of one rank's layers: MLA's latent (``kv_lora_rank`` normalised latent + ``qk_rope_head_dim``
rotated shared key = 576 values per token per layer for the real model) and the DSA indexer's key cache
(``index_head_dim`` per token per layer). Row ``b`` belongs to sequence ``b`` of the batch; token ``t`` of a
sequence lives at column ``t`` (its position), so sequences of different lengths need no padding logic: a query at
position ``p`` sees columns ``0..p`` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from builder.model.config import ModelConfig


@dataclass
class LayerCache:
    latent: torch.Tensor  # [B, capacity, kv_lora_rank + qk_rope_head_dim]
    index_k: torch.Tensor | None  # [B, capacity, index_head_dim]


class StepPositions:
    """Where one forward step writes and what each query may see (derived values computed once per step)."""

    def __init__(self, starts: torch.Tensor, width: int):
        self.starts = starts  # [B] position of each row's first new token
        self.width = width  # S new tokens per row (rows with fewer valid tokens are right-padded)
        self.positions = starts[:, None] + torch.arange(width, device=starts.device)[None, :]  # [B, S]
        first, last = int(starts.min()), int(starts.max())
        self.key_len = last + width
        self.uniform_start = first if first == last else None

    def visible(self) -> torch.Tensor:
        """[B, S, T] True where key column t is at or before the query's position (causal, per sequence)."""
        keys = torch.arange(self.key_len, device=self.starts.device)
        return keys[None, None, :] <= self.positions[:, :, None]


def write(cache: torch.Tensor, values: torch.Tensor, step: StepPositions) -> torch.Tensor:
    """Store ``values`` [B, S, D] at the rows' positions; return the cache's first ``key_len`` columns (a view)."""
    start = step.uniform_start
    if start is not None:
        cache[:, start:start + step.width] = values
    else:
        rows = torch.arange(cache.shape[0], device=cache.device)[:, None].expand(-1, step.width)
        cache[rows, step.positions] = values
    return cache[:, : step.key_len]


class KVCache:
    def __init__(self, cfg: ModelConfig, layers: list[int], *, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.capacity, self.rows = capacity, batch
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.layers = {
            i: LayerCache(torch.zeros(batch, capacity, width, dtype=dtype, device=device),
                          torch.zeros(batch, capacity, cfg.index_head_dim, dtype=dtype, device=device)
                          if cfg.has_indexer else None)
            for i in layers
        }

    def __getitem__(self, layer: int) -> LayerCache:
        return self.layers[layer]

    def nbytes(self) -> int:
        return sum(c.latent.nbytes + (c.index_k.nbytes if c.index_k is not None else 0) for c in self.layers.values())

    # ----- a running batch's pool of rows (builder.engine.generate.RunningBatch) -----
    def view(self, start: int, stop: int) -> "KVCache":
        """Rows ``start..stop-1`` as a cache of their own, sharing storage (writes land in this cache)."""
        out = object.__new__(KVCache)
        out.capacity, out.rows = self.capacity, stop - start
        out.layers = {i: LayerCache(c.latent[start:stop], None if c.index_k is None else c.index_k[start:stop])
                      for i, c in self.layers.items()}
        return out

    def move_row(self, src: int, dst: int) -> None:
        """Row ``src``'s contents into row ``dst`` (a finished row's place taken by a live one)."""
        for c in self.layers.values():
            c.latent[dst] = c.latent[src]
            if c.index_k is not None:
                c.index_k[dst] = c.index_k[src]

    def grown(self, *, rows: int, capacity: int) -> "KVCache":
        """A cache of at least ``rows`` x ``capacity`` holding this one's contents (this one when it is that big)."""
        if rows <= self.rows and capacity <= self.capacity:
            return self
        out = object.__new__(KVCache)
        out.capacity, out.rows = max(capacity, self.capacity), max(rows, self.rows)
        out.layers = {}
        for i, c in self.layers.items():
            parts = [c.latent] + ([c.index_k] if c.index_k is not None else [])
            bigger = []
            for t in parts:
                n = t.new_zeros(out.rows, out.capacity, t.shape[-1])
                n[: self.rows, : self.capacity] = t
                bigger.append(n)
            out.layers[i] = LayerCache(bigger[0], bigger[1] if len(bigger) > 1 else None)
        return out

"""Which files of a checkpoint a run needs: ``--include/--exclude`` globs and ``--skip-mtp`` shard selection."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from builder.model.catalog import is_mtp_tensor
from builder.model.config import ModelConfig
from builder.model.safetensors_io import CheckpointIndex


def path_selected(path: str, *, include: list[str], exclude: list[str]) -> bool:
    """``include`` globs (everything when empty) minus ``exclude`` globs; ``dir/`` patterns match a whole folder."""
    def hit(patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p.rstrip("/") + "/*") for p in patterns)

    return (not include or hit(include)) and not hit(exclude)


@dataclass(frozen=True)
class ShardSelection:
    shards: list[str]  # shard files to keep
    weight_map: dict[str, str]  # every tensor of the kept shards -> its shard (a kept shard stays whole)
    dropped_shards: list[str]
    kept_mtp_tensors: list[str]  # MTP tensors kept because they share a shard with needed tensors
    dropped_tensors: int

    @property
    def complete(self) -> bool:
        return not self.dropped_shards


def select_shards(index: CheckpointIndex, cfg: ModelConfig, *, skip_mtp: bool) -> ShardSelection:
    """With ``skip_mtp`` keep only shards holding at least one non-MTP tensor; otherwise every shard."""
    needed_shards = {shard for tensor, shard in index.weight_map.items()
                     if not (skip_mtp and is_mtp_tensor(tensor, cfg))}
    weight_map = {t: s for t, s in index.weight_map.items() if s in needed_shards}
    kept_mtp = sorted(t for t in weight_map if skip_mtp and is_mtp_tensor(t, cfg))
    return ShardSelection(
        shards=sorted(needed_shards), weight_map=weight_map,
        dropped_shards=sorted(set(index.weight_map.values()) - needed_shards),
        kept_mtp_tensors=kept_mtp, dropped_tensors=len(index.weight_map) - len(weight_map))

"""Writes one ``rank{N}.safetensors`` per rank from the rank plans of ``builder.shard.rules``.

Tensors are sliced straight out of memory-mapped shards (``safe_open(...).get_slice``), so a rank file costs the
memory of that rank's pieces, not of the checkpoint. Ranks are written in parallel; failures of several ranks are
collected and reported together.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from builder.errors import BuildError
from builder.model.safetensors_io import CheckpointLayout
from builder.model.safetensors_tensors import write_safetensors
from builder.shard.rules import Piece, RankPlan


def read_piece(layout: CheckpointLayout, piece: Piece, handles: dict) -> torch.Tensor:
    from safetensors import safe_open

    path = str(layout.file_of(piece.name))
    if path not in handles:
        handles[path] = safe_open(path, framework="pt")
    if piece.whole:  # also the only way to read a 0-dim tensor (a per-tensor scale): slices need a dimension
        return handles[path].get_tensor(piece.name)
    sl = handles[path].get_slice(piece.name)
    index = tuple(slice(piece.start, piece.stop) if d == piece.dim else slice(None) for d in range(len(piece.shape)))
    return sl[index]


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def write_rank(layout: CheckpointLayout, plan: RankPlan, out_dir: Path,
               transform: Callable[[dict[str, torch.Tensor], RankPlan], dict[str, torch.Tensor]] | None = None) -> int:
    handles: dict = {}
    tensors = {p.name: read_piece(layout, p, handles) for p in plan.pieces}
    for p in plan.pieces:
        if tuple(tensors[p.name].shape) != p.shape:
            raise BuildError(f"rank {plan.rank}: {p.name} sliced to {tuple(tensors[p.name].shape)}, planned {p.shape}")
    if transform is not None:
        tensors = transform(tensors, plan)
    meta = {"format": "pt", "rank": str(plan.rank), "tp_rank": str(plan.tp_rank), "pp_rank": str(plan.pp_rank)}
    return write_safetensors(out_dir / rank_file(plan.rank), tensors, metadata=meta)


def write_all_ranks(layout: CheckpointLayout, plans: list[RankPlan], out_dir: Path, *, workers: int = 2,
                    transform=None, progress: Callable[[int], None] | None = None) -> dict[int, int]:
    sizes: dict[int, int] = {}
    failures: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(write_rank, layout, plan, out_dir, transform): plan.rank for plan in plans}
        for fut, rank in futures.items():
            try:
                sizes[rank] = fut.result()
            except Exception as exc:  # collected, reported once for all ranks
                failures[rank] = f"{type(exc).__name__}: {exc}"
            if progress:
                progress(rank)
    if failures:
        raise BuildError(f"{len(failures)} of {len(plans)} rank file(s) failed", rank_failures=failures)
    return sizes

"""Process groups and the few collectives the reference engine needs (no-ops in a world of one).

Global rank ``r`` is TP rank ``r % tp`` of PP stage ``r // tp`` (``builder.shard.rules.Layout``). Every stage's TP
ranks form one group; activations go from TP rank t of stage s to TP rank t of stage s + 1. Commands and sampled
tokens travel as tensors (JSON bytes in a uint8 tensor: nothing is ever unpickled).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from builder.layout import Layout

# Idle serving groups must not hit gloo's 30-minute default (docs/upstream-facts.md#U-TDIST-1).
LONG_TIMEOUT = timedelta(days=7)


@dataclass
class Comm:
    layout: Layout
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: Any = None

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank)[0]

    @property
    def pp_rank(self) -> int:
        return self.layout.coords(self.rank)[1]

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def distributed(self) -> bool:
        return self.layout.world_size > 1

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    @property
    def sampler_rank(self) -> int:
        """The rank that samples (TP rank 0 of the last stage) and broadcasts the tokens."""
        return self.layout.rank(tp_rank=0, pp_rank=self.layout.pp - 1)

    # ----- collectives -----
    def all_reduce_tp(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def all_gather_tp(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.tp == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=dim)

    def send_next(self, x: torch.Tensor) -> None:
        dist.send(x.contiguous(), dst=self.layout.rank(tp_rank=self.tp_rank, pp_rank=self.pp_rank + 1))

    def isend_next(self, x: torch.Tensor):
        """Asynchronous ``send_next``; the caller waits on the returned handle (and keeps ``x`` alive until then)."""
        return dist.isend(x.contiguous(), dst=self.layout.rank(tp_rank=self.tp_rank, pp_rank=self.pp_rank + 1))

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        x = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(x, src=self.layout.rank(tp_rank=self.tp_rank, pp_rank=self.pp_rank - 1))
        return x

    def send(self, x: torch.Tensor, dst: int) -> None:
        dist.send(x.contiguous(), dst=dst)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        x = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(x, src=src)
        return x

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        if self.distributed:
            dist.broadcast(x, src=src)
        return x

    def broadcast_json(self, obj: Any = None, *, src: int = 0) -> Any:
        """``obj`` from ``src`` to every rank, as UTF-8 JSON in a byte tensor (length first). ``None`` is a length
        of 0 alone: one 8-byte broadcast (a running batch's step with nothing joining or leaving)."""
        if not self.distributed:
            return obj
        if self.rank == src:
            raw = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(self.device) \
                if obj is not None else None
            n = torch.tensor([0 if raw is None else raw.numel()], dtype=torch.int64, device=self.device)
        else:
            n = torch.zeros(1, dtype=torch.int64, device=self.device)
        dist.broadcast(n, src=src)
        if int(n.item()) == 0:
            return None
        if self.rank != src:
            raw = torch.empty(int(n.item()), dtype=torch.uint8, device=self.device)
        dist.broadcast(raw, src=src)
        return json.loads(raw.cpu().numpy().tobytes().decode()) if self.rank != src else obj


def backend_for(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def make_comm(layout: Layout, *, rank: int, device: str = "cpu") -> Comm:
    """Build the TP groups (every rank creates every group, in the same order, as torch.distributed requires).
    The default process group must already be initialised when the world is larger than one."""
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    comm = Comm(layout=layout, rank=rank, device=dev)
    if layout.world_size > 1 and layout.tp > 1:
        for pp_rank in range(layout.pp):
            ranks = [layout.rank(tp_rank=t, pp_rank=pp_rank) for t in range(layout.tp)]
            group = dist.new_group(ranks)
            if rank in ranks:
                comm.tp_group = group
    return comm

"""The parallel layout of one model replica: the only carrier of the TP x PP x EP x attention-DP mapping.

Plan, build, package, the TensorRT-LLM configuration and the reference engine all take a :class:`Layout`; derived
numbers (world size, MoE tensor-parallel size, the name, which layers each pipeline stage holds) are computed here
and nowhere else. Rank numbering follows TensorRT-LLM's ``Mapping``: TP is the fastest-varying dimension.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"tp(\d+)pp(\d+)ep(\d+)(adp)?")


@dataclass(frozen=True)
class Layout:
    """``world = tp * pp`` ranks; MoE layers use ``ep`` expert-parallel x ``tp // ep`` tensor-parallel ranks inside
    each TP group (TensorRT-LLM's ``moe_expert_parallel_size`` x ``moe_tensor_parallel_size``)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    attention_dp: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def moe_tp(self) -> int:
        return self.tp // self.ep

    @property
    def attention_dp_ranks(self) -> int:
        """How many ways attention splits the requests (TP ranks under attention-DP, else 1)."""
        return self.tp if self.attention_dp else 1

    def rank(self, *, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        """(tp_rank, pp_rank) of a global rank."""
        return rank % self.tp, rank // self.tp

    def moe_coords(self, tp_rank: int) -> tuple[int, int]:
        """(moe_ep_rank, moe_tp_rank) inside a TP group, as TensorRT-LLM's Mapping numbers them."""
        return tp_rank % self.ep, tp_rank // self.ep

    @property
    def name(self) -> str:
        return f"tp{self.tp}pp{self.pp}ep{self.ep}" + ("adp" if self.attention_dp else "")

    @classmethod
    def parse(cls, name: str) -> "Layout":
        """The inverse of :attr:`name` (``tp8pp2ep8``, ``tp16pp1ep16adp``)."""
        m = _NAME.fullmatch(name)
        if not m:
            raise ValueError(f"{name!r} is not a layout name like tp8pp2ep8 or tp16pp1ep16adp")
        return cls(tp=int(m[1]), pp=int(m[2]), ep=int(m[3]), attention_dp=bool(m[4]))

    def stage_layers(self, num_layers: int) -> list[list[int]]:
        """Contiguous decoder layers per PP stage; leading stages take the remainder (61 layers, PP2 -> 31/30)."""
        base, extra = divmod(num_layers, self.pp)
        out, start = [], 0
        for s in range(self.pp):
            n = base + (1 if s < extra else 0)
            out.append(list(range(start, start + n)))
            start += n
        return out

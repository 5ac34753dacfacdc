"""An engine bundle on disk (``engines/`` of a run): its config, mapping, and one rank's weights in compute dtype."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
import torch

from builder.errors import CheckpointError
from builder.model.config import ModelConfig
from builder.model.safetensors_io import read_header
from builder.shard.fusion import FusionOptions, unfuse_dequantize
from builder.layout import Layout
from quantize.dequant import COMPANION_SUFFIXES, companions_of

ENGINE_CONFIG = "config.json"
# Kept in fp32 whatever the compute dtype (as in DeepSeek's and transformers' code): the router and its bias, and
# the indexer's head weights.
FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias", "indexer.weights_proj.weight")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    tp_rank: int
    pp_rank: int
    layers: list[int]
    experts: list[int]
    file: str


@dataclass(frozen=True)
class EngineBundle:
    root: Path
    cfg: ModelConfig
    layout: Layout
    stage_layers: list[list[int]]
    ranks: list[RankInfo]
    fusion: FusionOptions

    @classmethod
    def open(cls, root: str | Path) -> "EngineBundle":
        root = Path(root).resolve()  # workers run elsewhere: never hand them a relative path
        path = root / ENGINE_CONFIG
        if not path.is_file():
            raise CheckpointError(f"{root} is not an engine bundle: it has no {ENGINE_CONFIG} (run `dsbuild build`)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            mapping = data["mapping"]
            cfg = ModelConfig.from_dict(data["model"], source=str(path))
            layout = Layout(tp=int(mapping["tp"]), pp=int(mapping["pp"]), ep=int(mapping["ep"]),
                            attention_dp=bool(mapping.get("attention_dp", False)))
            ranks = [RankInfo(int(r["rank"]), int(r["tp_rank"]), int(r["pp_rank"]), list(r["layers"]),
                              list(r["experts"]), str(r["file"])) for r in mapping["ranks"]]
            stages = [list(s) for s in mapping["stage_layers"]]
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is not a valid engine config ({type(exc).__name__}: {exc})") from None
        if len(ranks) != layout.world_size or [r.rank for r in ranks] != list(range(layout.world_size)):
            raise CheckpointError(f"{path} lists {len(ranks)} ranks for a world of {layout.world_size}")
        for r in ranks:
            if "/" in r.file or r.file.startswith("."):
                raise CheckpointError(f"{path} names rank file {r.file!r}, which is not a plain file name")
        return cls(root, cfg, layout, stages, ranks, FusionOptions.from_dict(data.get("fusion")))

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    def tokenizer(self):
        from tokenizers import Tokenizer

        path = self.root / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"engine bundle {self.root} has no tokenizer.json")
        return Tokenizer.from_file(str(path))

    def tensor_bytes(self, rank: int) -> int:
        """Bytes of tensor data in a rank file (the planner's prediction for that rank)."""
        return read_header(self.root / self.ranks[rank].file).data_bytes

    def load_rank(self, rank: int, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Every tensor of ``rank`` in ``dtype``: weights of every quantized format dsbuild writes dequantized part
        by part (fused and stacked ones too), their scales consumed."""
        from safetensors import safe_open

        path = self.root / self.ranks[rank].file
        read_header(path)  # bounds-checked before anything is mapped
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            for name in sorted(names):
                if name.endswith(COMPANION_SUFFIXES):
                    continue  # consumed with their weight (activation input scales are not needed here)
                try:
                    dt = torch.float32 if name.endswith(FP32_SUFFIXES) else dtype
                    out[name] = unfuse_dequantize(name, f.get_tensor(name), companions_of(name, names, f.get_tensor),
                                                  self.cfg, dtype=dt)
                except ValueError as exc:
                    raise CheckpointError(f"{path.name}: {name}: {exc}") from exc
        return {k: v.to(device) for k, v in out.items()}


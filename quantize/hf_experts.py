"""Per-expert ``nn.Linear`` modules in place of transformers-5's fused 3-D expert tensors.

transformers 5 keeps a MoE layer's routed experts as two 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``) and splits them back into per-expert names only in ``save_pretrained``. Tools that work on
``nn.Linear`` modules — ModelOpt's quantizers and its HF export, calibration hooks on each expert's input — see no
experts at all there (ModelOpt 0.47's INT4 export then fails in ``pack_int4_in_uint8``). ``unfuse_experts`` swaps in
one module per expert holding ``gate_proj``/``up_proj``/``down_proj`` linears named exactly as the checkpoint names
them (``mlp.experts.{e}.gate_proj``), with the same routing arithmetic, so every expert is quantized and exported.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act, *, dtype: torch.dtype, device=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype, device=device)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PerExpertExperts(nn.ModuleList):
    """Drop-in for ``DeepseekV32Experts``: same call signature, a ModuleList so children are named ``experts.{e}``.

    ``calibrate_all``: every expert also runs on every token of the layer (its output still weighted only where
    routed), so activation statistics exist for experts the calibration prompts never route to."""

    calibrate_all = False

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, slot = torch.where(top_k_index == e)
            if self.calibrate_all:
                y = expert(hidden_states)[token_idx]
            else:
                y = expert(hidden_states[token_idx])
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of a transformers DeepSeek model in place; returns how many."""
    count = 0
    for module in list(model.modules()):
        fused = getattr(module, "experts", None)
        if fused is None or not isinstance(getattr(fused, "gate_up_proj", None), torch.Tensor):
            continue
        n, two_i, h = fused.gate_up_proj.shape
        inter = two_i // 2
        per = PerExpertExperts([
            ExpertMLP(h, inter, fused.act_fn, dtype=fused.gate_up_proj.dtype, device=fused.gate_up_proj.device)
            for _ in range(n)])
        with torch.no_grad():
            for e, expert in enumerate(per):
                gate, up = fused.gate_up_proj[e].chunk(2, dim=0)
                expert.gate_proj.weight.copy_(gate)
                expert.up_proj.weight.copy_(up)
                expert.down_proj.weight.copy_(fused.down_proj[e])
        module.experts = per
        count += 1
    return count

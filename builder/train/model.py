"""A compact, trainable DeepSeek-V3.2 in plain torch, for the tiny presets.

Same function as transformers' ``DeepseekV32ForCausalLM`` (MLA with interleaved RoPE on the last
``qk_rope_head_dim`` dims, the DSA indexer with half-split RoPE on its first dims and top-k key selection, the
``noaux_tc`` sigmoid router with ``e_score_correction_bias`` and group-limited selection, a shared expert), plus
DeepSeek's MTP module, which transformers does not run. Parameter names are the checkpoint's tensor names, so
``export_weights`` hands ``make_tiny(weights=...)`` exactly the catalogue. What transformers has no need for and
training does: the indexer's own loss (KL to the main attention, as in DeepSeek-V3.2's indexer training) and the
per-expert load counts that drive the aux-loss-free bias update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from builder.model.config import ModelConfig
from builder.model.functional import RopeTable, noaux_tc_route, rms_norm, rotate_half_split, rotate_interleaved


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False)


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.wq_b = linear(cfg.q_lora_rank, self.n_heads * self.head_dim)
        self.wk = linear(cfg.hidden_size, self.head_dim)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = linear(cfg.hidden_size, self.n_heads)

    def scores(self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Index scores [B, S, T] before masking: sum_h w[s,h] * relu(q_h[s] . k[t] / sqrt(d))."""
        b, s, _ = x.shape
        r = self.rope_dim
        q = self.wq_b(q_resid).view(b, s, self.n_heads, self.head_dim)
        q = torch.cat([rotate_half_split(q[..., :r], cos[:, None], sin[:, None]), q[..., r:]], dim=-1)
        k = self.k_norm(self.wk(x))
        k = torch.cat([rotate_half_split(k[..., :r], cos, sin), k[..., r:]], dim=-1)
        per_head = F.relu(torch.einsum("bshd,btd->bhst", q.float(), k.float()) * self.head_dim ** -0.5)
        w = self.weights_proj(x.float()).float() * self.n_heads ** -0.5
        return torch.einsum("bsh,bhst->bst", w, per_head)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, nh = cfg.hidden_size, cfg.num_attention_heads
        self.q_a_proj = linear(h, cfg.q_lora_rank)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = linear(cfg.q_lora_rank, nh * cfg.qk_head_dim)
        self.kv_a_proj_with_mqa = linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.o_proj = linear(nh * cfg.v_head_dim, h)
        self.indexer = Indexer(cfg) if cfg.has_indexer else None
        self.scaling = cfg.qk_head_dim ** -0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, sparse: bool,
                indexer_loss: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        c = self.cfg
        b, t, _ = x.shape
        nh, nope, rope = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
        q_resid = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_resid).view(b, t, nh, c.qk_head_dim).transpose(1, 2)
        ckv = self.kv_a_proj_with_mqa(x)
        kv = self.kv_b_proj(self.kv_a_layernorm(ckv[..., : c.kv_lora_rank])).view(b, t, nh, nope + c.v_head_dim)
        kv = kv.transpose(1, 2)
        k_rot = rotate_interleaved(ckv[..., c.kv_lora_rank:], cos, sin)[:, None].expand(b, nh, t, rope)
        q = torch.cat([q[..., :nope], rotate_interleaved(q[..., nope:], cos, sin)], dim=-1)
        k = torch.cat([kv[..., :nope], k_rot], dim=-1)
        v = kv[..., nope:]
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scaling  # [B, H, S, T]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        allowed = causal[None, None]
        idx_loss = None
        if self.indexer is not None and (sparse or indexer_loss):
            # The indexer learns from its own loss only: its inputs are cut from the main graph (DeepSeek-V3.2).
            index_scores = self.indexer.scores(x.detach(), q_resid.detach(), cos, sin)
            index_scores = index_scores.masked_fill(~causal, float("-inf"))
            if sparse:
                top = index_scores.detach().topk(min(self.indexer.topk, t), dim=-1).indices
                chosen = torch.zeros(b, t, t, dtype=torch.bool, device=x.device).scatter(-1, top, True)
                allowed = (chosen & causal)[:, None]
            if indexer_loss:
                with torch.no_grad():
                    target = scores.masked_fill(~causal, float("-inf")).softmax(-1).mean(1)  # [B, S, T]
                log_p = index_scores.log_softmax(-1).masked_fill(~causal, 0.0)
                idx_loss = (target * (target.clamp_min(1e-30).log() - log_p)).sum(-1).mean()
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, nh * c.v_head_dim)
        return self.o_proj(out), idx_loss


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = linear(hidden, inter)
        self.up_proj = linear(hidden, inter)
        self.down_proj = linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """DeepSeek's ``noaux_tc`` gate: sigmoid scores; the bias only steers which experts are chosen."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        return noaux_tc_route(self.cfg, scores, self.e_score_correction_bias)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts))
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        # Tokens routed to each expert in the last training forward (for the aux-loss-free bias update).
        self.register_buffer("last_load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, w = self.gate(flat)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                out = out.index_add(0, tok, (expert(flat[tok]) * w[tok, slot, None].to(flat.dtype)).to(out.dtype))
        if self.training:
            self.last_load = torch.bincount(idx.flatten(), minlength=len(self.experts)).float()
        return (out + self.shared_experts(flat).to(out.dtype)).view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, *, sparse: bool, indexer_loss: bool):
        a, idx_loss = self.self_attn(self.input_layernorm(x), cos, sin, sparse=sparse, indexer_loss=indexer_loss)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), idx_loss


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """DeepSeek's MTP module: ``eh_proj([enorm(embed(x_{t+1})); hnorm(h_t)])`` -> a decoder layer ->
    ``shared_head`` norm + head predicts x_{t+2}. Embedding and head are the main model's (shared, as DeepSeek
    trains them); the export writes copies under the MTP layer's names."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.shared_head = SharedHead(cfg)


class Body(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        layers: list[nn.Module] = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        layers += [MTPLayer(cfg, i) for i in cfg.mtp_layers]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class ForwardOut:
    logits: torch.Tensor  # [B, T, V]: token t+1 at position t
    mtp_logits: torch.Tensor | None  # [B, T-1, V]: token t+2 at position t
    indexer_loss: torch.Tensor | None


class TinyDeepseekV32(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.num_nextn_predict_layers > 1:
            raise ValueError("only one MTP layer is trained (DeepSeek-V3.2 has one)")
        self.cfg = cfg
        self.model = Body(cfg)
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size)
        self.rope = RopeTable.from_config(cfg)
        if cfg.raw.get("rope_scaling"):
            raise ValueError("the trainer implements plain RoPE only (the tiny presets have no rope_scaling)")

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, ids: torch.Tensor, *, sparse: bool = True, indexer_loss: bool = False,
                mtp: bool = True) -> ForwardOut:
        c = self.cfg
        t = ids.shape[1]
        cos, sin = self.rope.cos_sin(torch.arange(t), torch.float32)
        x = self.model.embed_tokens(ids)
        idx_losses = []
        main = self.model.layers[: c.num_hidden_layers]
        for layer in main:
            x, il = layer(x, cos, sin, sparse=sparse, indexer_loss=indexer_loss)
            idx_losses.append(il)
        h = self.model.norm(x)
        logits = self.lm_head(h)
        mtp_logits = None
        if mtp and c.num_nextn_predict_layers and t > 1:
            layer = self.model.layers[c.num_hidden_layers]
            e = layer.enorm(self.model.embed_tokens(ids[:, 1:]))
            z = layer.eh_proj(torch.cat([e, layer.hnorm(h[:, :-1])], dim=-1))
            z, il = layer(z, cos[: t - 1], sin[: t - 1], sparse=sparse, indexer_loss=indexer_loss)
            idx_losses.append(il)
            mtp_logits = self.lm_head(layer.shared_head.norm(z))
        losses = [il for il in idx_losses if il is not None]
        return ForwardOut(logits, mtp_logits, torch.stack(losses).sum() if losses else None)


def export_weights(model: TinyDeepseekV32) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> float32 tensor, the MTP layer's shared embedding and head written out."""
    out = {name: t.detach().float().clone() for name, t in model.state_dict().items()}
    for i in model.cfg.mtp_layers:
        out[f"model.layers.{i}.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        out[f"model.layers.{i}.shared_head.head.weight"] = out["lm_head.weight"].clone()
    return out


def load_weights(model: TinyDeepseekV32, weights: dict[str, torch.Tensor]) -> None:
    """The inverse of ``export_weights`` (the MTP copies must equal the shared tensors they copy)."""
    own = model.state_dict()
    extra = set(weights) - set(own)
    for name in extra:
        shared = "model.embed_tokens.weight" if name.endswith(".embed_tokens.weight") else "lm_head.weight"
        if not torch.equal(weights[name].float(), weights[shared].float()):
            raise ValueError(f"{name} differs from {shared}; the trainer ties them")
    missing = set(own) - set(weights)
    if missing:
        raise ValueError(f"weights lack {sorted(missing)[:3]}...")
    model.load_state_dict({k: weights[k].float() for k in own})


def init_weights(model: TinyDeepseekV32, *, seed: int, std: float = 0.02) -> None:
    """Deterministic init: normal(0, std) for matrices and embeddings; norms at 1; router bias at 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("k_norm.bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.zero_()

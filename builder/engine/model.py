"""One rank's stage of the model: vocab-parallel embedding (first stage), its decoder layers, final norm and
vocab-parallel LM head (last stage). Which layers, experts and slices it holds comes from the bundle's mapping
(written from ``builder.shard.rules``); the gcd rule for dense/shared MLPs is ``rules.mlp_tp``."""

from __future__ import annotations

import torch

from builder.engine.bundle import EngineBundle
from builder.engine.distributed import Comm
from builder.engine.kv_cache import KVCache, StepPositions
from builder.engine.layers import MLA, MLP, MoE, Step, Weights, gemm_form, linear
from builder.model.functional import RopeTable, rms_norm
from builder.shard.rules import mlp_tp


class StageModel:
    def __init__(self, bundle: EngineBundle, comm: Comm, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype,
                 absorb_mla: bool | None = None):
        cfg, layout = bundle.cfg, bundle.layout
        self.cfg, self.comm, self.dtype = cfg, comm, dtype
        # Attention-DP: attention, dense MLPs, shared experts, embedding and head are whole on every rank, each TP
        # rank runs its own share of the batch through them, and only MoE layers work across the TP group.
        self.attention_dp = layout.attention_dp and layout.tp > 1
        self.rope = RopeTable.from_config(cfg)
        info = bundle.ranks[comm.rank]
        self.layers = list(bundle.stage_layers[comm.pp_rank])  # decoder layers; MTP layers are not run here
        absorb = bundle.fusion.absorb_mla if absorb_mla is None else absorb_mla
        w = Weights(tensors)
        self.w = w
        self.attn, self.mlp = {}, {}
        self._absorb, self._experts = absorb, info.experts
        self._attention_tp = 1 if layout.attention_dp else layout.tp
        self._dense_active = layout.attention_dp or comm.tp_rank < mlp_tp(cfg.intermediate_size, layout)
        self._shared_active = layout.attention_dp or \
            comm.tp_rank < mlp_tp(cfg.moe_intermediate_size * cfg.n_shared_experts, layout)
        for i in self.layers:
            self.add_layer(i)
        self._to_gemm_form([n for n in tensors if not n.startswith("model.layers.")])  # the LM head
        self.vocab_per_rank = cfg.vocab_size // self._attention_tp

    def add_layer(self, i: int) -> None:
        """Attention and MLP of decoder layer ``i`` (an MTP module's layer ``num_hidden_layers + k`` too)."""
        lw = self.w.sub(f"model.layers.{i}.")
        self.attn[i] = MLA(self.cfg, lw.sub("self_attn."), tp=self._attention_tp, rope=self.rope, absorb=self._absorb)
        self.mlp[i] = (MoE(self.cfg, lw.sub("mlp."), experts=self._experts, shared_active=self._shared_active)
                       if self.cfg.is_moe_layer(i) else MLP(lw.sub("mlp."), active=self._dense_active))
        # After the layer's set-up has read its weights (absorption, expert stacks), not before: a packed weight
        # serves GEMMs only.
        self._to_gemm_form([n for n in self.w.t if n.startswith(lw.prefix)])

    def _to_gemm_form(self, names: list[str]) -> None:
        """Every 2-D weight among ``names`` in the form ``linear`` reads fastest (every 2-D tensor but the
        embeddings, which are gathered by row, is a GEMM weight)."""
        for name in names:
            t = self.w.t[name]
            if t.ndim == 2 and not t.is_mkldnn and "embed_tokens" not in name:
                self.w.t[name] = gemm_form(t)

    def rows_per_rank(self, batch: int) -> int:
        """Rows of a ``batch`` each rank runs through its decoder layers (attention-DP: its share, padded)."""
        return -(-batch // self.comm.tp) if self.attention_dp else batch

    def new_cache(self, *, batch: int, capacity: int) -> KVCache:
        return KVCache(self.cfg, self.layers, batch=self.rows_per_rank(batch), capacity=capacity, dtype=self.dtype,
                       device=self.comm.device)

    def embed(self, tokens: torch.Tensor, weight: str = "model.embed_tokens.weight") -> torch.Tensor:
        if self._attention_tp == 1:
            return self.w(weight)[tokens]
        lo = self.comm.tp_rank * self.vocab_per_rank
        local = tokens - lo
        inside = (local >= 0) & (local < self.vocab_per_rank)
        h = self.w(weight)[local.clamp(0, self.vocab_per_rank - 1)]
        h = h * inside[..., None].to(h.dtype)
        return self.comm.all_reduce_tp(h)

    def step_context(self, pos: StepPositions, *, decode: bool | None = None) -> Step:
        cos, sin = self.rope.cos_sin(pos.positions, self.dtype)
        return Step(pos, cos, sin, pos.visible(), decode=pos.width == 1 if decode is None else decode)

    def layers_forward(self, h: torch.Tensor, cache: KVCache, step: Step) -> torch.Tensor:
        for i in self.layers:
            h = self.layer_forward(i, h, cache, step, rows_split=self.attention_dp)
        return h

    def layer_forward(self, i: int, h: torch.Tensor, cache: KVCache, step: Step, *,
                      rows_split: bool = False) -> torch.Tensor:
        """One decoder layer. ``rows_split`` (attention-DP): ``h`` holds this rank's rows of the batch and MoE
        layers gather every rank's rows; without it, every rank of an attention-DP group holds all the rows (the
        MTP module) and the replicated parts simply run on all of them."""
        eps = self.cfg.rms_norm_eps
        lw = self.w.sub(f"model.layers.{i}.")
        attn = self.attn[i](rms_norm(h, lw("input_layernorm.weight"), eps), cache[i], step)
        h = h + (attn if self._attention_tp == 1 else self.comm.all_reduce_tp(attn))
        x = rms_norm(h, lw("post_attention_layernorm.weight"), eps)
        mlp = self.mlp[i]
        if not self.attention_dp:
            y = mlp(x)
            return h + self.comm.all_reduce_tp(y if y is not None else torch.zeros_like(x))
        if not isinstance(mlp, MoE):
            return h + mlp(x)
        everyone = self.comm.all_gather_tp(x, dim=0) if rows_split else x
        routed = self.comm.all_reduce_tp(mlp.routed(everyone))
        if rows_split:
            routed = routed.chunk(self.comm.tp, dim=0)[self.comm.tp_rank]
        shared = mlp.shared_output(x)
        return h + (routed if shared is None else routed + shared)

    def final_norm(self, h: torch.Tensor, *, norm: str = "model.norm.weight") -> torch.Tensor:
        """The final RMSNorm: what the LM head reads (and what DeepSeek's MTP module takes as the target's hidden
        state)."""
        return rms_norm(h, self.w(norm), self.cfg.rms_norm_eps)

    def head_logits(self, normed: torch.Tensor, *, head: str = "lm_head.weight") -> torch.Tensor:
        """Full-vocabulary logits of already-normed hidden states (local vocab slice then TP all-gather, or the
        whole head on every rank under attention-DP)."""
        logits = linear(normed, self.w(head))
        return logits if self._attention_tp == 1 else self.comm.all_gather_tp(logits, dim=-1)

    def logits(self, h: torch.Tensor, *, norm: str = "model.norm.weight", head: str = "lm_head.weight") -> torch.Tensor:
        """Full-vocabulary logits of final hidden states (last stage; local slice then TP all-gather, or the
        whole head on every rank under attention-DP)."""
        return self.head_logits(self.final_norm(h, norm=norm), head=head)

"""DeepSeek's multi-token-prediction (MTP) module on the last pipeline stage, used as a speculative drafter.

The module at layer ``L = num_hidden_layers`` (``model.layers.L.*``) predicts token ``t[i+2]`` at position ``i``
from the target's final hidden state ``h[i]`` *after* the final norm (what the LM head reads) and the embedding of
``t[i+1]``:

    x = eh_proj([enorm(embed(t[i+1])), hnorm(norm(h[i]))])  # embedding first, as vLLM's ``deepseek_mtp.py``,
                                                            # sglang's ``deepseek_nextn.py`` and TensorRT-LLM's
                                                            # ``DeepseekV3MTP`` concatenate it
    g = shared_head.norm(decoder_layer_L(x))                # MLA (own latent + indexer cache) and MoE
    logits = shared_head.head(g)

Post-norm, because that is what the serving stacks hand the module: TensorRT-LLM's ``DeepseekV3Model`` sets the
last decoder layer's ``next_layer_layernorm`` to ``model.norm``, so the hidden states it returns (fed both to
``lm_head`` with no further norm and to the MTP worker) are normed; vLLM's ``DeepseekV2Model.forward`` likewise
returns ``norm(hidden, residual)``. The trainer (``builder.train.model``) feeds the same. Drafting N tokens reuses
the one module N times, feeding its own normed output ``g`` in place of the target's hidden state for the steps
past the last verified token (TensorRT-LLM's ``DeepseekV3MTP.forward`` returns ``shared_head.norm``'s output, and
its MTP-Eagle worker feeds it back). Embedding and head are vocab-parallel over the last stage's TP group; every
TP rank of the last stage runs the module collectively.
"""

from __future__ import annotations

import torch

from builder.engine.generate import Engine
from builder.engine.kv_cache import KVCache, StepPositions
from builder.engine.layers import linear
from builder.model.functional import rms_norm
from builder.engine.model import StageModel
from builder.engine.proposer import DecodeState, DraftRound, draft_tokens_collectively
from builder.errors import CheckpointError
from builder.model.safetensors_io import read_header


class MTPModule:
    def __init__(self, stage: StageModel):
        cfg = stage.cfg
        if not cfg.mtp_layers:
            raise CheckpointError("the model has no MTP module (num_nextn_predict_layers is 0)")
        self.stage, self.cfg = stage, cfg
        self.layer = cfg.mtp_layers[0]  # one module, reused for every draft step
        self.prefix = f"model.layers.{self.layer}."
        if not stage.w.has(self.prefix + "eh_proj.weight"):
            raise CheckpointError(f"this rank holds no MTP weights ({self.prefix}eh_proj.weight); the bundle was "
                                  "built without the MTP module (--skip-mtp?)")
        if self.layer not in stage.attn:
            stage.add_layer(self.layer)

    def new_cache(self, *, batch: int, capacity: int) -> KVCache:
        return KVCache(self.cfg, [self.layer], batch=batch, capacity=capacity, dtype=self.stage.dtype,
                       device=self.stage.comm.device)

    def forward(self, next_tokens: torch.Tensor, target_hidden: torch.Tensor, pos: StepPositions,
                cache: KVCache, *, decode: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``next_tokens`` [B, S] (t[i+1]) and ``target_hidden`` [B, S, H] (norm(h[i]), the final-normed state)
        at positions ``pos`` -> (the module's normed hidden states g [B, S, H], full-vocabulary logits [B, S, V]
        for t[i+2])."""
        stage, w, eps = self.stage, self.stage.w, self.cfg.rms_norm_eps
        p = self.prefix
        with torch.inference_mode():
            e = stage.embed(next_tokens.to(stage.comm.device), weight=p + "embed_tokens.weight")
            x = torch.cat([rms_norm(e, w(p + "enorm.weight"), eps),
                           rms_norm(target_hidden.to(e.dtype), w(p + "hnorm.weight"), eps)], dim=-1)
            x = linear(x, w(p + "eh_proj.weight"))
            g = stage.final_norm(stage.layer_forward(self.layer, x, cache, stage.step_context(pos, decode=decode)),
                                 norm=p + "shared_head.norm.weight")
            logits = stage.head_logits(g, head=p + "shared_head.head.weight")
        return g, logits


def bundle_has_mtp(bundle, *, require: bool = False) -> bool:
    """Whether the bundle's last stage holds the MTP module (read from the rank files' headers, nothing loaded)."""
    cfg = bundle.cfg
    name = f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight"
    has = bool(cfg.mtp_layers) and all(
        name in read_header(bundle.root / r.file).tensors for r in bundle.ranks if r.pp_rank == bundle.layout.pp - 1)
    if require and not has:
        raise CheckpointError(f"engine bundle {bundle.root} has no MTP module (num_nextn_predict_layers "
                              f"{cfg.num_nextn_predict_layers}, or built with --skip-mtp); rebuild it with the MTP "
                              "layer or use --spec draft")
    return has


class MTPProposer:
    """Drafts with the MTP module. State on the last stage: the module's cache and, per row, its logits for the
    token after the pending one and its hidden state there (computed when the previous round was accepted)."""

    def __init__(self, engine: Engine):
        self.engine, self.comm = engine, engine.comm
        self.module = MTPModule(engine.model) if engine.comm.last_stage else None

    def start(self, *, batch: int, capacity: int) -> None:
        self.cache = self.module.new_cache(batch=batch, capacity=capacity) if self.module else None
        self.next_logits = self.last_g = None

    def _run(self, next_tokens, normed_hidden, starts, width, last_index, *, prefill: bool = False) -> None:
        """The module over ``width`` new positions per row. Past the prompt, even several positions at once take
        the absorbed (decode) attention path, as the target's verification does: the expanded path would
        re-project the whole cache every round."""
        B = next_tokens.shape[0]
        g, logits = self.module.forward(next_tokens, normed_hidden,
                                        StepPositions(starts.to(self.comm.device), width), self.cache,
                                        decode=None if prefill else True)
        rows = torch.arange(B, device=g.device)
        idx = last_index.to(g.device)
        self.last_g, self.next_logits = g[rows, idx], logits[rows, idx]

    def prefill(self, tokens, lens, normed, first) -> None:
        """MTP over the prompt: position i gets (t[i+1], h[i]); t[len] is the first generated token."""
        if self.module is None:
            return
        B, S = tokens.shape
        shifted = torch.zeros(B, S, dtype=torch.long)
        shifted[:, :-1] = tokens[:, 1:]
        shifted[torch.arange(B), lens - 1] = first.cpu()
        self._run(shifted, normed, torch.zeros(B, dtype=torch.long), S, lens - 1, prefill=True)

    def propose(self, state: DecodeState) -> DraftRound:
        B, N = len(state.requests), state.draft_len
        q = [[] for _ in range(B)]
        drafts = []
        for k in range(N):
            if k > 0 and self.module is not None:  # step k at position P + k - 1, from the module's own state
                self._run(drafts[-1][:, None], self.last_g[:, None], state.positions + k - 1, 1,
                          torch.zeros(B, dtype=torch.long))
            drafts.append(draft_tokens_collectively(self.comm, self.next_logits, state, q, drafts))
        return DraftRound(torch.stack(drafts, dim=1), q if state.sampler else None)

    def accept(self, state, accepted, new_tokens, drafts, normed, old_positions) -> None:
        """Re-run the module over the verified positions P..P+a with the target's true hidden states: it overwrites
        what drafting wrote there and yields the first draft of the next round."""
        if self.module is None:
            return
        B = drafts.shape[0]
        width = int(accepted.max()) + 1
        nxt = torch.zeros(B, width, dtype=torch.long)
        for b in range(B):
            a = int(accepted[b])
            nxt[b, :a] = drafts[b, :a]
            nxt[b, a] = new_tokens[b]
        self._run(nxt, normed[:, :width], old_positions, width, accepted)

"""The layers of one rank: MLA with a latent cache and weight absorption, the DSA indexer, dense MLP, MoE with the
noaux_tc router, norms. Semantics follow transformers 5.14.1 ``DeepseekV32ForCausalLM``
(docs/upstream-facts.md#U-HF-1..3); tensor parallelism follows ``builder.shard.rules`` (each layer computes its
rank's partial sum; the caller's all-reduce completes it).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from builder.model.config import ModelConfig
from builder.engine import kv_cache
from builder.engine.kv_cache import LayerCache, StepPositions
from builder.model.functional import RopeTable, noaux_tc_route, rms_norm, rotate_half_split, rotate_interleaved
from builder.shard.fusion import fused_a_parts


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for a weight in either form ``gemm_form`` makes: pre-packed (oneDNN) or a plain tensor."""
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return F.linear(x, w)


def gemm_layout(w: torch.Tensor) -> torch.Tensor:
    """``w`` ([..., out, in]) stored the way a plain CPU GEMM streams it fastest for ``x @ w.T`` with decode's few
    rows (same values, same shape): float32 column-major, so MKL runs a plain [in, out] product (measured about 2x
    faster than the transposed one for 1-2 rows), bfloat16/float16 row-major, which oneDNN's kernels prefer."""
    if w.device.type != "cpu" or w.ndim < 2:
        return w
    if w.dtype == torch.float32:
        return w.transpose(-1, -2).contiguous().transpose(-1, -2)
    return w.contiguous()


# oneDNN lays a packed weight out for this many rows of input (any row count still works). 1 gives a layout measured
# ~1.3x slower at decode's 4 rows; 2 to 16 measure alike, for 1 row too.
PACKED_ROWS_HINT = 4
PACKED_DTYPES = (torch.float32, torch.bfloat16)
# A packed product costs ~10 us per call whatever its size; a plain one below this many weight elements is faster
# (fp32, 4 rows: 16x128 1.9 vs 11 us, 448x128 8.8 vs 11.6 us; 1024x128 20.5 vs 16.3 us packed).
PACKED_MIN_ELEMENTS = 65536
# When a CPU MoE layer runs every row through all of its experts at once (two packed GEMMs, MoE._all_experts) rather
# than each expert through its rows: at decode's few rows, when most experts are chosen anyway, so the weights read
# are nearly the same and ~2 x experts GEMM calls become 2 (tiny model, batch 4: 12 % faster bf16 steps, 9 % fp32;
# batch 1, 3 of 8 experts: 3 % slower, so it stays per expert there). The extra multiply-adds on unchosen experts
# are what the row limit bounds.
ALL_EXPERTS_MAX_ROWS = 16
ALL_EXPERTS_MIN_ACTIVE = 0.75


def packed_gemms_enabled(dtype: torch.dtype = torch.float32) -> bool:
    """CPU GEMM weights of ``dtype`` pre-packed once at load (``DSBUILD_PACKED_GEMMS=0`` turns it off, e.g. to
    compare)."""
    return os.environ.get("DSBUILD_PACKED_GEMMS", "1") != "0" and _packed_gemms_work(dtype)


@functools.cache
def _packed_gemms_work(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU pre-pack ``dtype`` weights in oneDNN's layout (the ops inductor's weight
    freezing uses; internal to torch, so checked rather than assumed) and the product agrees with ``F.linear``;
    once per process and dtype. bf16 packing needs AVX512-BW/VL/DQ or AVX-NE-CONVERT: an AVX2-only CPU keeps
    plain bf16 weights and still packs float32 ones."""
    if dtype not in PACKED_DTYPES:
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(40, 24, generator=g).to(dtype), torch.randn(3, 5, 24, generator=g).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACKED_ROWS_HINT)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        want = F.linear(x, w)
        return got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def gemm_form(w: torch.Tensor) -> torch.Tensor:
    """A 2-D weight ([out, in]) in the form ``linear`` reads fastest at decode, made once at load: on CPU (float32,
    bfloat16) pre-packed in oneDNN's blocked layout, so each call skips the weight packing a plain GEMM does per
    call (decode, at 1-4 rows, is mostly that: 1.2-1.3x faster steps measured on the tiny model); elsewhere
    ``gemm_layout``. A packed weight serves ``linear`` only: read a layer's weights for anything else (absorption,
    stacking) before they are converted."""
    if packs_gemm(w):
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACKED_ROWS_HINT)
    return gemm_layout(w)


def packs_gemm(w: torch.Tensor) -> bool:
    """Whether ``gemm_form`` pre-packs ``w``."""
    return (w.device.type == "cpu" and w.ndim == 2 and w.numel() >= PACKED_MIN_ELEMENTS
            and packed_gemms_enabled(w.dtype))


@dataclass
class Step:
    """What every layer of one forward step shares."""

    pos: StepPositions
    cos: torch.Tensor  # [B, S, rope/2]
    sin: torch.Tensor
    visible: torch.Tensor  # [B, S, T] bool
    decode: bool  # one new token per row: absorbed MLA (when enabled) attends in the latent space

    def __post_init__(self) -> None:
        # Head-broadcast views for the queries, made once per step.
        self.cos_h, self.sin_h = self.cos[:, :, None], self.sin[:, :, None]


class Weights:
    """A rank's tensors under one name prefix."""

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: str = ""):
        self.t, self.prefix = tensors, prefix

    def __call__(self, name: str) -> torch.Tensor:
        return self.t[self.prefix + name]

    def has(self, name: str) -> bool:
        return self.prefix + name in self.t

    def sub(self, prefix: str) -> "Weights":
        return Weights(self.t, self.prefix + prefix)


class Indexer:
    """DSA: per query, the ``index_topk`` keys with the highest ReLU-weighted scores (all keys while fewer)."""

    def __init__(self, cfg: ModelConfig, w: Weights):
        self.cfg, self.w = cfg, w
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim

    def keys(self, k_pre: torch.Tensor, step: Step) -> torch.Tensor:
        k = F.layer_norm(k_pre, (self.head_dim,), self.w("k_norm.weight").to(k_pre.dtype),
                         self.w("k_norm.bias").to(k_pre.dtype), eps=1e-6)
        r = self.cfg.qk_rope_head_dim
        return torch.cat([rotate_half_split(k[..., :r], step.cos, step.sin), k[..., r:]], dim=-1)

    def select(self, x: torch.Tensor, q_resid: torch.Tensor, keys: torch.Tensor, step: Step) -> torch.Tensor | None:
        """[B, S, T] bool of the selected keys, or None when every visible key is selected."""
        if keys.shape[1] <= self.cfg.index_topk:
            return None
        top = self.scores(x, q_resid, keys, step).topk(self.cfg.index_topk, dim=-1).indices
        return torch.zeros_like(step.visible).scatter_(-1, top, True)

    def scores(self, x: torch.Tensor, q_resid: torch.Tensor, keys: torch.Tensor, step: Step) -> torch.Tensor:
        """[B, S, T] float32 index scores, -inf where the key is not visible."""
        B, S, _ = x.shape
        r = self.cfg.qk_rope_head_dim
        q = linear(q_resid, self.w("wq_b.weight")).view(B, S, self.n_heads, self.head_dim)
        q = torch.cat([rotate_half_split(q[..., :r], step.cos_h, step.sin_h), q[..., r:]], dim=-1)
        # Plain batched matmuls rather than einsum: at decode these are tiny and einsum's planning costs more than
        # the product.
        scores = torch.matmul(q.float().reshape(B, S * self.n_heads, -1), keys.float().transpose(1, 2))
        scores = F.relu(scores.view(B, S, self.n_heads, -1) * self.head_dim ** -0.5)  # [B, S, H, T]
        weights = linear(x.to(torch.float32), self.w("weights_proj.weight")) * self.n_heads ** -0.5  # [B, S, H]
        index = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)  # [B, S, T]
        return index.masked_fill(~step.visible, float("-inf"))


def absorbed_compositions(cfg: ModelConfig, *, q_in: int, o_out: int) -> tuple[bool, bool]:
    """Whether absorbed decode should read ``q_b_proj``'s nope rows pre-multiplied by ``W_UK`` (and ``o_proj``
    pre-multiplied by ``W_UV``) instead of the two factors: only where the product is the smaller matrix, since
    decode reads every weight once per step. Per head, so the same answer on every TP rank."""
    nope, v, c = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    return c * q_in < nope * q_in + nope * c, o_out * c < o_out * v + v * c


class MLA:
    """Multi-head latent attention over this rank's heads. The cache holds the normalised latent and the rotated
    shared rope key; the expanded path re-projects keys/values from it (prefill), the absorbed path folds
    ``kv_b_proj`` into the query and output sides and attends in the latent space (decode)."""

    def __init__(self, cfg: ModelConfig, w: Weights, *, tp: int, rope: RopeTable, absorb: bool):
        self.cfg, self.w, self.rope, self.absorb = cfg, w, rope, absorb
        self.heads = cfg.num_attention_heads // tp
        self.fused_a = w.has("fused_a.weight")
        self.indexer = Indexer(cfg, w.sub("indexer.")) if cfg.has_indexer else None
        nope, v, c, r = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        kv_b = w("kv_b_proj.weight").reshape(self.heads, nope + v, c)
        # Contiguous copies, made once: einsum would otherwise copy these strided views on every decode step.
        self.w_uk, self.w_uv = kv_b[:, :nope].contiguous(), kv_b[:, nope:].contiguous()  # [h, nope, c], [h, v, c]
        self.q_latent = self.o_latent = None
        if absorb:
            # Decode reads every weight once per step, so where multiplying the absorbed factors out ahead of time
            # gives a smaller matrix than the two factors together (the tiny model: nope = v = kv_lora), the
            # composed matrix is what decode reads. DeepSeek-V3.2's shapes (kv_lora 512 > nope 128) keep the factors.
            q_b = w("q_b_proj.weight")
            q_in, o_out = q_b.shape[1], w("o_proj.weight").shape[0]
            compose_q, compose_o = absorbed_compositions(cfg, q_in=q_in, o_out=o_out)
            if compose_q:
                q_b = q_b.reshape(self.heads, nope + r, q_in)
                q_lat = torch.einsum("hdc,hdi->hci", self.w_uk, q_b[:, :nope])  # [h, c, q_in]
                q_latent = torch.cat([q_lat, q_b[:, nope:]], dim=1).reshape(self.heads * (c + r), q_in)
                self.q_latent = gemm_form(q_latent)
            if compose_o:
                o = w("o_proj.weight").reshape(o_out, self.heads, v)
                self.o_latent = gemm_form(torch.einsum("ohv,hvc->ohc", o, self.w_uv).reshape(o_out, self.heads * c))

    def project_a(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.fused_a:
            parts = torch.split(linear(x, self.w("fused_a.weight")), [r for _, r in fused_a_parts(self.cfg)], dim=-1)
            return parts[0], parts[1], (parts[2] if len(parts) > 2 else None)
        idx_k = linear(x, self.w("indexer.wk.weight")) if self.indexer else None
        return linear(x, self.w("q_a_proj.weight")), linear(x, self.w("kv_a_proj_with_mqa.weight")), idx_k

    def __call__(self, x: torch.Tensor, cache: LayerCache, step: Step) -> torch.Tensor:
        cfg = self.cfg
        B, S, _ = x.shape
        nope, r, c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        q_a, kv_a, idx_k = self.project_a(x)
        q_resid = rms_norm(q_a, self.w("q_a_layernorm.weight"), cfg.rms_norm_eps)
        absorbed = self.absorb and step.decode
        if absorbed and self.q_latent is not None:
            q = linear(q_resid, self.q_latent).view(B, S, self.heads, c + r)
            q_lat, q_pe = q[..., :c], q[..., c:]
        else:
            q = linear(q_resid, self.w("q_b_proj.weight")).view(B, S, self.heads, cfg.qk_head_dim)
            q_nope, q_pe = q[..., :nope], q[..., nope:]
            if absorbed:
                q_lat = torch.einsum("bshd,hdc->bshc", q_nope, self.w_uk)
        q_pe = rotate_interleaved(q_pe, step.cos_h, step.sin_h)
        latent = rms_norm(kv_a[..., :c], self.w("kv_a_layernorm.weight"), cfg.rms_norm_eps)
        k_pe = rotate_interleaved(kv_a[..., c:], step.cos, step.sin)
        kv = kv_cache.write(cache.latent, torch.cat([latent, k_pe], dim=-1), step.pos)  # [B, T, c + r]
        allowed = step.visible
        if self.indexer is not None:
            keys = kv_cache.write(cache.index_k, self.indexer.keys(idx_k, step), step.pos)
            selected = self.indexer.select(x, q_resid, keys, step)
            if selected is not None:
                allowed = allowed & selected
        if absorbed:
            # One product against the cached [latent | rope key] rows: q_lat . c_kv + q_pe . k_rope.
            q_all = torch.cat([q_lat, q_pe], dim=-1).reshape(B, S * self.heads, c + r)
            # On CPU, scores, softmax and weighted sum in float32 whatever the compute dtype: at decode's few rows
            # oneDNN's bfloat16 batched matmuls cost more than converting the cached rows (bf16 steps 4-7 % faster
            # measured), and float32 is the more exact. A no-op in float32.
            rows = kv.float() if kv.device.type == "cpu" else kv
            scores = torch.matmul(q_all.to(rows.dtype), rows.transpose(1, 2)).view(B, S, self.heads, -1)
            probs = self._softmax(scores, allowed)
            context = torch.matmul(probs.reshape(B, S * self.heads, -1), rows[..., :c]).view(B, S, self.heads, c)
            context = context.to(kv.dtype)
            if self.o_latent is not None:
                return linear(context.reshape(B, S, -1), self.o_latent)
            out = torch.einsum("bshc,hvc->bshv", context, self.w_uv)
        else:
            c_kv, k_rope = kv[..., :c], kv[..., c:]
            kv_up = linear(c_kv, self.w("kv_b_proj.weight")).view(B, -1, self.heads, nope + cfg.v_head_dim)
            k_nope, value = kv_up[..., :nope], kv_up[..., nope:]
            scores = torch.einsum("bshd,bthd->bsht", q_nope, k_nope) + torch.einsum("bshr,btr->bsht", q_pe, k_rope)
            probs = self._softmax(scores, allowed)
            out = torch.einsum("bsht,bthv->bshv", probs, value)
        return linear(out.reshape(B, S, -1), self.w("o_proj.weight"))

    def _softmax(self, scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        scores = (scores * self.rope.softmax_scale).masked_fill(~allowed[:, :, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


class MLP:
    """SwiGLU over this rank's slice of the intermediate dim. ``active`` is False on the ranks that only hold a
    replica (TensorRT-LLM splits a dense/shared MLP over gcd(intermediate/128, tp) ranks): they add nothing, so the
    TP all-reduce sums each slice exactly once."""

    def __init__(self, w: Weights, *, active: bool = True):
        self.w, self.active = w, active
        self.fused = w.has("gate_up_proj.weight")

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.active:
            return None
        if self.fused:
            gate, up = linear(x, self.w("gate_up_proj.weight")).chunk(2, dim=-1)
        else:
            gate, up = linear(x, self.w("gate_proj.weight")), linear(x, self.w("up_proj.weight"))
        return linear(F.silu(gate) * up, self.w("down_proj.weight"))


def route(cfg: ModelConfig, x: torch.Tensor, w: Weights) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's sigmoid scores in float32, then ``noaux_tc`` selection (``builder.model.functional``)."""
    scores = linear(x.to(torch.float32), w("gate.weight")).sigmoid()
    return noaux_tc_route(cfg, scores, w("gate.e_score_correction_bias"))


class MoE:
    """Routed experts of this rank (its EP block, its moe-TP slice of each) plus the shared expert. Every rank
    routes all tokens (the router is replicated) and computes its experts' partial outputs; the TP all-reduce that
    follows is the combine (each (expert, slice) pair lives on exactly one rank of the TP group)."""

    def __init__(self, cfg: ModelConfig, w: Weights, *, experts: list[int], shared_active: bool):
        self.cfg, self.w, self.experts = cfg, w, experts
        self.shared = MLP(w.sub("shared_experts."), active=shared_active) if cfg.n_shared_experts else None
        self.stacked = w.has("experts.down_proj.weight")
        e = w.sub("experts.")
        self.gate_up = self.down = None  # [E, out, in] stacks for the batched GEMM
        self.expert_gemms: list[tuple[torch.Tensor, torch.Tensor]] = []  # or each expert's pair, pre-packed
        self.all_experts: tuple[torch.Tensor, torch.Tensor] | None = None  # (+ all of them side by side)
        if self.stacked:
            gate_up = e("gate_up_proj.weight") if e.has("gate_up_proj.weight") else \
                torch.cat([e("gate_proj.weight"), e("up_proj.weight")], dim=1)
            down = e("down_proj.weight")
            for name in ("gate_proj.weight", "up_proj.weight", "gate_up_proj.weight", "down_proj.weight"):
                w.t.pop(w.prefix + "experts." + name, None)
            if packs_gemm(gate_up[0]):
                # Pre-packed per-expert GEMMs beat one batched GEMM over plain weights at decode (4.9 vs 5.4 ms per
                # step, fp32, batch 4, every GEMM packed). The packed pairs replace the stack (w.t: loaded bytes).
                for i in range(len(experts)):
                    pair = gemm_form(gate_up[i]), gemm_form(down[i])
                    self.expert_gemms.append(pair)
                    w.t[f"{w.prefix}experts.{i}.packed.gate_up_proj.weight"], \
                        w.t[f"{w.prefix}experts.{i}.packed.down_proj.weight"] = pair
                # And all experts side by side, for decode batches that reach most experts (_all_experts): a second
                # copy of the expert weights, for two GEMMs per layer instead of two per expert.
                E, two_i, hidden = gate_up.shape
                self.all_experts = (gemm_form(gate_up.reshape(E * two_i, hidden)),
                                    gemm_form(down.permute(1, 0, 2).reshape(hidden, E * (two_i // 2))))
                w.t[w.prefix + "experts.all.packed.gate_up_proj.weight"], \
                    w.t[w.prefix + "experts.all.packed.down_proj.weight"] = self.all_experts
            else:
                # Made once at load, so that both the batched GEMM and the per-expert GEMMs run without a per-call
                # copy of the weights.
                self.gate_up, self.down = gemm_layout(gate_up), gemm_layout(down)
                w.t[w.prefix + "experts.gate_up_proj.weight"], w.t[w.prefix + "experts.down_proj.weight"] = \
                    self.gate_up, self.down
        self.local = torch.full((cfg.n_routed_experts,), -1, dtype=torch.long)
        self.local[torch.tensor(experts, dtype=torch.long)] = torch.arange(len(experts))

    def _expert(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.stacked:
            gate_up, down = self.expert_gemms[i] if self.expert_gemms else (self.gate_up[i], self.down[i])
            gate, up = linear(x, gate_up).chunk(2, dim=-1)
            return linear(F.silu(gate) * up, down)
        return MLP(self.w.sub(f"experts.{self.experts[i]}."))(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.routed(x)
        shared = self.shared_output(x)
        return out if shared is None else out + shared

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.shared(x) if self.shared is not None else None

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's routed experts' part of the output for every row of ``x``."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        idx, weights = route(self.cfg, x, self.w)
        local = self.local.to(idx.device)[idx]  # [N, k] local expert slot or -1
        enough = ALL_EXPERTS_MIN_ACTIVE * len(self.experts)
        if self.all_experts is not None and enough <= local.numel() and x.shape[0] <= ALL_EXPERTS_MAX_ROWS:
            active = int((torch.bincount(local[local >= 0], minlength=len(self.experts)) > 0).sum())
            if active >= enough:
                return self._all_experts(x, local, weights).view(shape)
        out = torch.zeros_like(x)
        token, slot = torch.nonzero(local >= 0, as_tuple=True)
        if token.numel():
            which = local[token, slot]
            order = torch.argsort(which, stable=True)  # assignments grouped by expert, tokens in order within
            token, which, wts = token[order], which[order], weights[token, slot][order].to(x.dtype)
            counts = torch.bincount(which, minlength=len(self.experts))
            if self.gate_up is not None and bool((counts > 0).all()):
                # Every local expert has tokens: one batched GEMM reads each expert's weights once. With some
                # experts idle, the per-expert loop below reads only the experts in use (decode is bound by
                # weight reads), as a grouped GEMM skips empty groups.
                y = self._grouped(x, which, token, counts)
            else:
                rows = x[token]
                y = torch.cat([self._expert(i, part) for i, part in enumerate(rows.split(counts.tolist()))
                               if part.shape[0]])
            out.index_add_(0, token, y * wts[:, None])
        return out.view(shape)

    def _all_experts(self, x: torch.Tensor, local: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every row through every local expert in two GEMMs, each expert's output scaled by the row's routing
        weight for it (0 where not chosen) before ``down`` sums them: the same sum as the per-expert path."""
        E = len(self.experts)
        gates = x.new_zeros(x.shape[0], E + 1)  # column E takes the other ranks' experts, then is dropped
        gates.scatter_(1, local.masked_fill(local < 0, E), weights.to(x.dtype))
        gate_up, down = self.all_experts
        gate, up = linear(x, gate_up).view(x.shape[0], E, -1).chunk(2, dim=-1)
        return linear((F.silu(gate) * up * gates[:, :E, None]).reshape(x.shape[0], -1), down)

    def _grouped(self, x, which, token, counts):
        """One batched GEMM over the stacked experts (assignments sorted by expert), each group padded to the
        largest; returns the assignments' expert outputs in their order."""
        E = len(self.experts)
        cap = int(counts.max())
        offsets = torch.cumsum(counts, 0) - counts
        col = torch.arange(which.numel(), device=x.device) - offsets[which]
        gathered = x.new_zeros(E, cap, x.shape[-1])
        gathered[which, col] = x[token]
        gate, up = torch.bmm(gathered, self.gate_up.transpose(1, 2)).chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, self.down.transpose(1, 2))  # [E, cap, H]
        return y[which, col]

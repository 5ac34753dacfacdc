"""Deterministic CPU training of the tiny presets on the shipped corpus.

Objective (DeepSeek-V3/V3.2's): next-token cross-entropy + ``mtp_weight`` x the MTP module's next-next-token
cross-entropy + the DSA indexer's KL loss to the main attention (its inputs detached, so it trains only the
indexer). The first ``dense_steps`` attend densely (DeepSeek's dense warm-up, while the indexer learns); the rest
attend only to the indexer's top-k keys, as inference does. Router balance is DeepSeek's aux-loss-free rule: after
every step each MoE layer's ``e_score_correction_bias`` moves by ``bias_update_rate`` towards the mean load
(up for under-loaded experts, down for over-loaded ones). Matmuls run under bf16 autocast, master weights fp32.
Same seed, same thread count, same machine -> the same weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from builder.model.config import tiny_config
from builder.train.data import TokenData, perplexity, unigram_nll
from builder.train.model import TinyDeepseekV32, export_weights, init_weights


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "tiny"
    seed: int = 0
    steps: int = 600
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_weight: float = 0.3
    dense_steps: int = 60
    bias_update_rate: float = 1e-3
    eval_sequences: int = 64
    threads: int = 1
    bf16: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


# The committed checkpoints' recipes, sized for ~10 minutes of a free 2-core machine. Measured per core (bf16
# autocast, about 2x fp32's throughput on this AVX512-BF16 CPU): the target ~1300 and the draft ~4300 training
# tokens per CPU second, flat from batch 8 to 32 (the step is matmul-bound, per-step overhead is small), so a bigger
# batch buys no throughput and only costs updates. Two threads per model would share a step (~1.8x on a free
# machine) but stall badly on a loaded one (every op waits for both threads to be scheduled: 20+ s per step measured
# next to other jobs), so each model trains on one thread, side by side. The target's core sets the wall time:
# 600 x 8 x 128 = 491k tokens (~8 minutes); the draft, half the layers and experts, gets the same steps on the other
# core in a third of the time and stays the weaker model. Higher peak rates were worse on held-out text (400 steps:
# lr 6e-3 -> ppl 163, 1.2e-2 -> 182, against 130 for lr 3e-3 in 300 steps).
RECIPES: dict[str, TrainConfig] = {
    "tiny": TrainConfig(preset="tiny", steps=600, dense_steps=40),
    "tiny-draft": TrainConfig(preset="tiny-draft", steps=600, dense_steps=40),
}


# How many initial step losses a report keeps (a short rerun must reproduce them).
FIRST_LOSSES = 5
# Held-out sequences of the small evaluation the fast tests repeat.
SMALL_EVAL_SEQUENCES = 8


@dataclass
class TrainResult:
    config: TrainConfig
    weights: dict[str, torch.Tensor]
    metrics: dict
    losses: list[float]


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: TinyDeepseekV32, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for _, p in sorted(model.named_parameters()) if p.ndim >= 2]
    other = [p for _, p in sorted(model.named_parameters()) if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, foreach=False)


def losses_of(model: TinyDeepseekV32, ids: torch.Tensor, *, sparse: bool, indexer_loss: bool):
    out = model(ids, sparse=sparse, indexer_loss=indexer_loss)
    v = model.cfg.vocab_size
    main = F.cross_entropy(out.logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1))
    mtp = None
    if out.mtp_logits is not None:
        mtp = F.cross_entropy(out.mtp_logits[:, :-1].reshape(-1, v).float(), ids[:, 2:].reshape(-1))
    return main, mtp, out.indexer_loss


@torch.no_grad()
def update_router_bias(model: TinyDeepseekV32, rate: float) -> None:
    for moe in model.moe_layers():
        load = moe.last_load
        moe.gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)


@torch.no_grad()
def evaluate(model: TinyDeepseekV32, data: TokenData, *, seq_len: int, max_sequences: int,
             chunk: int = 16) -> dict[str, float]:
    """Held-out mean NLL (nats) of the next token, and of the MTP head's next-next token; fp32, sparse attention."""
    model.eval()
    ids = data.heldout_batches(seq_len=seq_len, max_sequences=max_sequences)
    main_sum = mtp_sum = 0.0
    main_n = mtp_n = 0
    for part in ids.split(chunk):
        main, mtp, _ = losses_of(model, part, sparse=True, indexer_loss=False)
        n = part.shape[0] * (part.shape[1] - 1)
        main_sum += float(main) * n
        main_n += n
        if mtp is not None:
            m = part.shape[0] * (part.shape[1] - 2)
            mtp_sum += float(mtp) * m
            mtp_n += m
    out = {"nll": main_sum / main_n, "tokens": main_n}
    out["ppl"] = perplexity(out["nll"])
    if mtp_n:
        out["mtp_nll"] = mtp_sum / mtp_n
        out["mtp_ppl"] = perplexity(out["mtp_nll"])
    out["unigram_nll"] = unigram_nll(data.train, ids[:, 1:], vocab_size=model.cfg.vocab_size)
    out["unigram_ppl"] = perplexity(out["unigram_nll"])
    return out


def train(cfg: TrainConfig, data: TokenData, *, progress: Callable[[int, float], None] | None = None,
          evaluate_at_end: bool = True) -> TrainResult:
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, data, progress, evaluate_at_end)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, data: TokenData, progress, evaluate_at_end: bool) -> TrainResult:
    model_cfg = tiny_config(cfg.preset)
    model = TinyDeepseekV32(model_cfg)
    init_weights(model, seed=cfg.seed)
    opt = _optimizer(model, cfg)
    batches = torch.Generator().manual_seed(cfg.seed + 1)
    losses: list[float] = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        ids = data.train_batch(batches, batch_size=cfg.batch_size, seq_len=cfg.seq_len)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            main, mtp, idx = losses_of(model, ids, sparse=step >= cfg.dense_steps, indexer_loss=True)
        loss = main + (cfg.mtp_weight * mtp if mtp is not None else 0) + (idx if idx is not None else 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=False)
        opt.step()
        update_router_bias(model, cfg.bias_update_rate)
        losses.append(float(main.detach()))
        if progress is not None:
            progress(step, losses[-1])
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    # CPU seconds (all threads of this process) next to wall seconds: on a shared machine wall time alone says
    # little about what the recipe costs.
    metrics: dict = {"train_wall_s": round(train_s, 1), "train_cpu_s": round(cpu_s, 1),
                     "cpu_s_per_step": round(cpu_s / max(1, cfg.steps), 3),
                     "final_train_loss": losses[-1] if losses else None, "first_losses": losses[:FIRST_LOSSES]}
    if evaluate_at_end:
        metrics["heldout"] = evaluate(model, data, seq_len=cfg.seq_len, max_sequences=cfg.eval_sequences)
        metrics["heldout_small"] = evaluate(model, data, seq_len=cfg.seq_len, max_sequences=SMALL_EVAL_SEQUENCES)
    metrics["router_bias_abs_mean"] = [round(float(m.gate.e_score_correction_bias.abs().mean()), 4)
                                       for m in model.moe_layers()]
    return TrainResult(cfg, export_weights(model), metrics, losses)


def with_steps(cfg: TrainConfig, steps: int) -> TrainConfig:
    """The same recipe cut (or extended) to ``steps``; warm-up and the dense phase keep their lengths, so the first
    steps of a short run are exactly those of the full one."""
    return replace(cfg, steps=steps)

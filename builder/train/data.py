"""Token streams for training and evaluation, and the unigram baseline.

Training text is ``builder/data/corpus/*.txt`` (what the tokenizer is trained on); held-out text is
``builder/data/corpus/heldout/*.txt`` (the last 5 % of every novel, never seen by the tokenizer or the model).
Every sequence starts with BOS, as served prompts do (``add_bos_token``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from builder.model.tokenizer import CORPUS_DIR, corpus_files

BOS_ID = 0


def heldout_files(corpus: str | Path | None = None) -> list[Path]:
    root = Path(corpus) if corpus is not None else CORPUS_DIR
    return sorted((root / "heldout").glob("*.txt"))


def encode_files(tok, files: list[Path]) -> torch.Tensor:
    ids: list[int] = []
    for f in files:
        ids.extend(tok.encode(f.read_text(encoding="utf-8")).ids)
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class TokenData:
    train: torch.Tensor  # 1-D token ids
    heldout: torch.Tensor

    @classmethod
    def from_tokenizer(cls, tok, corpus: str | Path | None = None) -> "TokenData":
        held = heldout_files(corpus)
        if not held:
            raise FileNotFoundError(f"no held-out text under {(Path(corpus) if corpus else CORPUS_DIR) / 'heldout'}")
        return cls(encode_files(tok, corpus_files(corpus)), encode_files(tok, held))

    def train_batch(self, gen: torch.Generator, *, batch_size: int, seq_len: int) -> torch.Tensor:
        """``batch_size`` windows at random offsets, each BOS + ``seq_len - 1`` consecutive tokens."""
        starts = torch.randint(0, len(self.train) - seq_len, (batch_size,), generator=gen)
        body = torch.stack([self.train[s: s + seq_len - 1] for s in starts.tolist()])
        return torch.cat([torch.full((batch_size, 1), BOS_ID), body], dim=1)

    def heldout_batches(self, *, seq_len: int, max_sequences: int) -> torch.Tensor:
        """The held-out stream cut into consecutive BOS-led sequences, the first ``max_sequences`` of them."""
        n = min(max_sequences, len(self.heldout) // (seq_len - 1))
        body = self.heldout[: n * (seq_len - 1)].view(n, seq_len - 1)
        return torch.cat([torch.full((n, 1), BOS_ID), body], dim=1)


def unigram_nll(train: torch.Tensor, targets: torch.Tensor, *, vocab_size: int) -> float:
    """Mean negative log-likelihood (nats) of ``targets`` under add-one-smoothed training token frequencies."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[targets.flatten()].mean())


def perplexity(nll: float) -> float:
    return math.exp(nll)

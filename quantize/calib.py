"""Calibration prompts: token windows cut from the plain-text corpus shipped in ``builder/data/corpus``.

Every ``*.txt`` there is read (in name order), tokenized with the checkpoint's own ``tokenizer.json``, and
``count`` windows of ``seq_len`` tokens are taken at evenly spaced offsets (wrapping round a short corpus), so the
same corpus, tokenizer and sizes always give the same prompts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from builder.errors import QuantizationError
from builder.model.tokenizer import corpus_files


def calibration_tokens(tokenizer_json: str | Path, *, count: int, seq_len: int,
                       corpus: str | Path | None = None) -> torch.Tensor:
    from tokenizers import Tokenizer

    files = corpus_files(corpus)
    if not files:
        raise QuantizationError(f"no *.txt calibration text in {corpus or 'builder/data/corpus'}")
    if not Path(tokenizer_json).is_file():
        raise QuantizationError(f"calibration needs the checkpoint's tokenizer, but {tokenizer_json} does not exist")
    tok = Tokenizer.from_file(str(tokenizer_json))
    ids: list[int] = []
    for f in files:
        ids.extend(tok.encode(f.read_text(encoding="utf-8")).ids)
    if len(ids) < 2:
        raise QuantizationError("the calibration corpus tokenizes to fewer than two tokens")
    stream = torch.tensor(ids, dtype=torch.long)
    span = max(len(ids) - seq_len, 1)
    starts = [(i * span) // max(count, 1) for i in range(count)]
    idx = (torch.tensor(starts)[:, None] + torch.arange(seq_len)[None, :]) % len(ids)
    return stream[idx]

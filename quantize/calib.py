"""Calibration prompts: token windows cut from the plain-text corpus shipped in ``builder/data/corpus``.

Every ``*.txt`` there is read (in name order), tokenized with the checkpoint's own ``tokenizer.json``, and
``count`` windows of ``seq_len`` tokens are taken at evenly spaced offsets (wrapping round a short corpus), so the
same corpus, tokenizer and sizes always give the same prompts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, TextIO

import torch
from tqdm.auto import tqdm

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


class CalibrationProgress:
    """How far one calibration pass over the prompts is: prompts and tokens done, elapsed time and ETA. A tqdm bar
    when ``stream`` is a terminal; otherwise (a log file, CI) a line through ``log`` at every tenth of the pass."""

    def __init__(self, what: str, *, prompts: int, tokens_per_prompt: int, log: Callable[[str], None],
                 stream: TextIO | None = None):
        self.what, self.prompts, self.tokens_per_prompt, self.log = what, prompts, tokens_per_prompt, log
        self.done = 0
        self.next_tenth = 1
        self.t0 = time.perf_counter()
        stream = stream if stream is not None else sys.stderr
        self.bar = (tqdm(total=prompts, unit="prompt", desc=what, file=stream, leave=False, dynamic_ncols=True)
                    if stream.isatty() else None)

    def step(self) -> None:
        """One prompt calibrated."""
        self.done += 1
        tokens = self.done * self.tokens_per_prompt
        if self.bar is not None:
            self.bar.set_postfix_str(f"{tokens} tokens", refresh=False)
            self.bar.update(1)
            return
        if self.done * 10 >= self.next_tenth * self.prompts:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / self.done * (self.prompts - self.done)
            total = self.prompts * self.tokens_per_prompt
            self.log(f"{self.what}: {self.done}/{self.prompts} prompts, {tokens}/{total} tokens, {elapsed:.0f} s, "
                     f"ETA {eta:.0f} s")
            self.next_tenth = self.done * 10 // self.prompts + 1

    def __enter__(self) -> "CalibrationProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

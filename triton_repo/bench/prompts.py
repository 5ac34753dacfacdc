"""Benchmark prompts: synthetic ones of exact token lengths made with the served model's own tokenizer, or real
ones from a dataset file. Lengths count the tokens the model sees (``builder.engine.text.encode_prompt``: the
tokenizer's ids, plus BOS when the tokenizer config says ``add_bos_token``)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from builder.engine.bundle import EngineBundle
from builder.engine.text import encode_prompt
from builder.errors import SpecError

MAX_WORD_TOKENS = 4096  # enough variety; scanning a 129k vocabulary whole would cost seconds


@dataclass(frozen=True)
class Length:
    """A token length distribution: normal(mean, std), rounded and clipped to at least ``minimum``."""

    mean: int
    std: float = 0.0

    @classmethod
    def parse(cls, text: str, *, what: str) -> "Length":
        mean_s, _, std_s = str(text).partition(":")
        try:
            mean, std = int(mean_s), float(std_s) if std_s else 0.0
        except ValueError:
            raise SpecError(f"{what} must be MEAN or MEAN:STD in tokens, got {text!r}") from None
        if mean < 1 or std < 0:
            raise SpecError(f"{what} needs a mean of at least 1 and a non-negative std, got {text!r}")
        return cls(mean, std)

    def sample(self, rng: random.Random, *, minimum: int = 1) -> int:
        return max(minimum, round(rng.gauss(self.mean, self.std))) if self.std else max(minimum, self.mean)


@dataclass(frozen=True)
class Prompt:
    text: str
    tokens: int  # as the model will see it


class PromptTokenizer:
    """The served run's tokenizer (its ``engines/`` directory), counting tokens as the model does."""

    def __init__(self, engines_dir: Path):
        self.bundle = EngineBundle.open(engines_dir)
        self.tokenizer = self.bundle.tokenizer()
        self._safe_ids = self._round_trip_ids()

    def prompt_ids(self, text: str) -> list[int]:
        return encode_prompt(self.bundle, self.tokenizer, text)

    def count_prompt(self, text: str) -> int:
        return len(self.prompt_ids(text))

    def count_output(self, text: str) -> int:
        """Tokens of generated text (no special tokens added)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids) if text else 0

    def _round_trip_ids(self) -> list[int]:
        """Ordinary tokens that decode to a space-led word and encode back to themselves: sequences of them
        re-tokenize (nearly) one to one, so a prompt of an exact length is found in a step or two."""
        special = {int(t) for t in self.tokenizer.get_added_tokens_decoder()}
        ids = []
        for tid in range(self.tokenizer.get_vocab_size()):
            if tid in special:
                continue
            piece = self.tokenizer.decode([tid])
            if len(piece) >= 2 and piece[0] == " " and piece[1:].isalpha() and \
                    self.tokenizer.encode(piece, add_special_tokens=False).ids == [tid]:
                ids.append(tid)
                if len(ids) >= MAX_WORD_TOKENS:
                    break
        if len(ids) < 8:
            raise SpecError("the model's tokenizer has too few word tokens to make synthetic prompts; use --dataset")
        return ids

    def synthetic(self, tokens: int, rng: random.Random) -> Prompt:
        """A prompt that encodes to exactly ``tokens`` tokens (checked), of random words of the vocabulary."""
        overhead = self.count_prompt("a") - self.count_output("a")  # BOS and the like
        if tokens <= overhead:
            raise SpecError(f"an input length of {tokens} tokens leaves no room for text after {overhead} special "
                            "token(s)")
        ids = [rng.choice(self._safe_ids) for _ in range(tokens - overhead)]
        for _ in range(64):
            text = self.tokenizer.decode(ids)
            have = self.count_prompt(text)
            if have == tokens:
                return Prompt(text, have)
            if have > tokens:
                ids = ids[:-1] if len(ids) > 1 else ids
            else:
                ids.append(rng.choice(self._safe_ids))
        raise SpecError(f"could not make a prompt of exactly {tokens} tokens with this tokenizer")


def load_dataset(path: Path, tokenizer: PromptTokenizer) -> list[Prompt]:
    """Prompts from ``path``: JSON Lines with a "prompt" field, or else one prompt per non-empty text line."""
    if not path.is_file():
        raise SpecError(f"dataset {path} does not exist")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise SpecError(f"dataset {path} holds no prompts")
    texts: list[str] = []
    jsonl = lines[0].lstrip().startswith("{")
    for n, line in enumerate(lines, 1):
        if not jsonl:
            texts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{path} line {n} is not valid JSON ({exc.msg})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt:
            raise SpecError(f"{path} line {n} has no non-empty string \"prompt\" field")
        texts.append(prompt)
    return [Prompt(t, tokenizer.count_prompt(t)) for t in texts]

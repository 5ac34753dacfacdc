"""The tiny model's tokenizer: byte-level BPE (so any text encodes) trained with the ``tokenizers`` library on the
corpus shipped in ``builder/data/corpus``; DeepSeek's BOS/EOS special tokens at ids 0 and 1."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from builder.atomic import atomic_write_json, atomic_write_text

CORPUS_DIR = Path(__file__).resolve().parent.parent / "data" / "corpus"
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"


def corpus_files(corpus: str | Path | None = None) -> list[Path]:
    root = Path(corpus) if corpus is not None else CORPUS_DIR
    if root.is_file():
        return [root]
    return sorted(root.glob("*.txt"))


def corpus_sha256(corpus: str | Path | None = None) -> str:
    h = hashlib.sha256()
    for f in corpus_files(corpus):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def train_tokenizer(*, vocab_size: int, corpus: str | Path | None = None):
    """A fresh tokenizer (deterministic for a corpus); training on the shipped corpus takes seconds, so the
    result is memoised per (vocab size, corpus content) within a process."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_tokenizer_json(vocab_size, corpus_sha256(corpus), str(corpus or "")))


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int, corpus_sha: str, corpus: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [f.read_text(encoding="utf-8") for f in corpus_files(corpus or None)]
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def write_tokenizer_files(tok, out: str | Path, *, model_max_length: int) -> None:
    out = Path(out)
    atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=True))
    atomic_write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "add_bos_token": True,
        "add_eos_token": False, "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
    })

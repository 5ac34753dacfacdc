"""The draft model of ``--spec draft``, built inside the build stage: fetched and checked like the target
(``builder.stages.fetch``), converted with the run's weight format (``builder.stages.quantize``) into
``engines/draft/hf`` (the HF-layout checkpoint TensorRT-LLM's ``speculative_model`` points at), and laid out as a
one-rank reference-engine bundle in ``engines/draft/`` (the reference engine runs the draft whole on its sampler
rank; TensorRT-LLM shards the draft itself with the target's mapping when it loads).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

from builder.errors import CheckpointError
from builder.model.config import ModelConfig
from builder.shard.rules import Layout
from builder.trtllm.speculative import DRAFT_DIR, DRAFT_HF_DIR


def draft_spec(spec):
    """The run spec with the draft model in the model's place (so fetch's source resolution applies to it)."""
    return spec.model_copy(update={"model": spec.draft_model})


def key_inputs(spec, upstream: dict[str, Any]) -> dict[str, Any]:
    if spec.spec != "draft":
        return {}
    from builder.stages import fetch

    return {"draft_source": fetch.key_inputs(draft_spec(spec), upstream)}


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def build_draft(spec, target_src: Path, engines: Path, *, fusion) -> dict[str, Any]:
    from builder.stages import fetch, quantize
    from builder.stages.build import write_engine_bundle

    src = fetch.source_dir(draft_spec(spec))
    cfg = ModelConfig.from_json_file(src / "config.json")
    target = ModelConfig.from_json_file(Path(target_src) / "config.json")
    if cfg.vocab_size != target.vocab_size:
        raise CheckpointError(f"draft model {spec.draft_model} has a vocabulary of {cfg.vocab_size}, the target "
                              f"{target.vocab_size}; a draft model must share the target's tokenizer")
    mine, theirs = _sha(src / "tokenizer.json"), _sha(Path(target_src) / "tokenizer.json")
    if mine and theirs and mine != theirs:
        raise CheckpointError(f"draft model {spec.draft_model} has a different tokenizer.json from the target's; "
                              "a draft model must share the target's tokenizer")
    if spec.quant not in quantize.MODES:
        raise CheckpointError(f"weight format {spec.quant!r} is not available for the draft model")
    hf = engines / DRAFT_HF_DIR
    with tempfile.TemporaryDirectory(prefix="dsbuild-draft-") as tmp:
        weights = Path(tmp)
        fetched = fetch.materialize(src, weights, cfg, skip_mtp=False)
        hf.mkdir(parents=True)
        quantize.MODES[spec.quant](weights, hf, spec.kv_cache_dtype)
    info = write_engine_bundle(hf, engines / DRAFT_DIR, layout=Layout(tp=1, pp=1, ep=1), fusion=fusion)
    return {"model": spec.draft_model, "layers": cfg.num_hidden_layers, "tensors": fetched["tensors"], **info}

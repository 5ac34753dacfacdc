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
from builder.pipeline import StageContext
from builder.layout import Layout
from builder.trtllm.speculative import DRAFT_DIR, DRAFT_HF_DIR


def draft_spec(spec):
    """The run spec with the draft model in the model's place, so that the fetch and quantize stages' own code
    applies to it (the target's include/exclude patterns and --skip-mtp do not)."""
    return spec.model_copy(update={"model": spec.draft_model, "revision": "main", "include": [], "exclude": [],
                                   "skip_mtp": False})


def key_inputs(spec, upstream: dict[str, Any]) -> dict[str, Any]:
    if spec.spec != "draft":
        return {}
    from builder.stages import fetch

    return {"draft_source": fetch.key_inputs(draft_spec(spec), upstream)}


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def build_draft(ctx: StageContext, *, target_src: Path, fusion) -> dict[str, Any]:
    """Fetch (into a temporary directory), check against the target, quantize into ``engines/draft/hf`` and lay
    out ``engines/draft/`` -- all inside the build stage's own output directory."""
    from builder.stages import fetch, quantize
    from builder.stages.build import write_engine_bundle

    spec = draft_spec(ctx.spec)
    hf = ctx.out / DRAFT_HF_DIR
    with tempfile.TemporaryDirectory(prefix="dsbuild-draft-") as tmp:
        weights = Path(tmp)
        sub = dict(spec=spec, run_dir=ctx.run_dir, upstream={}, log=ctx.log)
        fetched = fetch.run(StageContext(out=weights, inputs={}, extra=fetch.key_inputs(spec, {}), **sub))
        cfg = ModelConfig.from_json_file(weights / "config.json")
        target = ModelConfig.from_json_file(Path(target_src) / "config.json")
        if cfg.vocab_size != target.vocab_size:
            raise CheckpointError(f"draft model {spec.model} has a vocabulary of {cfg.vocab_size}, the target "
                                  f"{target.vocab_size}; a draft model must share the target's tokenizer")
        mine, theirs = _sha(weights / "tokenizer.json"), _sha(Path(target_src) / "tokenizer.json")
        if mine and theirs and mine != theirs:
            raise CheckpointError(f"draft model {spec.model} has a different tokenizer.json from the target's; "
                                  "a draft model must share the target's tokenizer")
        hf.mkdir(parents=True)
        quantize.run(StageContext(out=hf, inputs={"fetch": weights}, extra={}, **sub))
    info = write_engine_bundle(hf, ctx.out / DRAFT_DIR, layout=Layout(tp=1, pp=1, ep=1), fusion=fusion)
    return {"model": spec.model, "layers": cfg.num_hidden_layers, "fetch": fetched, **info}

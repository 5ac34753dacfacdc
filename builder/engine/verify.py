"""``dsbuild verify``: fixed prompts through the reference engine (the bundle's TP x PP world) and through
transformers' ``DeepseekV32ForCausalLM`` (fp32, eager) on the same checkpoint dequantized; reports
``max_abs_err``, ``max_rel_err`` (max |err| / max |logit|, over every prompt position) and ``greedy_match``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from builder.engine.sampling import GenerationRequest
from builder.engine.service import EngineService
from builder.errors import CheckpointError
from builder.model.hf_compat import load_hf_model, write_dequantized_checkpoint
from builder.rundir import RunDir
from builder.sampling_params import SamplingParams

FIXED_TEXTS = (
    "The river kept its own counsel, and the town below it learned to listen in the evenings.",
    "Numbers, like rivers, remember where they came from.",
    "A short one.",
)
DEFAULT_TOLERANCE = 1e-4


def fixed_prompts(tokenizer, bos_token_id: int | None) -> list[list[int]]:
    prefix = [bos_token_id] if bos_token_id is not None else []
    return [prefix + tokenizer.encode(t).ids for t in FIXED_TEXTS]


def default_checkpoint(engine_dir: Path) -> Path:
    """The run directory's ``quantized/`` next to its ``engines/``: the checkpoint the bundle was cut from."""
    return RunDir.of_engines(engine_dir).quantized


def verify_engine(engine_dir: str | Path, *, checkpoint: str | Path | None = None, gen_tokens: int = 8,
                  tolerance: float = DEFAULT_TOLERANCE, threads_per_rank: int | None = None,
                  python_executable: str | None = None) -> dict[str, Any]:
    engine_dir = Path(engine_dir)
    checkpoint = Path(checkpoint) if checkpoint else default_checkpoint(engine_dir)
    if not (checkpoint / "config.json").is_file():
        raise CheckpointError(f"no checkpoint to compare with at {checkpoint}; pass --checkpoint DIR")
    with EngineService(engine_dir, threads_per_rank=threads_per_rank, python_executable=python_executable) as svc:
        cfg = svc.bundle.cfg
        prompts = fixed_prompts(svc.tokenizer(), cfg.raw.get("bos_token_id"))
        logits = svc.prompt_logits(prompts)
        greedy = [r.token_ids for r in svc.generate([GenerationRequest(p, SamplingParams(max_tokens=gen_tokens))
                                                     for p in prompts])]
        layout = svc.bundle.layout.name
    with tempfile.TemporaryDirectory(prefix="dsbuild-verify-") as tmp:
        model = load_hf_model(write_dequantized_checkpoint(checkpoint, Path(tmp) / "fp32"))
        abs_err = rel_err = 0.0
        ref_greedy = []
        with torch.no_grad():
            for p, got in zip(prompts, logits):
                ids = torch.tensor([p])
                ref = model(ids).logits[0].float()
                err = float((got - ref).abs().max())
                abs_err, rel_err = max(abs_err, err), max(rel_err, err / float(ref.abs().max()))
                ref_greedy.append(model.generate(ids, max_new_tokens=gen_tokens, do_sample=False)[0, len(p):].tolist())
    match = greedy == ref_greedy
    return {"layout": layout, "prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts],
            "gen_tokens": gen_tokens, "max_abs_err": abs_err, "max_rel_err": rel_err, "tolerance": tolerance,
            "greedy_match": match, "ok": bool(rel_err <= tolerance and match)}

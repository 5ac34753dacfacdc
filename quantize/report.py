"""``quant_report.json``: what a format costs in accuracy, measured, for every quantize run.

- Per tensor (every weight, norm and bias the output holds): SQNR in dB of the format's dequantized weight against the source dequantized to BF16
  (``10 log10(sum w^2 / sum (w - w_q)^2)``), summarised by tensor kind.
- On the calibration prompts: mean KL(p_bf16 || p_quant) of the next-token distributions and top-1 agreement of
  the quantized model (weights dequantized by the format's own dequantizer, static FP8 activation scales applied
  as fake quantization where the format has them) against the BF16 model, both run by transformers in fp32, and
  each model's perplexity on the prompts' own next tokens (``ppl_reference``, ``ppl``, ``ppl_delta_pct``): with a
  trained model, the accuracy cost in the units people quote.
  This needs the whole model in memory: it runs when the model's float weights fit (the tiny model, small models);
  otherwise the report says it was skipped and why.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import torch

from builder.model.catalog import build_catalog
from builder.model.config import ModelConfig
from quantize import dequant
from quantize.hf_model import fake_quant_fp8_inputs, float_model, logits
from quantize.stream import TensorReader


def sqnr_db(ref: torch.Tensor, q: torch.Tensor) -> float:
    ref, q = ref.to(torch.float64), q.to(torch.float64)
    noise = (ref - q).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def reference_float(reader: TensorReader, name: str) -> torch.Tensor:
    """The BF16 reference of a source tensor: block FP8 dequantized and rounded to BF16, anything else as stored."""
    t = reader.dequantized(name, dtype=torch.float32)
    return t.to(torch.bfloat16).to(torch.float32) if reader.is_block_fp8(name) else t


def weight_sqnr(src: Path, quant: Path, *, mode: str) -> dict[str, Any]:
    cfg = ModelConfig.from_json_file(src / "config.json")
    kinds = {s.name: s.kind.value for s in build_catalog(cfg)}
    per: dict[str, float] = {}
    with TensorReader(src) as ref:
        names = set(ref.names)
        for name, w in dequant.iter_float(quant):
            if name not in names or w.dim() == 0:
                continue
            r = reference_float(ref, name)
            per[name] = round(sqnr_db(r, w), 3)
    by_kind: dict[str, list[float]] = {}
    for n, v in per.items():
        by_kind.setdefault(kinds.get(n, "other"), []).append(v)
    finite = [v for v in per.values() if math.isfinite(v)]
    return {
        "tensors": len(per),
        "min_db": min(finite) if finite else None,
        "median_db": statistics.median(finite) if finite else None,
        "lossless_tensors": sum(1 for v in per.values() if v == math.inf),
        "by_kind": {k: {"n": len(v), "min_db": _db(min(v)), "median_db": _db(statistics.median(v))}
                    for k, v in sorted(by_kind.items())},
        "per_tensor_db": {n: _db(v) for n, v in per.items()},
    }


def _db(v: float) -> float | str:
    """JSON has no infinity: a lossless tensor's SQNR is written as the string "inf" (an all-zero reference with
    noise as "-inf"; an undefined one as null)."""
    if math.isfinite(v):
        return v
    return None if math.isnan(v) else "inf" if v > 0 else "-inf"


def logits_quality(src: Path, quant: Path, *, mode: str, tokens: torch.Tensor) -> dict[str, Any]:
    with TensorReader(src) as ref:
        ref_model = float_model(((n, reference_float(ref, n)) for n in ref.names
                                 if not n.endswith("weight_scale_inv")), src / "config.json")
    p = torch.log_softmax(logits(ref_model, tokens), -1)
    del ref_model
    q_model = float_model(dequant.iter_float(quant), src / "config.json")
    scales = dequant.activation_scales(quant, mode=mode)
    if mode == "w4afp8":
        scales = _w4a8_loader_scales(scales)
    handles = fake_quant_fp8_inputs(q_model, scales)
    q = torch.log_softmax(logits(q_model, tokens), -1)
    for h in handles:
        h.remove()
    kl = (p.exp() * (p - q)).sum(-1)
    ppl_ref, ppl_q = _perplexity(p, tokens), _perplexity(q, tokens)
    return {
        "prompts": int(tokens.shape[0]), "tokens_per_prompt": int(tokens.shape[1]),
        "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
        "top1_agreement": float((p.argmax(-1) == q.argmax(-1)).float().mean()),
        "ppl_reference": ppl_ref, "ppl": ppl_q, "ppl_delta_pct": 100.0 * (ppl_q / ppl_ref - 1.0),
        "activation_fake_quant": {"fp8_scales": len(scales)} if scales else "none (weights only)",
    }


def _perplexity(log_probs: torch.Tensor, tokens: torch.Tensor) -> float:
    """exp(mean NLL) of each prompt's next tokens under ``log_probs`` [prompts, T, V]."""
    nll = -log_probs[:, :-1].gather(-1, tokens[:, 1:, None].to(log_probs.device)).mean()
    return math.exp(float(nll))


def _w4a8_loader_scales(scales: dict[str, float]) -> dict[str, float]:
    """TensorRT-LLM's W4A8 loader uses one input scale per layer and GEMM: the max over all experts (fc31: over
    gate and up; fc2: over down)."""
    out: dict[str, float] = {}
    groups: dict[tuple[str, str], float] = {}
    for name, s in scales.items():
        layer, proj = name.split(".experts.")[0], name.rsplit(".", 1)[1]
        key = (layer, "fc2" if proj == "down_proj" else "fc31")
        groups[key] = max(groups.get(key, 0.0), s)
    for name in scales:
        layer, proj = name.split(".experts.")[0], name.rsplit(".", 1)[1]
        out[name] = groups[(layer, "fc2" if proj == "down_proj" else "fc31")]
    return out

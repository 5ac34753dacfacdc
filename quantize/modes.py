"""``dsbuild quantize --quant MODE``: one function per mode, each writing a complete HF-layout checkpoint
(config.json, index, shards, tokenizer files, hf_quant_config.json) and quant_report.json into ``out``.

Calibration-free work (fp8 verification, bf16, w4afp8's weights) streams tensor by tensor (``quantize.stream``).
Calibration (fp8-tensor, int4-awq, nvfp4, w4afp8's activation scales) and the report's logits comparison hold the
whole model in memory on this machine; a model whose float weights do not fit is refused with the exact multi-GPU
command for a GPU node instead.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from builder import __version__
from builder.atomic import atomic_write_json, atomic_write_text, link_or_copy
from builder.errors import QuantizationError
from builder.model.catalog import Dtype, build_catalog
from builder.model.config import ModelConfig
from builder.model.safetensors_io import INDEX_NAME
from builder.plan.hardware import load_hardware
from quantize import modelopt_flow as mf
from quantize import registry, report, w4afp8
from quantize.calib import CalibrationProgress
from quantize.calib import calibration_tokens as tokens
from quantize.hf_model import float_model
from quantize.modelopt_flow import gpu_script
from quantize.stream import TensorReader, ahead, computed, passthrough, source_shards, write_checkpoint
from quantize.w4afp8_config import quant_cfg

SMALL_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json")
# Calibration and the logits report load the model's float weights in memory; above this they are refused here.
MAX_IN_MEMORY_FRACTION = 0.4


@dataclass(frozen=True, kw_only=True)
class QuantJob:
    src: Path
    out: Path
    mode: str
    kv_cache_dtype: str = "fp8"
    gpu: str | None = None
    hardware_file: Path | None = None  # the GPU table's overrides (--hardware-file), where --gpu is looked up
    calib_size: int = 16
    calib_seq_len: int = 64
    corpus: Path | None = None
    act_scales: Path | None = None  # w4afp8: precomputed expert input scales (safetensors) instead of calibration
    report_logits: bool = True
    log: Callable[[str], None] = field(default=print)

    @property
    def kv_cache_quant_algo(self) -> str | None:
        return "FP8" if self.kv_cache_dtype == "fp8" else None


def check_gpu(mode: str, gpu: str | None, *, hardware_file: Path | None = None) -> None:
    """The planner's check (``HardwareTable.quant_refusal``): the format runs on the target GPU (no --gpu: CPU); a
    reference-engine-only format (TensorRT-LLM cannot load it) is refused for any GPU target."""
    fmt = registry.get(mode)
    if gpu is not None and fmt.reference_engine_only:
        raise QuantizationError(f"--quant {mode} with --gpu {gpu}: {fmt.not_loadable}; without --gpu it builds for the "
                                "reference engine (CPU)")
    table = load_hardware(hardware_file)
    refusal = table.quant_refusal(mode, table.gpu(gpu or "cpu"))
    if refusal:
        raise QuantizationError(f"--quant {refusal}")


def hf_quant_config(quant_algo: str | None, kv_cache_quant_algo: str | None, **extra: Any) -> dict[str, Any]:
    """The shape TensorRT-LLM's ``read_modelopt_quant_config`` reads: ``{"producer", "quantization": {...}}``."""

    return {"producer": {"name": "dsbuild", "version": __version__},
            "quantization": {"quant_algo": quant_algo, "kv_cache_quant_algo": kv_cache_quant_algo, **extra}}


def _source_config(src: Path) -> tuple[ModelConfig, dict[str, Any]]:
    return ModelConfig.from_json_file(src / "config.json"), json.loads((src / "config.json").read_text())


def _copy_small(src: Path, out: Path) -> None:
    for n in SMALL_FILES:
        if (src / n).is_file():
            shutil.copy2(src / n, out / n)


def _fits_in_memory(cfg: ModelConfig) -> bool:
    import psutil

    float_bytes = sum(s.numel * 4 for s in build_catalog(cfg) if not s.is_scale)
    return float_bytes <= MAX_IN_MEMORY_FRACTION * psutil.virtual_memory().total


def _progress_bytes(job: QuantJob, total: int) -> Callable[[int], None]:
    state = {"done": 0, "next": 0.0}

    def on(n: int) -> None:
        state["done"] += n
        frac = state["done"] / max(total, 1)
        if frac >= state["next"]:
            job.log(f"quantize {job.mode}: {frac:6.1%} of {total / 1e9:.2f} GB")
            state["next"] += 0.1
    return on


# ---------------------------------------------------------------------------------------------------------------
# fp8: verify and pass through

VERIFY_PIECE = 16 << 20  # bytes of FP8 weight read and checked per task


def verify_block_fp8(reader: TensorReader, *, on_bytes: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Every FP8 weight has a float32 scale grid of the right shape with finite positive scales, and no NaN code
    (e4m3fn NaN is S.1111.111). Shapes come from the headers; the bytes are read once, in file order, in pieces
    read and checked on worker threads (``ahead``) so the disk never waits for the checks. The first problem in
    file order is the one reported."""
    weights = [n for names in source_shards(reader) for n in names if reader.dtype(n).value == "F8_E4M3"]
    for name in weights:
        scale = reader.scale_of(name)
        if scale is None:
            raise QuantizationError(f"block-FP8 weight {name!r} has no weight_scale_inv")
        rows, cols = reader.shape(name)
        want = (math.ceil(rows / 128), math.ceil(cols / 128))
        if reader.shape(scale) != want or reader.dtype(scale).value != "F32":
            raise QuantizationError(f"{scale!r} is {reader.dtype(scale).value} {list(reader.shape(scale))}, "
                                    f"but a {rows}x{cols} weight needs F32 {list(want)}")

    for problem, n in ahead(_verify_tasks(reader, weights)):
        if problem:
            raise QuantizationError(problem)
        if on_bytes and n:
            on_bytes(n)
    return {"fp8_weights_checked": len(weights)}


def _verify_tasks(reader: TensorReader, weights: list[str]) -> Iterator[Callable[[], tuple[str | None, int]]]:
    """One task per ``VERIFY_PIECE`` of file: consecutive weights of a shard are read together in one ``pread``
    (what lies between them, their scales, is a small part of it), a larger weight in pieces of its own."""
    group: list[tuple[str, int, int]] = []  # (name, offset, length) of weights read together

    def flush() -> Iterator[Callable[[], tuple[str | None, int]]]:
        if group:
            members = list(group)
            shard, start = reader.layout.index.weight_map[members[0][0]], members[0][1]
            length = members[-1][1] + members[-1][2] - start
            reader.will_need_range(shard, start, length)
            yield lambda: _check_group(reader, shard, start, length, members)
            group.clear()
    for name in weights:
        shard, offset, length = reader.location(name)
        if group and (reader.layout.index.weight_map[group[0][0]] != shard
                      or offset + length - group[0][1] > VERIFY_PIECE):
            yield from flush()
        if length <= VERIFY_PIECE:
            group.append((name, offset, length))
            continue
        for start in range(0, length, VERIFY_PIECE):
            n = min(VERIFY_PIECE, length - start)
            reader.will_need_range(shard, offset + start, n)
            yield lambda name=name, start=start, n=n: (
                (start == 0 and _bad_scale(reader, name)) or _nan_code(reader.read_bytes(name, start, n), name), n)
    yield from flush()


def _check_group(reader: TensorReader, shard: str, start: int, length: int,
                 members: list[tuple[str, int, int]]) -> tuple[str | None, int]:
    data = reader.read_range(shard, start, length, what=members[0][0])
    for name, offset, n in members:
        problem = _bad_scale(reader, name) or _nan_code(data[offset - start: offset - start + n], name)
        if problem:
            return problem, 0
    return None, sum(n for _, _, n in members)


def _bad_scale(reader: TensorReader, name: str) -> str | None:
    scale = reader.scale_of(name)
    s = reader.read(scale)
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        return f"{scale!r} holds non-finite or non-positive scales"
    return None


def _nan_code(codes: torch.Tensor, name: str) -> str | None:
    codes = codes.numpy()
    low7 = np.empty(min(codes.size, 1 << 20), dtype=np.uint8)  # cache-sized scratch; numpy releases the GIL here
    for i in range(0, codes.size, low7.size):
        part = codes[i:i + low7.size]
        np.bitwise_and(part, 0x7F, out=low7[:part.size])
        if low7[:part.size].max() == 0x7F:
            return f"block-FP8 weight {name!r} holds NaN values"
    return None


def run_fp8(job: QuantJob) -> dict[str, Any]:
    cfg, raw = _source_config(job.src)
    if not cfg.is_fp8_block:
        raise QuantizationError("--quant fp8 keeps DeepSeek's native block FP8, but this checkpoint is not block FP8")
    with TensorReader(job.src) as reader:
        info = verify_block_fp8(reader)
        for shard in reader.layout.index.shard_files:
            link_or_copy(job.src / shard, job.out / shard)  # verified bytes, no copy needed
    shutil.copy2(job.src / INDEX_NAME, job.out / INDEX_NAME)
    atomic_write_json(job.out / "config.json", raw)
    _copy_small(job.src, job.out)
    # No hf_quant_config.json: TensorRT-LLM then reads DeepSeek's own quantization_config and leaves unquantized
    # exactly what the MoE backend the build chooses needs (kv_b_proj only with TRTLLM; docs/
    # tensorrt-llm-contract.md#C-MCFG-0, #C-MCFG-3). A fixed exclude list here would hold for one backend only. The
    # KV-cache dtype comes from llm_api.yaml's kv_cache_config.dtype (C-LLMARGS-4).
    info["trtllm_quant_config"] = "config.json quantization_config (block FP8 128x128)"
    return info


# ---------------------------------------------------------------------------------------------------------------
# bf16: streaming dequantization

def run_bf16(job: QuantJob) -> dict[str, Any]:
    cfg, raw = _source_config(job.src)
    with TensorReader(job.src) as reader:
        shards = []
        for names in source_shards(reader):
            entries = []
            for name in names:
                if name.endswith("weight_scale_inv") and reader.dtype(name[: -len("_scale_inv")]).value == "F8_E4M3":
                    continue
                if reader.is_block_fp8(name):
                    entries.append(computed(name, Dtype.BF16, reader.shape(name),
                                            lambda n=name: reader.dequantized_band_tasks(n, dtype=torch.bfloat16)))
                else:
                    entries.append(passthrough(reader, name))
            shards.append(entries)
        total = sum(e.nbytes for s in shards for e in s)
        write_checkpoint(job.out, shards, on_bytes=_progress_bytes(job, total))
    raw.pop("quantization_config", None)
    raw["torch_dtype"] = "bfloat16"
    atomic_write_json(job.out / "config.json", raw)
    _copy_small(job.src, job.out)
    atomic_write_json(job.out / "hf_quant_config.json", hf_quant_config(None, job.kv_cache_quant_algo))
    return {"bytes": total}


# ---------------------------------------------------------------------------------------------------------------
# w4afp8

def calibration_tokens(job: QuantJob) -> torch.Tensor:
    return tokens(job.src / "tokenizer.json", count=job.calib_size, seq_len=job.calib_seq_len, corpus=job.corpus)


def _refuse_full_size(job: QuantJob, cfg: ModelConfig, what: str) -> None:
    """Refuse in-memory calibration of a model that does not fit here; for nvfp4/w4afp8 write the complete GPU-node
    script (``quantize.modelopt_flow.gpu_script``) next to the run and name it."""
    if _fits_in_memory(cfg):
        return

    params = sum(s.numel for s in build_catalog(cfg) if not s.is_scale) / 1e9
    if job.mode not in ("nvfp4", "w4afp8"):
        raise QuantizationError(
            f"{what} for this {params:.0f}B-parameter model needs it whole in GPU memory, and ModelOpt's multi-GPU "
            f"DeepSeek flow (examples/deepseek) produces only NVFP4 (and the expert amax that --quant w4afp8 uses); "
            f"use --quant fp8 or w4afp8 on Hopper, nvfp4 on Blackwell")
    run_dir = job.out.parent
    script = run_dir / f"gpu-quantize-{job.mode}.sh"
    text = gpu_script(mode=job.mode, model_dir=str(job.src), run_dir=str(run_dir))
    atomic_write_text(script, text)
    script.chmod(0o755)
    raise QuantizationError(
        f"{what} for this {params:.0f}B-parameter model needs it whole in (GPU) memory, which this machine lacks; "
        f"run {script} on an 8-GPU node (8xH200 or 16xH100) in the TensorRT-LLM container"
        + ("; it ends with the --act-scales file for `dsbuild quantize --quant w4afp8`" if job.mode == "w4afp8"
           else ""))


def run_w4afp8(job: QuantJob) -> dict[str, Any]:
    cfg, raw = _source_config(job.src)
    if not cfg.is_fp8_block:
        raise QuantizationError("--quant w4afp8 converts DeepSeek's block-FP8 checkpoint, but this one is not block FP8")
    if job.act_scales is not None:
        scales = w4afp8.read_act_scales(job.act_scales, cfg)
        calibration = {"act_scales": str(job.act_scales), "input_scales": len(scales)}
    else:
        _refuse_full_size(job, cfg, "calibrating w4afp8 activation scales")
        tokens = calibration_tokens(job)
        with TensorReader(job.src) as reader:
            model = float_model(((n, report.reference_float(reader, n)) for n in reader.names
                                 if not n.endswith("weight_scale_inv")), job.src / "config.json",
                                dtype=torch.bfloat16)
            with CalibrationProgress("calibrate w4afp8 expert inputs", prompts=len(tokens),
                                     tokens_per_prompt=tokens.shape[1], log=job.log) as bar:
                scales = w4afp8.calibrate_expert_inputs(model, tokens, cfg, progress=lambda _done: bar.step())
            del model
        calibration = {"prompts": int(tokens.shape[0]), "tokens": int(tokens.numel()), "input_scales": len(scales)}
    with TensorReader(job.src) as reader:
        shards = w4afp8.plan_shards(reader, cfg, scales)
        total = sum(e.nbytes for s in shards for e in s)
        write_checkpoint(job.out, shards, on_bytes=_progress_bytes(job, total))
    raw.pop("quantization_config", None)
    atomic_write_json(job.out / "config.json", raw)
    _copy_small(job.src, job.out)
    atomic_write_json(job.out / "hf_quant_config.json", hf_quant_config("MIXED_PRECISION", job.kv_cache_quant_algo))
    atomic_write_json(job.out / "quant_cfg.json", quant_cfg(cfg, job.kv_cache_quant_algo))
    return {"bytes": total, "calibration": calibration}


# ---------------------------------------------------------------------------------------------------------------
# ModelOpt modes

def run_modelopt(job: QuantJob) -> dict[str, Any]:
    cfg, _ = _source_config(job.src)
    _refuse_full_size(job, cfg, f"ModelOpt {registry.get(job.mode).modelopt_cfg} calibration")
    tokens = calibration_tokens(job)
    with mf.export_tmpdir(job.out.parent) as tmp:
        export = Path(tmp)
        mf.quantize_and_export(job.src, export, mode=job.mode, model=cfg, tokens=tokens, progress=job.log)
        shards, mtp_modules, ex, source = mf.plan_output(export, job.src, cfg)
        try:
            total = sum(e.nbytes for s in shards for e in s)
            write_checkpoint(job.out, shards, on_bytes=_progress_bytes(job, total))
        finally:
            ex.close()
            source.close()
        configs = mf.finish_configs(export, job.src, job.out, mtp_modules, job.kv_cache_quant_algo)
    atomic_write_json(job.out / "config.json", configs["config"])
    atomic_write_json(job.out / "hf_quant_config.json", configs["hf_quant_config"])
    _copy_small(job.src, job.out)
    return {"bytes": total, "calibration": {"prompts": int(tokens.shape[0]), "tokens": int(tokens.numel())},
            "exclude_modules": configs["hf_quant_config"]["quantization"]["exclude_modules"]}


MODES: dict[str, Callable[[QuantJob], dict[str, Any]]] = {
    "fp8": run_fp8, "bf16": run_bf16, "w4afp8": run_w4afp8,
    "fp8-tensor": run_modelopt, "int4-awq": run_modelopt, "nvfp4": run_modelopt,
}


def quantize(job: QuantJob) -> dict[str, Any]:
    if job.mode not in MODES:
        raise QuantizationError(f"unknown quantization mode {job.mode!r}; choose one of {sorted(MODES)}")
    check_gpu(job.mode, job.gpu, hardware_file=job.hardware_file)
    t0 = time.perf_counter()
    info = MODES[job.mode](job)
    info["mode"] = job.mode
    info["quantize_s"] = round(time.perf_counter() - t0, 3)
    info["report"] = write_report(job)
    return info


def write_report(job: QuantJob) -> dict[str, Any]:
    cfg, _ = _source_config(job.src)
    body: dict[str, Any] = {"mode": job.mode, "quant_algo": registry.get(job.mode).quant_algo,
                            "reference": "source block-FP8 weights dequantized to BF16"}
    body["weights"] = report.weight_sqnr(job.src, job.out, mode=job.mode)
    if body["weights"]["tensors"] and body["weights"]["lossless_tensors"] == body["weights"]["tensors"]:
        # Every weight is bit-identical to the BF16 reference and no activation is quantized: same logits.
        body["logits"] = {"kl_mean": 0.0, "kl_max": 0.0, "top1_agreement": 1.0, "ppl_delta_pct": 0.0,
                          "note": "weights bit-identical to the reference; no forward needed"}
    elif job.report_logits and _fits_in_memory(cfg):
        tokens = calibration_tokens(job)
        body["logits"] = report.logits_quality(job.src, job.out, mode=job.mode, tokens=tokens)
    else:
        body["logits"] = {"skipped": "the model's float weights do not fit in memory here" if job.report_logits
                          else "not requested"}
    atomic_write_json(job.out / "quant_report.json", body)
    w, lg = body["weights"], body["logits"]
    return {"min_sqnr_db": w["min_db"], "median_sqnr_db": w["median_db"], "kl_mean": lg.get("kl_mean"),
            "top1_agreement": lg.get("top1_agreement"), "ppl_delta_pct": lg.get("ppl_delta_pct")}

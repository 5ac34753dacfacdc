"""``dsbuild make-tiny --train``: train the target and the draft (one process each, one thread each, so the two
run side by side on a 2-core machine and every run is bit-reproducible), export each through ``make_tiny``, measure
held-out perplexity of the float model and of the exported FP8 checkpoint, and write a report next to it."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import queue
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from builder.atomic import atomic_write_json
from builder.model import trained as builtin
from builder.model.config import tiny_config
from builder.model.hf_compat import iter_dequantized
from builder.model.tiny import make_tiny
from builder.model.tokenizer import corpus_sha256, train_tokenizer
from builder.safeio import dumps_json
from builder.train.data import TokenData
from builder.train.model import TinyDeepseekV32, load_weights
from builder.train.trainer import RECIPES, SMALL_EVAL_SEQUENCES, TrainConfig, evaluate, train, with_steps


def _worker(cfg_dict: dict, tokenizer_json: str, out_dir: str, progress_q) -> None:
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    cfg = TrainConfig(**cfg_dict)
    data = TokenData.from_tokenizer(Tokenizer.from_str(tokenizer_json))
    result = train(cfg, data, progress=lambda step, loss: progress_q.put((cfg.preset, step, loss)))
    save_file({k: v.contiguous() for k, v in result.weights.items()}, str(Path(out_dir) / "weights.safetensors"))
    (Path(out_dir) / "metrics.json").write_text(dumps_json(result.metrics))
    progress_q.put((cfg.preset, None, None))


def _train_all(configs: list[TrainConfig], tokenizer, jobs: int) -> dict[str, tuple[dict, dict]]:
    """preset -> (float weights, metrics), training ``jobs`` models at a time in spawned processes."""
    from safetensors.torch import load_file
    from tqdm import tqdm

    ctx = mp.get_context("spawn")
    progress_q = ctx.Queue()
    results: dict[str, tuple[dict, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="dsbuild-train-") as tmp:
        bars = {c.preset: tqdm(total=c.steps, desc=f"train {c.preset}", unit="step", position=i, leave=True)
                for i, c in enumerate(configs)}
        pending = list(configs)
        running: dict[str, mp.Process] = {}
        while pending or running:
            while pending and len(running) < jobs:
                c = pending.pop(0)
                d = Path(tmp) / c.preset
                d.mkdir()
                p = ctx.Process(target=_worker, args=(c.to_dict(), tokenizer.to_str(), str(d), progress_q))
                p.start()
                running[c.preset] = p
            try:
                preset, step, loss = progress_q.get(timeout=1.0)
                if step is None:
                    running.pop(preset).join()
                    d = Path(tmp) / preset
                    results[preset] = (load_file(str(d / "weights.safetensors")),
                                       json.loads((d / "metrics.json").read_text()))
                else:
                    bars[preset].update(1)
                    bars[preset].set_postfix(loss=f"{loss:.3f}")
            except queue.Empty:
                for preset, p in list(running.items()):
                    if not p.is_alive() and p.exitcode != 0:
                        for other in running.values():
                            other.terminate()
                        raise RuntimeError(f"training {preset} failed (exit code {p.exitcode})")
        for bar in bars.values():
            bar.close()
    return results


def checkpoint_eval(ckpt: Path, preset: str, data: TokenData, cfg: TrainConfig, max_sequences: int) -> dict:
    """Held-out figures of an exported checkpoint (its FP8/BF16 values dequantized), by the training model."""

    model = TinyDeepseekV32(tiny_config(preset))
    load_weights(model, dict(iter_dequantized(ckpt)))
    return evaluate(model, data, seq_len=cfg.seq_len, max_sequences=max_sequences)


def train_models(*, out: Path, presets: list[str], seed: int = 0, steps: int | None = None, jobs: int = 2,
                 write_builtin: bool = False, overrides: dict | None = None) -> dict[str, dict]:
    """Train, export to ``out/<preset>/`` with ``out/<preset>.report.json``; optionally replace the committed
    models. Returns the reports."""
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(vocab_size=1024)
    configs = []
    for p in presets:
        c = replace(RECIPES[p], seed=seed, **(overrides or {}))
        configs.append(with_steps(c, steps) if steps is not None else c)
    results = _train_all(configs, tokenizer, jobs)
    return export_and_report(results, configs, tokenizer, out=out, write_builtin=write_builtin, started=t0)


def export_and_report(results: dict[str, tuple[dict, dict]], configs: list[TrainConfig], tokenizer, *, out: Path,
                      write_builtin: bool, started: float | None = None) -> dict[str, dict]:
    """Export and evaluate every model, then write the reports (each with the whole command's wall time so far,
    ``total_wall_s``: tokenizer, training of all models, evaluation and export) and optionally the built-in copy."""

    data = TokenData.from_tokenizer(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    reports = {}
    for c in configs:
        weights, metrics = results[c.preset]
        digest = _tensors_sha256(builtin.pack(weights, c.preset))
        ckpt = out / c.preset
        make_tiny(ckpt, preset_name=c.preset, weights=weights, tokenizer=tokenizer)
        committed = builtin.weights_file(c.preset)
        report = {
            "preset": c.preset, "recipe": c.to_dict(), "corpus_sha256": corpus_sha256(),
            "tokenizer_sha256": hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
            "torch": torch.__version__, "weights_sha256": digest,
            "train_wall_s": metrics["train_wall_s"], "train_cpu_s": metrics["train_cpu_s"],
            "cpu_s_per_step": metrics["cpu_s_per_step"], "router_bias_abs_mean": metrics["router_bias_abs_mean"],
            "first_losses": metrics["first_losses"],
            "heldout_float": metrics["heldout"],
            "heldout_fp8_checkpoint": checkpoint_eval(ckpt, c.preset, data, c, c.eval_sequences),
            "heldout_float_small": metrics["heldout_small"],
            "heldout_fp8_checkpoint_small": checkpoint_eval(ckpt, c.preset, data, c, SMALL_EVAL_SEQUENCES),
            "same_as_committed": (committed.is_file() and
                                  _tensors_sha256(_load_stored(committed)) == digest),
        }
        reports[c.preset] = report
    total = round(time.perf_counter() - started, 1) if started is not None else None
    for c in configs:
        report = reports[c.preset]
        report["total_wall_s"] = total
        atomic_write_json(out / f"{c.preset}.report.json", report)
        if write_builtin:
            builtin.write_builtin(builtin.TRAINED_DIR, c.preset, results[c.preset][0], tokenizer, report)
    return reports


def _load_stored(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Content hash independent of file layout: names, dtypes, shapes and raw bytes in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def summary_lines(reports: dict[str, dict]) -> list[str]:
    lines = []
    for p, r in reports.items():
        f, q = r["heldout_float"], r["heldout_fp8_checkpoint"]
        mtp = f" | MTP (t+2) {f['mtp_ppl']:.2f} (FP8 {q['mtp_ppl']:.2f})" if "mtp_ppl" in f else ""
        lines.append(f"{p}: held-out ppl {f['ppl']:.2f} (FP8 checkpoint {q['ppl']:.2f}){mtp} | unigram "
                     f"{f['unigram_ppl']:.2f} | {f['tokens']} tokens | trained in {r['train_wall_s']:.0f} s "
                     f"({r['train_cpu_s']:.0f} CPU s)"
                     f"{' | identical to the committed weights' if r['same_as_committed'] else ''}")
    return lines

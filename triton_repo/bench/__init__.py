"""``dsbuild bench``: a streaming load generator for the served ``tensorrt_llm`` model, measured against the
planner's prediction for the run's layout. ``run_bench`` is the API; the CLI is a thin caller."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from builder.errors import DsbuildError, SpecError
from builder.rundir import RunDir
from triton_repo.bench.predict import predict
from triton_repo.bench.prompts import Length, PromptTokenizer
from triton_repo.bench.report import build_result, count_tokens, plot, print_tables, validate
from triton_repo.bench.runner import BenchConfig, run_levels

__all__ = ["BenchConfig", "Length", "run_bench", "print_tables", "plot", "validate"]


def run_bench(cfg: BenchConfig, *, run_dir: Path | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Benchmark every concurrency level of ``cfg``; ``run_dir`` (the served run) gives the planner's prediction.
    Returns the result document (validated against the schema)."""
    if run_dir is not None and cfg.protocol != "openai":
        refuse_coalesced_streams(run_dir)
    tokenizer = PromptTokenizer(cfg.engines_dir)
    levels = run_levels(cfg, tokenizer, show_progress=show_progress)
    for level in levels:
        count_tokens(level, tokenizer)
    predictions, prediction_error = None, None
    if run_dir is not None:
        try:
            predictions = {c: predict(run_dir, isl=cfg.isl.mean, osl=cfg.osl.mean, concurrency=c)
                           for c in cfg.concurrency}
        except DsbuildError as exc:  # the measurement stands on its own; say why there is no comparison
            prediction_error = str(exc)
    result = build_result(cfg, levels, run_dir=run_dir, predictions=predictions, prediction_error=prediction_error)
    validate(result)
    return result


def refuse_coalesced_streams(run_dir: Path) -> None:
    """Over gRPC/HTTP one streamed response is one token (how TTFT, TPOT and tokens/s are counted); a run built
    with ``--stream-interval N`` > 1 sends one per N, which would read as N times fewer tokens."""
    path = RunDir(run_dir).llm_api
    interval = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stream_interval", 1) \
        if path.is_file() else 1
    if interval != 1:
        raise SpecError(f"{run_dir} streams a response every {interval} tokens (stream_interval in {path.name}); "
                        "dsbuild bench counts one response per token over gRPC/HTTP: benchmark a run built with "
                        "--stream-interval 1, or use --protocol openai, which counts the endpoint's usage tokens")

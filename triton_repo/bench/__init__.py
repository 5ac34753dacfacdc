"""``dsbuild bench``: a streaming load generator for the served ``tensorrt_llm`` model, measured against the
planner's prediction for the run's layout. ``run_bench`` is the API; the CLI is a thin caller."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from builder.errors import DsbuildError
from triton_repo.bench.predict import predict
from triton_repo.bench.prompts import Length, PromptTokenizer
from triton_repo.bench.report import build_result, count_tokens, plot, print_tables, validate
from triton_repo.bench.runner import BenchConfig, run_levels

__all__ = ["BenchConfig", "Length", "run_bench", "print_tables", "plot", "validate"]


def run_bench(cfg: BenchConfig, *, run_dir: Path | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Benchmark every concurrency level of ``cfg``; ``run_dir`` (the served run) gives the planner's prediction.
    Returns the result document (validated against the schema)."""

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

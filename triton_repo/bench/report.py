"""Benchmark results: the per-concurrency summary, the JSON document (schema: ``result.schema.json``, described
in docs/bench.md), the predicted-vs-measured table and the plot.

TPOT is (end-to-end latency - TTFT) / (output tokens - 1) per request; requests with one output token have none.
Inter-token latency (ITL) is every gap between consecutive streamed responses, pooled over requests."""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from builder.atomic import atomic_write_bytes
from triton_repo.bench.prompts import PromptTokenizer
from triton_repo.bench.runner import BenchConfig, LevelRun
from triton_repo.bench.stats import distribution

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("result.schema.json")
TPOT_DEFINITION = "TPOT = (end-to-end latency - TTFT) / (output tokens - 1), per request with at least 2 tokens"


def count_tokens(level: LevelRun, tokenizer: PromptTokenizer) -> None:
    """The cross-check of each successful request's output tokens: the tokenizer applied to its final text."""
    for r in level.records + level.warmup_records:
        if r.ok:
            r.output_tokens_text = tokenizer.count_output(r.text)


def summarize(level: LevelRun, cfg: BenchConfig) -> dict[str, Any]:
    ok = [r for r in level.records if r.ok]
    failed = [r for r in level.records if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    duration = level.duration_s
    tpots = [r.tpot_s for r in ok if r.tpot_s is not None]
    good = [r for r in ok
            if (cfg.ttft_ms is None or r.ttft_s * 1e3 <= cfg.ttft_ms)
            and (cfg.tpot_ms is None or (r.tpot_s is not None and r.tpot_s * 1e3 <= cfg.tpot_ms))]
    mismatched = [r.index for r in ok if r.output_tokens_text != r.output_tokens]
    over_limit = [r.index for r in ok if r.output_tokens > r.max_tokens
                  or (r.finish_reason == "length" and r.output_tokens != r.max_tokens)]
    return {
        "concurrency": level.concurrency,
        "sent": level.sent, "ok": len(ok), "errors": len(failed),
        "warmup": {"sent": len(level.warmup_records), "ok": sum(r.ok for r in level.warmup_records)},
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration else 0.0,
        "output_tokens": out_tokens,
        "input_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens_per_s": out_tokens / duration if duration else 0.0,
        "output_tokens_per_s_per_user": distribution(
            [(r.output_tokens - 1) / (r.latency_s - r.ttft_s) for r in ok
             if r.output_tokens > 1 and r.latency_s > r.ttft_s]),
        "ttft_ms": distribution([r.ttft_s for r in ok], scale=1e3),
        "tpot_ms": distribution(tpots, scale=1e3),
        "itl_ms": distribution([g for r in ok for g in r.inter_token_s], scale=1e3),
        "e2e_ms": distribution([r.latency_s for r in ok], scale=1e3),
        "output_tokens_per_request": distribution([r.output_tokens for r in ok]),
        "goodput": {"ttft_ms_limit": cfg.ttft_ms, "tpot_ms_limit": cfg.tpot_ms, "requests": len(good),
                    "requests_per_s": len(good) / duration if duration else 0.0,
                    "fraction": len(good) / level.sent if level.sent else 0.0},
        "token_count_check": {"streamed_vs_text_mismatched": mismatched,
                              "streamed_vs_max_tokens_mismatched": over_limit},
        "error_list": [{"index": r.index, "message": r.error} for r in failed],
        "requests": [{k: v for k, v in asdict(r).items() if k not in ("text", "response_times_s")}
                     | {"tpot_s": r.tpot_s} for r in level.records],
    }


def build_result(cfg: BenchConfig, levels: list[LevelRun], *, run_dir: Path | None,
                 predictions: dict[int, dict[str, Any]] | None, prediction_error: str | None) -> dict[str, Any]:
    summaries = []
    for level in levels:
        s = summarize(level, cfg)
        pred = (predictions or {}).get(level.concurrency)
        s["predicted"] = pred
        s["measured_vs_predicted"] = compare(s, pred) if pred else None
        summaries.append(s)
    return {
        "schema_version": SCHEMA_VERSION,
        "definitions": {"tpot": TPOT_DEFINITION,
                        "itl": "gaps between consecutive streamed responses, pooled over requests",
                        "output_tokens": "streamed responses carrying output, one per generated token; "
                                         "output_tokens_text: the model's tokenizer applied to the final text",
                        "goodput": "successful requests meeting both limits (TTFT and TPOT) per second"},
        "config": {"url": cfg.url, "protocol": cfg.protocol, "model": cfg.model,
                   "concurrency": list(cfg.concurrency), "isl": {"mean": cfg.isl.mean, "std": cfg.isl.std},
                   "osl": {"mean": cfg.osl.mean, "std": cfg.osl.std}, "num_requests": cfg.num_requests,
                   "request_rate": cfg.request_rate, "seed": cfg.seed, "warmup": cfg.warmup,
                   "dataset": str(cfg.dataset) if cfg.dataset else None, "ttft_ms": cfg.ttft_ms,
                   "tpot_ms": cfg.tpot_ms, "run_dir": str(run_dir) if run_dir else None},
        "prediction_error": prediction_error,
        "levels": summaries,
    }


def compare(summary: dict[str, Any], pred: dict[str, Any]) -> dict[str, Any]:
    """Measured / predicted ratios of the figures both sides have (1.0 = as planned; above 1 for a time means
    slower than planned, above 1 for a rate faster)."""
    pairs = {"tpot_ms": (summary["tpot_ms"]["p50"], pred.get("tpot_ms", pred.get("decode_step_ms"))),
             "ttft_ms": (summary["ttft_ms"]["p50"], pred.get("ttft_ms")),
             "tokens_per_s_per_user": (summary["output_tokens_per_s_per_user"]["p50"],
                                       pred.get("tokens_per_s_per_user")),
             "tokens_per_s": (summary["output_tokens_per_s"], pred.get("tokens_per_s"))}
    return {k: {"measured": m, "predicted": p, "ratio": (m / p if m is not None and p else None)}
            for k, (m, p) in pairs.items()}


def validate(result: dict[str, Any]) -> None:
    import jsonschema

    jsonschema.validate(result, json.loads(SCHEMA_PATH.read_text()))


def _fmt(v: Any, digits: int = 1) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def print_tables(result: dict[str, Any], *, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=120)
    levels = result["levels"]
    thr = Table(title="Throughput per concurrency")
    for col in ("conc", "sent", "ok", "errors", "duration s", "req/s", "output tok/s", "goodput req/s"):
        thr.add_column(col, justify="right")
    for s in levels:
        thr.add_row(str(s["concurrency"]), str(s["sent"]), str(s["ok"]), str(s["errors"]), _fmt(s["duration_s"], 2),
                    _fmt(s["requests_per_s"], 2), _fmt(s["output_tokens_per_s"]),
                    _fmt(s["goodput"]["requests_per_s"], 2))
    console.print(thr)
    lat = Table(title="Latency (ms)", caption=result["definitions"]["tpot"])
    for col in ("conc", "figure", "mean", "p50", "p90", "p99"):
        lat.add_column(col, justify="right")
    for s in levels:
        for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
            x = s[key]
            lat.add_row(str(s["concurrency"]), name, _fmt(x["mean"]), _fmt(x["p50"]), _fmt(x["p90"]), _fmt(x["p99"]))
    console.print(lat)
    predicted = [s for s in levels if s["predicted"]]
    if predicted:
        p0 = predicted[0]["predicted"]
        cmp_ = Table(title=f"Planner vs measured (p50), layout {p0['layout']} on {p0['hardware']}",
                     caption="ratio = measured / predicted")
        for col in ("conc", "figure", "predicted", "measured", "ratio"):
            cmp_.add_column(col, justify="right")
        names = {"tpot_ms": "decode step / TPOT ms", "ttft_ms": "TTFT ms", "tokens_per_s_per_user": "tok/s per user",
                 "tokens_per_s": "tok/s total"}
        for s in predicted:
            for key, name in names.items():
                m = s["measured_vs_predicted"][key]
                cmp_.add_row(str(s["concurrency"]), name, _fmt(m["predicted"]), _fmt(m["measured"]),
                             _fmt(m["ratio"], 2))
        console.print(cmp_)
    elif result.get("prediction_error"):
        console.print(f"no plan comparison: {result['prediction_error']}")
    for s in levels:
        for e in s["error_list"][:5]:
            console.print(f"[red]concurrency {s['concurrency']} request {e['index']} failed:[/red] {e['message']}")
        if len(s["error_list"]) > 5:
            console.print(f"... and {len(s['error_list']) - 5} more errors at concurrency {s['concurrency']} "
                          "(all listed in --json)")


def plot(result: dict[str, Any], path: Path) -> None:
    """Four panels against concurrency: TTFT, TPOT (measured p50/p90 band and predicted), output tokens/s (measured
    and predicted), per-user tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    conc = [s["concurrency"] for s in levels]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    panels = (("ttft_ms", "TTFT (ms)", "ttft_ms"), ("tpot_ms", "TPOT (ms)", "decode_step_ms"))
    for ax, (key, title, pkey) in zip(axes[:2], panels):
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(conc, [s[key][q] for s in levels], style, label=f"measured {q}")
        if any(s["predicted"] for s in levels):
            ax.plot(conc, [(s["predicted"] or {}).get(pkey) for s in levels], "kx-.", label="planner")
        ax.set_title(title)
    axes[2].plot(conc, [s["output_tokens_per_s"] for s in levels], "o-", label="measured")
    axes[3].plot(conc, [s["output_tokens_per_s_per_user"]["p50"] for s in levels], "o-", label="measured p50")
    if any(s["predicted"] for s in levels):
        axes[2].plot(conc, [(s["predicted"] or {}).get("tokens_per_s") for s in levels], "kx-.", label="planner")
        axes[3].plot(conc, [(s["predicted"] or {}).get("tokens_per_s_per_user") for s in levels], "kx-.",
                     label="planner")
    axes[2].set_title("output tokens/s (all users)")
    axes[3].set_title("output tokens/s per user")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    cfg = result["config"]
    fig.suptitle(f"dsbuild bench: {cfg['protocol']} {cfg['url']}, ISL {cfg['isl']['mean']}, OSL {cfg['osl']['mean']}, "
                 f"{cfg['num_requests']} requests per level; {TPOT_DEFINITION}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())

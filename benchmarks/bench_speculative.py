"""Speculative decoding in the reference engine: tokens per target forward and wall-clock speedup against plain
decoding (the baseline, measured in the same process on the same bundle and prompts), for draft lengths 1-4 with
DeepSeek's MTP module and with a separate draft model.

Weight sets (each row of the output names its own):
- ``trained``: ``--target DIR --draft DIR`` (e.g. the trained tiny model and its trained tiny-draft): the only
  set whose acceptance says anything about real drafting quality.
- ``random``: the generated ``tiny`` target and ``tiny-draft`` draft with random weights. Acceptance is ~0 by
  construction, so this measures the pure overhead of drafting + verification.
- ``synthetic``: the test checkpoints of ``tests/support/speculative.py`` (an MTP module planted as a bigram
  drafter, a draft model = target + noise): acceptance is partial by construction; it shows the mechanism, not
  a model's quality.

Greedy decoding, one request at a time (the latency regime speculation is for), ``--tokens`` new tokens per prompt,
best of ``--repeats``. Every speculative output is checked token for token against plain greedy.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_speculative.py [--sets random,synthetic]
        [--target DIR --draft DIR] [--json] [--plot bench_speculative.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from builder.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DRAFT_LENGTHS = (1, 2, 3, 4)
NOTES = {
    "trained": "trained weights: acceptance reflects drafting quality",
    "random": "random weights: acceptance meaningless (~0); shows drafting + verification overhead",
    "synthetic": "planted MTP / noisy-copy draft: partial acceptance by construction, not a model's quality",
}


def checkpoints(name: str, root: Path, args) -> tuple[Path, Path]:
    from builder.model.tiny import make_tiny

    if name == "trained":
        if not (args.target and args.draft):
            raise SystemExit("--sets trained needs --target DIR and --draft DIR")
        return Path(args.target), Path(args.draft)
    if name == "random":  # seeded random init, whatever the default 'tiny' weights are
        made = []
        for preset in ("tiny", "tiny-draft"):
            out = root / f"random-{preset}"
            if not (out / "config.json").is_file():
                make_tiny(out, seed=0, preset_name=preset)
            made.append(out)
        return made[0], made[1]
    from tests.support.speculative import noisy_copy, planted_target

    return planted_target(root / "synthetic-target"), noisy_copy(root / "synthetic-draft")


def prompts_for(bundle, count: int, length: int) -> list[list[int]]:
    """Prompts cut from the seed corpus (real text matters for a trained model), tokenized by the bundle."""
    text = (REPO / "builder" / "data" / "corpus" / "seed.txt").read_text(encoding="utf-8")
    ids = bundle.tokenizer().encode(text).ids
    step = max(1, len(ids) // (count + 1))
    return [ids[i * step: i * step + length] for i in range(count)]


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_set(name: str, root: Path, args) -> list[dict]:
    from builder.engine.bundle import EngineBundle
    from builder.engine.distributed import make_comm
    from builder.engine.driver import decode
    from builder.engine.generate import Engine
    from builder.engine.sampling import GenerationRequest
    from builder.engine.speculative import SpeculativeOptions
    from builder.layout import Layout
    from builder.shard.bundle import write_engine_bundle
    from builder.shard.fusion import FusionOptions

    target_ckpt, draft_ckpt = checkpoints(name, root, args)
    bundles = {}
    for role, ckpt in (("target", target_ckpt), ("draft", draft_ckpt)):
        out = root / f"{name}-{role}-bundle"
        if not (out / "config.json").is_file():
            out.mkdir(parents=True, exist_ok=True)
            write_engine_bundle(ckpt, out, layout=Layout(1, 1, 1), fusion=FusionOptions())
        bundles[role] = out
    bundle = EngineBundle.open(bundles["target"])
    engine = Engine(bundle, make_comm(bundle.layout, rank=0, device=args.device))
    prompts = prompts_for(bundle, args.prompts, args.prompt_len)

    def run(spec):
        return [decode(engine, [GenerationRequest(p, SamplingParams(max_tokens=args.tokens))], speculative=spec)[0]
                for p in prompts]

    run(None)  # warm-up
    base_s, base = timed(lambda: run(None), args.repeats)
    rows = []
    for mode in ("mtp", "draft"):
        for n in DRAFT_LENGTHS:
            spec = SpeculativeOptions(mode=mode, draft_len=n, draft_engine=str(bundles["draft"]))
            wall, res = timed(lambda: run(spec), args.repeats)
            if [r.token_ids for r in res] != [r.token_ids for r in base]:
                raise SystemExit(f"{name}/{mode}/{n}: speculative greedy output differs from plain greedy")
            drafted = sum(r.total_draft_tokens for r in res)
            accepted = sum(r.total_accepted_draft_tokens for r in res)
            tokens = sum(len(r.token_ids) for r in res)
            forwards = sum(r.target_forwards for r in res)
            rounds = forwards - len(res)
            rows.append({
                "weights": name, "mode": mode, "draft_len": n, "tokens": tokens, "target_forwards": forwards,
                "drafted": drafted, "accepted": accepted,
                "acceptance_rate": accepted / drafted if drafted else 0.0,
                "mean_accepted_length": (accepted + rounds) / rounds if rounds else 0.0,
                "tokens_per_target_forward": tokens / forwards,
                "plain_s": base_s, "spec_s": wall, "speedup": base_s / wall,
            })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="random,synthetic", help="comma list of trained, random, synthetic")
    ap.add_argument("--target", help="trained target checkpoint directory (HF layout, e.g. a make-tiny export)")
    ap.add_argument("--draft", help="trained draft checkpoint directory (same tokenizer)")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", default=None, help="directory for checkpoints and bundles (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--plot", default="bench_speculative.png", help="PNG file to write ('' for none)")
    args = ap.parse_args(argv)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = set(sets) - set(NOTES)
    if unknown:
        ap.error(f"unknown weight set {sorted(unknown)[0]!r}; choose from {', '.join(NOTES)}")
    with tempfile.TemporaryDirectory(prefix="bench-spec-") as tmp:
        root = Path(args.work or tmp)
        root.mkdir(parents=True, exist_ok=True)
        rows = [r for s in sets for r in bench_set(s, root, args)]
    result = {"device": args.device, "tokens_per_prompt": args.tokens, "prompts": args.prompts,
              "notes": {s: NOTES[s] for s in sets}, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        show(result)
    if args.plot:
        plot(result, args.plot)
    return 0


def show(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"speculative decoding vs plain greedy ({result['device']}, {result['prompts']} prompts x "
                        f"{result['tokens_per_prompt']} tokens, batch 1)")
    for col in ("weights", "mode", "N", "accept rate", "mean acc. len", "tokens/target fwd", "plain s", "spec s",
                "speedup"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(r["weights"], r["mode"], str(r["draft_len"]), f"{r['acceptance_rate']:.2f}",
                      f"{r['mean_accepted_length']:.2f}", f"{r['tokens_per_target_forward']:.2f}",
                      f"{r['plain_s']:.3f}", f"{r['spec_s']:.3f}", f"{r['speedup']:.2f}x")
    console = Console()
    console.print(table)
    for name, note in result["notes"].items():
        console.print(f"{name}: {note}")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (weights, mode) in sorted({(r["weights"], r["mode"]) for r in result["rows"]}):
        rows = [r for r in result["rows"] if (r["weights"], r["mode"]) == (weights, mode)]
        n = [r["draft_len"] for r in rows]
        style = "-o" if mode == "mtp" else "--s"
        axes[0].plot(n, [r["tokens_per_target_forward"] for r in rows], style, label=f"{weights} {mode}")
        axes[1].plot(n, [r["speedup"] for r in rows], style, label=f"{weights} {mode}")
    axes[0].set(xlabel="draft length", ylabel="tokens per target forward", title="tokens per target forward")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set(xlabel="draft length", ylabel="wall-clock speedup vs plain", title="speedup (plain greedy = 1)")
    for ax in axes:
        ax.set_xticks(list(DRAFT_LENGTHS))
    # One legend under both panels: inside either one it covers curves.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=6, fontsize=7, frameon=False)
    fig.suptitle("\n".join(f"{k}: {v}" for k, v in result["notes"].items()), fontsize=7)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

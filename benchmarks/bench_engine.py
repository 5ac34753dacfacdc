"""Reference-engine benchmark on the tiny model, with its baselines measured in the same run:

1. decode tokens/s of the reference engine (TP1, all fusions, latent KV cache with absorbed MLA) against
   transformers' ``generate`` (eager, DynamicCache) on the same dequantized checkpoint (goal >= 2x), for every
   combination of compute dtype (``--dtypes``), batch (``--batches``) and torch threads (``--threads``): both sides
   always run with the same dtype, batch and threads. Beside each, how much of the engine's decode step is spent
   in its weight GEMMs (every ``linear`` timed where it runs);
2. the fused bundle against the unfused one, and each fusion switched off alone (``fuse_gate_up``,
   ``fuse_qkv_a``, ``absorb_mla``, ``stack_experts``, and on CPU the load-time pre-packing of the GEMM weights,
   ``packed_gemms``), at the first dtype, batch and thread count; and a PP2 bundle
   with its requests in micro-batches that overlap the two stages against the whole batch going through in turn;
3. peak RSS of every rank of a multi-rank service against its shard (rank-file tensor bytes) and its loaded
   (dequantized) weights, in a fresh process so the numbers are the engine's own.

Decode rate = batch x (N2 - N1) / (t(N2) - t(N1)): the difference of two generations of N1 and N2 tokens from
the same prompts, so prefill cancels out. Best of ``--repeats``, measured round-robin across all paths.

    PYTHONPATH=. python benchmarks/bench_engine.py [--json] [--png benchmarks/results/bench_engine.png]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from builder.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder.safeio import dumps_json  # noqa: E402


def decode_rates(paths: dict, *, batch: int, n1: int, n2: int, repeats: int) -> dict[str, float]:
    """Decode tokens/s of every path, measured round-robin (path after path, repeat after repeat) so that load
    from other processes on a shared machine falls on all of them alike; the best time of each is kept."""
    best: dict[tuple[str, int], float] = {}
    for fn in paths.values():
        fn(n1)  # warm-up
    for _ in range(repeats):
        for name, fn in paths.items():
            for n in (n1, n2):
                t0 = time.perf_counter()
                fn(n)
                best[name, n] = min(best.get((name, n), float("inf")), time.perf_counter() - t0)
    rates = {}
    for name in paths:
        decode_s = best[name, n2] - best[name, n1]
        if decode_s <= 0:  # every short run was slowed more than the long ones: the machine was too busy to measure
            raise SystemExit(f"{name}: {n2} tokens took no longer than {n1} (best of {repeats}); the machine is too "
                             "loaded to measure, rerun with more --repeats or fewer --threads")
        rates[name] = batch * (n2 - n1) / decode_s
    return rates


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def engine_generate(bundle_dir: Path, *, device: str, dtype: torch.dtype = torch.float32):
    """The in-process (TP1) service and a ``run(prompts, n)`` generating ``n`` tokens for each prompt."""
    from builder.engine.service import EngineService, GenerationRequest

    svc = EngineService(bundle_dir, device=device, dtype=dtype)

    def run(prompts, n: int):
        return svc.generate([GenerationRequest(prompt_ids=p, sampling=SamplingParams(max_tokens=n)) for p in prompts])
    return svc, run


def hf_generate(float_dir: Path, *, device: str, dtype: torch.dtype = torch.float32):
    from builder.model.hf_compat import load_hf_model

    model = load_hf_model(float_dir, dtype=dtype).to(device)

    def run(prompts, n: int):
        ids = torch.tensor(prompts, device=device)
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False)
    return run


def gemm_seconds_per_step(engine_run, prompts, *, n1: int, n2: int, repeats: int) -> float:
    """Time a decode step spends inside the layers' weight GEMMs: every ``linear`` timed where it runs, in real
    generations of N1 and N2 tokens (their difference per step, so prefill cancels out); best of ``repeats``."""
    from unittest import mock

    import builder.engine.layers as layers
    import builder.engine.model as model

    plain_linear = layers.linear
    spent = [0.0]

    def timed_linear(x, w):
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        y = plain_linear(x, w)
        sync()
        spent[0] += time.perf_counter() - t0
        return y

    best = float("inf")
    # Both modules that call it: the layers' projections and experts, and the LM head.
    with mock.patch.object(layers, "linear", timed_linear), mock.patch.object(model, "linear", timed_linear):
        for _ in range(repeats):
            per_run = {}
            for n in (n1, n2):
                spent[0] = 0.0
                engine_run(prompts, n)
                per_run[n] = spent[0]
            best = min(best, (per_run[n2] - per_run[n1]) / (n2 - n1))
    return best


def rss_child(bundle_dir: str, threads: int) -> None:
    """Runs in a fresh process: start the multi-rank service, generate once, report every rank's memory."""
    from builder.engine.service import EngineService, GenerationRequest

    with EngineService(bundle_dir, threads_per_rank=threads) as svc:
        svc.generate([GenerationRequest(prompt_ids=list(range(2, 34)), sampling=SamplingParams(max_tokens=8))])
        print(json.dumps(svc.rank_stats()))


def bare_torch_rss() -> int:
    code = "import torch; from builder.engine.generate import peak_rss_bytes; print(peak_rss_bytes())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}).stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 1], help="decode batch sizes to compare")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                    help="torch thread counts to compare (both sides use the same)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--n1", type=int, default=8)
    ap.add_argument("--n2", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rss-layout", default="2,2,2", help="tp,pp,ep of the multi-rank RSS measurement")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--png", type=Path, default=REPO / "benchmarks" / "results" / "bench_engine.png",
                    help="PNG plot to write; the JSON results are written next to it")
    ap.add_argument("--_rss-child", dest="rss_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_threads", dest="threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child, args.threads)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-engine-") as scratch:
        results = measure(args, Path(scratch))
    args.png.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.png)
    args.png.with_suffix(".json").write_text(dumps_json(results) + "\n")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    return 0


def measure(args, tmp: Path) -> dict:
    from functools import partial
    from unittest import mock

    from builder.engine.service import EngineService, GenerationRequest
    from builder.layout import Layout
    from builder.model.generated import ensure_tiny
    from builder.model.hf_compat import write_dequantized_checkpoint
    from builder.shard.bundle import write_engine_bundle
    from builder.shard.fusion import FusionOptions
    from builder.specs import RunSpec

    ckpt = ensure_tiny(RunSpec().cache_root / "models")
    float_dir = write_dequantized_checkpoint(ckpt, tmp / "fp32")

    def prompts_of(batch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(0)
        return torch.randint(2, 1024, (batch, args.prompt_len), generator=g).tolist()

    variants = {"fused (all on)": FusionOptions(), "unfused (all off)": FusionOptions.none()}
    for name in ("fuse_gate_up", "fuse_qkv_a", "absorb_mla", "stack_experts"):
        variants[f"all on but {name}"] = replace(FusionOptions(), **{name: False})
    bundles = {}
    for name, fusion in variants.items():
        bundles[name] = tmp / name.replace(" ", "_").replace("(", "").replace(")", "")
        bundles[name].mkdir()
        write_engine_bundle(ckpt, bundles[name], layout=Layout(1, 1, 1), fusion=fusion)
    results: dict = {"device": args.device, "prompt_len": args.prompt_len, "decode_tokens": [args.n1, args.n2],
                     "repeats": args.repeats, "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg())}

    # 1. engine vs transformers, same dtype / threads / batch on both sides
    results["comparisons"] = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        svc, engine_run = engine_generate(bundles["fused (all on)"], device=args.device, dtype=dtype)
        hf_run = hf_generate(float_dir, device=args.device, dtype=dtype)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batches:
                prompts = prompts_of(batch)
                tps = decode_rates({"transformers": partial(hf_run, prompts), "engine": partial(engine_run, prompts)},
                                   batch=batch, n1=args.n1, n2=args.n2, repeats=args.repeats)
                row = {"dtype": dtype_name, "threads": threads, "batch": batch,
                       "engine_tokens_per_s": tps["engine"], "transformers_tokens_per_s": tps["transformers"],
                       "engine_vs_transformers": tps["engine"] / tps["transformers"],
                       "engine_step_ms": 1e3 * batch / tps["engine"],
                       "engine_step_gemm_ms": 1e3 * gemm_seconds_per_step(engine_run, prompts, n1=args.n1,
                                                                          n2=args.n2, repeats=args.repeats)}
                results["comparisons"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        svc.close()

    # 2. fusions, at the first dtype / threads / batch
    dtype, threads, batch = DTYPES[args.dtypes[0]], args.threads[0], args.batches[0]
    torch.set_num_threads(threads)
    results["fusion_config"] = {"dtype": args.dtypes[0], "threads": threads, "batch": batch}
    paths, services = {}, []
    for name, bundle in bundles.items():
        svc, run = engine_generate(bundle, device=args.device, dtype=dtype)
        paths[f"engine {name}"] = partial(run, prompts_of(batch))
        services.append(svc)
    if args.device == "cpu":  # the fused bundle with its CPU GEMM weights left unpacked (plain F.linear)
        with mock.patch.dict(os.environ, {"DSBUILD_PACKED_GEMMS": "0"}):
            svc, run = engine_generate(bundles["fused (all on)"], device=args.device, dtype=dtype)
        paths["engine all on but packed_gemms"] = partial(run, prompts_of(batch))
        services.append(svc)
    tps = results["decode_tokens_per_s"] = decode_rates(paths, batch=batch, n1=args.n1, n2=args.n2,
                                                        repeats=args.repeats)
    for svc in services:
        svc.close()
    results["fused_vs_unfused"] = tps["engine fused (all on)"] / tps["engine unfused (all off)"]
    results["each_fusion_speedup"] = {k.removeprefix("engine all on but "): tps["engine fused (all on)"] / v
                                      for k, v in tps.items() if k.startswith("engine all on but")}

    # 3. PP2 with and without micro-batches overlapping the stages (two worker processes, one thread each)
    pp_bundle = tmp / "pp2"
    pp_bundle.mkdir()
    write_engine_bundle(ckpt, pp_bundle, layout=Layout(1, 2, 1), fusion=FusionOptions())
    with EngineService(pp_bundle, device=args.device, dtype=dtype, threads_per_rank=1) as svc:
        reqs = lambda n: [GenerationRequest(prompt_ids=p, sampling=SamplingParams(max_tokens=n)) for p in prompts_of(batch)]
        pp_paths = {"micro-batches": lambda n: svc.generate(reqs(n)),
                    "one batch": lambda n: svc.generate(reqs(n), micro_batches=False)}
        results["pp2_decode_tokens_per_s"] = decode_rates(pp_paths, batch=batch, n1=args.n1, n2=args.n2,
                                                          repeats=args.repeats)
    results["pp2_micro_batch_speedup"] = (results["pp2_decode_tokens_per_s"]["micro-batches"]
                                          / results["pp2_decode_tokens_per_s"]["one batch"])

    tp, pp, ep = map(int, args.rss_layout.split(","))
    rss_bundle = tmp / "rss"
    rss_bundle.mkdir()
    write_engine_bundle(ckpt, rss_bundle, layout=Layout(tp, pp, ep), fusion=FusionOptions())
    threads = max(1, (os.cpu_count() or 1) // (tp * pp))
    out = subprocess.run([sys.executable, __file__, "--_rss-child", str(rss_bundle), "--_threads", str(threads)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode != 0:
        raise SystemExit(f"RSS measurement failed: {out.stderr[-2000:]}")
    results["rss_layout"] = f"tp{tp}pp{pp}ep{ep}"
    results["bare_torch_process_rss_bytes"] = bare_torch_rss()
    results["ranks"] = json.loads(out.stdout.strip().splitlines()[-1])

    return results


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(width=130)
    t = Table(title=f"decode tokens/s, tiny model, prompt {r['prompt_len']}, {r['device']} "
                    f"(goal: engine >= 2x transformers)")
    for col in ("dtype", "threads", "batch", "transformers", "engine", "engine / transformers", "engine step ms",
                "of which weight GEMMs ms"):
        t.add_column(col, justify="right")
    for row in r["comparisons"]:
        t.add_row(row["dtype"], str(row["threads"]), str(row["batch"]), f"{row['transformers_tokens_per_s']:.0f}",
                  f"{row['engine_tokens_per_s']:.0f}", f"{row['engine_vs_transformers']:.2f}x",
                  f"{row['engine_step_ms']:.2f}", f"{row['engine_step_gemm_ms']:.2f}")
    c.print(t)
    f = r["fusion_config"]
    u = Table(title=f"fusions: decode tokens/s, {f['dtype']}, {f['threads']} thread(s), batch {f['batch']}")
    u.add_column("bundle")
    u.add_column("tokens/s", justify="right")
    for k, v in r["decode_tokens_per_s"].items():
        u.add_row(k, f"{v:.1f}")
    c.print(u)
    c.print(f"fused / unfused: {r['fused_vs_unfused']:.2f}x   "
            + "  ".join(f"{k}: {v:.2f}x" for k, v in r["each_fusion_speedup"].items()))
    p = r["pp2_decode_tokens_per_s"]
    c.print(f"PP2 (batch {f['batch']}): micro-batches {p['micro-batches']:.0f} tokens/s, one batch "
            f"{p['one batch']:.0f} tokens/s: {r['pp2_micro_batch_speedup']:.2f}x")
    m = Table(title=f"memory per rank ({r['rss_layout']}; a bare torch process: "
                    f"{r['bare_torch_process_rss_bytes'] / 2**20:.0f} MiB)")
    for col in ("rank", "shard MiB", "loaded weights MiB", "peak RSS MiB", "peak RSS - bare torch MiB"):
        m.add_column(col, justify="right")
    for i, rank in enumerate(r["ranks"]):
        m.add_row(str(i), f"{rank['shard_bytes'] / 2**20:.1f}", f"{rank['loaded_weight_bytes'] / 2**20:.1f}",
                  f"{rank['peak_rss_bytes'] / 2**20:.0f}",
                  f"{(rank['peak_rss_bytes'] - r['bare_torch_process_rss_bytes']) / 2**20:.0f}")
    c.print(m)


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (v, a, b) = plt.subplots(1, 3, figsize=(19, 4.8))
    rows = r["comparisons"]
    labels = [f"{x['dtype']}\n{x['threads']}t b{x['batch']}" for x in rows]
    v.bar(range(len(rows)), [x["engine_vs_transformers"] for x in rows], color="tab:blue")
    v.axhline(2.0, color="k", ls="--", lw=1, label="goal 2x")
    v.set_xticks(range(len(rows)), labels, fontsize=8)
    v.set_ylabel("engine / transformers decode tokens/s")
    v.set_title("reference engine vs transformers generate")
    v.legend()
    names = list(r["decode_tokens_per_s"])
    a.barh(names, [r["decode_tokens_per_s"][n] for n in names], color="tab:blue")
    a.set_xlabel("decode tokens/s")
    f = r["fusion_config"]
    a.set_title(f"fusions ({f['dtype']}, {f['threads']} thread(s), batch {f['batch']}, {r['device']})")
    a.invert_yaxis()
    ranks = range(len(r["ranks"]))
    w = 0.27
    mib = lambda k: [x[k] / 2**20 for x in r["ranks"]]
    b.bar([i - w for i in ranks], mib("shard_bytes"), w, label="shard (rank file tensors)")
    b.bar(list(ranks), mib("loaded_weight_bytes"), w, label="loaded weights (dequantized)")
    b.bar([i + w for i in ranks], [x - r["bare_torch_process_rss_bytes"] / 2**20 for x in mib("peak_rss_bytes")], w,
          label="peak RSS above a bare torch process")
    b.set_xticks(list(ranks))
    b.set_xlabel(f"rank ({r['rss_layout']})")
    b.set_ylabel("MiB")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

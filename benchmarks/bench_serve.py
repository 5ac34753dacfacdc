"""Serving throughput of the CPU-flavour Triton repository against the reference engine called directly.

Baselines, in this process: ``EngineService.generate`` one request at a time, and all of a level's requests in one
batched call. Then the packaged repository is served by a real tritonserver (127.0.0.1) and driven over gRPC
streaming at each concurrency level, and, right after each gRPC level, through the OpenAI-compatible endpoint
(``dsbuild openai`` in front of the same server, streamed ``/v1/completions`` with the official ``openai`` client,
tokens counted from ``usage.completion_tokens``) with the same prompts and concurrency. Prints tokens/s and the
ratios served / direct and OpenAI / gRPC; ``--json`` for machines, ``--plot FILE.png`` for people.

    PYTHONPATH=. python benchmarks/bench_serve.py --concurrency 1,4,16 --max-tokens 16 --repeats 3 --plot serve.png

``--profile FILE`` (needs ``pip install py-spy``) samples the tritonserver process tree with py-spy while the highest
level runs and prints where the Python backend stub's busy time goes: the scheduler thread (rank 0's engine step),
the response thread (detokenization, building and sending responses), request intake; and the other ranks' share.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from builder.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "Serving benchmark prompt number {i}: the model writes"


def build_run(work: Path, tp: int, pp: int) -> Path:
    from builder.pipeline import run_pipeline
    from builder.specs import resolve_spec
    from builder.stages import all_stages

    spec = resolve_spec(cli={"tp": tp, "pp": pp, "out": str(work / "run"), "concurrency": 64})
    run_pipeline(spec, all_stages(spec), run_dir=spec.run_dir(), log=lambda m: None)
    return spec.run_dir()


def direct(engines: Path, levels: list[int], max_tokens: int) -> dict[str, float]:
    from builder.engine.service import EngineService, GenerationRequest

    out = {}
    with EngineService(engines) as engine:
        tok = engine.tokenizer()
        reqs = [GenerationRequest(prompt_ids=tok.encode(PROMPT.format(i=i)).ids, sampling=SamplingParams(max_tokens=max_tokens))
                for i in range(max(levels))]
        for r in reqs[:2]:  # warm-up: first calls pay for allocations and thread-pool start
            engine.generate([r])
        t0 = time.perf_counter()
        n = sum(len(engine.generate([r])[0].token_ids) for r in reqs[:4])
        out["sequential"] = n / (time.perf_counter() - t0)
        for c in levels:
            t0 = time.perf_counter()
            n = sum(len(r.token_ids) for r in engine.generate(reqs[:c]))
            out[f"batch{c}"] = n / (time.perf_counter() - t0)
    return out


def start_profile(pid: int, out: Path) -> subprocess.Popen:
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--profile needs py-spy on PATH (pip install py-spy)")
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--subprocesses", "--format", "raw", "--rate", "50",
                             "--nonblocking", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profile(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)  # py-spy writes what it sampled, then exits
    proc.wait(timeout=60)


# Where a sampled stack of the Python backend stub belongs, by the dsbuild frame it passes through (first match),
# and the parts of that thread's work reported (the innermost matching frame names the part).
ENGINE_STEP, RESPONSES = "scheduler thread: rank 0's engine step", "response thread: detokenize, build and send"
STUB_THREADS = [("Scheduler._loop", ENGINE_STEP), ("_respond_loop", RESPONSES), ("execute", "request intake (execute)")]
THREAD_PARTS = {ENGINE_STEP: ["all_reduce", "broadcast", "all_gather", "Indexer.scores", "MLA.", "MoE", "sample"],
                RESPONSES: ["_send", "_response", "DecodeStream", "step", "is_cancelled", "_on_token", "_finish"]}


def profile_breakdown(path: Path) -> dict:
    """Shares of py-spy's busy samples (idle threads are not sampled): per process kind, per stub thread, and the
    largest parts of the engine step and of the response thread."""
    procs, threads = collections.Counter(), collections.Counter()
    parts = {thread: collections.Counter() for thread in THREAD_PARTS}
    for line in path.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        n, frames = int(count), stack.split(";")
        proc = [f for f in frames if f.startswith("process ")][-1]
        names = [re.sub(r" \(.*", "", f) for f in frames if not f.startswith("process ")]
        if "python_backend_stub" not in proc:
            procs["other ranks (engine workers)" if "builder" in proc else "tritonserver (C++)"] += n
            continue
        procs["Python backend stub (rank 0 + the model)"] += n
        joined = ";".join(names)
        thread = next((label for key, label in STUB_THREADS if key in joined), "other")
        threads[thread] += n
        if thread in parts:
            keys = THREAD_PARTS[thread]
            parts[thread][next((k for f in reversed(names) for k in keys if k in f), "other")] += n
    total, stub = sum(procs.values()), sum(threads.values())

    def shares(c: collections.Counter, of: int) -> dict[str, float]:
        return {k: round(v / of, 3) for k, v in c.most_common() if v} if of else {}
    return {"samples": total, "processes": shares(procs, total), "stub_threads": shares(threads, stub),
            "engine_step": shares(parts[ENGINE_STEP], stub), "response_thread": shares(parts[RESPONSES], stub)}


def run_level(concurrency: int, rounds: int, request) -> tuple[list, float]:
    """``concurrency`` client threads, each sending ``rounds`` requests one after another; results and wall time."""
    results = []

    def worker(i: int) -> None:
        for r in range(rounds):
            results.append(request(PROMPT.format(i=i + r * concurrency)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def openai_request(client, max_tokens: int):
    """One streamed completion: (output tokens the endpoint counted, seconds to the first text, seconds in all)."""
    def request(prompt: str) -> tuple[int, float, float]:
        t0 = time.perf_counter()
        first, tokens = None, 0
        for chunk in client.completions.create(model="tensorrt_llm", prompt=prompt, max_tokens=max_tokens,
                                               temperature=0, stream=True, stream_options={"include_usage": True}):
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - t0
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens, first or 0.0, time.perf_counter() - t0
    return request


def served(repo: Path, levels: list[int], max_tokens: int, rounds: int, *, openai_too: bool = True,
           profile: Path | None = None) -> dict[int, dict[str, float]]:
    import openai

    from triton_repo.client import GenerateOptions, generate
    from triton_repo.openai_api.server import EndpointProcess
    from triton_repo.server import LOOPBACK, TritonServer, free_port

    out = {}
    with TritonServer(repo=repo) as server, contextlib.ExitStack() as stack:
        t_start = time.perf_counter()
        server.wait_ready(models=["tensorrt_llm"], timeout=600)
        ready_s = time.perf_counter() - t_start
        generate(server.grpc_url, GenerateOptions(prompt="warm-up", sampling=SamplingParams(max_tokens=2)))
        client = None
        if openai_too:
            endpoint = EndpointProcess(triton_url=server.grpc_url, repo=repo, host=LOOPBACK, port=free_port(),
                                       log=lambda m: print(m, file=sys.stderr)).start()
            stack.callback(endpoint.stop)
            client = openai.OpenAI(base_url=f"http://{LOOPBACK}:{endpoint.port}/v1", api_key="unused",
                                   max_retries=0, timeout=600)
            openai_request(client, 2)("warm-up")

        def grpc_request(prompt: str):
            return generate(server.grpc_url, GenerateOptions(prompt=prompt, stream=True,
                                                             sampling=SamplingParams(max_tokens=max_tokens)))
        for c in levels:
            spy = start_profile(server.proc.pid, profile) if profile is not None and c == max(levels) else None
            results, wall = run_level(c, rounds, grpc_request)
            if spy is not None:
                stop_profile(spy)
            tokens = sum(len(r.responses) for r in results)  # one streamed response per token
            out[c] = {"tokens_per_s": tokens / wall, "ttft_ms": 1000 * statistics.mean(r.first_response_s for r in results),
                      "latency_ms": 1000 * statistics.mean(r.total_s for r in results), "requests": len(results)}
            if client is not None:  # the same prompts right after, so both see the same machine
                answers, wall = run_level(c, rounds, openai_request(client, max_tokens))
                openai_rate = sum(tokens for tokens, _, _ in answers) / wall
                out[c] |= {"openai_tokens_per_s": openai_rate,
                           "openai_ttft_ms": 1000 * statistics.mean(first for _, first, _ in answers),
                           "openai_over_grpc": openai_rate / out[c]["tokens_per_s"]}
        out[0] = {"ready_s": ready_s}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="an existing run directory (default: build tiny TP2xPP1 in a temp dir)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client thread at each level")
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure direct then served this many times on the same run; ratios per repeat and median")
    ap.add_argument("--no-openai", action="store_true", help="skip the OpenAI-compatible endpoint's levels")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--profile", type=Path, help="py-spy raw samples of the highest level's serving (last repeat) "
                                                  "go here; the breakdown is printed")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    repeats = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        run = args.run or build_run(Path(tmp), args.tp, args.pp)
        for i in range(max(1, args.repeats)):
            load = os.getloadavg()[0]
            base = direct(run / "engines", levels, args.max_tokens)
            last = i == max(1, args.repeats) - 1
            srv = served(run / "package" / "triton_repo", levels, args.max_tokens, args.rounds,
                         openai_too=not args.no_openai, profile=args.profile if last else None)
            repeats.append((base, srv, load))
    base, srv, _ = repeats[-1]
    rows = [{"concurrency": c, **srv[c], "direct_batch_tokens_per_s": base[f"batch{c}"],
             "served_over_direct_sequential": srv[c]["tokens_per_s"] / base["sequential"],
             "served_over_direct_batch": srv[c]["tokens_per_s"] / base[f"batch{c}"],
             "served_over_direct_batch_per_repeat": [s[c]["tokens_per_s"] / b[f"batch{c}"] for b, s, _ in repeats],
             "served_over_direct_batch_median": statistics.median(
                 s[c]["tokens_per_s"] / b[f"batch{c}"] for b, s, _ in repeats)}
            | ({"openai_over_grpc_per_repeat": [s[c]["openai_over_grpc"] for _, s, _ in repeats],
                "openai_over_grpc_median": statistics.median(s[c]["openai_over_grpc"] for _, s, _ in repeats)}
               if not args.no_openai else {}) for c in levels]
    result = {"direct_sequential_tokens_per_s": base["sequential"], "server_ready_s": srv[0]["ready_s"],
              "max_tokens": args.max_tokens, "repeats": len(repeats),
              "load_1min_at_start_of_each_repeat": [round(l, 2) for _, _, l in repeats], "levels": rows}
    if args.profile:
        result["profile"] = profile_breakdown(args.profile)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"direct, one request at a time: {base['sequential']:.1f} tokens/s; server ready in "
              f"{srv[0]['ready_s']:.1f} s")
        print(f"{'conc':>4} {'served tok/s':>12} {'direct batch':>12} {'x sequential':>12} {'x batch':>8} "
              f"{'TTFT ms':>8} {'latency ms':>10}")
        for r in rows:
            print(f"{r['concurrency']:>4} {r['tokens_per_s']:>12.1f} {r['direct_batch_tokens_per_s']:>12.1f} "
                  f"{r['served_over_direct_sequential']:>12.2f} {r['served_over_direct_batch']:>8.2f} "
                  f"{r['ttft_ms']:>8.1f} {r['latency_ms']:>10.1f}")
        if len(repeats) > 1:
            print(f"served / direct batch over {len(repeats)} repeats (load {result['load_1min_at_start_of_each_repeat']}):")
            for r in rows:
                print(f"{r['concurrency']:>4} median {r['served_over_direct_batch_median']:.2f}  each "
                      + " ".join(f"{x:.2f}" for x in r["served_over_direct_batch_per_repeat"]))
        if not args.no_openai:
            print("OpenAI endpoint / Triton gRPC streaming, same prompts right after each gRPC level:")
            for r in rows:
                print(f"{r['concurrency']:>4} median {r['openai_over_grpc_median']:.2f}  each "
                      + " ".join(f"{x:.2f}" for x in r["openai_over_grpc_per_repeat"])
                      + f"  (TTFT {r['openai_ttft_ms']:.0f} ms vs {r['ttft_ms']:.0f} ms)")
        if args.profile:
            prof = result["profile"]
            print(f"profile at concurrency {max(levels)} ({prof['samples']} busy samples, py-spy):")
            for title in ("processes", "stub_threads", "engine_step", "response_thread"):
                print(f"  {title}: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in prof[title].items()))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(levels, [r["tokens_per_s"] for r in rows], "o-", label="Triton (gRPC streaming)")
        if not args.no_openai:
            ax.plot(levels, [r["openai_tokens_per_s"] for r in rows], "^-", label="OpenAI endpoint (streaming)")
        ax.plot(levels, [r["direct_batch_tokens_per_s"] for r in rows], "s--", label="EngineService, one batch")
        ax.axhline(base["sequential"], color="grey", ls=":", label="EngineService, one at a time")
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("generated tokens / s")
        ax.set_xscale("log", base=2)
        ax.set_title("CPU-flavour Triton serving vs the engine called directly")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()

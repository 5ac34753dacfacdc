"""Helpers for reference-engine tests: bundles per layout, torchrun launches, the transformers oracle."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import torch

from builder.engine.sampling import GenerationRequest
from tests.conftest import REPO

# Fixed prompts: lengths above and below the tiny model's index_topk (8), so both dense and sparse DSA run.
PROMPT_LENGTHS = (24, 5, 13)
GEN_TOKENS = 10
REL_TOL = 1e-4


def fixed_prompts(vocab: int = 1024, lengths=PROMPT_LENGTHS, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def build_bundle(ckpt: Path, out: Path, *, tp: int, pp: int, ep: int, fusion=None, attention_dp: bool = False) -> Path:
    from builder.shard.fusion import FusionOptions
    from builder.layout import Layout
    from builder.shard.bundle import write_engine_bundle

    if not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_engine_bundle(ckpt, out, layout=Layout(tp, pp, ep, attention_dp), fusion=fusion or FusionOptions())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(engine: Path, task: dict, workdir: Path, *, nproc: int, nnodes: int = 1,
                 timeout: float = 600) -> tuple[dict, list[torch.Tensor]]:
    """Launch ``python -m torch.distributed.run`` (``nnodes`` torchrun agents on this host, c10d rendezvous on
    127.0.0.1 when more than one) and return rank 0's JSON result and its prompt logits."""
    from safetensors.torch import load_file

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "task.json").write_text(json.dumps(task))
    out = workdir / "result.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    port = free_port()
    if nnodes == 1:
        launch = ["--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(port)]
    else:
        launch = ["--nnodes", str(nnodes), "--nproc-per-node", str(nproc // nnodes), "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"dsbuild-{port}", "--local-addr", "127.0.0.1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "builder.engine.torchrun",
           "--engine", str(engine), "--task", str(workdir / "task.json"), "--out", str(out)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(nnodes)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(p.returncode, log) for p, log in zip(procs, logs) if p.returncode != 0]
    assert not failed, f"torchrun failed: {failed[0][0]}\n{failed[0][1][-3000:]}"
    result = json.loads(out.read_text())
    logits_file = out.with_suffix(".logits.safetensors")
    logits = []
    if logits_file.exists():
        d = load_file(str(logits_file))
        logits = [d[f"logits.{i}"] for i in range(len(d))]
    return result, logits


def hf_reference(float_dir: Path, prompts: list[list[int]], gen_tokens: int = GEN_TOKENS):
    """transformers' fp32 eager logits and greedy continuations, one unpadded prompt at a time."""
    from builder.model.hf_compat import load_hf_model

    model = load_hf_model(float_dir)
    logits, greedy = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            logits.append(model(ids).logits[0].float())
            greedy.append(model.generate(ids, max_new_tokens=gen_tokens, do_sample=False)[0, len(p):].tolist())
    return logits, greedy


def max_rel_err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(got, ref))


# Layouts the scheduler tests run on (tests/integration/test_continuous_batching.py, test_service_shutdown.py).
LAYOUTS = {"tp1": dict(tp=1, pp=1, ep=1), "tp2": dict(tp=2, pp=1, ep=1), "pp2": dict(tp=1, pp=2, ep=1),
           "tp2-adp": dict(tp=2, pp=1, ep=1, attention_dp=True)}


class SchedulerClient:
    """Submits to an ``EngineService`` scheduler and records what comes back, with events to wait on."""

    def __init__(self, sched):
        self.sched = sched
        self.tokens: dict[str, list[int]] = {}
        self.results: dict = {}
        self.started: dict[str, int] = {}
        self.finished_order: list[str] = []
        self.seen = threading.Condition()

    def submit(self, name: str, req: GenerationRequest):
        self.tokens[name] = []

        def on_token(tok):
            with self.seen:
                self.tokens[name].append(tok)
                self.seen.notify_all()

        def on_done(res):
            with self.seen:
                self.results[name] = res
                self.finished_order.append(name)
                self.seen.notify_all()

        return self.sched.submit(req, on_token=on_token, on_done=on_done,
                                 on_start=lambda size: self.started.__setitem__(name, size))

    def wait(self, predicate, timeout=300):
        with self.seen:
            assert self.seen.wait_for(predicate, timeout=timeout), (self.tokens, self.results)

    def wait_tokens(self, name, n):
        self.wait(lambda: len(self.tokens[name]) >= n or name in self.results)

    def wait_done(self, *names):
        self.wait(lambda: all(n in self.results for n in names))

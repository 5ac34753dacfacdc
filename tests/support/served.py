"""Start ``dsbuild serve`` on free 127.0.0.1 ports for a test, and always stop it."""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from builder.sampling_params import SamplingParams
from tests.conftest import REPO, run_dsbuild


@dataclass
class Served:
    proc: subprocess.Popen
    http: str
    grpc: str
    log: Path
    stderr_lines: list[str]
    openai: str | None = None  # host:port of the OpenAI-compatible endpoint, when started


@contextlib.contextmanager
def serve_repo(repo: Path, log: Path, *, exit_timeout: int = 10, ready_timeout: float = 300,
               openai: bool = False) -> Iterator[Served]:
    from triton_repo.background import serve_in_background

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with serve_in_background(repo, log_file=log, ready_timeout=ready_timeout, exit_timeout=exit_timeout,
                             env=env, openai=openai) as server:
        yield Served(server.proc, server.http, server.grpc, log, server.stderr_lines, server.openai)


def build_cpu_run(work: Path, cache_dir: Path, *, concurrency: int) -> Path:
    """``dsbuild run`` of the tiny model at TP2 x PP1 into ``work/run`` (CPU Triton repository included)."""
    run_dsbuild("run", "--tp", "2", "--pp", "1", "--out", "run", "--concurrency", str(concurrency), cwd=work,
                env={"XDG_CACHE_HOME": str(cache_dir)}, check=True)
    return work / "run"


def direct_results(engine_dir: Path, wanted: dict, *, max_tokens: int) -> dict:
    """What ``EngineService`` itself returns for each ``key -> (prompt text, sampling params)`` of ``wanted``, one
    request at a time and stopping at end-of-sentence as TensorRT-LLM does by default: key -> (decoded text,
    GenerationResult)."""
    from builder.engine.service import EngineService, GenerationRequest
    from builder.engine.text import encode_prompt

    out = {}
    with EngineService(engine_dir) as engine:
        tok = engine.tokenizer()
        eos = [int(engine.bundle.cfg.raw["eos_token_id"])]
        for key, (prompt, params) in wanted.items():
            ids = encode_prompt(engine.bundle, tok, prompt)
            (res,) = engine.generate([GenerationRequest(ids, SamplingParams(max_tokens=max_tokens, **params), eos)])
            out[key] = (tok.decode(res.token_ids), res)
    return out

"""The load generator: for each concurrency, warm-up requests (excluded), then ``num_requests`` requests either
closed-loop (``concurrency`` in flight, the next sent when one finishes) or with Poisson arrivals at
``request_rate`` requests/s (in flight capped at ``concurrency``). The same seeded prompts and output lengths are
used at every concurrency, so levels differ only in load."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from builder.errors import ServeError, SpecError
from builder.sampling_params import SamplingParams
from triton_repo.bench.prompts import Length, Prompt, PromptTokenizer, load_dataset
from triton_repo.bench.stream import RequestRecord, stream_grpc, stream_http, stream_openai
from triton_repo.client import Endpoint, GenerateOptions, wrong_port_hint
from triton_repo.interface import MODEL_NAME


PROTOCOLS = ("grpc", "http", "openai")  # openai: the OpenAI-compatible endpoint's streamed /v1/completions


@dataclass(frozen=True)
class BenchConfig:
    url: str
    engines_dir: Path
    protocol: str = "grpc"
    concurrency: tuple[int, ...] = (1, 4, 16)
    isl: Length = Length(128)
    osl: Length = Length(64)
    num_requests: int = 32
    request_rate: float | None = None
    seed: int = 0
    warmup: int = 2
    dataset: Path | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    model: str = MODEL_NAME
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise SpecError(f"unknown protocol {self.protocol!r}; choose {', '.join(PROTOCOLS)}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise SpecError(f"every concurrency must be at least 1, got {list(self.concurrency)}")
        if self.num_requests < 1 or self.warmup < 0:
            raise SpecError("--num-requests must be at least 1 and --warmup at least 0")
        if self.request_rate is not None and self.request_rate <= 0:
            raise SpecError(f"--request-rate must be positive, got {self.request_rate}")
        host, _, port = self.url.rpartition(":")
        if not host or not port.isdigit():
            raise SpecError(f"--url must be HOST:PORT, got {self.url!r}")


@dataclass(frozen=True)
class PlannedRequest:
    prompt: Prompt
    max_tokens: int


@dataclass
class LevelRun:
    concurrency: int
    records: list[RequestRecord]
    warmup_records: list[RequestRecord]
    duration_s: float
    sent: int = field(init=False)

    def __post_init__(self) -> None:
        self.sent = len(self.records)


def plan_requests(cfg: BenchConfig, tokenizer: PromptTokenizer, count: int, *, salt: int = 0) -> list[PlannedRequest]:
    """``count`` requests: prompts (synthetic, or cycling through the dataset) and output lengths, seeded."""
    rng = random.Random(cfg.seed * 1_000_003 + salt)
    dataset = load_dataset(cfg.dataset, tokenizer) if cfg.dataset else None
    out = []
    for i in range(count):
        prompt = dataset[i % len(dataset)] if dataset else tokenizer.synthetic(cfg.isl.sample(rng), rng)
        out.append(PlannedRequest(prompt, cfg.osl.sample(rng)))
    return out


class _Sender:
    """One client shared by a level's requests (gRPC channel or HTTP connection pool)."""

    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.client = None

    async def __aenter__(self) -> "_Sender":
        if self.cfg.protocol == "grpc":
            import tritonclient.grpc.aio as grpcclient

            self.client = grpcclient.InferenceServerClient(url=self.cfg.url)
        else:
            import aiohttp

            self.client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()

    async def send(self, index: int, req: PlannedRequest, level_t0: float) -> RequestRecord:
        record = RequestRecord(index=index, prompt_tokens=req.prompt.tokens, max_tokens=req.max_tokens)
        record.start_s = time.perf_counter() - level_t0
        opts = GenerateOptions(prompt=req.prompt.text, sampling=SamplingParams(max_tokens=req.max_tokens), stream=True)
        if self.cfg.protocol == "grpc":
            return await stream_grpc(self.client, record, opts, model=self.cfg.model, timeout=self.cfg.timeout_s)
        if self.cfg.protocol == "openai":
            return await stream_openai(self.client, self.cfg.url, record, opts, model=self.cfg.model,
                                       timeout=self.cfg.timeout_s)
        return await stream_http(self.client, self.cfg.url, record, opts, model=self.cfg.model,
                                 timeout=self.cfg.timeout_s)


async def _run_batch(sender: _Sender, requests: list[PlannedRequest], *, concurrency: int,
                     rate: float | None, rng: random.Random, on_done: Callable[[], None]) -> tuple[list, float]:
    limit = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()

    async def one(i: int, req: PlannedRequest) -> RequestRecord:
        async with limit:
            record = await sender.send(i, req, t0)
        on_done()
        return record

    tasks = []
    for i, req in enumerate(requests):
        if rate is not None and i:
            await asyncio.sleep(rng.expovariate(rate))
        tasks.append(asyncio.create_task(one(i, req)))
    records = await asyncio.gather(*tasks)
    return list(records), time.perf_counter() - t0


async def _run_level(cfg: BenchConfig, concurrency: int, requests: list[PlannedRequest],
                     warmup: list[PlannedRequest], progress) -> LevelRun:
    rng = random.Random(cfg.seed + concurrency)
    async with _Sender(cfg) as sender:
        warm, _ = await _run_batch(sender, warmup, concurrency=concurrency, rate=None, rng=rng, on_done=lambda: None)
        records, duration = await _run_batch(sender, requests, concurrency=concurrency, rate=cfg.request_rate,
                                             rng=rng, on_done=progress)
    return LevelRun(concurrency, records, warm, duration)


def check_server(cfg: BenchConfig) -> None:
    """Fail early, in one sentence, when nothing serves the model at ``cfg.url``."""
    if cfg.protocol == "openai":
        return check_openai_endpoint(cfg)
    try:
        if cfg.protocol == "grpc":
            import tritonclient.grpc as grpcclient

            client = grpcclient.InferenceServerClient(url=cfg.url)
        else:
            import tritonclient.http as httpclient

            client = httpclient.InferenceServerClient(url=cfg.url)
        try:
            ready = client.is_model_ready(cfg.model)
        finally:
            client.close()
    except Exception as exc:  # tritonclient raises its own exception types for every transport failure
        hint = wrong_port_hint(Endpoint(cfg.protocol, cfg.url))
        raise ServeError(f"cannot reach a Triton server at {cfg.url} over {cfg.protocol}: {exc}{hint}") from None
    if not ready:
        raise ServeError(f"the server at {cfg.url} does not have model {cfg.model} ready")


def check_openai_endpoint(cfg: BenchConfig) -> None:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{cfg.url}/v1/models", timeout=10) as resp:
            ids = [m.get("id") for m in json.loads(resp.read()).get("data", [])]
        with urllib.request.urlopen(f"http://{cfg.url}/health", timeout=10) as resp:
            ready = resp.status == 200
    except urllib.error.HTTPError as exc:
        raise ServeError(f"the OpenAI endpoint at {cfg.url} is up but its Triton model is not ready "
                         f"(HTTP {exc.code})") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ServeError(f"cannot reach an OpenAI-compatible endpoint at {cfg.url}: {exc}") from None
    if cfg.model not in ids or not ready:
        raise ServeError(f"the OpenAI endpoint at {cfg.url} serves {ids}, not a ready {cfg.model}")


def run_levels(cfg: BenchConfig, tokenizer: PromptTokenizer, *, show_progress: bool = True) -> list[LevelRun]:
    from tqdm import tqdm

    check_server(cfg)
    requests = plan_requests(cfg, tokenizer, cfg.num_requests)
    warmup = plan_requests(cfg, tokenizer, cfg.warmup, salt=1) if cfg.warmup else []
    levels = []
    for c in cfg.concurrency:
        with tqdm(total=len(requests), desc=f"concurrency {c}", unit="req", disable=not show_progress,
                  leave=True) as bar:
            levels.append(asyncio.run(_run_level(cfg, c, requests, warmup, lambda: bar.update(1))))
    return levels

"""One streamed request to the ``tensorrt_llm`` model, timed: gRPC (tritonclient's asyncio client, one
bidirectional stream per request), HTTP (Triton's ``generate_stream`` server-sent events with aiohttp) or the
OpenAI-compatible endpoint (``/v1/completions`` streamed, with aiohttp; tokens counted from its ``usage``).

Every response's arrival is recorded; ``text_output`` is cumulative in each streamed response (interface.py), so
the last response holds the whole output. A failure of any kind ends in ``RequestRecord.error`` with its message:
nothing is dropped."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from triton_repo.client import GenerateOptions, _first, _grpc_inputs, end_answered_stream, request_fields
from triton_repo.interface import MODEL_NAME


@dataclass
class RequestRecord:
    index: int
    prompt_tokens: int
    max_tokens: int
    start_s: float = 0.0  # since the level started
    ttft_s: float | None = None
    latency_s: float | None = None
    response_times_s: list[float] = field(default_factory=list)  # arrivals of responses with output, from start
    text: str = ""
    finish_reason: str = ""
    output_tokens: int = 0  # streamed responses with output: one per generated token (TensorRT-LLM streaming)
    output_tokens_text: int = 0  # the tokenizer applied to the final text (a cross-check; see docs/bench.md)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        """(latency - TTFT) / (output tokens - 1); undefined for a single output token."""
        if not self.ok or self.output_tokens < 2 or self.ttft_s is None or self.latency_s is None:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def inter_token_s(self) -> list[float]:
        """Gaps between consecutive streamed responses (one token each unless the server batches tokens)."""
        t = self.response_times_s
        return [b - a for a, b in zip(t, t[1:])]


def _fields(opts: GenerateOptions) -> dict[str, Any]:
    fields = request_fields(opts)
    fields["sampling_param_exclude_input_from_output"] = True  # only generated text, whatever the model's default
    return fields


class _Timeline:
    def __init__(self, record: RequestRecord):
        self.record = record
        self.t0 = time.perf_counter()

    def response(self, text: str, finish_reason: str | None) -> None:
        now = time.perf_counter() - self.t0
        r = self.record
        r.response_times_s.append(now)
        r.output_tokens += 1
        if r.ttft_s is None:
            r.ttft_s = now
        r.text = text
        if finish_reason:
            r.finish_reason = finish_reason

    def done(self) -> None:
        self.record.latency_s = time.perf_counter() - self.t0
        if self.record.ttft_s is None and self.record.error is None:
            self.record.error = "the stream ended without any generated token"


async def stream_grpc(client, record: RequestRecord, opts: GenerateOptions, *, model: str = MODEL_NAME,
                      timeout: float = 600) -> RequestRecord:
    """``client``: a ``tritonclient.grpc.aio.InferenceServerClient`` (shared by all requests of a run)."""
    import numpy as np
    import tritonclient.grpc.aio as grpcclient

    fields = _fields(opts)
    exclude = fields.pop("sampling_param_exclude_input_from_output")
    inputs = _grpc_inputs(fields)
    flag = grpcclient.InferInput("sampling_param_exclude_input_from_output", [1], "BOOL")
    flag.set_data_from_numpy(np.array([exclude], dtype=np.bool_))
    inputs.append(flag)
    finished = asyncio.Event()

    async def requests():
        yield {"model_name": model, "inputs": inputs, "request_id": uuid.uuid4().hex,
               "enable_empty_final_response": True}
        await finished.wait()  # keep the stream open until the final response

    line = _Timeline(record)
    call, answered = client.stream_infer(requests()), False
    try:
        async with asyncio.timeout(timeout):
            async for result, error in call:
                if error is not None:
                    record.error = error.message() if hasattr(error, "message") else str(error)
                    break
                response = result.get_response()
                if response.outputs:
                    line.response(str(_first(result, "text_output", "")), str(_first(result, "finish_reason", "")))
                final = response.parameters.get("triton_final_response")
                if final is None or final.bool_param:
                    answered = True
                    break
    except TimeoutError:
        record.error = f"no final response within {timeout:.0f} s"
    except Exception as exc:  # a transport failure is a failed request, reported as such
        message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
        record.error = f"{type(exc).__name__}: {message}"
    finally:
        finished.set()
    line.done()
    if answered:
        await end_answered_stream(call)
    else:
        call.cancel()
    return record


async def stream_http(session, url: str, record: RequestRecord, opts: GenerateOptions, *, model: str = MODEL_NAME,
                      timeout: float = 600) -> RequestRecord:
    """``session``: an ``aiohttp.ClientSession``; ``url``: HOST:PORT of Triton's HTTP endpoint."""
    import aiohttp

    line = _Timeline(record)
    try:
        async with session.post(f"http://{url}/v2/models/{model}/generate_stream", json=_fields(opts),
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                body = await resp.text()
                try:
                    body = json.loads(body).get("error", body)
                except (json.JSONDecodeError, AttributeError):
                    pass
                record.error = f"HTTP {resp.status}: {body}"
            else:
                async for raw in resp.content:
                    text = raw.decode("utf-8").strip()
                    if not text.startswith("data:"):
                        continue
                    data = json.loads(text[5:].strip())
                    if "error" in data:
                        record.error = str(data["error"])
                        break
                    out = data.get("text_output", "")
                    reason = data.get("finish_reason", "")
                    line.response(out[0] if isinstance(out, list) else out,
                                  reason[0] if isinstance(reason, list) else reason)
    except TimeoutError:
        record.error = f"no final response within {timeout:.0f} s"
    except Exception as exc:  # a transport failure is a failed request, reported as such
        record.error = f"{type(exc).__name__}: {exc}"
    line.done()
    return record


async def stream_openai(session, url: str, record: RequestRecord, opts: GenerateOptions, *,
                        model: str = MODEL_NAME, timeout: float = 600) -> RequestRecord:
    """``url``: HOST:PORT of the OpenAI-compatible endpoint. Each chunk with text is a response; the output token
    count is the endpoint's ``usage.completion_tokens`` (a chunk can carry more than one token's text)."""
    import aiohttp

    body = {"model": model, "prompt": opts.prompt, "max_tokens": opts.sampling.max_tokens,
            "temperature": opts.sampling.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    line = _Timeline(record)
    text = ""
    completion_tokens = None
    try:
        async with session.post(f"http://{url}/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                raw = await resp.text()
                try:
                    raw = json.loads(raw)["error"]["message"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass
                record.error = f"HTTP {resp.status}: {raw}"
            else:
                async for chunk in resp.content:
                    data = chunk.decode("utf-8").strip()
                    if not data.startswith("data:") or data == "data: [DONE]":
                        continue
                    event = json.loads(data[5:].strip())
                    if "error" in event:
                        record.error = str(event["error"].get("message", event["error"]))
                        break
                    if event.get("usage"):
                        completion_tokens = int(event["usage"]["completion_tokens"])
                    for choice in event.get("choices", []):
                        if choice.get("text"):
                            text += choice["text"]
                            line.response(text, choice.get("finish_reason") or "")
                        elif choice.get("finish_reason"):
                            record.finish_reason = choice["finish_reason"]
    except TimeoutError:
        record.error = f"no final response within {timeout:.0f} s"
    except Exception as exc:  # a transport failure is a failed request, reported as such
        record.error = f"{type(exc).__name__}: {exc}"
    line.done()
    if record.error is None and completion_tokens is not None:
        record.output_tokens = completion_tokens
    return record

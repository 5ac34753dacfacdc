"""The ASGI application (Starlette): OpenAI's ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``,
answered from Triton's ``tensorrt_llm`` model, streamed as server-sent events when asked.

Mapping (docs/serving-openai.md): ``max_tokens``/``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``,
``stop``, ``presence_penalty``, ``frequency_penalty`` become the model's ``sampling_param_*`` inputs; missing ones
take the checkpoint's ``generation_config.json`` (else OpenAI's defaults), and a missing token limit runs to the
context length. ``usage`` counts the model's own prompt and generated tokens (its ``num_input_tokens`` and
``num_output_tokens`` outputs). A client that goes away cancels its request on the server.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from builder.errors import ChatFormatError
from builder.model.chat_encoding import ChatEncoding, Reply
from builder.sampling_params import SamplingParams
from triton_repo.client import GenerateOptions
from triton_repo.openai_api.deployment import ServedModel
from triton_repo.openai_api.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    _Sampling,
    validation_error,
)
from triton_repo.openai_api.text_stream import ChatDeltas, TextDeltas
from triton_repo.openai_api.triton_backend import BackendError, TritonBackend, Update

FALLBACK_MAX_TOKENS = 16  # only where neither the request nor the checkpoint gives a limit (Triton's frontend's)


@dataclass
class Endpoint:
    served: ServedModel
    model_name: str
    created: int
    backend: TritonBackend | None = None  # made in the server's event loop (gRPC channels belong to one)

    def __post_init__(self) -> None:
        self.encoding: ChatEncoding = self.served.encoding()
        self.tokenizer = self.served.tokenizer()

    # -- requests ----------------------------------------------------------------------------------------------
    def options(self, req: _Sampling, prompt: str, limit: int | None, *, prompt_field: str) -> GenerateOptions:
        prompt_tokens = len(self.tokenizer.encode(prompt, add_special_tokens=False).ids)
        prompt_tokens += int(self.encoding.model_adds_bos)
        context = self.served.max_seq_len
        if context is not None and prompt_tokens >= context:
            raise APIError(f"This model's maximum context length is {context} tokens; the prompt has "
                           f"{prompt_tokens}", param=prompt_field, code="context_length_exceeded")
        if limit is None:
            limit = context - prompt_tokens if context is not None else FALLBACK_MAX_TOKENS
        elif context is not None and prompt_tokens + limit > context:
            raise APIError(f"This model's maximum context length is {context} tokens; {prompt_tokens} in the "
                           f"prompt plus {limit} to generate exceed it", param="max_tokens",
                           code="context_length_exceeded")
        d = self.served.defaults
        sampling = SamplingParams(
            max_tokens=limit, temperature=d["temperature"] if req.temperature is None else req.temperature,
            top_p=d["top_p"] if req.top_p is None else req.top_p,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            seed=req.seed, stop=tuple(req.stop or ()))
        return GenerateOptions(prompt=prompt, sampling=sampling, stream=bool(req.stream))

    # -- responses ---------------------------------------------------------------------------------------------
    def envelope(self, rid: str, kind: str, choices: list, usage: dict | None, *, with_usage: bool) -> dict:
        out = {"id": rid, "object": kind, "created": int(time.time()), "model": self.model_name,
               "system_fingerprint": None, "choices": choices}
        if with_usage:
            out["usage"] = usage
        return out


def usage(update: Update) -> dict[str, int]:
    return {"prompt_tokens": update.prompt_tokens, "completion_tokens": update.completion_tokens,
            "total_tokens": update.prompt_tokens + update.completion_tokens}


def finish_reason(model_reason: str, reply: Reply | None = None) -> str:
    if reply is not None and reply.tool_calls:
        return "tool_calls"
    return "length" if model_reason == "length" else "stop"


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def backend_error(err: BackendError) -> APIError:
    if not err.reachable:
        return APIError(str(err), status=503, code="triton_unavailable")
    return APIError(f"the model failed the request: {err}", status=500, code="model_error")


async def parse(request: Request, model: type[_Sampling], served_name: str) -> _Sampling:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object.")
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if req.model != served_name:
        raise APIError(f"The model '{req.model}' does not exist; this server serves '{served_name}'",
                       status=404, param="model", code="model_not_found")
    req.check_fields()
    return req


async def until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_to_end(request: Request, updates: AsyncIterator[Update]) -> Update | None:
    """The final update of a non-streamed request; None (and the request cancelled) when the client left."""

    async def last() -> Update:
        final = None
        async for final in updates:
            pass
        return final

    work = asyncio.ensure_future(last())
    gone = asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        return None
    return work.result()


def build_app(endpoint: Endpoint, *, lifespan=None) -> Starlette:
    ep = endpoint

    async def models(request: Request) -> Response:
        card = {"id": ep.model_name, "object": "model", "created": ep.created, "owned_by": "dsbuild"}
        wanted = request.path_params.get("model_id")
        if wanted is None:
            return JSONResponse({"object": "list", "data": [card]})
        if wanted != ep.model_name:
            return error_response(APIError(f"The model '{wanted}' does not exist", status=404, param="model",
                                           code="model_not_found"))
        return JSONResponse(card)

    async def health(request: Request) -> Response:
        ready = await ep.backend.ready()
        return JSONResponse({"triton_model_ready": ready}, status_code=200 if ready else 503)

    async def completions(request: Request) -> Response:
        req = await parse(request, CompletionRequest, ep.model_name)
        prompt = req.prompt_text()
        opts = ep.options(req, prompt, req.max_tokens, prompt_field="prompt")
        rid, echo = f"cmpl-{uuid.uuid4().hex}", prompt if req.echo else ""
        updates = ep.backend.generate(opts)
        if not req.stream:
            final = await run_to_end(request, updates)
            if final is None:
                return Response(status_code=499)
            choice = {"index": 0, "text": echo + final.text, "logprobs": None,
                      "finish_reason": finish_reason(final.finish_reason)}
            return JSONResponse(ep.envelope(rid, "text_completion", [choice], usage(final), with_usage=True))

        updates = await started(updates)
        deltas = TextDeltas(stop=opts.sampling.stop)

        def chunk(text: str, reason: str | None) -> str:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            return sse(ep.envelope(rid, "text_completion", [choice], None, with_usage=req.include_usage))

        async def events() -> AsyncIterator[str]:
            if echo:
                yield chunk(echo, None)
            async for update in updates:
                if not update.final:
                    text = deltas.update(update.text)
                    if text:
                        yield chunk(text, None)
                    continue
                yield chunk(deltas.finish(update.text), finish_reason(update.finish_reason))
                if req.include_usage:
                    yield sse(ep.envelope(rid, "text_completion", [], usage(update), with_usage=True))
        return stream(events())

    async def chat(request: Request) -> Response:
        req = await parse(request, ChatCompletionRequest, ep.model_name)
        messages = [m.as_encoding_input() for m in req.messages]
        tools = req.tool_list
        prompt = ep.encoding.render(messages, thinking=req.thinking, tools=tools)
        opts = ep.options(req, prompt, req.completion_limit, prompt_field="messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        updates = ep.backend.generate(opts)
        if not req.stream:
            final = await run_to_end(request, updates)
            if final is None:
                return Response(status_code=499)
            reply = ep.encoding.parse_reply(final.text, thinking=req.thinking, tools=bool(tools))
            message: dict[str, Any] = {"role": "assistant", "content": reply.content}
            if req.thinking:
                message["reasoning_content"] = reply.reasoning
            if reply.tool_calls:
                message["tool_calls"] = tool_calls(reply)
            choice = {"index": 0, "message": message, "logprobs": None,
                      "finish_reason": finish_reason(final.finish_reason, reply)}
            return JSONResponse(ep.envelope(rid, "chat.completion", [choice], usage(final), with_usage=True))

        updates = await started(updates)
        deltas = ChatDeltas(ep.encoding, thinking=req.thinking, tools=bool(tools), stop=opts.sampling.stop)

        def chunk(delta: dict[str, Any], reason: str | None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return sse(ep.envelope(rid, "chat.completion.chunk", [choice], None, with_usage=req.include_usage))

        def fields(d) -> dict[str, str]:
            out = {}
            if d.reasoning:
                out["reasoning_content"] = d.reasoning
            if d.content:
                out["content"] = d.content
            return out

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""}, None)
            async for update in updates:
                if not update.final:
                    d = fields(deltas.update(update.text))
                    if d:
                        yield chunk(d, None)
                    continue
                last, reply = deltas.finish(update.text)
                if fields(last):
                    yield chunk(fields(last), None)
                if reply.tool_calls:
                    calls = [{"index": i, **c} for i, c in enumerate(tool_calls(reply))]
                    yield chunk({"tool_calls": calls}, None)
                yield chunk({}, finish_reason(update.finish_reason, reply))
                if req.include_usage:
                    yield sse(ep.envelope(rid, "chat.completion.chunk", [], usage(update), with_usage=True))
        return stream(events())

    routes = [Route("/v1/models", models), Route("/v1/models/{model_id:path}", models),
              Route("/v1/completions", guarded(completions), methods=["POST"]),
              Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
              Route("/health", health)]
    return Starlette(routes=routes, lifespan=lifespan)


async def started(updates: AsyncIterator[Update]) -> AsyncIterator[Update]:
    """``updates`` with its first item already received, so that a request Triton refuses gets an HTTP error
    status instead of a stream that starts and then fails."""
    first = await updates.__anext__()

    async def chained() -> AsyncIterator[Update]:
        yield first
        async for update in updates:
            yield update
    return chained()


def tool_calls(reply: Reply) -> list[dict[str, Any]]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in reply.tool_calls]


def stream(events: AsyncIterator[str]) -> StreamingResponse:
    async def with_errors() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except BackendError as exc:  # the response has started: the error goes into the stream
            yield sse(backend_error(exc).body())
        yield "data: [DONE]\n\n"
    return StreamingResponse(with_errors(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def guarded(handler: Callable) -> Callable:
    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError as exc:
            return error_response(exc)
        except ChatFormatError as exc:
            return error_response(APIError(str(exc), param="messages"))
        except BackendError as exc:
            return error_response(backend_error(exc))
    return run

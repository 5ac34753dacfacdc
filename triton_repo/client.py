"""Clients for the ``tensorrt_llm`` model: gRPC (tritonclient, bidirectional stream: the model is decoupled, so
even a non-streaming request goes over the stream API) and HTTP (Triton's generate extension:
``POST /v2/models/<model>/generate`` and, for streaming, ``/generate_stream`` as server-sent events)."""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from builder.errors import ServeError, SpecError
from builder.sampling_params import SamplingParams
from triton_repo.interface import INPUTS, MODEL_NAME


@dataclass(frozen=True)
class GenerateOptions:
    """One request to the served model: the prompt, its sampling parameters, and whether to stream."""

    prompt: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False


@dataclass
class GenerateResult:
    text: str
    finish_reason: str
    responses: list[str] = field(default_factory=list)  # text_output of every response (cumulative when streaming)
    acceptance_rate: float = 0.0
    total_draft_tokens: int = 0
    total_accepted_draft_tokens: int = 0
    first_response_s: float = 0.0
    total_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Triton's default ports (tritonserver --http-port / --grpc-port).
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
SCHEMES = {"http": "http", "https": "http", "grpc": "grpc"}


@dataclass(frozen=True)
class Endpoint:
    """Where a Triton server listens and how to talk to it: ``protocol`` grpc or http, ``address`` HOST:PORT, and
    for http the URL scheme (http or https)."""

    protocol: str
    address: str
    scheme: str = "http"

    @property
    def http_base(self) -> str:
        return f"{self.scheme}://{self.address}"

    def __str__(self) -> str:
        return f"{self.scheme if self.protocol == 'http' else 'grpc'}://{self.address}"


def endpoint(url: str, protocol: str | None = None, *, default: str = "grpc") -> Endpoint:
    """Parse ``--url``: ``HOST:PORT`` (``protocol``, else ``default``) or a URL whose scheme says the protocol
    (``http://``, ``https://``, ``grpc://``); a scheme and a ``protocol`` that disagree are refused. A missing port
    is Triton's default for the protocol."""
    raw = url.strip()
    if "://" in raw:
        scheme, _, rest = raw.partition("://")
        scheme = scheme.lower()
        if scheme not in SCHEMES:
            raise SpecError(f"--url {url!r}: unknown scheme {scheme!r}; use http://, https://, grpc:// or HOST:PORT")
        if protocol is not None and protocol != SCHEMES[scheme]:
            raise SpecError(f"--url {url!r} is {SCHEMES[scheme]} but --protocol says {protocol}; drop one of them")
        protocol = SCHEMES[scheme]
    else:
        scheme, rest = "http", raw
        protocol = protocol or default
    host_port = rest.split("/", 1)[0]
    parsed = urllib.parse.urlsplit(f"//{host_port}")
    try:
        port = parsed.port
    except ValueError:
        raise SpecError(f"--url {url!r} has an invalid port") from None
    if not parsed.hostname:
        raise SpecError(f"--url {url!r} names no host; give HOST:PORT (e.g. 127.0.0.1:8001)")
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return Endpoint(protocol, f"{host}:{port or DEFAULT_PORTS[protocol]}", scheme if protocol == "http" else "http")


def speaks_http(address: str, *, timeout: float = 2.0) -> bool:
    """Whether ``address`` answers HTTP/1.1 at all (any status: Triton's HTTP port answers /v2/health/live)."""
    conn = http.client.HTTPConnection(address, timeout=timeout)
    try:
        conn.request("GET", "/v2/health/live")
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def speaks_grpc(address: str, *, timeout: float = 2.0) -> bool:
    """Whether ``address`` is a Triton gRPC endpoint (its ServerLive answers)."""
    import tritonclient.grpc as grpcclient

    try:
        with grpcclient.InferenceServerClient(url=address) as client:
            client.is_server_live(client_timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 - tritonclient raises its own types for every transport failure
        return False


def wrong_port_hint(ep: Endpoint) -> str:
    """After ``ep`` could not be reached: what the port speaks instead, if it is Triton's other protocol."""
    if ep.protocol == "grpc" and speaks_http(ep.address):
        return (f"; {ep.address} answers HTTP: this looks like Triton's HTTP port. Use the http protocol "
                f"(--protocol http or --url http://{ep.address}) or Triton's gRPC port "
                f"({DEFAULT_PORTS['grpc']} unless the server was started otherwise)")
    if ep.protocol == "http" and speaks_grpc(ep.address):
        return (f"; {ep.address} answers gRPC: this looks like Triton's gRPC port. Use the grpc protocol "
                f"(--protocol grpc or --url grpc://{ep.address}) or Triton's HTTP port "
                f"({DEFAULT_PORTS['http']} unless the server was started otherwise)")
    return ""


class _Unreachable(ServeError):
    """The endpoint did not answer in its protocol (connection refused or closed, not the model's refusal)."""


def request_fields(opts: GenerateOptions) -> dict[str, Any]:
    """The model's inputs for ``opts`` (names of TensorRT-LLM's llmapi model; the sampling ones from the record)."""
    return {"text_input": opts.prompt, "streaming": opts.stream, **opts.sampling.triton_inputs(),
            "return_finish_reason": True}


# Triton wire type and numpy dtype of each model input, from the one interface definition.
_WIRE = {"STRING": ("BYTES", "object_"), "BOOL": ("BOOL", "bool_"), "INT32": ("INT32", "int32"),
         "FP32": ("FP32", "float32"), "UINT64": ("UINT64", "uint64")}
INPUT_TYPES = {t.name: _WIRE[t.dtype] for t in INPUTS}


def _grpc_inputs(fields: dict[str, Any]):
    import numpy as np
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value in fields.items():
        dtype, np_name = INPUT_TYPES[name]
        np_dtype = getattr(np, np_name)
        values = value if isinstance(value, list) else [value]
        if dtype == "BYTES":
            values = [v.encode("utf-8") for v in values]
        arr = np.array(values, dtype=np_dtype)
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    return inputs


def _first(result, name: str, default: Any) -> Any:
    arr = result.as_numpy(name)
    if arr is None or arr.size == 0:
        return default
    v = arr.reshape(-1)[0]
    return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v.item()


def generate_grpc(url: str, opts: GenerateOptions, *, model: str = MODEL_NAME, timeout: float = 300,
                  on_text: Callable[[str], None] | None = None) -> GenerateResult:
    """One request over gRPC. ``on_text`` gets each response's (cumulative) text as it arrives."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url=url)
    t0 = time.perf_counter()
    out = GenerateResult(text="", finish_reason="")
    try:
        client.start_stream(callback=lambda result, error: events.put((result, error)))
        client.async_stream_infer(model, _grpc_inputs(request_fields(opts)), request_id=uuid.uuid4().hex,
                                  enable_empty_final_response=True)
        while True:
            try:
                result, error = events.get(timeout=max(0.1, timeout - (time.perf_counter() - t0)))
            except queue.Empty:
                raise ServeError(f"no response from {url} within {timeout:.0f} s") from None
            if error is not None:
                message = error.message() if hasattr(error, "message") else str(error)
                if "UNAVAILABLE" in str(getattr(error, "status", lambda: "")()):
                    raise _Unreachable(f"cannot reach Triton's gRPC endpoint at {url}: {message}")
                raise ServeError(f"the server refused the request: {message}")
            response = result.get_response()
            final = response.parameters.get("triton_final_response")
            is_final = bool(final.bool_param) if final is not None else True
            if response.outputs:
                text = _first(result, "text_output", "")
                out.responses.append(text)
                out.first_response_s = out.first_response_s or time.perf_counter() - t0
                out.text = text
                out.finish_reason = _first(result, "finish_reason", out.finish_reason)
                out.acceptance_rate = float(_first(result, "acceptance_rate", 0.0))
                out.total_draft_tokens = int(_first(result, "total_draft_tokens", 0))
                out.total_accepted_draft_tokens = int(_first(result, "total_accepted_draft_tokens", 0))
                if on_text:
                    on_text(text)
            if is_final:
                break
    except InferenceServerException as exc:
        # A broken stream raises here with its cause delivered to the callback: report the cause.
        cause = next((e for _, e in _drain(events) if e is not None), exc)
        if "UNAVAILABLE" in str(cause.status()):
            raise _Unreachable(f"cannot reach Triton's gRPC endpoint at {url}: {cause.message()}") from None
        raise ServeError(f"gRPC request to {url} failed: {cause.message()}") from None
    finally:
        try:
            client.stop_stream()
        finally:
            client.close()
    out.total_s = time.perf_counter() - t0
    return out


ANSWERED_STREAM_END_S = 10.0  # how long Triton may take to end a fully answered stream before it is cancelled


async def end_answered_stream(call) -> None:
    """After the final response of a tritonclient.grpc.aio ``stream_infer`` call whose request iterator has ended:
    wait for Triton to end the RPC, cancelling it only after ``ANSWERED_STREAM_END_S``. Cancelling (or dropping,
    which cancels) a stream Triton has answered in full but not yet ended left tritonserver 2.51's model referenced:
    it never unloaded, and a SIGTERM ended in "Exit timeout expired" with exit code 1."""
    async def rest() -> None:
        async for _ in call:  # nothing more is expected; the iteration ends when Triton ends the RPC
            pass

    try:
        await asyncio.wait_for(rest(), timeout=ANSWERED_STREAM_END_S)
    except asyncio.CancelledError:
        call.cancel()
        raise
    except Exception:  # noqa: BLE001 -- not ended in time, or broke after its answer: nothing is left to wait for
        call.cancel()


def _drain(events: queue.Queue) -> list:
    out = []
    while True:
        try:
            out.append(events.get_nowait())
        except queue.Empty:
            return out


def _http_post(base: str, path: str, body: dict[str, Any], timeout: float):
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except json.JSONDecodeError:
            pass
        raise ServeError(f"the server refused the request (HTTP {exc.code}): {detail}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        # A gRPC (HTTP/2) port answers HTTP/1.1 with bytes that are no status line (BadStatusLine).
        why = getattr(exc, "reason", None) or f"no HTTP/1.1 answer ({type(exc).__name__})"
        raise _Unreachable(f"cannot reach Triton's HTTP endpoint at {base}: {why}") from None


def _apply(out: GenerateResult, data: dict[str, Any], t0: float, on_text: Callable[[str], None] | None) -> None:
    if "error" in data:
        raise ServeError(f"the server refused the request: {data['error']}")
    text = data.get("text_output", "")
    text = text[0] if isinstance(text, list) else text
    out.responses.append(text)
    out.first_response_s = out.first_response_s or time.perf_counter() - t0
    out.text = text
    fr = data.get("finish_reason", out.finish_reason)
    out.finish_reason = fr[0] if isinstance(fr, list) else fr
    out.acceptance_rate = float(data.get("acceptance_rate", 0.0))
    out.total_draft_tokens = int(data.get("total_draft_tokens", 0))
    out.total_accepted_draft_tokens = int(data.get("total_accepted_draft_tokens", 0))
    if on_text:
        on_text(text)


def generate_http(url: str, opts: GenerateOptions, *, model: str = MODEL_NAME, timeout: float = 300,
                  on_text: Callable[[str], None] | None = None) -> GenerateResult:
    """One request over HTTP's generate extension (server-sent events when streaming). ``url``: HOST:PORT or a
    ``http(s)://`` base URL."""
    t0 = time.perf_counter()
    out = GenerateResult(text="", finish_reason="")
    path = f"/v2/models/{model}/generate_stream" if opts.stream else f"/v2/models/{model}/generate"
    base = endpoint(url, "http").http_base
    with _http_post(base, path, request_fields(opts), timeout) as resp:
        if not opts.stream:
            _apply(out, json.loads(resp.read()), t0, on_text)
        else:
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if line.startswith("data:"):
                    _apply(out, json.loads(line[5:].strip()), t0, on_text)
    out.total_s = time.perf_counter() - t0
    return out


def generate(url: str, opts: GenerateOptions, *, protocol: str | None = None, model: str = MODEL_NAME,
             timeout: float = 300, on_text: Callable[[str], None] | None = None) -> GenerateResult:
    """One request to the server at ``url`` (see :func:`endpoint`: a scheme says the protocol, else ``protocol``,
    else gRPC). When the port does not answer in that protocol but in Triton's other one, the error says so."""
    ep = endpoint(url, protocol)
    try:
        if ep.protocol == "grpc":
            return generate_grpc(ep.address, opts, model=model, timeout=timeout, on_text=on_text)
        return generate_http(ep.http_base, opts, model=model, timeout=timeout, on_text=on_text)
    except _Unreachable as exc:
        raise ServeError(f"{exc}{wrong_port_hint(ep)}") from None

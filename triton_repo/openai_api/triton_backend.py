"""One generation on the Triton server: the ``tensorrt_llm`` model over gRPC bidirectional streaming (tritonclient's
asyncio client; the model is decoupled, so even a non-streamed request goes over the stream API). Cancelling the
consumer before the final response cancels the gRPC call, which Triton passes on to the model as a cancelled request.
After the final response the call is half-closed and left for Triton to end (``triton_repo.client.end_answered_stream``:
cancelling an answered stream kept tritonserver 2.51 from unloading the model at shutdown)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import tritonclient.grpc.aio as grpcclient

from triton_repo.client import GenerateOptions, _first, _grpc_inputs, end_answered_stream, request_fields
from triton_repo.interface import MODEL_NAME


class BackendError(Exception):
    """Triton answered with an error, or could not be reached. ``reachable`` tells the two apart."""

    def __init__(self, message: str, *, reachable: bool):
        super().__init__(message)
        self.reachable = reachable


@dataclass(frozen=True)
class Update:
    text: str  # the whole generated text so far
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    final: bool


class TritonBackend:
    def __init__(self, url: str, *, model: str = MODEL_NAME):
        self.url = url
        self.model = model
        self.client = grpcclient.InferenceServerClient(url=url)
        self._ending: set[asyncio.Future] = set()  # answered streams waiting for Triton to end them

    async def ready(self) -> bool:
        try:
            return bool(await self.client.is_model_ready(self.model))
        except Exception:  # tritonclient raises its own types for every transport failure
            return False

    async def close(self) -> None:
        await self.client.close()

    async def generate(self, opts: GenerateOptions) -> AsyncIterator[Update]:
        """The model's responses for ``opts``: one per streamed token, or one final one."""
        finished = asyncio.Event()
        request = {"model_name": self.model, "inputs": _grpc_inputs(request_fields(opts)),
                   "request_id": uuid.uuid4().hex, "enable_empty_final_response": True}

        async def requests():
            yield request
            await finished.wait()  # the stream stays open until the final response

        call = self.client.stream_infer(requests())
        text, reason, prompt_tokens, completion_tokens = "", "", 0, 0
        seen_final = False
        try:
            async for result, error in call:
                if error is not None:
                    raise BackendError(error.message() if hasattr(error, "message") else str(error), reachable=True)
                response = result.get_response()
                flag = response.parameters.get("triton_final_response")
                final = flag is None or flag.bool_param
                if response.outputs:
                    text = str(_first(result, "text_output", ""))
                    reason = str(_first(result, "finish_reason", reason))
                    prompt_tokens = int(_first(result, "num_input_tokens", prompt_tokens))
                    completion_tokens = int(_first(result, "num_output_tokens", completion_tokens))
                seen_final = final
                if response.outputs or final:
                    yield Update(text, reason, prompt_tokens, completion_tokens, final)
                if final:
                    return
        except BackendError:
            raise
        except Exception as exc:  # grpc.aio errors: the server went away or never was there
            message = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
            raise BackendError(f"Triton at {self.url} is not answering: {message}", reachable=False) from None
        finally:
            finished.set()  # the request iterator ends: the client half-closes the stream
            if seen_final:
                ending = asyncio.ensure_future(end_answered_stream(call))
                self._ending.add(ending)
                ending.add_done_callback(self._ending.discard)
            else:
                call.cancel()  # the consumer left early: Triton cancels the request
        raise BackendError("the stream ended without a final response", reachable=True)

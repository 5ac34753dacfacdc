"""CPU flavour of the ``tensorrt_llm`` Triton model: dsbuild's reference engine behind TensorRT-LLM's llmapi tensor
interface, for hosts without a GPU (and for dsbuild's own end-to-end tests).

The model is decoupled: ``execute`` validates each request, answers bad ones at once with an error, and submits the
rest to the engine's scheduler (``builder.engine.service.Scheduler``): continuous batching, as TensorRT-LLM's
in-flight batching does -- a request joins the running batch (rank 0 here, the other TP x PP ranks as worker
processes) at the next token boundary and leaves it when it ends. The scheduler hands each chosen token to this
model's response thread, which turns tokens into text incrementally, matches stop strings and sends the responses,
so the engine never waits for a response to be built. As in TensorRT-LLM 1.2.x, every streamed response carries the
cumulative text, and the last one is flagged final and carries the whole text and the finish reason;
``stream_interval`` (an LLM-API option of TensorRT-LLM, default 1) sends a streamed response every N tokens.

One request's failure (its sampling) answers that request with an error and nothing else. If the engine's ranks
themselves can no longer work together, every request gets that error, ``is_ready`` answers False (Triton from
release 26.04 asks it on ``/v2/health/ready``) and the model logs ``ENGINE_BROKEN`` once: the tritonserver 2.51 of CPU
hosts never asks ``is_ready``, so ``dsbuild serve`` watches the log for that line
(``triton_repo.server.UNHEALTHY_MARKERS``) and restarts tritonserver (docs/tensorrt-llm-contract.md#C-TRITON-8).
"""

import json
import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import triton_python_backend_utils as pb_utils

ENGINE_BROKEN = "dsbuild cpu model: the engine cannot continue"  # a key of triton_repo.server.UNHEALTHY_MARKERS


class BadRequest(Exception):
    """A request the model refuses; the message goes back to the client."""


@dataclass(eq=False)
class Job:
    sender: object
    request_id: str
    prompt_ids: list
    sampling: object  # builder.sampling_params.SamplingParams
    streaming: bool
    exclude_input: bool
    prompt_text: str
    decoder: object = None  # tokenizers' DecodeStream: the text grows by each token's new characters
    ticket: object = None  # the scheduler's handle (cancellation)
    tokens: list = field(default_factory=list)
    text: str = ""
    pending: object = None  # the latest streamed response, held back so that the last one can carry FINAL
    done: bool = False  # a stop string matched or the client cancelled: further tokens are dropped
    final_sent: bool = False  # the FINAL response went out (a `stop` request answers at once, mid-batch)
    finish_reason: str = ""
    stop_reason: str = ""
    arrival_ns: int = 0
    first_token_ns: int = 0
    last_token_ns: int = 0


def _scalar(request, name, default, fields=None):
    """One input's value: its tensor, else the request field standing for it (``fields``: input name -> value
    from the request's parameters, see ``_fields``), else ``default``."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return (fields or {}).get(name, default)
    if name in (fields or {}):
        raise BadRequest(f"{name} is given twice: as an input and as a request field")
    arr = tensor.as_numpy()
    if arr.size != 1:
        raise BadRequest(f"{name} must hold exactly one value, got shape {list(arr.shape)}")
    return arr.reshape(-1)[0].item()


def _strings(request, name, fields=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        value = (fields or {}).get(name, [])
        return [value] if isinstance(value, str) else [str(v) for v in value]
    if name in (fields or {}):
        raise BadRequest(f"{name} is given twice: as an input and as a request field")
    out = []
    for v in tensor.as_numpy().reshape(-1):
        out.append(v.decode("utf-8") if isinstance(v, bytes) else str(v))
    return out


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in self.model_config.get("parameters", {}).items()}
        model_dir = args["model_repository"]
        src = params.get("dsbuild_src", "")
        if src:
            src = os.path.normpath(os.path.join(model_dir, src))
            # The stub runs Python isolated (PYTHONPATH ignored); engine workers are ordinary processes and read it.
            sys.path.insert(0, src)
            os.environ["PYTHONPATH"] = os.pathsep.join([src] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        engine_dir = os.path.normpath(os.path.join(model_dir, params["engine_dir"]))
        max_batch = max(1, int(params.get("engine_max_batch_size") or 8))
        window_s = max(0.0, float(params.get("batch_window_ms") or 0)) / 1000.0
        self.stream_interval = max(1, int(params.get("stream_interval") or 1))
        self.max_seq_len = int(params.get("max_seq_len") or 0)
        threads = int(params.get("threads_per_rank") or 0) or None
        # dsbuild is importable only now (dsbuild_src above): its modules are bound here, not at module level.
        from tokenizers.decoders import DecodeStream

        from builder.engine.service import EngineService, GenerationRequest, SpeculativeOptions
        from builder.engine.text import encode_prompt
        from builder.errors import RequestError
        from builder.sampling_params import SamplingParams, inputs_from_parameters

        self.GenerationRequest, self.SamplingParams, self.RequestError = GenerationRequest, SamplingParams, RequestError
        self.DecodeStream = DecodeStream
        self.inputs_from_parameters = inputs_from_parameters
        self.input_names = tuple(i["name"] for i in self.model_config.get("input", []))
        self.encode_prompt = encode_prompt
        mode = params.get("speculative_mode") or "none"
        speculative = None
        if mode != "none":
            draft = os.path.join(model_dir, params.get("draft_engine_dir", "")) if mode == "draft" else None
            speculative = SpeculativeOptions(mode=mode, draft_len=int(params.get("draft_len") or 1), draft_engine=draft)
        # The stub's sys.executable is the python3 found on PATH; engine workers must use the same interpreter.
        python = sys.executable or shutil.which("python3")
        self.engine = EngineService(engine_dir, device="cpu", threads_per_rank=threads, python_executable=python)
        self.tokenizer = self.engine.tokenizer()
        # As TensorRT-LLM does by default (and `dsbuild generate --engine`): stop at the model's end-of-sentence.
        eos = self.engine.bundle.cfg.raw.get("eos_token_id")
        self.stop_token_ids = [int(t) for t in (eos if isinstance(eos, list) else [eos]) if t is not None]
        self.by_request_id = {}
        self.lock = threading.RLock()  # guards sends and the FINAL flag of every job
        self.forget_lock = threading.Lock()
        self.stopping = threading.Event()
        self.broken_logged = False
        self.outbox = queue.SimpleQueue()  # (job, token) and (job, result) from the scheduler, in order
        self.responder = threading.Thread(target=self._respond_loop, name="dsbuild-responses", daemon=True)
        self.responder.start()
        self.scheduler = self.engine.scheduler(max_batch=max_batch, window_s=window_s, speculative=speculative)
        pb_utils.Logger.log_info(f"dsbuild cpu model: engine {engine_dir}, batch {max_batch}, "
                                 f"{'continuous' if self.scheduler.continuous else 'whole-batch'} batching")

    def is_ready(self):
        """Ready while the engine's ranks can still work together (one request's failure does not count)."""
        return not self.engine.broken

    # -- requests ----------------------------------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                fields = self._fields(request)
                if _scalar(request, "stop", False, fields):
                    self._cancel(request.request_id(), sender)
                    continue
                job = self._parse(request, sender, fields)
            except BadRequest as exc:
                self._send_error(sender, str(exc))
                continue
            except Exception as exc:  # a bug must still answer the client, or its stream hangs
                self._send_error(sender, f"{type(exc).__name__}: {exc}")
                continue
            if self.stopping.is_set():
                self._send_error(sender, "the model is shutting down")
                continue
            if job.request_id:
                with self.forget_lock:
                    self.by_request_id.setdefault(job.request_id, []).append(job)
            req = self.GenerationRequest(prompt_ids=job.prompt_ids, sampling=job.sampling,
                                         stop_token_ids=list(self.stop_token_ids))
            job.ticket = self.scheduler.submit(req, on_token=lambda tok, job=job: self.outbox.put((job, tok)),
                                               on_done=lambda res, job=job: self.outbox.put((job, res)),
                                               on_start=self._log_batch)
        return None

    def _fields(self, request):
        """Request fields that are not inputs (Triton's generate endpoint turns every unknown JSON key into a
        request parameter): TensorRT-LLM's ensemble names of our inputs become those inputs, anything else is
        refused, so no field is dropped silently (builder.sampling_params.inputs_from_parameters)."""
        try:
            parameters = json.loads(request.parameters() or "{}")
        except ValueError:
            raise BadRequest("the request's parameters are not valid JSON") from None
        try:
            return self.inputs_from_parameters(parameters, inputs=self.input_names)
        except self.RequestError as exc:
            raise BadRequest(str(exc)) from None

    def _parse(self, request, sender, fields):
        arrival = time.time_ns()
        texts = _strings(request, "text_input", fields)
        if not texts:
            raise BadRequest("text_input is missing from the request")
        if len(texts) != 1:
            raise BadRequest(f"text_input must hold one prompt, got {len(texts)}")
        prompt = texts[0]
        if not prompt:
            raise BadRequest("text_input is empty")
        try:  # the bundle's tokenizer settings decide BOS, exactly as for `dsbuild generate --engine`
            prompt_ids = self.encode_prompt(self.engine.bundle, self.tokenizer, prompt)
        except Exception as exc:
            raise BadRequest(str(exc)) from None
        try:  # the one validation of sampling parameters (builder.sampling_params)
            sampling = self.SamplingParams.from_triton(lambda name, default: _scalar(request, name, default, fields),
                                                       lambda name: _strings(request, name, fields))
        except self.RequestError as exc:
            raise BadRequest(str(exc)) from None
        if self.max_seq_len and len(prompt_ids) + sampling.max_tokens > self.max_seq_len:
            raise BadRequest(f"prompt ({len(prompt_ids)} tokens) plus sampling_param_max_tokens "
                             f"({sampling.max_tokens}) exceeds the model's max_seq_len {self.max_seq_len}")
        if int(_scalar(request, "sampling_param_best_of", 1, fields)) != 1:
            raise BadRequest("sampling_param_best_of other than 1 is not supported by the CPU flavour")
        return Job(sender=sender, request_id=request.request_id() or "", prompt_ids=prompt_ids, sampling=sampling,
                   streaming=bool(_scalar(request, "streaming", False, fields)),
                   exclude_input=bool(_scalar(request, "sampling_param_exclude_input_from_output", True, fields)),
                   prompt_text=prompt, arrival_ns=arrival, decoder=self.DecodeStream(skip_special_tokens=True))

    def _cancel(self, request_id, sender):
        if not request_id:
            self._send_error(sender, "a request id must be provided to stop a request")
            return
        with self.forget_lock:
            jobs = list(self.by_request_id.pop(request_id, []))
        for job in jobs:
            self._stop_job(job, "cancelled")
            self._send_final(job, None)  # the request leaves the batch at the next token; the client need not wait
        self._send_error(sender, "Request cancelled by client", pb_utils.TritonError.CANCELLED)

    def _stop_job(self, job, reason, stop_reason=""):
        """The job wants no more tokens: record why and take it out of the running batch."""
        if not job.done:
            job.done, job.finish_reason, job.stop_reason = True, reason, stop_reason
        if job.ticket is not None:
            self.scheduler.cancel(job.ticket)

    def _log_batch(self, size):
        pb_utils.Logger.log_info(f"dsbuild cpu model: batch of {size} request(s)")

    # -- the response thread -----------------------------------------------------------------------------------
    def _respond_loop(self):
        while True:
            item = self.outbox.get()
            if item is None:
                return
            job, what = item
            try:
                if isinstance(what, int):
                    self._on_token(job, what)
                else:
                    self._finish(job, what)
            except Exception as exc:  # answer this request, keep serving the others
                self._stop_job(job, "error")
                self._send_error(job.sender, f"generation failed: {type(exc).__name__}: {exc}", final_for=job)

    def _on_token(self, job, token):
        if job.done:
            return
        now = time.time_ns()
        job.first_token_ns = job.first_token_ns or now
        job.last_token_ns = now
        job.tokens.append(token)
        piece = job.decoder.step(self.tokenizer, token)  # None until the token completes a character
        if piece:
            before = len(job.text)
            job.text += piece
            for s in job.sampling.stop:  # only where a match could newly have appeared
                at = job.text.find(s, max(0, before - len(s) + 1))
                if at >= 0:
                    job.text = job.text[:at]
                    self._stop_job(job, "stop", s)
                    break
        if job.sender.is_cancelled():
            self._stop_job(job, "cancelled")
            return
        if job.streaming and len(job.tokens) % self.stream_interval == 0:
            with self.lock:
                if job.pending is not None and not job.final_sent:
                    self._send(job.sender, job.pending, 0)
                job.pending = self._response(job, None)

    def _finish(self, job, result):
        if result.finish_reason == "error":
            self._forget(job)
            if self.engine.broken and not self.broken_logged:
                self.broken_logged = True
                pb_utils.Logger.log_error(f"{ENGINE_BROKEN}: {self.engine.broken}")
            self._send_error(job.sender, f"generation failed: {result.error}", final_for=job)
            return
        if not job.done:
            job.finish_reason = result.finish_reason
        # The engine's final token list is authoritative (the streamed ids are the same tokens).
        if job.finish_reason not in ("stop", "cancelled"):
            job.tokens = list(result.token_ids)
            job.text = self.tokenizer.decode(job.tokens)
        self._send_final(job, result)

    def _send_final(self, job, result):
        self._forget(job)
        with self.lock:
            if job.final_sent:
                return
            job.final_sent = True
            # A cancelled request still needs the FINAL flag (python_backend README, "Request Cancellation
            # Handling"), or Triton keeps it -- and the model -- alive until its shutdown times out.
            response = None if job.sender.is_cancelled() else self._response(job, result)
            self._send(job.sender, response, pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _forget(self, job):
        if job.request_id:
            with self.forget_lock:
                jobs = self.by_request_id.get(job.request_id, [])
                if job in jobs:
                    jobs.remove(job)
                if not jobs:
                    self.by_request_id.pop(job.request_id, None)

    # -- responses ---------------------------------------------------------------------------------------------
    def _response(self, job, result):
        drafted = int(getattr(result, "total_draft_tokens", 0) or 0) if result is not None else 0
        accepted = int(getattr(result, "total_accepted_draft_tokens", 0) or 0) if result is not None else 0
        text = job.text if job.exclude_input else job.prompt_text + job.text
        started = job.ticket.started_ns if job.ticket is not None else 0
        tensors = [
            pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("finish_reason", np.array([job.finish_reason.encode()], dtype=np.object_)),
            pb_utils.Tensor("stop_reason", np.array([job.stop_reason.encode()], dtype=np.object_)),
            pb_utils.Tensor("acceptance_rate", np.array([accepted / drafted if drafted else 0.0], dtype=np.float32)),
            pb_utils.Tensor("total_accepted_draft_tokens", np.array([accepted], dtype=np.int32)),
            pb_utils.Tensor("total_draft_tokens", np.array([drafted], dtype=np.int32)),
            pb_utils.Tensor("arrival_time_ns", np.array([job.arrival_ns], dtype=np.int64)),
            pb_utils.Tensor("first_scheduled_time_ns", np.array([started], dtype=np.int64)),
            pb_utils.Tensor("first_token_time_ns", np.array([job.first_token_ns], dtype=np.int64)),
            pb_utils.Tensor("last_token_time_ns", np.array([job.last_token_ns], dtype=np.int64)),
            pb_utils.Tensor("num_input_tokens", np.array([len(job.prompt_ids)], dtype=np.int32)),
            pb_utils.Tensor("num_output_tokens", np.array([len(job.tokens)], dtype=np.int32)),
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _send(self, sender, response, flags):
        try:
            sender.send(response, flags=flags)
        except Exception as exc:  # the client went away; nothing else to do for it
            pb_utils.Logger.log_warn(f"dsbuild cpu model: could not send a response: {exc}")

    def _send_error(self, sender, message, code=None, *, final_for=None):
        if final_for is not None:
            with self.lock:
                if final_for.final_sent:
                    return
                final_for.final_sent = True
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        self._send(sender, pb_utils.InferenceResponse(error=error), pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        self.stopping.set()
        self.engine.close(timeout=10.0)  # the scheduler answers whatever it still holds
        self.outbox.put(None)
        self.responder.join(timeout=30)

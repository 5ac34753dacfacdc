"""dsbuild's ``tensorrt_llm`` Triton model for TensorRT-LLM 1.2.x (python backend, NVIDIA's
``tritonserver:*-trtllm-python-py3`` container), written against TensorRT-LLM's public LLM API.

It replaces the release's ``llmapi`` model.py, which passes ``streaming`` positionally into ``generate_async``'s
``lora_request`` slot (so streaming requests do not stream); here every argument is passed by keyword. The tensor
interface is the release's: ``text_input`` and ``sampling_param_*`` in; ``text_output`` (cumulative text in every
streamed response, the final one flagged and carrying the whole text), ``finish_reason``, ``stop_reason``, timing and
speculative-decoding counters out, and dsbuild's ``num_input_tokens``/``num_output_tokens`` (prompt and generated
token counts, for the OpenAI endpoint's ``usage``). ``model.yaml`` holds the LLM() arguments and ``triton_config``.

Cancellation as in the release's model (docs/tensorrt-llm-contract.md#C-TRITON-4): every request, streaming or not,
is tracked from the moment ``generate_async`` returns; a poller checks ``is_cancelled()`` every
``triton_config.cancellation_check_period_ms`` (default 100) and calls ``abort()`` on the LLM request, answering
with a CANCELLED error; the ``stop`` input aborts every request registered under the same request id.

Paths: ``model.yaml`` names its files (``model``, ``speculative_config.speculative_model``, ...; the list is
``triton_config.deploy_relative_paths``) relative to the deploy directory, because TensorRT-LLM reads a relative
path against its working directory and else as a Hugging Face Hub id (C-LLMARGS-11, C-TRITON-2). The deploy
directory is ``$DSBUILD_DEPLOY_DIR``, else the directory four levels above this model's version directory
(``<deploy>/package/triton_repo/tensorrt_llm/1``); every such path is made absolute there, and must exist.

TensorRT-LLM is imported in ``initialize`` (not at import time) so that ``auto_complete_config`` works everywhere
and a host without TensorRT-LLM reports exactly that as the reason the model did not load.
"""

import asyncio
import json
import os
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils
import yaml

CONFIG_FILE = os.environ.get("LLM_CONFIG_PATH", "model.yaml")
DEPLOY_DIR_ENV = "DSBUILD_DEPLOY_DIR"
DEFAULT_CANCELLATION_CHECK_MS = 100
# Optional scalar inputs -> SamplingParams keyword (TensorRT-LLM 1.2 tensorrt_llm/sampling_params.py).
SAMPLING_INPUTS = {
    "sampling_param_best_of": "best_of",
    "sampling_param_temperature": "temperature",
    "sampling_param_top_k": "top_k",
    "sampling_param_top_p": "top_p",
    "sampling_param_frequency_penalty": "frequency_penalty",
    "sampling_param_presence_penalty": "presence_penalty",
    "sampling_param_max_tokens": "max_tokens",
    "sampling_param_seed": "seed",
    "sampling_param_exclude_input_from_output": "exclude_input_from_output",
    "sampling_param_return_perf_metrics": "return_perf_metrics",
}


def load_model_yaml():
    path = os.path.join(pb_utils.get_model_dir(), CONFIG_FILE)
    with open(path) as fh:
        config = yaml.safe_load(fh)
    if not isinstance(config, dict) or "triton_config" not in config:
        raise pb_utils.TritonModelException(f"{path} must be a mapping with a triton_config section")
    return config


def deploy_dir():
    """``$DSBUILD_DEPLOY_DIR``, else ``<deploy>`` of ``<deploy>/package/triton_repo/tensorrt_llm/1``."""
    given = os.environ.get(DEPLOY_DIR_ENV)
    if given:
        return os.path.abspath(given)
    return os.path.abspath(os.path.join(pb_utils.get_model_dir(), os.pardir, os.pardir, os.pardir, os.pardir))


def resolve_paths(config, keys, root):
    """Make every dotted key of ``keys`` in ``config`` (when present and relative) absolute under ``root``."""
    for key in keys:
        *parents, leaf = key.split(".")
        block = config
        for part in parents:
            block = block.get(part) if isinstance(block, dict) else None
        if not isinstance(block, dict) or not isinstance(block.get(leaf), str):
            continue
        value = block[leaf]
        path = value if os.path.isabs(value) else os.path.join(root, value)
        if not os.path.isdir(path):
            raise pb_utils.TritonModelException(
                f"model.yaml {key}: {path} is not a directory (paths are relative to the deploy directory {root}; "
                f"set {DEPLOY_DIR_ENV} if the deployment lives elsewhere)")
        block[leaf] = path
    return config


class Tracked:
    """One in-flight request: what is needed to abort it and to answer it exactly once."""

    def __init__(self, request, sender):
        self.request = request
        self.sender = sender
        self.output = None  # the LLM API's result, once generate_async returned
        self.lock = threading.Lock()
        self.done = False

    def send(self, response, final):
        with self.lock:
            if self.done:
                return False
            self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)
            self.done = final
            return True

    def cancel(self):
        """Abort the LLM request and answer CANCELLED (once)."""
        with self.lock:
            if self.done:
                return
            self.done = True
            if self.output is not None:
                self.output.abort()
            error = pb_utils.TritonError("Request cancelled by client", pb_utils.TritonError.CANCELLED)
            self.sender.send(pb_utils.InferenceResponse(error=error),
                             flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def scalar(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    arr = tensor.as_numpy()
    if arr.size != 1:
        raise ValueError(f"{name} must hold exactly one value, got shape {list(arr.shape)}")
    return arr.reshape(-1)[0].item()


def strings(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return []
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in tensor.as_numpy().reshape(-1)]


class TritonPythonModel:
    @classmethod
    def auto_complete_config(cls, config):
        triton = load_model_yaml()["triton_config"]
        config.set_model_transaction_policy(dict(decoupled=bool(triton["decoupled"])))
        config.set_max_batch_size(int(triton["max_batch_size"]))
        return config

    def initialize(self, args):
        config = load_model_yaml()
        triton = config.pop("triton_config")
        self.decoupled = bool(triton["decoupled"])
        self.check_period = float(triton.get("cancellation_check_period_ms", DEFAULT_CANCELLATION_CHECK_MS)) / 1000
        config = resolve_paths(config, triton.get("deploy_relative_paths", []), deploy_dir())
        try:
            from tensorrt_llm import LLM, SamplingParams
        except ImportError as exc:
            raise pb_utils.TritonModelException(
                f"TensorRT-LLM is not importable ({exc}); serve this repository from "
                "NVIDIA's tritonserver:*-trtllm-python-py3 container") from exc
        self.SamplingParams = SamplingParams
        # model.yaml is an extra-LLM-API-options file: convert its nested blocks the way trtllm-serve does.
        try:
            from tensorrt_llm.llmapi.llm_utils import update_llm_args_with_extra_dict

            kwargs = update_llm_args_with_extra_dict({}, config)
        except ImportError:
            kwargs = dict(config)
        # Several MPI ranks (srun/mpirun, trtllm-llmapi-launch): rank 0 leads through an MPI session over the
        # world; any other rank that runs this model only serves the leader and never takes requests.
        from tensorrt_llm._utils import global_mpi_rank, global_mpi_size

        if global_mpi_size() > 1:
            from mpi4py.MPI import COMM_WORLD

            if global_mpi_rank() != 0:
                from mpi4py.futures import MPICommExecutor

                with MPICommExecutor(COMM_WORLD):
                    pass
                self.llm = None
                return
            from tensorrt_llm.llmapi import MpiCommSession

            kwargs["_mpi_session"] = MpiCommSession(comm=COMM_WORLD, n_workers=COMM_WORLD.Get_size())
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(target=self.loop.run_forever, name="trtllm-events", daemon=True)
        self.loop_thread.start()
        self.llm = LLM(**kwargs)
        self.tracked = set()  # every in-flight request, streaming or not
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.poller = threading.Thread(target=self._cancellation_loop, name="trtllm-cancel", daemon=True)
        self.poller.start()
        pb_utils.Logger.log_info(f"dsbuild trtllm model ready: {json.dumps(config, default=str)}")

    def is_ready(self):
        """Asked on every readiness check by Triton 26.04 and later (docs/tensorrt-llm-contract.md#C-TRITON-8): a
        leader whose request loop or cancellation poller has died can never answer again. Non-leader MPI ranks
        serve only the leader and take no requests."""
        if self.llm is None:
            return True
        return self.loop_thread.is_alive() and self.loop.is_running() and self.poller.is_alive()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                if scalar(request, "stop"):
                    self._stop(request.request_id(), sender)
                    continue
                job = self._convert(request)
            except Exception as exc:
                self._error(sender, str(exc))
                continue
            tracked = Tracked(request, sender)
            with self.lock:
                self.tracked.add(tracked)
            asyncio.run_coroutine_threadsafe(self._generate(tracked, *job), self.loop)
        return None

    def _cancellation_loop(self):
        """Abort what Triton marks cancelled, in both modes (the release's model does the same)."""
        while not self.stopping.wait(self.check_period):
            with self.lock:
                cancelled = [t for t in self.tracked if t.request.is_cancelled()]
                self.tracked.difference_update(cancelled)
            for t in cancelled:
                t.cancel()

    def _convert(self, request):
        prompts = strings(request, "text_input")
        if len(prompts) != 1 or not prompts[0]:
            raise ValueError("text_input must hold exactly one non-empty prompt")
        kwargs = {}
        for name, key in SAMPLING_INPUTS.items():
            value = scalar(request, name)
            if value is not None:
                kwargs[key] = value
        if "max_tokens" in kwargs and kwargs["max_tokens"] < 1:
            raise ValueError(f"sampling_param_max_tokens must be at least 1, got {kwargs['max_tokens']}")
        stop = [s for s in strings(request, "sampling_param_stop") if s]
        if stop:
            kwargs["stop"] = stop
        streaming = bool(scalar(request, "streaming") or False)
        if streaming and not self.decoupled:
            raise ValueError("streaming needs triton_config.decoupled: true in model.yaml")
        return prompts[0], self.SamplingParams(**kwargs), streaming

    async def _generate(self, tracked, prompt, sampling, streaming):
        arrival = time.time_ns()
        try:
            # Keywords only: 1.2.x's own model.py passed `streaming` positionally into `lora_request`.
            output = self.llm.generate_async(prompt, sampling_params=sampling, streaming=streaming)
            with tracked.lock:
                tracked.output = output
                cancelled = tracked.done
            if cancelled:  # cancelled before the LLM request existed: abort it now
                output.abort()
                return
            last = None
            async for last in output:
                if streaming and not last.finished and not tracked.send(self._response(last, arrival), final=False):
                    return  # cancelled meanwhile: the poller aborted it and answered
            if last is not None:
                tracked.send(self._response(last, arrival), final=True)
        except Exception as exc:
            if not tracked.done:
                tracked.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generation failed: {exc}")),
                             final=True)
        finally:
            with self.lock:
                self.tracked.discard(tracked)

    def _stop(self, rid, sender):
        """The ``stop`` input: abort every request registered under ``rid``."""
        if not rid:
            self._error(sender, "a request id must be provided to stop a request")
            return
        with self.lock:
            matching = [t for t in self.tracked if t.request.request_id() == rid]
            self.tracked.difference_update(matching)
        for t in matching:
            t.cancel()
        self._error(sender, "Request cancelled by client", pb_utils.TritonError.CANCELLED)

    @staticmethod
    def _response(out, arrival_ns):
        seq = out.outputs[0]
        drafted = accepted = 0
        metrics = getattr(seq, "request_perf_metrics", None)
        spec = getattr(metrics, "speculative_decoding", None) if metrics else None
        if spec is not None:
            drafted = int(getattr(spec, "total_draft_tokens", 0) or 0)
            accepted = int(getattr(spec, "total_accepted_draft_tokens", 0) or 0)
        tensors = [
            pb_utils.Tensor("text_output", np.array([seq.text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("finish_reason", np.array([str(seq.finish_reason or "").encode()], dtype=np.object_)),
            pb_utils.Tensor("stop_reason", np.array([str(seq.stop_reason or "").encode()], dtype=np.object_)),
            pb_utils.Tensor("cumulative_logprob",
                            np.array([seq.cumulative_logprob or 0.0], dtype=np.float32)),
            pb_utils.Tensor("acceptance_rate", np.array([accepted / drafted if drafted else 0.0], dtype=np.float32)),
            pb_utils.Tensor("total_accepted_draft_tokens", np.array([accepted], dtype=np.int32)),
            pb_utils.Tensor("total_draft_tokens", np.array([drafted], dtype=np.int32)),
            pb_utils.Tensor("arrival_time_ns", np.array([arrival_ns], dtype=np.int64)),
            pb_utils.Tensor("num_input_tokens",
                            np.array([len(getattr(out, "prompt_token_ids", None) or [])], dtype=np.int32)),
            pb_utils.Tensor("num_output_tokens", np.array([len(seq.token_ids)], dtype=np.int32)),
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    @staticmethod
    def _error(sender, message, code=None):
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        sender.send(pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        stopping = getattr(self, "stopping", None)
        if stopping is not None:
            stopping.set()
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)

"""dsbuild's ``tensorrt_llm`` Triton model for TensorRT-LLM 1.2.x (python backend, NVIDIA's
``tritonserver:*-trtllm-python-py3`` container), written against TensorRT-LLM's public LLM API.

It replaces the release's ``llmapi`` model.py, which passes ``streaming`` positionally into ``generate_async``'s
``lora_request`` slot (so streaming requests do not stream); here every argument is passed by keyword. The tensor
interface is the release's: ``text_input`` and ``sampling_param_*`` in; ``text_output`` (cumulative text in every
streamed response, the final one flagged and carrying the whole text), ``finish_reason``, ``stop_reason``, timing and
speculative-decoding counters out, and dsbuild's ``num_input_tokens``/``num_output_tokens`` (prompt and generated
token counts, for the OpenAI endpoint's ``usage``). ``model.yaml`` holds the LLM() arguments and ``triton_config``.

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
        self.inflight = {}  # Triton request id -> set of asyncio tasks (for the `stop` input)
        self.lock = threading.Lock()
        pb_utils.Logger.log_info(f"dsbuild trtllm model ready: {json.dumps(config, default=str)}")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                if scalar(request, "stop"):
                    self._cancel(request.request_id(), sender)
                    continue
                job = self._convert(request)
            except Exception as exc:
                self._error(sender, str(exc))
                continue
            future = asyncio.run_coroutine_threadsafe(self._generate(request, sender, *job), self.loop)
            rid = request.request_id()
            if rid:
                with self.lock:
                    self.inflight.setdefault(rid, set()).add(future)
        return None

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

    async def _generate(self, request, sender, prompt, sampling, streaming):
        arrival = time.time_ns()
        try:
            # Keywords only: 1.2.x's own model.py passed `streaming` positionally into `lora_request`.
            output = self.llm.generate_async(prompt, sampling_params=sampling, streaming=streaming)
            last = None
            async for last in output:
                if streaming and not last.finished:
                    if sender.is_cancelled():
                        output.abort()
                        return
                    sender.send(self._response(last, arrival), flags=0)
            if last is not None and not sender.is_cancelled():
                sender.send(self._response(last, arrival), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except asyncio.CancelledError:
            self._error(sender, "Request cancelled by client", pb_utils.TritonError.CANCELLED)
        except Exception as exc:
            self._error(sender, f"generation failed: {exc}")
        finally:
            rid = request.request_id()
            if rid:
                with self.lock:
                    self.inflight.pop(rid, None)

    def _cancel(self, rid, sender):
        if not rid:
            self._error(sender, "a request id must be provided to stop a request")
            return
        with self.lock:
            futures = self.inflight.pop(rid, set())
        for f in futures:
            f.cancel()
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
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)

"""dsbuild's GPU ``model.py`` (the TensorRT-LLM llmapi flavour) run in-process against stand-ins for Triton's
``triton_python_backend_utils`` and for ``tensorrt_llm``'s LLM API, with the interface the release's model uses
(docs/tensorrt-llm-contract.md#C-TRITON-1..5): cancellation aborts the LLM request in streaming and non-streaming mode
and through the ``stop`` input (issue 17 item 10); paths in model.yaml resolve under the deploy directory (item 9)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from triton_repo.render import template_dir

MODEL_PY = template_dir("1.2.1") / "gpu" / "tensorrt_llm" / "1" / "model.py"
FINAL = 1


class TritonError:
    CANCELLED = "CANCELLED"

    def __init__(self, message, code=None):
        self.message, self.code = message, code


class Sender:
    def __init__(self):
        self.sent = []  # (response, flags)

    def send(self, response, flags=0):
        self.sent.append((response, flags))

    def final(self):
        return [r for r, f in self.sent if f == FINAL]


class Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class Request:
    def __init__(self, inputs, rid=""):
        self.inputs, self.rid, self.cancelled, self.sender = inputs, rid, False, Sender()

    def get_response_sender(self):
        return self.sender

    def request_id(self):
        return self.rid

    def is_cancelled(self):
        return self.cancelled


def fake_pb_utils(model_dir: Path):
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TritonError = TritonError
    pb.TritonModelException = type("TritonModelException", (Exception,), {})
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    pb.Tensor = Tensor
    pb.InferenceResponse = lambda output_tensors=None, error=None: types.SimpleNamespace(
        output_tensors=output_tensors or [], error=error)
    pb.get_input_tensor_by_name = lambda request, name: (Tensor(name, request.inputs[name])
                                                          if name in request.inputs else None)
    pb.get_model_dir = lambda: str(model_dir)
    pb.Logger = types.SimpleNamespace(log_info=lambda *_: None)
    return pb


class Output:
    """What ``LLM.generate_async`` returns: an async iterator of partial results that can be aborted."""

    def __init__(self, steps: int):
        self.steps, self.aborted = steps, threading.Event()

    def abort(self):
        self.aborted.set()

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for i in range(self.steps):
            if self.aborted.is_set():
                return
            await asyncio.sleep(0.02)
            seq = types.SimpleNamespace(text="x" * (i + 1), token_ids=list(range(i + 1)),
                                        finish_reason="length" if i == self.steps - 1 else None,
                                        stop_reason=None, cumulative_logprob=0.0)
            yield types.SimpleNamespace(outputs=[seq], finished=i == self.steps - 1)


def fake_tensorrt_llm(calls: dict):
    trt = types.ModuleType("tensorrt_llm")

    class LLM:
        def __init__(self, **kwargs):
            calls["kwargs"] = kwargs
            calls["outputs"] = []

        def generate_async(self, prompt, *, sampling_params=None, streaming=False):
            out = Output(steps=calls.get("steps", 3))
            calls["outputs"].append(out)
            return out

        def shutdown(self):
            calls["shutdown"] = True

    trt.LLM, trt.SamplingParams = LLM, lambda **kw: kw
    utils = types.ModuleType("tensorrt_llm._utils")
    utils.global_mpi_rank, utils.global_mpi_size = (lambda: 0), (lambda: 1)
    llm_utils = types.ModuleType("tensorrt_llm.llmapi.llm_utils")
    llm_utils.update_llm_args_with_extra_dict = lambda base, extra: {**base, **extra}
    return {"tensorrt_llm": trt, "tensorrt_llm._utils": utils, "tensorrt_llm.llmapi": types.ModuleType("x"),
            "tensorrt_llm.llmapi.llm_utils": llm_utils}


@pytest.fixture
def deployment(tmp_path, monkeypatch):
    """<deploy>/package/triton_repo/tensorrt_llm/1/{model.py,model.yaml}, <deploy>/quantized, <deploy>/draft-quantized."""
    deploy = tmp_path / "srv" / "deploy"
    version = deploy / "package" / "triton_repo" / "tensorrt_llm" / "1"
    version.mkdir(parents=True)
    (deploy / "quantized").mkdir()
    (deploy / "draft-quantized").mkdir()
    config = {"model": "quantized", "tensor_parallel_size": 8,
              "speculative_config": {"decoding_type": "DraftTarget", "max_draft_len": 3,
                                     "speculative_model": "draft-quantized"},
              "triton_config": {"max_batch_size": 0, "decoupled": True, "cancellation_check_period_ms": 10,
                                "deploy_relative_paths": ["model", "speculative_config.speculative_model"]}}
    (version / "model.yaml").write_text(yaml.safe_dump(config))
    calls: dict = {}
    for name, module in {**fake_tensorrt_llm(calls), "triton_python_backend_utils": fake_pb_utils(version)}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv("DSBUILD_DEPLOY_DIR", raising=False)
    spec = importlib.util.spec_from_file_location("dsbuild_gpu_model", MODEL_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return types.SimpleNamespace(deploy=deploy, version=version, calls=calls, module=module)


def request(prompt="hello", *, streaming=False, rid="", stop=False):
    inputs = {"text_input": np.array([prompt.encode()], dtype=object), "streaming": np.array([streaming])}
    if stop:
        inputs["stop"] = np.array([True])
    return Request(inputs, rid)


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_paths_in_model_yaml_resolve_under_the_deploy_directory(deployment):
    model = deployment.module.TritonPythonModel()
    model.initialize({})
    kwargs = deployment.calls["kwargs"]
    assert kwargs["model"] == str(deployment.deploy / "quantized")
    assert kwargs["speculative_config"]["speculative_model"] == str(deployment.deploy / "draft-quantized")
    model.finalize()


def test_deploy_dir_from_the_environment_and_missing_paths_refused(deployment, monkeypatch, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "quantized").mkdir(parents=True)
    monkeypatch.setenv("DSBUILD_DEPLOY_DIR", str(elsewhere))
    model = deployment.module.TritonPythonModel()
    with pytest.raises(Exception, match="speculative_model.*draft-quantized is not a directory"):
        model.initialize({})  # no draft-quantized/ there: named, never taken for a Hub id
    (elsewhere / "draft-quantized").mkdir()
    model.initialize({})
    assert deployment.calls["kwargs"]["model"] == str(elsewhere / "quantized")
    model.finalize()


@pytest.mark.parametrize("streaming", [False, True])
def test_cancellation_aborts_the_llm_request_in_both_modes(deployment, streaming):
    deployment.calls["steps"] = 500  # long enough to be cancelled mid-generation
    model = deployment.module.TritonPythonModel()
    model.initialize({})
    req = request(streaming=streaming)
    model.execute([req])
    assert wait_for(lambda: deployment.calls["outputs"])
    output = deployment.calls["outputs"][0]
    req.cancelled = True
    assert wait_for(output.aborted.is_set), "the LLM request was not aborted"
    assert wait_for(lambda: req.sender.final())
    (final,) = req.sender.final()
    assert final.error is not None and final.error.code == TritonError.CANCELLED
    time.sleep(0.1)
    assert len(req.sender.final()) == 1  # answered once; no late result after the cancellation
    model.finalize()


def test_stop_input_aborts_every_request_with_that_id(deployment):
    deployment.calls["steps"] = 500
    model = deployment.module.TritonPythonModel()
    model.initialize({})
    a, b, other = request(rid="job-1"), request(rid="job-1", streaming=True), request(rid="job-2")
    model.execute([a, b, other])
    assert wait_for(lambda: len(deployment.calls["outputs"]) == 3)
    stopper = request(rid="job-1", stop=True)
    model.execute([stopper])
    outputs = deployment.calls["outputs"]
    assert wait_for(lambda: sum(o.aborted.is_set() for o in outputs) == 2)
    assert all(r.sender.final()[0].error.code == TritonError.CANCELLED for r in (a, b, stopper))
    assert not other.sender.final()
    other.cancelled = True
    assert wait_for(lambda: all(o.aborted.is_set() for o in outputs))
    model.finalize()


def test_uncancelled_requests_complete_normally(deployment):
    model = deployment.module.TritonPythonModel()
    model.initialize({})
    streamed, whole = request(streaming=True), request()
    model.execute([streamed, whole])
    assert wait_for(lambda: streamed.sender.final() and whole.sender.final())
    assert len(streamed.sender.sent) == 3 and len(whole.sender.sent) == 1  # 2 partial + final; final only
    text = [t for t in whole.sender.final()[0].output_tensors if t.name == "text_output"][0].array[0]
    assert text == b"xxx" and not any(o.aborted.is_set() for o in deployment.calls["outputs"])
    model.finalize()


def test_is_ready_until_the_request_loop_dies(deployment):
    """docs/tensorrt-llm-contract.md#C-TRITON-8: Triton 26.04+ asks ``is_ready`` on /v2/health/ready; a leader
    whose request loop has stopped can never answer again and must say so."""
    model = deployment.module.TritonPythonModel()
    model.initialize({})
    assert model.is_ready() is True
    model.execute([request()])
    assert wait_for(lambda: request_done(model))
    assert model.is_ready() is True  # serving a request changes nothing
    model.loop.call_soon_threadsafe(model.loop.stop)
    assert wait_for(lambda: not model.loop_thread.is_alive())
    assert model.is_ready() is False
    model.finalize()


def request_done(model):
    with model.lock:
        return not model.tracked

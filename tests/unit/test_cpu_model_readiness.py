"""The CPU ``model.py``'s ``is_ready`` (docs/tensorrt-llm-contract.md#C-TRITON-8): ready while the engine's ranks can
work together, not ready once ``EngineService.broken`` names why they cannot; a request that failed alone changes
nothing. The broken state itself is produced by a killed rank in tests/hardening/test_serving_requests.py."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest

from triton_repo.render import template_dir

MODEL_PY = template_dir("1.2.1") / "cpu" / "tensorrt_llm" / "1" / "model.py"


@pytest.fixture
def model_class(monkeypatch):
    pb = types.ModuleType("triton_python_backend_utils")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("dsbuild_cpu_model", MODEL_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel


def test_ready_until_the_engine_cannot_continue(model_class):
    model = model_class()
    model.engine = types.SimpleNamespace(broken=None)
    assert model.is_ready() is True
    model.engine.broken = "rank 1 exited with code -9"
    assert model.is_ready() is False

"""Shared fixtures. Generated checkpoints are made once per session under a temporary cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.hub_server import HubServer

REPO = Path(__file__).resolve().parent.parent
DSBUILD = [sys.executable, "-m", "builder.cli"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dsbuild-cache")


@pytest.fixture(scope="session")
def tiny_ckpt(cache_dir) -> Path:
    """The default tiny DeepSeek-V3.2 checkpoint (block FP8): the committed trained weights, exported once per
    test session. ``ensure_tiny(..., preset_name="tiny-random")`` gives the seeded random init."""
    from builder.model.generated import ensure_tiny

    return ensure_tiny(cache_dir / "models", seed=0)


@pytest.fixture(scope="session")
def tiny_float_dir(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint dequantized to fp32, for transformers."""
    from builder.model.hf_compat import write_dequantized_checkpoint

    return write_dequantized_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("tiny-fp32"))


def run_dsbuild(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600,
                check: bool = False) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONPATH", str(REPO))
    proc = subprocess.run([*DSBUILD, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"dsbuild {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def isolated_env(**settings: str) -> dict[str, str]:
    """This process's environment without the user's hub, token and dsbuild settings (HF_*, HUGGING*, DSBUILD_*),
    with hub telemetry off and this checkout importable, plus ``settings``: what a CLI subprocess under test sees."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "DSBUILD_"))}
    return {**base, "PYTHONPATH": str(REPO), "HF_HUB_DISABLE_TELEMETRY": "1", **settings}


@pytest.fixture
def hub_server():
    """A local Hugging Face hub on 127.0.0.1 (tests/support/hub_server.py), stopped after the test."""
    with HubServer() as server:
        yield server


@pytest.fixture
def dsbuild(tmp_path, cache_dir):
    """Run the CLI in a temporary working directory with the shared cache."""
    def _run(*args: str, **kw):
        env = {"XDG_CACHE_HOME": str(cache_dir), **kw.pop("env", {})}
        return run_dsbuild(*args, cwd=kw.pop("cwd", tmp_path), env=env, **kw)
    return _run

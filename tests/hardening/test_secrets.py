"""Secrets never leave the environment: a hub token and a registry password planted for a whole
run + push + pull + plan --plot flow appear in no output, file, plot, manifest or stored blob; and the source tree
loads no pickles and keeps trust_remote_code off unless asked."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import DSBUILD, REPO, isolated_env
from tests.hardening import record
from tests.support.hub_server import Faults, served_repo
from tests.support.registry import REGISTRY_BIN, run_registry

HUB_REPO = "acme/secret-tiny"
TOKEN = "hf_HARDENINGplantedTOKEN9f8e7d6c5b4a"
USER = "carol"
PASSWORD = "reg-PLANTED-pw-0af1c2e3d4"
SOURCE_DIRS = ["builder", "quantize", "triton_repo", "tools", "benchmarks"]


def secret_forms() -> list[bytes]:
    forms = [TOKEN, PASSWORD, f"{USER}:{PASSWORD}", f"Bearer {TOKEN}"]
    out = [f.encode() for f in forms]
    for f in forms:  # base64 at every alignment the secret can have inside a longer base64 string
        for pad in range(3):
            enc = base64.b64encode(b"x" * pad + f.encode())[4 if pad else 0:-4]
            out.append(enc)
    return out


@pytest.mark.slow
@pytest.mark.server
def test_planted_token_and_password_appear_nowhere(tmp_path, tiny_ckpt, hub_server):
    if not Path(REGISTRY_BIN).exists():
        pytest.skip("docker-registry is not installed")
    server = hub_server
    outputs: list[str] = []
    server.add(served_repo(HUB_REPO, tiny_ckpt, faults=Faults(gated_token=TOKEN)))
    env = isolated_env(XDG_CACHE_HOME=str(tmp_path / "xdg"), OMP_NUM_THREADS="1", HF_ENDPOINT=server.url,
                       HF_TOKEN=TOKEN, DSBUILD_REGISTRY_USER=USER, DSBUILD_REGISTRY_PASSWORD=PASSWORD)

    def dsb(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([*DSBUILD, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        outputs.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, (args, proc.stderr)
        return proc

    with run_registry(tmp_path / "registry", htpasswd=(USER, PASSWORD)) as reg:
        ref = f"oci://{reg.address}/team/tiny:secret"
        dsb("run", "--model", HUB_REPO, "--out", "build/r", "-v")
        dsb("plan", "--model", HUB_REPO, "--plot", "plan.png", "--json")
        dsb("push", "build/r", ref, "--plain-http", "-v")
        dsb("pull", ref, "pulled", "--plain-http", "--json")
        registry_log = reg.log()
    # The secrets were really used: the gated hub saw the token, the htpasswd registry let the push through.
    assert server.gets(".safetensors") and all(r.authorization == f"Bearer {TOKEN}"
                                               for r in server.gets(".safetensors"))
    assert (tmp_path / "pulled" / "manifest.json").is_file() and (tmp_path / "plan.png").stat().st_size > 1000

    forms = secret_forms()
    for text in [*outputs, registry_log]:
        assert not any(f.decode() in text for f in forms)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and p.name != "htpasswd"]
    assert len(files) > 50
    leaks = [str(p) for p in files if any(f in p.read_bytes() for f in forms)]
    assert not leaks, leaks
    record.add("secrets", "planted-token-and-password", files_scanned=len(files), outputs_scanned=len(outputs) + 1,
               forms=len(forms))


def _source_files() -> list[Path]:
    return [p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts]


def test_no_pickle_loading_in_the_source_tree():
    pattern = re.compile(r"\btorch\.load\(|\bpickle\.loads?\(|\bcloudpickle\b|\bjoblib\.load\(|\bnp\.load\([^)]*allow_pickle=True")
    # The one exception: torch's restricted unpickler (weights_only=True: tensors and plain containers, no code), in
    # the GPU-host script that reads the amax .pt files TensorRT-LLM's own calibration just wrote there
    # (quantize/modelopt_flow.py; upstream writes no other format).
    restricted = re.compile(r"\btorch\.load\([^#]*weights_only=True")
    hits = [f"{p.relative_to(REPO)}:{i}" for p in _source_files()
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line) and not restricted.search(line)]
    assert len(_source_files()) > 50
    assert not hits, hits
    record.add("secrets", "no-pickle-loads", files_scanned=len(_source_files()))


def test_trust_remote_code_is_never_on_by_default():
    """Every place that passes trust_remote_code passes False or the user's --trust-remote-code (default False)."""
    from builder.specs import RunSpec

    assert RunSpec.model_fields["trust_remote_code"].default is False
    allowed = re.compile(r"trust_remote_code\s*[=:]\s*(False|spec\.trust_remote_code|self\.trust_remote_code|"
                         r"trust_remote_code\b)|\"trust_remote_code\":\s*(False|spec\.trust_remote_code)")
    passes = [(p, i, line) for p in _source_files() for i, line in enumerate(p.read_text().splitlines(), 1)
              if re.search(r"trust_remote_code\s*[=:]|\"trust_remote_code\":", line)]
    assert passes
    bad = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p, i, line in passes
           if not allowed.search(line) and "opt(False" not in line]
    assert not bad, bad
    record.add("secrets", "trust-remote-code-default-off", sites=len(passes))

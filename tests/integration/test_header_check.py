"""The pre-download header check against the local hub server (issue 17 item 2): the real huggingface_hub client reads
only the shards' safetensors headers (HTTP range requests, docs/upstream-facts.md#U-HFHUB-1) and compares every
tensor's name, shape and dtype with the catalogue before any download. A checkpoint with the real model's BF16
weights_proj and F32 norms is accepted and builds engines that pass ``dsbuild verify``; one with a renamed, a missing,
a reshaped and a wrongly typed tensor is refused with one table and one sentence, and the hub's request log shows that
only header ranges of the shards were served."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch

from builder.model.catalog import Dtype, Kind
from tests.conftest import DSBUILD, isolated_env
from tests.support.checkpoints import recast, variant
from tests.support.hub_server import served_repo

pytestmark = pytest.mark.server

HEADER_RANGE = re.compile(r"^bytes=(0-100000|8-\d+)$")  # what get_safetensors_metadata asks for


@pytest.fixture
def dsb(tmp_path, hub_server):
    def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        env = isolated_env(HF_ENDPOINT=hub_server.url, XDG_CACHE_HOME=str(tmp_path / "xdg"))
        return subprocess.run([*DSBUILD, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=timeout)
    return _run


@pytest.fixture(scope="module")
def real_dtypes(tiny_ckpt, tmp_path_factory):
    """The tiny model with the real model's BF16 weights_proj (make-tiny's default) and F32 norms."""
    return recast(tiny_ckpt, tmp_path_factory.mktemp("ok") / "ckpt",
                  {Kind.NORM: Dtype.F32, Kind.FINAL_NORM: Dtype.F32, Kind.MTP_NORM: Dtype.F32})


RENAMED = ("model.layers.1.mlp.gate.weight", "model.layers.1.mlp.router.weight")
MISSING = "model.layers.2.post_attention_layernorm.weight"
RESHAPED = "model.layers.0.self_attn.indexer.weights_proj.weight"
RETYPED = "model.layers.3.input_layernorm.weight"


@pytest.fixture(scope="module")
def broken(tiny_ckpt, tmp_path_factory):
    def edit(tensors):
        out = {}
        for name, t in tensors.items():
            if name == RENAMED[0]:
                out[RENAMED[1]] = t
            elif name == MISSING:
                continue
            elif name == RESHAPED:
                out[name] = t[:, : t.shape[1] // 2].contiguous()
            elif name == RETYPED:
                out[name] = t.to(torch.float16)
            else:
                out[name] = t
        return out
    return variant(tiny_ckpt, tmp_path_factory.mktemp("bad") / "ckpt", edit)


def shard_requests(server):
    return [r for r in server.requests if "/resolve/" in r.path and r.path.endswith(".safetensors")]


def test_broken_checkpoint_is_refused_from_its_headers_before_any_download(dsb, hub_server, broken, tmp_path):
    repo = hub_server.add(served_repo("acme/broken", broken))
    shard_bytes = sum(f.size for p, f in repo.files.items() if p.endswith(".safetensors"))
    proc = dsb("fetch", "--model", "acme/broken", "--out", "build/run")
    assert proc.returncode == 3, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1
    assert ("does not match what its config.json implies: 2 missing, 1 unexpected, 1 with another shape, 1 with a "
            "dtype outside the policy") in errors[0] and "nothing was downloaded" in errors[0]
    table = proc.stderr
    assert re.search(rf"missing\s+{re.escape(RENAMED[0])}\s+-\s+BF16 or F32 \[8, 128\]", table), table
    assert re.search(rf"missing\s+{re.escape(MISSING)}", table)
    assert re.search(rf"unexpected\s+{re.escape(RENAMED[1])}\s+BF16 \[8, 128\]", table)
    assert re.search(rf"shape\s+{re.escape(RESHAPED)}\s+BF16 \[16, 64\]\s+BF16 or F32 \[16, 128\]", table)
    assert re.search(rf"dtype\s+{re.escape(RETYPED)}\s+F16\s+BF16 or F32", table)
    # What the hub served for the shards: header ranges only, each at most the client's 100 kB probe.
    reqs = shard_requests(hub_server)
    assert reqs and all(r.method == "HEAD" or HEADER_RANGE.match(r.range or "") for r in reqs), reqs
    served = hub_server.bytes_served(".safetensors")
    n_shards = sum(p.endswith(".safetensors") for p in repo.files)
    assert served <= n_shards * 100_001 < shard_bytes / 4, (served, shard_bytes)
    assert not (tmp_path / "build/run/weights").exists()
    blobs = tmp_path / "xdg/huggingface/hub/models--acme--broken/blobs"
    assert not any(repo.files[p].etag == b.name for b in blobs.iterdir() for p in repo.files
                   if p.endswith(".safetensors"))

    dry = dsb("fetch", "--model", "acme/broken", "--out", "build/run", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)["stages"][1]["info"]["plan"]
    check = plan["header_check"]
    assert not check["ok"] and check["counts"] == {"missing": 2, "unexpected": 1, "shape": 1, "dtype": 1}
    assert "Header check:" in plan["summary"] and "it would be refused" in plan["summary"]


@pytest.mark.slow
def test_real_dtypes_are_accepted_and_build_engines_that_verify(dsb, hub_server, real_dtypes, tmp_path):
    hub_server.add(served_repo("acme/v32-dtypes", real_dtypes))
    dry = dsb("fetch", "--model", "acme/v32-dtypes", "--out", "build/run", "--dry-run", "--json")
    check = json.loads(dry.stdout)["stages"][1]["info"]["plan"]["header_check"]
    assert check["ok"] and check["dtypes"]["norm"] == ["F32"] and check["dtypes"]["indexer_weights_proj"] == ["BF16"]
    assert all(r.method == "HEAD" or HEADER_RANGE.match(r.range or "") for r in shard_requests(hub_server))

    built = dsb("build", "--model", "acme/v32-dtypes", "--out", "build/run", "--tp", "2", "--pp", "1", "--json",
                timeout=1200)
    assert built.returncode == 0, built.stderr[-3000:]
    stages = {s["stage"]: s for s in json.loads(built.stdout)["stages"]}
    fetched = stages["fetch"]["info"]
    assert fetched["header_check"]["ok"] and fetched["dtypes"]["norm"] == ["F32"]
    assert stages["build"]["info"]["stored_dtypes"]["norm"] == ["F32"]
    verified = dsb("verify", "--engine", "build/run/engines", timeout=1200)
    assert verified.returncode == 0, verified.stderr[-3000:]
    assert json.loads(verified.stdout)["ok"]

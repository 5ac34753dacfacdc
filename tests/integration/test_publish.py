"""dsbuild push / pull against a real registry (Debian's docker-registry 2.8) on 127.0.0.1, read back by skopeo."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DSBUILD, REPO, run_dsbuild
from tests.support.registry import REGISTRY_BIN, SKOPEO_BIN, run_proxy, run_registry

pytestmark = [pytest.mark.server]
if not os.access(REGISTRY_BIN, os.X_OK):
    pytestmark.append(pytest.mark.skip(reason="docker-registry is not installed (.ci/run installs it)"))

PASSWORD = "pl4nted-Secret-9f2c"  # must never appear in any output or artifact


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir) -> Path:
    """A real run directory: `dsbuild run` on the tiny model (plan, fetch, quantize, build)."""
    work = tmp_path_factory.mktemp("publish-run")
    run_dsbuild("run", "--out", str(work / "run"), cwd=work, env={"XDG_CACHE_HOME": str(cache_dir)}, check=True)
    return work / "run"


@pytest.fixture
def registry(tmp_path):
    with run_registry(tmp_path / "registry") as reg:
        yield reg


def dsb(*args, env=None, cwd=None, timeout=300):
    base = {"DOCKER_CONFIG": str(Path(cwd or REPO) / ".no-docker-config")}  # never the developer's own logins
    return run_dsbuild(*args, cwd=cwd or REPO, env={**base, **(env or {})}, timeout=timeout)


def listed_files(run_dir: Path, stages=("plan", "build")) -> dict[str, bytes]:
    m = json.loads((run_dir / "manifest.json").read_text())
    out = {"manifest.json": (run_dir / "manifest.json").read_bytes()}
    for s in stages:
        for f in m["stages"][s]["outputs"]:
            out[f["path"]] = (run_dir / f["path"]).read_bytes()
    return out


def test_push_pull_round_trip_is_byte_identical_and_repush_uploads_nothing(tiny_run, registry, tmp_path):
    ref = f"oci://{registry.address}/dsbuild/tiny"
    first = dsb("push", str(tiny_run), ref, "--plain-http", "--json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    pushed = json.loads(first.stdout)
    tag = pushed["reference"].rsplit(":", 1)[1]
    assert tag.startswith("tiny-fp8-tp2pp2ep1-trtllm1.2.1-none-")  # derived from the run
    assert pushed["stats"]["blobs_uploaded"] == registry.completed_uploads() == pushed["layers"] + 1  # + config
    assert "note: stage package is not built" not in first.stderr  # `dsbuild run` includes the package stage

    again = dsb("push", str(tiny_run), f"{ref}:{tag}", "--plain-http", "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    stats = json.loads(again.stdout)["stats"]
    assert stats["blobs_uploaded"] == 0 and stats["bytes_uploaded"] == 0
    assert registry.completed_uploads() == pushed["layers"] + 1  # the registry saw no new upload
    assert json.loads(again.stdout)["digest"] == pushed["digest"]  # same run, same manifest

    out = tmp_path / "pulled"
    pulled = dsb("pull", f"{ref}:{tag}", str(out), "--plain-http", cwd=tmp_path)
    assert pulled.returncode == 0, pulled.stderr
    assert listed_files(out) == listed_files(tiny_run)
    assert not (out / "weights").exists() and not (out / "quantized").exists()  # not pushed by default
    dockerfile = (out / "Dockerfile").read_text()
    assert dockerfile.startswith("# syntax=docker/dockerfile:1") and "COPY engines/ ./engines/" in dockerfile
    assert dsb("dockerfile", str(tiny_run), cwd=tmp_path).stdout == dockerfile
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint:
        lint = subprocess.run([hadolint, "--no-color", str(out / "Dockerfile")], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout

    # Pull refuses to clobber, and names the missing tag.
    again = dsb("pull", f"{ref}:{tag}", str(out), "--plain-http", cwd=tmp_path)
    assert again.returncode == 10 and "is not empty" in again.stderr
    notag = dsb("pull", ref, str(tmp_path / "p2"), "--plain-http", cwd=tmp_path)
    assert notag.returncode == 10 and "names no tag or digest; pull needs one" in notag.stderr
    missing = dsb("pull", f"{ref}:nope", str(tmp_path / "p3"), "--plain-http", cwd=tmp_path)
    assert missing.returncode == 10 and "does not exist in the registry" in missing.stderr
    assert not (tmp_path / "p2").exists() and not (tmp_path / "p3").exists()

    # --include-weights adds quantized/, whose shards are new blobs; pull by digest works too.
    heavy = dsb("push", str(tiny_run), f"{ref}:with-weights", "--plain-http", "--include-weights", "--json", cwd=tmp_path)
    assert heavy.returncode == 0, heavy.stderr
    heavy = json.loads(heavy.stdout)
    assert heavy["stats"]["blobs_skipped"] >= pushed["layers"] - 2  # engines and plan already there
    by_digest = dsb("pull", f"{ref}@{heavy['digest']}", str(tmp_path / "p4"), "--plain-http", cwd=tmp_path)
    assert by_digest.returncode == 0, by_digest.stderr
    assert listed_files(tmp_path / "p4", ("plan", "build", "quantize")) == listed_files(tiny_run, ("plan", "build", "quantize"))


@pytest.mark.skipif(SKOPEO_BIN is None, reason="skopeo is not installed (.ci/run installs it)")
def test_skopeo_reads_the_artifact(tiny_run, registry, tmp_path):
    ref = f"{registry.address}/dsbuild/tiny:skopeo"
    assert dsb("push", str(tiny_run), f"oci://{ref}", "--plain-http", cwd=tmp_path).returncode == 0
    raw = subprocess.run([SKOPEO_BIN, "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                         capture_output=True, text=True, timeout=60)
    assert raw.returncode == 0, raw.stderr
    manifest = json.loads(raw.stdout)
    assert manifest["artifactType"] == "application/vnd.dsbuild.deployment.v1"
    assert manifest["annotations"]["io.dsbuild.tensorrt-llm.version"] == "1.2.1"
    assert manifest["annotations"]["io.dsbuild.layout"] == "tp2pp2ep1"
    titles = {layer["annotations"]["org.opencontainers.image.title"]: layer["mediaType"] for layer in manifest["layers"]}
    assert titles["engines/rank0.safetensors"] == "application/vnd.dsbuild.engine.rank.v1+safetensors"
    assert titles["plan"] == titles["package"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert titles["manifest.json"] == "application/vnd.dsbuild.manifest.v1+json"
    config = subprocess.run([SKOPEO_BIN, "inspect", "--config", "--raw", "--tls-verify=false", f"docker://{ref}"],
                            capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stderr
    assert json.loads(config.stdout)["run_name"] == "run"
    # skopeo's image-level inspect refuses non-image artifacts by design; it must name our artifact type.
    plain = subprocess.run([SKOPEO_BIN, "inspect", "--tls-verify=false", f"docker://{ref}"], capture_output=True,
                           text=True, timeout=60)
    assert plain.returncode == 0 or "application/vnd.dsbuild.deployment.config.v1+json" in plain.stderr


def test_htpasswd_registry_accepts_right_and_rejects_wrong_credentials(tiny_run, tmp_path):
    with run_registry(tmp_path / "auth-registry", htpasswd=("alice", PASSWORD)) as reg:
        ref = f"oci://{reg.address}/team/tiny:auth"
        outputs = []

        def push(env, *extra):
            proc = dsb("push", str(tiny_run), ref, "--plain-http", *extra, env=env, cwd=tmp_path)
            outputs.append(proc.stdout + proc.stderr)
            return proc

        anonymous = push({})
        assert anonymous.returncode == 10
        assert "requires credentials: set DSBUILD_REGISTRY_USER and DSBUILD_REGISTRY_PASSWORD" in anonymous.stderr
        wrong = push({"DSBUILD_REGISTRY_USER": "alice", "DSBUILD_REGISTRY_PASSWORD": PASSWORD + "x"}, "-v")
        assert wrong.returncode == 10
        assert "rejected the credentials of user 'alice' (from DSBUILD_REGISTRY_USER)" in wrong.stderr
        right = push({"DSBUILD_REGISTRY_USER": "alice", "DSBUILD_REGISTRY_PASSWORD": PASSWORD})
        assert right.returncode == 0, right.stderr

        # The docker config's base64 auth works for pull.
        docker = tmp_path / "docker"
        docker.mkdir()
        (docker / "config.json").write_text(json.dumps(
            {"auths": {reg.address: {"auth": base64.b64encode(f"alice:{PASSWORD}".encode()).decode()}}}))
        out = tmp_path / "pulled"
        pulled = dsb("pull", ref, str(out), "--plain-http", "--json", env={"DOCKER_CONFIG": str(docker)}, cwd=tmp_path)
        outputs.append(pulled.stdout + pulled.stderr)
        assert pulled.returncode == 0, pulled.stderr
        assert listed_files(out) == listed_files(tiny_run)

        # The password is nowhere: not in any output, not in the pulled files, not in any blob the registry stores.
        secret_forms = [PASSWORD.encode(), base64.b64encode(f"alice:{PASSWORD}".encode())]
        for text in outputs:
            assert PASSWORD not in text
        stored = [p for p in [*out.rglob("*"), *(reg.root / "data").rglob("*")] if p.is_file()]
        assert len(stored) > 10
        for p in stored:
            data = p.read_bytes()
            assert not any(s in data for s in secret_forms), p


def test_bearer_token_registry(tiny_run, registry, tmp_path):
    """A registry behind the distribution token protocol (as Harbor, GHCR, ECR-style services speak it)."""
    with run_proxy(registry.address, bearer=("bob", PASSWORD)) as proxy:
        ref = f"oci://{proxy['address']}/dsbuild/tiny:bearer"
        wrong = dsb("push", str(tiny_run), ref, "--plain-http",
                    env={"DSBUILD_REGISTRY_USER": "bob", "DSBUILD_REGISTRY_PASSWORD": "nope"}, cwd=tmp_path)
        assert wrong.returncode == 10 and "token service of" in wrong.stderr and "refused user 'bob'" in wrong.stderr
        env = {"DSBUILD_REGISTRY_USER": "bob", "DSBUILD_REGISTRY_PASSWORD": PASSWORD}
        right = dsb("push", str(tiny_run), ref, "--plain-http", "--json", env=env, cwd=tmp_path)
        assert right.returncode == 0, right.stderr
        assert proxy["tokens_issued"] == 1  # one token, reused for every request
        out = tmp_path / "pulled"
        assert dsb("pull", ref, str(out), "--plain-http", env=env, cwd=tmp_path).returncode == 0
        assert listed_files(out) == listed_files(tiny_run)
        assert PASSWORD not in right.stdout + right.stderr + wrong.stderr


def test_registry_answering_500_gives_one_clear_error(tiny_run, registry, tmp_path):
    with run_proxy(registry.address, fail_uploads_with=500) as proxy:
        t0 = time.perf_counter()
        proc = dsb("push", str(tiny_run), f"oci://{proxy['address']}/dsbuild/tiny:t", "--plain-http", cwd=tmp_path)
        assert time.perf_counter() - t0 < 60
    assert proc.returncode == 10
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: uploading ") and "failed after 4 attempts" in err
    assert "HTTP 500" in err and "storage backend unavailable" in err, err
    assert "Traceback" not in proc.stderr and proxy["failed"] == 4


def test_connection_dropped_mid_upload_is_retried_and_the_artifact_is_consistent(tiny_run, registry, tmp_path):
    with run_proxy(registry.address, drop_after_patch_bytes=5_000_000) as proxy:
        proc = dsb("push", str(tiny_run), f"oci://{proxy['address']}/dsbuild/tiny:drop", "--plain-http", "--json",
                   cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        stats = json.loads(proc.stdout)["stats"]
        assert proxy["dropped"] == 1 and stats["upload_resumes"] == 1 and stats["upload_attempts_failed"] == 0
    out = tmp_path / "pulled"
    assert dsb("pull", f"oci://{registry.address}/dsbuild/tiny:drop", str(out), "--plain-http", cwd=tmp_path).returncode == 0
    assert listed_files(out) == listed_files(tiny_run)


def test_cut_off_chunk_resumes_the_upload_session_where_the_registry_stopped(tiny_run, registry, tmp_path):
    from builder.publish import parse_reference, push_run

    chunk = 1 << 20
    with run_proxy(registry.address, drop_after_patch_bytes=5 * chunk + 10) as proxy:
        result = push_run(run_dir=tiny_run, ref=parse_reference(f"oci://{proxy['address']}/dsbuild/tiny:resume"),
                          plain_http=True, chunk_bytes=chunk, log=lambda m: None,
                          environ={"DOCKER_CONFIG": str(tmp_path)})
    assert proxy["dropped"] == 1 and result.stats.upload_resumes == 1 and result.stats.upload_attempts_failed == 0
    # Every chunk reached the registry exactly once: the cut-off one was resent, nothing from a blob's start.
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    sizes = [f["size"] for s in ("plan", "build") for f in manifest["stages"][s]["outputs"] if f["size"] >= chunk]
    assert max(sizes) > 5 * chunk
    big_chunks = sum(-(-size // chunk) for size in sizes)
    assert registry.patch_requests() == big_chunks + result.stats.blobs_uploaded - len(sizes)
    out = tmp_path / "pulled"
    assert dsb("pull", f"oci://{registry.address}/dsbuild/tiny:resume", str(out), "--plain-http", cwd=tmp_path).returncode == 0
    assert listed_files(out) == listed_files(tiny_run)


def test_push_killed_midway_then_retried_completes(tiny_run, registry, tmp_path):
    ref = f"oci://{registry.address}/dsbuild/tiny:killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSBUILD_FAULT_PAUSE": "push:60",
           "DOCKER_CONFIG": str(tmp_path / "none")}
    proc = subprocess.Popen([*DSBUILD, "push", str(tiny_run), ref, "--plain-http"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "fault-pause push" in line, line + proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    before = registry.completed_uploads()
    assert before >= 2
    gone = dsb("pull", ref, str(tmp_path / "early"), "--plain-http", cwd=tmp_path)
    assert gone.returncode == 10 and "does not exist in the registry" in gone.stderr  # no manifest, no tag

    retry = dsb("push", str(tiny_run), ref, "--plain-http", "--json", cwd=tmp_path)
    assert retry.returncode == 0, retry.stderr
    stats = json.loads(retry.stdout)["stats"]
    assert stats["blobs_skipped"] == before  # what the killed push finished is not sent again
    assert registry.completed_uploads() == before + stats["blobs_uploaded"]
    out = tmp_path / "pulled"
    assert dsb("pull", ref, str(out), "--plain-http", cwd=tmp_path).returncode == 0
    assert listed_files(out) == listed_files(tiny_run)


def test_corrupt_files_are_named_on_push_and_on_pull(tiny_run, registry, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True)
    rank = run / "engines" / "rank1.safetensors"
    data = bytearray(rank.read_bytes())
    data[-1] ^= 0xFF
    rank.write_bytes(bytes(data))  # same size, other bytes
    bad = dsb("push", str(run), f"oci://{registry.address}/dsbuild/tiny:bad", "--plain-http", cwd=tmp_path)
    assert bad.returncode == 11 and "engines/rank1.safetensors does not match its sha256 in manifest.json" in bad.stderr

    ref = f"oci://{registry.address}/dsbuild/tiny:good"
    assert dsb("push", str(tiny_run), ref, "--plain-http", cwd=tmp_path).returncode == 0
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    sha = next(f["sha256"] for f in manifest["stages"]["build"]["outputs"] if f["path"] == "engines/rank0.safetensors")
    blob = next((registry.root / "data").rglob(f"blobs/sha256/{sha[:2]}/{sha}/data"))
    stored = bytearray(blob.read_bytes())
    stored[100] ^= 0xFF
    blob.write_bytes(bytes(stored))  # the registry now serves other bytes for that digest
    out = tmp_path / "pulled"
    pulled = dsb("pull", ref, str(out), "--plain-http", cwd=tmp_path)
    assert pulled.returncode == 11 and pulled.stderr.strip().startswith("error: engines/rank0.safetensors:"), pulled.stderr
    assert not out.exists() and not list(tmp_path.glob(".pulled.tmp-*"))  # nothing half-written


def test_bad_push_inputs_are_one_sentence_errors(tiny_run, tmp_path):
    no_build = tmp_path / "no-build"
    no_build.mkdir()
    m = json.loads((tiny_run / "manifest.json").read_text())
    (no_build / "manifest.json").write_text(json.dumps({**m, "stages": {"plan": m["stages"]["plan"]}}))
    shrunk = tmp_path / "shrunk"
    shutil.copytree(tiny_run, shrunk, symlinks=True)
    (shrunk / "engines" / "rank2.safetensors").write_bytes(b"short")
    ref = "oci://127.0.0.1:9/dsbuild/tiny:t"  # nothing listens: every case must fail before any traffic
    cases = [
        ((str(tmp_path / "absent"), ref), 2, "run directory"),
        ((str(tmp_path), ref), 2, "has no manifest.json; is it a dsbuild run directory?"),
        ((str(no_build), ref), 2, "the run has no engines yet"),
        ((str(shrunk), ref), 11, "engines/rank2.safetensors is 5 bytes but manifest.json records"),
        ((str(tiny_run), "oci://127.0.0.1:9/dsbuild/tiny@sha256:" + "a" * 64), 10, "pins a digest; push needs a tag"),
        ((str(tiny_run), "oci://dsbuild/tiny:t"), 10, "no valid registry host"),
    ]
    for args, code, message in cases:
        proc = dsb("push", *args, "--plain-http", cwd=tmp_path)
        assert proc.returncode == code and message in proc.stderr, (args, proc.returncode, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("note: ")]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr


def test_package_directories_round_trip_as_tar_layers(registry, tmp_path):
    from tests.support.runs import synthetic_run

    run = tmp_path / "run"
    synthetic_run(run, write_manifest=True)
    ref = f"oci://{registry.address}/dsbuild/pkg:t"
    assert dsb("push", str(run), ref, "--plain-http", cwd=tmp_path).returncode == 0
    raw = dsb("pull", ref, str(tmp_path / "pulled"), "--plain-http", cwd=tmp_path)
    assert raw.returncode == 0, raw.stderr
    out = tmp_path / "pulled"
    assert listed_files(out, ("plan", "build", "package")) == listed_files(run, ("plan", "build", "package"))
    assert os.access(out / "package/launch/run.sh", os.X_OK)  # the exec bit survives the tar
    assert not (out / "Dockerfile").exists()  # the package's own Dockerfile is used, none rendered
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        ["manifest.json", *[f for f in listed_files(run, ("plan", "build", "package")) if f != "manifest.json"]])


def _tree(root: Path) -> dict[str, tuple[bytes, bool]]:
    """Every file under ``root``: its bytes and whether it is executable."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), os.access(p, os.X_OK))
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_oras_py_pulls_the_tree_dsbuild_pull_does(tiny_run, registry, tmp_path):
    """ORAS's directory layers (docs/upstream-facts.md#U-ORAS-1/2): an ORAS client pulls plan/ and package/ as
    directories, not as gzip files, into the same tree `dsbuild pull` writes (and the run holds)."""
    oras_provider = pytest.importorskip("oras.provider")
    ref = f"{registry.address}/dsbuild/tiny:oras"
    assert dsb("push", str(tiny_run), f"oci://{ref}", "--plain-http", cwd=tmp_path).returncode == 0
    ours = tmp_path / "dsbuild-pull"
    pulled = dsb("pull", f"oci://{ref}", str(ours), "--plain-http", cwd=tmp_path)
    assert pulled.returncode == 0, pulled.stderr
    theirs = tmp_path / "oras-pull"
    oras = oras_provider.Registry(hostname=registry.address, insecure=True)  # oras-py's insecure: plain HTTP
    oras.pull(target=ref, outdir=str(theirs))
    assert (theirs / "plan").is_dir() and (theirs / "package" / "launch").is_dir()
    assert (theirs / "package" / "triton_repo").is_dir()
    assert _tree(theirs) == _tree(ours)
    assert {k: v[0] for k, v in _tree(ours).items() if k != "Dockerfile"} == \
        {k: v for k, v in listed_files(tiny_run, ("plan", "build", "package")).items()}


def test_pull_checks_the_oras_digest_of_a_directory_layer(tiny_run, registry, tmp_path):
    """A directory layer whose io.deis.oras.content.digest does not match its uncompressed tar is refused (as the oras
    CLI refuses it), though every file in it matches manifest.json."""
    oras_provider = pytest.importorskip("oras.provider")
    ref = f"{registry.address}/dsbuild/tiny:orasdigest"
    assert dsb("push", str(tiny_run), f"oci://{ref}", "--plain-http", cwd=tmp_path).returncode == 0
    client = oras_provider.Registry(hostname=registry.address, insecure=True)
    manifest = client.get_manifest(ref)
    plan = next(la for la in manifest["layers"] if la["annotations"]["org.opencontainers.image.title"] == "plan")
    plan["annotations"]["io.deis.oras.content.digest"] = "sha256:" + "0" * 64
    bad = f"{registry.address}/dsbuild/tiny:orasdigest-bad"
    assert client.upload_manifest(manifest, client.get_container(bad)).status_code == 201
    out = tmp_path / "pulled"
    proc = dsb("pull", f"oci://{bad}", str(out), "--plain-http", cwd=tmp_path)
    assert proc.returncode == 11, proc.stderr
    assert "plan: its uncompressed tar does not match the io.deis.oras.content.digest annotation" in proc.stderr
    assert not out.exists()


def test_insecure_is_tls_without_verification_and_names_plain_http(tiny_run, registry, tmp_path):
    """--insecure means what it means in oras (skip TLS verification); against a plain-HTTP registry it says to use
    --plain-http, for push and pull alike."""
    ref = f"oci://{registry.address}/dsbuild/tiny:flags"
    for args in (["push", str(tiny_run), ref], ["pull", ref, str(tmp_path / "p")]):
        proc = dsb(*args, "--insecure", cwd=tmp_path)
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert f"{registry.address} answers plain HTTP, not TLS: pass --plain-http" in last, proc.stderr
        assert "--insecure only skips TLS certificate verification" in last
    assert not (tmp_path / "p").exists()

"""Issue 18 items 12-16: pull and push trust nothing a registry or a run directory says.

Pull is pointed at a hostile registry (tests/support/hostile_registry.py) serving a valid dsbuild artifact of a
synthetic run with one thing changed per case: layers the run's manifest.json does not list, a second
manifest.json, a file twice, malformed artifact manifests, run manifests with unsafe paths, blobs longer than their
descriptors (announced or not), a gzip bomb. Each must fail with one sentence (exit 10 or 11), write nothing under
the destination, and read no blob past its declared size. Push is given run manifests that point outside the run.
Credentials go to a Bearer realm only over HTTPS, or over HTTP when registry and realm are both this machine.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import io
import json
import os
import tarfile
import socketserver
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

from builder.errors import RegistryError
from builder.publish.artifact import DOCKERFILE_MEDIA_TYPE, TAR_SUFFIX, TITLE
from builder.publish.client import RegistryClient
from builder.publish.reference import parse_reference
from tests.hardening import record
from tests.hardening.test_bad_inputs import assert_one_sentence
from tests.support.hostile_registry import Hostile, artifact, hostile_registry, layer, tar_gz
from tests.support.runs import synthetic_run

MB = 1 << 20


def _pull(dsbuild, state: Hostile, tmp_path: Path):
    return dsbuild("pull", f"oci://{state.address}/team/run:v1", "dest", "--plain-http", timeout=120)


def _listed_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# --- item 12: only the listed files, each once -------------------------------------------------------------------

def extra_top_level(state, run, m):
    return artifact(state, run, m, extra_layers=[layer(state, "run-me.sh", b"#!/bin/sh\nrm -rf ~\n")])


def extra_under_stage(state, run, m):
    return artifact(state, run, m, extra_layers=[layer(state, "engines/evil.so", b"\x7fELF")])


def extra_under_unpulled_stage(state, run, m):
    return artifact(state, run, m, extra_layers=[layer(state, "weights/x.safetensors", b"x" * 16)])


def second_manifest(state, run, m):
    other = json.dumps({"stages": {}}).encode()
    return artifact(state, run, m, extra_layers=[layer(state, "manifest.json", other)])


def manifest_layer_other_type(state, run, m):
    def edit(doc):
        doc["layers"][0]["mediaType"] = "application/vnd.dsbuild.file.v1"
    return artifact(state, run, m, edit=edit)


def same_file_twice(state, run, m):
    path = "engines/config.json"
    return artifact(state, run, m, extra_layers=[layer(state, path, (run / path).read_bytes())])


def launch_as_tar(members: list[tuple[str, bytes | None]], *, keep_file_layer: bool = False):
    """package/launch/ as one tar.gz layer (push's layout) holding ``members``, in place of its file layer."""
    def make(state, run, m):
        def edit(doc):
            if not keep_file_layer:
                doc["layers"] = [la for la in doc["layers"] if la["annotations"][TITLE] != RUN_SH]
            doc["layers"].append(layer(state, "package/launch", tar_gz(members),
                                       "application/vnd.dsbuild.launch.v1" + TAR_SUFFIX))
        return artifact(state, run, m, edit=edit)
    return make


RUN_SH = "package/launch/run.sh"


def dockerfile_title_other_type(state, run, m):
    return artifact(state, run, m, extra_layers=[layer(state, "Dockerfile", b"FROM evil\n")])


def unlisted_stage_in_annotation(state, run, m):
    return artifact(state, run, m, annotate="plan,build,package,fetch")


# --- item 13: malformed artifact manifests -----------------------------------------------------------------------

def edited(fn: Callable[[dict], None]):
    return lambda state, run, m: artifact(state, run, m, edit=fn)


def run_manifest_edited(fn: Callable[[dict], None]):
    def make(state, run, m):
        served = json.loads(json.dumps(m))
        fn(served)
        return artifact(state, run, m, served_manifest=served)
    return make


def raw_manifest(text: bytes):
    def make(state, run, m):
        artifact(state, run, m)
        state.manifest = text
    return make


def _set_layer(i: int, key: str, value: Any):
    def fn(doc):
        doc["layers"][i][key] = value
    return fn


CASES = [
    # (id, make, exit code, words in the one-sentence error)
    ("extra-top-level-file", extra_top_level, 11, "the artifact carries run-me.sh, which manifest.json does not list"),
    ("extra-file-under-a-stage", extra_under_stage, 11, "the artifact carries engines/evil.so, which manifest.json does not list"),
    ("extra-file-of-a-stage-not-pulled", extra_under_unpulled_stage, 11, "carries weights/x.safetensors, which manifest.json does not list"),
    ("second-manifest-json-layer", second_manifest, 10, "layer title 'manifest.json' appears twice"),
    ("manifest-json-as-a-plain-file", manifest_layer_other_type, 10, "does not carry exactly one manifest.json layer"),
    ("same-file-twice", same_file_twice, 10, "layer title 'engines/config.json' appears twice"),
    ("tar-member-not-listed", launch_as_tar([(RUN_SH, b"#!/bin/sh\n"), ("package/launch/extra.sh", b"echo hi\n")]), 11, "carries package/launch/extra.sh, which manifest.json does not list"),
    ("tar-member-twice", launch_as_tar([(RUN_SH, b"#!/bin/sh\n"), (RUN_SH, b"#!/bin/sh\n")]), 11, "the artifact carries package/launch/run.sh twice"),
    ("tar-member-outside-its-title", launch_as_tar([(RUN_SH, b"#!/bin/sh\n"), ("engines/config.json", b"{}")]), 11, "holds engines/config.json, outside the directory it is titled"),
    ("tar-member-a-symlink", launch_as_tar([("package/launch/link", None), (RUN_SH, b"#!/bin/sh\n")]), 11, "holds package/launch/link, which is not a regular file"),
    ("tar-over-a-file-layer", launch_as_tar([(RUN_SH, b"#!/bin/sh\n")], keep_file_layer=True), 10, "layer title 'package/launch/run.sh' lies inside 'package/launch', which is a file"),
    ("dockerfile-title-with-another-type", dockerfile_title_other_type, 11, "carries Dockerfile, which manifest.json does not list"),
    ("stages-annotation-names-an-unlisted-stage", unlisted_stage_in_annotation, 11, "says it holds stage fetch, which its manifest.json does not list"),
    ("missing-mediaType", edited(lambda d: d.pop("mediaType")), 10, "is malformed: the document: 'mediaType' is a required property"),
    ("schemaVersion-1", edited(lambda d: d.__setitem__("schemaVersion", 1)), 10, "is malformed: schemaVersion: 2 was expected"),
    ("layers-an-object", edited(lambda d: d.__setitem__("layers", {"a": 1})), 10, "is malformed: layers: {'a': 1} is not of type 'array'"),
    ("layers-empty", edited(lambda d: d.__setitem__("layers", [])), 10, "is malformed: layers: [] should be non-empty"),
    ("layer-a-string", edited(lambda d: d["layers"].__setitem__(1, "x")), 10, "is malformed: layers[1]: 'x' is not of type 'object'"),
    ("size-a-string", edited(_set_layer(1, "size", "28")), 10, "is malformed: layers[1].size: '28' is not of type 'integer'"),
    ("size-negative", edited(_set_layer(1, "size", -1)), 10, "layers[1].size: -1 is less than the minimum of 0"),
    ("size-a-float", edited(_set_layer(1, "size", 28.5)), 10, "layers[1].size: 28.5 is not of type 'integer'"),
    ("digest-not-sha256", edited(_set_layer(1, "digest", "md5:abc")), 10, "layers[1].digest: 'md5:abc' does not match"),
    ("annotations-a-list", edited(_set_layer(1, "annotations", ["x"])), 10, "layers[1].annotations: ['x'] is not of type 'object'"),
    ("title-missing", edited(_set_layer(1, "annotations", {})), 10, "layers[1].annotations: 'org.opencontainers.image.title' is a required property"),
    ("title-a-number", edited(_set_layer(1, "annotations", {TITLE: 7})), 10, "is not of type 'string'"),
    ("title-under-manifest-json", edited(lambda d: d["layers"][1]["annotations"].__setitem__(TITLE, "manifest.json/x")), 10, "layer title 'manifest.json/x' lies inside 'manifest.json', which is a file"),
    ("title-dotdot", edited(lambda d: d["layers"][1]["annotations"].__setitem__(TITLE, "../../x")), 10, "refusing layer title '../../x': it would escape"),
    ("title-absolute", edited(lambda d: d["layers"][1]["annotations"].__setitem__(TITLE, "/etc/cron.d/x")), 10, "refusing layer title '/etc/cron.d/x'"),
    ("stages-a-list", edited(lambda d: d.__setitem__("annotations", {"io.dsbuild.stages": ["plan"]})), 10, "annotations.io.dsbuild.stages: ['plan'] is not of type 'string'"),
    ("annotations-a-list", edited(lambda d: d.__setitem__("annotations", ["x"])), 10, "annotations: ['x'] is not of type 'object'"),
    ("config-missing", edited(lambda d: d.pop("config")), 10, "'config' is a required property"),
    ("manifest-not-json", raw_manifest(b"{not json"), 10, "is not valid JSON"),
    ("manifest-a-list", raw_manifest(b"[1, 2]"), 10, "is malformed: the document: [1, 2] is not of type 'object'"),
    ("manifest-5000-digit-size", raw_manifest(b'{"layers": [{"size": ' + b"9" * 5000 + b'}]}'), 10, "an integer of 5000 digits"),
    ("manifest-nested-100000-deep", raw_manifest(b"[" * 100_000 + b"]" * 100_000), 10, "nests too deeply"),
    ("manifest-nan-size", raw_manifest(b'{"layers": [{"size": NaN}]}'), 10, "NaN, which is not JSON"),
    # manifest.json inside the artifact, malformed or unsafe
    ("run-manifest-stages-a-list", run_manifest_edited(lambda m: m.__setitem__("stages", [])), 11, "is malformed: stages: [] is not of type 'object'"),
    ("run-manifest-dotdot-path", run_manifest_edited(lambda m: m["stages"]["build"]["outputs"].append(
        {"path": "engines/../../../../etc/cron.d/x", "size": 1, "sha256": "0" * 64})), 11, "lists an unsafe path: refusing path of stage build 'engines/../../../../etc/cron.d/x'"),
    ("run-manifest-path-outside-its-stage", run_manifest_edited(lambda m: m["stages"]["build"]["outputs"][0].__setitem__("path", "package/x")), 11, "lists 'package/x' for stage build, outside its directory engines/"),
    ("run-manifest-size-a-string", run_manifest_edited(lambda m: m["stages"]["plan"]["outputs"][0].__setitem__("size", "1")), 11, "stages.plan.outputs[0].size: '1' is not of type 'integer'"),
    ("run-manifest-dir-dotdot", run_manifest_edited(lambda m: m["stages"]["plan"].__setitem__("dir", "..")), 11, "stages.plan.dir: '..' does not match"),
]


@pytest.mark.parametrize("name,make,code,words", [pytest.param(*c, id=c[0]) for c in CASES])
def test_pull_refuses_what_the_verified_manifest_does_not_say(dsbuild, tmp_path, name, make, code, words):
    run = tmp_path / "run"
    m = synthetic_run(run)
    with hostile_registry(Hostile()) as state:
        make(state, run, m)
        proc = _pull(dsbuild, state, tmp_path)
    message = assert_one_sentence(proc, name)
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert words in message, message
    assert not (tmp_path / "dest").exists(), "pull left files under the destination"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dest")], "temporary left behind"
    record.add("bad_inputs", f"pull-{name}", exit_code=proc.returncode, message=message,
               item=12 if name.startswith(ITEM_12) else 13)


ITEM_12 = ("extra-", "second-manifest", "manifest-json-as", "same-file", "tar-", "dockerfile-", "stages-annotation")


def test_pull_of_a_valid_artifact_writes_exactly_the_listed_files(dsbuild, tmp_path):
    run = tmp_path / "run"
    m = synthetic_run(run)
    with hostile_registry(Hostile()) as state:
        artifact(state, run, m, extra_layers=[layer(state, "Dockerfile", b"FROM anything\n", DOCKERFILE_MEDIA_TYPE)])
        proc = _pull(dsbuild, state, tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = {f["path"] for s in m["stages"].values() for f in s["outputs"]}
    # The Dockerfile is rendered from the verified manifest, not taken from the layer.
    assert _listed_files(tmp_path / "dest") == listed | {"manifest.json", "Dockerfile"}
    assert "FROM anything" not in (tmp_path / "dest" / "Dockerfile").read_text()
    assert not [r for r in state.requests if r.path.endswith(hashlib.sha256(b"FROM anything\n").hexdigest())]
    record.add("checks", "pull-writes-exactly-the-listed-files", item=12,
               detail=f"{len(listed)} listed files + manifest.json + the Dockerfile rendered from them")


# --- item 14: stop reading at the declared size --------------------------------------------------------------------

def oversized(which: str, *, announce: bool, extra: int = 400 * MB):
    def make(state, run, m):
        doc = artifact(state, run, m)
        target = next(la for la in doc["layers"] if la["annotations"][TITLE] == which)
        state.blobs[target["digest"]].extra = extra
        state.blobs[target["digest"]].announce = announce
    return make


def gzip_bomb(state, run, m):
    """package/launch/ as a tar.gz of ~70 KB whose one member is the listed run.sh (right size, right bytes) behind
    a 64 MB PAX header (tarfile reads a PAX header whole, before any member check can run)."""
    path = "package/launch/run.sh"
    data = (run / path).read_bytes()
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(path)
        info.size = len(data)
        info.pax_headers = {"comment": "x" * (64 * MB)}
        tar.addfile(info, io.BytesIO(data))
    bomb = raw.getvalue()
    assert len(bomb) < MB

    def edit(doc):
        doc["layers"] = [la for la in doc["layers"] if la["annotations"][TITLE] != path]
        doc["layers"].append(layer(state, "package/launch", bomb, "application/vnd.dsbuild.launch.v1" + TAR_SUFFIX))
    return artifact(state, run, m, edit=edit)


OVERSIZED = [
    ("blob-400MB-for-a-28-byte-layer-announced", oversized("plan/plan.json", announce=True), "the registry sends 419430420 bytes, the artifact manifest records 20"),
    ("blob-400MB-for-a-28-byte-layer-unannounced", oversized("plan/plan.json", announce=False), "the artifact manifest records 20; refusing to read past"),
    ("blob-one-byte-too-many", oversized("engines/rank0.safetensors", announce=False, extra=1), "the artifact manifest records 3000; refusing to read past"),
    ("manifest-json-layer-400MB", oversized("manifest.json", announce=False), "refusing to read past the recorded size"),
    ("gzip-bomb-tar-layer", gzip_bomb, "expands to more than its listed files hold"),
]


@pytest.mark.parametrize("name,make,words", [pytest.param(*c, id=c[0]) for c in OVERSIZED])
def test_pull_stops_reading_a_blob_at_its_declared_size(dsbuild, tmp_path, name, make, words):
    run = tmp_path / "run"
    m = synthetic_run(run)
    with hostile_registry(Hostile()) as state:
        make(state, run, m)
        proc = _pull(dsbuild, state, tmp_path)
        sent = state.sent_bytes
    message = assert_one_sentence(proc, name)
    assert proc.returncode == 11, proc.stderr
    assert words in message, message
    assert not (tmp_path / "dest").exists()
    # The client hung up early: the registry got at most a few MB of its 400 MB out (socket buffers included).
    assert sent < 64 * MB, sent
    record.add("bad_inputs", f"pull-{name}", exit_code=proc.returncode, message=message, item=14)


def test_oversized_manifest_and_error_bodies_are_not_read_whole(tmp_path):
    with hostile_registry(Hostile(manifest=b"{" + b" " * (32 * MB) + b"}")) as state:
        client = RegistryClient(parse_reference(f"oci://{state.address}/team/run:v1"), plain_http=True, retries=0)
        with pytest.raises(RegistryError, match="with more than 4194304 bytes; refusing to read on"):
            client.fetch_manifest()
    with hostile_registry(Hostile(error_body_bytes=256 * MB)) as state:
        client = RegistryClient(parse_reference(f"oci://{state.address}/team/run:v1"), plain_http=True, retries=0)
        with pytest.raises(RegistryError, match="with more than 4194304 bytes"):
            client.ping()
        assert state.sent_bytes < 64 * MB
    with hostile_registry(Hostile(blob_error_bytes=256 * MB)) as state:
        client = RegistryClient(parse_reference(f"oci://{state.address}/team/run:v1"), plain_http=True, retries=0)
        with pytest.raises(RegistryError, match="with more than 4194304 bytes"):
            client.download_blob_to(digest="sha256:" + "0" * 64, size=28, out=io.BytesIO(), title="plan/plan.json")
        assert state.sent_bytes < 64 * MB
    record.add("bad_inputs", "registry-32MB-manifest-and-256MB-error-bodies", exit_code=10, item=14,
               message="answered ... with more than 4194304 bytes; refusing to read on")


# --- item 15: push reads only safe relative paths inside the run ---------------------------------------------------

def _listing_with(run: Path, m: dict, stage: str, path: str, data: bytes) -> None:
    m["stages"][stage]["outputs"].append({"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})


def hostname_dotdot(run, m):
    data = Path("/etc/hostname").read_bytes() if Path("/etc/hostname").exists() else b""
    _listing_with(run, m, "build", "engines/../../../../../../../../etc/hostname", data)


def absolute(run, m):
    _listing_with(run, m, "build", "/etc/hostname", b"")


def other_stage_dir(run, m):
    _listing_with(run, m, "build", "package/Dockerfile", (run / "package/Dockerfile").read_bytes())


def symlinked_file_with_the_right_digest(run, m):
    secret = run.parent / "outside-secret.txt"
    secret.write_bytes(b"not part of the run\n")
    (run / "engines" / "leak.bin").symlink_to(secret)
    _listing_with(run, m, "build", "engines/leak.bin", secret.read_bytes())


def symlinked_directory(run, m):
    outside = run.parent / "outside"
    outside.mkdir()
    (outside / "f.bin").write_bytes(b"outside\n")
    (run / "engines" / "sub").symlink_to(outside)
    _listing_with(run, m, "build", "engines/sub/f.bin", b"outside\n")


def manifest_symlinked_out(run, m):
    real = run.parent / "elsewhere.json"
    real.write_text(json.dumps(m))
    os.unlink(run / "manifest.json")
    (run / "manifest.json").symlink_to(real)
    return True


def nul_in_path(run, m):
    _listing_with(run, m, "build", "engines/a\x00b", b"")


def stage_dir_dotdot(run, m):
    m["stages"]["build"]["dir"] = ".."


PUSH_CASES = [
    ("push-dotdot-etc-hostname", hostname_dotdot, 11, "lists an unsafe path: refusing path of stage build 'engines/../../../../../../../../etc/hostname': it would escape"),
    ("push-absolute-path", absolute, 11, "refusing path of stage build '/etc/hostname'"),
    ("push-path-of-another-stage", other_stage_dir, 11, "lists 'package/Dockerfile' for stage build, outside its directory engines/"),
    ("push-symlink-out-with-the-right-digest", symlinked_file_with_the_right_digest, 11, "engines/leak.bin is a symbolic link to"),
    ("push-symlinked-directory", symlinked_directory, 11, "engines/sub/f.bin lies under a symbolic link that leaves"),
    ("push-manifest-symlinked-out", manifest_symlinked_out, 11, "manifest.json is a symbolic link out of the run directory"),
    ("push-nul-in-path", nul_in_path, 11, "empty, NUL or backslash"),
    ("push-stage-dir-dotdot", stage_dir_dotdot, 11, "stages.build.dir: '..' does not match"),
]


@pytest.mark.parametrize("name,make,code,words", [pytest.param(*c, id=c[0]) for c in PUSH_CASES])
def test_push_reads_only_safe_paths_inside_the_run(dsbuild, tmp_path, name, make, code, words):
    run = tmp_path / "run"
    m = synthetic_run(run, write_manifest=True)
    if not make(run, m):
        (run / "manifest.json").write_text(json.dumps(m))
    with hostile_registry(Hostile()) as state:
        proc = dsbuild("push", str(run), f"oci://{state.address}/team/run:v1", "--plain-http", timeout=120)
        uploads = [r for r in state.requests if r.method in ("POST", "PATCH", "PUT")]
    message = assert_one_sentence(proc, name)
    assert proc.returncode == code, proc.stderr
    assert words in message, message
    assert not uploads, "push sent bytes before refusing"
    record.add("bad_inputs", name, exit_code=proc.returncode, message=message, item=15)


# --- item 16: where credentials may go ---------------------------------------------------------------------------

class _Recorder:
    """Stands in for the HTTP session: records every request, answers the registry with a Bearer challenge."""

    def __init__(self, challenge: str):
        self.challenge, self.calls = challenge, []

    def request(self, method, url, **kw):
        self.calls.append((method, url, dict(kw.get("headers") or {})))
        resp = requests.Response()
        resp.url = url
        resp.raw = __import__("io").BytesIO(b'{"token": "t0k"}')
        if "/v2/" in url and not (kw.get("headers") or {}).get("Authorization", "").startswith("Bearer"):
            resp.status_code = 401
            resp.headers["Www-Authenticate"] = self.challenge
        else:
            resp.status_code = 200
        return resp


REALMS = [
    # (id, registry, realm, credentials?, allowed)
    ("http-realm-on-another-host", "registry.example.com", "http://auth.example.net/token", True, False),
    ("http-realm-same-host-plain-http", "registry.example.com", "http://registry.example.com/token", True, False),
    ("http-loopback-realm-for-a-remote-registry", "registry.example.com", "http://127.0.0.1:5001/token", True, False),
    ("http-realm-on-another-host-loopback-registry", "127.0.0.1:5000", "http://auth.example.net/token", True, False),
    ("realm-with-user-info", "registry.example.com", "https://u:p@auth.example.net/token", True, False),
    ("ftp-realm", "registry.example.com", "ftp://auth.example.net/token", True, False),
    ("relative-realm", "registry.example.com", "/token", True, False),
    ("https-realm-on-another-host", "registry.example.com", "https://auth.example.net/token", True, True),
    ("https-realm-same-host", "registry.example.com", "https://registry.example.com/token", True, True),
    ("http-realm-both-on-this-machine", "127.0.0.1:5000", "http://localhost:5001/token", True, True),
    ("anonymous-http-realm-on-another-host", "registry.example.com", "http://auth.example.net/token", False, True),
]


@pytest.mark.parametrize("name,registry,realm,with_creds,allowed", [pytest.param(*c, id=c[0]) for c in REALMS])
def test_credentials_go_only_to_an_https_realm_or_this_machine(name, registry, realm, with_creds, allowed):
    env = {"DSBUILD_REGISTRY_USER": "carol", "DSBUILD_REGISTRY_PASSWORD": "pw-9f8e"} if with_creds else {"HOME": "/nonexistent"}
    client = RegistryClient(parse_reference(f"oci://{registry}/team/run:v1"), environ=env,
                            plain_http=registry.startswith("127."), retries=0)
    rec = _Recorder(f'Bearer realm="{realm}",service="reg",scope="repository:team/run:pull"')
    client.session = rec  # type: ignore[assignment]
    secret = base64.b64encode(b"carol:pw-9f8e").decode()
    if allowed:
        client.ping()
        token_calls = [c for c in rec.calls if "/token" in c[1]]
        assert token_calls and (("Basic " + secret) == token_calls[0][2].get("Authorization")) == with_creds
        record.add("checks", f"realm-{name}", item=16, detail="credentials sent as intended" if with_creds
                   else "anonymous token request, no secret")
    else:
        with pytest.raises(RegistryError) as err:
            client.ping()
        assert "pw-9f8e" not in str(err.value) and "u:p@" not in str(err.value)
        assert not any(secret in str(c[2]) for c in rec.calls), "credentials were sent"
        assert not any("/token" in c[1] for c in rec.calls), "the realm was contacted"
        record.add("bad_inputs", f"realm-{name}", exit_code=10, message=str(err.value), item=16)


class _RedirectingRealm(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def test_a_realm_redirecting_to_another_host_does_not_get_the_credentials_there(tmp_path):
    """requests drops Authorization when a redirect changes the host (http://127.0.0.1 -> http://localhost)."""
    seen: list[tuple[str, str | None]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            seen.append((self.headers.get("Host"), self.headers.get("Authorization")))
            if self.path.startswith("/v2/") and not (self.headers.get("Authorization") or "").startswith("Bearer"):
                body = b"{}"
                self.send_response(401)
                self.send_header("WWW-Authenticate", f'Bearer realm="http://127.0.0.1:{port}/token",service="s"')
            elif self.path.startswith("/token") and self.headers.get("Host", "").startswith("127.0.0.1"):
                body = b""
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{port}/token2")
            else:
                body = b'{"token": "t0k"}' if self.path.startswith("/token2") else b"{}"
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = _RedirectingRealm(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"DSBUILD_REGISTRY_USER": "carol", "DSBUILD_REGISTRY_PASSWORD": "pw-9f8e"}
        RegistryClient(parse_reference(f"oci://127.0.0.1:{port}/team/run:v1"), environ=env, plain_http=True,
                       retries=0).ping()
    finally:
        server.shutdown()
        server.server_close()
    redirected = [auth for host, auth in seen if host.startswith("localhost")]
    assert redirected == [None], seen
    assert any(auth and auth.startswith("Basic ") for host, auth in seen if host.startswith("127.0.0.1"))
    record.add("checks", "realm-redirect-to-another-host", item=16,
               detail="the redirected token request arrived without Authorization")

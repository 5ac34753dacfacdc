"""A registry on 127.0.0.1 that answers whatever a test tells it to: any manifest bytes, blobs longer than their
descriptors say, huge error bodies, Bearer challenges naming any realm. A real registry (distribution) refuses to
store a malformed manifest, so the attacks on ``dsbuild pull`` need this one; every request is recorded."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import io
import json
import socketserver
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from builder.publish.artifact import ARTIFACT_TYPE, CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, TITLE
from builder.publish.schema import OCI_MANIFEST


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Blob:
    data: bytes
    extra: int = 0  # bytes of zeros sent after ``data``: a registry that sends more than the descriptor says
    announce: bool = True  # send a Content-Length (of data + extra); else close-delimited


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None


@dataclass
class Hostile:
    manifest: bytes = b""
    blobs: dict[str, Blob] = field(default_factory=dict)
    challenge: str | None = None  # a WWW-Authenticate value; requests without "Bearer ok" get 401 with it
    error_body_bytes: int = 0  # when > 0: /v2/ answers 500 with a body this long
    blob_error_bytes: int = 0  # when > 0: every blob GET answers 500 with a body this long
    requests: list[Seen] = field(default_factory=list)
    sent_bytes: int = 0
    address: str = ""

    def add_blob(self, data: bytes, **kw: Any) -> str:
        digest = sha(data)
        self.blobs[digest] = Blob(data, **kw)
        return digest


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@contextlib.contextmanager
def hostile_registry(state: Hostile) -> Iterator[Hostile]:
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, *, extra: int = 0,
                  announce: bool = True) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if announce:
                self.send_header("Content-Length", str(len(body) + extra))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command == "HEAD":
                return
            try:
                self.wfile.write(body)
                with lock:
                    state.sent_bytes += len(body)
                zeros = b"\0" * (1 << 20)
                left = extra
                while left > 0:
                    n = min(left, len(zeros))
                    self.wfile.write(zeros[:n])
                    with lock:
                        state.sent_bytes += n
                    left -= n
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _route(self) -> None:
            with lock:
                state.requests.append(Seen(self.command, self.path, self.headers.get("Authorization")))
            if self.headers.get("Content-Length"):
                self.rfile.read(int(self.headers["Content-Length"]))
            if state.challenge and self.headers.get("Authorization") != "Bearer ok":
                return self._send(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                                  {"WWW-Authenticate": state.challenge, "Content-Type": "application/json"})
            if self.path.rstrip("/") == "/v2":
                if state.error_body_bytes:
                    return self._send(500, b"", extra=state.error_body_bytes)
                return self._send(200, b"{}", {"Content-Type": "application/json"})
            if "/manifests/" in self.path:
                return self._send(200, state.manifest, {"Content-Type": OCI_MANIFEST,
                                                        "Docker-Content-Digest": sha(state.manifest)})
            if "/blobs/" in self.path:
                if state.blob_error_bytes:
                    return self._send(500, b"", extra=state.blob_error_bytes)
                blob = state.blobs.get(self.path.rsplit("/", 1)[1])
                if blob is None:
                    return self._send(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}')
                return self._send(200, blob.data, {"Content-Type": "application/octet-stream"}, extra=blob.extra,
                                  announce=blob.announce)
            self._send(404, b"{}")

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _route

    server = _Server(("127.0.0.1", 0), Handler)
    state.address = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


# --- artifacts built by hand --------------------------------------------------------------------------------------

def tar_gz(members: list[tuple[str, bytes | None]]) -> bytes:
    """A tar.gz of regular files, or (data None) symbolic links to /etc/passwd; names may repeat: what a hostile
    artifact may hold."""
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def layer(state: Hostile, title: str, data: bytes, media_type: str = "application/vnd.dsbuild.file.v1",
          **blob: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": state.add_blob(data, **blob), "size": len(data),
            "annotations": {TITLE: title}}


def artifact(state: Hostile, run: Path, run_manifest: dict, *, stages: str = "plan,build,package",
             annotate: str | None = None, served_manifest: Any = None, extra_layers: list[dict] | None = None,
             edit: Any = None) -> dict[str, Any]:
    """A dsbuild artifact of ``run``: manifest.json first (``served_manifest`` in place of ``run_manifest`` if
    given), then one single-file layer per output ``run_manifest`` lists for ``stages`` (``annotate``: another
    io.dsbuild.stages value); ``edit(doc)`` may change the manifest document before it is served."""
    manifest_bytes = json.dumps(run_manifest if served_manifest is None else served_manifest).encode()
    layers = [layer(state, "manifest.json", manifest_bytes, MANIFEST_MEDIA_TYPE)]
    for stage in stages.split(","):
        for f in run_manifest["stages"][stage]["outputs"]:
            layers.append(layer(state, f["path"], (run / f["path"]).read_bytes()))
    layers += extra_layers or []
    config = b"{}"
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
           "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": state.add_blob(config), "size": len(config)},
           "layers": layers, "annotations": {"io.dsbuild.stages": stages if annotate is None else annotate}}
    if edit is not None:
        edit(doc)
    state.manifest = json.dumps(doc).encode()
    return doc

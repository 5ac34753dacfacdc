"""A real OCI registry for tests: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1, and two small
proxies that misbehave on purpose (one answers 500 to blob uploads, one drops the connection mid-upload)."""

from __future__ import annotations

import base64
import contextlib
import http.server
import re
import secrets
import shutil
import socket
import socketserver
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
SKOPEO_BIN = shutil.which("skopeo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalRegistry:
    address: str  # 127.0.0.1:PORT
    root: Path
    log_path: Path
    proc: subprocess.Popen = field(repr=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def completed_uploads(self) -> int:
        """Blob uploads the registry finished (PUT .../blobs/uploads/...?digest= answered 201), from its access log."""
        return len(re.findall(r'"PUT /v2/[^ ]+/blobs/uploads/[^ ]+ HTTP/1\.1" 201', self.log()))

    def patch_requests(self) -> int:
        return len(re.findall(r'"PATCH /v2/[^ ]+/blobs/uploads/', self.log()))


@contextlib.contextmanager
def run_registry(root: Path, *, htpasswd: tuple[str, str] | None = None) -> Iterator[LocalRegistry]:
    """Start a registry storing under ``root``; optional (user, password) turns on htpasswd (bcrypt) auth."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    auth = ""
    if htpasswd:
        import bcrypt

        user, password = htpasswd
        (root / "htpasswd").write_text(f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
        auth = f"auth:\n  htpasswd:\n    realm: dsbuild-test\n    path: {root / 'htpasswd'}\n"
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n{auth}")
    log_path = root / "registry.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    reg = LocalRegistry(address=f"127.0.0.1:{port}", root=root, log_path=log_path, proc=proc)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{reg.address}/v2/", timeout=2)
                break
            except urllib.error.HTTPError as exc:  # 401 from an auth-enabled registry: it is up
                if exc.code == 401:
                    break
                raise
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"docker-registry did not start:\n{reg.log()}") from None
                time.sleep(0.1)
        yield reg
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Proxy(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@contextlib.contextmanager
def run_proxy(upstream: str, *, fail_uploads_with: int | None = None, drop_after_patch_bytes: int | None = None,
              bearer: tuple[str, str] | None = None) -> Iterator[dict]:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream``. ``fail_uploads_with``: answer every blob-upload
    request with that status. ``drop_after_patch_bytes``: the first PATCH whose body would take the bytes
    forwarded past that many is cut off (connection closed without an answer), once. ``bearer=(user, password)``:
    the distribution token protocol as Harbor/GHCR speak it: ``/v2/`` answers 401 ``Bearer realm=.../token``,
    ``/token`` gives a token for those Basic credentials, requests carrying it pass. Yields counters."""
    state = {"dropped": 0, "failed": 0, "patch_bytes": 0, "address": "", "tokens_issued": 0, "token": ""}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def _answer(self, status: int, payload: bytes, headers: dict[str, str] | None = None):
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _relay(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if bearer:
                if self.path.startswith("/token"):
                    good = "Basic " + base64.b64encode(f"{bearer[0]}:{bearer[1]}".encode()).decode()
                    if self.headers.get("Authorization") != good:
                        return self._answer(401, b'{"details":"bad credentials"}')
                    with lock:
                        state["tokens_issued"] += 1
                        state["token"] = secrets.token_hex(16)
                    return self._answer(200, ('{"token":"%s"}' % state["token"]).encode())
                if not state["token"] or self.headers.get("Authorization") != f"Bearer {state['token']}":
                    challenge = (f'Bearer realm="http://{state["address"]}/token",service="test",'
                                 'scope="repository:dsbuild/tiny:pull,push"')
                    return self._answer(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                                        {"Www-Authenticate": challenge})
            if fail_uploads_with and "/blobs/uploads" in self.path:
                with lock:
                    state["failed"] += 1
                payload = b'{"errors":[{"code":"UNKNOWN","message":"storage backend unavailable"}]}'
                self.send_response(fail_uploads_with)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            if drop_after_patch_bytes is not None and self.command == "PATCH":
                with lock:
                    state["patch_bytes"] += len(body)
                    cut = not state["dropped"] and state["patch_bytes"] > drop_after_patch_bytes
                    if cut:
                        state["dropped"] += 1
                if cut:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            req = urllib.request.Request(f"http://{upstream}{self.path}", data=body if self.command in
                                         ("PUT", "POST", "PATCH") else None, method=self.command, headers=headers)
            try:
                resp = urllib.request.urlopen(req, timeout=60)
                status, rheaders, rbody = resp.status, resp.headers, resp.read()
            except urllib.error.HTTPError as exc:
                status, rheaders, rbody = exc.code, exc.headers, exc.read()
            self.send_response(status)
            for k, v in rheaders.items():
                if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                    if k.lower() == "location":
                        v = v.replace(upstream, state["address"])
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(rbody)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(rbody)

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _relay

    server = _Proxy(("127.0.0.1", 0), Handler)
    state["address"] = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()

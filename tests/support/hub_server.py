"""A local stand-in for the Hugging Face hub: the routes the real ``huggingface_hub`` 1.x client calls, with faults.

Routes (read from huggingface_hub 1.33: ``HfApi.model_info``, ``HfApi.list_repo_tree`` + ``utils._pagination``,
``file_download.get_hf_file_metadata`` / ``http_get``; see docs/upstream-facts.md#U-HFHUB-2):

* ``GET /api/models/{repo}/revision/{rev}`` -> ``{"id", "sha", "siblings": [{"rfilename"}], ...}``
* ``GET /api/models/{repo}/tree/{rev}?recursive=true`` -> ``[{"type": "file", "path", "size", "oid",
  "lfs": {"oid", "size", "pointerSize"}}]``, paginated with a ``Link: <...>; rel="next"`` header
* ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (``X-Linked-Etag`` and
  ``X-Linked-Size`` for LFS files), ``Content-Length``, ``Accept-Ranges``; ``Range: bytes=N-`` and ``bytes=N-M``
  answer 206 with exactly that span (``get_safetensors_metadata`` reads headers with ``bytes=0-100000``,
  docs/upstream-facts.md#U-HFHUB-1).
* Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``), which the
  client maps to its typed exceptions.

Faults are set per repository (:class:`Faults`) and every request is recorded (:attr:`HubServer.requests`, with the
body bytes sent) so tests can assert what the client actually did (e.g. that it resumed with a Range request, or that
a check read only headers: :meth:`HubServer.bytes_served`).
Only ever binds 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".png")
# The range reads of huggingface_hub's get_safetensors_metadata (docs/upstream-facts.md#U-HFHUB-1): header probes.
HEADER_PROBE = re.compile(r"^bytes=(0-100000|8-\d+)$")
TREE_PAGE = 5  # small, so that the client must follow the Link header over several pages


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ServedFile:
    path: str  # repository path
    source: Path
    size: int
    sha256: str
    blob_id: str  # for LFS files: sha1 of the pointer file, as on the hub
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class Faults:
    """What goes wrong for a repository. Counters are consumed by GET requests on ``resolve``."""

    drop_after: dict[str, int] = field(default_factory=dict)  # path -> close the connection after N body bytes...
    drop_times: dict[str, int] = field(default_factory=dict)  # ...this many times
    corrupt_times: dict[str, int] = field(default_factory=dict)  # path -> serve flipped bytes this many times
    # path (or "api/revision", "api/tree") -> answer 500 this many times
    error500_times: dict[str, int] = field(default_factory=dict)
    error429_times: dict[str, int] = field(default_factory=dict)  # path -> answer 429 (Retry-After: 1) this many times
    gated_token: str | None = None  # resolve needs "Authorization: Bearer <token>", else 401 GatedRepo
    extra_tree_entries: list[dict[str, Any]] = field(default_factory=list)  # e.g. a "../evil" path
    bytes_per_s: float | None = None  # throttle GET bodies (for kill -9 mid-download)


@dataclass
class ServedRepo:
    repo_id: str
    files: dict[str, ServedFile]
    refs: dict[str, str]  # branch/tag -> commit
    faults: Faults = field(default_factory=Faults)

    @property
    def commit(self) -> str:
        return self.refs["main"]


def served_repo(repo_id: str, root: Path, *, faults: Faults | None = None) -> ServedRepo:
    """Serve every file under ``root`` (recursively) as ``repo_id`` at one deterministic commit."""
    files: dict[str, ServedFile] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        lfs = rel.endswith(LFS_SUFFIXES)
        sha = file_sha256(p)
        size = p.stat().st_size
        if lfs:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n".encode()
            blob_id = git_blob_sha1(pointer)
        else:
            blob_id = git_blob_sha1(p.read_bytes())
        files[rel] = ServedFile(rel, p, size, sha, blob_id, lfs)
    commit = hashlib.sha1(json.dumps(sorted((f.path, f.etag) for f in files.values())).encode()).hexdigest()
    return ServedRepo(repo_id, files, {"main": commit}, faults or Faults())


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None
    status: int = 0
    body_bytes: int = 0  # bytes of the response body actually written


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, ServedRepo] = {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="hub-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, repo: ServedRepo) -> ServedRepo:
        with self.lock:
            self.repos[repo.repo_id] = repo
        return repo

    def start(self) -> "HubServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def gets(self, path_suffix: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.method == "GET" and r.path.endswith(path_suffix)]

    def transfers(self, path_suffix: str) -> list[Request]:
        """GETs of ``resolve`` paths ending with ``path_suffix`` that are not safetensors header probes."""
        return [r for r in self.gets(path_suffix) if not HEADER_PROBE.match(r.range or "")]

    def bytes_served(self, suffix: str = "") -> int:
        """Body bytes sent for ``resolve`` requests whose path ends with ``suffix`` (e.g. ``.safetensors``)."""
        with self.lock:
            return sum(r.body_bytes for r in self.requests if "/resolve/" in r.path and r.path.endswith(suffix))

    def _take(self, counters: dict[str, int], key: str) -> bool:
        with self.lock:
            if counters.get(key, 0) > 0:
                counters[key] -= 1
                return True
            return False


def _handler_for(server: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "dsbuild-test-hub/1"

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        # -- plumbing -----------------------------------------------------------------------------------------
        def _record(self, status: int) -> Request:
            req = Request(self.command, urlsplit(self.path).path, self.headers.get("Range"),
                          self.headers.get("Authorization"), status)
            with server.lock:
                server.requests.append(req)
            return req

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            req = self._record(status)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
                req.body_bytes = len(body)

        def _error(self, status: int, code: str | None, message: str) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message} if code else {"X-Error-Message": message}
            self._send(status, json.dumps({"error": message}).encode(), headers)

        def _json(self, obj: Any, headers: dict[str, str] | None = None) -> None:
            self._send(200, json.dumps(obj).encode(), headers)

        def _repo_and_rev(self, repo_id: str, rev: str) -> tuple[ServedRepo, str] | None:
            repo = server.repos.get(repo_id)
            if repo is None:
                self._error(401 if self.command != "HEAD" else 404, "RepoNotFound", "Repository not found")
                return None
            commit = repo.refs.get(rev) or (rev if rev == repo.commit else None)
            if commit is None:
                self._error(404, "RevisionNotFound", "Invalid rev id: " + rev)
                return None
            return repo, commit

        # -- routes -------------------------------------------------------------------------------------------
        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/")[1:]]
            query = parse_qs(url.query)
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
                return self._model_info("/".join(parts[2:4]), "/".join(parts[5:]))
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                return self._tree("/".join(parts[2:4]), parts[5], query)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
            self._error(404, None, "no such route")

        def _model_info(self, repo_id: str, rev: str) -> None:
            found = self._repo_and_rev(repo_id, rev)
            if found and server._take(found[0].faults.error500_times, "api/revision"):
                return self._error(500, None, "Internal Error")
            if found:
                repo, commit = found
                self._json({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                            "gated": "manual" if repo.faults.gated_token else False,
                            "siblings": [{"rfilename": p} for p in sorted(repo.files)]})

        def _tree(self, repo_id: str, rev: str, query: dict[str, list[str]]) -> None:
            found = self._repo_and_rev(repo_id, rev)
            if not found:
                return
            repo, commit = found
            if server._take(repo.faults.error500_times, "api/tree"):
                return self._error(500, None, "Internal Error")
            entries: list[dict[str, Any]] = []
            for f in sorted(repo.files.values(), key=lambda f: f.path):
                e: dict[str, Any] = {"type": "file", "path": f.path, "size": f.size, "oid": f.blob_id}
                if f.lfs:
                    e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
                entries.append(e)
            entries += repo.faults.extra_tree_entries
            start = int(query.get("cursor", ["0"])[0])
            page = entries[start:start + TREE_PAGE]
            headers = {}
            if start + TREE_PAGE < len(entries):
                nxt = (f"{server.url}/api/models/{repo_id}/tree/{quote(rev, safe='')}"
                       f"?recursive=true&cursor={start + TREE_PAGE}")
                headers["Link"] = f'<{nxt}>; rel="next"'
            self._json(page, headers)

        def _resolve(self, repo_id: str, rev: str, path: str) -> None:
            found = self._repo_and_rev(repo_id, rev)
            if not found:
                return
            repo, commit = found
            faults = repo.faults
            if faults.gated_token and self.headers.get("Authorization") != f"Bearer {faults.gated_token}":
                return self._error(401, "GatedRepo", "Access to model " + repo_id + " is restricted.")
            f = repo.files.get(path)
            if f is None:
                return self._error(404, "EntryNotFound", "Entry not found")
            rng = self.headers.get("Range")
            probe = bool(HEADER_PROBE.match(rng or ""))  # faults model transfers, not header reads
            if self.command == "GET" and not probe and server._take(faults.error500_times, path):
                return self._error(500, None, "Internal Error - We're working hard to fix this as soon as possible!")
            if self.command == "GET" and not probe and server._take(faults.error429_times, path):
                return self._send(429, b'{"error": "rate limited"}', {"Retry-After": "1"})
            start, stop = 0, f.size - 1
            if rng and rng.startswith("bytes="):
                first, _, last = rng[6:].split(",", 1)[0].partition("-")
                start = int(first or 0)
                stop = min(int(last), f.size - 1) if last else f.size - 1
            headers = {"X-Repo-Commit": commit, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"}
            if f.lfs:
                headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
            if start >= f.size and f.size > 0:
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{f.size}"})
            status = 206 if rng else 200
            if rng:
                headers["Content-Range"] = f"bytes {start}-{stop}/{f.size}"
            length = stop - start + 1
            if self.command == "HEAD":
                self._record(200)
                self.send_response(200)
                self.send_header("Content-Length", str(f.size))
                for k, v in headers.items():
                    if k != "Content-Range":
                        self.send_header(k, v)
                self.end_headers()
                return
            req = self._record(status)
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.flush()
            drop_at = None
            if path in faults.drop_after and not probe and server._take(faults.drop_times, path):
                drop_at = max(faults.drop_after[path] - start, 1)
            corrupt = not probe and server._take(faults.corrupt_times, path)
            req.body_bytes = self._body(f, start, length, drop_at=drop_at, corrupt=corrupt,
                                        bytes_per_s=faults.bytes_per_s)

        def _body(self, f: ServedFile, start: int, length: int, *, drop_at: int | None, corrupt: bool,
                  bytes_per_s: float | None) -> int:
            sock: socket.socket = self.connection
            send = min(length, drop_at) if drop_at is not None else length
            with open(f.source, "rb") as fh:
                if not corrupt and bytes_per_s is None:
                    sock.sendfile(fh, start, send)
                else:
                    fh.seek(start)
                    left, pos = send, start
                    chunk_size = 1 << 20 if bytes_per_s is None else max(int(bytes_per_s / 20), 1)
                    while left > 0:
                        chunk = bytearray(fh.read(min(left, chunk_size)))
                        if corrupt and pos <= f.size // 2 < pos + len(chunk):
                            chunk[f.size // 2 - pos] ^= 0xFF  # one flipped byte in the middle
                        sock.sendall(chunk)
                        left -= len(chunk)
                        pos += len(chunk)
                        if bytes_per_s:
                            time.sleep(len(chunk) / bytes_per_s)
            if drop_at is not None and send < length:
                self.close_connection = True
                sock.shutdown(socket.SHUT_RDWR)
            return send

    return Handler

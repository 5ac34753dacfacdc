"""Verified, resumable downloads from the Hugging Face hub (or any endpoint speaking its API), on ``huggingface_hub``.

Files land in the standard HF cache layout (``<cache>/models--owner--name/{blobs,snapshots,refs}``), so a checkpoint
already fetched by ``huggingface_hub`` or transformers is reused and ours is visible to them. Blobs are named by their
content hash (the LFS sha256, or the git blob sha1 for small files), so ``weights/`` can hard-link them.

What this adds over ``snapshot_download``:

* byte-level resume across processes: a transfer streams into ``blobs/<etag>.dsbuild.incomplete`` and a rerun (after a
  crash or ``kill -9``) continues from its length with an HTTP ``Range`` request (huggingface_hub 1.x only resumes
  within one call and discards a killed process's partial file);
* integrity: every byte is hashed while it is written, and a blob only gets its final name once its digest equals the
  oid in the repository tree listing; a mismatch deletes the file, downloads it once more, then fails naming it;
* a disk-space check before anything is downloaded, with the numbers;
* ``HF_HUB_OFFLINE``: the revision, the tree listing and the blobs all come from the cache, or the error names what
  is missing.

The token (``HF_TOKEN`` or the stored login) only ever travels inside ``huggingface_hub``'s request headers; nothing
here formats it, logs it, or writes it anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

import httpx
from filelock import FileLock
from huggingface_hub import HfApi, constants, get_session, hf_hub_url
from huggingface_hub import errors as hf
from huggingface_hub.hf_api import RepoFile as HfRepoFile
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status
from tqdm.auto import tqdm

from builder import redact
from builder.atomic import atomic_symlink, atomic_write_json, atomic_write_text, publish_file
from builder.errors import CheckpointError, DiskSpaceError, HubError, HubUnreachableError, UnsafePathError
from builder.model.selection import path_selected
from builder.paths import safe_relpath
from builder.retry import Backoff, retry

SHA256 = re.compile(r"^[0-9a-f]{64}$")
SHA1 = re.compile(r"^[0-9a-f]{40}$")
PARTIAL_SUFFIX = ".dsbuild.incomplete"
# Headroom kept free on every volume we write to: a download that would leave less than this is refused.
DISK_RESERVE_BYTES = 256 << 20
# Transient failures (HTTP 5xx, dropped connections that outlived huggingface_hub's own resume retries) are retried
# this many times per file, resuming each time from what is already on disk.
TRANSIENT_ATTEMPTS = 5
# What a dropped connection or a kill can lose of a file being downloaded (the stream is written in these pieces).
STREAM_CHUNK_BYTES = 1 << 20
# Testing hook: pretend every volume has this many free bytes (the probe is otherwise os.statvfs).
FREE_SPACE_ENV = "DSBUILD_FREE_SPACE_BYTES"


# ---------------------------------------------------------------------------------------------------------------
# What we talk to and where things go

@dataclass(frozen=True)
class HubRepo:
    """One repository on one endpoint, and the cache it is downloaded into."""

    repo_id: str
    cache_dir: Path
    endpoint: str
    offline: bool

    @property
    def storage(self) -> Path:
        return self.cache_dir / ("models--" + self.repo_id.replace("/", "--"))

    @property
    def blobs(self) -> Path:
        return self.storage / "blobs"

    @property
    def private_dir(self) -> Path:
        """dsbuild's own records beside the HF layout: tree listings and verification stamps."""
        return self.storage / ".dsbuild"

    def lock_path(self, etag: str) -> Path:
        # The same lock file huggingface_hub uses for this blob, so the two never write it at once.
        return self.cache_dir / ".locks" / self.storage.name / f"{etag}.lock"


def hub_repo(repo_id: str, *, cache_dir: Path | None = None) -> HubRepo:
    """``repo_id`` on ``HF_ENDPOINT`` (default huggingface.co), cached in ``cache_dir`` or ``HF_HUB_CACHE``."""
    redact.install()  # huggingface_hub's handler exists now: its retry lines must not show HF_ENDPOINT's user-info
    cache = Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE)
    return HubRepo(repo_id=repo_id, cache_dir=cache.expanduser(), endpoint=constants.ENDPOINT.rstrip("/"),
                   offline=bool(constants.HF_HUB_OFFLINE))


def shown_endpoint(endpoint: str) -> str:
    """``endpoint`` without any ``user:password@`` part, for messages and manifests."""
    parts = urlsplit(endpoint)
    if "@" not in parts.netloc:
        return endpoint
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


@dataclass(frozen=True)
class RepoFile:
    """A file of the repository tree at one commit."""

    path: str
    size: int
    blob_id: str  # git blob sha1
    sha256: str | None  # LFS oid; None for a small file stored in git

    @property
    def etag(self) -> str:
        """The cache blob name: what the hub's ETag / X-Linked-Etag carries for this file."""
        return self.sha256 or self.blob_id

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None


# ---------------------------------------------------------------------------------------------------------------
# Errors from huggingface_hub, as one sentence each

def hub_error(repo: HubRepo, exc: BaseException, *, what: str) -> HubError:
    where = shown_endpoint(repo.endpoint)
    name = f"{repo.repo_id} on {where}"
    if isinstance(exc, hf.GatedRepoError):
        return HubError(f"{repo.repo_id} is gated on {where}: accept its terms on the hub, then set HF_TOKEN "
                        "or run `hf auth login` with an account that has access")
    if isinstance(exc, hf.LocalEntryNotFoundError):  # offline, or the hub unreachable, and not in the cache
        if repo.offline:
            return HubError(f"{what}: HF_HUB_OFFLINE is set and the cache at {repo.cache_dir} does not have it")
        return HubUnreachableError(f"{what}: {where} cannot be reached and the cache at {repo.cache_dir} does not "
                                   "have it")
    if isinstance(exc, hf.RevisionNotFoundError):
        return HubError(f"{what}: revision not found in {name}")
    if isinstance(exc, hf.EntryNotFoundError):
        return HubError(f"{what}: the file is not in {name}")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return HubError(f"repository {name} does not exist, or it is private or gated and no valid token was sent "
                        "(set HF_TOKEN or run `hf auth login`)")
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return HubError(f"{what}: HF_HUB_OFFLINE is set and the cache at {repo.cache_dir} does not have it")
    if isinstance(exc, hf.HfHubHTTPError) and exc.response is not None:
        code = exc.response.status_code
        if code in (401, 403):
            return HubError(f"{what}: {name} refused the credentials (HTTP {code}); check HF_TOKEN or `hf auth login`")
        return HubError(f"{what}: {name} answered HTTP {code}")
    if isinstance(exc, (httpx.ConnectError, httpx.TimeoutException, httpx.NetworkError)):
        return HubUnreachableError(f"cannot reach the hub at {where} ({type(exc).__name__}) while trying to {what}; "
                        "check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use what is cached")
    return HubError(f"{what}: {type(exc).__name__} from {name}")


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, hf.HfHubHTTPError) and exc.response is not None:
        return exc.response.status_code >= 500 or exc.response.status_code in (408, 429)
    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError, _ShortRead))


def call_with_retries(fn: Callable[[], Any], *, repo: HubRepo, attempts: int = 4) -> Any:
    """``fn()``, retried with backoff while it fails transiently (HTTP 5xx/429, refused or dropped connections),
    saying so in one line per retry on stderr. This is the retry loop of every hub call: ``fn`` makes
    ``HfApi.model_info``/``list_repo_tree`` calls (one request each on ``get_session``), never ``hf_hub_download``,
    whose own ``http_backoff`` loop retries a dead hub five times over ~23 s with a log line each (only a tree
    listing's second and later pages go through that loop: docs/upstream-facts.md#U-HUB-RETRY-2)."""
    backoff = Backoff(attempts=attempts)

    def say(retry_number: int, exc: BaseException) -> None:
        print(f"hub: {_transient_cause(exc)} from {shown_endpoint(repo.endpoint)}; retry {retry_number + 1} of "
              f"{attempts - 1} in {backoff.delay(retry_number):g} s", file=sys.stderr, flush=True)

    return retry(fn, transient=is_transient, backoff=backoff, on_retry=say)


def _transient_cause(exc: BaseException) -> str:
    if isinstance(exc, hf.HfHubHTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code}"
    return type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# Revision and tree

def resolve_commit(repo: HubRepo, revision: str) -> str:
    """The commit sha ``revision`` points at (asked of the hub; offline, read from the cache's ``refs/``)."""
    if SHA1.match(revision):
        return revision
    ref_file = repo.storage / "refs" / safe_relpath(revision, what="revision")
    if repo.offline:
        if ref_file.is_file():
            sha = ref_file.read_text().strip()
            if SHA1.match(sha):
                return sha
        raise HubError(f"HF_HUB_OFFLINE is set and the cache at {repo.cache_dir} does not know which commit "
                       f"{repo.repo_id}@{revision} is; fetch it once online or pass --revision <commit sha>")
    try:
        info = call_with_retries(lambda: HfApi(endpoint=repo.endpoint).model_info(repo.repo_id, revision=revision),
                                 repo=repo)
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one sentence
        raise hub_error(repo, exc, what=f"resolve revision {revision!r} of {repo.repo_id}") from None
    sha = getattr(info, "sha", None)
    if not isinstance(sha, str) or not SHA1.match(sha):
        raise HubError(f"{shown_endpoint(repo.endpoint)} gave no valid commit sha for {repo.repo_id}@{revision}")
    if ref_file.is_file() and ref_file.read_text().strip() == sha:
        return sha
    atomic_write_text(ref_file, sha)
    return sha


def _parse_file(path: Any, size: Any, blob_id: Any, sha256: Any, *, repo: HubRepo) -> RepoFile:
    try:
        rel = safe_relpath(path, what=f"file name in the tree of {repo.repo_id}")
    except UnsafePathError as exc:
        raise UnsafePathError(f"{exc} (listed by {shown_endpoint(repo.endpoint)})") from None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise HubError(f"the tree of {repo.repo_id} gives {rel!r} an invalid size {size!r}")
    if not (isinstance(blob_id, str) and SHA1.match(blob_id)):
        raise HubError(f"the tree of {repo.repo_id} gives {rel!r} an invalid git oid {blob_id!r}")
    if sha256 is not None and not (isinstance(sha256, str) and SHA256.match(sha256)):
        raise HubError(f"the tree of {repo.repo_id} gives {rel!r} an invalid LFS sha256 {sha256!r}")
    return RepoFile(path=rel, size=size, blob_id=blob_id, sha256=sha256)


def list_files(repo: HubRepo, commit: str) -> list[RepoFile]:
    """Every file of the repository at ``commit`` with size and oids (cached per commit: commits are immutable)."""
    record = repo.private_dir / "trees" / f"{commit}.json"
    if record.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            rows = json.loads(record.read_text())
            return [_parse_file(r["path"], r["size"], r["blob_id"], r["sha256"], repo=repo) for r in rows]
    if repo.offline:
        raise HubError(f"HF_HUB_OFFLINE is set and the cache at {repo.cache_dir} has no file list for "
                       f"{repo.repo_id}@{commit}; fetch it once online")
    try:
        api = HfApi(endpoint=repo.endpoint)
        entries = call_with_retries(lambda: list(api.list_repo_tree(repo.repo_id, revision=commit, recursive=True)),
                                    repo=repo)
    except Exception as exc:  # noqa: BLE001
        raise hub_error(repo, exc, what=f"list the files of {repo.repo_id}@{commit[:12]}") from None
    files = [_parse_file(e.path, e.size, e.blob_id, e.lfs.sha256 if e.lfs else None, repo=repo)
             for e in entries if isinstance(e, HfRepoFile)]
    atomic_write_json(record, [asdict(f) for f in files])
    return files


@dataclass(frozen=True)
class RemoteTensor:
    """One tensor as the safetensors header on the hub describes it (no weight byte read)."""

    name: str
    dtype: str  # as safetensors names it ("BF16", "F8_E4M3", ...); checked by the caller
    shape: tuple[int, ...]
    file: str


def remote_tensors(repo: HubRepo, commit: str) -> dict[str, RemoteTensor]:
    """Every tensor of the repository at ``commit`` from its shard headers alone, through huggingface_hub's
    ``get_safetensors_metadata`` (the index, then HTTP range reads of each shard's first 100 kB and, for a longer
    header, the rest of it: docs/upstream-facts.md#U-HFHUB-1). Cached per commit. A tensor the index names but its
    shard's header lacks is returned with dtype "" (the caller reports it as missing)."""
    record = repo.private_dir / "headers" / f"{commit}.json"
    if record.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return {r["name"]: RemoteTensor(r["name"], r["dtype"], tuple(r["shape"]), r["file"])
                    for r in json.loads(record.read_text())}
    if repo.offline:
        raise HubError(f"HF_HUB_OFFLINE is set and the cache at {repo.cache_dir} has no safetensors headers for "
                       f"{repo.repo_id}@{commit[:12]}; fetch it once online")
    try:
        meta = call_with_retries(lambda: HfApi(endpoint=repo.endpoint).get_safetensors_metadata(
            repo.repo_id, revision=commit), repo=repo)
    except Exception as exc:  # noqa: BLE001 - parse errors and HTTP errors alike become one sentence
        if isinstance(exc, (hf.SafetensorsParsingError, hf.NotASafetensorsRepoError)):
            raise CheckpointError(f"{repo.repo_id}@{commit[:12]}: {exc}") from None
        raise hub_error(repo, exc, what=f"read the safetensors headers of {repo.repo_id}@{commit[:12]}") from None
    out: dict[str, RemoteTensor] = {}
    for file, fm in meta.files_metadata.items():
        for name, info in fm.tensors.items():
            out[name] = RemoteTensor(name, str(info.dtype), tuple(int(d) for d in info.shape), file)
    for name, file in meta.weight_map.items():
        if name not in out:
            out[name] = RemoteTensor(name, "", (), file)
    atomic_write_json(record, [asdict(t) for t in sorted(out.values(), key=lambda t: t.name)])
    return out


def select_files(files: Iterable[RepoFile], *, include: list[str], exclude: list[str]) -> list[RepoFile]:
    return [f for f in files if path_selected(f.path, include=include, exclude=exclude)]


# ---------------------------------------------------------------------------------------------------------------
# What is on disk

def _stamp_path(repo: HubRepo, etag: str) -> Path:
    return repo.private_dir / "verified" / f"{etag}.json"


def _stamp_of(blob: Path) -> dict[str, int]:
    st = blob.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def verified_sha256(repo: HubRepo, f: RepoFile) -> str | None:
    """The file's sha256 when its blob is present and was verified by us and not touched since; else None."""
    blob = repo.blobs / f.etag
    try:
        stamp = json.loads(_stamp_path(repo, f.etag).read_text())
        if stamp.get("stat") == _stamp_of(blob) and isinstance(stamp.get("sha256"), str):
            return stamp["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    return None


@dataclass
class FileState:
    file: RepoFile
    status: str  # "verified" | "unverified" (present, will be hashed) | "partial" | "missing"
    have_bytes: int


def file_states(repo: HubRepo, files: list[RepoFile]) -> list[FileState]:
    out = []
    for f in files:
        blob = repo.blobs / f.etag
        if blob.is_file() and blob.stat().st_size == f.size:
            out.append(FileState(f, "verified" if verified_sha256(repo, f) else "unverified", f.size))
            continue
        partial = blob.with_name(blob.name + PARTIAL_SUFFIX)
        have = partial.stat().st_size if partial.is_file() else 0
        out.append(FileState(f, "partial" if 0 < have <= f.size else "missing", have if have <= f.size else 0))
    return out


def bytes_needed(states: list[FileState]) -> int:
    return sum(s.file.size - s.have_bytes for s in states)


# ---------------------------------------------------------------------------------------------------------------
# Disk space

def free_bytes(path: Path) -> int:
    override = os.environ.get(FREE_SPACE_ENV)
    if override:
        return int(override)
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize


def device_of(path: Path) -> int:
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    return probe.stat().st_dev


def check_disk_space(needs: list[tuple[str, Path, int]]) -> None:
    """``needs``: (what, where, bytes). Volumes shared by several entries must hold their sum."""
    by_device: dict[int, list[tuple[str, Path, int]]] = {}
    for what, where, n in needs:
        by_device.setdefault(device_of(where), []).append((what, where, n))
    for entries in by_device.values():
        need = sum(n for _, _, n in entries)
        if need == 0:
            continue
        where = entries[0][1]
        free = free_bytes(where)
        if need + DISK_RESERVE_BYTES > free:
            parts = " + ".join(f"{what} at {w} {human_bytes(n)}" for what, w, n in entries if n)
            raise DiskSpaceError(
                f"not enough disk space: {parts} = {human_bytes(need)} ({need} bytes) still needed, but only "
                f"{human_bytes(free)} ({free} bytes) is free on that volume (keeping {human_bytes(DISK_RESERVE_BYTES)} "
                f"spare); free {human_bytes(need + DISK_RESERVE_BYTES - free)} or point --cache-dir / --out elsewhere")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ---------------------------------------------------------------------------------------------------------------
# Download

class _Digests:
    """sha256 of the content, plus the git blob sha1 (``sha1("blob <size>\\0" + content)``) for non-LFS files."""

    def __init__(self, f: RepoFile):
        self.hashers = {"sha256": hashlib.sha256()}
        if not f.is_lfs:
            self.hashers["sha1"] = hashlib.sha1(b"blob %d\0" % f.size)

    def update(self, chunk: bytes) -> None:
        for h in self.hashers.values():
            h.update(chunk)

    def hexdigests(self) -> dict[str, str]:
        return {a: h.hexdigest() for a, h in self.hashers.items()}


def _digest_prefix(path: Path, f: RepoFile, upto: int | None = None) -> _Digests:
    d = _Digests(f)
    with open(path, "rb") as src:
        left = os.fstat(src.fileno()).st_size if upto is None else upto
        while left > 0 and (chunk := src.read(min(left, 16 << 20))):
            d.update(chunk)
            left -= len(chunk)
    return d


class _Cancelled(Exception):
    """Raised inside a transfer when the fetch is being abandoned (Ctrl-C, or another file failed)."""


class _HashingFile:
    """The file ``_http_get`` writes into: every piece written is hashed on the way, so verification costs no second
    read. ``seek``/``truncate`` (the reaction to a server that ignored ``Range``) re-derive the hashes from what is
    left on disk."""

    def __init__(self, fh, f: RepoFile, cancel: threading.Event):
        self.fh, self.file, self.cancel = fh, f, cancel
        self.digests = _digest_prefix(Path(fh.name), f, fh.tell())

    def write(self, chunk: bytes) -> int:
        if self.cancel.is_set():  # stop within one chunk; what is on disk stays for the next run to resume
            raise _Cancelled()
        self.digests.update(chunk)
        return self.fh.write(chunk)

    def tell(self) -> int:
        return self.fh.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.fh.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        n = self.fh.truncate(size)
        self.fh.flush()
        self.digests = _digest_prefix(Path(self.fh.name), self.file, self.fh.tell() if size is None else size)
        return n


class _ShortRead(OSError):
    """The server ended a file's stream before its announced size (transient: the next attempt resumes)."""


def _http_get(url: str, sink: Any, *, resume_size: int, headers: dict[str, str], expected_size: int,
              on_bytes: Callable[[int], None]) -> None:
    """GET ``url`` from byte ``resume_size`` into ``sink`` on huggingface_hub's public HTTP client (its proxies, TLS
    settings and user agent), in pieces of ``STREAM_CHUNK_BYTES``: what a dropped connection or a kill loses of a
    file is at most one piece. A server that ignores ``Range`` (answers 200) restarts the file; a stream that ends
    short of ``expected_size`` raises ``_ShortRead``."""
    request_headers = dict(headers)
    if resume_size:
        request_headers["Range"] = f"bytes={resume_size}-"
    with get_session().stream("GET", url, headers=request_headers, follow_redirects=True,
                              timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as resp:
        if resp.status_code >= 400:
            resp.read()  # the error body names the problem (gated, missing, ...)
            hf_raise_for_status(resp)
        if resume_size and resp.status_code != 206:
            sink.seek(0)
            sink.truncate(0)
            resume_size = 0
        got = resume_size
        for piece in resp.iter_bytes(STREAM_CHUNK_BYTES):
            sink.write(piece)
            got += len(piece)
            on_bytes(len(piece))
    if got != expected_size:
        raise _ShortRead(f"{url} ended after {got} of {expected_size} bytes")


@dataclass
class FetchStats:
    files: int = 0
    downloaded_bytes: int = 0
    resumed_bytes: int = 0  # bytes of partial files continued rather than downloaded again
    reused_files: int = 0  # already in the cache (hashed now or verified before)
    hashed_existing: int = 0
    redownloaded: list[str] = field(default_factory=list)  # files whose digest mismatched once
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"files": self.files, "downloaded_bytes": self.downloaded_bytes, "resumed_bytes": self.resumed_bytes,
                "reused_files": self.reused_files, "hashed_existing": self.hashed_existing,
                "redownloaded": list(self.redownloaded), "retries": self.retries}


def _digest_ok(f: RepoFile, digests: dict[str, str]) -> bool:
    return digests["sha256"] == f.sha256 if f.is_lfs else digests["sha1"] == f.blob_id


def _write_stamp(repo: HubRepo, f: RepoFile, blob: Path, sha256: str) -> None:
    atomic_write_json(_stamp_path(repo, f.etag), {"sha256": sha256, "stat": _stamp_of(blob)})


def _link_snapshot(repo: HubRepo, commit: str, f: RepoFile) -> None:
    """``snapshots/<commit>/<path>`` -> ``../../blobs/<etag>``, as huggingface_hub lays out its cache."""
    link = repo.storage / "snapshots" / commit / f.path
    link.parent.mkdir(parents=True, exist_ok=True)
    atomic_symlink(os.path.relpath(repo.blobs / f.etag, link.parent), link)


def _transfer(repo: HubRepo, commit: str, f: RepoFile, partial: Path, stats: FetchStats,
              cancel: threading.Event, on_bytes: Callable[[int], None]) -> dict[str, str]:
    """Stream ``f`` into ``partial`` (continuing what is there), retrying transient failures; its digests."""
    url = hf_hub_url(repo.repo_id, f.path, revision=commit, endpoint=repo.endpoint)
    headers = build_hf_headers()  # token from HF_TOKEN or the stored login; never read or shown here
    headers["Accept-Encoding"] = "identity"  # byte ranges must address the file itself
    first = [True]

    def attempt() -> dict[str, str]:  # continues from whatever the previous attempt left in ``partial``
        have = partial.stat().st_size if partial.exists() else 0
        if have > f.size:  # longer than the file can be: start over
            partial.unlink()
            have = 0
        if first[0] and have:
            with stats.lock:
                stats.resumed_bytes += have
        first[0] = False
        if have and have == f.size:  # all there (a kill between the last write and the rename): nothing to ask
            return _digest_prefix(partial, f).hexdigests()  # for ``bytes=<size>-`` a server answers 416
        with open(partial, "ab") as raw:
            pass
        with open(partial, "r+b") as raw:
            raw.seek(have)
            sink = _HashingFile(raw, f, cancel)
            try:
                _http_get(url, sink, resume_size=have, headers=headers, expected_size=f.size, on_bytes=on_bytes)
            finally:
                raw.flush()
            if cancel.is_set():
                raise _Cancelled()
            os.fsync(raw.fileno())
        with stats.lock:
            stats.downloaded_bytes += f.size - have
        return sink.digests.hexdigests()

    def count(_retry: int, _exc: BaseException) -> None:
        with stats.lock:
            stats.retries += 1

    def transient(exc: BaseException) -> bool:
        return not cancel.is_set() and is_transient(exc)

    try:
        return retry(attempt, transient=transient, backoff=Backoff(attempts=TRANSIENT_ATTEMPTS), on_retry=count)
    except _Cancelled:
        raise
    except Exception as exc:  # noqa: BLE001 -- one sentence for whatever huggingface_hub raised
        if cancel.is_set():
            raise _Cancelled() from None
        what = f"download {f.path}" + (f" after {TRANSIENT_ATTEMPTS} attempts" if is_transient(exc) else "")
        raise hub_error(repo, exc, what=what) from None


def _fetch_one(repo: HubRepo, commit: str, f: RepoFile, stats: FetchStats, cancel: threading.Event,
               on_bytes: Callable[[int], None]) -> str:
    """Make ``blobs/<etag>`` hold exactly ``f``; return its sha256."""
    blob = repo.blobs / f.etag
    partial = blob.with_name(blob.name + PARTIAL_SUFFIX)
    repo.blobs.mkdir(parents=True, exist_ok=True)
    repo.lock_path(f.etag).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(repo.lock_path(f.etag))):
        if blob.is_file():
            known = verified_sha256(repo, f)
            if known:
                _link_snapshot(repo, commit, f)
                with stats.lock:
                    stats.reused_files += 1
                return known
            if blob.stat().st_size == f.size:
                digests = _digest_prefix(blob, f).hexdigests()
                with stats.lock:
                    stats.hashed_existing += 1
                if _digest_ok(f, digests):
                    _write_stamp(repo, f, blob, digests["sha256"])
                    _link_snapshot(repo, commit, f)
                    with stats.lock:
                        stats.reused_files += 1
                    return digests["sha256"]
            blob.unlink()  # wrong content under a content-addressed name: never trust it again
        if repo.offline:
            raise HubError(f"HF_HUB_OFFLINE is set and {f.path} of {repo.repo_id}@{commit[:12]} is not complete in "
                           f"the cache at {repo.cache_dir}")
        for attempt in (1, 2):
            digests = _transfer(repo, commit, f, partial, stats, cancel, on_bytes)
            if _digest_ok(f, digests):
                break
            got = digests["sha256"] if f.is_lfs else digests["sha1"]
            partial.unlink(missing_ok=True)
            if attempt == 2:
                raise CheckpointError(
                    f"{f.path} from {repo.repo_id}@{commit[:12]} failed verification twice: expected "
                    f"{'sha256' if f.is_lfs else 'git sha1'} {f.etag}, got {got}; the bad file was deleted")
            with stats.lock:
                stats.redownloaded.append(f.path)
        publish_file(partial, blob)
        _write_stamp(repo, f, blob, digests["sha256"])
        _link_snapshot(repo, commit, f)
        return digests["sha256"]


def download(repo: HubRepo, commit: str, files: list[RepoFile], *, workers: int,
             log: Callable[[str], None] = print, stats: FetchStats | None = None) -> dict[str, str]:
    """Fetch ``files`` with ``workers`` parallel transfers; returns path -> sha256 (all verified)."""
    stats = stats or FetchStats()
    if not files:
        return {}
    states = file_states(repo, files)
    total, have = sum(f.size for f in files), sum(s.have_bytes for s in states)
    digests: dict[str, str] = {}
    with tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=f"fetch {repo.repo_id}", leave=False,
              disable=None) as bar:
        bar_lock = threading.Lock()

        def on_bytes(n: int) -> None:
            with bar_lock:
                bar.update(n)
        cancel = threading.Event()
        pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(files))), thread_name_prefix="fetch")
        try:
            futures = {pool.submit(_fetch_one, repo, commit, f, stats, cancel, on_bytes): f for f in files}
            for fut in as_completed(futures):
                digests[futures[fut].path] = fut.result()
        except BaseException:
            # The first failure (or Ctrl-C) stops the other transfers within a chunk instead of letting them run
            # to the end of multi-GB files; their partial files stay and the next run resumes them.
            cancel.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    stats.files += len(files)
    return digests


def read_file(repo: HubRepo, name: str, *, revision: str = "main") -> Path:
    """The cache path of ``name`` at ``revision`` (config.json before a plan), downloaded through the same client,
    cache, verification and retries as a fetch. When the hub cannot be reached, the cache's copy for that
    revision stands in if there is one."""
    try:
        commit = resolve_commit(repo, revision)
    except HubUnreachableError:
        snapshot = _cached_snapshot(repo, revision)
        if snapshot is None or not (snapshot / name).is_file():
            raise
        return snapshot / name
    path = repo.storage / "snapshots" / commit / name
    if path.is_file():
        return path
    wanted = [f for f in list_files(repo, commit) if f.path == name]
    if not wanted:
        raise HubError(f"{repo.repo_id}@{commit[:12]} on {shown_endpoint(repo.endpoint)} has no {name}")
    download(repo, commit, wanted, workers=1)
    return path


def _cached_snapshot(repo: HubRepo, revision: str) -> Path | None:
    """The cache's snapshot directory of ``revision`` (a commit, or a ref the cache recorded), if known."""
    if SHA1.match(revision):
        return repo.storage / "snapshots" / revision
    ref = repo.storage / "refs" / safe_relpath(revision, what="revision")
    sha = ref.read_text().strip() if ref.is_file() else ""
    return repo.storage / "snapshots" / sha if SHA1.match(sha) else None


def blob_path(repo: HubRepo, f: RepoFile) -> Path:
    return repo.blobs / f.etag


__all__ = [
    "HubRepo", "RepoFile", "FileState", "FetchStats", "hub_repo", "hub_error", "is_transient", "call_with_retries",
    "read_file", "shown_endpoint", "resolve_commit", "list_files", "select_files", "file_states", "bytes_needed",
    "check_disk_space", "free_bytes", "device_of", "download", "blob_path", "human_bytes", "verified_sha256",
    "RemoteTensor", "remote_tensors",
]

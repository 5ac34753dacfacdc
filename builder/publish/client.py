"""A registry client on top of oras' ``Registry``, with what a multi-GB push needs that oras' own push lacks.

oras 0.2.43's ``Registry.push`` uploads each file with one ``PUT`` of ``fd.read()`` (the whole file in memory)
unless asked for chunks, retries every failure five times with sleeps of 2 + 3**n seconds (minutes before an
error surfaces), and resolves credentials only through its own backends (its token backend cannot answer the
``Basic`` challenge of an htpasswd registry). This subclass keeps oras' session, URL building, ``HEAD`` blob
check and manifest schema validation, and replaces the request path: credentials looked up once when a 401 asks for
them (Basic or Bearer-token challenge), a bounded retry of a whole blob upload on transient failures, chunked
``POST``/``PATCH``/``PUT`` uploads from a bounded buffer, and errors as one-sentence :class:`RegistryError`.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, BinaryIO, Callable, Mapping

import jsonschema
import oras.auth.utils
import oras.container
import oras.provider
import oras.schemas
import oras.utils
import requests

from builder.errors import RegistryError, VerificationError
from builder.publish.credentials import Credentials, find_credentials
from builder.publish.reference import OciReference, is_loopback_host
from builder.publish.schema import OCI_MANIFEST
from builder.retry import Backoff, retry
from builder.redact import redact_urls
from builder.safeio import dumps_json, parse_json

CHUNK_BYTES = 32 << 20  # one PATCH; also the most a transfer holds in memory
READ_BYTES = 1 << 20
MAX_RESPONSE_BYTES = 4 << 20  # any answer but a blob (manifest, token, error): dsbuild's bound (docs/hardening-facts.md OCI-1)
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 300
Progress = Callable[[int], None]


@dataclass
class TransferStats:
    blobs_uploaded: int = 0
    bytes_uploaded: int = 0
    blobs_skipped: int = 0
    bytes_skipped: int = 0
    upload_attempts_failed: int = 0
    upload_resumes: int = 0


def _oci_error(resp: requests.Response) -> str:
    """The first error of an OCI error body, shortened; empty when the body is not one."""
    try:
        first = (resp.json().get("errors") or [])[0]
        text = f"{first.get('code', '')}: {first.get('message', '')}".strip(": ")
    except (ValueError, AttributeError, IndexError, TypeError, KeyError, RecursionError,
            requests.exceptions.RequestException):
        return ""
    return text if len(text) <= 200 else text[:197] + "..."


def _tls_failure(registry: str, detail: str) -> str:
    """The sentence for a failed TLS handshake: a plain-HTTP registry (OpenSSL reads its HTTP answer as a TLS record
    of the wrong version) or a certificate that does not verify."""
    if "CERTIFICATE_VERIFY_FAILED" in detail or "certificate verify failed" in detail:
        return (f"the TLS certificate of {registry} does not verify; trust its CA (REQUESTS_CA_BUNDLE) or pass "
                "--insecure to skip verification")
    if "WRONG_VERSION_NUMBER" in detail or "wrong version number" in detail or "record layer failure" in detail:
        return (f"{registry} answers plain HTTP, not TLS: pass --plain-http (--insecure only skips TLS certificate "
                "verification, as in oras; it no longer means plain HTTP)")
    return f"TLS handshake with {registry} failed; for a plain-HTTP registry pass --plain-http"


class RegistryClient(oras.provider.Registry):
    def __init__(self, ref: OciReference, *, plain_http: bool = False, insecure: bool = False, retries: int = 3,
                 backoff_s: float = 0.5, chunk_bytes: int = CHUNK_BYTES, environ: Mapping[str, str] | None = None):
        """``plain_http``: http:// instead of https://; ``insecure``: TLS without certificate verification (the oras
        CLI's ``--plain-http`` and ``--insecure``: docs/upstream-facts.md#U-ORAS-3; oras-py's own ``insecure``
        argument means plain HTTP, hence the mapping)."""
        super().__init__(hostname=ref.registry, insecure=plain_http, tls_verify=not insecure)
        self.ref = ref
        self.container = oras.container.Container(ref.oras_target(), registry=ref.registry)
        self.retries = retries
        self.backoff = Backoff(attempts=retries + 1, base_s=backoff_s)
        self.chunk_bytes = chunk_bytes
        self.stats = TransferStats()
        self._environ = environ
        self._credentials: Credentials | None = None
        self._credentials_looked_up = False
        self._authorization: str | None = None

    # --- the request path -------------------------------------------------------------------------------------

    def _send(self, method: str, url: str, *, stream: bool = False, **kw: Any) -> requests.Response:
        """One request. The body is always streamed: unless the caller streams a successful answer itself (a blob,
        read up to its declared size), it is read here, at most :data:`MAX_RESPONSE_BYTES` (a manifest, a token, an
        error body), so no answer can fill memory or disk."""
        try:
            resp = self.session.request(method, url, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
                                        verify=self._tls_verify, allow_redirects=True, stream=True, **kw)
            if not stream or not resp.ok:
                self._read_bounded_body(resp, f"{method} {_path(url)}")
            return resp
        except requests.exceptions.SSLError as exc:
            raise RegistryError(_tls_failure(self.ref.registry, str(exc))) from None
        except requests.exceptions.ConnectionError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else "connection failed or was dropped"
            raise RegistryError(f"cannot reach registry {self.ref.registry} ({reason}) during "
                                f"{method} {_path(url)}", transient=True) from None
        except requests.exceptions.Timeout:
            raise RegistryError(f"registry {self.ref.registry} did not answer {method} {_path(url)} "
                                "in time", transient=True) from None
        except requests.exceptions.RequestException as exc:  # a broken chunked body, too many redirects, ...
            raise RegistryError(f"registry {self.ref.registry}: {method} {_path(url)} failed "
                                f"({type(exc).__name__})",
                                transient=isinstance(exc, requests.exceptions.ChunkedEncodingError)) from None

    def _read_bounded_body(self, resp: requests.Response, what: str) -> None:
        body = bytearray()
        for chunk in resp.iter_content(chunk_size=64 << 10):
            body += chunk
            if len(body) > MAX_RESPONSE_BYTES:
                resp.close()
                raise RegistryError(f"registry {self.ref.registry} answered {what} with more than "
                                    f"{MAX_RESPONSE_BYTES} bytes; refusing to read on")
        resp._content = bytes(body)  # where requests keeps a body it has read: .json() and .content use it

    def do_request(self, url: str, method: str = "GET", data: Any = None, headers: dict | None = None,
                   json: dict | None = None, stream: bool = False) -> requests.Response:  # noqa: A002 (oras' API)
        headers = dict(headers or {})
        if self._authorization:
            headers["Authorization"] = self._authorization
        resp = self._send(method, url, data=data, json=json, headers=headers, stream=stream)
        if resp.status_code != 401:
            return resp
        self._authorization = self._answer_challenge(resp)
        headers["Authorization"] = self._authorization
        resp = self._send(method, url, data=data, json=json, headers=headers, stream=stream)
        if resp.status_code == 401:
            creds = self._credentials
            assert creds is not None  # _answer_challenge raised otherwise
            raise RegistryError(f"registry {self.ref.registry} rejected the credentials of user {creds.username!r} "
                                f"(from {creds.source})")
        return resp

    def _answer_challenge(self, resp: requests.Response) -> str:
        if not self._credentials_looked_up:
            self._credentials = find_credentials(self.ref.registry, environ=self._environ)
            self._credentials_looked_up = True
        creds = self._credentials
        challenge = resp.headers.get("Www-Authenticate", "")
        scheme = challenge.split(" ", 1)[0].lower()
        if scheme == "basic":
            if creds is None:
                raise RegistryError(f"registry {self.ref.registry} requires credentials: set DSBUILD_REGISTRY_USER and "
                                    "DSBUILD_REGISTRY_PASSWORD, or log in with docker/oras")
            if self.prefix == "http" and not self.ref.is_loopback:
                raise RegistryError(f"refusing to send credentials to {self.ref.registry} over plain HTTP; use TLS")
            return creds.basic_header()
        if scheme == "bearer":
            return "Bearer " + self._request_token(oras.auth.utils.parse_auth_header(challenge), creds)
        raise RegistryError(f"registry {self.ref.registry} asks for an authentication scheme dsbuild does not "
                            f"speak ({scheme or 'none given'})")

    def _request_token(self, h: Any, creds: Credentials | None) -> str:
        # The distribution token protocol: GET realm?service=..&scope=.. with Basic credentials (or anonymously).
        realm = self._checked_realm(h.realm, creds)
        params = {k: v for k, v in (("service", h.service), ("scope", h.scope)) if v}
        headers = {"Authorization": creds.basic_header()} if creds else {}
        answer = self._send("GET", realm, params=params, headers=headers)
        if answer.status_code in (401, 403):
            who = f"user {creds.username!r} (from {creds.source})" if creds else "anonymous access"
            raise RegistryError(f"the token service of {self.ref.registry} refused {who}")
        if answer.status_code != 200:
            raise RegistryError(f"the token service of {self.ref.registry} answered HTTP {answer.status_code}")
        body = parse_json(answer.content, source=f"the token of {self.ref.registry}", error=RegistryError)
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token or len(token) > 16384:
            raise RegistryError(f"the token service of {self.ref.registry} gave no token")
        return token

    def _checked_realm(self, realm: Any, creds: Credentials | None) -> str:
        """The token service URL a Bearer challenge names, if dsbuild may send it the registry's credentials.

        Stricter than docker, containerd and oras, which send them to any realm (docs/hardening-facts.md AUTH-2):
        over HTTPS to any host (a separate auth host is the spec's own example), over plain HTTP only when the realm
        and the registry are both this machine; never to a realm carrying user-info of its own. Redirects from the
        realm to another host or scheme drop the Authorization header (requests' ``should_strip_auth``).
        Anonymous token requests carry no secret and may go anywhere a realm may."""
        parts = urlsplit(str(realm or ""))
        shown = f"{parts.scheme}://{parts.hostname}{parts.path}" if parts.hostname else redact_urls(str(realm))[:100]
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise RegistryError(f"registry {self.ref.registry} sent a Bearer challenge without a usable realm "
                                f"({shown!r})")
        if parts.username is not None or parts.password is not None:
            raise RegistryError(f"registry {self.ref.registry} names a token service with credentials of its own "
                                f"({redact_urls(str(realm))[:100]!r}); refusing it")
        if creds is not None and parts.scheme == "http" and not (is_loopback_host(parts.hostname)
                                                                 and self.ref.is_loopback):
            raise RegistryError(f"refusing to send the credentials for {self.ref.registry} to the token service "
                                f"{shown} over plain HTTP; dsbuild sends them over HTTP only when the registry and "
                                "its token service are both on this machine")
        return str(realm)

    def check(self, resp: requests.Response, what: str, ok: tuple[int, ...] = (200, 201, 202, 204)) -> requests.Response:
        if resp.status_code in ok:
            return resp
        detail = _oci_error(resp)
        msg = f"registry {self.ref.registry} answered HTTP {resp.status_code} {resp.reason} to {what}" + (
            f" ({detail})" if detail else "")
        if resp.status_code == 403:
            msg = f"registry {self.ref.registry} denied {what} (HTTP 403{': ' + detail if detail else ''})"
        raise RegistryError(msg, status=resp.status_code)

    # oras' helpers call this; keep its contract (raise on non-2xx) with our errors.
    def _check_200_response(self, response: requests.Response) -> None:
        self.check(response, f"{response.request.method} {_path(response.request.url or '')}")

    def with_retries(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn`` again after a transient failure, up to ``retries`` more times, with a short backoff."""
        def count(_retry: int, _exc: BaseException) -> None:
            self.stats.upload_attempts_failed += 1
        try:
            return retry(fn, transient=_is_transient, backoff=self.backoff, on_retry=count)
        except RegistryError as exc:
            if not exc.transient:
                raise
            self.stats.upload_attempts_failed += 1
            raise RegistryError(f"{what} failed after {self.backoff.attempts} attempts: {exc}",
                                status=exc.status) from None

    # --- API --------------------------------------------------------------------------------------------------

    def ping(self) -> None:
        resp = self.do_request(f"{self.prefix}://{self.ref.registry}/v2/", "GET")
        if resp.status_code == 404:
            raise RegistryError(f"{self.ref.registry} is not an OCI registry (no /v2/ endpoint)")
        self.check(resp, "GET /v2/")

    def has_blob(self, digest: str) -> bool:
        resp = self.do_request(f"{self.prefix}://{self.container.get_blob_url(digest)}", "HEAD")
        if resp.status_code == 404:
            return False
        self.check(resp, f"HEAD blob {digest[:19]}")
        return True

    def push_blob(self, *, path: Path, digest: str, size: int, title: str, progress: Progress | None = None) -> bool:
        """Upload ``path`` as blob ``digest`` unless the registry has it; True when bytes were sent."""
        if self.with_retries(lambda: self.has_blob(digest), f"checking {title}"):
            self.stats.blobs_skipped += 1
            self.stats.bytes_skipped += size
            if progress:
                progress(size)
            return False
        sent = [0]

        def attempt() -> None:
            if progress and sent[0]:
                progress(-sent[0])  # a retried upload starts over
            sent[0] = 0

            def count(n: int) -> None:
                sent[0] += n
                if progress:
                    progress(n)
            self._chunked_upload(path=path, digest=digest, size=size, title=title, on_bytes=count)
        self.with_retries(attempt, f"uploading {title}")
        self.stats.blobs_uploaded += 1
        self.stats.bytes_uploaded += size
        return True

    def _chunked_upload(self, *, path: Path, digest: str, size: int, title: str, on_bytes: Progress) -> None:
        # OCI distribution spec, "Pushing a blob in chunks": POST a session, PATCH each chunk with Content-Range,
        # PUT ?digest= to close it. The registry recomputes the digest and refuses a mismatch. A chunk cut off by a
        # dropped connection or a 5xx is resumed from the offset the registry reports for the session (GET on the
        # session URL answers ``Range: 0-<last byte>``), so a 40 GB rank shard is not re-sent from its start.
        start = self.check(self.do_request(f"{self.prefix}://{self.container.upload_blob_url()}", "POST",
                                           headers={"Content-Length": "0"}), f"starting the upload of {title}")
        location = self._get_location(start, self.container)
        if not location:
            raise RegistryError(f"registry {self.ref.registry} started an upload without a Location header")
        offset = 0
        resumes = 0
        with open(path, "rb") as fh:
            while chunk := fh.read(self.chunk_bytes):
                headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(chunk)),
                           "Content-Range": f"{offset}-{offset + len(chunk) - 1}"}
                try:
                    resp = self.check(self.do_request(location, "PATCH", data=chunk, headers=headers),
                                      f"uploading {title}")
                except RegistryError as exc:
                    if not exc.transient or resumes == self.retries:
                        raise
                    self.stats.upload_resumes += 1
                    time.sleep(self.backoff.delay(resumes))
                    resumes += 1
                    location, committed = self._upload_status(location, title)
                    if committed > offset + len(chunk):
                        raise RegistryError(f"the registry reports more of {title} than was sent",
                                            transient=True) from None
                    on_bytes(committed - offset)
                    offset = committed
                    fh.seek(offset)
                    continue
                location = self._get_location(resp, self.container) or location
                offset += len(chunk)
                on_bytes(len(chunk))
                del chunk, resp  # the response keeps its request body: drop both before reading the next chunk
        if offset != size:
            raise VerificationError(f"{title} is {offset} bytes on disk but manifest.json records {size}; the run "
                                    "directory changed after it was built")
        close = oras.utils.append_url_params(location, {"digest": digest})
        resp = self.do_request(close, "PUT", headers={"Content-Length": "0"})
        if resp.status_code == 400 and "DIGEST_INVALID" in _oci_error(resp):
            raise VerificationError(f"{title} does not match its sha256 in manifest.json (the registry computed a "
                                    "different digest); the run directory changed after it was built")
        self.check(resp, f"finishing the upload of {title}")

    def _upload_status(self, location: str, title: str) -> tuple[str, int]:
        """(session URL, bytes the registry holds) of an upload session."""
        resp = self.check(self.do_request(location, "GET"), f"asking how much of {title} arrived", ok=(204, 200))
        last = resp.headers.get("Range", "0-0").rpartition("-")[2]
        # distribution answers "0-0" for an empty session and "0-N" (inclusive) otherwise.
        committed = int(last) + 1 if last.isdigit() and int(last) > 0 else 0
        return self._get_location(resp, self.container) or location, committed

    def put_manifest(self, manifest: dict[str, Any], *, tag: str) -> str:
        """Upload an image manifest under ``tag``; returns its digest (``sha256:...``)."""
        jsonschema.validate(manifest, schema=oras.schemas.manifest)  # oras' OCI image-manifest schema
        body = dumps_json(manifest, compact=True, sort_keys=True).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        url = f"{self.prefix}://{self.container.manifest_url(tag)}"

        def put() -> requests.Response:
            return self.check(self.do_request(url, "PUT", data=body, headers={"Content-Type": OCI_MANIFEST}),
                              f"PUT manifest {self.ref.repository}:{tag}")
        resp = self.with_retries(put, "uploading the manifest")
        answered = resp.headers.get("Docker-Content-Digest")
        if answered and answered != digest:
            raise VerificationError(f"registry stored the manifest as {answered}, not {digest}")
        return digest

    def fetch_manifest(self) -> tuple[dict[str, Any], str]:
        """(manifest, digest) for the reference's tag or digest, checked against a pinned digest."""
        url = f"{self.prefix}://{self.container.manifest_url(self.ref.reference)}"

        def get() -> requests.Response:
            resp = self.do_request(url, "GET", headers={"Accept": OCI_MANIFEST})
            if resp.status_code == 404:
                raise RegistryError(f"{self.ref} does not exist in the registry ({_oci_error(resp) or 'HTTP 404'})")
            return self.check(resp, f"GET manifest {self.ref}")
        resp = self.with_retries(get, f"reading {self.ref}")
        digest = "sha256:" + hashlib.sha256(resp.content).hexdigest()
        if self.ref.digest and digest != self.ref.digest:
            raise VerificationError(f"registry answered {self.ref} with a manifest whose digest is {digest}")
        manifest = parse_json(resp.content, source=f"the manifest of {self.ref}", error=RegistryError)
        if isinstance(manifest, dict) and manifest.get("mediaType") not in (OCI_MANIFEST, None):
            raise RegistryError(f"{self.ref} is not an OCI image manifest (an index or a Docker v2 image?)")
        return manifest, digest

    def download_blob_to(self, *, digest: str, size: int, out: BinaryIO, title: str,
                         progress: Progress | None = None) -> None:
        """Stream blob ``digest`` into ``out``, hashing as it goes; a mismatch is a VerificationError."""
        def too_long(n: int | str) -> VerificationError:
            return VerificationError(f"{title}: the registry sends {n} bytes, the artifact manifest records {size}; "
                                     "refusing to read past the recorded size")

        def attempt() -> None:
            out.seek(0)
            out.truncate()
            h = hashlib.sha256()
            got = 0
            with self.check(self.do_request(f"{self.prefix}://{self.container.get_blob_url(digest)}", "GET",
                                            stream=True), f"downloading {title}") as resp:
                announced = resp.headers.get("Content-Length", "")
                if announced.isdigit() and int(announced) > size:
                    raise too_long(announced)
                try:
                    for block in resp.iter_content(chunk_size=READ_BYTES):
                        if got + len(block) > size:  # never write (or keep reading) past what the manifest says
                            raise too_long(f"more than {got + len(block)}")
                        h.update(block)
                        out.write(block)
                        got += len(block)
                        if progress:
                            progress(len(block))
                except requests.exceptions.RequestException:
                    if progress:
                        progress(-got)
                    raise RegistryError(f"the download of {title} was cut off", transient=True) from None
            if got != size or "sha256:" + h.hexdigest() != digest:
                raise VerificationError(f"{title}: the registry sent {got} bytes with sha256:{h.hexdigest()[:12]}..., "
                                        f"the artifact manifest records {size} bytes with {digest[:19]}...")
        self.with_retries(attempt, f"downloading {title}")


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, RegistryError) and exc.transient


def _path(url: str) -> str:
    return "/" + url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]

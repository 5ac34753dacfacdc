"""``oci://REGISTRY/REPOSITORY[:TAG|@DIGEST]`` references, parsed strictly.

The grammar is the OCI distribution spec's (repository components, tag and digest patterns) with Docker's rule
for telling a registry host from a repository component: the first component is a registry only when it has a
``.`` or a ``:`` or is ``localhost``. dsbuild never guesses ``docker.io``: the registry must be explicit.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from builder.errors import RegistryError
from builder.redact import redact_urls

SCHEME = "oci://"
# OCI distribution spec, "Pulling manifests": <name> and <reference> patterns.
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_HOST = re.compile(r"(?:\[[0-9a-fA-F:]+\]|[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*)"
                   r"(?::[0-9]{1,5})?")


def is_loopback_host(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (with or without IPv6 brackets): this machine."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class OciReference:
    registry: str  # host[:port]
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def host(self) -> str:
        return self.registry.rsplit(":", 1)[0] if not self.registry.endswith("]") else self.registry

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    @property
    def reference(self) -> str:
        """The manifest reference: the digest when pinned, else the tag."""
        ref = self.digest or self.tag
        if ref is None:
            raise RegistryError(f"{self} names no tag or digest")
        return ref

    def with_tag(self, tag: str) -> "OciReference":
        if not _TAG.fullmatch(tag):
            raise RegistryError(f"invalid tag {tag!r}: tags are up to 128 of [A-Za-z0-9_.-], not starting with . or -")
        return OciReference(self.registry, self.repository, tag=tag)

    def oras_target(self) -> str:
        """The ``host/repo:tag`` or ``host/repo@digest`` string oras' Container parser takes."""
        return f"{self.registry}/{self.repository}" + (f"@{self.digest}" if self.digest else f":{self.tag}")

    def __str__(self) -> str:
        suffix = (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")
        return f"{SCHEME}{self.registry}/{self.repository}{suffix}"


def parse_reference(text: str, *, require_tag: bool = False, allow_digest: bool = True) -> OciReference:
    """Parse ``oci://REGISTRY/REPO[:TAG|@sha256:...]``; every malformed part is a RegistryError naming it.
    A reference carrying ``user:password@`` is refused, and its credentials are never repeated in the message."""
    shown = redact_urls(text)
    if shown != text:
        raise RegistryError(f"reference {shown!r} carries credentials; dsbuild takes them from DSBUILD_REGISTRY_USER "
                            "and DSBUILD_REGISTRY_PASSWORD or the docker config, never from a reference")
    if not text.startswith(SCHEME):
        raise RegistryError(f"reference {text!r} must start with {SCHEME} (e.g. oci://registry.example.com/team/model:tag)")
    rest = text[len(SCHEME):]
    registry, slash, path = rest.partition("/")
    if not slash or not path:
        raise RegistryError(f"reference {text!r} names no repository after the registry")
    if not _HOST.fullmatch(registry) or not ("." in registry or ":" in registry or registry == "localhost"):
        raise RegistryError(f"reference {text!r} has no valid registry host: {registry!r} must be a host name with a "
                            "dot or a port, or localhost")
    port = registry.rsplit(":", 1)[1] if ":" in registry and not registry.endswith("]") else None
    if port is not None and not 0 < int(port) < 65536:
        raise RegistryError(f"reference {text!r} has an invalid port {port}")
    digest = None
    if "@" in path:
        path, _, digest = path.partition("@")
        if not allow_digest:
            raise RegistryError(f"reference {text!r} pins a digest; push needs a tag (the digest is the registry's "
                                "answer, not an input)")
        if not _DIGEST.fullmatch(digest):
            raise RegistryError(f"reference {text!r} has an invalid digest {digest!r} (expected sha256:<64 hex>)")
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
        if not _TAG.fullmatch(tag):
            raise RegistryError(f"reference {text!r} has an invalid tag {tag!r}: tags are up to 128 of "
                                "[A-Za-z0-9_.-], not starting with . or -")
    for comp in path.split("/"):
        if not _COMPONENT.fullmatch(comp):
            raise RegistryError(f"reference {text!r} has an invalid repository component {comp!r}: lower-case "
                                "letters, digits and single separators (. _ __ -) only")
    if len(registry) + 1 + len(path) > 255:
        raise RegistryError(f"reference {text!r}: the repository name is longer than 255 characters")
    if require_tag and tag is None and digest is None:
        raise RegistryError(f"reference {text!r} names no tag or digest; pull needs one (e.g. {text}:TAG)")
    return OciReference(registry=registry, repository=path, tag=tag, digest=digest)

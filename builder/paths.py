"""Repository-relative paths from untrusted sources (indexes, tree listings, manifests, tar members).

Torch-free on purpose: `dsbuild pull` and the hub client use it without paying torch's start-up."""

from __future__ import annotations

from pathlib import PurePosixPath

from builder.errors import UnsafePathError


def safe_relpath(name: str, *, what: str = "file name") -> str:
    """``name`` as a relative POSIX path that cannot escape its directory: not empty or absolute, no ``..``, no
    empty part, NUL or backslash."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise UnsafePathError(f"refusing {what} {name!r}: empty, NUL or backslash")
    p = PurePosixPath(name)
    if p.is_absolute() or any(part in ("..", "") for part in name.split("/")):
        raise UnsafePathError(f"refusing {what} {name!r}: it would escape the target directory")
    return str(p)

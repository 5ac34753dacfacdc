"""Atomic file, symlink and directory writes: nothing half-written ever carries its final name.

The one place for temp-then-rename in dsbuild. A file is written under ``.NAME.tmp-*`` in its own directory,
fsync-ed, given the usual permissions and renamed over its final name; a directory is staged as ``.NAME.tmp-*``
and swapped in with one rename; a symlink is created under a temporary name and renamed. Whatever a killed process
leaves is a dot-name with ``.tmp-`` or ``.old-`` that :func:`remove_stale_temporaries` recognises.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from builder.safeio import dumps_json


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_name(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller (or a library) to write; on success it is fsync-ed
    (``fsync=False``: the writer already did), made world-readable per the umask and renamed to ``path``. On any
    failure the temporary is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; final files get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file object whose content appears under ``path`` only when the block completes."""
    with atomic_path(path, fsync=False) as tmp, open(tmp, "wb") as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON (no NaN/Infinity: see :func:`builder.safeio.dumps_json`), written atomically."""
    atomic_write_text(path, dumps_json(obj) + "\n")


def atomic_symlink(target: str | Path, link: str | Path, *, only_over_symlink: bool = False) -> None:
    """Point ``link`` at ``target`` in one rename (a reader sees the old link or the new one, never none).
    ``only_over_symlink``: a ``link`` that exists and is not a symbolic link (someone's file or directory) is
    never replaced: FileExistsError, checked again right before the rename."""
    link = Path(link)
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(link)
    os.unlink(tmp)  # mkstemp reserved the name; a symlink takes its place
    try:
        os.symlink(target, tmp)
        if only_over_symlink and os.path.lexists(link) and not link.is_symlink():
            raise FileExistsError(f"{link} exists and is not a symbolic link")
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(link.parent)


def publish_file(done: Path, final: Path) -> None:
    """Rename a finished, fsync-ed file (e.g. a resumable ``.partial`` download) to its final name."""
    os.chmod(done, 0o666 & ~_umask())
    os.replace(done, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def staging_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``final``; on success it replaces ``final`` in one rename.

    An existing ``final`` is moved aside first and removed only after the new one is in place, so a crash leaves
    either the old or the new directory under the final name, never a mix. On failure the temporary is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(src: Path, final: Path) -> None:
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(src, final)
    fsync_dir(final.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def is_temporary(name: str) -> bool:
    """A name this module (or an older dsbuild) gives to work in progress."""
    return name.startswith(".") and (".tmp-" in name or ".old-" in name or name.endswith(".tmp"))


def remove_stale_temporaries(parent: str | Path) -> list[Path]:
    """Delete ``.NAME.tmp-*`` / ``.NAME.old-*`` left by a killed process (called under the run lock)."""
    removed = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        if is_temporary(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
    return removed


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src``; across filesystems a symlink (over 64 MB) or a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        if src.stat().st_size > (64 << 20):
            os.symlink(src.resolve(), dst)
        else:
            shutil.copy2(src, dst)

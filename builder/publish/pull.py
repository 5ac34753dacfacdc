"""``dsbuild pull``: a deployment artifact back into a run directory, every file verified against manifest.json.

Everything is written into a temporary directory beside the destination and renamed into place only when every
layer's digest and every file's sha256 (as recorded in the run's ``manifest.json``) has been checked, so an
interrupted or failed pull leaves nothing under the destination's name.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping

from builder.atomic import staging_dir
from builder.errors import DiskSpaceError, RegistryError, VerificationError
from builder.paths import safe_relpath
from builder.pipeline import MANIFEST
from builder.publish.artifact import (ARTIFACT_TYPE, CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, ORAS_DIGEST, READ_BYTES,
                                     TAR_SUFFIX, TITLE, HashingReader)
from builder.publish.client import Progress, RegistryClient, TransferStats
from builder.publish.reference import OciReference

MAX_MANIFEST_BYTES = 64 << 20


@dataclass
class PullResult:
    reference: str
    digest: str
    out: str
    files: int
    total_bytes: int
    stats: TransferStats
    wall_s: float


def _refuse_existing(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise RegistryError(f"{out} exists and is not a directory; refusing to overwrite it")
    if out.is_dir() and any(out.iterdir()):
        raise RegistryError(f"{out} is not empty; pull into a new or empty directory")


def _layers(manifest: Mapping[str, Any], ref: OciReference) -> list[dict[str, Any]]:
    if manifest.get("artifactType") != ARTIFACT_TYPE and (manifest.get("config") or {}).get("mediaType") != CONFIG_MEDIA_TYPE:
        raise RegistryError(f"{ref} is not a dsbuild deployment (artifactType {manifest.get('artifactType')!r})")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        raise RegistryError(f"{ref} has no layers")
    for layer in layers:
        if not isinstance(layer, dict) or not isinstance(layer.get("size"), int) or layer["size"] < 0 \
                or not str(layer.get("digest", "")).startswith("sha256:"):
            raise RegistryError(f"{ref} has a malformed layer descriptor")
        title = (layer.get("annotations") or {}).get(TITLE)
        layer["_title"] = safe_relpath(title if isinstance(title, str) else "", what="layer title")
    return layers


def _expected_files(run_manifest: Mapping[str, Any], stage_names: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for s in stage_names:
        entry = (run_manifest.get("stages") or {}).get(s)
        if entry is None:
            raise VerificationError(f"the artifact says it holds stage {s}, which its manifest.json does not list")
        for f in entry.get("outputs", []):
            out[safe_relpath(f["path"], what="manifest path")] = f
    return out


def pull_run(*, ref: OciReference, out: Path, plain_http: bool = False, insecure: bool = False,
             environ: Mapping[str, str] | None = None, log: Callable[[str], None] = print,
             progress: Callable[[int], Progress] | None = None) -> PullResult:
    if not (ref.tag or ref.digest):
        raise RegistryError(f"{ref} names no tag or digest; pull needs one")
    t0 = time.perf_counter()
    _refuse_existing(out)
    client = RegistryClient(ref, plain_http=plain_http, insecure=insecure, environ=environ)
    manifest, digest = client.fetch_manifest()
    layers = _layers(manifest, ref)
    stage_names = [s for s in (manifest.get("annotations") or {}).get("io.dsbuild.stages", "").split(",") if s]
    manifest_layers = [layer for layer in layers if layer["mediaType"] == MANIFEST_MEDIA_TYPE]
    if len(manifest_layers) != 1 or manifest_layers[0]["_title"] != MANIFEST:
        raise RegistryError(f"{ref} does not carry exactly one {MANIFEST} layer")
    if manifest_layers[0]["size"] > MAX_MANIFEST_BYTES:
        raise RegistryError(f"{ref}: its {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    total = sum(layer["size"] for layer in layers)
    hook = progress(total) if progress else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(out) as tmp:
        _download(client, manifest_layers[0], tmp / MANIFEST, hook)
        try:
            run_manifest = json.loads((tmp / MANIFEST).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise VerificationError(f"the {MANIFEST} in {ref} is not valid JSON") from None
        expected = _expected_files(run_manifest, stage_names)
        need = sum(f["size"] for f in expected.values()) + max((la["size"] for la in layers), default=0)
        free = shutil.disk_usage(tmp).free
        if free < need:
            raise DiskSpaceError(f"pulling {ref} needs about {need / 1e9:.1f} GB under {out.parent}, "
                                 f"{free / 1e9:.1f} GB are free")
        seen: set[str] = set()
        for layer in layers:
            if layer is manifest_layers[0]:
                continue
            title = layer["_title"]
            if layer["mediaType"].endswith(TAR_SUFFIX):
                seen |= _pull_tar(client, layer, tmp, expected, hook)
            else:
                f = expected.get(title)
                if f is not None and layer["digest"] != "sha256:" + f["sha256"]:
                    raise VerificationError(f"{title}: the artifact's layer digest {layer['digest'][:19]}... differs "
                                            f"from the sha256 manifest.json records for it")
                if f is None and PurePosixPath(title).parts[0] in {e.split('/')[0] for e in expected}:
                    raise VerificationError(f"the artifact carries {title}, which manifest.json does not list")
                _download(client, layer, tmp / title, hook)
                if f is not None:
                    seen.add(title)
        missing = sorted(set(expected) - seen)
        if missing:
            raise VerificationError(f"{missing[0]} is listed in manifest.json but the artifact does not carry it "
                                    f"({len(missing)} missing)")
        nfiles = sum(1 for p in tmp.rglob("*") if p.is_file())
    log(f"pulled {ref} ({digest}) into {out}: {nfiles} files verified")
    return PullResult(reference=str(ref), digest=digest, out=str(out), files=nfiles, total_bytes=total,
                      stats=client.stats, wall_s=time.perf_counter() - t0)


def _download(client: RegistryClient, layer: Mapping[str, Any], dest: Path, hook: Progress | None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w+b") as fh:
        client.download_blob_to(digest=layer["digest"], size=layer["size"], out=fh, title=layer["_title"],
                                progress=hook)
        fh.flush()
        os.fsync(fh.fileno())


def _pull_tar(client: RegistryClient, layer: Mapping[str, Any], root: Path, expected: Mapping[str, Mapping[str, Any]],
              hook: Progress | None) -> set[str]:
    title = layer["_title"]
    seen: set[str] = set()
    with tempfile.TemporaryFile(dir=root) as blob:
        client.download_blob_to(digest=layer["digest"], size=layer["size"], out=blob, title=title, progress=hook)
        blob.seek(0)
        try:
            plain = HashingReader(gzip.GzipFile(fileobj=blob, mode="rb"))  # type: ignore[arg-type]
            with tarfile.open(fileobj=plain, mode="r|") as tar:
                for member in tar:
                    name = safe_relpath(member.name, what=f"member of {title}")
                    if not member.isreg():
                        raise VerificationError(f"{title} holds {name}, which is not a regular file")
                    if not (name + "/").startswith(title.rstrip("/") + "/"):
                        raise VerificationError(f"{title} holds {name}, outside the directory it is titled")
                    f = expected.get(name)
                    if f is None:
                        raise VerificationError(f"the artifact carries {name}, which manifest.json does not list")
                    if member.size != f["size"]:  # before writing a byte: a tar header cannot make us fill the disk
                        raise VerificationError(f"{name} is {member.size} bytes in {title}, manifest.json records "
                                                f"{f['size']}")
                    src = tar.extractfile(member)
                    assert src is not None
                    dest = root / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    h = hashlib.sha256()
                    with open(dest, "wb") as fh:
                        while block := src.read(READ_BYTES):
                            h.update(block)
                            fh.write(block)
                    os.chmod(dest, 0o755 if member.mode & 0o100 else 0o644)
                    if h.hexdigest() != f["sha256"]:
                        raise VerificationError(f"{name} does not match the sha256 manifest.json records for it")
                    seen.add(name)
            while plain.read(READ_BYTES):  # the tar's end blocks and padding: the whole stream is digested
                pass
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise VerificationError(f"{title} is not a readable tar.gz ({type(exc).__name__})") from None
    stated = (layer.get("annotations") or {}).get(ORAS_DIGEST)
    if stated is not None and stated != "sha256:" + plain.sha.hexdigest():
        raise VerificationError(f"{title}: its uncompressed tar does not match the {ORAS_DIGEST} annotation")
    return seen

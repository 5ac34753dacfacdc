"""``dsbuild pull``: a deployment artifact back into a run directory, every file verified against manifest.json.

Nothing from the registry is trusted: the artifact manifest is checked against its schema before a field is read
(``builder.publish.schema``), then ``manifest.json`` (its own schema, safe paths); only the files it lists for the
artifact's stages are written, each exactly once, and no blob is read past the size the artifact manifest records
(nor a tar layer unpacked past what its listed files hold). Everything is written into a temporary directory
beside the destination and renamed into place only when every layer's digest and every file's sha256 has been
checked, so an interrupted or failed pull leaves nothing under the destination's name.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from builder.atomic import staging_dir
from builder.check import check_run, require_conformance
from builder.errors import DiskSpaceError, RegistryError, VerificationError
from builder.paths import safe_relpath
from builder.pipeline import MANIFEST
from builder.publish.artifact import (ARTIFACT_TYPE, CONFIG_MEDIA_TYPE, DOCKERFILE_MEDIA_TYPE, DOCKERFILE_TITLE,
                                      GPU_OMITTED, MANIFEST_MEDIA_TYPE, OMITTED_ANNOTATION, ORAS_DIGEST, READ_BYTES,
                                      TAR_SUFFIX, HashingReader, omitted)
from builder.publish.client import Progress, RegistryClient, TransferStats
from builder.publish.dockerfile import dockerfile_values, render_dockerfile
from builder.publish.push import artifact_annotations, flavour_of_run, omitted_patterns, without_omitted
from builder.publish.reference import OciReference
from builder.publish.schema import STAGES_ANNOTATION, check_artifact_manifest, check_run_manifest
from builder.safeio import parse_json

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


def _layers(manifest: Any, ref: OciReference) -> list[dict[str, Any]]:
    """The artifact manifest checked against its schema (one sentence on failure), then as a dsbuild artifact."""
    titles = check_artifact_manifest(manifest, what=f"the artifact manifest of {ref}", error=RegistryError)
    if manifest.get("artifactType") != ARTIFACT_TYPE and manifest["config"]["mediaType"] != CONFIG_MEDIA_TYPE:
        raise RegistryError(f"{ref} is not a dsbuild deployment (artifactType {manifest.get('artifactType')!r})")
    layers = manifest["layers"]
    for layer, title in zip(layers, titles):
        layer["_title"] = title
    return layers


def _run_manifest(raw: bytes, ref: OciReference) -> dict[str, Any]:
    doc = parse_json(raw, source=f"the {MANIFEST} in {ref}", error=VerificationError)
    check_run_manifest(doc, what=f"the {MANIFEST} in {ref}", error=VerificationError)
    return doc


def _expected_files(run_manifest: Mapping[str, Any], stage_names: list[str],
                    omitted_patterns: list[str]) -> dict[str, dict[str, Any]]:
    """The files of the stages the artifact says it holds, less what it says it leaves out (only ever a GPU
    deployment's rank shards): exactly what pull writes (beside manifest.json)."""
    out = {}
    for s in stage_names:
        entry = run_manifest["stages"].get(s)
        if entry is None:
            raise VerificationError(f"the artifact says it holds stage {s}, which its manifest.json does not list")
        out.update({f["path"]: f for f in entry["outputs"] if not omitted(f["path"], omitted_patterns)})
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
    stage_names = [s for s in (manifest.get("annotations") or {}).get(STAGES_ANNOTATION, "").split(",") if s]
    manifest_layers = [la for la in layers if la["mediaType"] == MANIFEST_MEDIA_TYPE or la["_title"] == MANIFEST]
    if len(manifest_layers) != 1 or manifest_layers[0]["_title"] != MANIFEST \
            or manifest_layers[0]["mediaType"] != MANIFEST_MEDIA_TYPE:
        raise RegistryError(f"{ref} does not carry exactly one {MANIFEST} layer")
    if manifest_layers[0]["size"] > MAX_MANIFEST_BYTES:
        raise RegistryError(f"{ref}: its {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    total = sum(layer["size"] for layer in layers)
    hook = progress(total) if progress else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(out) as tmp:
        _download(client, manifest_layers[0], tmp / MANIFEST, hook)
        run_manifest = _run_manifest((tmp / MANIFEST).read_bytes(), ref)
        # Only the patterns push itself writes may be skipped: an artifact cannot make pull drop other files.
        skip = [p for p in (manifest.get("annotations") or {}).get(OMITTED_ANNOTATION, "").split(",") if p in GPU_OMITTED]
        expected = _expected_files(run_manifest, stage_names, skip)
        need = sum(f["size"] for f in expected.values()) + max((la["size"] for la in layers), default=0)
        free = shutil.disk_usage(tmp).free
        if free < need:
            raise DiskSpaceError(f"pulling {ref} needs about {need / 1e9:.1f} GB under {out.parent}, "
                                 f"{free / 1e9:.1f} GB are free")
        # Only the files the verified manifest.json lists for the artifact's stages are written, each once. The one
        # other layer push adds, a Dockerfile rendered from the run, is not downloaded: pull renders it again from
        # the verified manifest, so its bytes come from nowhere else.
        seen: set[str] = set()
        for layer in layers:
            if layer is manifest_layers[0]:
                continue
            title = layer["_title"]
            if layer["mediaType"].endswith(TAR_SUFFIX):
                _pull_tar(client, layer, tmp, expected, seen, hook)
                continue
            f = expected.get(title)
            if f is None:
                if layer["mediaType"] == DOCKERFILE_MEDIA_TYPE and title == DOCKERFILE_TITLE:
                    (tmp / DOCKERFILE_TITLE).write_text(_dockerfile(run_manifest, stage_names), encoding="utf-8")
                    continue
                raise VerificationError(f"the artifact carries {title}, which manifest.json does not list")
            if title in seen:
                raise VerificationError(f"the artifact carries {title} twice")
            if layer["digest"] != "sha256:" + f["sha256"] or layer["size"] != f["size"]:
                raise VerificationError(f"{title}: the artifact's layer ({layer['size']} bytes, "
                                        f"{layer['digest'][:19]}...) differs from what manifest.json records for it")
            _download(client, layer, tmp / title, hook)
            seen.add(title)
        missing = sorted(set(expected) - seen)
        if missing:
            raise VerificationError(f"{missing[0]} is listed in manifest.json but the artifact does not carry it "
                                    f"({len(missing)} missing)")
        nfiles = sum(1 for p in tmp.rglob("*") if p.is_file())
        # What arrived must also agree with itself, its plan and TensorRT-LLM's contract (dsbuild check), before it
        # is renamed into place: a deployment that would not load is refused here, not on the cluster.
        report = check_run(tmp)
        for note in report.notes:
            log(f"note: {note}")
        require_conformance(report, log=log)
    log(f"pulled {ref} ({digest}) into {out}: {nfiles} files verified, dsbuild check passed")
    return PullResult(reference=str(ref), digest=digest, out=str(out), files=nfiles, total_bytes=total,
                      stats=client.stats, wall_s=time.perf_counter() - t0)


def _dockerfile(run_manifest: Mapping[str, Any], stage_names: list[str]) -> str:
    """What push renders for a run without its own Dockerfile (``dsbuild dockerfile`` prints the same)."""
    entries = without_omitted({s: run_manifest["stages"][s] for s in stage_names}, omitted_patterns(run_manifest))
    return render_dockerfile(dockerfile_values(
        annotations=artifact_annotations(run_manifest, stage_names), run_name=str(run_manifest.get("run_name", "run")),
        stage_dirs=[e["dir"] for e in entries.values()], flavour=flavour_of_run(run_manifest),
        files=[o["path"] for e in entries.values() for o in e["outputs"]]))


def _download(client: RegistryClient, layer: Mapping[str, Any], dest: Path, hook: Progress | None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w+b") as fh:
        client.download_blob_to(digest=layer["digest"], size=layer["size"], out=fh, title=layer["_title"],
                                progress=hook)
        fh.flush()
        os.fsync(fh.fileno())


def _pull_tar(client: RegistryClient, layer: Mapping[str, Any], root: Path, expected: Mapping[str, Mapping[str, Any]],
              seen: set[str], hook: Progress | None) -> None:
    title = layer["_title"]
    with tempfile.TemporaryFile(dir=root) as blob:
        client.download_blob_to(digest=layer["digest"], size=layer["size"], out=blob, title=title, progress=hook)
        blob.seek(0)
        # What the gzip may expand to: the listed files under the title, each with its headers (a PAX header of
        # the path, 512-byte blocks) and the end-of-archive blocks; a gzip bomb stops there.
        listed = [f["size"] for name, f in expected.items() if name.startswith(title.rstrip("/") + "/")]
        limit = sum(-(-n // 512) * 512 + 4096 for n in listed) + 20 * 512
        try:
            plain = HashingReader(gzip.GzipFile(fileobj=blob, mode="rb"), limit=limit, title=title)  # type: ignore[arg-type]
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
                    if name in seen:
                        raise VerificationError(f"the artifact carries {name} twice")
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



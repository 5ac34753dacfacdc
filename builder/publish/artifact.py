"""What a dsbuild deployment artifact holds: which run files, as which layers, with which media types.

One OCI image manifest per deployment (``artifactType`` :data:`ARTIFACT_TYPE`), its config blob a small JSON
summary of the run, and these layers (titles are paths relative to the run directory):

- every file of ``engines/`` and, with ``--include-weights``, ``quantized/`` as its own uncompressed layer (rank
  shards are content-addressed, so an unchanged rank is never uploaded twice, and a pull verifies each against
  ``manifest.json`` as it streams);
- ``plan/`` and each sub-directory of ``package/`` (``triton_repo``, ``launch``) as one reproducible tar+gzip
  layer (sorted members, fixed owner and mtime, gzip mtime 0: the same files give the same digest);
- files of ``package/`` itself (its ``Dockerfile``) as single layers, and ``manifest.json`` last.

A file of ``LARGE_FILE_BYTES`` or more is never put into a tar: it becomes its own layer wherever it lives.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from builder.errors import VerificationError

ARTIFACT_TYPE = "application/vnd.dsbuild.deployment.v1"
CONFIG_MEDIA_TYPE = "application/vnd.dsbuild.deployment.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.dsbuild.manifest.v1+json"
DOCKERFILE_MEDIA_TYPE = "application/vnd.dsbuild.dockerfile.v1"
DOCKERFILE_TITLE = "Dockerfile"  # push's rendered Dockerfile when the run's package/ has none
TAR_SUFFIX = ".tar+gzip"
TITLE = "org.opencontainers.image.title"
LARGE_FILE_BYTES = 64 << 20
READ_BYTES = 1 << 20

# Stage name -> how its directory becomes layers. "files": one layer per top-level file, a tar per sub-directory;
# "bundle": the whole directory as one tar.
STAGE_LAYOUT = {"plan": "bundle", "build": "files", "quantize": "files", "package": "files"}
DEFAULT_STAGES = ("plan", "build", "package")
WEIGHTS_STAGE = "quantize"

_FILE_TYPES = {  # (stage, pattern) -> media type of a single-file layer; first match wins
    ("build", "rank*.safetensors"): "application/vnd.dsbuild.engine.rank.v1+safetensors",
    ("build", "config.json"): "application/vnd.dsbuild.engine.config.v1+json",
    ("build", "llm_api.yaml"): "application/vnd.dsbuild.engine.llm-api.v1+yaml",
    ("build", "*"): "application/vnd.dsbuild.engine.file.v1",
    ("quantize", "*.safetensors"): "application/vnd.dsbuild.checkpoint.shard.v1+safetensors",
    ("quantize", "*.json"): "application/vnd.dsbuild.checkpoint.file.v1+json",
    ("quantize", "*"): "application/vnd.dsbuild.checkpoint.file.v1",
    ("package", "Dockerfile"): DOCKERFILE_MEDIA_TYPE,
    ("package", "*"): "application/vnd.dsbuild.package.file.v1",
    ("*", "*.safetensors"): "application/vnd.dsbuild.file.v1+safetensors",
    ("*", "*"): "application/vnd.dsbuild.file.v1",
}
_DIR_TYPES = {
    ("plan", ""): "application/vnd.dsbuild.plan.v1",
    ("package", "triton_repo"): "application/vnd.dsbuild.triton-repo.v1",
    ("package", "launch"): "application/vnd.dsbuild.launch.v1",
}


@dataclass
class Layer:
    title: str  # path relative to the run directory (a file, or the directory a tar holds)
    media_type: str
    source: Path  # the file to upload (the run file itself, or a tar.gz built in a work directory)
    digest: str = ""
    size: int = 0
    members: list[dict[str, Any]] = field(default_factory=list)  # manifest entries a tar holds

    @property
    def is_tar(self) -> bool:
        return self.media_type.endswith(TAR_SUFFIX)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size,
                "annotations": {TITLE: self.title}}


def file_media_type(stage: str, name: str) -> str:
    for (st, pattern), media_type in _FILE_TYPES.items():
        if st in (stage, "*") and PurePosixPath(name).match(pattern):
            return media_type
    raise AssertionError("the catch-all pattern matches every name")


def dir_media_type(stage: str, sub: str) -> str:
    base = _DIR_TYPES.get((stage, sub)) or f"application/vnd.dsbuild.{stage}.dir.v1"
    return base + TAR_SUFFIX


def plan_layers(run_dir: Path, stage_entries: dict[str, dict[str, Any]]) -> list[Layer]:
    """The layers for the chosen stages' manifest outputs (tar layers not yet built: see :func:`build_tar`)."""
    layers: list[Layer] = []
    for stage, entry in stage_entries.items():
        stage_dir = entry["dir"]
        groups: dict[str, list[dict[str, Any]]] = {}
        for out in sorted(entry.get("outputs", []), key=lambda o: o["path"]):
            inner = PurePosixPath(out["path"]).relative_to(stage_dir)
            if out["size"] >= LARGE_FILE_BYTES or (STAGE_LAYOUT.get(stage, "files") == "files" and len(inner.parts) == 1):
                layers.append(Layer(title=out["path"], media_type=file_media_type(stage, inner.name),
                                    source=run_dir / out["path"], digest="sha256:" + out["sha256"], size=out["size"],
                                    members=[out]))
                continue
            group = "" if STAGE_LAYOUT.get(stage) == "bundle" else inner.parts[0]
            groups.setdefault(group, []).append(out)
        for group, members in groups.items():
            title = stage_dir if not group else f"{stage_dir}/{group}"
            layers.append(Layer(title=title, media_type=dir_media_type(stage, group), source=Path(), members=members))
    return layers


class _HashingWriter(io.RawIOBase):
    def __init__(self, fh: BinaryIO):
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self.sha.update(b)
        self.size += len(b)
        return self.fh.write(b)


class _HashingReader(io.RawIOBase):
    def __init__(self, fh: BinaryIO):
        self.fh, self.sha = fh, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        b = self.fh.read(n)
        self.sha.update(b)
        return b


def build_tar(layer: Layer, *, run_dir: Path, work: Path) -> None:
    """Write ``layer``'s members as a reproducible tar.gz under ``work``, checking each file against its sha256."""
    target = work / (layer.title.replace("/", "__") + ".tar.gz")
    with open(target, "wb") as raw:
        hashing = _HashingWriter(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=hashing, mtime=0, compresslevel=6) as gz:  # type: ignore[arg-type]
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for out in layer.members:
                    path = run_dir / out["path"]
                    info = tarfile.TarInfo(out["path"])
                    info.size = out["size"]
                    info.mode = 0o755 if path.stat().st_mode & 0o100 else 0o644
                    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                    with open(path, "rb") as fh:
                        reader = _HashingReader(fh)
                        try:
                            tar.addfile(info, reader)  # type: ignore[arg-type]
                        except OSError:  # tarfile's "unexpected end of data": the file shrank
                            reader.sha.update(b"truncated")
                    if reader.sha.hexdigest() != out["sha256"] or path.stat().st_size != out["size"]:
                        raise VerificationError(f"{out['path']} does not match its sha256 in manifest.json; the run "
                                                "directory changed after it was built")
    layer.source, layer.digest, layer.size = target, "sha256:" + hashing.sha.hexdigest(), hashing.size

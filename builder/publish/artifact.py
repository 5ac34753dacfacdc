"""What a dsbuild deployment artifact holds: which run files, as which layers, with which media types.

One OCI image manifest per deployment (``artifactType`` :data:`ARTIFACT_TYPE`), its config blob a small JSON
summary of the run, and these layers (titles are paths relative to the run directory):

- every top-level file of ``engines/``, ``package/`` (its ``Dockerfile``) and, with ``--include-weights``,
  ``quantized/`` as its own uncompressed layer (rank shards are content-addressed, so an unchanged rank is never
  uploaded twice, and a pull verifies each against ``manifest.json`` as it streams);
- ``plan/``, and the sub-directories of ``package/`` (``triton_repo/``, ``launch/``) and of ``engines/``, as one
  reproducible tar+gzip layer per stage directory (sorted members, fixed owner and mtime, gzip mtime 0: the same
  files give the same digest), in ORAS's directory-layer form so that ``oras pull`` and oras-py unpack it where
  ``dsbuild pull`` does (docs/upstream-facts.md#U-ORAS-1, #U-ORAS-2): media type
  ``application/vnd.oci.image.layer.v1.tar+gzip``, titled with the stage directory's name (no ``/``: the oras CLI
  unpacks under the title, oras-py into the title's parent, which agree only for a top-level title), every member
  under that name, annotations ``io.deis.oras.content.unpack: "true"`` and ``io.deis.oras.content.digest`` (the
  uncompressed tar's digest);
- ``manifest.json`` last.

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
DIR_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"  # ORAS's (and OCI's) gzipped tar layer
TITLE = "org.opencontainers.image.title"
ORAS_UNPACK = "io.deis.oras.content.unpack"  # "true": a gzipped tar of the directory named by the title
ORAS_DIGEST = "io.deis.oras.content.digest"  # the digest of the uncompressed tar
LARGE_FILE_BYTES = 64 << 20
READ_BYTES = 1 << 20

# Stage name -> how its directory becomes layers. "files": one layer per top-level file, its sub-directories in one
# tar; "bundle": the whole directory as one tar.
STAGE_LAYOUT = {"plan": "bundle", "build": "files", "quantize": "files", "draft-quantize": "files",
                "package": "files"}
DEFAULT_STAGES = ("plan", "build", "package")
WEIGHTS_STAGE = "quantize"
# --include-weights: the checkpoints TensorRT-LLM loads (the draft model's too, with --spec draft).
WEIGHTS_STAGES = (WEIGHTS_STAGE, "draft-quantize")
# The reference engine's rank shards: what a GPU-flavour deployment does not use (TensorRT-LLM shards the checkpoint
# itself when it loads), so its artifact leaves them out; the artifact names the patterns (OMITTED_ANNOTATION) and
# pull does not expect those files.
GPU_OMITTED = ("engines/rank*.safetensors", "engines/draft/rank*.safetensors")
OMITTED_ANNOTATION = "io.dsbuild.omitted"


def omitted(path: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(PurePosixPath(path).match(p) and len(PurePosixPath(path).parts) == len(PurePosixPath(p).parts)
               for p in patterns)

_FILE_TYPES = {  # (stage, pattern) -> media type of a single-file layer; first match wins
    ("build", "rank*.safetensors"): "application/vnd.dsbuild.engine.rank.v1+safetensors",
    ("build", "config.json"): "application/vnd.dsbuild.engine.config.v1+json",
    ("build", "llm_api.yaml"): "application/vnd.dsbuild.engine.llm-api.v1+yaml",
    ("build", "*"): "application/vnd.dsbuild.engine.file.v1",
    ("quantize", "*.safetensors"): "application/vnd.dsbuild.checkpoint.shard.v1+safetensors",
    ("quantize", "*.json"): "application/vnd.dsbuild.checkpoint.file.v1+json",
    ("quantize", "*"): "application/vnd.dsbuild.checkpoint.file.v1",
    ("draft-quantize", "*.safetensors"): "application/vnd.dsbuild.checkpoint.shard.v1+safetensors",
    ("draft-quantize", "*.json"): "application/vnd.dsbuild.checkpoint.file.v1+json",
    ("draft-quantize", "*"): "application/vnd.dsbuild.checkpoint.file.v1",
    ("package", "Dockerfile"): DOCKERFILE_MEDIA_TYPE,
    ("package", "*"): "application/vnd.dsbuild.package.file.v1",
    ("*", "*.safetensors"): "application/vnd.dsbuild.file.v1+safetensors",
    ("*", "*"): "application/vnd.dsbuild.file.v1",
}


@dataclass
class Layer:
    title: str  # path relative to the run directory (a file, or the directory a tar holds)
    media_type: str
    source: Path  # the file to upload (the run file itself, or a tar.gz built in a work directory)
    digest: str = ""
    size: int = 0
    members: list[dict[str, Any]] = field(default_factory=list)  # manifest entries a tar holds
    tar_digest: str = ""  # a tar layer's uncompressed digest (ORAS_DIGEST)

    @property
    def is_tar(self) -> bool:
        return self.media_type == DIR_MEDIA_TYPE

    def descriptor(self) -> dict[str, Any]:
        annotations = {TITLE: self.title}
        if self.is_tar:
            annotations |= {ORAS_UNPACK: "true", ORAS_DIGEST: self.tar_digest}
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, "annotations": annotations}


def file_media_type(stage: str, name: str) -> str:
    for (st, pattern), media_type in _FILE_TYPES.items():
        if st in (stage, "*") and PurePosixPath(name).match(pattern):
            return media_type
    raise AssertionError("the catch-all pattern matches every name")


def plan_layers(run_dir: Path, stage_entries: dict[str, dict[str, Any]]) -> list[Layer]:
    """The layers for the chosen stages' manifest outputs (tar layers not yet built: see :func:`build_tar`)."""
    layers: list[Layer] = []
    for stage, entry in stage_entries.items():
        stage_dir = entry["dir"]
        in_tar: list[dict[str, Any]] = []
        for out in sorted(entry.get("outputs", []), key=lambda o: o["path"]):
            inner = PurePosixPath(out["path"]).relative_to(stage_dir)
            if out["size"] >= LARGE_FILE_BYTES or (STAGE_LAYOUT.get(stage, "files") == "files" and len(inner.parts) == 1):
                layers.append(Layer(title=out["path"], media_type=file_media_type(stage, inner.name),
                                    source=run_dir / out["path"], digest="sha256:" + out["sha256"], size=out["size"],
                                    members=[out]))
            else:
                in_tar.append(out)
        if in_tar:
            layers.append(Layer(title=stage_dir, media_type=DIR_MEDIA_TYPE, source=Path(), members=in_tar))
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

    def tell(self) -> int:  # tarfile asks where it starts
        return self.size


class HashingReader(io.RawIOBase):
    """Hashes what passes through; with ``limit``, refuses to give more than that many bytes in all (a pulled
    layer's gzip stream may not expand past what its listed files hold)."""

    def __init__(self, fh: BinaryIO, *, limit: int | None = None, title: str = ""):
        self.fh, self.sha, self.left, self.title = fh, hashlib.sha256(), limit, title

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        if self.left is not None:  # ask for one byte more than allowed, so an overflow is seen, not truncated
            n = self.left + 1 if n is None or n < 0 else min(n, self.left + 1)
        b = self.fh.read(n)
        self.sha.update(b)
        if self.left is not None:
            self.left -= len(b)
            if self.left < 0:
                raise VerificationError(f"{self.title} expands to more than its listed files hold; refusing to "
                                        "unpack on")
        return b


def build_tar(layer: Layer, *, run_dir: Path, work: Path) -> None:
    """Write ``layer``'s members as a reproducible tar.gz under ``work``, checking each file against its sha256."""
    target = work / (layer.title + ".tar.gz")
    with open(target, "wb") as raw:
        hashing = _HashingWriter(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=hashing, mtime=0, compresslevel=6) as gz:  # type: ignore[arg-type]
            plain = _HashingWriter(gz)  # type: ignore[arg-type]
            with tarfile.open(fileobj=plain, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for out in layer.members:
                    path = run_dir / out["path"]
                    info = tarfile.TarInfo(out["path"])
                    info.size = out["size"]
                    info.mode = 0o755 if path.stat().st_mode & 0o100 else 0o644
                    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                    with open(path, "rb") as fh:
                        reader = HashingReader(fh)
                        try:
                            tar.addfile(info, reader)  # type: ignore[arg-type]
                        except OSError:  # tarfile's "unexpected end of data": the file shrank
                            reader.sha.update(b"truncated")
                    if reader.sha.hexdigest() != out["sha256"] or path.stat().st_size != out["size"]:
                        raise VerificationError(f"{out['path']} does not match its sha256 in manifest.json; the run "
                                                "directory changed after it was built")
    layer.source, layer.digest, layer.size = target, "sha256:" + hashing.sha.hexdigest(), hashing.size
    layer.tar_digest = "sha256:" + plain.sha.hexdigest()

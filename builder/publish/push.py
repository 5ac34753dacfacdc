"""``dsbuild push``: a built run directory to an OCI registry as one deployment artifact."""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping

from builder import __version__
from builder.errors import RegistryError, SpecError, VerificationError
from builder.pipeline import MANIFEST, _fault_pause, run_lock, sha256_file
from builder.publish.artifact import (ARTIFACT_TYPE, CONFIG_MEDIA_TYPE, DEFAULT_STAGES, DOCKERFILE_MEDIA_TYPE,
                                      DOCKERFILE_TITLE, MANIFEST_MEDIA_TYPE, TITLE, WEIGHTS_STAGE, Layer, build_tar,
                                      plan_layers)
from builder.publish.client import CHUNK_BYTES, OCI_MANIFEST, Progress, RegistryClient, TransferStats
from builder.publish.dockerfile import TENSORRT_LLM_VERSION, TRITON_IMAGE, dockerfile_values, render_dockerfile
from builder.publish.reference import OciReference
from builder.publish.schema import check_run_manifest
from builder.safeio import dumps_json, parse_json, read_bounded

# Where a fetch stage records the hub commit it resolved (first key present wins).
COMMIT_KEYS = ("commit", "commit_sha", "sha", "revision_sha")
REQUIRED_STAGE = "build"


@dataclass
class PushResult:
    reference: str
    digest: str
    layers: int
    total_bytes: int
    stats: TransferStats
    wall_s: float
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["wall_s"] = round(self.wall_s, 3)
        return out


MAX_RUN_MANIFEST_BYTES = 64 << 20


def load_run_manifest(run_dir: Path) -> dict[str, Any]:
    """``run_dir``'s manifest.json, checked: its schema, and every listed path a safe relative path inside its stage's
    directory (push reads nothing else)."""
    path = run_dir / MANIFEST
    if not run_dir.is_dir():
        raise SpecError(f"run directory {run_dir} does not exist")
    if not os.path.lexists(path):
        raise SpecError(f"{run_dir} has no {MANIFEST}; is it a dsbuild run directory?")
    if not path.resolve().is_relative_to(run_dir.resolve()):
        raise VerificationError(f"{path} is a symbolic link out of the run directory; push reads only files inside it")
    data = parse_json(read_bounded(path, limit=MAX_RUN_MANIFEST_BYTES, what="run manifest", error=SpecError),
                      source=str(path), error=SpecError)
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        raise SpecError(f"{path} is not a dsbuild run manifest (no stages)")
    check_run_manifest(data, what=str(path), error=VerificationError)
    return data


def hub_commit(manifest: Mapping[str, Any]) -> str | None:
    extra = (manifest["stages"].get("fetch") or {}).get("extra") or {}
    for key in COMMIT_KEYS:
        if isinstance(extra.get(key), str) and re.fullmatch(r"[0-9a-f]{40}", extra[key]):
            return extra[key]
    return None


def artifact_annotations(manifest: Mapping[str, Any], stages: list[str]) -> dict[str, str]:
    spec = manifest.get("spec") or {}
    layout = f"tp{spec.get('tp', '?')}pp{spec.get('pp', '?')}ep{spec.get('ep', '?')}" + (
        "adp" if spec.get("attention_dp") else "")
    # The run's own completion time, not the push time: pushing the same run twice gives the same manifest digest.
    created = max((manifest["stages"][s].get("completed_at") or "") for s in stages) or "1970-01-01T00:00:00+00:00"
    out = {
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.title": str(manifest.get("run_name") or "dsbuild-run"),
        "io.dsbuild.model.id": str(spec.get("model", "unknown")),
        "io.dsbuild.quantization": str(spec.get("quant", "unknown")),
        "io.dsbuild.layout": layout,
        "io.dsbuild.tensorrt-llm.version": TENSORRT_LLM_VERSION,
        "io.dsbuild.triton.image": TRITON_IMAGE,
        "io.dsbuild.gpu": str(spec.get("gpu") or "none"),
        "io.dsbuild.version": str(manifest.get("dsbuild_version") or __version__),
        "io.dsbuild.stages": ",".join(stages),
    }
    if commit := hub_commit(manifest):
        out["io.dsbuild.model.revision"] = commit
    if spec.get("spec") not in (None, "none"):
        out["io.dsbuild.speculative"] = f"{spec['spec']}{spec.get('draft_len', '')}"
    return out


def default_tag(manifest: Mapping[str, Any], annotations: Mapping[str, str]) -> str:
    """``<model>-<quant>-<layout>-trtllm<ver>-<gpu>-<id>``: id is the hub commit, else the engines' stage key."""
    model = str((manifest.get("spec") or {}).get("model", "model")).rstrip("/").split("/")[-1]
    ident = (annotations.get("io.dsbuild.model.revision") or manifest["stages"][REQUIRED_STAGE]["key"])[:12]
    parts = [model, annotations["io.dsbuild.quantization"], annotations["io.dsbuild.layout"],
             f"trtllm{TENSORRT_LLM_VERSION}", annotations["io.dsbuild.gpu"], ident]
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts)).lower().lstrip(".-")
    return tag[:128]


def select_stages(manifest: Mapping[str, Any], *, include_weights: bool, log: Callable[[str], None]) -> list[str]:
    stages = manifest["stages"]
    if REQUIRED_STAGE not in stages:
        raise SpecError("the run has no engines yet (stage build is not in manifest.json); run `dsbuild build` first")
    wanted = list(DEFAULT_STAGES) + ([WEIGHTS_STAGE] if include_weights else [])
    if include_weights and WEIGHTS_STAGE not in stages:
        raise SpecError("--include-weights: the run has no quantized checkpoint (stage quantize is not built)")
    missing = [s for s in wanted if s not in stages]
    for s in missing:
        log(f"note: stage {s} is not built in this run; the artifact will not contain it")
    return [s for s in wanted if s in stages]


def check_files(run_dir: Path, entries: Mapping[str, Mapping[str, Any]]) -> None:
    """Every file push will read is a regular file inside ``run_dir`` of the size manifest.json records: no
    directory on the way is a symbolic link, and a file that is one points inside the run, or is the Hugging Face
    cache blob fetch linked across filesystems (``.../blobs/<its sha256>``)."""
    root = run_dir.resolve()
    for entry in entries.values():
        for out in entry.get("outputs", []):
            p = run_dir / out["path"]
            if p.parent.resolve() != root / PurePosixPath(out["path"]).parent:
                raise VerificationError(f"{out['path']} lies under a symbolic link that leaves {run_dir}; push reads "
                                        "only files inside the run directory")
            if p.is_symlink():
                target = p.resolve()
                blob = target.parent.name == "blobs" and target.name == out["sha256"]
                if not (target.is_relative_to(root) or blob):
                    raise VerificationError(f"{out['path']} is a symbolic link to {target}, outside {run_dir}; push "
                                            "reads only files inside the run directory")
            if not p.is_file():
                raise VerificationError(f"{out['path']} is listed in manifest.json but missing from {run_dir}")
            if p.stat().st_size != out["size"]:
                raise VerificationError(f"{out['path']} is {p.stat().st_size} bytes but manifest.json records "
                                        f"{out['size']}; the run directory changed after it was built")


def push_run(*, run_dir: Path, ref: OciReference, include_weights: bool = False, plain_http: bool = False,
             insecure: bool = False, environ: Mapping[str, str] | None = None, log: Callable[[str], None] = print,
             progress: Callable[[int], Progress] | None = None, chunk_bytes: int = CHUNK_BYTES) -> PushResult:
    """Push ``run_dir`` to ``ref`` (its tag, or the default tag); ``progress(total_bytes)`` returns a per-byte hook."""
    if ref.digest:
        raise RegistryError(f"cannot push to a digest reference ({ref}); give a tag or none")
    t0 = time.perf_counter()
    manifest = load_run_manifest(run_dir)
    with run_lock(run_dir):
        stages = select_stages(manifest, include_weights=include_weights, log=log)
        entries = {s: manifest["stages"][s] for s in stages}
        check_files(run_dir, entries)
        annotations = artifact_annotations(manifest, stages)
        target = ref if ref.tag else ref.with_tag(default_tag(manifest, annotations))
        client = RegistryClient(target, plain_http=plain_http, insecure=insecure, chunk_bytes=chunk_bytes,
                                environ=environ)
        client.ping()
        layers = plan_layers(run_dir, entries)
        with tempfile.TemporaryDirectory(prefix="dsbuild-push-") as tmp:
            work = Path(tmp)
            for layer in layers:
                if layer.is_tar:
                    build_tar(layer, run_dir=run_dir, work=work)
            if not any(layer.media_type == DOCKERFILE_MEDIA_TYPE for layer in layers):
                layers.append(_rendered_dockerfile(work, manifest, annotations, [entries[s]["dir"] for s in stages]))
            layers.append(Layer(title=MANIFEST, media_type=MANIFEST_MEDIA_TYPE, source=run_dir / MANIFEST,
                                digest="sha256:" + sha256_file(run_dir / MANIFEST),
                                size=(run_dir / MANIFEST).stat().st_size))
            config_path = work / "config.json"
            config_path.write_text(dumps_json(_config(manifest, entries, annotations), compact=True,
                                              sort_keys=True))
            config = Layer(title="config", media_type=CONFIG_MEDIA_TYPE, source=config_path,
                           digest="sha256:" + sha256_file(config_path), size=config_path.stat().st_size)
            total = sum(layer.size for layer in layers) + config.size
            hook = progress(total) if progress else None
            for i, layer in enumerate([*layers, config]):
                if i == len(layers) // 2:
                    _fault_pause("push")  # crash tests: SIGKILL with some blobs uploaded and no manifest yet
                client.push_blob(path=layer.source, digest=layer.digest, size=layer.size, title=layer.title,
                                 progress=hook)
            oci_manifest = {
                "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
                "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config.digest, "size": config.size},
                "layers": [layer.descriptor() for layer in layers], "annotations": annotations,
            }
            digest = client.put_manifest(oci_manifest, tag=target.tag or "")
    return PushResult(reference=str(target), digest=digest, layers=len(layers), total_bytes=total, stats=client.stats,
                      wall_s=time.perf_counter() - t0, annotations=annotations)


def _rendered_dockerfile(work: Path, manifest: Mapping[str, Any], annotations: Mapping[str, str],
                         stage_dirs: list[str]) -> Layer:
    text = render_dockerfile(dockerfile_values(annotations=annotations, run_name=str(manifest.get("run_name", "run")),
                                               stage_dirs=stage_dirs))
    path = work / "Dockerfile"
    path.write_text(text, encoding="utf-8")
    return Layer(title=DOCKERFILE_TITLE, media_type=DOCKERFILE_MEDIA_TYPE, source=path,
                 digest="sha256:" + sha256_file(path), size=path.stat().st_size)


def _config(manifest: Mapping[str, Any], entries: Mapping[str, Mapping[str, Any]],
            annotations: Mapping[str, str]) -> dict[str, Any]:
    return {
        "schema": 1, "run_name": manifest.get("run_name"), "dsbuild_version": manifest.get("dsbuild_version"),
        "stages": {s: {"dir": e["dir"], "key": e["key"], "bytes": e.get("bytes", 0), "files": len(e.get("outputs", []))}
                   for s, e in entries.items()},
        "spec": manifest.get("spec") or {}, "annotations": dict(annotations),
    }


__all__ = ["PushResult", "push_run", "default_tag", "artifact_annotations", "load_run_manifest", "TITLE"]

"""The shapes pull and push accept, checked before anything else reads a field: the OCI artifact manifest a registry
sends, and a run's ``manifest.json`` (pushed from disk, or pulled as a layer).

A document either matches its JSON schema and the rules a schema cannot say (every path a safe relative path
inside its stage's directory, each listed once, no file listed inside another; layer titles unique, one
``manifest.json`` layer), or the caller's error says in one sentence where it does not. The OCI fields follow the
image-manifest spec (docs/hardening-facts.md OCI-1); what is required beyond it is dsbuild's rule for its artifacts.
"""

from __future__ import annotations

from typing import Any, Mapping

import jsonschema

from builder.errors import DsbuildError, UnsafePathError
from builder.paths import safe_relpath
from builder.publish.artifact import DIR_MEDIA_TYPE, TITLE

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
STAGES_ANNOTATION = "io.dsbuild.stages"
MAX_LAYERS = 100_000
MAX_BLOB_BYTES = 1 << 50  # sizes beyond a petabyte are refused as nonsense, not downloaded

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string", "maxLength": 65536}}
_DESCRIPTOR = {
    "type": "object",
    "required": ["mediaType", "digest", "size"],
    "properties": {
        "mediaType": {"type": "string", "minLength": 1, "maxLength": 255},
        "digest": {"type": "string", "pattern": "^sha256:[a-f0-9]{64}$"},
        "size": {"type": "integer", "minimum": 0, "maximum": MAX_BLOB_BYTES},
        "annotations": _STRING_MAP,
    },
}
ARTIFACT_SCHEMA = {
    "type": "object",
    "required": ["schemaVersion", "mediaType", "config", "layers"],
    "properties": {
        "schemaVersion": {"const": 2},
        "mediaType": {"const": OCI_MANIFEST},
        "artifactType": {"type": "string", "maxLength": 255},
        "config": _DESCRIPTOR,
        "layers": {
            "type": "array", "minItems": 1, "maxItems": MAX_LAYERS,
            "items": {"allOf": [_DESCRIPTOR, {
                "required": ["annotations"],
                "properties": {"annotations": {"required": [TITLE],
                                               "properties": {TITLE: {"type": "string", "minLength": 1,
                                                                      "maxLength": 4096}}}}}]},
        },
        "annotations": {"allOf": [_STRING_MAP, {"properties": {
            STAGES_ANNOTATION: {"type": "string", "pattern": "^[a-z][a-z-]*(,[a-z][a-z-]*)*$"}}}]},
    },
}
RUN_MANIFEST_SCHEMA = {
    "type": "object",
    "required": ["stages"],
    "properties": {
        "run_name": {"type": "string"},
        "dsbuild_version": {"type": "string"},
        "spec": {"type": "object"},
        "stages": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["dir", "key", "outputs"],
                "properties": {
                    "dir": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9._-]*$", "maxLength": 255},
                    "key": {"type": "string", "minLength": 1, "maxLength": 128},
                    "completed_at": {"type": "string"},
                    "bytes": {"type": "integer", "minimum": 0},
                    "outputs": {"type": "array", "items": {
                        "type": "object",
                        "required": ["path", "size", "sha256"],
                        "properties": {
                            "path": {"type": "string", "minLength": 1, "maxLength": 4096},
                            "size": {"type": "integer", "minimum": 0, "maximum": MAX_BLOB_BYTES},
                            "sha256": {"type": "string", "pattern": "^[a-f0-9]{64}$"},
                        },
                    }},
                },
            },
        },
    },
}


def _where(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "the document"


def check_schema(doc: Any, schema: Mapping[str, Any], *, what: str, error: type[DsbuildError]) -> None:
    """``error(one sentence)`` naming the first place ``doc`` breaks ``schema``."""
    best = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(doc))
    if best is None:
        return
    message = best.message if len(best.message) <= 160 else best.message[:157] + "..."
    raise error(f"{what} is malformed: {_where(best.absolute_path)}: {message}")


def check_artifact_manifest(doc: Any, *, what: str, error: type[DsbuildError]) -> list[str]:
    """Check an artifact manifest; its layers' titles, each a safe relative path, unique, none inside a file layer's
    (a file layer may lie inside a directory layer's title: ``package/package.json`` beside the ``package`` tar)."""
    check_schema(doc, ARTIFACT_SCHEMA, what=what, error=error)
    titles = []
    for i, layer in enumerate(doc["layers"]):
        try:
            titles.append(safe_relpath(layer["annotations"][TITLE], what="layer title"))
        except UnsafePathError as exc:
            raise error(f"{what} is malformed: layers[{i}]: {exc}") from None
    files = {t for t, layer in zip(titles, doc["layers"]) if layer["mediaType"] != DIR_MEDIA_TYPE}
    _unique_and_not_nested(titles, what=f"{what}: layer title", error=error, files=files)
    return titles


def check_run_manifest(doc: Any, *, what: str, error: type[DsbuildError]) -> dict[str, dict[str, Any]]:
    """Check a run manifest; every output's path is a safe relative path inside its stage's directory, listed once,
    and no listed file is inside another listed file. Returns {path: output entry}."""
    check_schema(doc, RUN_MANIFEST_SCHEMA, what=what, error=error)
    outputs: dict[str, dict[str, Any]] = {}
    for stage, entry in doc["stages"].items():
        for f in entry["outputs"]:
            try:
                path = safe_relpath(f["path"], what=f"path of stage {stage}")
            except UnsafePathError as exc:
                raise error(f"{what} lists an unsafe path: {exc}") from None
            if not path.startswith(entry["dir"] + "/"):
                raise error(f"{what} lists {path!r} for stage {stage}, outside its directory {entry['dir']}/")
            outputs[path] = f
    _unique_and_not_nested([f["path"] for e in doc["stages"].values() for f in e["outputs"]],
                           what=f"{what}: output", error=error)
    return outputs


def _unique_and_not_nested(paths: list[str], *, what: str, error: type[DsbuildError],
                           files: set[str] | None = None) -> None:
    """Each path once, and none inside one of ``files`` (default: every path is a file)."""
    seen: set[str] = set()
    for p in paths:
        if p in seen:
            raise error(f"{what} {p!r} appears twice")
        seen.add(p)
    files = seen if files is None else files
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in files:
                raise error(f"{what} {p!r} lies inside {'/'.join(parts[:i])!r}, which is a file")

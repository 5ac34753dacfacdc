"""fetch stage: the checkpoint in ``weights/``, validated against the tensor catalogue.

The generated tiny model is made once in the cache; a local directory is validated in place. Either way the
files are hard-linked (or, across filesystems, symlinked) into ``weights/`` so that multi-GB shards are never copied.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from builder.errors import CheckpointError, HubError
from builder.model.catalog import catalog_by_name, is_mtp_tensor
from builder.model.config import ModelConfig
from builder.model.safetensors_io import INDEX_NAME, safe_relpath, validate_checkpoint
from builder.model.source import resolve_model
from builder.pipeline import Stage, StageContext
from builder.specs import RunSpec

VERSION = "1"
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "hf_quant_config.json", INDEX_NAME)


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        if src.stat().st_size > (64 << 20):
            os.symlink(src.resolve(), dst)
        else:
            shutil.copy2(src, dst)


def local_fingerprint(root: Path) -> list[list[Any]]:
    """Cheap identity of a local checkpoint for the cache key: names, sizes and mtimes of its files."""
    out = []
    for p in sorted(root.iterdir()):
        if p.is_file():
            st = p.stat()
            out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def source_dir(spec: RunSpec) -> Path:
    src = resolve_model(spec.model)
    if src.kind == "generated":
        from builder.model.tiny import ensure_tiny

        return ensure_tiny(spec.cache_root / "models", seed=spec.seed, preset_name=src.ref)
    if src.kind == "local":
        return Path(src.ref)
    raise HubError(f"downloading {spec.model} from the hub is not available in this build of dsbuild")


def key_inputs(spec: RunSpec, upstream: dict[str, Any]) -> dict[str, Any]:
    src = resolve_model(spec.model)
    if src.kind == "generated":
        from builder.model.tiny import tiny_cache_key

        return {"source": "generated", "tiny_key": tiny_cache_key(seed=spec.seed, preset_name=src.ref)}
    if src.kind == "local":
        return {"source": "local", "path": src.ref, "files": local_fingerprint(Path(src.ref))}
    raise HubError(f"downloading {spec.model} from the hub is not available in this build of dsbuild")


def materialize(src: Path, out: Path, cfg: ModelConfig, *, skip_mtp: bool) -> dict[str, Any]:
    expected = catalog_by_name(cfg, include_mtp=not skip_mtp)
    layout = validate_checkpoint(src, expected=None)
    present = set(layout.index.weight_map)
    wanted = {n for n in present if not (skip_mtp and is_mtp_tensor(n, cfg))}
    missing = sorted(set(expected) - present)
    if missing:
        raise CheckpointError(f"checkpoint lacks tensor {missing[0]!r} that config.json implies "
                              f"({len(missing)} missing)")
    extra = sorted(wanted - set(expected))
    if extra:
        raise CheckpointError(f"checkpoint holds tensor {extra[0]!r} that config.json does not imply")
    for name in wanted:
        th = layout.tensor(name)
        if th.shape != expected[name].shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(th.shape)} but config.json implies "
                                  f"{list(expected[name].shape)}")
    shards = sorted({layout.index.weight_map[n] for n in wanted})
    for shard in shards:
        link_or_copy(src / safe_relpath(shard), out / shard)
    for name in SMALL_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return {"shards": len(shards), "tensors": len(wanted)}


def run(ctx: StageContext) -> dict[str, Any]:
    src_dir = source_dir(ctx.spec)
    cfg = ModelConfig.from_json_file(src_dir / "config.json")
    info = materialize(src_dir, ctx.out, cfg, skip_mtp=ctx.spec.skip_mtp)
    info["source"] = ctx.extra.get("source")
    return info


STAGE = Stage(name="fetch", version=VERSION, output="weights", upstream=(), run=run, tools=("safetensors",),
              key_inputs=key_inputs, describe=lambda spec, extra: f"fetch {spec.model} ({extra.get('source')})")

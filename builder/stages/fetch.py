"""fetch stage: the checkpoint in ``weights/``, verified and validated against the tensor catalogue.

Three sources, one result: the generated tiny model (made once in the cache), a local directory (validated in
place), or a hub repository (``builder.hub``: commit resolved first; then, before any weight byte is fetched, every
tensor's name, shape and dtype is read from the shards' safetensors headers with HTTP range requests and compared with
the catalogue (``builder.model.conformance``); then files are verified against their oids while they download into
the HF cache). Either way the files are hard-linked (across filesystems: symlinked) into ``weights/``,
never copied, and ``weights/`` is then checked like any checkpoint: safetensors headers (every data byte of a shard
in exactly one tensor, as build's reader requires), the index, the tensors ``config.json`` implies, and no NaN or
infinity in a BF16/F16/F32 tensor (FP8 NaN codes: quantize). Fetch refuses what a later stage would. With
``--skip-mtp`` only shards holding needed tensors are kept (and downloaded), and the
index written to ``weights/`` names exactly the tensors of the kept shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from builder import hub
from builder.atomic import atomic_write_json, link_or_copy
from builder.errors import CheckpointError
from builder.model.catalog import catalog_by_name, is_mtp_tensor, policy_dtypes_found
from builder.model.config import ModelConfig
from builder.model.conformance import Conformance, compare
from builder.model.generated import ensure_tiny, tiny_cache_key
from builder.model.safetensors_io import INDEX_NAME, read_header, read_index, validate_checkpoint
from builder.model.safetensors_tensors import check_finite
from builder.model.selection import path_selected, select_shards
from builder.model.source import check_has_weights, resolve_model
from builder.paths import safe_relpath
from builder.pipeline import Stage, StageContext
from builder.rundir import WEIGHTS
from builder.specs import RunSpec

VERSION = "3"  # 3: full shard coverage and finite float tensors checked
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "hf_quant_config.json", INDEX_NAME)
REQUIRED = ("config.json", INDEX_NAME)


def local_fingerprint(root: Path) -> list[list[Any]]:
    """Cheap identity of a local checkpoint for the cache key: names, sizes and mtimes of its files."""
    out = []
    for p in sorted(root.iterdir()):
        if p.is_file():
            st = p.stat()
            out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def hub_repo_of(spec: RunSpec) -> hub.HubRepo:
    """The spec's model on ``HF_ENDPOINT``; cached under ``--cache-dir``/huggingface/hub or ``HF_HUB_CACHE``."""
    cache = Path(spec.cache_dir) / "huggingface" / "hub" if spec.cache_dir else None
    return hub.hub_repo(resolve_model(spec.model).ref, cache_dir=cache)


def key_inputs(spec: RunSpec, upstream: dict[str, Any]) -> dict[str, Any]:
    src = resolve_model(spec.model)
    if src.kind == "generated":

        return {"source": "generated", "tiny_key": tiny_cache_key(seed=spec.seed, preset_name=src.ref)}
    if src.kind == "local":
        return {"source": "local", "path": src.ref, "files": local_fingerprint(Path(src.ref))}
    if src.kind == "hub":
        # The commit, not the revision name, identifies the bytes: `main` today and its sha give the same key.
        repo = hub_repo_of(spec)
        return {"source": "hub", "repo": src.ref, "commit": hub.resolve_commit(repo, spec.revision)}
    check_has_weights(spec.model)
    raise AssertionError(f"unhandled model source {src.kind}")


def preflight(spec: RunSpec, stages: tuple[str, ...] = ()) -> None:
    """The model names something with weights (resolving it also checks the name, with a did-you-mean)."""
    resolve_model(spec.model)
    check_has_weights(spec.model)


# ---------------------------------------------------------------------------------------------------------------
# Validation and linking (shared by every source)

def expected_tensors(cfg: ModelConfig, weight_map: dict[str, str], *, skip_mtp: bool) -> dict[str, Any]:
    """What ``weights/`` must hold: the catalogue, where skipped MTP tensors are expected only if their shard was
    kept for other tensors."""
    full = catalog_by_name(cfg, include_mtp=True)
    if not skip_mtp:
        return full
    return {n: t for n, t in full.items() if not is_mtp_tensor(n, cfg) or n in weight_map}


def materialize(files: dict[str, Path], out: Path, *, skip_mtp: bool, include: list[str], exclude: list[str],
                digests: dict[str, str] | None = None) -> dict[str, Any]:
    """Link the needed ``files`` (repository path -> file) into ``out`` and validate ``out`` as a checkpoint.
    Returns the stage info; ``digests`` (path -> sha256 already verified) is filled for the linked files."""
    for name in REQUIRED:
        if name not in files:
            raise CheckpointError(f"the checkpoint has no {name}" + (" among the files --include/--exclude select"
                                                                     if include or exclude else ""))
    cfg = ModelConfig.from_json_file(files["config.json"])
    sel = select_shards(read_index(files[INDEX_NAME]), cfg, skip_mtp=skip_mtp)
    absent = [s for s in sel.shards if s not in files]
    if absent:
        raise CheckpointError(f"{INDEX_NAME} names shard {absent[0]!r}, which is not among the checkpoint's files"
                              + (" selected by --include/--exclude" if include or exclude else "")
                              + f" ({len(absent)} missing)")
    kept = set(sel.shards)
    linked: dict[str, str] = {}
    for rel, path in sorted(files.items()):
        if rel.endswith(".safetensors") and rel not in kept:
            continue  # a shard --skip-mtp dropped, or one the index does not name
        if rel == INDEX_NAME and not sel.complete:
            continue  # rewritten below for the kept shards
        link_or_copy(path, out / safe_relpath(rel))
        if digests and rel in digests:
            linked[rel] = digests[rel]
    if not sel.complete:
        total = sum(t.nbytes for s in sel.shards for t in read_header(out / s).tensors.values())
        atomic_write_json(out / INDEX_NAME, {
            "metadata": {"total_size": total, "dsbuild": {
                "skip_mtp": True, "dropped_shards": sel.dropped_shards,
                "kept_mtp_tensors": sel.kept_mtp_tensors}},
            "weight_map": dict(sorted(sel.weight_map.items()))})
    expected = expected_tensors(cfg, sel.weight_map, skip_mtp=skip_mtp)
    try:
        layout = validate_checkpoint(out, expected=expected)
        finite_checked = check_finite(layout)
    except CheckpointError as exc:
        # The links in the temporary ``out`` vanish with it: name the user's own files instead.
        message = str(exc)
        for rel, path in files.items():
            message = message.replace(str(out / rel), str(path))
        raise type(exc)(message.replace(str(out), "the checkpoint")) from None
    if digests is not None:
        digests.clear()
        digests.update(linked)
    present = [s for s in expected.values() if s.name in layout.index.weight_map]
    return {"shards": len(sel.shards), "tensors": len(layout.index.weight_map),
            # The dtype policy's tensors as stored (docs/tensorrt-llm-contract.md#C-DSREF-1): carried unchanged.
            "dtypes": policy_dtypes_found(present, lambda n: layout.tensor(n).dtype),
            "dropped_shards": len(sel.dropped_shards), "dropped_tensors": sel.dropped_tensors,
            "kept_mtp_tensors": len(sel.kept_mtp_tensors), "finite_tensors_checked": finite_checked}


def directory_files(root: Path, *, include: list[str], exclude: list[str]) -> dict[str, Path]:
    """A local checkpoint's files: the small metadata files and every shard its index names."""
    names = [n for n in SMALL_FILES if (root / n).is_file()]
    if (root / INDEX_NAME).is_file():
        # A shard the index names but the directory lacks stays out, so materialize() names it as missing.
        names += [n for n in read_index(root / INDEX_NAME).shard_files if (root / safe_relpath(n)).is_file()]
    return {n: root / safe_relpath(n) for n in names
            if n in REQUIRED or path_selected(n, include=include, exclude=exclude)}


# ---------------------------------------------------------------------------------------------------------------
# The hub

def _disk_needs(repo: hub.HubRepo, out: Path, files: list[hub.RepoFile]) -> list[tuple[str, Path, int]]:
    """Bytes still needed in the cache, and in ``out`` for what cannot be hard-linked there."""
    missing = hub.bytes_needed(hub.file_states(repo, files))
    same_volume = hub.device_of(repo.cache_dir) == hub.device_of(out)
    copied = 0 if same_volume else sum(f.size for f in files if f.size <= (64 << 20))
    return [("the hub cache", repo.cache_dir, missing), ("the run directory", out, copied)]


def header_conformance(repo: hub.HubRepo, commit: str, cfg: ModelConfig) -> Conformance:
    """The repository's tensors, from their safetensors headers only, against what ``cfg`` implies."""
    found = {n: (t.dtype, t.shape) for n, t in hub.remote_tensors(repo, commit).items()}
    return compare(cfg, found, source=f"{repo.repo_id}@{commit[:12]}")


def require_conformance(conformance: Conformance, *, log: Callable[[str], None]) -> None:
    """One table and one sentence when the headers differ from the catalogue; nothing has been downloaded yet."""
    if conformance.ok:
        return
    for line in conformance.table():
        log(line)
    raise CheckpointError(conformance.sentence())


def fetch_from_hub(spec: RunSpec, commit: str, out: Path, *, log: Callable[[str], None] = print
                   ) -> dict[str, Any]:
    repo = hub_repo_of(spec)
    listed = hub.list_files(repo, commit)
    files = [f for f in listed if f.path in REQUIRED or path_selected(f.path, include=spec.include,
                                                                          exclude=spec.exclude)]
    by_path = {f.path: f for f in files}
    for name in REQUIRED:
        if name not in by_path:
            raise CheckpointError(f"{repo.repo_id}@{commit[:12]} has no {name}; it is not a safetensors checkpoint")
    shards = [f for f in files if f.path.endswith(".safetensors")]
    meta = [f for f in files if not f.path.endswith(".safetensors")]
    # Before anything is downloaded: everything selected must fit (with --skip-mtp the shards are counted once the
    # index says which are needed, and checked again then).
    hub.check_disk_space(_disk_needs(repo, out, meta + ([] if spec.skip_mtp else shards)))
    stats = hub.FetchStats()
    digests = hub.download(repo, commit, meta, workers=spec.fetch_workers, log=log, stats=stats)
    cfg = ModelConfig.from_json_file(hub.blob_path(repo, by_path["config.json"]))
    # Before the first weight byte: the shards' headers (range reads) against the catalogue.
    conformance = header_conformance(repo, commit, cfg)
    require_conformance(conformance, log=log)
    log(f"fetch: {conformance.sentence()} (headers only; stored dtypes {conformance.dtypes})")
    sel = select_shards(read_index(hub.blob_path(repo, by_path[INDEX_NAME])), cfg, skip_mtp=spec.skip_mtp)
    absent = [s for s in sel.shards if s not in by_path]
    if absent:
        raise CheckpointError(f"{INDEX_NAME} of {repo.repo_id}@{commit[:12]} names shard {absent[0]!r}, which "
                              + ("--include/--exclude leave out" if any(f.path == absent[0] for f in listed)
                                 else "the repository does not contain") + f" ({len(absent)} such shard(s))")
    wanted = [by_path[s] for s in sel.shards]
    hub.check_disk_space(_disk_needs(repo, out, wanted))
    log(f"fetch: {repo.repo_id}@{commit[:12]}: {len(meta) + len(wanted)} files, "
        f"{hub.human_bytes(sum(f.size for f in meta + wanted))}"
        + (f" ({len(sel.dropped_shards)} MTP-only shard(s) skipped)" if sel.dropped_shards else ""))
    digests.update(hub.download(repo, commit, wanted, workers=spec.fetch_workers, log=log, stats=stats))
    local = {f.path: hub.blob_path(repo, f) for f in meta + wanted}
    info = materialize(local, out, skip_mtp=spec.skip_mtp, include=spec.include, exclude=spec.exclude,
                       digests=digests)
    info.update({"repo": repo.repo_id, "commit": commit, "endpoint": hub.shown_endpoint(repo.endpoint),
                 "files": len(local), "verified_files": len(local), "fetch": stats.as_dict(),
                 "header_check": {"ok": True, "tensors": conformance.checked, "dtypes": conformance.dtypes}})
    return {"info": info, "digests": digests}


def dry_run_plan(spec: RunSpec, extra: dict[str, Any]) -> dict[str, Any] | str:
    """What fetch would do: files, total bytes, bytes already present, bytes to download."""
    src = resolve_model(spec.model)
    if src.kind != "hub":
        return f"fetch {spec.model} ({extra.get('source')}): link into weights/ and validate"
    repo = hub_repo_of(spec)
    commit = extra["commit"]
    files = [f for f in hub.list_files(repo, commit)
             if f.path in REQUIRED or path_selected(f.path, include=spec.include, exclude=spec.exclude)]
    note = ""
    by_path = {f.path: f for f in files}
    index_blob = hub.blob_path(repo, by_path[INDEX_NAME]) if INDEX_NAME in by_path else None
    config_blob = hub.blob_path(repo, by_path["config.json"]) if "config.json" in by_path else None
    conformance = None
    if config_blob is not None:
        # The dry run fetches config.json (a few kB) and reads every shard's header with range requests: whether
        # the checkpoint is what config.json implies is known before any weight byte is downloaded.
        hub.download(repo, commit, [by_path["config.json"]], workers=1, log=lambda m: None)
        conformance = header_conformance(repo, commit, ModelConfig.from_json_file(config_blob))
    if index_blob and config_blob and index_blob.is_file() and config_blob.is_file():
        # The index is cached: count exactly the shards fetch would download.
        sel = select_shards(read_index(index_blob), ModelConfig.from_json_file(config_blob), skip_mtp=spec.skip_mtp)
        files = [f for f in files if not f.path.endswith(".safetensors") or f.path in set(sel.shards)]
        note = f"; --skip-mtp drops {len(sel.dropped_shards)} shard(s)" if spec.skip_mtp else ""
    elif spec.skip_mtp:
        note = "; --skip-mtp: an upper bound until the index is fetched"
    states = hub.file_states(repo, files)
    total = sum(f.size for f in files)
    present = sum(s.have_bytes for s in states)
    todo = [s for s in states if s.status in ("partial", "missing")]
    check = conformance.sentence() if conformance is not None else "no config.json: headers not checked"
    if conformance is not None and not conformance.ok:
        check += " (it would be refused)\n" + "\n".join(conformance.table())
    return {
        "summary": (f"fetch {repo.repo_id}@{commit[:12]} from {hub.shown_endpoint(repo.endpoint)}: {len(files)} files, "
                    f"{hub.human_bytes(total)}; {hub.human_bytes(present)} already in {repo.cache_dir}; "
                    f"would download {len(todo)} file(s), {hub.human_bytes(total - present)}{note}. "
                    f"Header check: {check}"),
        "header_check": conformance.as_dict() if conformance is not None else None,
        "repo": repo.repo_id, "revision": spec.revision, "commit": commit,
        "endpoint": hub.shown_endpoint(repo.endpoint),
        "cache_dir": str(repo.cache_dir), "files": len(files), "total_bytes": total, "present_bytes": present,
        "download_bytes": total - present, "free_bytes": hub.free_bytes(repo.cache_dir),
        "to_download": [{"path": s.file.path, "size": s.file.size, "have": s.have_bytes, "status": s.status}
                        for s in todo],
        "to_verify": [s.file.path for s in states if s.status == "unverified"],
    }


def run(ctx: StageContext) -> dict[str, Any]:
    spec = ctx.spec
    src = resolve_model(spec.model)
    if src.kind == "hub":
        got = fetch_from_hub(spec, ctx.extra["commit"], ctx.out, log=ctx.log)
        ctx.known_digests.update(got["digests"])
        return got["info"]
    if src.kind == "generated":

        root = ensure_tiny(spec.cache_root / "models", seed=spec.seed, preset_name=src.ref)
    else:
        root = Path(src.ref)
    files = directory_files(root, include=spec.include, exclude=spec.exclude)
    info = materialize(files, ctx.out, skip_mtp=spec.skip_mtp, include=spec.include, exclude=spec.exclude)
    info["source"] = ctx.extra.get("source")
    return info


STAGE = Stage(name="fetch", version=VERSION, output=WEIGHTS, upstream=(), run=run, tools=("safetensors",),
              key_inputs=key_inputs, describe=dry_run_plan, preflight=preflight)

__all__ = ["STAGE", "SMALL_FILES", "link_or_copy", "materialize", "fetch_from_hub", "dry_run_plan"]

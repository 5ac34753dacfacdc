"""The stage engine: content-addressed keys, atomic outputs, the run manifest, the run lock.

A stage is a function that writes only into a fresh temporary directory. Its key hashes its upstream stages' keys,
the spec fields that affect it, extra inputs it declares (e.g. the hub commit sha), its own version and the
versions of the tools it uses.

A stage is complete only when its outputs are what ``manifest.json`` records for its key. Committing a built stage
takes four steps: (1) the stage's manifest entry and completion record are dropped, (2) its directory is renamed
into place, (3) the new manifest entry (key, every file's size and sha256) is written, (4) a completion record
(``<run>/.dsbuild-complete/<stage>.json``: the key, a digest of the entry's output list and each file's size, mtime
and inode) is written last. The cache check is cheap when the record matches the entry and every file still has the
recorded size, mtime and inode; otherwise (no record: a kill between steps, a pulled or copied run) the files are
hashed against the manifest once, and the record rewritten if they match. A process killed at any point leaves at
worst a ``.NAME.tmp-*`` directory the next run removes, or a stage the next run rebuilds or verifies — never
content reported ``cached`` that differs from the manifest (tests/hardening/test_kill_harness.py kills at every
step).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import os
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from builder import __version__
from builder.atomic import atomic_symlink, atomic_write_json, remove_stale_temporaries, staging_dir
from builder.rundir import LATEST, LOCK, MANIFEST, STAGE_RECORDS
from builder.errors import DiskSpaceError, DsbuildError, RunLockedError, SpecError, StageError
from builder.safeio import dumps_json, parse_json
from builder.specs import RunSpec

HASH_CHUNK = 8 << 20


@dataclass
class StageContext:
    spec: RunSpec  # as this stage sees it (Stage.spec_view)
    run_dir: Path
    out: Path  # the temporary directory the stage writes into
    inputs: dict[str, Path]  # upstream stage (by the name this stage knows it under) -> its output directory
    upstream: dict[str, dict[str, Any]]  # upstream stage name -> its manifest entry
    extra: dict[str, Any]  # what the stage's key_inputs returned
    log: Callable[[str], None] = print
    # Digests a stage already computed while writing (relative path -> sha256) so they are not hashed twice.
    known_digests: dict[str, str] = field(default_factory=dict)


@dataclass
class Stage:
    name: str
    version: str
    output: str  # directory name inside the run directory
    upstream: tuple[str, ...]
    run: Callable[[StageContext], dict[str, Any]]
    tools: tuple[str, ...] = ()
    # Inputs that are not spec fields (e.g. the hub commit sha); may raise a DsbuildError (hub unreachable).
    key_inputs: Callable[[RunSpec, dict[str, dict[str, Any]]], dict[str, Any]] | None = None
    # Shown by --dry-run: what the stage would do, without doing it (a line, or a dict with a "summary" line and
    # details for --json).
    describe: Callable[[RunSpec, dict[str, Any]], str | dict[str, Any]] | None = None
    # One stage's code serving another input (the draft model's fetch and quantize): the spec it sees, the stage
    # whose spec fields key it, and the names its upstream stages have in ``StageContext.inputs``.
    spec_view: Callable[[RunSpec], RunSpec] | None = None
    fields_of: str | None = None
    inputs_as: dict[str, str] = field(default_factory=dict)
    # What the stage would refuse about the spec, checked for every stage of a run before any of them starts (and
    # before the run directory is created): raises a DsbuildError. Cheap, no downloads. Its second argument: the
    # names of the run's stages (a check may depend on what runs after it).
    preflight: Callable[[RunSpec, tuple[str, ...]], None] | None = None

    def view(self, spec: RunSpec) -> RunSpec:
        return self.spec_view(spec) if self.spec_view else spec

    def config(self, spec: RunSpec) -> dict[str, Any]:
        """The spec values that affect this stage's output (part of its key)."""
        return self.view(spec).stage_fields(self.fields_of or self.name)


@dataclass
class StageResult:
    name: str
    status: str  # "cached" | "built" | "would build" | "cached (dry run)"
    key: str
    wall_s: float
    bytes: int
    info: dict[str, Any] = field(default_factory=dict)


def tool_versions(names: tuple[str, ...]) -> dict[str, str]:
    out = {"dsbuild": __version__}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = "absent"
    return out


def stage_key(stage: Stage, spec: RunSpec, upstream_keys: dict[str, str], extra: dict[str, Any]) -> str:
    body = {
        "stage": stage.name, "version": stage.version, "upstream": upstream_keys,
        "config": stage.config(spec), "extra": extra, "tools": tool_versions(stage.tools),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def describe_outputs(root: Path, rel_to: Path, known: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every file under ``root`` with size and sha256 (symlinks recorded with their target's digest)."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            continue
        rel = p.relative_to(rel_to).as_posix()
        inner = p.relative_to(root).as_posix()
        digest = (known or {}).get(inner) or sha256_file(p)
        out.append({"path": rel, "size": p.stat().st_size, "sha256": digest})
    return out


class Manifest:
    def __init__(self, run_dir: Path):
        self.path = run_dir / MANIFEST
        self.data: dict[str, Any] = {"dsbuild_version": __version__, "stages": {}}
        if self.path.exists():
            try:
                data = parse_json(self.path.read_bytes(), source=str(self.path), error=StageError)
            except (OSError, StageError):
                data = None
            # Only ever written atomically, so a corrupt manifest was edited by hand: rebuild everything.
            if isinstance(data, dict) and isinstance(data.get("stages"), dict):
                self.data = data

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data.setdefault("stages", {})

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def _record_path(run_dir: Path, stage: str) -> Path:
    return run_dir / STAGE_RECORDS / f"{stage}.json"


def _outputs_digest(entry: dict[str, Any]) -> str:
    body = {"key": entry.get("key"), "dir": entry.get("dir"), "outputs": entry.get("outputs", [])}
    return hashlib.sha256(dumps_json(body, compact=True, sort_keys=True).encode()).hexdigest()


def _stats(run_dir: Path, entry: dict[str, Any]) -> dict[str, list[int]] | None:
    """Each listed file's [size, mtime_ns, inode], or None when one is missing, not a file or of another size.
    A rewrite in place changes the mtime, a replacement by rename the inode; hard links (fetch's, the kill tests')
    keep both. Files the entry does not list are not outputs (e.g. the ``__pycache__`` Triton's python stub writes
    into package/)."""
    stats: dict[str, list[int]] = {}
    try:
        for f in entry.get("outputs", []):
            st = (run_dir / f["path"]).stat()
            if not stat.S_ISREG(st.st_mode) or st.st_size != f["size"]:
                return None
            stats[f["path"]] = [st.st_size, st.st_mtime_ns, st.st_ino]
        return stats if (run_dir / entry["dir"]).is_dir() else None
    except (OSError, KeyError, TypeError):  # a file gone, or an entry edited by hand
        return None


def write_completion(run_dir: Path, stage: str, entry: dict[str, Any]) -> None:
    """Record that ``stage``'s files are, now, exactly what ``entry`` lists (written after the manifest entry)."""
    stats = _stats(run_dir, entry)
    if stats is None:
        raise StageError(f"stage {stage}'s outputs changed while it was being recorded in {run_dir}")
    atomic_write_json(_record_path(run_dir, stage),
                      {"stage": stage, "key": entry["key"], "outputs_digest": _outputs_digest(entry), "files": stats})


def drop_completion(run_dir: Path, stage: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_record_path(run_dir, stage))


def stage_complete(run_dir: Path, stage: str, entry: dict[str, Any], *, repair: bool = True) -> bool:
    """Whether ``stage``'s outputs in ``run_dir`` are what ``entry`` records: the completion record and the files'
    sizes, mtimes and inodes (no reading), else every file's sha256 (then, with ``repair``, the record is
    rewritten). A same-size rewrite whose mtime is set back by hand is the one change the cheap path cannot see."""
    stats = _stats(run_dir, entry)
    if stats is None:
        return False
    try:
        record = parse_json(_record_path(run_dir, stage).read_bytes(), source="completion record", error=StageError)
    except (OSError, StageError):
        record = None
    if (isinstance(record, dict) and record.get("key") == entry.get("key")
            and record.get("outputs_digest") == _outputs_digest(entry) and record.get("files") == stats):
        return True
    if any(sha256_file(run_dir / f["path"]) != f.get("sha256") for f in entry.get("outputs", [])):
        return False
    if repair:
        write_completion(run_dir, stage, entry)
    return True


@contextlib.contextmanager
def run_lock(run_dir: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold ``run_dir``'s lock file (created with the directory if missing) for one dsbuild process at a time.

    A directory this call created that holds nothing but the lock when the work ends (a run refused or failed
    before any stage completed) is removed again, with the parents created for it: a refused run leaves nothing.
    The lock file is unlinked while held, so a process waiting on it re-locks whatever lock file is there after."""
    while True:
        missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # read-only filesystem, a parent that is a file, no permission
            raise SpecError(f"cannot create the run directory {run_dir}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunLockedError(
                f"another dsbuild process (pid {holder}) is working on {run_dir}; wait for it or pass --wait") from None
        try:
            current = os.stat(run_dir / LOCK).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # the previous holder removed the directory it had created: lock the one there now
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        try:
            if missing and [p.name for p in run_dir.iterdir()] == [LOCK]:
                (run_dir / LOCK).unlink()
                for p in missing:  # run_dir first, then the parents created for it, while each is empty
                    p.rmdir()
        except OSError:
            pass  # something else is in it now: it stays
        finally:
            os.close(fd)


def run_pipeline(spec: RunSpec, stages: list[Stage], *, run_dir: Path, force: set[str] | None = None,
                 dry_run: bool = False, wait: bool = False, log: Callable[[str], None] = print,
                 on_stage: Callable[[StageResult], None] | None = None) -> list[StageResult]:
    """Run ``stages`` in order (each one's upstream must come earlier or be in the manifest already)."""
    force = set(force or ())
    results: list[StageResult] = []
    names = tuple(s.name for s in stages)
    for stage in stages:  # refuse now what a later stage would refuse after hours of earlier ones
        if stage.preflight:
            stage.preflight(stage.view(spec), names)
    lock = contextlib.nullcontext() if dry_run else run_lock(run_dir, wait=wait)
    with lock:
        if not dry_run:
            remove_stale_temporaries(run_dir)
        manifest = Manifest(run_dir)
        keys: dict[str, str] = {}
        forced_chain = False
        for stage in stages:
            upstream_entries = {}
            for up in stage.upstream:
                entry = manifest.stages.get(up)
                if entry is None or (up in keys and entry.get("key") != keys[up]):
                    if dry_run and up in keys:
                        upstream_entries[up] = {"key": keys[up], "dir": up, "info": {}}
                        continue
                    raise StageError(f"stage {stage.name} needs stage {up}, which has not been built in {run_dir}")
                upstream_entries[up] = entry
            view = stage.view(spec)
            extra = stage.key_inputs(view, upstream_entries) if stage.key_inputs else {}
            key = stage_key(stage, spec, {u: e["key"] for u, e in upstream_entries.items()}, extra)
            keys[stage.name] = key
            forced_chain = forced_chain or stage.name in force
            entry = manifest.stages.get(stage.name)
            cached = (not forced_chain and entry is not None and entry.get("key") == key
                      and stage_complete(run_dir, stage.name, entry, repair=not dry_run))
            if dry_run:
                what = stage.describe(view, extra) if stage.describe else ""
                res = StageResult(stage.name, "cached" if cached else "would build", key, 0.0,
                                  entry.get("bytes", 0) if cached else 0, {"plan": what} if what else {})
                results.append(res)
                if on_stage:
                    on_stage(res)
                continue
            if cached:
                res = StageResult(stage.name, "cached", key, 0.0, entry.get("bytes", 0), entry.get("info", {}))
                results.append(res)
                if on_stage:
                    on_stage(res)
                continue
            t0 = time.perf_counter()
            final = run_dir / stage.output
            with staging_dir(final) as tmp:
                ctx = StageContext(spec=view, run_dir=run_dir, out=tmp,
                                   inputs={stage.inputs_as.get(u, u): run_dir / e["dir"]
                                           for u, e in upstream_entries.items()},
                                   upstream=upstream_entries, extra=extra, log=log)
                try:
                    info = stage.run(ctx) or {}
                except DsbuildError:
                    raise
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise DiskSpaceError(f"stage {stage.name} ran out of disk space writing under {run_dir}: "
                                             f"{exc.strerror}") from exc
                    raise StageError(f"stage {stage.name} failed: {type(exc).__name__}: {exc}") from exc
                except Exception as exc:  # a bug or an unexpected library failure: say which stage, keep the cause
                    raise StageError(f"stage {stage.name} failed: {type(exc).__name__}: {exc}") from exc
                _fault_pause(stage.name, "before-rename")
                outputs = describe_outputs(tmp, tmp.parent, ctx.known_digests)
                for o in outputs:  # paths as they will be after the rename
                    o["path"] = f"{stage.output}/" + o["path"].split("/", 1)[1]
                # Step 1: nothing may describe the directory about to be replaced.
                drop_completion(run_dir, stage.name)
                if manifest.stages.pop(stage.name, None) is not None:
                    manifest.save()
            _fault_pause(stage.name, "after-rename")  # step 2 (the rename) done, the manifest not yet written
            wall = time.perf_counter() - t0
            total = sum(o["size"] for o in outputs)
            manifest.stages[stage.name] = {
                "key": key, "dir": stage.output, "version": stage.version,
                "inputs": {u: e["key"] for u, e in upstream_entries.items()}, "config": stage.config(spec),
                "extra": extra, "tools": tool_versions(stage.tools), "outputs": outputs, "bytes": total,
                "wall_s": round(wall, 3), "completed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "info": info,
            }
            manifest.data["run_name"] = run_dir.name
            manifest.data["spec"] = json.loads(spec.model_dump_json())
            manifest.save()
            _fault_pause(stage.name, "after-manifest")
            write_completion(run_dir, stage.name, manifest.stages[stage.name])
            res = StageResult(stage.name, "built", key, wall, total, info)
            results.append(res)
            if on_stage:
                on_stage(res)
    return results


FAULT_POINTS = ("before-rename", "after-rename", "after-manifest")


def _fault_pause(stage: str, point: str = "before-rename") -> None:
    """Crash-safety tests set ``DSBUILD_FAULT_PAUSE=<stage>[@<point>]:<seconds>`` to hold a stage at one of
    :data:`FAULT_POINTS` (default ``before-rename``: it wrote its temporary directory, nothing is renamed yet), so
    that a SIGKILL lands at that moment."""
    spec = os.environ.get("DSBUILD_FAULT_PAUSE", "")
    where, _, seconds = spec.partition(":")
    name, _, at = where.partition("@")
    if name == stage and (at or "before-rename") == point:
        print(f"fault-pause {stage}@{point}", flush=True)
        time.sleep(float(seconds or 5))


def _latest_made_by_dsbuild(link: Path) -> bool:
    """``link`` is what :func:`update_latest` makes: a symbolic link to a sibling by name, and that sibling is a run
    directory (it holds a manifest) or gone (a removed run)."""
    if not link.is_symlink():
        return False
    target = os.readlink(link)
    if not target or "/" in target or target in (".", ".."):
        return False
    sibling = link.parent / target
    return not os.path.lexists(sibling) or (sibling.is_dir() and not sibling.is_symlink()
                                              and (sibling / MANIFEST).is_file())


def check_latest(run_dir: Path) -> None:
    """Refuse, before any stage runs, a run whose ``<parent>/latest`` link dsbuild could not update without
    replacing something it did not create (or a run directory itself named ``latest``)."""
    link = run_dir.parent / LATEST
    if run_dir.name == LATEST:
        if _latest_made_by_dsbuild(link):
            return  # rebuilding the run the link already points at
        raise SpecError(f"the run directory {run_dir} is named {LATEST!r}, the name dsbuild gives the link to the "
                        f"newest run in {run_dir.parent}; choose another --out")
    if not os.path.lexists(link) or _latest_made_by_dsbuild(link):
        return
    what = (f"a symbolic link to {os.readlink(link)!r} that dsbuild did not make" if link.is_symlink()
            else "a directory" if link.is_dir() else "a file")
    raise SpecError(f"{link} is {what}; dsbuild keeps {LATEST!r} pointing at the newest run and never replaces what "
                    "it did not create: move it away, or choose an --out in another directory")


def update_latest(run_dir: Path) -> None:
    """Point ``<parent>/latest`` at ``run_dir`` atomically (symlink to a temp name, then rename), only over a link
    dsbuild made (:func:`check_latest`, which the CLI also calls before the stages run)."""
    check_latest(run_dir)
    if run_dir.name == LATEST:
        return
    try:
        atomic_symlink(run_dir.name, run_dir.parent / LATEST, only_over_symlink=True)
    except FileExistsError:
        check_latest(run_dir)  # names what appeared while the stages ran
        raise SpecError(f"{run_dir.parent / LATEST} changed while dsbuild ran; it was left as it is") from None

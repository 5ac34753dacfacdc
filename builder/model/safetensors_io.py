"""Reading and checking safetensors files and the sharded-checkpoint index, treating every byte as untrusted.

The header parser here never trusts a length: the header size is bounded, offsets must be in order, inside the
file and exactly as large as dtype x shape says. Data is read through ``safetensors.safe_open`` (memory-mapped)
only after the header passed these checks. Nothing here needs torch (``dsbuild check``, ``push`` and ``pull`` read
headers without paying for its import); tensor contents are read and written by ``builder.model.safetensors_tensors``.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from builder.atomic import atomic_write_json
from builder.errors import CheckpointError
from builder.paths import safe_relpath
from builder.safeio import parse_json, read_bounded
from builder.model.catalog import Dtype

# The real checkpoint's largest header is a few hundred KB; 100 MB is the format's own cap.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_INDEX_BYTES = 64 * 1024 * 1024



@dataclass(frozen=True)
class TensorHeader:
    name: str
    dtype: Dtype
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    header_len: int
    tensors: dict[str, TensorHeader]
    metadata: dict[str, str]

    @property
    def data_bytes(self) -> int:
        return max((t.end for t in self.tensors.values()), default=0)


def parse_header_bytes(raw: bytes, *, file_size: int, source: str = "<bytes>") -> SafetensorsHeader:
    """Parse and check a safetensors header. ``raw`` holds at least the 8-byte length and the JSON header."""
    if len(raw) < 8:
        raise CheckpointError(f"{source} is truncated: {len(raw)} bytes, no safetensors header")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(f"{source} declares a {header_len}-byte header, over the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > file_size:
        raise CheckpointError(f"{source} is truncated: header needs {8 + header_len} bytes, file has {file_size}")
    if len(raw) < 8 + header_len:
        raise CheckpointError(f"{source} is truncated inside its header")
    header = parse_json(raw[8: 8 + header_len], source=f"the header of {source}", error=CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{source} has a header that is not a JSON object")
    data_size = file_size - 8 - header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{source} has a __metadata__ that is not a string-to-string map")
    tensors: dict[str, TensorHeader] = {}
    for name, entry in header.items():
        tensors[name] = _parse_entry(name, entry, source)
    # The data section must be covered exactly, as the safetensors library itself requires when it opens the file
    # (build does; docs/hardening-facts.md ST-1): tensors back to back from byte 0, no gap, nothing after the last.
    spans = sorted(tensors.values(), key=lambda t: (t.begin, t.end))
    # Data past the end first: it is what a truncated download looks like, and it explains any gap it causes.
    end = max((t.end for t in spans), default=0)
    if end > data_size:
        raise CheckpointError(f"{source}: tensor data ends at byte {end} but the file holds only {data_size} data bytes")
    cursor = 0
    for t in spans:
        if t.begin < cursor:
            raise CheckpointError(f"{source}: tensor {t.name!r} overlaps the tensor before it (offset {t.begin} < {cursor})")
        if t.begin > cursor:
            raise CheckpointError(f"{source}: {t.begin - cursor} bytes at data offset {cursor} belong to no tensor "
                                  f"(a gap before {t.name!r})")
        cursor = t.end
    if cursor < data_size:
        raise CheckpointError(f"{source}: {data_size - cursor} trailing bytes after the last tensor belong to no tensor")
    return SafetensorsHeader(source, header_len, tensors, dict(metadata))


def _parse_entry(name: str, entry: Any, source: str) -> TensorHeader:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{source}: header entry {name!r} is not an object")
    dtype_name = entry.get("dtype")
    try:
        dtype = Dtype(dtype_name)
    except ValueError:
        raise CheckpointError(f"{source}: tensor {name!r} has dtype {dtype_name!r}, which dsbuild does not accept") from None
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape):
        raise CheckpointError(f"{source}: tensor {name!r} has an invalid shape {shape!r}")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise CheckpointError(f"{source}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise CheckpointError(
            f"{source}: tensor {name!r} spans {end - begin} bytes but {dtype.value} x {shape} needs {expected}")
    return TensorHeader(name, dtype, tuple(shape), begin, end)


def read_header(path: str | Path) -> SafetensorsHeader:
    path = Path(path)
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:  # a FIFO must not hang the open
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"{path} is not a regular file")
            size = st.st_size
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated: {len(head)} bytes, no safetensors header")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path} declares a {header_len}-byte header, over the {MAX_HEADER_BYTES}-byte limit")
            raw = head + fh.read(min(header_len, max(size - 8, 0)))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    return parse_header_bytes(raw, file_size=size, source=str(path))


# ---------------------------------------------------------------------------------------------------------------
# The index

@dataclass(frozen=True)
class CheckpointIndex:
    weight_map: dict[str, str]  # tensor -> shard file name
    metadata: dict[str, Any]

    @property
    def shard_files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


def parse_index_bytes(raw: bytes, *, source: str = "model.safetensors.index.json") -> CheckpointIndex:
    if len(raw) > MAX_INDEX_BYTES:
        raise CheckpointError(f"{source} is {len(raw)} bytes, over the {MAX_INDEX_BYTES}-byte limit")
    data = parse_json(raw, source=source, error=CheckpointError, object_pairs_hook=_reject_duplicate_keys(source))
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise CheckpointError(f"{source} has no weight_map object")
    weight_map: dict[str, str] = {}
    for tensor, shard in data["weight_map"].items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{source}: tensor {tensor!r} maps to {shard!r}, not a file name")
        weight_map[tensor] = safe_relpath(shard, what=f"shard name in {source}")
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{source}: metadata is not an object")
    return CheckpointIndex(weight_map, metadata)


def _reject_duplicate_keys(source: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise CheckpointError(f"{source} names {k!r} twice")
            out[k] = v
        return out
    return hook


def read_index(path: str | Path) -> CheckpointIndex:
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        raise CheckpointError(f"no index at {path}")
    raw = read_bounded(path, limit=MAX_INDEX_BYTES, what="checkpoint index", error=CheckpointError)
    return parse_index_bytes(raw, source=str(path))


# ---------------------------------------------------------------------------------------------------------------
# Whole-checkpoint validation

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class CheckpointLayout:
    """Where every tensor of a checked checkpoint lives, and its header entry."""

    root: Path
    index: CheckpointIndex
    headers: dict[str, SafetensorsHeader]  # shard file -> header

    def tensor(self, name: str) -> TensorHeader:
        return self.headers[self.index.weight_map[name]].tensors[name]

    def file_of(self, name: str) -> Path:
        return self.root / self.index.weight_map[name]


def validate_checkpoint(root: str | Path, *, expected: Mapping[str, Any] | None = None,
                        allow_missing: Iterable[str] = ()) -> CheckpointLayout:
    """Check headers and index: every indexed tensor is in exactly the shard the index names, every shard exists,
    no shard holds a tensor the index does not name. With ``expected`` (name -> TensorSpec) also check that the
    checkpoint holds exactly those tensors with those shapes and dtypes (minus ``allow_missing``)."""
    root = Path(root)
    index = read_index(root / INDEX_NAME)
    headers: dict[str, SafetensorsHeader] = {}
    for shard in index.shard_files:
        if not (root / shard).is_file():
            raise CheckpointError(f"{INDEX_NAME} names shard {shard!r}, which does not exist in {root}")
        headers[shard] = read_header(root / shard)
    for tensor, shard in index.weight_map.items():
        if tensor not in headers[shard].tensors:
            raise CheckpointError(f"{INDEX_NAME} puts {tensor!r} in {shard}, but that shard does not hold it")
    for shard, header in headers.items():
        for tensor in header.tensors:
            owner = index.weight_map.get(tensor)
            if owner != shard:
                raise CheckpointError(f"{shard} holds {tensor!r}, which {INDEX_NAME} "
                                      + ("does not name" if owner is None else f"puts in {owner}"))
    if expected is not None:
        skip = set(allow_missing)
        for name, spec in expected.items():
            if name in skip and name not in index.weight_map:
                continue
            if name not in index.weight_map:
                raise CheckpointError(f"checkpoint lacks tensor {name!r} that config.json implies")
            th = headers[index.weight_map[name]].tensors[name]
            if th.shape != tuple(spec.shape):
                raise CheckpointError(f"tensor {name!r} has shape {list(th.shape)} but config.json implies {list(spec.shape)}")
            if not spec.accepts(th.dtype):
                raise CheckpointError(f"tensor {name!r} is {th.dtype.value} but {spec.dtype_rule} was expected")
        extra = sorted(set(index.weight_map) - set(expected))
        if extra:
            raise CheckpointError(f"checkpoint holds {len(extra)} tensor(s) config.json does not imply, e.g. {extra[0]!r}")
    return CheckpointLayout(root, index, headers)


# ---------------------------------------------------------------------------------------------------------------
# Values

# ---------------------------------------------------------------------------------------------------------------
# Writing

def write_index(root: str | Path, weight_map: Mapping[str, str], *, total_size: int) -> None:
    body = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_json(Path(root) / INDEX_NAME, body)


def shard_file_name(i: int, n: int) -> str:
    """DeepSeek names shards with a six-digit total: ``model-00001-of-000163.safetensors``."""
    return f"model-{i:05d}-of-{n:06d}.safetensors"

"""Tensor-by-tensor checkpoint transformation with memory that does not grow with the checkpoint.

Reading: tensors (or row bands of them) are read with ``pread`` at the offsets of the already-validated
safetensors header (``builder.model.safetensors_io``) rather than through a memory map, because pages of a mapping
stay resident (and count in RSS) until the whole file is unmapped — with 4 GB shards that is 4 GB per shard.

Writing: an output shard's header is computed up front from the planned ``(name, dtype, shape)`` list, written
first, then every tensor's bytes are appended in order in bounded pieces (a 1.8 GB embedding passes through in
16 MB pieces). The file is written under a temporary name (large direct writes: ``quantize.seqwrite``) and renamed
when complete. So peak memory is a few pieces plus the writer's blocks, whatever the checkpoint's size.

Overlap: a producer may yield zero-argument functions instead of tensors (reading a piece, dequantizing a band);
the writer runs those on worker threads up to ``AHEAD`` pieces in advance and writes the results in order, so
reading, converting and writing proceed at once (preads, numpy's ``take`` and the writer's ``os.write`` all release
the GIL).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar, Union

import torch

from builder.atomic import atomic_path
from builder.errors import CheckpointError, QuantizationError
from builder.model.catalog import Dtype
from builder.model.safetensors_io import CheckpointLayout, shard_file_name, validate_checkpoint, write_index
from builder.model.safetensors_tensors import DTYPE_OF_TORCH, TORCH_DTYPES
from quantize import fp8_block
from quantize.seqwrite import SequentialWriter

COPY_CHUNK = 16 << 20
BAND_ROWS = 1024  # rows per band for the block dequantization (a multiple of the 128 block)
WORKERS = 2  # threads computing pieces ahead of the writer
AHEAD = 6  # pieces computed ahead of the writer: bounds memory at AHEAD x the largest piece

T = TypeVar("T")
Piece = Union[torch.Tensor, Callable[[], torch.Tensor]]


def ahead(items: Iterable[T | Callable[[], T]], *, workers: int | None = None, depth: int | None = None) -> Iterator[T]:
    """``items`` in order, each zero-argument callable among them replaced by its result, computed on ``workers``
    threads at most ``depth`` items in advance. An exception is raised where its item would have been yielded."""
    depth = AHEAD if depth is None else depth
    with ThreadPoolExecutor(workers or WORKERS, thread_name_prefix="dsbuild-piece") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(item) if callable(item) else item)
                if len(pending) > depth:
                    yield _settled(pending.popleft())
            while pending:
                yield _settled(pending.popleft())
        finally:
            for f in pending:
                if isinstance(f, Future):
                    f.cancel()


def _settled(item):
    return item.result() if isinstance(item, Future) else item


class TensorReader:
    """Reads tensors and row bands of a validated checkpoint with positioned reads (no mmap)."""

    def __init__(self, root: str | Path, layout: CheckpointLayout | None = None):
        self.layout = layout or validate_checkpoint(root)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()  # pieces are read from worker threads

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def names(self) -> list[str]:
        return list(self.layout.index.weight_map)

    def dtype(self, name: str) -> Dtype:
        return self.layout.tensor(name).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self.layout.tensor(name).shape

    def _fd(self, shard: str) -> int:
        with self._lock:
            if shard not in self._fds:
                fd = os.open(self.layout.root / shard, os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):  # shards are read front to back: a larger readahead window
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self._fds[shard] = fd
            return self._fds[shard]

    def location(self, name: str, start: int = 0, length: int | None = None) -> tuple[str, int, int]:
        """``(shard, file offset, length)`` of a tensor's bytes (or of ``length`` of them from ``start``)."""
        shard = self.layout.index.weight_map[name]
        th = self.layout.headers[shard].tensors[name]
        base = 8 + self.layout.headers[shard].header_len + th.begin
        return shard, base + start, th.nbytes - start if length is None else length

    def will_need(self, name: str, start: int = 0, length: int | None = None) -> None:
        """Start reading these bytes into the page cache now (the piece that reads them runs a few pieces later)."""
        self.will_need_range(*self.location(name, start, length))

    def will_need_range(self, shard: str, offset: int, length: int) -> None:
        if hasattr(os, "posix_fadvise") and length > 0:
            os.posix_fadvise(self._fd(shard), offset, length, os.POSIX_FADV_WILLNEED)

    def read_bytes(self, name: str, start: int = 0, length: int | None = None) -> torch.Tensor:
        return self.read_range(*self.location(name, start, length), what=name)

    def read_range(self, shard: str, offset: int, length: int, *, what: str = "") -> torch.Tensor:
        buf = torch.empty(length, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        fd, done = self._fd(shard), 0
        while done < length:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.layout.root / shard} ended while reading {what or f'byte {offset}'!r}")
            done += n
        return buf

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        th = self.layout.tensor(name)
        dt = TORCH_DTYPES[th.dtype]
        shape = th.shape
        if rows is None or not shape:
            return self.read_bytes(name).view(dt).reshape(shape)
        r0, r1 = rows
        row_bytes = th.nbytes // shape[0] if shape[0] else 0
        return self.read_bytes(name, r0 * row_bytes, (r1 - r0) * row_bytes).view(dt).reshape((r1 - r0, *shape[1:]))

    def scale_of(self, name: str) -> str | None:
        scale = name[: -len("weight")] + "weight_scale_inv" if name.endswith(".weight") else None
        return scale if scale in self.layout.index.weight_map else None

    def is_block_fp8(self, name: str) -> bool:
        return self.dtype(name) is Dtype.F8_E4M3 and self.scale_of(name) is not None

    def dequantized(self, name: str, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole tensor in float (block FP8 dequantized, anything else cast)."""
        return torch.cat(list(self.dequantized_bands(name, dtype=dtype))) if self.shape(name) else \
            self.read(name).to(dtype)

    def dequantized_bands(self, name: str, *, dtype: torch.dtype = torch.bfloat16,
                          band: int = BAND_ROWS) -> Iterator[torch.Tensor]:
        return (task() for task in self.dequantized_band_tasks(name, dtype=dtype, band=band))

    def dequantized_band_tasks(self, name: str, *, dtype: torch.dtype = torch.bfloat16,
                               band: int = BAND_ROWS) -> Iterator[Callable[[], torch.Tensor]]:
        """One function per row band that reads and dequantizes it (to run on worker threads: see ``ahead``)."""
        shape = self.shape(name)
        fp8 = self.is_block_fp8(name)
        scale = self.read(self.scale_of(name)) if fp8 else None
        rows = shape[0] if shape else 0
        if rows == 0:
            yield lambda: self.read(name).to(dtype)
            return
        row_bytes = self.layout.tensor(name).nbytes // rows
        for r0 in range(0, rows, band):
            r1 = min(rows, r0 + band)
            self.will_need(name, r0 * row_bytes, (r1 - r0) * row_bytes)
            yield lambda r0=r0, r1=r1: self._dequantized_band(name, r0, r1, scale, dtype)

    def _dequantized_band(self, name: str, r0: int, r1: int, scale: torch.Tensor | None,
                          dtype: torch.dtype) -> torch.Tensor:
        part = self.read(name, (r0, r1))
        if scale is None:
            return part.to(dtype)
        b = fp8_block.BLOCK
        return fp8_block.dequantize(part, scale[r0 // b: math.ceil(r1 / b)], dtype=dtype)


@dataclass(frozen=True)
class Planned:
    """One output tensor: its stored form and a producer of its bytes, in row order, in bounded pieces (tensors, or
    zero-argument functions computing them, which the writer runs ahead on worker threads)."""

    name: str
    dtype: Dtype
    shape: tuple[int, ...]
    produce: Callable[[], Iterable[Piece]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def passthrough(reader: TensorReader, name: str) -> Planned:
    def produce() -> Iterator[Callable[[], torch.Tensor]]:
        total = reader.layout.tensor(name).nbytes
        for start in range(0, total, COPY_CHUNK):
            reader.will_need(name, start, min(COPY_CHUNK, total - start))
            yield lambda start=start: reader.read_bytes(name, start, min(COPY_CHUNK, total - start))
    return Planned(name, reader.dtype(name), reader.shape(name), produce)


def computed(name: str, dtype: Dtype, shape: tuple[int, ...], fn: Callable[[], Iterable[Piece]]) -> Planned:
    return Planned(name, dtype, tuple(shape), fn)


def _header(entries: list[Planned], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype.value, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


def write_checkpoint(out: Path, shards: list[list[Planned]], *, on_bytes: Callable[[int], None] | None = None) -> dict[str, str]:
    """Write planned shards (empty ones dropped) with DeepSeek's shard names and the index; returns the weight map."""
    shards = [s for s in shards if s]
    files = [(out / shard_file_name(i, len(shards)), entries) for i, entries in enumerate(shards, start=1)]
    _write_files(files, on_bytes=on_bytes)
    weight_map = {e.name: path.name for path, entries in files for e in entries}
    write_index(out, weight_map, total_size=sum(e.nbytes for _, entries in files for e in entries))
    return weight_map


def _write_files(files: list[tuple[Path, list[Planned]]], *, metadata: dict[str, str] | None = None,
                 on_bytes: Callable[[int], None] | None = None) -> list[int]:
    """Write safetensors files in order through one look-ahead pipeline (it does not drain between files); each
    file is written under a temporary name and renamed when complete and fsync-ed."""
    owners: deque[tuple[int, int]] = deque()  # (file, entry) of each piece handed to ``ahead``, in order

    def pieces() -> Iterator[Piece]:
        for fi, (_, entries) in enumerate(files):
            for ei, e in enumerate(entries):
                for piece in e.produce():
                    owners.append((fi, ei))
                    yield piece
    stream = ((owners.popleft(), chunk) for chunk in ahead(pieces()))
    held: tuple[tuple[int, int], torch.Tensor] | None = None  # the first piece of the next file
    sizes = []
    try:
        for fi, (path, entries) in enumerate(files):
            written = [0] * len(entries)
            with atomic_path(path, fsync=False) as tmp:  # SequentialWriter fsyncs on close
                with SequentialWriter(tmp) as fh:
                    fh.write(_header(entries, dict(metadata or {"format": "pt"})))
                    while (held := held or next(stream, None)) is not None and held[0][0] == fi:
                        (_, ei), chunk = held
                        held = None
                        e = entries[ei]
                        if chunk.dtype is not torch.uint8 and DTYPE_OF_TORCH.get(chunk.dtype) is not e.dtype:
                            raise CheckpointError(f"{e.name}: produced {chunk.dtype}, planned {e.dtype.value}")
                        if not _finite(chunk):
                            raise QuantizationError(
                                f"quantize computed non-finite values (NaN or infinity) for {e.name!r}: a source "
                                "value or scale is too large for the output format; refusing to write it")
                        data = chunk.contiguous().view(-1).view(torch.uint8).numpy()
                        fh.write(data)
                        written[ei] += data.nbytes
                        if written[ei] > e.nbytes:
                            raise CheckpointError(f"{e.name}: produced {written[ei]} bytes, planned {e.nbytes}")
                        if on_bytes:
                            on_bytes(data.nbytes)
                    for e, n in zip(entries, written):
                        if n != e.nbytes:
                            raise CheckpointError(f"{e.name}: produced {n} bytes, planned {e.nbytes}")
            sizes.append(path.stat().st_size)
    finally:
        stream.close()  # stops the workers (pending pieces cancelled) before the caller closes its readers
    return sizes


def _finite(chunk: torch.Tensor) -> bool:
    """A computed piece holds no NaN or infinity (raw bytes, uint8, are copies of fetch-checked tensors)."""
    if chunk.dtype is torch.float8_e4m3fn:  # no infinity; NaN is S.1111.111
        return not bool(((chunk.view(torch.uint8) & 0x7F) == 0x7F).any())
    if chunk.is_floating_point():
        return bool(torch.isfinite(chunk).all())
    return True


def source_shards(reader: TensorReader) -> list[list[str]]:
    """The source's tensors grouped by shard, in file order (so output shards mirror input shards)."""
    out = []
    for shard in reader.layout.index.shard_files:
        tensors = reader.layout.headers[shard].tensors
        out.append(sorted(tensors, key=lambda n: tensors[n].begin))
    return out

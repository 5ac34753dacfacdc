"""Tensor contents of safetensors files, the part that needs torch: dtype mapping, the finite-values check on
checkpoint data and ``write_safetensors`` (temp file, then rename; byte-reproducible). Headers, index and layout
checks live in ``builder.model.safetensors_io``, which does not import torch."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import save_file

from builder.atomic import atomic_path
from builder.errors import CheckpointError
from builder.model.catalog import Dtype
from builder.model.safetensors_io import CheckpointLayout

TORCH_DTYPES: dict[Dtype, torch.dtype] = {
    Dtype.F8_E4M3: torch.float8_e4m3fn, Dtype.BF16: torch.bfloat16, Dtype.F32: torch.float32,
    Dtype.F16: torch.float16, Dtype.I8: torch.int8, Dtype.U8: torch.uint8, Dtype.I32: torch.int32,
    Dtype.I64: torch.int64,
}
DTYPE_OF_TORCH = {v: k for k, v in TORCH_DTYPES.items()}


FLOAT_DTYPES = (Dtype.BF16, Dtype.F16, Dtype.F32)  # FP8 has no infinity; its NaN codes are checked by quantize
FINITE_CHUNK = 16 << 20


def check_finite(layout: CheckpointLayout, *, dtypes: Iterable[Dtype] = FLOAT_DTYPES) -> int:
    """Refuse (CheckpointError naming the tensor) a checkpoint whose floating-point tensors hold a NaN or an
    infinity: read in file order, ``FINITE_CHUNK`` bytes at a time. Returns the number of tensors checked."""
    wanted = set(dtypes)
    checked = 0
    for shard, header in sorted(layout.headers.items()):
        tensors = sorted((t for t in header.tensors.values() if t.dtype in wanted), key=lambda t: t.begin)
        if not tensors:
            continue
        base = 8 + header.header_len
        with open(layout.root / shard, "rb", buffering=0) as fh:
            for t in tensors:
                step = FINITE_CHUNK - FINITE_CHUNK % t.dtype.itemsize
                for start in range(t.begin, t.end, step):
                    n = min(step, t.end - start)
                    raw = os.pread(fh.fileno(), n, base + start)
                    if len(raw) != n:
                        raise CheckpointError(f"{layout.root / shard} ended while reading {t.name!r}")
                    finite = torch.isfinite(torch.frombuffer(bytearray(raw), dtype=TORCH_DTYPES[t.dtype]))
                    if not bool(finite.all()):
                        raise CheckpointError(f"tensor {t.name!r} ({t.dtype.value}, in {shard}) holds non-finite "
                                              f"values (at least {int((~finite).sum())} NaN or infinity)")
                checked += 1
    return checked


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str] | None = None) -> int:
    """Write atomically (temp file in the same directory, fsync, rename). Returns the file size. A floating-point
    tensor holding NaN or infinity (computed by the caller: a fused or absorbed weight) is refused, naming it."""
    path = Path(path)
    for name, t in tensors.items():
        if t.is_floating_point() and t.dtype in DTYPE_OF_TORCH and t.dtype.itemsize > 1 \
                and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"refusing to write tensor {name!r} to {path.name}: it holds NaN or infinite values")
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {"format": "pt"}))
        with open(tmp, "r+b") as fh:
            _sort_metadata_in_place(fh)
    return path.stat().st_size


def _sort_metadata_in_place(fh) -> None:
    """safetensors serializes ``__metadata__`` from a Rust HashMap, so its key order (and the file's sha256) changes
    from one process to the next; sort it so the same tensors always give the same bytes. Same keys, same length."""
    (n,) = struct.unpack("<Q", fh.read(8))
    raw = fh.read(n)
    header = json.loads(raw)
    if "__metadata__" not in header:
        return
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) > n:  # never happens for a header safetensors wrote; keep its bytes rather than break the file
        return
    fh.seek(8)
    fh.write(body + b" " * (n - len(body)))

"""The same tensors written by two processes give the same bytes (safetensors orders ``__metadata__`` from a Rust
HashMap, which differs per process; write_safetensors sorts it). The kill harness found this: a rebuilt engine
shard had the same stage key but a different sha256 than the clean run's."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from tests.conftest import REPO

WRITE = """
import sys, torch
from builder.model.safetensors_io import read_header
from builder.model.safetensors_tensors import write_safetensors
t = {"b": torch.arange(12, dtype=torch.float32).reshape(3, 4), "a": torch.ones(5, dtype=torch.bfloat16)}
meta = {k: str(i) for i, k in enumerate(["rank", "tp_rank", "pp_rank", "format", "ep_rank", "zeta", "alpha"])}
write_safetensors(sys.argv[1], t, metadata=meta)
h = read_header(sys.argv[1])
assert h.metadata == meta and set(h.tensors) == {"a", "b"}, h
"""


def test_write_safetensors_is_byte_reproducible_across_processes(tmp_path):
    digests = set()
    for i in range(4):
        out = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", WRITE, str(out)], check=True, cwd=REPO,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1

"""Does a checkpoint hold what its ``config.json`` implies? Name, shape and dtype of every tensor against the tensor
catalogue and its dtype policy (docs/tensorrt-llm-contract.md#C-DSREF-1), from headers alone: fetch runs it on the
hub's safetensors headers before a single weight byte is downloaded (``builder.hub.remote_tensors``), and
``dsbuild fetch --dry-run`` shows it. The differences come as one table and one sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from builder.model.catalog import Dtype, TensorSpec, catalog_by_name
from builder.model.config import ModelConfig

KINDS = ("missing", "unexpected", "shape", "dtype")
WORDS = {"missing": "missing", "unexpected": "unexpected", "shape": "with another shape",
         "dtype": "with a dtype outside the policy"}


@dataclass(frozen=True)
class Difference:
    kind: str  # one of KINDS
    tensor: str
    found: str  # "-" when absent
    expected: str  # "-" when not expected

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "tensor": self.tensor, "found": self.found, "expected": self.expected}


@dataclass
class Conformance:
    source: str  # e.g. "deepseek-ai/DeepSeek-V3.2@abc123def456"
    checked: int  # tensors the checkpoint holds
    expected: int  # tensors config.json implies
    differences: list[Difference] = field(default_factory=list)
    dtypes: dict[str, list[str]] = field(default_factory=dict)  # the dtype policy's tensors as found, per kind

    @property
    def ok(self) -> bool:
        return not self.differences

    def counts(self) -> dict[str, int]:
        return {k: sum(d.kind == k for d in self.differences) for k in KINDS}

    def sentence(self) -> str:
        if self.ok:
            return (f"{self.source}: all {self.expected} tensors have the names, shapes and dtypes config.json "
                    "implies")
        parts = [f"{n} {WORDS[k]}" for k, n in self.counts().items() if n]
        return (f"{self.source} does not match what its config.json implies: {', '.join(parts)} "
                f"(of {self.expected} expected tensors); nothing was downloaded")

    def table(self, limit: int = 20) -> list[str]:
        """Aligned text rows (kind, tensor, found, expected): the first ``limit`` differences of each kind."""
        rows = [("kind", "tensor", "found", "expected")]
        for kind in KINDS:
            of_kind = [d for d in self.differences if d.kind == kind]
            rows += [(d.kind, d.tensor, d.found, d.expected) for d in of_kind[:limit]]
            if len(of_kind) > limit:
                rows.append((kind, f"... and {len(of_kind) - limit} more", "", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "ok": self.ok, "checked": self.checked, "expected": self.expected,
                "counts": self.counts(), "sentence": self.sentence(), "dtypes": self.dtypes,
                "differences": [d.as_dict() for d in self.differences]}


def _shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def compare(cfg: ModelConfig, found: dict[str, tuple[str, tuple[int, ...]]], *, source: str) -> Conformance:
    """``found``: tensor name -> (safetensors dtype name, shape), as headers describe them ("" dtype: named by the
    index but absent from its shard)."""
    expected: dict[str, TensorSpec] = catalog_by_name(cfg, include_mtp=True)
    diffs: list[Difference] = []
    dtypes: dict[str, set[str]] = {}
    for name, spec in expected.items():
        if name not in found or not found[name][0]:
            diffs.append(Difference("missing", name, "-", f"{spec.dtype_rule} {_shape(spec.shape)}"))
            continue
        dtype_name, shape = found[name]
        if tuple(shape) != tuple(spec.shape):
            diffs.append(Difference("shape", name, f"{dtype_name} {_shape(shape)}",
                                    f"{spec.dtype_rule} {_shape(spec.shape)}"))
        try:
            dtype = Dtype(dtype_name)
        except ValueError:
            dtype = None
        if dtype is None or not spec.accepts(dtype):
            diffs.append(Difference("dtype", name, dtype_name, spec.dtype_rule))
        elif spec.accepted is not None:
            dtypes.setdefault(spec.kind.value, set()).add(dtype.value)
    for name in sorted(set(found) - set(expected)):
        dtype_name, shape = found[name]
        diffs.append(Difference("unexpected", name, f"{dtype_name} {_shape(shape)}", "-"))
    return Conformance(source=source, checked=sum(1 for v in found.values() if v[0]), expected=len(expected),
                       differences=diffs, dtypes={k: sorted(v) for k, v in sorted(dtypes.items())})

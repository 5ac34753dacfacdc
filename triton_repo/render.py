"""Template files of a pinned TensorRT-LLM version (``templates/trtllm-<version>/``) and rendering a tree of them
with the one strict renderer (``builder.render``: jinja2, ``@@{name}`` placeholders, StrictUndefined)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from builder.errors import PackageError
from builder.render import MARK, placeholders, render_text

TEMPLATE_ROOT = Path(__file__).resolve().parent / "templates"
TEMPLATE_SUFFIX = ".tmpl"

__all__ = ["TEMPLATE_ROOT", "TEMPLATE_SUFFIX", "MARK", "placeholders", "render_text", "render_tree", "template_dir"]


def template_dir(trtllm_version: str) -> Path:
    d = TEMPLATE_ROOT / f"trtllm-{trtllm_version}"
    if not d.is_dir():
        known = sorted(p.name.removeprefix("trtllm-") for p in TEMPLATE_ROOT.glob("trtllm-*"))
        raise PackageError(f"no templates for TensorRT-LLM {trtllm_version}; pinned versions: {', '.join(known)}")
    return d


def render_tree(src: Path, dst: Path, values: Mapping[str, Any]) -> list[Path]:
    """Copy ``src`` into ``dst``, rendering every ``*.tmpl`` (suffix dropped) and copying other files verbatim.
    Returns the written paths."""
    written = []
    for path in sorted(src.rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(src).as_posix()
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == TEMPLATE_SUFFIX:
            target = target.with_suffix("")
            target.write_text(render_text(path.read_text(encoding="utf-8"), values, name=str(path.relative_to(src))),
                              encoding="utf-8")
        else:
            target.write_bytes(path.read_bytes())
        target.chmod(path.stat().st_mode & 0o777)
        written.append(target)
    return written

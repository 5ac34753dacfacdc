"""The strict template renderer.

Placeholders are ``@@{name}``: a delimiter that occurs neither in shell scripts (``${VAR}``, ``$(cmd)``) nor in
Triton's protobuf text format, so templates need no escaping. Rendering fails on a placeholder without a value and
on any ``@@{`` left in the output (TensorRT-LLM's old ``fill_template.py`` used ``safe_substitute`` and left unfilled
``${...}`` in files silently).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Mapping

from builder.errors import PackageError

TEMPLATE_ROOT = Path(__file__).resolve().parent / "templates"
TEMPLATE_SUFFIX = ".tmpl"
MARK = "@@{"


class _Template(string.Template):
    delimiter = "@@"
    # Only the braced form, so a stray "@@" or "@@word" is an error rather than a silent substitution.
    pattern = r"""
    @@(?:
      (?P<escaped>(?!)) |
      \{(?P<braced>[a-z_][a-z0-9_]*)\} |
      (?P<named>(?!)) |
      (?P<invalid>)
    )
    """


def render_text(text: str, values: Mapping[str, Any], *, name: str) -> str:
    try:
        out = _Template(text).substitute({k: str(v) for k, v in values.items()})
    except KeyError as exc:
        raise PackageError(f"template {name} has placeholder @@{{{exc.args[0]}}} with no value") from None
    except ValueError as exc:
        raise PackageError(f"template {name} has a malformed placeholder ({exc})") from None
    if MARK in out:
        line = next(l for l in out.splitlines() if MARK in l)
        raise PackageError(f"rendering {name} left an unfilled placeholder: {line.strip()!r}")
    return out


def placeholders(text: str) -> set[str]:
    """The placeholder names a template uses."""
    return {m.group("braced") for m in _Template.pattern.finditer(text) if m.group("braced")}


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

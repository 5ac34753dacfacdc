"""The one strict template renderer (jinja2 with ``StrictUndefined``), for the Triton repository, the launch files and
the Dockerfile.

Placeholders are ``@@{name}``, blocks ``@@% ... %@@``: delimiters that occur neither in shell scripts (``${VAR}``,
``$(cmd)``, ``${#arr[@]}``) nor in Triton's protobuf text format or Dockerfiles, so templates need no escaping.
Rendering fails (PackageError) on a placeholder without a value, on a malformed ``@@`` and on any ``@@`` left in the
output (TensorRT-LLM's old ``fill_template.py`` left unfilled ``${...}`` in files silently); with ``exact=True`` also
on a value no placeholder uses. Values are rendered as given: a template quotes them for its context with the ``sh``
filter (shell words) or the ``pbtxt`` filter (protobuf text-format strings), and callers validate what cannot be quoted (an ``#SBATCH`` directive, a YAML scalar built as
data instead).
"""

from __future__ import annotations

import re
import shlex
from typing import Any, Mapping

import jinja2
from jinja2 import meta

from builder.errors import PackageError

MARK = "@@"
# Every "@@" of a template must open one of these (the name of a placeholder: lower-case identifier).
_WELL_FORMED = re.compile(r"@@\{[a-z_][a-z0-9_]*(\|[a-z_]+)*\}|@@%.*?%@@|@@#.*?#@@", re.S)


def _sh(value: Any) -> str:
    """A shell word that means exactly ``value`` (no expansion, no word splitting)."""
    return shlex.quote(str(value))


def _pbtxt(value: Any) -> str:
    """The inside of a protobuf text-format string literal that means exactly ``value`` (``config.pbtxt``)."""
    out = []
    for ch in str(value):
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return "".join(out)


_ENV = jinja2.Environment(
    variable_start_string="@@{", variable_end_string="}", block_start_string="@@%", block_end_string="%@@",
    comment_start_string="@@#", comment_end_string="#@@", undefined=jinja2.StrictUndefined, autoescape=False,
    keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
_ENV.filters["sh"] = _sh
_ENV.filters["pbtxt"] = _pbtxt


def placeholders(text: str) -> set[str]:
    """The value names a template uses."""
    return set(meta.find_undeclared_variables(_ENV.parse(text)))


def render_text(text: str, values: Mapping[str, Any], *, name: str, exact: bool = False) -> str:
    stray = _WELL_FORMED.sub("", text)
    if MARK in stray:
        line = next(l for l in stray.splitlines() if MARK in l)
        raise PackageError(f"template {name} has a malformed placeholder: {line.strip()!r}")
    try:
        template = _ENV.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise PackageError(f"template {name} has a malformed placeholder ({exc.message})") from None
    if exact:
        unused = sorted(set(values) - placeholders(text))
        if unused:
            raise PackageError(f"template {name}: value {unused[0]!r} has no placeholder")
    try:
        out = template.render(**values)
    except jinja2.UndefinedError as exc:
        missing = re.search(r"'([^']+)' is undefined", str(exc))
        what = missing.group(1) if missing else str(exc)
        raise PackageError(f"template {name} has placeholder @@{{{what}}} with no value") from None
    if MARK in out:
        line = next(l for l in out.splitlines() if MARK in l)
        raise PackageError(f"rendering {name} left an unfilled placeholder: {line.strip()!r}")
    return out

"""Reading what users and servers hand dsbuild, and writing JSON, without trusting a byte of it.

The one place for:

- :func:`read_bounded`: a file's bytes, at most a limit, and only from a regular file (a directory, ``/dev/zero``,
  a FIFO or a socket is refused before a byte is read; the size guard does not trust ``st_size``, which is 0 for
  devices and pipes: at most ``limit + 1`` bytes are ever read);
- :func:`parse_json` / :func:`parse_yaml`: untrusted text to Python values with bounded nesting, integers of at
  most :data:`MAX_INT_DIGITS` digits and no NaN/Infinity, every failure one sentence in the caller's error class;
- :func:`dumps_json`: the one JSON writer. Strict JSON (``allow_nan=False``): a NaN or infinity anywhere is a
  ``ValueError`` naming where it is, never a bare ``NaN`` in a file another tool must parse.

What Python's json and PyYAML do on their own, and so why the hooks: docs/hardening-facts.md JSON-1, YAML-1.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from builder.errors import DsbuildError

MAX_DEPTH = 64  # nesting of lists/objects; real configs and manifests need fewer than 10
MAX_INT_DIGITS = 40  # ~2**130: more than any count, size or id dsbuild reads

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_bounded(path: str | Path, *, limit: int, what: str, error: type[DsbuildError]) -> bytes:
    """The bytes of the regular file ``path``, refused (``error``) when it is anything else or over ``limit``.

    The file is opened non-blocking (a FIFO with no writer would otherwise hang the open) and checked with
    ``fstat`` on the opened descriptor, so a swap between the check and the read cannot slip a device in."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{what} {path} is {_kind(mode)}, not a regular file")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise error(f"{what} {path} is larger than {limit} bytes")
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# Untrusted JSON and YAML

class _Refused(ValueError):
    """Raised inside the parser's hooks; becomes the caller's error class."""


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS} are accepted)")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is too large to be finite")
    return value


def _constant(name: str) -> Any:
    raise _Refused(f"{name}, which is not JSON")


def _check_depth(value: Any, *, max_depth: int = MAX_DEPTH) -> int:
    """The nesting depth of ``value`` (lists, tuples, dicts), walked iteratively; ``_Refused`` beyond
    ``max_depth``. Shared sub-structures (YAML aliases) are walked once."""
    deepest, seen = 0, set()
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list, tuple)) or id(node) in seen:
            continue
        seen.add(id(node))
        if depth > max_depth:
            raise _Refused(f"it nests deeper than {max_depth} levels")
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def parse_json(raw: bytes | str, *, source: str, error: type[DsbuildError], max_depth: int = MAX_DEPTH,
               object_pairs_hook: Any = None) -> Any:
    """``raw`` parsed as strict JSON with bounded integers and nesting; ``error(f"{source} ...")`` otherwise."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        value = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant,
                           object_pairs_hook=object_pairs_hook)
        _check_depth(value, max_depth=max_depth)
    except UnicodeDecodeError:
        raise error(f"{source} is not UTF-8 text") from None
    except _Refused as exc:
        raise error(f"{source} is refused: {exc}") from None
    except RecursionError:
        raise error(f"{source} is refused: it nests too deeply") from None
    except json.JSONDecodeError as exc:
        raise error(f"{source} is not valid JSON: {exc}") from None
    return value


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with integers bounded like JSON's and non-finite floats refused."""


def _yaml_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    digits = node.value.replace("_", "").lstrip("+-")
    if len(digits) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(digits)} digits (at most {MAX_INT_DIGITS} are accepted)")
    return yaml.SafeLoader.construct_yaml_int(loader, node)


def _yaml_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    value = yaml.SafeLoader.construct_yaml_float(loader, node)
    if not math.isfinite(value):
        raise _Refused(f"the value {node.value[:40]!r} is not a finite number")
    return value


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _yaml_int)
_BoundedLoader.add_constructor("tag:yaml.org,2002:float", _yaml_float)


def parse_yaml(raw: bytes | str, *, source: str, error: type[DsbuildError], max_depth: int = MAX_DEPTH) -> Any:
    """``raw`` parsed with PyYAML's safe loader (no Python objects), bounded like :func:`parse_json`."""
    try:
        value = yaml.load(raw, Loader=_BoundedLoader)  # noqa: S506 -- a SafeLoader subclass
        _check_depth(value, max_depth=max_depth)
    except UnicodeDecodeError:
        raise error(f"{source} is not UTF-8 text") from None
    except _Refused as exc:
        raise error(f"{source} is refused: {exc}") from None
    except RecursionError:
        raise error(f"{source} is refused: it nests too deeply") from None
    except yaml.YAMLError as exc:
        raise error(f"{source} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return value


# ---------------------------------------------------------------------------------------------------------------
# Writing

def dumps_json(obj: Any, *, indent: int | None = 2, sort_keys: bool = False, compact: bool = False) -> str:
    """``obj`` as strict JSON text. A NaN or infinity is a ValueError naming its place (``$.a.b[3]``)."""
    try:
        return json.dumps(obj, indent=None if compact else indent, sort_keys=sort_keys, allow_nan=False,
                          separators=(",", ":") if compact else None)
    except ValueError:
        found = _non_finite(obj)
        if found is None:
            raise  # a circular reference: a bug, shown as one
        raise ValueError(f"refusing to write the non-finite number {found[1]} at {found[0]} as JSON") from None


def _non_finite(obj: Any) -> tuple[str, float] | None:
    """Where the first NaN/infinity in ``obj`` is (``$.key[3]``), or None."""
    seen: set[int] = set()
    stack = [(obj, "$")]
    while stack:
        node, at = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            return at, node
        if isinstance(node, (dict, list, tuple)) and id(node) not in seen:
            seen.add(id(node))
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend((v, f"{at}.{k}" if isinstance(node, dict) else f"{at}[{k}]") for k, v in items)
    return None

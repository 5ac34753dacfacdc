"""The one exception tree of dsbuild.

Every failure a user can cause or meet (bad option, bad checkpoint, unreachable hub, full disk) is raised as a
subclass of :class:`DsbuildError`. The CLI turns it into one sentence on stderr and the class's exit code; any
other exception is a bug and is shown with its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest_choices(word: str, choices: Iterable[str], *, cutoff: float = 0.6, limit: int = 3) -> list[str]:
    """The choices closest to ``word``, best first. Case and ``-``/``_`` are ignored: a choice equal to the word
    that way comes alone; then choices that extend the word (``h100`` -> ``h100-sxm``, ``h100-pcie``); then merely
    similar ones (difflib)."""
    def norm(s: str) -> str:
        return s.lower().replace("_", "-")

    choices = list(dict.fromkeys(choices))
    w = norm(word)
    if not w:
        return []
    equal = [c for c in choices if norm(c) == w and c != word]
    if equal:
        return equal[:1]
    by_norm = {norm(c): c for c in choices if norm(c) != w}
    extending = sorted((c for c in by_norm if c.startswith(w)),
                       key=lambda c: -difflib.SequenceMatcher(None, w, c).ratio())
    close = extending[:limit] or difflib.get_close_matches(w, list(by_norm), n=1, cutoff=cutoff)
    return [by_norm[c] for c in close]


def did_you_mean(word: str, choices: Iterable[str], *, cutoff: float = 0.6) -> str:
    """``" (did you mean 'x'?)"`` for :func:`closest_choices`, or ``""`` when none is close."""
    names = closest_choices(word, choices, cutoff=cutoff)
    return f" (did you mean {' or '.join(repr(n) for n in names)}?)" if names else ""


class DsbuildError(Exception):
    """Base class. ``str(err)`` is the one-sentence message shown to the user."""

    exit_code = 1


class SpecError(DsbuildError):
    """An option, config file or environment variable is invalid. ``option``: the RunSpec field whose value it
    refuses, when one is to blame (the CLI then says where that value came from: flag, variable or config file)."""

    exit_code = 2

    def __init__(self, message: str, *, option: str | None = None):
        super().__init__(message)
        self.option = option


class LayoutError(SpecError):
    """A parallel layout (TP/PP/EP/attention-DP) does not fit the model or the cluster."""


class ModelConfigError(DsbuildError):
    """A model ``config.json`` is missing, malformed or contradicts itself."""

    exit_code = 3


class CheckpointError(DsbuildError):
    """A checkpoint's files are missing, corrupt, or do not match the config (safetensors, index, shapes)."""

    exit_code = 3


class UnsafePathError(CheckpointError):
    """A file name would escape its target directory (``..``, absolute path)."""


class HubError(DsbuildError):
    """The Hugging Face hub (or a local mirror) cannot give what was asked for."""

    exit_code = 4


class HubUnreachableError(HubError):
    """The hub did not answer (refused or dropped connections, timeouts) and the cache could not stand in."""


class DiskSpaceError(DsbuildError):
    """Not enough free space at a destination."""

    exit_code = 5


class QuantizationError(DsbuildError):
    """A quantization mode is unknown, unsupported on the target GPU, or failed."""

    exit_code = 6


class BuildError(DsbuildError):
    """Writing per-rank engines failed; collects the failures of several ranks."""

    exit_code = 7

    def __init__(self, message: str, *, rank_failures: dict[int, str] | None = None):
        self.rank_failures = dict(rank_failures or {})
        if self.rank_failures:
            detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(self.rank_failures.items()))
            message = f"{message} ({detail})"
        super().__init__(message)


class PackageError(DsbuildError):
    """Rendering the Triton repository or launch files failed (e.g. an unfilled placeholder)."""

    exit_code = 8


class ServeError(DsbuildError):
    """The Triton server could not be started, became unhealthy, or a request failed."""

    exit_code = 9


class ServeTimeout(ServeError):
    """A server or its models did not become ready in the time allowed (waiting longer may succeed)."""


class RegistryError(DsbuildError):
    """An OCI registry refused a push/pull, or a reference is malformed. ``status``: the registry's HTTP status
    when it answered; ``transient``: repeating the operation may succeed (5xx, 429, a dropped connection)."""

    exit_code = 10

    def __init__(self, message: str, *, status: int | None = None, transient: bool = False):
        super().__init__(message)
        self.status = status
        self.transient = transient or (status is not None and (status >= 500 or status in (408, 429)))


class VerificationError(DsbuildError):
    """A numeric or digest check failed (reference engine vs transformers, pulled file vs manifest)."""

    exit_code = 11


class RunLockedError(DsbuildError):
    """Another dsbuild process holds the run directory."""

    exit_code = 12


class StageError(DsbuildError):
    """A pipeline stage failed for a reason its own error did not cover."""

    exit_code = 13


class RequestError(SpecError):
    """A generation request is invalid (empty prompt, token id outside the vocabulary, bad sampling value)."""


class ChatFormatError(RequestError):
    """A conversation the model's chat encoding cannot express (tool result without a call, unknown role), or a
    checkpoint whose tokenizer files do not describe a chat encoding dsbuild implements."""

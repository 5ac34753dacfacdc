"""The one retry helper: call again after a transient failure, with capped exponential backoff.

Callers say what is transient (a classifier over exceptions, usually an error's ``transient`` flag or an HTTP status)
and may count or report each retry; everything else fails at once. Used by the hub client (metadata calls and
resumable downloads) and the registry client (blob uploads and downloads).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    attempts: int = 4  # calls in all, the first included
    base_s: float = 0.5
    cap_s: float = 8.0

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first retry)."""
        return min(self.base_s * 2 ** retry, self.cap_s)


def retry(fn: Callable[[], T], *, transient: Callable[[BaseException], bool], backoff: Backoff = Backoff(),
          on_retry: Callable[[int, BaseException], None] | None = None,
          sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, called again while it raises an exception ``transient`` accepts, at most ``backoff.attempts``
    times in all; the last exception is re-raised. ``on_retry(retry_number, exc)`` runs before each wait."""
    if backoff.attempts < 1:
        raise ValueError("backoff.attempts must be at least 1")
    for attempt in range(backoff.attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 -- the classifier decides
            if attempt == backoff.attempts - 1 or not transient(exc):
                raise
            if on_retry is not None:
                on_retry(attempt, exc)
            sleep(backoff.delay(attempt))
    raise AssertionError("unreachable")

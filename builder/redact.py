"""No credential embedded in a URL (``scheme://user:secret@host``) reaches a log line or an error message.

Two places see every such line: the log records dsbuild's libraries create, and the one-sentence errors (and ``-v``
tracebacks) the CLI prints. huggingface_hub logs each retry as a pre-formatted f-string with the full request URL on
the logger ``huggingface_hub.utils._http`` (docs/hardening-facts.md, HFLOG-1): with
``HF_ENDPOINT=http://user:token@host`` the token is in every one of those lines. A filter on a logger applies
only to records created on that logger, not to those propagated from its children, so :func:`install` attaches
:class:`RedactingFilter` to every logger of the libraries that may print request URLs (huggingface_hub, httpx,
httpcore, urllib3, requests) and to the handlers of the root and ``huggingface_hub`` loggers, which also see
records of module loggers created later; the CLI's error printer runs :func:`redact_urls` over what it prints.
"""

from __future__ import annotations

import logging
import re

REDACTED = "***"
# The user-info of any URL-like text: from scheme:// to the authority's last "@" (RFC 3986: the authority ends at
# "/", "?" or "#"; a password typed with a bare "@" in it is still covered whole).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s'\"]*@")
# Libraries whose loggers may print request URLs; huggingface_hub's retry logger by name, since it must be filtered
# even when install() runs before huggingface_hub is imported.
LIBRARIES = ("huggingface_hub", "httpx", "httpcore", "urllib3", "requests")
LIBRARY_LOGGERS = (*LIBRARIES, "huggingface_hub.utils._http")


def redact_urls(text: str) -> str:
    """``text`` with the user-info of every URL in it replaced by ``***``."""
    return _USERINFO.sub(rf"\1{REDACTED}@", text) if "@" in text else text


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (and the traceback it carries) without URL credentials; drops nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 -- a record whose args do not fit its format: leave it to logging
            return True
        clean = redact_urls(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_urls(record.exc_text)
        return True


_FILTER = RedactingFilter()


def install() -> None:
    """Attach the filter where library records are created and emitted (idempotent: call it again after importing
    a library that adds its own handler, as huggingface_hub does on import)."""
    names = set(LIBRARY_LOGGERS) | {n for n in logging.root.manager.loggerDict if n.split(".")[0] in LIBRARIES}
    loggers = [logging.getLogger(n) for n in sorted(names)]
    for logger in loggers:
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for logger in (logging.getLogger(), logging.getLogger("huggingface_hub")):
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)

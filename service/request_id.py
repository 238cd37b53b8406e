"""``X-Request-ID``: one id per HTTP request — the client's when it sends a valid one, else a new one — on the
response, in every JSON error body (``error.request_id``) and in every log record made while the request is served.

The id lives in a context variable set by the guard middleware for the request's task (code that runs for it,
threads started with ``anyio.to_thread`` included, sees it); log records get it as ``record.request_id`` through
:class:`RequestIdFilter` (``-`` outside a request).

>>> parse_request_id(b"req-42.a_b:c")
'req-42.a_b:c'
>>> parse_request_id(b"has space") is None
True
"""

from __future__ import annotations

import logging
import re
import secrets
from contextvars import ContextVar

HEADER = "X-Request-ID"
MAX_LENGTH = 128  # characters of a client-given id
# letters, digits and . _ : - (no spaces, quotes or separators: safe in logs, headers and JSON unescaped)
_SAFE = re.compile(rb"[A-Za-z0-9._:-]+")
RULE = f"1 to {MAX_LENGTH} characters, letters, digits and . _ : - only"

current_request_id: ContextVar[str | None] = ContextVar("difflora_request_id", default=None)


def new_request_id() -> str:
    """A fresh id: ``req_`` and 24 hex digits."""
    return "req_" + secrets.token_hex(12)


def parse_request_id(value: bytes) -> str | None:
    """The client's id if it follows :data:`RULE`, else None."""
    if not 1 <= len(value) <= MAX_LENGTH or _SAFE.fullmatch(value) is None:
        return None
    return value.decode("ascii")


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (the current request's id, ``-`` outside one) so formats can use it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get() or "-"
        return True


def install_log_filter(handlers: list[logging.Handler] | None = None) -> None:
    """Put :class:`RequestIdFilter` on ``handlers`` (default: the root logger's), once each."""
    for h in handlers if handlers is not None else logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdFilter) for f in h.filters):
            h.addFilter(RequestIdFilter())

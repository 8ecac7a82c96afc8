"""The agent's log: one line per record, as text for people or JSON for collectors.

Every record made while a call is served carries that call's request id: the
caller's ``x-request-id`` metadata when it sends a usable one, else an id the
agent makes, so the lines of one call can be found together. Structured
fields ride on ``extra={"fields": {...}}``; both formats print them.

Nothing here formats request bodies: cookies, keys and certificates never
reach a log call (the cookie key's repr is redacted, and the access log names
only the method, pid, status and timing).
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import re
import secrets
import sys
from collections.abc import Iterable
from typing import TextIO

FORMATS = ("text", "json")
DEFAULT_FORMAT = "text"  # a person at a terminal; the Kubernetes and systemd deployments ask for json
REQUEST_ID_KEY = "x-request-id"

# Printable, no spaces or quotes, bounded: safe to print in either format and to index.
_USABLE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("vmctl_request_id", default="")


def request_id_from(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The caller's x-request-id if usable, else a fresh one (16 hex digits)."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _USABLE_REQUEST_ID.fullmatch(value):
            return value
    return secrets.token_hex(8)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def _fields(record: logging.LogRecord) -> dict[str, object]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, RFC 3339), level, logger, message,
    request_id inside a call, the record's fields, and exception text."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request: str = getattr(record, "request_id", "")  # set by _RequestIdFilter
        if request:
            entry["request_id"] = request
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = dict(_fields(record))
        request: str = getattr(record, "request_id", "")  # set by _RequestIdFilter
        if request:
            extras = {"request_id": request, **extras}
        if not extras:
            return line
        head, newline, rest = line.partition("\n")  # keep key=value on the first line, before any traceback
        pairs = " ".join(f"{key}={value}" for key, value in extras.items())
        return f"{head} {pairs}{newline}{rest}"


def configure(level: str, log_format: str = DEFAULT_FORMAT, stream: TextIO | None = None) -> None:
    """Route every logger (grpc's included) through one handler on stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())

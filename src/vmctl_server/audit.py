"""The audit log: one JSON line for every AdviseRanges, allowed or refused.

Each record is written with a single ``write(2)`` on a descriptor opened with
``O_APPEND`` (or standard output), so it reaches the kernel whole before the
call is answered, and lines from concurrent calls never interleave. Python's
buffering is bypassed: there is nothing to flush and nothing lost in a buffer
when the agent is killed.

The log fails closed. The agent writes an ``agent_started`` record before it
serves, so an unwritable log stops it at once; if a write fails later (disk
full, a closed pipe), that call's answer still tells the truth about the
advice it applied, but further AdviseRanges calls are refused with
UNAVAILABLE ``AUDIT_UNAVAILABLE`` until a record can be written again.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from vmctl_server import safefiles

log = logging.getLogger("vmctl.audit")
STDOUT = "-"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    def __init__(self, path: str = STDOUT) -> None:
        self.path = path
        if path == STDOUT:
            self._fd = os.dup(1)  # our own descriptor: stays valid whatever else rebinds sys.stdout
        else:
            self._fd = safefiles.open_append_log(path)  # no links, the agent's own file, no other writer
        self._lock = threading.Lock()
        self.healthy = True

    def write(self, record: dict[str, Any], message: str) -> bool:
        """Append one record; False (and the log marked unhealthy) if it could not be written.

        Records carry the keys of the agent's JSON log lines too (level,
        logger, message), so where both streams end up in one collector
        (a container's output) every line has one shape.
        """
        head = {"time": _now(), "level": "info", "logger": "vmctl.audit", "message": message}
        line = (json.dumps({**head, **record}, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            try:
                view = memoryview(line)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
            except OSError as exc:
                if self.healthy:
                    log.critical("cannot write the audit log %s: %s; advice is refused until it can", self.path, exc)
                self.healthy = False
                return False
            if not self.healthy:
                log.warning("the audit log %s is writable again", self.path)
            self.healthy = True
            return True

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class AdviceAudit:
    """What one AdviseRanges call did, gathered as it goes."""

    caller: dict[str, object]
    pid: int
    advice: str
    filter: str
    dry_run: bool
    range_count: int
    requested_bytes: int
    cookie_sent: bool
    target: dict[str, object] = field(default_factory=dict)  # start_time, comm, cgroup, uid once read
    rule: str = ""
    advised_bytes: int = 0
    syscalls: int = 0

    def summary(self, status: str) -> str:
        return f"advise {self.advice or '?'} pid {self.pid}: {status}"

    def record(self, status: str, reason: str = "", message: str = "") -> dict[str, Any]:
        return {
            "event": "advise",
            **self.caller,
            "pid": self.pid,
            "start_time": self.target.get("start_time"),
            "comm": self.target.get("comm"),
            "cgroup": self.target.get("cgroup"),
            "target_uid": self.target.get("uid"),
            "advice": self.advice,
            "filter": self.filter,
            "dry_run": self.dry_run,
            "ranges": self.range_count,
            "requested_bytes": self.requested_bytes,
            "advised_bytes": self.advised_bytes,
            "syscalls": self.syscalls,
            "cookie": cookie_outcome(self.cookie_sent, status, reason),
            "rule": self.rule,
            "status": status,
            "reason": reason,
            **({"detail": message} if message else {}),
        }


_COOKIE_BY_REASON = {
    "COOKIE_REQUIRED": "missing",
    "COOKIE_INVALID": "invalid",
    "LAYOUT_CHANGED": "stale_layout",
    "PROCESS_CHANGED": "process_changed",
}


# Refusals that come only after the cookie passed every check.
_AFTER_COOKIE = {"RANGE_UNMAPPED"}


def cookie_outcome(sent: bool, status: str, reason: str) -> str:
    """``absent`` (none sent, none required), ``missing``, ``invalid``,
    ``process_changed``, ``stale_layout``, ``valid``, or ``unchecked``: the
    call was refused before the cookie had been checked to the end."""
    if reason in _COOKIE_BY_REASON:
        return _COOKIE_BY_REASON[reason]
    if not sent:
        return "absent"
    return "valid" if status == "OK" or reason in _AFTER_COOKIE else "unchecked"

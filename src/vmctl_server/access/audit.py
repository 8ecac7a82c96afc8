"""The audit log: JSON lines saying who asked the agent to do what, and what it did.

Records, by ``event``:

- ``advise_intent``: an AdviseRanges that passed every check, written
  *before* its first ``process_madvise``. If it cannot be written, nothing is
  applied (UNAVAILABLE ``AUDIT_UNAVAILABLE``). An intent with no ``advise``
  record after it (same ``request_id``) is a call the agent did not live to
  finish: its advice may have been applied in part.
- ``advise``: the outcome of every AdviseRanges, allowed or refused.
- ``sample``: a sampler (GetVmaInfo with VMA_ATTR_ACCESS) the policy allowed,
  written *before* it clears the process's referenced bits; if it cannot be
  written, nothing is cleared (AUDIT_UNAVAILABLE).
- ``read``: GetVmaInfo, ListProcesses and GetNodeInfo calls refused for who
  the caller is (authentication, policy, limits); reads that succeed are not
  recorded (they change nothing).
- ``policy_reload``: a policy reloaded (SIGHUP), or a bad file kept out.
- ``agent_started`` / ``agent_stopped``.

Each record is written with ``write(2)`` on a descriptor opened with
``O_APPEND`` (or standard output), so it reaches the kernel whole before the
call goes on, survives the agent being killed, and lines from concurrent
calls never interleave. If a write fails part way (a full disk), the file is
cut back to where the record began, so the log never holds half a line.

Refusals decided before the request is read (unauthenticated, no rule
granting the verb, over a limit, the agent draining) are folded: the first of
a kind (same event, method, identity, status, reason) is written at once, the
rest within :data:`FOLD_SECONDS` are counted and written as one record with
``repeated``, so a caller with no rights cannot fill the disk.

The log fails closed: an unwritable log stops the agent at start, and once a
write fails no advice is applied until a record can be written again.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from vmctl_api.words import CookieOutcome, ScopeCheck
from vmctl_server.core import files
from vmctl_server.core.targets import Target

log = logging.getLogger("vmctl.audit")
STDOUT = "-"
FOLD_SECONDS = 60.0  # one record per kind of early refusal per identity per minute, plus a count
MAX_FOLDED_KINDS = 4096  # kinds of refusal tracked at once; the oldest are written out beyond this

# The cookie outcome of a refusal for each reason that judges the cookie itself.
_COOKIE_BY_REASON: dict[str, CookieOutcome] = {
    "COOKIE_REQUIRED": "missing",
    "COOKIE_INVALID": "invalid",
    "LAYOUT_CHANGED": "layout_changed",
    "PROCESS_CHANGED": "process_changed",
}
# Refusals that come only after the cookie passed every check.
_AFTER_COOKIE = {"RANGE_UNMAPPED", "AUDIT_UNAVAILABLE"}


def cookie_outcome(sent: bool, status: str, reason: str) -> CookieOutcome:
    """What became of the cookie of a call that ended with ``status`` and
    ``reason``: one of :data:`vmctl_api.words.COOKIE_OUTCOMES`, the words of
    the metrics too."""
    if reason in _COOKIE_BY_REASON:
        return _COOKIE_BY_REASON[reason]
    if not sent:
        return "absent"
    return "valid" if status == "OK" or reason in _AFTER_COOKIE else "unchecked"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _open_log(path: str) -> int:
    if path == STDOUT:
        return os.dup(1)  # our own descriptor: stays valid whatever else rebinds sys.stdout
    return files.open_append_log(path)  # no links, the agent's own file, no other writer


class AuditLog:
    def __init__(self, path: str = STDOUT) -> None:
        self.path = path
        self._fd = _open_log(path)
        self._regular_file = stat.S_ISREG(os.fstat(self._fd).st_mode)
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
                self._append(line)
            except OSError as exc:
                if self.healthy:
                    log.critical("cannot write the audit log %s: %s; advice is refused until it can", self.path, exc)
                self.healthy = False
                return False
            if not self.healthy:
                log.warning("the audit log %s is writable again", self.path)
            self.healthy = True
            return True

    def _append(self, line: bytes) -> None:
        begin = os.fstat(self._fd).st_size if self._regular_file else -1
        view = memoryview(line)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError:
            if begin >= 0 and len(view) < len(line):  # part of the line got in: take it back out
                try:
                    os.ftruncate(self._fd, begin)
                except OSError as exc:
                    log.critical("cannot cut a partial record from the audit log %s: %s", self.path, exc)
            raise

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class _Fold:
    since: float  # monotonic time of the record written at once
    first_time: str
    record: dict[str, Any]
    message: str
    repeated: int = 0


class RefusalFolder:
    """Writes the first refusal of a kind at once and counts the rest (see the module docs)."""

    def __init__(
        self, audit: AuditLog, window: float = FOLD_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.audit = audit
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        self._folds: dict[tuple[object, ...], _Fold] = {}

    def note(self, key: tuple[object, ...], record: dict[str, Any], message: str) -> None:
        now = self.clock()
        with self._lock:
            fold = self._folds.get(key)
            if fold is not None and now - fold.since < self.window:
                fold.repeated += 1
                return
            expired = self._folds.pop(key, None)
            if len(self._folds) >= MAX_FOLDED_KINDS:
                oldest = min(self._folds, key=lambda k: self._folds[k].since)
                self._write_repeats(self._folds.pop(oldest))
            self._folds[key] = _Fold(now, _now(), record, message)
        if expired is not None:
            self._write_repeats(expired)
        self.audit.write(record, message)

    def flush(self, everything: bool = False) -> None:
        """Write the counts of windows that have ended (all of them with ``everything``)."""
        now = self.clock()
        with self._lock:
            done = [key for key, fold in self._folds.items() if everything or now - fold.since >= self.window]
            folds = [self._folds.pop(key) for key in done]
        for fold in folds:
            self._write_repeats(fold)

    def _write_repeats(self, fold: _Fold) -> None:
        if fold.repeated:
            record = {**fold.record, "repeated": fold.repeated, "first_time": fold.first_time}
            self.audit.write(record, f"{fold.message} (x{fold.repeated} more)")


def sample_record(caller: dict[str, object], request_id: str, target: Target, window_ms: int) -> dict[str, Any]:
    """The record of a sampler about to clear a process's referenced bits."""
    return {
        "event": "sample",
        **caller,
        "request_id": request_id,
        "pid": target.pid,
        "start_time": target.start_time,
        "comm": target.comm,
        "cgroup": target.cgroup,
        "target_uid": target.uid,
        "window_ms": window_ms,
    }


@dataclass
class AdviceAudit:
    """What one AdviseRanges call did, gathered step by step."""

    caller: dict[str, object]
    request_id: str = ""
    pid: int | None = None
    advice: str = ""
    filter: str = ""
    dry_run: bool = False
    range_count: int = 0
    requested_bytes: int = 0
    cookie_sent: bool = False
    target: dict[str, object] = field(default_factory=dict)  # start_time, comm, cgroup, uid once read
    rule: str = ""
    advised_bytes: int = 0
    syscalls: int = 0
    scope: str = "whole"  # as asked (words.SCOPES)
    scope_check: ScopeCheck | Literal[""] = ""  # how the layout is checked (words.SCOPE_CHECKS), once known
    changed_ranges: int = 0  # left out as RANGE_CHANGED

    def summary(self, status: str) -> str:
        return f"advise {self.advice or '?'} pid {self.pid or '?'}: {status}"

    def _fields(self) -> dict[str, Any]:
        return {
            **self.caller,
            "request_id": self.request_id,
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
            "rule": self.rule,
            "scope": self.scope,
            # Whether each range was checked against the snapshot (SCOPE_RANGES ran), and whether
            # SCOPE_RANGES fell back to the whole layout for want of the snapshot.
            "scope_checked": self.scope_check == "ranges",
            "scope_fallback": self.scope_check == "fallback",
            "changed_ranges": self.changed_ranges,
        }

    def intent(self) -> dict[str, Any]:
        """The record written before the first system call."""
        return {"event": "advise_intent", **self._fields(), "cookie": "valid" if self.cookie_sent else "absent"}

    def record(self, status: str, reason: str = "", message: str = "") -> dict[str, Any]:
        """The outcome record."""
        return {
            "event": "advise",
            **self._fields(),
            "advised_bytes": self.advised_bytes,
            "syscalls": self.syscalls,
            "cookie": cookie_outcome(self.cookie_sent, status, reason),
            "status": status,
            "reason": reason,
            **({"detail": message} if message else {}),
        }

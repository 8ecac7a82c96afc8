"""Admission of every VmControl call: identity, then policy, then limits.

The order is deliberate. A caller the policy does not know learns nothing
about the request it sent (no validation errors, no process facts); a caller
over its limits costs the agent one dictionary lookup. Checks on the target
come later, on the process the call will actually touch: for AdviseRanges
inside the advisor, after the pidfd is open and the process's identity has
been checked against the cookie, so the process the policy allowed is the
process advised.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from vmctl_server.audit import STDOUT, AdviceAudit, AuditLog
from vmctl_server.auth import Caller
from vmctl_server.errors import AgentStopping, AuditUnavailable, ProcessChanged
from vmctl_server.limits import IdentityLimits, LimitSettings
from vmctl_server.policy import ADVISE, READ, Policy, PolicyStore, Target, read_target
from vmctl_server.snapshot import Identity, check_pid
from vmctl_server.unixgate import DEFAULT_IDLE_TIMEOUT

DRAIN_QUIET_SECONDS = 0.5


@dataclass
class Guard:
    policies: PolicyStore
    limits: IdentityLimits
    audit: AuditLog
    _calls: int = field(default=0, init=False)
    _draining: bool = field(default=False, init=False)
    _last_arrival: float = field(default=0.0, init=False)
    _idle: threading.Condition = field(default_factory=threading.Condition, init=False)

    @contextlib.contextmanager
    def admit(self, caller: Caller, verb: str) -> Iterator[Policy]:
        """Check the verb and hold one of the caller's limit slots; yields the
        policy in force, which the whole call then uses even across a reload."""
        policy = self.policies.current
        policy.check_verb(caller, verb)
        with self.limits.admit(caller.identity), self._running():
            yield policy

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        with self._idle:
            self._last_arrival = time.monotonic()
            if self._draining:
                raise AgentStopping("the agent is shutting down; the call was not started")
            self._calls += 1
        try:
            yield
        finally:
            with self._idle:
                self._calls -= 1
                if not self._calls:
                    self._idle.notify_all()

    def drain(self, timeout: float, quiet: float = DRAIN_QUIET_SECONDS) -> bool:
        """Admit no more calls; True once those running have finished and no
        call has arrived for ``quiet`` seconds, False if calls are still
        running after ``timeout`` seconds.

        The quiet spell matters because gRPC, once told to stop, cancels the
        calls it has received but not yet handed over: a client would see
        CANCELLED and could not tell whether its advice was applied. Callers
        still sending get AGENT_STOPPING until they stop.
        """
        deadline = time.monotonic() + timeout
        with self._idle:
            self._draining = True
            if not self._idle.wait_for(lambda: not self._calls, timeout):
                return False
            while (left := self._last_arrival + quiet - time.monotonic()) > 0 and time.monotonic() < deadline:
                self._idle.wait(min(left, deadline - time.monotonic()))
            return not self._calls

    @staticmethod
    def check_read(policy: Policy, caller: Caller, pid: int) -> Target | None:
        """For a snapshot: None when the caller may read every process, else
        the target facts the policy was checked against."""
        if policy.reads_any_process(caller):
            return None
        check_pid(pid)
        target = read_target(pid)
        policy.check_target(caller, READ, target)
        return target

    @staticmethod
    def same_process(target: Target | None, start_time: int) -> None:
        """The snapshot must be of the process the policy allowed (pid reuse in between)."""
        if target is not None and target.start_time != start_time:
            raise ProcessChanged(f"pid {target.pid} became another process while it was read", pid=target.pid)

    def require_audit(self) -> None:
        if not self.audit.healthy:
            raise AuditUnavailable(
                f"the audit log {self.audit.path} cannot be written; no advice is applied until it can",
                audit_log=self.audit.path,
            )

    @staticmethod
    def advice_check(policy: Policy, caller: Caller, advice: str, audit: AdviceAudit) -> Callable[[Identity], None]:
        """The advisor's ``check_target``: protection first, then the rules."""

        def check(identity: Identity) -> None:
            target = read_target(identity.pid, identity.comm, identity.start_time)
            audit.target = {
                "start_time": target.start_time,
                "comm": target.comm,
                "cgroup": target.cgroup,
                "uid": target.uid,
            }
            policy.check_protected(target)
            audit.rule = policy.check_target(caller, ADVISE, target, advice).name

        return check


# ---- the agent's flags -----------------------------------------------------------


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: expected an octal mode such as 0600 or 0666") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text}: a socket mode is at most 0777")
    return mode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("authentication, authorization, limits, audit (see SECURITY.md)")
    group.add_argument(
        "--policy",
        metavar="PATH",
        help="YAML policy: who may read or advise which processes; reloaded on SIGHUP"
        " (default: only root on the unix socket, for everything)",
    )
    group.add_argument(
        "--audit-log",
        metavar="PATH",
        default=STDOUT,
        help="append one JSON line per AdviseRanges here, allowed or refused (default: standard output)",
    )
    group.add_argument(
        "--socket-mode",
        type=_octal_mode,
        default=0o600,
        metavar="MODE",
        help="mode of unix sockets (default 0600: root only; 0666 lets every local user reach the policy)",
    )
    group.add_argument(
        "--max-calls-per-identity",
        type=int,
        default=0,
        metavar="N",
        help="VmControl calls one identity may have in flight (default 0: up to --workers)",
    )
    group.add_argument(
        "--rate-per-identity",
        type=float,
        default=0.0,
        metavar="CALLS_PER_S",
        help="token-bucket rate of VmControl calls per identity (default 0: unlimited)",
    )
    group.add_argument(
        "--burst-per-identity",
        type=int,
        default=0,
        metavar="N",
        help="calls an identity may make at once before the rate applies (default: twice the rate, at least 1)",
    )
    group.add_argument(
        "--max-connections", type=int, default=256, metavar="N", help="unix-socket connections open (default 256)"
    )
    group.add_argument(
        "--max-connections-per-uid",
        type=int,
        default=64,
        metavar="N",
        help="unix-socket connections one uid may hold open (default 64)",
    )
    group.add_argument(
        "--connections-reserved-for-root",
        type=int,
        metavar="N",
        help="the last N of --max-connections are for uid 0 only, so other users together can never"
        " lock root out (default: a sixteenth, at least 1)",
    )
    group.add_argument(
        "--connection-idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a unix-socket connection after this long with no byte either way (gRPC clients"
        " reconnect on their next call); keep it above the longest call clients wait for"
        f" (default {DEFAULT_IDLE_TIMEOUT:.0f})",
    )


def from_args(args: argparse.Namespace) -> Guard:
    """The guard the flags describe; a bad policy or an unwritable audit log is an error here, at start."""
    policies = PolicyStore(args.policy)
    burst = args.burst_per_identity or max(1, round(2 * args.rate_per_identity))
    limits = IdentityLimits(LimitSettings(args.max_calls_per_identity, args.rate_per_identity, burst))
    audit = AuditLog(args.audit_log)
    return Guard(policies, limits, audit)

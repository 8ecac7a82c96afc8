"""Admission of every VmControl call, and the record of what was refused.

Admission happens on a call's headers, before its request is read: the
caller is named by the transport (SO_PEERCRED or its certificate), then its
limits are checked (calls in flight, its token bucket, the agent's total),
then whether some rule grants it the verb. A caller with no rights is
refused at once and holds nothing: no worker, no request buffer. The order
is deliberate: limits come before the policy so that a caller with no
rights cannot flood the policy check or the audit log, and a caller the
policy does not know learns nothing about the request it sent (no
validation errors, no process facts).

Checks on the target come later, on the process the call will actually
touch: for AdviseRanges after the pidfd is open and the process's identity
has been checked against the cookie, so the process the policy allowed is
the process advised.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from vmctl_server.access.audit import AuditLog, RefusalFolder
from vmctl_server.access.identity import Caller
from vmctl_server.access.limits import IdentityLimits
from vmctl_server.access.policy import ADVISE, READ, Policy, PolicyStore, Rule
from vmctl_server.core.faults import AgentStopping, LimitExceeded, PolicyDenied, ProcessChanged, VmctlFault
from vmctl_server.core.snapshot import Identity, check_pid
from vmctl_server.core.targets import Target, read_target

DRAIN_QUIET_SECONDS = 0.5
DEFAULT_MAX_CALLS = 64
# Sampling access clears a process's referenced bits, so its pages look unused to
# reclaim, as after cold advice: the policy asks of a sampler what it asks of cold.
SAMPLING_ADVICE = "cold"


class Ticket:
    """An admitted call's hold on its limit slots; :meth:`release` once, when
    its work is over (not merely when its caller went away)."""

    def __init__(self, guard: Guard, identity: str, policy: Policy) -> None:
        self.policy = policy
        self._guard = guard
        self._identity = identity
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._guard._release(self._identity)


@dataclass
class Guard:
    policies: PolicyStore
    limits: IdentityLimits
    audit: AuditLog
    max_calls: int = DEFAULT_MAX_CALLS  # calls admitted at once, all identities together
    refusals: RefusalFolder = field(init=False)
    _calls: int = field(default=0, init=False)
    _draining: bool = field(default=False, init=False)
    _last_arrival: float = field(default=0.0, init=False)
    _idle: threading.Condition = field(default_factory=threading.Condition, init=False)

    def __post_init__(self) -> None:
        self.refusals = RefusalFolder(self.audit)

    def admit(self, caller: Caller, verb: str) -> Ticket:
        """Limits, then the verb, then room: a :class:`Ticket` holding the
        caller's slots and the policy in force, which the whole call then uses
        even across a reload. Raises the refusal; holds nothing then."""
        self.limits.acquire(caller.identity)
        try:
            policy = self.policies.current
            policy.check_verb(caller, verb)
            self._start_call()
        except BaseException:
            self.limits.release(caller.identity)
            raise
        return Ticket(self, caller.identity, policy)

    def _start_call(self) -> None:
        with self._idle:
            self._last_arrival = time.monotonic()
            if self._draining:
                raise AgentStopping("the agent is shutting down; the call was not started")
            if self._calls >= self.max_calls:
                raise LimitExceeded(
                    f"the agent has {self._calls} calls in flight (limit {self.max_calls})",
                    reason="CONCURRENCY_LIMIT",
                    limit=self.max_calls,
                    scope="agent",
                )
            self._calls += 1

    def _release(self, identity: str) -> None:
        self.limits.release(identity)
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
        the target facts the policy was checked against, with the exec id of
        the image they were read from (read_target names it before the facts)."""
        if policy.reads_any_process(caller):
            return None
        check_pid(pid)
        target = read_target(pid)
        policy.check_target(caller, READ, target)
        return target

    @staticmethod
    def same_process(target: Target | None, start_time: int, exec_id: bytes | None = None) -> None:
        """The snapshot must be of the process the policy allowed (pid reuse in
        between), and of the same image: a process of the caller's own that
        exec'd a setuid program meanwhile is no longer the caller's."""
        if target is None:
            return
        if target.start_time != start_time:
            raise ProcessChanged(f"pid {target.pid} became another process while it was read", pid=target.pid)
        if exec_id is not None and target.exec_id and target.exec_id != exec_id:
            raise ProcessChanged(f"process {target.pid} exec'd while it was read", pid=target.pid)

    @staticmethod
    def advice_target(identity: Identity) -> Target:
        """The facts the policy selects on, for a process opened through its pidfd."""
        return read_target(identity.pid, identity.comm, identity.start_time, identity.exec_id)

    @staticmethod
    def check_advice_target(policy: Policy, caller: Caller, target: Target, advice: str) -> Rule:
        """The rules, then protection: the rule that allows ``advice`` on
        ``target``. In that order, a caller learns that a process is protected
        (and why, which names its comm or cgroup) only when its rules let it
        read and advise it."""
        rule = policy.check_target(caller, ADVISE, target, advice)
        policy.check_protected(target)
        return rule

    @staticmethod
    def check_sample_target(policy: Policy, caller: Caller, target: Target) -> Rule:
        """Sampling reads the process and ages its pages in the kernel's eyes:
        the rule that allows ``cold`` advice on it (which takes read too),
        then protection (a process never advised is never sampled either)."""
        try:
            return Guard.check_advice_target(policy, caller, target, SAMPLING_ADVICE)
        except PolicyDenied as refusal:
            raise PolicyDenied(
                "sampling access clears the process's referenced bits, which ages its memory as cold advice does,"
                f" so it takes leave to read it and advise it cold: {refusal.message}",
                **refusal.metadata,
            ) from None

    def record_refusal(
        self, method: str, caller: Caller, code: str, fault: VmctlFault, request_id: str, *, fold: bool
    ) -> None:
        """Audit a call refused with status ``code``: advice always, reads when
        refused for who the caller is.

        ``fold``: a kind of refusal that may come in floods (on a call's
        headers, or a read refused) is folded: the first of a kind at once,
        then a count (see :class:`~vmctl_server.access.audit.RefusalFolder`).
        """
        event = "advise" if method == "AdviseRanges" else "read"
        record: dict[str, object] = {"event": event, "method": method, **caller.audit_fields()}
        record["request_id"] = request_id
        if event == "advise":  # nothing was read or done: the shape of every advise record, zeroed
            record.update(pid=None, advice=None, advised_bytes=0, syscalls=0, cookie="unchecked")
        record.update(status=code, reason=fault.reason)
        message = f"{method} refused: {code} {fault.reason}"
        if fold:
            key = (event, method, caller.identity, code, fault.reason)
            self.refusals.note(key, record, message)
        else:
            self.audit.write(record, message)

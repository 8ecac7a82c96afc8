"""What can go wrong, as plain exceptions the core raises.

The core (procfs, snapshot, cookie, advice) knows nothing of gRPC: it raises
these, and ``transport/grpc_status.py`` alone turns them into statuses. Each
carries a machine-readable ``reason``, one of :data:`vmctl_api.words.REASONS`
(which gives its status code), and metadata naming the field or range at fault.
"""

from __future__ import annotations


class VmctlFault(Exception):
    """Base class: a request the agent refuses, with a reason and details."""

    reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, **metadata: object) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = {key: str(value) for key, value in metadata.items()}


class InvalidRequest(VmctlFault):
    """A malformed field: the request can never succeed as sent. Its reason
    says which check it failed (INVALID_PID, RANGE_UNALIGNED, ...), so every
    refusal names one."""

    def __init__(self, message: str, *, reason: str, **metadata: object) -> None:
        super().__init__(message, reason=reason, **metadata)


class CookieInvalid(VmctlFault):
    """The cookie is not one this agent issued for this process, or was edited."""

    reason = "COOKIE_INVALID"


class CookieRequired(VmctlFault):
    """AdviseRanges without a cookie while the agent requires one."""

    reason = "COOKIE_REQUIRED"


class LayoutChanged(VmctlFault):
    """The address space no longer has the layout the cookie names."""

    reason = "LAYOUT_CHANGED"


class ProcessGone(VmctlFault):
    """No such process, or it exited (a zombie included)."""

    reason = "PROCESS_GONE"


class ProcessChanged(VmctlFault):
    """The pid now names another process (reused), or the process exec'd."""

    reason = "PROCESS_CHANGED"


class NoAddressSpace(VmctlFault):
    """A kernel thread: there is no user address space to read or advise."""

    reason = "NO_ADDRESS_SPACE"


class AccessDenied(VmctlFault):
    """The kernel refused the agent (missing capability or ptrace access)."""

    reason = "ACCESS_DENIED"


class KernelUnsupported(VmctlFault):
    """This kernel lacks the syscall, ioctl or advice asked for."""

    reason = "KERNEL_UNSUPPORTED"


class Unauthenticated(VmctlFault):
    """The caller presented no credentials the agent can check."""

    reason = "UNAUTHENTICATED"


class PolicyDenied(VmctlFault):
    """The policy grants the caller no rule for this verb, target or advice."""

    reason = "POLICY_DENIED"


class ProtectedTarget(VmctlFault):
    """The target is never advised, whatever the policy (pid 1, the agent, ...)."""

    reason = "PROTECTED_TARGET"


class LimitExceeded(VmctlFault):
    """A per-identity concurrency or rate limit; the call may succeed later."""

    reason = "RATE_LIMITED"


class SamplerBusy(VmctlFault):
    """Another sampler held the process until this one's window no longer fitted its deadline."""

    reason = "SAMPLER_BUSY"


class AgentStopping(VmctlFault):
    """The agent is shutting down: the call was not started; another agent will answer."""

    reason = "AGENT_STOPPING"


class AuditUnavailable(VmctlFault):
    """The audit log cannot be written, so no advice is applied until it can."""

    reason = "AUDIT_UNAVAILABLE"


class RequestTimeout(VmctlFault):
    """An admitted call whose request did not arrive in time (see --request-timeout)."""

    reason = "REQUEST_TIMEOUT"

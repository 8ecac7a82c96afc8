"""Exceptions the client raises, each carrying the agent's reason.

The agent attaches a ``google.rpc.ErrorInfo`` to every refusal; its ``reason``
picks the class, so callers can ``except StaleCookieError`` and re-read.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from vmctl_api.words import ERROR_DOMAIN, REASONS


class VmctlError(Exception):
    """Any failed call. ``code`` is the gRPC status name, ``reason`` the agent's."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "UNKNOWN",
        reason: str = "",
        metadata: dict[str, str] | None = None,
        target: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata = metadata or {}
        self.target = target

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "reason": self.reason,
            "message": self.message,
            **({"metadata": self.metadata} if self.metadata else {}),
        }


class StaleCookieError(VmctlError):
    """The cookie no longer names the process's layout: read it again."""


class ProcessChangedError(StaleCookieError):
    """The pid now names another process, or the process exec'd."""


class ProcessGoneError(VmctlError):
    """The process does not exist (any more)."""


class PermissionDeniedError(VmctlError):
    """The agent (or the kernel beneath it) refused the caller."""


class InvalidRequestError(VmctlError):
    """The request was malformed; sending it again cannot help."""


class AgentUnavailableError(VmctlError):
    """The call could not be served now (status UNAVAILABLE): no agent
    answered at the target (this class itself), or the agent answered that it
    cannot serve it yet (the subclasses, which say why). Either way it may
    succeed later, here or at another agent."""


class AgentStoppingError(AgentUnavailableError):
    """The agent answered that it is shutting down: the call was not started,
    so sending it again (once an agent answers) is safe, advice included."""


class AuditUnavailableError(AgentUnavailableError):
    """The agent answered that it cannot write its audit log, so it applies
    no advice until it can; reads still work. Its operator must act."""


_BY_CODE: dict[grpc.StatusCode, type[VmctlError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: ProcessGoneError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: AgentUnavailableError,
}
# The reasons that say more than their status code: what to do next differs.
_SAYS_MORE_THAN_ITS_CODE: dict[str, type[VmctlError]] = {
    "LAYOUT_CHANGED": StaleCookieError,
    "PROCESS_CHANGED": ProcessChangedError,
    "AGENT_STOPPING": AgentStoppingError,
    "AUDIT_UNAVAILABLE": AuditUnavailableError,
}
ERRORS_BY_REASON: dict[str, type[VmctlError]] = {
    reason: _SAYS_MORE_THAN_ITS_CODE.get(reason) or _BY_CODE.get(grpc.StatusCode[meaning.status], VmctlError)
    for reason, meaning in REASONS.items()
}
"""The class raised for each reason the agent can send (:data:`vmctl_api.words.REASONS`)."""


def error_info(call: grpc.Call) -> error_details_pb2.ErrorInfo | None:
    try:
        status = rpc_status.from_call(call)
    except ValueError:  # a status detail that disagrees with the call's own code: ignore it
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def from_rpc_error(exc: grpc.RpcError, target: str = "") -> VmctlError:
    """The VmctlError for a failed call, from a sync ``grpc.Call`` error or a
    ``grpc.aio.AioRpcError`` (which has the same methods but not the type)."""
    is_call = callable(getattr(exc, "code", None)) and callable(getattr(exc, "trailing_metadata", None))
    code = exc.code() if is_call else grpc.StatusCode.UNKNOWN
    details = (exc.details() if is_call else None) or ""
    message = details or str(exc)
    info = error_info(exc) if is_call else None  # type: ignore[arg-type]  # an aio error is no grpc.Call
    reason = info.reason if info else ""
    cls = ERRORS_BY_REASON.get(reason) or _BY_CODE.get(code, VmctlError)
    if info is not None and info.domain == ERROR_DOMAIN and reason:
        # The agent itself answered (a proxy or the transport would not use
        # its domain): its own words. An UNAVAILABLE it sent (stopping, audit
        # log unwritable) is not "no agent answers".
        message = details or (REASONS[reason].means if reason in REASONS else message)
    elif cls is AgentUnavailableError and target.startswith("unix:") and "Permission denied" in message:
        message = (
            f"this user may not connect to the agent's socket at {target} ({message}). Run as root, or ask the"
            " agent's operator to open it to you (vmctl-agent --socket-mode, and a policy rule for your uid)"
        )
    elif cls is AgentUnavailableError and target.startswith("unix:"):
        message = (
            f"no vmctl agent answers at {target} ({message}). Start one with `sudo vmctl-agent`"
            " (or `make run` in a checkout), or pick another with --target / VMCTL_TARGET"
        )
    elif cls is AgentUnavailableError:
        message = f"no vmctl agent answers at {target}: {message}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"{target} did not answer in time ({message}): host down, link down, or agent overloaded"
    return cls(message, code=code.name, reason=reason, metadata=dict(info.metadata) if info else {}, target=target)

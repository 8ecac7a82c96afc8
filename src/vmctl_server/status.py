"""The one place where faults become gRPC statuses.

Every refusal carries a ``google.rpc.ErrorInfo`` (domain ``vmctl.dev``) with a
machine-readable reason and metadata naming the field or range at fault, so
clients branch on ``reason``, never on message text.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from vmctl_server import errors

DOMAIN = "vmctl.dev"

STATUS_CODES: dict[type[errors.VmctlFault], int] = {
    errors.InvalidRequest: code_pb2.INVALID_ARGUMENT,
    errors.CookieInvalid: code_pb2.INVALID_ARGUMENT,
    errors.CookieRequired: code_pb2.INVALID_ARGUMENT,
    errors.LayoutChanged: code_pb2.FAILED_PRECONDITION,
    errors.ProcessGone: code_pb2.NOT_FOUND,
    errors.ProcessChanged: code_pb2.FAILED_PRECONDITION,
    errors.NoAddressSpace: code_pb2.FAILED_PRECONDITION,
    errors.AccessDenied: code_pb2.PERMISSION_DENIED,
    errors.KernelUnsupported: code_pb2.FAILED_PRECONDITION,
    errors.Unauthenticated: code_pb2.UNAUTHENTICATED,
    errors.PolicyDenied: code_pb2.PERMISSION_DENIED,
    errors.ProtectedTarget: code_pb2.PERMISSION_DENIED,
    errors.LimitExceeded: code_pb2.RESOURCE_EXHAUSTED,
    errors.AuditUnavailable: code_pb2.UNAVAILABLE,
    errors.AgentStopping: code_pb2.UNAVAILABLE,
    errors.RequestTimeout: code_pb2.DEADLINE_EXCEEDED,
}


def code_for(fault: errors.VmctlFault) -> int:
    for cls in type(fault).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return code_pb2.INTERNAL


def code_name(fault: errors.VmctlFault) -> str:
    """The status code's name ("PERMISSION_DENIED"), for the audit log."""
    return code_pb2.Code.Name(code_for(fault))


def to_status(fault: errors.VmctlFault) -> grpc.Status:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=fault.reason, domain=DOMAIN, metadata=fault.metadata))
    return rpc_status.to_status(status_pb2.Status(code=code_for(fault), message=fault.message, details=[detail]))


def internal_status(message: str) -> grpc.Status:
    return to_status(errors.VmctlFault(message, reason="INTERNAL"))

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

from vmctl_server.core import faults

DOMAIN = "vmctl.dev"

STATUS_CODES: dict[type[faults.VmctlFault], int] = {
    faults.InvalidRequest: code_pb2.INVALID_ARGUMENT,
    faults.CookieInvalid: code_pb2.INVALID_ARGUMENT,
    faults.CookieRequired: code_pb2.INVALID_ARGUMENT,
    faults.LayoutChanged: code_pb2.FAILED_PRECONDITION,
    faults.ProcessGone: code_pb2.NOT_FOUND,
    faults.ProcessChanged: code_pb2.FAILED_PRECONDITION,
    faults.NoAddressSpace: code_pb2.FAILED_PRECONDITION,
    faults.AccessDenied: code_pb2.PERMISSION_DENIED,
    faults.KernelUnsupported: code_pb2.FAILED_PRECONDITION,
    faults.Unauthenticated: code_pb2.UNAUTHENTICATED,
    faults.PolicyDenied: code_pb2.PERMISSION_DENIED,
    faults.ProtectedTarget: code_pb2.PERMISSION_DENIED,
    faults.LimitExceeded: code_pb2.RESOURCE_EXHAUSTED,
    faults.AuditUnavailable: code_pb2.UNAVAILABLE,
    faults.AgentStopping: code_pb2.UNAVAILABLE,
    faults.RequestTimeout: code_pb2.DEADLINE_EXCEEDED,
}


def code_for(fault: faults.VmctlFault) -> int:
    for cls in type(fault).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return code_pb2.INTERNAL


def code_name(fault: faults.VmctlFault) -> str:
    """The status code's name ("PERMISSION_DENIED"), for the audit log."""
    return code_pb2.Code.Name(code_for(fault))


def to_status(fault: faults.VmctlFault) -> grpc.Status:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=fault.reason, domain=DOMAIN, metadata=fault.metadata))
    return rpc_status.to_status(status_pb2.Status(code=code_for(fault), message=fault.message, details=[detail]))


def internal_status(message: str) -> grpc.Status:
    return to_status(faults.VmctlFault(message, reason="INTERNAL"))

"""The one place where faults become gRPC statuses.

Every refusal carries a ``google.rpc.ErrorInfo`` (domain ``vmctl.dev``) with a
machine-readable reason and metadata naming the field or range at fault, so
clients branch on ``reason``, never on message text. The status code is the
one :data:`vmctl_api.words.REASONS` gives the reason: the client reads the
same registry.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from vmctl_api.words import ERROR_DOMAIN, REASONS
from vmctl_server.core import faults


def code_for(fault: faults.VmctlFault) -> int:
    """The status the registry gives the fault's reason (INTERNAL for a reason it lacks)."""
    reason = REASONS.get(fault.reason)
    return code_pb2.Code.Value(reason.status if reason is not None else "INTERNAL")


def code_name(fault: faults.VmctlFault) -> str:
    """The status code's name ("PERMISSION_DENIED"), for the audit log."""
    return code_pb2.Code.Name(code_for(fault))


def to_status(fault: faults.VmctlFault) -> grpc.Status:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=fault.reason, domain=ERROR_DOMAIN, metadata=fault.metadata))
    return rpc_status.to_status(status_pb2.Status(code=code_for(fault), message=fault.message, details=[detail]))


def internal_status(message: str) -> grpc.Status:
    return to_status(faults.VmctlFault(message, reason="INTERNAL"))

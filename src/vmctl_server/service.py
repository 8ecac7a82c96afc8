"""The gRPC face of the agent: translate messages to plain values and back.

No logic lives here beyond the translation; faults raised by the core become
statuses in :mod:`vmctl_server.status`. GetVmaInfo answers with bytes it
assembled itself: the small header message serialized by protobuf, then the
``vmas`` field as the tables encoded it (protobuf concatenation is merging),
so tens of thousands of VMAs never become Python message objects.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from vmctl_client.proto import vmctl_pb2 as pb
from vmctl_server import status
from vmctl_server.advice import AdviceRequest, Advisor
from vmctl_server.capabilities import Capabilities
from vmctl_server.cookie import CookieSigner
from vmctl_server.errors import VmctlFault
from vmctl_server.node import list_processes, node_info
from vmctl_server.snapshot import SnapshotReader, claims_for

log = logging.getLogger(__name__)
SERVICE_NAME = "vmctl.v1.VmControl"

Handler = TypeVar("Handler", bound=Callable[..., Any])


def _translate_faults(method: Handler) -> Handler:
    @functools.wraps(method)
    def wrapper(self: VmControlService, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except VmctlFault as fault:
            context.abort_with_status(status.to_status(fault))
        except Exception:
            log.exception("%s failed", method.__name__)
            context.abort_with_status(status.internal_status(f"{method.__name__} failed inside the agent; see its log"))

    return wrapper  # type: ignore[return-value]


class VmControlService:
    def __init__(
        self, reader: SnapshotReader, advisor: Advisor, signer: CookieSigner, capabilities: Capabilities
    ) -> None:
        self.reader = reader
        self.advisor = advisor
        self.signer = signer
        self.capabilities = capabilities

    @_translate_faults
    def GetVmaInfo(self, request: pb.GetVmaInfoRequest, context: grpc.ServicerContext) -> bytes:
        snapshot = self.reader.take(request.pid, request.attr_mask)
        identity = snapshot.identity
        header = pb.GetVmaInfoResponse(
            process=pb.Process(pid=identity.pid, start_time=identity.start_time, comm=identity.comm),
            cookie=self.signer.issue(claims_for(identity, snapshot.digest)),
            result_mask=snapshot.result_mask,
        )
        return header.SerializeToString() + snapshot.table.encode(snapshot.result_mask)

    @_translate_faults
    def AdviseRanges(self, request: pb.AdviseRangesRequest, context: grpc.ServicerContext) -> pb.AdviseRangesResponse:
        result = self.advisor.advise(
            AdviceRequest(
                pid=request.pid,
                ranges=[(r.start, r.end) for r in request.ranges],
                advice=request.advice,
                cookie=request.cookie,
                filter=request.filter,
                dry_run=request.dry_run,
            )
        )
        return pb.AdviseRangesResponse(
            requested_bytes=result.requested_bytes,
            advised_bytes=result.advised_bytes,
            syscalls=result.syscalls,
            dry_run=result.dry_run,
            process=pb.Process(pid=result.pid, start_time=result.start_time, comm=result.comm),
            ranges=[
                pb.RangeResult(
                    start=r.start,
                    end=r.end,
                    advised_bytes=r.advised_bytes,
                    skipped_bytes=r.skipped_bytes,
                    error=r.error,
                    errno=r.errno,
                )
                for r in result.ranges
            ],
        )

    @_translate_faults
    def ListProcesses(
        self, request: pb.ListProcessesRequest, context: grpc.ServicerContext
    ) -> pb.ListProcessesResponse:
        return pb.ListProcessesResponse(
            processes=[pb.ProcessInfo(**vars(p)) for p in list_processes(request.cgroup_prefix)]
        )

    @_translate_faults
    def GetNodeInfo(self, request: pb.GetNodeInfoRequest, context: grpc.ServicerContext) -> pb.GetNodeInfoResponse:
        info = node_info(self.capabilities)
        caps = info.capabilities
        response = pb.GetNodeInfoResponse(
            hostname=info.hostname,
            kernel=info.kernel,
            machine=info.machine,
            boot_id=info.boot_id,
            mem_total_bytes=info.mem_total_bytes,
            mem_available_bytes=info.mem_available_bytes,
            swap_total_bytes=info.swap_total_bytes,
            swap_free_bytes=info.swap_free_bytes,
            agent_version=info.agent_version,
            page_size=info.page_size,
            capabilities=pb.Capabilities(
                pidfd_open=caps.pidfd_open,
                process_madvise=caps.process_madvise,
                advices=sorted(caps.advices),
                procmap_query=caps.procmap_query,
                pagemap_scan=caps.pagemap_scan,
                advice_permitted=caps.advice_permitted,
                probe_errors=caps.probe_errors,
            ),
        )
        if info.memory_pressure is not None:
            for kind in ("some", "full"):
                values = info.memory_pressure.get(kind)
                if values:
                    getattr(response.memory_pressure, kind).CopyFrom(
                        pb.PressureStall(
                            avg10=values.get("avg10", 0.0),
                            avg60=values.get("avg60", 0.0),
                            avg300=values.get("avg300", 0.0),
                            total_us=int(values.get("total", 0)),
                        )
                    )
        return response


def _pass_through(data: bytes) -> bytes:
    return data


def rpc_handler(service: VmControlService) -> grpc.GenericRpcHandler:
    """Method handlers for VmControl; GetVmaInfo's response is already bytes."""

    def unary(
        method: Callable[..., Any], request_type: Any, serializer: Callable[[Any], bytes]
    ) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            method, request_deserializer=request_type.FromString, response_serializer=serializer
        )

    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "GetVmaInfo": unary(service.GetVmaInfo, pb.GetVmaInfoRequest, _pass_through),
            "AdviseRanges": unary(
                service.AdviseRanges, pb.AdviseRangesRequest, pb.AdviseRangesResponse.SerializeToString
            ),
            "ListProcesses": unary(
                service.ListProcesses, pb.ListProcessesRequest, pb.ListProcessesResponse.SerializeToString
            ),
            "GetNodeInfo": unary(service.GetNodeInfo, pb.GetNodeInfoRequest, pb.GetNodeInfoResponse.SerializeToString),
        },
    )

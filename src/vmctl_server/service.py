"""The gRPC face of the agent: translate messages to plain values and back.

No logic lives here beyond the translation; faults raised by the core become
statuses in :mod:`vmctl_server.status`. GetVmaInfo and AdviseRanges answer
with bytes they assembled themselves: the small header message serialized by
protobuf, then the repeated field (``vmas``, ``ranges``) as the tables or the
plan encoded it (protobuf concatenation is merging), so tens of thousands of
VMAs or ranges never become Python message objects. AdviseRanges reads its
ranges from the request's own bytes for the same reason (see
:class:`AdviseCall`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError

from vmctl_client.proto import vmctl_pb2 as pb
from vmctl_server import status
from vmctl_server.advice import ADVICE_BY_NUMBER, AdviceRequest, Advisor, RangeSet
from vmctl_server.audit import AdviceAudit
from vmctl_server.auth import Caller, caller_from
from vmctl_server.capabilities import Capabilities
from vmctl_server.cookie import CookieSigner
from vmctl_server.errors import InvalidRequest, VmctlFault
from vmctl_server.guard import Guard
from vmctl_server.node import list_processes, node_info
from vmctl_server.policy import ADVISE, READ
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


class Malformed:
    """A request whose bytes did not parse: refused inside the handler, after
    the caller is known, with INVALID_ARGUMENT instead of gRPC's INTERNAL."""

    def __init__(self, error: str) -> None:
        self.error = error

    def refuse(self) -> InvalidRequest:
        return InvalidRequest(f"the request does not parse: {self.error}", reason="MALFORMED_REQUEST")


@dataclass(frozen=True)
class AdviseCall:
    """An AdviseRangesRequest as protobuf parsed it, and the bytes it came in:
    the advisor's range backend reads the ranges from those (in C, without a
    Python object per range). Other fields read through to the message."""

    message: pb.AdviseRangesRequest
    wire: bytes

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)


@dataclass(frozen=True)
class EncodedReply:
    """A reply already serialized (``wire``), with the header message it
    began from, whose fields read through (the observing interceptor counts
    the bytes advised and the calls made)."""

    header: Any
    wire: bytes

    def __getattr__(self, name: str) -> Any:
        return getattr(self.header, name)


class CallActivity(Protocol):
    def call_started(self) -> None: ...
    def call_ended(self) -> None: ...


def _caller(context: grpc.ServicerContext) -> Caller:
    return caller_from(context.peer(), context.auth_context())


class VmControlService:
    def __init__(
        self,
        reader: SnapshotReader,
        advisor: Advisor,
        signer: CookieSigner,
        capabilities: Capabilities,
        guard: Guard,
    ) -> None:
        self.reader = reader
        self.advisor = advisor
        self.signer = signer
        self.capabilities = capabilities
        self.guard = guard

    @_translate_faults
    def GetVmaInfo(self, request: pb.GetVmaInfoRequest, context: grpc.ServicerContext) -> bytes:
        caller = _caller(context)
        with self.guard.admit(caller, READ) as policy:
            if isinstance(request, Malformed):
                raise request.refuse()
            target = self.guard.check_read(policy, caller, request.pid)
            snapshot = self.reader.take(request.pid, request.attr_mask)
            self.guard.same_process(target, snapshot.identity.start_time, snapshot.identity.exec_id)
        identity = snapshot.identity
        header = pb.GetVmaInfoResponse(
            process=pb.Process(pid=identity.pid, start_time=identity.start_time, comm=identity.comm),
            cookie=self.signer.issue(claims_for(identity, snapshot.digest)),
            result_mask=snapshot.result_mask,
        )
        return snapshot.table.encode(snapshot.result_mask, prefix=header.SerializeToString())

    @_translate_faults
    def AdviseRanges(self, request: AdviseCall | Malformed, context: grpc.ServicerContext) -> EncodedReply:
        caller = _caller(context)
        if isinstance(request, Malformed):
            message, ranges = pb.AdviseRangesRequest(), self.advisor.ranges.from_pairs([])
        else:
            # Read from the request only when first used: over the limit,
            # the advisor refuses on the count alone.
            message, ranges = request.message, self.advisor.ranges.from_message(request.message.ranges, request.wire)
        audit = _advice_audit(caller, request, ranges, self.advisor.max_ranges)
        try:
            with self.guard.admit(caller, ADVISE) as policy:
                if isinstance(request, Malformed):
                    raise request.refuse()
                self.guard.require_audit()
                result = self.advisor.advise(
                    AdviceRequest(
                        pid=message.pid,
                        ranges=ranges,
                        advice=message.advice,
                        cookie=message.cookie,
                        filter=message.filter,
                        dry_run=message.dry_run,
                    ),
                    check_target=self.guard.advice_check(policy, caller, audit.advice, audit),
                    require_cookie=policy.require_cookie,
                )
        except VmctlFault as fault:
            code = status.code_name(fault)
            self.guard.audit.write(audit.record(code, fault.reason, fault.message), audit.summary(code))
            raise
        except Exception:
            self.guard.audit.write(audit.record("INTERNAL", "INTERNAL"), audit.summary("INTERNAL"))
            raise
        audit.advised_bytes, audit.syscalls = result.advised_bytes, result.syscalls
        self.guard.audit.write(audit.record("OK"), audit.summary("OK"))
        header = pb.AdviseRangesResponse(
            requested_bytes=result.requested_bytes,
            advised_bytes=result.advised_bytes,
            syscalls=result.syscalls,
            dry_run=result.dry_run,
            process=pb.Process(pid=result.pid, start_time=result.start_time, comm=result.comm),
        )
        return EncodedReply(header, result.plan.encode(prefix=header.SerializeToString()))

    @_translate_faults
    def ListProcesses(
        self, request: pb.ListProcessesRequest, context: grpc.ServicerContext
    ) -> pb.ListProcessesResponse:
        caller = _caller(context)
        with self.guard.admit(caller, READ) as policy:
            if isinstance(request, Malformed):
                raise request.refuse()
            # Only what the caller may read, judged on the facts the policy sees.
            readable = None if policy.reads_any_process(caller) else functools.partial(policy.may_read, caller)
            processes = list_processes(request.cgroup_prefix, readable)
        return pb.ListProcessesResponse(processes=[pb.ProcessInfo(**vars(p)) for p in processes])

    @_translate_faults
    def GetNodeInfo(self, request: pb.GetNodeInfoRequest, context: grpc.ServicerContext) -> pb.GetNodeInfoResponse:
        with self.guard.admit(_caller(context), READ):
            if isinstance(request, Malformed):
                raise request.refuse()
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


def _advice_audit(caller: Caller, request: AdviseCall | Malformed, ranges: RangeSet, max_ranges: int) -> AdviceAudit:
    if isinstance(request, Malformed):
        return AdviceAudit(caller.audit_fields(), 0, "", "", False, 0, 0, False)
    count = len(ranges)
    return AdviceAudit(
        caller=caller.audit_fields(),
        pid=request.pid,
        advice=ADVICE_BY_NUMBER.get(request.advice, str(request.advice)),
        filter=pb.Filter.Name(request.filter) if request.filter in pb.Filter.values() else str(request.filter),
        dry_run=request.dry_run,
        range_count=count,
        requested_bytes=ranges.total_bytes() if count <= max_ranges else 0,
        cookie_sent=bool(request.cookie),
    )


def _pass_through(data: bytes) -> bytes:
    return data


def _parser(request_type: Any, keep_wire: bool = False) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            message = request_type.FromString(data)
        except DecodeError as exc:
            return Malformed(str(exc) or "not a protobuf message")
        return AdviseCall(message, data) if keep_wire else message

    return parse


def rpc_handler(
    service: VmControlService,
    pool: futures.ThreadPoolExecutor | None = None,
    calls: CallActivity | None = None,
) -> grpc.GenericRpcHandler:
    """Method handlers for VmControl; GetVmaInfo's and AdviseRanges's
    responses are already bytes.

    With ``pool``, VmControl calls run on it instead of the server's own
    pool, which then serves only health and reflection: however many slow
    snapshots are running or queued, a health check finds a free thread.
    (gRPC's ``experimental_thread_pool`` on a handler's behavior picks the
    pool; an interceptor that wraps the behavior must keep the attribute,
    e.g. with functools.wraps.) ``calls`` hears when each call starts and,
    from gRPC's own thread, when it is over and its reply sent (the heap
    trimmer waits for the agent to be idle).
    """

    def unary(
        method: Callable[..., Any], request_type: Any, serializer: Callable[[Any], bytes], keep_wire: bool = False
    ) -> grpc.RpcMethodHandler:
        @functools.wraps(method)
        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            if calls is not None:
                calls.call_started()
                if not context.add_callback(calls.call_ended):
                    calls.call_ended()  # already over (cancelled)
            return method(request, context)

        if pool is not None:
            behavior.experimental_thread_pool = pool  # type: ignore[attr-defined]
        return grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=_parser(request_type, keep_wire), response_serializer=serializer
        )

    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "GetVmaInfo": unary(service.GetVmaInfo, pb.GetVmaInfoRequest, _pass_through),
            "AdviseRanges": unary(service.AdviseRanges, pb.AdviseRangesRequest, attrgetter("wire"), keep_wire=True),
            "ListProcesses": unary(
                service.ListProcesses, pb.ListProcessesRequest, pb.ListProcessesResponse.SerializeToString
            ),
            "GetNodeInfo": unary(service.GetNodeInfo, pb.GetNodeInfoRequest, pb.GetNodeInfoResponse.SerializeToString),
        },
    )

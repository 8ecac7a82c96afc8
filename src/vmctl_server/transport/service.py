"""The gRPC face of the agent: admission on headers, then the work on a worker.

Every VmControl method is served the same way, on the server's event loop
(grpc.aio):

1. the caller is named from the transport (``context.peer()`` and the TLS
   auth context) and admitted by the guard on the call's headers alone: its
   limits, then the policy's verb, then room in the agent. A caller refused
   here has cost a dictionary lookup and holds nothing, not even a buffer
   for its request: the handlers are registered as client-streaming, so gRPC
   hands them the call before any request byte has been read;
2. the request is read, within ``request_timeout`` seconds (a caller that
   sends headers and never a body is cut off);
3. the work (reading /proc, process_madvise) runs on a worker thread, and the
   caller's slots are held until it ends, even if the caller went away;
4. StreamVmaInfo alone then writes its messages from the event loop, and
   holds the slots until the last one is written or the call ends.

A sampling GetVmaInfo or StreamVmaInfo (VMA_ATTR_ACCESS) does its work in
three steps: the checks and the policy on a worker; then, in the process's
turn (one sampler per process at a time), the clear on a worker, the window
on the event loop (no worker waits through it), the snapshot on a worker.
The slots are held throughout; a caller that goes away (or whose deadline
passes) ends the call at once, or after the worker step under way.

The wire format does not say whether a method is unary or client-streaming,
so clients call the methods as the proto declares them (unary, and
server-streaming for StreamVmaInfo) and notice no difference.

No logic lives here beyond the translation; faults raised by the core become
statuses in :mod:`vmctl_server.transport.grpc_status`. GetVmaInfo and AdviseRanges answer
with bytes they assembled themselves: the small header message serialized by
protobuf, then the repeated field (``vmas``, ``ranges``) as the tables or the
plan encoded it (protobuf concatenation is merging), so tens of thousands of
VMAs or ranges never become Python message objects. StreamVmaInfo sends the
same header alone, then the same ``vmas`` bytes cut at VMA boundaries into
messages under :data:`STREAM_MESSAGE_LIMIT`. AdviseRanges reads its ranges
from the request's own bytes for the same reason.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError, Message

from vmctl_api import vmctl_pb2 as pb
from vmctl_api.words import ADVICE_BY_NUMBER, FILTER_BY_NUMBER, SCOPE_BY_NUMBER, ScopeCheck
from vmctl_server.access.admission import Guard, Ticket
from vmctl_server.access.audit import AdviceAudit, sample_record
from vmctl_server.access.identity import Caller, caller_from
from vmctl_server.access.policy import ADVISE, READ, Policy
from vmctl_server.core.advice import AdviceRequest, AdviceResult, Advisor, RangeSet, ScopeOutcome
from vmctl_server.core.cookie import CookieSigner
from vmctl_server.core.faults import AuditUnavailable, InvalidRequest, RequestTimeout, VmctlFault
from vmctl_server.core.kernel import Capabilities
from vmctl_server.core.node import NodeInfo, cgroup_memory_pressure, list_processes, node_info
from vmctl_server.core.procfs import Pressure
from vmctl_server.core.sampling import SamplerLocks, check_fits, clear, window_seconds
from vmctl_server.core.snapshot import Identity, Snapshot, SnapshotReader, check_attr_mask, check_pid, claims_for
from vmctl_server.core.targets import Target, read_target
from vmctl_server.runtime import logs
from vmctl_server.runtime import meters as metrics  # the real series only when served
from vmctl_server.transport import grpc_status, interceptor

log = logging.getLogger(__name__)
SERVICE_NAME = "vmctl.v1.VmControl"
DEFAULT_REQUEST_TIMEOUT = 10.0  # seconds from admission to a whole request: 7 MB need 0.7 MB/s
# Every StreamVmaInfo message is smaller than this, so any client with a receive limit of 1 MiB or more (gRPC's
# default is 4 MiB) reads a process of any size; a message holds as many whole VMAs as fit.
STREAM_MESSAGE_LIMIT = 1 << 20
# Reads refused for who the caller is are audited; other refusals of reads (no such process, a bad pid) are not.
_AUDITED_READ_REFUSALS = {"UNAUTHENTICATED", "POLICY_DENIED", "PROTECTED_TARGET"}

MessageType = TypeVar("MessageType", bound=Message)
Work = Callable[[Caller, Policy, bytes], Any]  # bytes for a reply, list[bytes] for a stream, or a _Sampling
Context = grpc.aio.ServicerContext[bytes, bytes]  # VmControl's calls: raw bytes in and out, parsed on a worker
SnapshotRequest = pb.GetVmaInfoRequest | pb.StreamVmaInfoRequest
HeaderType = type[pb.GetVmaInfoResponse] | type[pb.StreamVmaInfoResponse]


class CallActivity(Protocol):
    def call_started(self) -> None: ...
    def call_ended(self) -> None: ...


def _parse(message_type: type[MessageType], data: bytes) -> MessageType:
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        raise InvalidRequest(
            f"the request does not parse: {exc or 'not a protobuf message'}", reason="MALFORMED_REQUEST"
        ) from None


def caller_of(context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
    """Who is calling, by the transport's word (see :mod:`vmctl_server.access.identity`)."""
    return caller_from(context.peer(), context.auth_context())


async def _abort(context: grpc.aio.ServicerContext[Any, Any], fault: VmctlFault) -> NoReturn:
    interceptor.note(reason=fault.reason)
    status = grpc_status.to_status(fault)
    # The ErrorInfo's trailer replaces the ones the interceptor set: name them again.
    await context.abort(status.code, status.details, (*status.trailing_metadata, *interceptor.response_metadata()))
    raise AssertionError("abort_with_status returned")  # it raises


@dataclass(frozen=True)
class Pipeline:
    """How calls reach the workers: the pool, the time a request may take to
    arrive, and who hears that calls start and end (the heap trimmer)."""

    workers: Executor
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    activity: CallActivity | None = None


@dataclass(frozen=True)
class _Running:
    """An admitted call whose work is under way (a task: steps on workers, waits on the loop)."""

    caller: Caller
    ticket: Ticket
    running: asyncio.Future[Any]  # what the Work returns


@dataclass(frozen=True)
class _Sampling:
    """A sampling snapshot that passed its checks and the policy: what its
    window and its snapshot need (see the module docs)."""

    caller: Caller
    request: SnapshotRequest
    window: float  # seconds
    target: Target  # the process the policy judged
    rule: str
    header_type: HeaderType
    answer: Callable[[Snapshot, bytes], Any]  # (snapshot, serialized header) -> the reply


class VmControlService:
    def __init__(
        self,
        reader: SnapshotReader,
        advisor: Advisor,
        signer: CookieSigner,
        capabilities: Capabilities,
        guard: Guard,
        pipeline: Pipeline,
    ) -> None:
        self.reader = reader
        self.advisor = advisor
        self.signer = signer
        self.capabilities = capabilities
        self.guard = guard
        self.pipeline = pipeline
        self.samplers = SamplerLocks()

    def handler(self) -> grpc.GenericRpcHandler:
        """The method handlers, client-streaming on raw bytes (see the module docs)."""

        def method(name: str, verb: str, work: Work) -> grpc.RpcMethodHandler[bytes, bytes]:
            async def behavior(_requests: Any, context: Context) -> bytes:
                return await self._serve(context, name, verb, work)

            return grpc.stream_unary_rpc_method_handler(behavior)

        def streamed(name: str, verb: str, work: Work) -> grpc.RpcMethodHandler[bytes, bytes]:
            def behavior(_requests: Any, context: Context) -> AsyncIterator[bytes]:
                return self._serve_stream(context, name, verb, work)

            return grpc.stream_stream_rpc_method_handler(behavior)

        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "GetVmaInfo": method("GetVmaInfo", READ, self.get_vma_info),
                "StreamVmaInfo": streamed("StreamVmaInfo", READ, self.stream_vma_info),
                "AdviseRanges": method("AdviseRanges", ADVISE, self.advise_ranges),
                "ListProcesses": method("ListProcesses", READ, self.list_processes),
                "GetNodeInfo": method("GetNodeInfo", READ, self.get_node_info),
            },
        )

    # ---- every call: admit, read, work -------------------------------------------

    async def _serve(self, context: Context, method: str, verb: str, work: Work) -> bytes:
        call = await self._start(context, method, verb, work)
        # The slots are held until the work ends, not merely until the caller
        # goes away: a worker's step (advice) runs to its end whatever happens.
        call.running.add_done_callback(lambda _done: self._call_ended(call.ticket))
        reply: bytes = await self._finish(context, method, verb, call)  # a unary method's Work gives bytes
        return reply

    async def _serve_stream(self, context: Context, method: str, verb: str, work: Work) -> AsyncIterator[bytes]:
        """As :meth:`_serve`, then every message the work made, written from
        the event loop; the slots are held until the last is written (or the
        call ends) and, as ever, until the work ends."""
        call = await self._start(context, method, verb, work)
        try:
            messages = await self._finish(context, method, verb, call)
            messages.reverse()  # each dropped once written: a slow reader does not keep the whole snapshot alive
            while messages:
                yield messages.pop()
        finally:
            if call.running.done():
                self._call_ended(call.ticket)
            else:  # the caller went away while the worker still reads
                call.running.add_done_callback(lambda _done: self._call_ended(call.ticket))

    async def _start(self, context: Context, method: str, verb: str, work: Work) -> _Running:
        """Admit the caller, read its request, and hand the work to a worker;
        the caller's slots are released here only when this refuses it."""
        caller = caller_of(context)
        try:
            ticket = self.guard.admit(caller, verb)
        except VmctlFault as fault:
            self._record_refusal(method, caller, fault, fold=True)
            await _abort(context, fault)
        self._call_started()
        try:
            data = await self._read_request(context)
            running = asyncio.ensure_future(self._run(context, work, caller, ticket.policy, data))
        except VmctlFault as fault:
            self._call_ended(ticket)
            if verb == ADVISE:  # admitted, so not folded: its identity is rate limited like any call
                self._record_refusal(method, caller, fault, fold=False)
            await _abort(context, fault)
        except BaseException:
            self._call_ended(ticket)
            raise
        return _Running(caller, ticket, running)

    async def _finish(self, context: Context, method: str, verb: str, call: _Running) -> Any:
        """The work's result, or the call aborted with its fault."""
        try:
            return await asyncio.shield(call.running)
        except asyncio.CancelledError:
            # The caller went away or its deadline passed: waiting (a sampler's turn or
            # window) stops now; a step on a worker still runs to its end (_on_worker).
            call.running.cancel()
            raise
        except VmctlFault as fault:
            if verb == READ and fault.reason in _AUDITED_READ_REFUSALS:
                # Folded like refusals on headers: a read changes nothing, and an
                # identity allowed its own processes could otherwise write a
                # record per pid it probes as fast as it can call.
                self._record_refusal(method, call.caller, fault, fold=True)
            await _abort(context, fault)
        except Exception:
            log.exception("%s failed", method)
            await _abort(context, VmctlFault(f"{method} failed inside the agent; see its log", reason="INTERNAL"))

    async def _run(self, context: Context, work: Work, caller: Caller, policy: Policy, data: bytes) -> Any:
        """The call's work: one step on a worker, and a sampler's window and snapshot after it."""
        result = await self._on_worker(work, caller, policy, data)
        if isinstance(result, _Sampling):
            result = await self._sample(context, result)
        return result

    async def _on_worker(self, step: Callable[..., Any], *args: Any) -> Any:
        """``step(*args)`` on a worker thread, in this call's context. Cancelled,
        it still waits for the step to end, so that a call never ends (and gives
        its slots back) while a worker is still doing its work."""
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(self.pipeline.workers, contextvars.copy_context().run, step, *args)
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            await asyncio.wait([running])
            raise

    async def _sample(self, context: Context, sampling: _Sampling) -> Any:
        """Clear, wait the window, read: in the process's turn, and only if the
        window fits the call's deadline, waiting included (else nothing is cleared)."""
        time_left = context.time_remaining()
        check_fits(sampling.window, time_left)
        wait = None if time_left is None else time_left - sampling.window
        async with self.samplers.turn(sampling.target.pid, sampling.target.start_time, wait):
            cleared = await self._on_worker(self._begin_window, sampling)
            await asyncio.sleep(sampling.window)
            return await self._on_worker(self._end_window, sampling, cleared)

    async def _read_request(self, context: Context) -> bytes:
        timeout = self.pipeline.request_timeout
        try:
            data = await asyncio.wait_for(context.read(), timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request did not arrive within {timeout:g} s") from None
        if not isinstance(data, bytes):  # grpc.aio.EOF
            # Either the caller closed its side without a message, or gRPC
            # refused one over --max-message-bytes (and told the caller so).
            raise InvalidRequest(
                "no request message arrived: none was sent, or it was over the size limit", reason="MALFORMED_REQUEST"
            )
        return data

    def _call_started(self) -> None:
        if self.pipeline.activity is not None:
            self.pipeline.activity.call_started()

    def _call_ended(self, ticket: Ticket) -> None:
        ticket.release()
        if self.pipeline.activity is not None:
            self.pipeline.activity.call_ended()

    def _record_refusal(self, method: str, caller: Caller, fault: VmctlFault, *, fold: bool) -> None:
        code = grpc_status.code_name(fault)
        self.guard.record_refusal(method, caller, code, fault, logs.request_id.get(), fold=fold)

    # ---- the work of each method, on a worker thread --------------------------------

    def get_vma_info(self, caller: Caller, policy: Policy, data: bytes) -> bytes | _Sampling:
        request = _parse(pb.GetVmaInfoRequest, data)
        reply: bytes | _Sampling = self._snapshot(caller, policy, request, pb.GetVmaInfoResponse, _whole)
        return reply

    def stream_vma_info(self, caller: Caller, policy: Policy, data: bytes) -> list[bytes] | _Sampling:
        """GetVmaInfo's snapshot as StreamVmaInfoResponse messages: the header
        alone, then the VMAs in chunks that keep every message under the limit."""
        request = _parse(pb.StreamVmaInfoRequest, data)
        messages: list[bytes] | _Sampling = self._snapshot(caller, policy, request, pb.StreamVmaInfoResponse, _chunked)
        return messages

    def _snapshot(
        self,
        caller: Caller,
        policy: Policy,
        request: SnapshotRequest,
        header_type: HeaderType,
        answer: Callable[[Snapshot, bytes], Any],
    ) -> Any:
        """The reply: the snapshot asked for, checked to be of the process the
        policy judged, after its serialized header (process, cookie and result
        mask); or, for a sampler, what its window needs."""
        interceptor.note(pid=request.pid)
        check_pid(request.pid)
        check_attr_mask(request.attr_mask)
        window = window_seconds(request.attr_mask, request.access_window_ms)
        if window is not None:
            sampled = read_target(request.pid)
            rule = self.guard.check_sample_target(policy, caller, sampled)
            return _Sampling(caller, request, window, sampled, rule.name, header_type, answer)
        target = self.guard.check_read(policy, caller, request.pid)
        snapshot = self.reader.take(request.pid, request.attr_mask)
        return answer(snapshot, self._header(target, snapshot, header_type))

    def _header(self, target: Target | None, snapshot: Snapshot, header_type: HeaderType) -> bytes:
        self.guard.same_process(target, snapshot.identity.start_time, snapshot.identity.exec_id)
        identity = snapshot.identity
        claims = claims_for(identity, snapshot.digest)
        # What this caller was allowed to read, kept for SCOPE_RANGES under every claim the cookie signs.
        self.advisor.snapshots.put(claims, snapshot.layout_records)
        header = header_type(
            process=pb.Process(pid=identity.pid, start_time=identity.start_time, comm=identity.comm),
            cookie=self.signer.issue(claims),
            result_mask=snapshot.result_mask,
        )
        return header.SerializeToString()

    def _begin_window(self, sampling: _Sampling) -> Identity:
        """On record, then the referenced bits cleared: the sampling window begins."""
        target = sampling.target
        record = sample_record(
            sampling.caller.audit_fields(), logs.request_id.get(), target, sampling.request.access_window_ms
        )
        if not self.guard.audit.write({**record, "rule": sampling.rule}, f"sample pid {target.pid}"):
            raise AuditUnavailable(
                "the audit log cannot be written; no process is sampled until it can", audit_log=self.guard.audit.path
            )
        return clear(target.pid, target.start_time, target.exec_id)

    def _end_window(self, sampling: _Sampling, cleared: Identity) -> Any:
        """The snapshot after the window, of the process whose bits were cleared."""
        request = sampling.request
        snapshot = self.reader.take(request.pid, request.attr_mask, cleared=cleared)
        return sampling.answer(snapshot, self._header(sampling.target, snapshot, sampling.header_type))

    def advise_ranges(self, caller: Caller, policy: Policy, data: bytes) -> bytes:
        audit = AdviceAudit(caller.audit_fields(), request_id=logs.request_id.get())
        try:
            result = self._advise(caller, policy, data, audit)
        except VmctlFault as fault:
            self._finish_advice(audit, grpc_status.code_name(fault), fault.reason, fault.message)
            raise
        except Exception:
            self._finish_advice(audit, "INTERNAL", "INTERNAL")
            raise
        audit.advised_bytes, audit.syscalls = result.advised_bytes, result.syscalls
        self._finish_advice(audit, "OK")
        header = pb.AdviseRangesResponse(
            requested_bytes=result.requested_bytes,
            advised_bytes=result.advised_bytes,
            syscalls=result.syscalls,
            dry_run=result.dry_run,
            process=pb.Process(pid=result.pid, start_time=result.start_time, comm=result.comm),
            scope=cast(pb.Scope, result.scope.applied),
            changed_ranges=result.scope.changed_ranges,
            scope_fallback=result.scope.fallback,
        )
        return result.plan.encode(prefix=header.SerializeToString())

    def _advise(self, caller: Caller, policy: Policy, data: bytes, audit: AdviceAudit) -> AdviceResult:
        """The advisor's steps with the policy between open and plan and the
        audit record between plan and apply: the record is in the log before
        the first system call, or nothing is applied."""
        message = _parse(pb.AdviseRangesRequest, data)
        interceptor.note(pid=message.pid)
        ranges = self.advisor.ranges.from_message(message.ranges, data)
        _describe(audit, message, ranges, self.advisor.max_ranges)
        request = AdviceRequest(
            message.pid, ranges, message.advice, message.cookie, message.filter, message.dry_run, message.scope
        )
        checked = self.advisor.check(request, require_cookie=policy.require_cookie)
        with self.advisor.open(checked) as target:
            facts = self.guard.advice_target(target.identity)
            audit.target = _target_fields(facts)
            audit.rule = self.guard.check_advice_target(policy, caller, facts, checked.advice).name
            lookup = self.advisor.scope(checked)
            if checked.claims is not None:  # a layout check is made, in this scope
                audit.scope_check = _scope_check(lookup.scope)
            planned = self.advisor.plan_in_scope(checked, target, lookup)
            audit.changed_ranges = planned.scope.changed_ranges
            if not request.dry_run and not self.guard.audit.write(audit.intent(), audit.summary("applying")):
                raise AuditUnavailable(
                    "the audit log cannot be written; no advice is applied until it can",
                    audit_log=self.guard.audit.path,
                )
            return self.advisor.apply(checked, target, planned.plan, planned.scope)

    def _finish_advice(self, audit: AdviceAudit, code: str, reason: str = "", message: str = "") -> None:
        record = audit.record(code, reason, message)
        self.guard.audit.write(record, audit.summary(code))
        metrics.record_advice(
            record["cookie"], audit.advice, audit.requested_bytes, audit.advised_bytes, audit.syscalls,
            applied=code == "OK" and not audit.dry_run,
        )  # fmt: skip
        if audit.scope_check:
            metrics.record_scope(audit.scope_check, audit.changed_ranges)

    def list_processes(self, caller: Caller, policy: Policy, data: bytes) -> bytes:
        request = _parse(pb.ListProcessesRequest, data)
        # Only what the caller may read, judged on the facts the policy sees.
        readable = None if policy.reads_any_process(caller) else functools.partial(policy.may_read, caller)
        processes = list_processes(request.cgroup_prefix, readable, vma_count=request.with_vma_count)
        reply = pb.ListProcessesResponse(processes=[pb.ProcessInfo(**vars(p)) for p in processes])
        for path, pressure in cgroup_memory_pressure(p.cgroup for p in processes).items():
            reply.cgroup_memory_pressure[path].CopyFrom(_memory_pressure(pressure))
        return reply.SerializeToString()

    def get_node_info(self, caller: Caller, policy: Policy, data: bytes) -> bytes:
        _parse(pb.GetNodeInfoRequest, data)
        return _node_info_reply(node_info(self.capabilities)).SerializeToString()


def _whole(snapshot: Snapshot, header: bytes) -> bytes:
    """GetVmaInfo's reply: the header, then every VMA."""
    return snapshot.table.encode(snapshot.result_mask, prefix=header)


def _chunked(snapshot: Snapshot, header: bytes) -> list[bytes]:
    """StreamVmaInfo's messages: the header alone, then VMAs in chunks under the limit."""
    return [header, *snapshot.table.encode_chunks(snapshot.result_mask, STREAM_MESSAGE_LIMIT - 1)]


def _describe(audit: AdviceAudit, message: pb.AdviseRangesRequest, ranges: RangeSet, max_ranges: int) -> None:
    count = len(ranges)
    audit.pid = message.pid
    audit.advice = ADVICE_BY_NUMBER.get(message.advice, str(message.advice))
    audit.filter = FILTER_BY_NUMBER.get(message.filter, str(message.filter))
    audit.dry_run = message.dry_run
    audit.range_count = count
    audit.requested_bytes = ranges.total_bytes() if count <= max_ranges else 0
    audit.cookie_sent = bool(message.cookie)
    audit.scope = SCOPE_BY_NUMBER.get(message.scope, "whole")


def _scope_check(scope: ScopeOutcome) -> ScopeCheck:
    """How the layout is checked, in the audit log's and the metrics' words."""
    return "ranges" if scope.checked else "fallback" if scope.fallback else "whole"


def _target_fields(target: Target) -> dict[str, object]:
    return {"start_time": target.start_time, "comm": target.comm, "cgroup": target.cgroup, "uid": target.uid}


def _node_info_reply(info: NodeInfo) -> pb.GetNodeInfoResponse:
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
            # vmctl.v1.Advice numbers (kernel_probe); protoc's stubs type enum fields by their wrapper class.
            advices=cast("list[pb.Advice]", sorted(caps.advices)),
            procmap_query=caps.procmap_query,
            pagemap_scan=caps.pagemap_scan,
            advice_permitted=caps.advice_permitted,
            probe_errors=caps.probe_errors,
            access_sampling=caps.access_sampling,
        ),
    )
    if info.memory_pressure is not None:
        response.memory_pressure.CopyFrom(_memory_pressure(info.memory_pressure))
    return response


def _memory_pressure(pressure: Pressure) -> pb.MemoryPressure:
    """PSI lines as the MemoryPressure message: a line the kernel did not write stays unset."""
    message = pb.MemoryPressure()
    for kind in ("some", "full"):
        values = pressure.get(kind)
        if values:
            getattr(message, kind).CopyFrom(
                pb.PressureStall(
                    avg10=values.get("avg10", 0.0),
                    avg60=values.get("avg60", 0.0),
                    avg300=values.get("avg300", 0.0),
                    total_us=int(values.get("total", 0)),
                )
            )
    return message

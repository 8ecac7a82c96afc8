"""One gRPC interceptor (grpc.aio) that times, counts and logs every call,
and gives every single-request method a bounded time to receive its request.

It sits outermost, so it also sees calls that inner layers (authentication,
policy, limits) refuse. For each call it sets the request id for the log and
for the caller's ``x-request-id`` trailer (see :func:`response_metadata`),
counts the call started and keeps the in-flight gauge; at the end it records
the status code, the ``google.rpc.ErrorInfo`` reason of a refusal, and the
latency; then it writes one access-log line. It never reads the request: the
handler tells it the pid and reason through :func:`note`. Calls are labelled
with the method's type as its proto declares it (see :func:`declared_type`).

Methods whose request is one message (health ``Check`` and ``Watch``) are
served as client-streaming here, and their request must arrive within
``request_timeout`` seconds: gRPC would otherwise wait for a body forever,
and a caller sending headers only would hold the call. (VmControl's own
methods are client-streaming already, so that the agent can admit the
caller before reading its request; see :mod:`vmctl_server.transport.service`.)

Health and reflection calls are never rate limited, but each caller may
hold only so many open at once (:class:`SideCallCaps`): a ``Watch`` or a
reflection stream lives as long as its caller likes. Over the cap a call is
refused at once with RESOURCE_EXHAUSTED. (HTTP/2's own per-connection
stream limit is no substitute: gRPC clients open streams past it in bursts
and their calls fail with REFUSED_STREAM, so the main servers leave it
unset.)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pool

from vmctl_server.core.faults import LimitExceeded
from vmctl_server.runtime import logs
from vmctl_server.runtime import meters as metrics  # the real series only when served
from vmctl_server.transport import grpc_status

log = logging.getLogger("vmctl.access")
_QUIET_SERVICES = {"grpc.health.v1.Health"}  # probes every few seconds: logged at debug only
_SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}

# What the handler of the current call tells the access log: pid, reason.
_call_facts: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("vmctl_call_facts", default=None)


def note(**facts: Any) -> None:
    """Tell the current call's access-log line (``pid``, ``reason``); a no-op outside a call."""
    current = _call_facts.get()
    if current is not None:
        current.update(facts)


Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]
VMCONTROL = "vmctl.v1.VmControl"  # admitted by the service itself, before its request is read


def response_metadata() -> tuple[tuple[str, str], ...]:
    """What every response carries in its trailing metadata: the call's request
    id as ``x-request-id``. In the trailers, not the headers: they go out with
    the status, in the write that ends the call, while headers sent ahead of a
    unary reply take a write of their own (about 0.1 ms more per GetNodeInfo
    through the unix gateway, measured interleaved). An abort that names
    trailing metadata of its own replaces these, so it must add them (see
    transport.service)."""
    return ((logs.REQUEST_ID_KEY, logs.request_id.get()),)


def declared_type(service: str, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> str:
    """The method's type as its proto declares it, in go-grpc-prometheus's words
    (``unary``, ``client_stream``, ``server_stream``, ``bidi_stream``): what
    callers see, not how the agent serves it (VmControl's unary methods are
    client-streaming inside, to admit callers before reading their request).
    Methods the descriptor pool does not know are typed by their handler."""
    streams_in, streams_out = _declared_streaming(service, method) or (
        handler.request_streaming,
        handler.response_streaming,
    )
    if streams_in:
        return "bidi_stream" if streams_out else "client_stream"
    return "server_stream" if streams_out else "unary"


@functools.cache
def _declared_streaming(service: str, method: str) -> tuple[bool, bool] | None:
    """(client streaming, server streaming) as the method's proto declares it, if the pool knows it."""
    try:
        declared = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(method)
    except KeyError:
        return None
    return declared.client_streaming, declared.server_streaming


class SideCallCaps:
    """At most ``limit`` health and reflection calls open at once per caller,
    the caller named by ``key`` (its identity, or its address)."""

    def __init__(self, limit: int, key: Callable[[grpc.aio.ServicerContext[Any, Any]], str]) -> None:
        self.limit = limit
        self.key = key
        self._open: dict[str, int] = {}

    @contextlib.contextmanager
    def holding(self, context: grpc.aio.ServicerContext[Any, Any]) -> Iterator[bool]:
        """Yields whether the call may go on; its place is given back on exit.
        (Only the event loop's thread calls this: no lock.)"""
        key = self.key(context)
        held = self._open.get(key, 0)
        if held >= self.limit:
            yield False
            return
        self._open[key] = held + 1
        try:
            yield True
        finally:
            left = self._open[key] - 1
            if left:
                self._open[key] = left
            else:
                del self._open[key]


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, request_timeout: float, side_calls: SideCallCaps | None = None) -> None:
        self.request_timeout = request_timeout
        self.side_calls = side_calls

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: gRPC answers UNIMPLEMENTED
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        caps = None if service == VMCONTROL else self.side_calls
        request_id = logs.request_id_from(handler_call_details.invocation_metadata)
        call = _Call(service, method, declared_type(service, method, handler), request_id, caps)
        streams = handler.response_streaming
        # grpc's stubs type a handler's behaviors for the synchronous server (a grpc.ServicerContext,
        # iterators, possibly None); under grpc.aio the one its streaming flags name is set, takes an
        # aio context, and may be a coroutine function or an async generator: a Behavior.
        if handler.request_streaming:
            behavior = cast(Behavior, handler.stream_stream if streams else handler.stream_unary)
            deserializer = handler.request_deserializer
        else:  # read raw here, deserialize in _one_request
            single = cast(Behavior, handler.unary_stream if streams else handler.unary_unary)
            behavior, deserializer = self._one_request(single, handler.request_deserializer, streams), None
        if streams:
            return grpc.stream_stream_rpc_method_handler(
                call.observe_stream(behavior),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_unary_rpc_method_handler(
            call.observe_unary(behavior),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )

    def _one_request(self, behavior: Behavior, deserializer: Callable[[bytes], Any] | None, streams: bool) -> Behavior:
        """A single-request behavior served from a request stream, its one message read with a deadline."""
        timeout = self.request_timeout

        def served(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async def read() -> Any:
                try:
                    data = await asyncio.wait_for(context.read(), timeout)
                except asyncio.TimeoutError:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no request within {timeout:g} s")
                if not isinstance(data, bytes):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request message")
                return deserializer(data) if deserializer else data

            async def unary() -> Any:
                result = behavior(await read(), context)
                return await result if inspect.isawaitable(result) else result

            async def stream() -> None:
                await _write_all(behavior(await read(), context), context)

            return stream() if streams else unary()

        return served


class _Call:
    """One call's observation: request id, started and in-flight counts, status, latency, access line."""

    def __init__(self, service: str, method: str, grpc_type: str, request_id: str, caps: SideCallCaps | None) -> None:
        self.service = service
        self.method = method
        self.labels = (service, method, grpc_type)
        self.request_id = request_id
        self.caps = caps

    def observe_unary(self, behavior: Behavior) -> Behavior:
        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            with self._observing(context), self._room(context) as room:
                if not room:
                    await self._refuse(context)
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result

        return observed

    def observe_stream(self, behavior: Behavior) -> Behavior:
        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            with self._observing(context), self._room(context) as room:
                if not room:
                    await self._refuse(context)
                await _write_all(behavior(request, context), context)

        return observed

    def _room(self, context: grpc.aio.ServicerContext[Any, Any]) -> contextlib.AbstractContextManager[bool]:
        return self.caps.holding(context) if self.caps is not None else contextlib.nullcontext(True)

    async def _refuse(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        assert self.caps is not None
        fault = LimitExceeded(
            f"at most {self.caps.limit} {self.service} calls may be open at once per caller",
            reason="TOO_MANY_CALLS",
            limit=self.caps.limit,
        )
        note(reason=fault.reason)
        await context.abort_with_status(grpc_status.to_status(fault))

    @contextlib.contextmanager
    def _observing(self, context: grpc.aio.ServicerContext[Any, Any]) -> Iterator[None]:
        id_token = logs.request_id.set(self.request_id)
        context.set_trailing_metadata(response_metadata())
        peer = context.peer()  # now: a call that ended may no longer say
        facts: dict[str, Any] = {}
        facts_token = _call_facts.set(facts)
        metrics.STARTED.labels(*self.labels).inc()
        in_flight = metrics.IN_FLIGHT.labels(*self.labels)
        in_flight.inc()
        started = time.perf_counter()
        outcome = grpc.StatusCode.OK
        try:
            yield
        except asyncio.CancelledError:
            outcome = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            outcome = grpc.StatusCode.UNKNOWN  # an abort sets the context's code, read below
            raise
        finally:
            elapsed = time.perf_counter() - started
            code = context.code() or outcome
            if not isinstance(code, grpc.StatusCode):
                code = _status_code(code)
            reason = facts.get("reason", "") if code != grpc.StatusCode.OK else ""
            # In this order, so that any scrape sees a call whole: timed before counted, counted before gone.
            metrics.HANDLING.labels(*self.labels, code.name).observe(elapsed)
            metrics.HANDLED.labels(*self.labels, code.name).inc()
            in_flight.dec()
            if reason:
                metrics.REFUSALS.labels(self.service, self.method, reason).inc()
            self._log(peer, code, reason, facts.get("pid"), elapsed)
            _call_facts.reset(facts_token)
            logs.request_id.reset(id_token)

    def _log(self, peer: str, code: grpc.StatusCode, reason: str, pid: Any, elapsed: float) -> None:
        if code in _SERVER_FAULTS:
            level = logging.ERROR
        elif self.service in _QUIET_SERVICES:
            level = logging.DEBUG
        else:
            level = logging.INFO
        if not log.isEnabledFor(level):
            return
        fields: dict[str, object] = {"method": f"{self.service}/{self.method}", "code": code.name}
        if reason:
            fields["reason"] = reason
        if isinstance(pid, int) and pid:
            fields["pid"] = pid
        fields["duration_ms"] = round(elapsed * 1000, 3)
        fields["peer"] = peer
        log.log(level, "%s %s", self.method, code.name, extra={"fields": fields})


async def _write_all(result: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Serve a streaming behavior's responses from this coroutine, with
    ``context.write``: whatever gRPC does when the caller goes away (it cancels
    the call's task) then happens here, in the call's own task and context, so
    the call is observed as CANCELLED and a handler's generator is closed at
    once (the service's releases the call's slots as it closes). Were the
    generator handed to gRPC, a cancelled call would leave it to be closed
    whenever it is collected, in another task."""
    if inspect.isasyncgen(result):
        async with contextlib.aclosing(result):
            async for item in result:
                await context.write(item)
    elif inspect.isawaitable(result):
        await result  # it writes with context.write itself


def _status_code(value: Any) -> grpc.StatusCode:
    """gRPC's aio context may report a code as its integer value."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN

"""One gRPC interceptor that times, counts and logs every unary call.

It sits outermost, so it also sees calls that inner layers (authentication,
policy, limits) refuse. For each call it sets the request id for the log,
keeps the in-flight gauge, and at the end records the status code, the
``google.rpc.ErrorInfo`` reason of a refusal, the latency, and for
AdviseRanges the bytes advised and the cookie outcome; then it writes one
access-log line. It reads only the status and a few numeric fields of the
request and response: never the cookie or anything else a caller sent.

Streaming calls (health Watch, reflection) pass through untouched.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from vmctl_server import logs, metrics
from vmctl_server.advice import ADVICE_BY_NUMBER

log = logging.getLogger("vmctl.access")
STATUS_DETAILS_KEY = "grpc-status-details-bin"
ADVISE_METHOD = "/vmctl.v1.VmControl/AdviseRanges"
_QUIET_SERVICES = {"grpc.health.v1.Health"}  # probes every few seconds: logged at debug only
_SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}


def refusal_reason(context: grpc.ServicerContext) -> str:
    """The ErrorInfo reason the call was refused with, or "" if it carries none."""
    for key, value in context.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


def _record_advice(request: Any, response: Any, code: grpc.StatusCode, reason: str) -> None:
    if code == grpc.StatusCode.OK:
        metrics.COOKIE_CHECKS.labels("ok" if request.cookie else "absent").inc()
        if not response.dry_run:
            advice = ADVICE_BY_NUMBER.get(request.advice, str(request.advice))
            metrics.REQUESTED_BYTES.labels(advice).inc(response.requested_bytes)
            metrics.ADVISED_BYTES.labels(advice).inc(response.advised_bytes)
            metrics.MADVISE_CALLS.labels(advice).inc(response.syscalls)
    elif reason in metrics.COOKIE_OUTCOME_BY_REASON:
        metrics.COOKIE_CHECKS.labels(metrics.COOKIE_OUTCOME_BY_REASON[reason]).inc()


class ObservingInterceptor(grpc.ServerInterceptor):
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # unknown method (gRPC answers UNIMPLEMENTED) or a stream
        full_method = handler_call_details.method
        service, _, method = full_method.lstrip("/").rpartition("/")
        request_id = logs.request_id_from(handler_call_details.invocation_metadata)
        behavior = handler.unary_unary

        @functools.wraps(behavior)  # keeps experimental_thread_pool: VmControl runs on its own workers
        def observed(request: Any, context: grpc.ServicerContext) -> Any:
            token = logs.request_id.set(request_id)
            in_flight = metrics.IN_FLIGHT.labels(service, method)
            in_flight.inc()
            started = time.perf_counter()
            response = None
            raised = True
            try:
                response = behavior(request, context)
                raised = False
                return response
            finally:
                elapsed = time.perf_counter() - started
                in_flight.dec()
                code = context.code() or (grpc.StatusCode.UNKNOWN if raised else grpc.StatusCode.OK)
                reason = refusal_reason(context) if code != grpc.StatusCode.OK else ""
                metrics.CALLS.labels(service, method, code.name).inc()
                metrics.LATENCY.labels(service, method, code.name).observe(elapsed)
                if reason:
                    metrics.REFUSALS.labels(method, reason).inc()
                if full_method == ADVISE_METHOD:
                    _record_advice(request, response, code, reason)
                _log_call(service, method, request, context, code, reason, elapsed)
                logs.request_id.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _log_call(
    service: str,
    method: str,
    request: Any,
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    reason: str,
    elapsed: float,
) -> None:
    if code in _SERVER_FAULTS:
        level = logging.ERROR
    elif service in _QUIET_SERVICES:
        level = logging.DEBUG
    else:
        level = logging.INFO
    if not log.isEnabledFor(level):
        return
    fields: dict[str, object] = {"method": f"{service}/{method}", "code": code.name}
    if reason:
        fields["reason"] = reason
    pid = getattr(request, "pid", None)
    if isinstance(pid, int) and pid:
        fields["pid"] = pid
    fields["duration_ms"] = round(elapsed * 1000, 3)
    fields["peer"] = context.peer()
    log.log(level, "%s %s", method, code.name, extra={"fields": fields})

"""The listeners operators use: plaintext health probes and Prometheus metrics.

The kubelet's native ``grpc:`` probes speak plaintext gRPC to a TCP port: they
cannot reach a unix socket, and cannot present a client certificate to an mTLS
port. ``--health-listen`` gives them the agent's health (SERVING /
NOT_SERVING, per service name) and nothing else: no VmControl, no reflection.
It shares the main server's health servicer, so a draining agent reports
NOT_SERVING there too, and runs on the event loop, where no VmControl call
waits: busy workers, or callers that send headers and no request, cannot
starve a probe. ``--metrics-listen`` serves
``/metrics`` over HTTP (see :mod:`vmctl_server.runtime.metrics`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from vmctl_server.runtime import meters
from vmctl_server.transport.interceptor import ObservingInterceptor, SideCallCaps

log = logging.getLogger("vmctl.agent")
HEALTH_STOP_GRACE = 1.0  # lets a watcher receive NOT_SERVING before the listener closes
HEALTH_CALLS_PER_ADDRESS = 16  # kubelet probes one at a time, from the node's address


def peer_address(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's IP address, without the port (``ipv4:10.0.0.5:43210`` -> ``ipv4:10.0.0.5``)."""
    return context.peer().rpartition(":")[0]


async def serve_health(
    host: str, port: int, servicer: health_aio.HealthServicer, request_timeout: float
) -> tuple[grpc.aio.Server, int]:
    """Start the health-only server; returns it and the port it bound.

    Anyone who reaches the port may call it, so what one address can hold is
    bounded: a few calls open at once, each with its request within
    ``request_timeout`` (the interceptor), a small message, and connections
    without calls are closed after a minute. There is no cap on connections:
    kubelet opens one per probe, and a cap would let others fill it."""
    server = grpc.aio.server(
        interceptors=[ObservingInterceptor(request_timeout, SideCallCaps(HEALTH_CALLS_PER_ADDRESS, peer_address))],
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 4096),
            ("grpc.max_connection_idle_ms", 60_000),
        ],
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(target)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {target} for health probes: {exc}") from exc
    await server.start()
    return server, bound


async def start_listeners(
    health_listen: tuple[str, int] | None,
    metrics_listen: tuple[str, int] | None,
    servicer: health_aio.HealthServicer,
    request_timeout: float,
) -> list[Callable[[], Awaitable[object]]]:
    """Start what was asked for; returns a stop function for each, to call after the main server drained."""
    stops: list[Callable[[], Awaitable[object]]] = []
    if health_listen:
        server, port = await serve_health(*health_listen, servicer, request_timeout)
        stops.append(lambda: server.stop(HEALTH_STOP_GRACE))
        log.info("health probes on %s:%d", health_listen[0], port, extra={"fields": {"health_port": port}})
    if metrics_listen:
        httpd = meters.enable().serve(*metrics_listen)
        stops.append(lambda: asyncio.to_thread(httpd.shutdown))  # it blocks until its thread ends
        log.info(
            "metrics on http://%s:%d/metrics",
            metrics_listen[0],
            httpd.server_port,
            extra={"fields": {"metrics_port": httpd.server_port}},
        )
    return stops

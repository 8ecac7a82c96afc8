"""The listeners operators use: plaintext health probes and Prometheus metrics.

The kubelet's native ``grpc:`` probes speak plaintext gRPC to a TCP port: they
cannot reach a unix socket, and cannot present a client certificate to an mTLS
port. ``--health-listen`` gives them the agent's health (SERVING /
NOT_SERVING, per service name) and nothing else: no VmControl, no reflection.
It shares the main server's health servicer, so a draining agent reports
NOT_SERVING there too, and runs on its own small thread pool, so busy
VmControl workers cannot starve a probe. ``--metrics-listen`` serves
``/metrics`` over HTTP (see :mod:`vmctl_server.metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from vmctl_server import metrics

log = logging.getLogger("vmctl.agent")
HEALTH_STOP_GRACE = 1.0  # lets a watcher receive NOT_SERVING before the listener closes


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::]:9464`` for IPv6; port 0 picks a free one)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text}: expected HOST:PORT, e.g. 127.0.0.1:9464 or [::]:9464")
    return host, int(port)


def serve_health(host: str, port: int, servicer: health.HealthServicer) -> tuple[grpc.Server, int]:
    """Start the health-only server; returns it and the port it bound."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="vmctl-health"),
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4096)],
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(target)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {target} for health probes: {exc}") from exc
    server.start()
    return server, bound


def start_listeners(
    health_listen: tuple[str, int] | None,
    metrics_listen: tuple[str, int] | None,
    servicer: health.HealthServicer,
) -> list[Callable[[], object]]:
    """Start what was asked for; returns a stop function for each, to call after the main server drained."""
    stops: list[Callable[[], object]] = []
    if health_listen:
        server, port = serve_health(*health_listen, servicer)
        stops.append(lambda: server.stop(HEALTH_STOP_GRACE).wait())
        log.info("health probes on %s:%d", health_listen[0], port, extra={"fields": {"health_port": port}})
    if metrics_listen:
        httpd = metrics.serve(*metrics_listen)
        stops.append(httpd.shutdown)
        log.info(
            "metrics on http://%s:%d/metrics",
            metrics_listen[0],
            httpd.server_port,
            extra={"fields": {"metrics_port": httpd.server_port}},
        )
    return stops

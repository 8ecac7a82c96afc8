"""The gRPC servers: VmControl, health and reflection on grpc.aio, one server per listener kind."""

from __future__ import annotations

import argparse
import logging

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from vmctl_api import vmctl_pb2 as pb
from vmctl_server.transport.interceptor import ObservingInterceptor, SideCallCaps
from vmctl_server.transport.service import caller_of

log = logging.getLogger("vmctl.agent")
MAX_SIDE_CALLS_PER_IDENTITY = 16  # health and reflection calls one identity may hold open at once
HANDSHAKE_TIMEOUT_MS = 10_000  # a TCP peer that does not finish TLS in time is dropped
TCP_IDLE_MS = 300_000  # TCP connections with no call for 5 minutes are closed (clients reconnect)


def grpc_server(
    handler: grpc.GenericRpcHandler,
    health_servicer: health_aio.HealthServicer,
    *,
    max_message_bytes: int,
    request_timeout: float,
    options: tuple[tuple[str, int], ...] = (),
) -> grpc.aio.Server:
    """A server with VmControl (``handler``), health and reflection. Each
    listener kind has its own, so a flood of TCP connections cannot take the
    unix callers' room."""
    side_calls = SideCallCaps(MAX_SIDE_CALLS_PER_IDENTITY, lambda context: caller_of(context).identity)
    server = grpc.aio.server(
        # First: it also sees calls inner layers refuse.
        interceptors=[ObservingInterceptor(request_timeout, side_calls)],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a second agent on the same port must fail, not share it
            *options,
        ],
    )
    server.add_generic_rpc_handlers((handler,))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["VmControl"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME),
        server,
    )
    return server


def tcp_options(max_connections: int) -> tuple[tuple[str, int], ...]:
    return (
        ("grpc.max_allowed_incoming_connections", max_connections),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ("grpc.max_connection_idle_ms", TCP_IDLE_MS),
    )


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def server_credentials(args: argparse.Namespace) -> grpc.ServerCredentials:
    client_ca = _read(args.client_ca) if args.client_ca else None
    return grpc.ssl_server_credentials(
        [(_read(args.tls_key), _read(args.tls_cert))], root_certificates=client_ca, require_client_auth=bool(client_ca)
    )


def add_tcp_ports(
    server: grpc.aio.Server, addresses: list[tuple[str, str]], credentials: grpc.ServerCredentials | None
) -> None:
    """Bind each (as given, HOST:PORT) address, with TLS when ``credentials`` are given."""
    for text, target in addresses:
        try:
            if credentials is not None:
                server.add_secure_port(target, credentials)
            else:
                log.warning("SERVING PLAINTEXT on %s (--insecure): no authentication, no encryption", text)
                server.add_insecure_port(target)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {text}: {exc}") from exc

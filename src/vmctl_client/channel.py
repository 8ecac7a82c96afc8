"""Targets, credentials and channel options shared by every client."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from vmctl_client.defaults import DEFAULT_TARGET, TARGET_ENV
from vmctl_client.defaults import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT  # re-exported: the clients take it from here
from vmctl_client.targets import grpc_address

# Retries are the clients' own (calls.Attempts): reads only, on UNAVAILABLE,
# inside the call's deadline. gRPC's reconnect backoff starts at 1 s, longer
# than those retries wait, so a retry would meet the channel still backing off
# and fail at once; 100 ms lets it find an agent that has just come back.
# (Not grpc.min_reconnect_backoff_ms: gRPC uses that as the minimum connect
# timeout, and a small one fails every connection slower than it.)
CHANNEL_OPTIONS: list[tuple[str, object]] = [
    ("grpc.max_receive_message_length", -1),  # a 65,530-VMA snapshot is several MB
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def default_target() -> str:
    return os.environ.get(TARGET_ENV) or DEFAULT_TARGET


@dataclass(frozen=True)
class TlsOptions:
    """PEM file paths for TLS to a tcp target; ``server_name`` overrides the
    name checked in the agent's certificate."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert)


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def channel_args(target: str, tls: TlsOptions | None) -> tuple[str, object | None, list[tuple[str, object]]]:
    """(grpc target, credentials or None for plaintext, options)."""
    address = grpc_address(target)
    options = list(CHANNEL_OPTIONS)
    if tls is None or not tls.enabled or address.startswith("unix:"):
        return address, None, options
    import grpc

    if bool(tls.cert) != bool(tls.key):
        raise ValueError("a client certificate needs its key (and the key its certificate)")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca), private_key=_read(tls.key), certificate_chain=_read(tls.cert)
    )
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return address, credentials, options


def open_channel(target: str, tls: TlsOptions | None, channels: Any) -> Any:
    """A channel to ``target`` from ``channels``: the ``grpc`` module for
    Client, ``grpc.aio`` for AsyncClient (their channel factories match)."""
    address, credentials, options = channel_args(target, tls)
    if credentials is None:
        return channels.insecure_channel(address, options=options)
    return channels.secure_channel(address, credentials, options=options)

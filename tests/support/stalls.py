"""Calls that send their headers and never a request: what a hostile caller
does to hold a server's resources before it has been admitted.

gRPC's wire format does not say whether a method takes one request or a
stream, so a client-streaming call whose request iterator never yields
sends exactly what such a caller sends: a HEADERS frame, and nothing after.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc


class HeaderOnlyCalls:
    """``count`` calls of ``method`` at ``address`` that never send a request
    until released (then they half-close with no message), spread over
    ``connections`` connections (default: one each). Use as a context
    manager; :attr:`futures` are the calls."""

    def __init__(
        self, address: str, method: str, count: int, timeout: float = 60.0, connections: int | None = None
    ) -> None:
        self._release = threading.Event()
        self.channels = [
            grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(connections or count)
        ]
        self.futures = [
            self.channels[i % len(self.channels)]
            .stream_unary(method, request_serializer=bytes, response_deserializer=bytes)
            .future(self._never(), timeout=timeout)
            for i in range(count)
        ]

    def _never(self) -> Iterator[bytes]:
        self._release.wait()
        yield from ()

    def codes(self, timeout: float = 60.0) -> list[grpc.StatusCode]:
        """Each call's status code, once it is over."""
        codes = []
        for future in self.futures:
            try:
                future.result(timeout=timeout)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        return codes

    def close(self) -> None:
        self._release.set()
        for future in self.futures:
            future.cancel()
        for channel in self.channels:
            channel.close()

    def __enter__(self) -> HeaderOnlyCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

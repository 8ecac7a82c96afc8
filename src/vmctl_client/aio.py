"""The asyncio client for one vmctl agent (grpc.aio): the same calls,
arguments, results, errors, deadlines and retries as :class:`Client`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TypeVar

import grpc

from vmctl_api import vmctl_pb2_grpc as pb_grpc
from vmctl_api.words import Advice, Filter, Scope
from vmctl_client import calls
from vmctl_client.calls import READ_RETRY, Attempts, Attrs, Call, RangeLike, RetryPolicy
from vmctl_client.channel import DEFAULT_TIMEOUT, TlsOptions, default_target, open_channel
from vmctl_client.errors import from_rpc_error
from vmctl_client.types import AdviceResult, NodeInfo, ProcessInfo, VmaInfo

T = TypeVar("T")


class AsyncClient:
    """One agent, from a coroutine. Create it inside the event loop that uses
    it, and close it there (``async with AsyncClient(...) as c``)."""

    def __init__(
        self,
        target: str | None = None,
        *,
        tls: TlsOptions | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        deadline: float | None = None,
        retry: RetryPolicy = READ_RETRY,
    ) -> None:
        self.target = target or default_target()
        self.timeout = timeout
        self.deadline = deadline
        self.retry = retry
        self._channel = open_channel(self.target, tls, grpc.aio)
        self._stub = pb_grpc.VmControlStub(self._channel)
        self._streams = {name: calls.raw_stream(self._channel, name) for name in calls.STREAMS}

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _invoke(self, call: Call[T], timeout: float | None) -> T:
        attempts = Attempts(call, timeout or self.timeout, self.deadline, self.retry, self.target)
        method = self._streams[call.method] if call.streamed else getattr(self._stub, call.method)
        while True:
            try:
                reply = method(call.request, timeout=attempts.timeout())
                return call.wrap([chunk async for chunk in reply] if call.streamed else await reply)
            except grpc.RpcError as exc:
                delay = attempts.backoff(exc)
                if delay is None:
                    raise from_rpc_error(exc, self.target) from None
            await asyncio.sleep(delay)

    async def get_vma_info(
        self,
        pid: int,
        attrs: Attrs = None,
        *,
        window: float | None = None,
        stream: bool = False,
        timeout: float | None = None,
    ) -> VmaInfo:
        """See :meth:`Client.get_vma_info`."""
        call = (calls.stream_vma_info if stream else calls.get_vma_info)(pid, attrs, window)
        return await self._invoke(call, timeout)

    async def advise_ranges(
        self,
        pid: int,
        ranges: Iterable[RangeLike],
        advice: Advice | int = "pageout",
        *,
        cookie: bytes | str | None = None,
        filter: Filter | int | None = None,
        dry_run: bool = False,
        scope: Scope | int = "whole",
        timeout: float | None = None,
    ) -> AdviceResult:
        """See :meth:`Client.advise_ranges`; never retried."""
        return await self._invoke(calls.advise_ranges(pid, ranges, advice, cookie, filter, dry_run, scope), timeout)

    async def list_processes(
        self, cgroup_prefix: str | None = None, *, vma_count: bool = False, timeout: float | None = None
    ) -> list[ProcessInfo]:
        """See :meth:`Client.list_processes`."""
        return await self._invoke(calls.list_processes(cgroup_prefix, vma_count), timeout)

    async def node_info(self, *, timeout: float | None = None) -> NodeInfo:
        """See :meth:`Client.node_info`."""
        return await self._invoke(calls.node_info(), timeout)

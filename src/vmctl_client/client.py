"""The synchronous client for one vmctl agent."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from vmctl_client.channel import DEFAULT_TIMEOUT, TlsOptions, channel_args, default_target
from vmctl_client.errors import VmctlError, from_rpc_error
from vmctl_client.proto import vmctl_pb2 as pb
from vmctl_client.proto import vmctl_pb2_grpc as pb_grpc
from vmctl_client.types import ADVICE_NAMES, FILTER_NAMES, AdviceResult, VmaInfo, attr_mask

RangeLike = tuple[int, int] | Any  # (start, end) or anything with .start and .end, e.g. a Vma


def advise_request(
    pid: int,
    ranges: Iterable[RangeLike],
    advice: str | int,
    cookie: bytes | str | None,
    filter: str | int | None,
    dry_run: bool,
) -> pb.AdviseRangesRequest:
    """The AdviseRangesRequest for friendly arguments (shared with AsyncClient)."""
    if isinstance(advice, str):
        try:
            advice = ADVICE_NAMES[advice.lower()]
        except KeyError:
            raise ValueError(f"unknown advice {advice!r}; known: {', '.join(ADVICE_NAMES)}") from None
    if filter is None:
        filter = pb.FILTER_UNSPECIFIED
    elif isinstance(filter, str):
        try:
            filter = FILTER_NAMES[filter.lower()]
        except KeyError:
            raise ValueError(f"unknown filter {filter!r}; known: {', '.join(FILTER_NAMES)}") from None
    if isinstance(cookie, str):
        cookie = base64.b64decode(cookie, validate=True)
    request = pb.AdviseRangesRequest(pid=pid, advice=advice, cookie=cookie or b"", filter=filter, dry_run=dry_run)
    add = request.ranges.add
    for item in ranges:
        if isinstance(item, tuple):
            add(start=item[0], end=item[1])
        else:
            add(start=item.start, end=item.end)
    return request


class Client:
    """One agent. ``target`` is ``unix:///PATH`` or ``host:port`` (TLS when
    ``tls`` names a CA or client certificate); every call has a deadline."""

    def __init__(
        self,
        target: str | None = None,
        *,
        tls: TlsOptions | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.target = target or default_target()
        self.timeout = timeout
        address, credentials, options = channel_args(self.target, tls)
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.VmControlStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.target) from None

    def get_vma_info(
        self, pid: int, attrs: Sequence[str] | str | int | None = None, *, timeout: float | None = None
    ) -> VmaInfo:
        """A snapshot of ``pid``'s VMAs with the attributes named in ``attrs``
        (words such as "rss", "pss", "swap", or groups "residency", "accounting")."""
        request = pb.GetVmaInfoRequest(pid=pid, attr_mask=attr_mask(attrs))
        return VmaInfo(self._call(self._stub.GetVmaInfo, request, timeout))

    def advise_ranges(
        self,
        pid: int,
        ranges: Iterable[RangeLike],
        advice: str | int = "pageout",
        *,
        cookie: bytes | str | None = None,
        filter: str | int | None = None,
        dry_run: bool = False,
        timeout: float | None = None,
    ) -> AdviceResult:
        """Apply ``advice`` to ``ranges`` of ``pid``, refused unless ``cookie``
        (from :meth:`get_vma_info`) still names the process's layout."""
        request = advise_request(pid, ranges, advice, cookie, filter, dry_run)
        return AdviceResult(self._call(self._stub.AdviseRanges, request, timeout))

    def list_processes(self, cgroup_prefix: str | None = None, *, timeout: float | None = None) -> list:
        request = pb.ListProcessesRequest(cgroup_prefix=cgroup_prefix or "")
        return list(self._call(self._stub.ListProcesses, request, timeout).processes)

    def node_info(self, *, timeout: float | None = None) -> pb.GetNodeInfoResponse:
        return self._call(self._stub.GetNodeInfo, pb.GetNodeInfoRequest(), timeout)


__all__ = ["Client", "VmctlError"]

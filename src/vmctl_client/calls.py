"""What each RPC sends, how its reply is wrapped, and the deadline and retry
rules: everything :class:`~vmctl_client.Client` and
:class:`~vmctl_client.AsyncClient` share. No I/O here; the two clients differ
only in how they wait.
"""

from __future__ import annotations

import base64
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

import grpc

from vmctl_api import vmctl_pb2 as pb
from vmctl_api.cgroup_paths import is_under
from vmctl_api.words import SCOPES, Advice, Attr, Filter, Scope
from vmctl_client.errors import VmctlError
from vmctl_client.types import (
    ADVICE_NAMES,
    FILTER_NAMES,
    AdviceResult,
    NodeInfo,
    ProcessInfo,
    VmaInfo,
    attr_mask,
)

T = TypeVar("T")
SCOPE_NAMES: dict[str, int] = {name: number for name, number in SCOPES.items()}


class Span(Protocol):
    """Anything with a ``start`` and an ``end``, such as a :class:`~vmctl_client.Vma`."""

    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...


RangeLike = tuple[int, int] | Span
# Words or groups ("rss", "accounting"), one or several; a VmaAttr mask as is; None for the layout alone.
Attrs = Iterable[Attr] | Attr | int | None


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for reads that meet ``UNAVAILABLE`` (the agent restarting, a
    connection reset). ``attempts`` counts the first try. The waits grow
    exponentially with full jitter, so a fleet of controllers does not retry in
    step; all of them fit inside the call's one deadline."""

    attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first)."""
        return random.uniform(0, min(self.max_backoff, self.initial_backoff * self.multiplier**retry))


READ_RETRY = RetryPolicy()


@dataclass(frozen=True)
class Call(Generic[T]):
    """One RPC: the stub method's name, its request, how to wrap the reply,
    and whether it may be sent again (reads may; advice never: a retry after a
    lost reply would advise twice)."""

    method: str
    request: Any
    wrap: Callable[[Any], T]
    retryable: bool
    # A server stream whose messages' bytes, joined, are the reply (see stream_vma_info).
    streamed: bool = False
    # Seconds the agent waits on purpose (a sampling window): added to the call's timeout.
    waits: float = 0.0


def window_ms(window: float | None) -> int:
    """A sampling window in seconds as the request's access_window_ms (0: none).
    Its bounds are the agent's to judge (INVALID_WINDOW); here only that it is one."""
    if window is None:
        return 0
    if isinstance(window, bool) or not (isinstance(window, (int, float)) and math.isfinite(window) and window > 0):
        raise ValueError(f"window must be a positive number of seconds, not {window!r}")
    return round(window * 1000)


def get_vma_info(pid: int, attrs: Attrs, window: float | None = None) -> Call[VmaInfo]:
    """``window``: seconds to sample access over, with the ``accessed`` attribute."""
    request = pb.GetVmaInfoRequest(pid=pid, attr_mask=attr_mask(attrs), access_window_ms=window_ms(window))
    return Call("GetVmaInfo", request, VmaInfo, retryable=True, waits=window or 0.0)


def stream_vma_info(pid: int, attrs: Attrs, window: float | None = None) -> Call[VmaInfo]:
    """GetVmaInfo's snapshot through StreamVmaInfo: messages under 1 MiB whose
    bytes, concatenated, are a GetVmaInfoResponse (the field numbers are the
    same), parsed once into the same lazy views."""
    request = pb.StreamVmaInfoRequest(pid=pid, attr_mask=attr_mask(attrs), access_window_ms=window_ms(window))
    return Call(
        "StreamVmaInfo",
        request,
        lambda chunks: VmaInfo(joined_reply(chunks)),
        retryable=True,
        streamed=True,
        waits=window or 0.0,
    )


def joined_reply(chunks: list[bytes]) -> pb.GetVmaInfoResponse:
    return pb.GetVmaInfoResponse.FromString(b"".join(chunks))


STREAMS = {"StreamVmaInfo": pb.StreamVmaInfoRequest}  # server streams the clients read as raw bytes


def raw_stream(channel: Any, method: str) -> Any:
    """``method``'s multicallable on ``channel`` (a grpc or grpc.aio channel)
    that yields each message's bytes, unparsed."""
    path = f"/vmctl.v1.VmControl/{method}"
    return channel.unary_stream(path, request_serializer=STREAMS[method].SerializeToString, response_deserializer=None)


def advise_ranges(
    pid: int,
    ranges: Iterable[RangeLike],
    advice: Advice | int,
    cookie: bytes | str | None,
    filter: Filter | int | None,
    dry_run: bool,
    scope: Scope | int | None = None,
) -> Call[AdviceResult]:
    request = advise_request(pid, ranges, advice, cookie, filter, dry_run, scope)
    return Call("AdviseRanges", request, AdviceResult, False)


def list_processes(cgroup_prefix: str | None, vma_count: bool = False) -> Call[list[ProcessInfo]]:
    """Processes in the cgroup ``cgroup_prefix`` names or below it. The reply
    is held to that rule here too (:mod:`vmctl_client.cgroup_paths`): an agent
    older than it matched string prefixes, and ``/app`` must never bring in
    ``/app-evil``'s processes, to ``reclaim`` least of all. ``vma_count``
    asks the agent to count every process's VMAs (dear: see the proto)."""
    request = pb.ListProcessesRequest(cgroup_prefix=cgroup_prefix or "", with_vma_count=vma_count)

    def wrap(reply: Any) -> list[ProcessInfo]:
        pressures = reply.cgroup_memory_pressure
        return [
            ProcessInfo(p, pressures) for p in reply.processes if not cgroup_prefix or is_under(p.cgroup, cgroup_prefix)
        ]

    return Call("ListProcesses", request, wrap, retryable=True)


def node_info() -> Call[NodeInfo]:
    return Call("GetNodeInfo", pb.GetNodeInfoRequest(), NodeInfo, retryable=True)


def _enum(value: str | int, names: Mapping[str, int], what: str) -> int:
    if not isinstance(value, str):
        return value
    try:
        return names[value.lower()]
    except KeyError:
        raise ValueError(f"unknown {what} {value!r}; known: {', '.join(names)}") from None


def advise_request(
    pid: int,
    ranges: Iterable[RangeLike],
    advice: Advice | int,
    cookie: bytes | str | None,
    filter: Filter | int | None,
    dry_run: bool,
    scope: Scope | int | None = None,
) -> pb.AdviseRangesRequest:
    """The AdviseRangesRequest for friendly arguments: names for advice,
    filter and scope (or the proto's numbers, sent as they are), the cookie as
    bytes or base64, ranges as tuples or Vmas."""
    if isinstance(cookie, str):
        cookie = base64.b64decode(cookie, validate=True)
    request = pb.AdviseRangesRequest(
        pid=pid,
        # The stubs type enum fields by their enum class; any int is a value protobuf accepts.
        advice=cast(pb.Advice, _enum(advice, ADVICE_NAMES, "advice")),
        cookie=cookie or b"",
        filter=cast(pb.Filter, _enum("none" if filter is None else filter, FILTER_NAMES, "filter")),
        dry_run=dry_run,
        scope=cast(pb.Scope, _enum("whole" if scope is None else scope, SCOPE_NAMES, "scope")),
    )
    add = request.ranges.add
    for item in ranges:
        # Set after add(): protobuf takes keyword arguments a third slower.
        message = add()
        if isinstance(item, tuple):
            message.start, message.end = item[0], item[1]
        else:
            message.start, message.end = item.start, item.end
    return request


class Attempts:
    """The deadline and retries of one call. The call's deadline is ``timeout``
    from now (plus the time the agent waits on purpose: a sampling window), or
    the client's own ``deadline`` (a per-host budget in a fleet) when that
    comes first; every attempt and every backoff fits inside it."""

    def __init__(
        self, call: Call[Any], timeout: float, deadline: float | None, policy: RetryPolicy, target: str
    ) -> None:
        self.call = call
        self.target = target
        self.policy = policy if call.retryable else RetryPolicy(attempts=1)
        self.deadline = time.monotonic() + timeout + call.waits
        if deadline is not None:
            self.deadline = min(self.deadline, deadline)
        self.tries = 0

    def timeout(self) -> float:
        """Seconds left for the next attempt; DEADLINE_EXCEEDED when none are."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise VmctlError(
                f"{self.target}: no time left for {self.call.method} (deadline passed)",
                code="DEADLINE_EXCEEDED",
                target=self.target,
            )
        self.tries += 1
        return left

    def backoff(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before trying again, or None to give up with ``error``."""
        code = error.code() if callable(getattr(error, "code", None)) else None
        if code != grpc.StatusCode.UNAVAILABLE or self.tries >= self.policy.attempts:
            return None
        delay = self.policy.backoff(self.tries - 1)
        return delay if time.monotonic() + delay < self.deadline else None

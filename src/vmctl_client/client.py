"""The synchronous client for one vmctl agent."""

from __future__ import annotations

import time
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


class Client:
    """One agent. ``target`` is ``unix:///PATH``, ``HOST:PORT`` or
    ``tcp://HOST:PORT`` (TLS when ``tls`` names a CA or client certificate).

    Every call has a deadline: ``timeout`` seconds (per call, overridable), and
    never later than ``deadline`` (a ``time.monotonic()`` instant, e.g. a
    per-host budget for several calls). Reads are retried with backoff on
    ``UNAVAILABLE`` per ``retry``; advice never is.
    """

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
        self._channel = open_channel(self.target, tls, grpc)
        self._stub = pb_grpc.VmControlStub(self._channel)
        self._streams = {name: calls.raw_stream(self._channel, name) for name in calls.STREAMS}

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _invoke(self, call: Call[T], timeout: float | None) -> T:
        attempts = Attempts(call, timeout or self.timeout, self.deadline, self.retry, self.target)
        method = self._streams[call.method] if call.streamed else getattr(self._stub, call.method)
        while True:
            try:
                reply = method(call.request, timeout=attempts.timeout())
                return call.wrap(list(reply) if call.streamed else reply)
            except grpc.RpcError as exc:
                delay = attempts.backoff(exc)
                if delay is None:
                    raise from_rpc_error(exc, self.target) from None
            time.sleep(delay)

    def get_vma_info(
        self,
        pid: int,
        attrs: Attrs = None,
        *,
        window: float | None = None,
        stream: bool = False,
        timeout: float | None = None,
    ) -> VmaInfo:
        """A snapshot of ``pid``'s VMAs with the attributes named in ``attrs``
        (words such as "rss", "pss", "swap", or groups "residency", "accounting").

        ``"accessed"`` samples: the agent clears the process's referenced bits,
        waits ``window`` seconds (0.1 to 60, required with it), and reports per
        VMA the bytes touched meanwhile (``Vma.accessed``); the cookie is the
        one valid after the window. The call's timeout is counted from the
        window's end.

        ``stream=True`` reads it through StreamVmaInfo, in messages under
        1 MiB, for a path that limits message sizes (a proxy); the answer is
        the same. This client's own channel takes messages of any size, so
        the default, one GetVmaInfo reply, reads any process, a little faster."""
        call = (calls.stream_vma_info if stream else calls.get_vma_info)(pid, attrs, window)
        return self._invoke(call, timeout)

    def advise_ranges(
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
        """Apply ``advice`` to ``ranges`` of ``pid``, refused unless ``cookie``
        (from :meth:`get_vma_info`) still names the process's layout.

        ``scope="ranges"`` checks only the ranges: each must still lie in
        memory of the kind (and file) the cookie's snapshot saw there; one that
        does not is left out, its :class:`RangeResult` ``reason`` is
        ``"RANGE_CHANGED"``, and the others are advised (``changed_ranges``
        counts the ones left out). The identity checks stay. ``result.scope``
        says which scope the agent applied: ``"whole"`` when it no longer had
        the cookie's snapshot (``scope_fallback``)."""
        return self._invoke(calls.advise_ranges(pid, ranges, advice, cookie, filter, dry_run, scope), timeout)

    def list_processes(
        self, cgroup_prefix: str | None = None, *, vma_count: bool = False, timeout: float | None = None
    ) -> list[ProcessInfo]:
        """User processes in cgroup v2 ``cgroup_prefix`` or below it, by whole
        path components (``/app`` is not ``/app-evil``); None for all. Their
        ``vma_count`` is 0 unless ``vma_count=True``, which makes the agent
        read every listed process's whole /proc/PID/maps (about 0.7 us per VMA)."""
        return self._invoke(calls.list_processes(cgroup_prefix, vma_count), timeout)

    def node_info(self, *, timeout: float | None = None) -> NodeInfo:
        """Host, kernel, memory, PSI and the kernel capabilities the agent probed."""
        return self._invoke(calls.node_info(), timeout)

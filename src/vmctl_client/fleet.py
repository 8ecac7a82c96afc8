"""One operation on many agents at once.

Every host gets its own client, a slot under the concurrency limit, and its
own deadline; whatever happens on one host (refused, unreachable, too slow,
an exception in the operation) becomes that host's error in the result and
never fails, delays past its deadline, or hides the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeAlias, TypeVar

from vmctl_client.aio import AsyncClient
from vmctl_client.calls import READ_RETRY, RetryPolicy
from vmctl_client.channel import TlsOptions
from vmctl_client.client import Client
from vmctl_client.defaults import DEFAULT_CONCURRENCY, DEFAULT_HOST_DEADLINE, DEFAULT_TIMEOUT
from vmctl_client.errors import VmctlError
from vmctl_client.targets import expand_targets

T = TypeVar("T")


@dataclass(frozen=True)
class HostDone(Generic[T]):
    """A host whose operation returned ``value``."""

    target: str
    value: T
    ok: Literal[True] = field(default=True, init=False, repr=False)
    error: None = field(default=None, init=False, repr=False)


@dataclass(frozen=True)
class HostFailed:
    """A host whose operation failed with ``error``."""

    target: str
    error: VmctlError
    ok: Literal[False] = field(default=False, init=False, repr=False)
    value: None = field(default=None, init=False, repr=False)


HostResult: TypeAlias = HostDone[T] | HostFailed
"""One host's outcome: ``value`` when ``ok``, else ``error``. ``if host.ok:``
tells a type checker which of the two it is."""


def host_error(exc: Exception, target: str) -> VmctlError:
    """Any exception from one host's work, as that host's VmctlError."""
    if isinstance(exc, VmctlError):
        if not exc.target:
            exc.target = target
        return exc
    code = "INVALID_ARGUMENT" if isinstance(exc, ValueError) else "UNKNOWN"
    error = VmctlError(f"{type(exc).__name__}: {exc}", code=code, target=target)
    error.__cause__ = exc
    return error


class Fleet:
    """Agents at ``targets`` (addresses, comma-separated lists, or
    ``dns:///NAME:PORT`` expanded to every address; see
    :mod:`vmctl_client.targets`), run ``concurrency`` at a time.

    ``host_deadline`` bounds each host's whole operation, however many calls it
    makes; ``timeout`` bounds each call within it.
    """

    def __init__(
        self,
        targets: Iterable[str],
        *,
        tls: TlsOptions | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        host_deadline: float = DEFAULT_HOST_DEADLINE,
        concurrency: int = DEFAULT_CONCURRENCY,
        retry: RetryPolicy = READ_RETRY,
    ) -> None:
        self.targets = expand_targets(targets)
        if not self.targets:
            raise ValueError("a fleet needs at least one target")
        if concurrency < 1 or host_deadline <= 0:
            raise ValueError("concurrency must be at least 1 and host_deadline positive")
        self.tls = tls
        self.timeout = timeout
        self.host_deadline = host_deadline
        self.concurrency = concurrency
        self.retry = retry

    def run(
        self, op: Callable[[Client], T], *, on_done: Callable[[HostResult[T]], None] | None = None
    ) -> list[HostResult[T]]:
        """``op(client)`` on every host from a thread pool; results in target
        order. ``on_done`` sees each result as it arrives (for progress).

        The host deadline holds for every call ``op`` makes through its client;
        time ``op`` spends elsewhere is its own to bound."""
        results: list[HostResult[T] | None] = [None] * len(self.targets)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(self.targets))) as pool:
            futures = {pool.submit(self._run_one, target, op): i for i, target in enumerate(self.targets)}
            for future in as_completed(futures):
                result = future.result()  # _run_one never raises
                results[futures[future]] = result
                if on_done is not None:
                    on_done(result)
        return results  # type: ignore[return-value]  # every slot is filled

    def _run_one(self, target: str, op: Callable[[Client], T]) -> HostResult[T]:
        deadline = time.monotonic() + self.host_deadline
        try:
            with Client(target, tls=self.tls, timeout=self.timeout, deadline=deadline, retry=self.retry) as client:
                return HostDone(target, op(client))
        except Exception as exc:
            return HostFailed(target, host_error(exc, target))

    async def run_async(
        self,
        op: Callable[[AsyncClient], Awaitable[T]],
        *,
        on_done: Callable[[HostResult[T]], None] | None = None,
    ) -> list[HostResult[T]]:
        """``await op(client)`` on every host in this event loop; results in
        target order. A host past its deadline is cancelled, whatever it awaits."""
        slots = asyncio.Semaphore(self.concurrency)

        async def one(target: str) -> HostResult[T]:
            async with slots:
                deadline = time.monotonic() + self.host_deadline
                try:
                    async with AsyncClient(
                        target, tls=self.tls, timeout=self.timeout, deadline=deadline, retry=self.retry
                    ) as client:
                        result: HostResult[T] = HostDone(target, await asyncio.wait_for(op(client), self.host_deadline))
                except asyncio.TimeoutError:
                    error = VmctlError(
                        f"{target}: not done within the host deadline ({self.host_deadline:g} s)",
                        code="DEADLINE_EXCEEDED",
                        target=target,
                    )
                    result = HostFailed(target, error)
                except Exception as exc:
                    result = HostFailed(target, host_error(exc, target))
            if on_done is not None:
                on_done(result)
            return result

        return list(await asyncio.gather(*(one(target) for target in self.targets)))

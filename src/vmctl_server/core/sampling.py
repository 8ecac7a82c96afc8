"""Access sampling (VMA_ATTR_ACCESS): the memory a process touches during a window.

The kernel marks a page referenced when the process touches it, and smaps
reports the referenced bytes of each VMA. Without DAMON's virtual-address
mode or idle-page tracking (these kernels have neither), sampling is:
clear every referenced bit of the process (/proc/PID/clear_refs), wait the
window, read smaps; each VMA's Referenced is then what was touched in the
window (a VMA mapped meanwhile counts what was touched since it appeared).

A sampler runs in steps so that the window holds no worker thread: the
transport runs :func:`clear` on a worker, waits the window on its event loop,
then takes the snapshot on a worker (``SnapshotReader.take(..., cleared=)``),
all under :class:`SamplerLocks`, which lets one sampler at a time at a
process: another's clear inside the window would erase what it counts.

Clearing is not free of effects: pages whose bits were cleared look not
recently used to the kernel's own reclaim, as after MADV_COLD, until the
process touches them again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from vmctl_api.words import ACCESS_WINDOW_MAX_MS, ACCESS_WINDOW_MIN_MS, ATTR_ACCESS
from vmctl_server.core import procfs
from vmctl_server.core.faults import InvalidRequest, ProcessChanged, SamplerBusy
from vmctl_server.core.snapshot import Identity


def window_seconds(attr_mask: int, window_ms: int) -> float | None:
    """The window a request asks for, in seconds, or None when it asks for no
    sampling. A window goes with ATTR_ACCESS and nothing else: without it the
    agent would wait for nothing, or answer a sampler with bits it never
    cleared."""
    if not attr_mask & ATTR_ACCESS:
        if window_ms:
            raise InvalidRequest(
                f"access_window_ms {window_ms} is set but attr_mask lacks VMA_ATTR_ACCESS: ask for it to sample,"
                " or leave the window out",
                reason="INVALID_WINDOW",
                field="access_window_ms",
            )
        return None
    if not ACCESS_WINDOW_MIN_MS <= window_ms <= ACCESS_WINDOW_MAX_MS:
        given = f"access_window_ms {window_ms}" if window_ms else "no access_window_ms"
        raise InvalidRequest(
            f"{given}: VMA_ATTR_ACCESS samples for {ACCESS_WINDOW_MIN_MS} to {ACCESS_WINDOW_MAX_MS} ms",
            reason="INVALID_WINDOW",
            field="access_window_ms",
        )
    return window_ms / 1000


def check_fits(window: float, time_left: float | None) -> None:
    """INVALID_WINDOW when the call's deadline comes before the window ends:
    refused before any bit is cleared, rather than cut off in the middle."""
    if time_left is not None and time_left < window:
        raise InvalidRequest(
            f"the sampling window ({window:g} s) is longer than the {max(time_left, 0):.3g} s left before the call's"
            " deadline: give the call a deadline beyond the window",
            reason="INVALID_WINDOW",
            field="access_window_ms",
        )


def clear(pid: int, start_time: int, exec_id: bytes) -> Identity:
    """Clear the referenced bits of process ``pid``, which must still be the
    one with this start time and image (the one the policy judged); its
    identity as the window begins. Through one open /proc/PID, so the bits
    cleared are that process's."""
    with procfs.ProcessDir(pid) as proc:
        stat = proc.stat()
        procfs.require_user_process(stat)
        if stat.start_time != start_time:
            raise ProcessChanged(f"pid {pid} became another process before it was sampled", pid=pid)
        image = proc.exec_id()
        if image != exec_id:
            raise ProcessChanged(f"process {pid} exec'd before it was sampled", pid=pid)
        proc.clear_referenced()
    return Identity(pid, stat.start_time, stat.comm, image)


_LEAST_WAIT = 0.001  # seconds


@dataclass
class _Turn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # samplers holding or waiting for the lock


class SamplerLocks:
    """One sampler at a time per process, keyed by (pid, start time); the
    others wait their turn, in order. An entry lives while some sampler holds
    or waits for it, so memory is bounded by the calls in flight. Used from
    the event loop only."""

    def __init__(self) -> None:
        self._turns: dict[tuple[int, int], _Turn] = {}

    def __len__(self) -> int:
        return len(self._turns)

    @contextlib.asynccontextmanager
    async def turn(self, pid: int, start_time: int, wait: float | None) -> AsyncIterator[None]:
        """Hold process ``pid``'s turn; SAMPLER_BUSY when others hold it for
        more than ``wait`` seconds (None: as long as they do)."""
        key = (pid, start_time)
        turn = self._turns.setdefault(key, _Turn())
        turn.users += 1
        try:
            try:
                # A positive timeout even at the edge: wait_for(..., 0) times out before
                # even trying, and would refuse a lock nobody holds.
                await asyncio.wait_for(turn.lock.acquire(), None if wait is None else max(wait, _LEAST_WAIT))
            except asyncio.TimeoutError:
                raise SamplerBusy(
                    f"another sampler of process {pid} held it until this call's window no longer fitted its"
                    " deadline; nothing was cleared",
                    pid=pid,
                ) from None
            try:
                yield
            finally:
                turn.lock.release()
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[key]

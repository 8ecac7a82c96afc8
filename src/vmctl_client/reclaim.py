"""Reclaim, the controller workflow: read, choose, advise with the cookie, and
on a moved layout read again and retry (bounded, with jitter).

For one process::

    report = reclaim(client, pid=1234)                        # pageout of private anonymous memory
    report = reclaim(client, cgroup="/kubepods.slice/...")    # every process in a cgroup

``report.to_json()`` has the ``advise`` keys (``requested_bytes``,
``advised_bytes``, ``syscalls``, ``ranges``) summed over the processes, plus
rss and swap before and after, and each process's own account.

By default the advice is checked with scope ``"ranges"``: a chosen VMA the
process replaced since the snapshot is left out (``changed_ranges``), the
others are advised, so a process that maps and unmaps all the time elsewhere
is still reclaimed. With ``scope="whole"`` any change refuses the advice and
reclaim reads again, up to ``retries`` times (8: a re-read is cheap next to a
failure). A process
whose advice failed keeps what was learnt before it failed: its attempts, and
rss and swap as last read (nothing was advised, so "after" is that reading too).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmctl_api.words import FILTERS, Advice, Filter, Kind, Scope
from vmctl_client.defaults import DEFAULT_RETRIES
from vmctl_client.errors import ProcessChangedError, ProcessGoneError, StaleCookieError, VmctlError

if TYPE_CHECKING:
    from vmctl_client.client import Client
    from vmctl_client.types import RangeResult, Vma, VmaInfo

# Jitter for re-reads after LAYOUT_CHANGED: a process that is mapping memory
# right now is likely to go on for a moment; waiting a little (and not in step
# with other controllers) gives the next snapshot a better chance to hold.
RETRY_BASE_SECONDS = 0.02
KINDS_BY_FILTER: dict[Filter, tuple[Kind, ...]] = {name: filter_.kinds for name, filter_ in FILTERS.items()}

# Per-process outcomes, from best to worst.
DONE, GONE, CHANGED, STALE, ERROR = "done", "gone", "changed", "stale", "error"


@dataclass
class ProcessReclaim:
    """What reclaim did to one process."""

    pid: int
    comm: str = ""
    start_time: int = 0
    status: str = DONE
    attempts: int = 0
    vmas_chosen: int = 0
    requested_bytes: int = 0
    advised_bytes: int = 0
    syscalls: int = 0
    ranges: Sequence[RangeResult] = ()  # the advice reply's lazy per-range results
    scope: str = ""  # the scope the agent applied to the advice ("whole", "ranges"), once advised
    changed_ranges: int = 0  # chosen VMAs left out as RANGE_CHANGED (scope "ranges")
    rss_before: int = 0
    swap_before: int = 0
    rss_after: int = 0
    swap_after: int = 0
    error: VmctlError | None = None

    @property
    def failed_ranges(self) -> int:
        """Ranges the kernel refused (mlocked memory: EINVAL; unmapped meanwhile: ENOMEM)."""
        return sum(1 for r in self.ranges if r.error)

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "comm": self.comm,
            "start_time": self.start_time,
            "status": self.status,
            "attempts": self.attempts,
            "vmas_chosen": self.vmas_chosen,
            "requested_bytes": self.requested_bytes,
            "advised_bytes": self.advised_bytes,
            "syscalls": self.syscalls,
            "failed_ranges": self.failed_ranges,
            "scope": self.scope or None,
            "changed_ranges": self.changed_ranges,
            "rss_before": self.rss_before,
            "swap_before": self.swap_before,
            "rss_after": self.rss_after,
            "swap_after": self.swap_after,
            "error": self.error.to_json() if self.error else None,
        }


@dataclass
class ReclaimReport:
    """Reclaim over one process or a cgroup on one host."""

    advice: Advice
    filter: Filter
    dry_run: bool
    cgroup: str | None
    processes: list[ProcessReclaim]
    scope: Scope = "ranges"  # as asked

    def _sum(self, name: str) -> int:
        return sum(getattr(p, name) for p in self.processes)

    @property
    def requested_bytes(self) -> int:
        return self._sum("requested_bytes")

    @property
    def advised_bytes(self) -> int:
        return self._sum("advised_bytes")

    @property
    def syscalls(self) -> int:
        return self._sum("syscalls")

    @property
    def failed_ranges(self) -> int:
        return self._sum("failed_ranges")

    @property
    def worst_status(self) -> str:
        order = (DONE, GONE, CHANGED, STALE, ERROR)
        return max((p.status for p in self.processes), key=order.index, default=DONE)

    def to_json(self) -> dict[str, Any]:
        return {
            "advice": self.advice,
            "filter": self.filter,
            "dry_run": self.dry_run,
            "cgroup": self.cgroup,
            "requested_bytes": self.requested_bytes,
            "advised_bytes": self.advised_bytes,
            "syscalls": self.syscalls,
            "failed_ranges": self.failed_ranges,
            "scope": self.scope,
            "changed_ranges": self._sum("changed_ranges"),
            "rss_before": self._sum("rss_before"),
            "swap_before": self._sum("swap_before"),
            "rss_after": self._sum("rss_after"),
            "swap_after": self._sum("swap_after"),
            "attempts": self._sum("attempts"),
            "ranges": [{"pid": p.pid, **r.to_json()} for p in self.processes for r in p.ranges],
            "processes": [p.to_json() for p in self.processes],
        }


def choose_ranges(info: VmaInfo, filter: Filter, min_rss: int) -> list[Vma]:
    """The VMAs worth advising: of a kind the filter admits (never the
    kernel's special mappings), with at least ``min_rss`` bytes resident
    (and at least one page: advising what is not resident does nothing)."""
    kinds = KINDS_BY_FILTER[filter]
    floor = max(min_rss, 1)
    return [vma for vma in info.vmas if vma.kind in kinds and vma.rss >= floor]


def _residency(info: VmaInfo) -> tuple[int, int]:
    rss = swap = 0
    for vma in info.vmas:
        rss += vma.rss
        swap += vma.swap
    return rss, swap


def reclaim_process(
    client: Client,
    pid: int,
    *,
    advice: Advice = "pageout",
    filter: Filter = "anonymous",
    min_rss: int = 0,
    retries: int = DEFAULT_RETRIES,
    dry_run: bool = False,
    start_time: int | None = None,
    scope: Scope = "ranges",
) -> ProcessReclaim:
    """Reclaim one process. ``start_time`` (from ListProcesses) pins the
    process: a pid now naming another one is left alone (``changed``).
    Raises what the agent raises, except LAYOUT_CHANGED, retried up to
    ``retries`` times before it is raised as :class:`StaleCookieError`.
    ``scope``: see :meth:`Client.advise_ranges`."""
    outcome = ProcessReclaim(pid)
    _reclaim_into(outcome, client, advice, filter, min_rss, retries, dry_run, start_time, scope)
    return outcome


def _reclaim_into(
    outcome: ProcessReclaim,
    client: Client,
    advice: Advice,
    filter: Filter,
    min_rss: int,
    retries: int,
    dry_run: bool,
    start_time: int | None,
    scope: Scope = "ranges",
) -> None:
    """reclaim_process's work, written into ``outcome`` as it goes, so that a
    caller catching its error still has the attempts made and the rss read."""
    pid = outcome.pid
    for attempt in range(retries + 1):
        outcome.attempts = attempt + 1
        info = client.get_vma_info(pid, ("rss", "swap"))
        if start_time is not None and info.process.start_time != start_time:
            raise ProcessChangedError(
                f"pid {pid} names another process than the one listed",
                code="FAILED_PRECONDITION",
                reason="PROCESS_CHANGED",
            )
        outcome.comm, outcome.start_time = info.process.comm, info.process.start_time
        outcome.rss_before, outcome.swap_before = _residency(info)
        # Until advice is applied, "after" is the last reading.
        outcome.rss_after, outcome.swap_after = outcome.rss_before, outcome.swap_before
        chosen = choose_ranges(info, filter, min_rss)
        outcome.vmas_chosen = len(chosen)
        if not chosen:
            return
        try:
            result = client.advise_ranges(
                pid, chosen, advice, cookie=info.cookie, filter=filter, dry_run=dry_run, scope=scope
            )
        except ProcessChangedError:
            raise
        except StaleCookieError:
            if attempt == retries:
                raise
            time.sleep(random.uniform(0, RETRY_BASE_SECONDS * 2**attempt))
            continue
        outcome.requested_bytes = result.requested_bytes
        outcome.advised_bytes = result.advised_bytes
        outcome.syscalls = result.syscalls
        outcome.ranges = result.ranges
        outcome.scope, outcome.changed_ranges = result.scope, result.changed_ranges
        break
    after = client.get_vma_info(pid, ("rss", "swap"))
    outcome.rss_after, outcome.swap_after = _residency(after)


def _status_of(error: VmctlError) -> str:
    if isinstance(error, ProcessChangedError):
        return CHANGED
    if isinstance(error, StaleCookieError):
        return STALE
    if isinstance(error, ProcessGoneError):
        return GONE
    return ERROR


def reclaim(
    client: Client,
    *,
    pid: int | None = None,
    cgroup: str | None = None,
    advice: Advice = "pageout",
    filter: Filter = "anonymous",
    min_rss: int = 0,
    retries: int = DEFAULT_RETRIES,
    dry_run: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_process: Callable[[ProcessReclaim], None] | None = None,
    scope: Scope = "ranges",
) -> ReclaimReport:
    """Reclaim ``pid``, or every process in cgroup v2 ``cgroup`` or below it
    (whole path components: ``/app`` is not ``/app-evil``), one after another. For one pid, errors are raised; for a
    cgroup, each process's error is its own entry (a process that exits
    meanwhile is ``gone``, one whose pid was reused ``changed``).
    ``on_start(count)`` and ``on_process(outcome)`` report progress."""
    if (pid is None) == (cgroup is None):
        raise ValueError("reclaim takes a pid or a cgroup prefix, not both")
    if filter not in KINDS_BY_FILTER:
        raise ValueError(f"unknown filter {filter!r}; known: {', '.join(KINDS_BY_FILTER)}")
    report = ReclaimReport(advice, filter, dry_run, cgroup, [], scope)
    if pid is not None:
        if on_start:
            on_start(1)
        report.processes.append(
            reclaim_process(
                client,
                pid,
                advice=advice,
                filter=filter,
                min_rss=min_rss,
                retries=retries,
                dry_run=dry_run,
                scope=scope,
            )
        )
        if on_process:
            on_process(report.processes[-1])
        return report
    members = client.list_processes(cgroup)
    if on_start:
        on_start(len(members))
    for member in members:
        outcome = ProcessReclaim(member.pid, comm=member.comm, start_time=member.start_time)
        try:
            _reclaim_into(outcome, client, advice, filter, min_rss, retries, dry_run, member.start_time, scope)
        except VmctlError as error:
            outcome.status, outcome.error = _status_of(error), error
        report.processes.append(outcome)
        if on_process:
            on_process(outcome)
    return report

"""autoreclaim: the reference closed loop. Page out what idle processes hold,
mark what busy ones did not touch as cold, and back off when that hurts.

One loop works one agent (one node): it scales to a fleet by running one per
node, as the Kubernetes overlay does. A controller embeds it as::

    settings = LoopSettings(cgroups=("/kubepods.slice",), idle_seconds=60, interval=10)
    loop = AutoReclaimer(client, settings, on_action=lambda a: print(a.to_json()))
    summary = loop.run(duration=0, stop=threading.Event())   # until stop is set

Every ``interval`` seconds a step lists the processes of the cgroups (whole
path components) with their CPU time and major faults, and reads the host's
memory pressure:

* A process whose CPU time grew by less than ``idle_cpu_percent`` of the
  time over the last ``idle_seconds`` (watched that long) is idle: its
  anonymous memory is paged out (:func:`reclaim_process`, pinned to the start
  time listed), once per idle period. Using CPU again ends the period.
  Perfectly still is too strict: Redis's timer runs ten times a second.
* A process that is not idle keeps its memory; with ``cold_unaccessed``, the
  anonymous VMAs it did not touch in a ``window``-second sample (at most once
  per ``idle_seconds`` per process) get ``cold`` advice: first in line when
  the kernel reclaims, still resident until then.
* Back-off: while the host's memory PSI "some" avg10 is above
  ``max_pressure`` percent, no new pageout starts (the node is already
  short; pageout would add swap-in stalls to it). A process that faults back
  more than ``refault_percent`` of what was paged out within
  ``backoff_seconds`` of the pageout was not idle in the way that matters, and
  is left alone for ``backoff_seconds``.

Each thing done is an :class:`Action` passed to ``on_action`` (``run`` starts
with a ``start`` action holding the settings); ``run`` returns a :class:`Summary`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from vmctl_client.errors import ProcessChangedError, ProcessGoneError, StaleCookieError, VmctlError
from vmctl_client.reclaim import KINDS_BY_FILTER, ProcessReclaim, reclaim_process

if TYPE_CHECKING:
    from vmctl_client.client import Client
    from vmctl_client.types import AdviceResult, ProcessInfo, Vma

NS_PER_S = 1_000_000_000
# Busy processes sampled at once with --cold-unaccessed. A sample is mostly a window of
# waiting (on the agent's event loop, holding none of its workers), so a few at a time
# keep a step short without many calls in flight against the agent's limits.
SAMPLES_AT_ONCE = 8

# The events an Action names.
START, PAGEOUT, COLD, HOLD, RESUME, BACKOFF, ERROR = "start", "pageout", "cold", "hold", "resume", "backoff", "error"


@dataclass(frozen=True)
class LoopSettings:
    """What the loop selects and when it acts; the defaults are the CLI's."""

    cgroups: tuple[str, ...]
    idle_seconds: float = 30.0
    idle_cpu_percent: float = 1.0
    interval: float = 5.0
    max_pressure: float = 10.0
    cold_unaccessed: bool = False
    window: float = 1.0
    refault_percent: float = 10.0
    backoff_seconds: float = 300.0
    min_rss: int = 1 << 20
    dry_run: bool = False

    def __post_init__(self) -> None:
        if not self.cgroups:
            raise ValueError("autoreclaim needs at least one cgroup prefix")
        positive = {"idle_seconds": self.idle_seconds, "interval": self.interval, "window": self.window}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be above 0, not {value}")
        percents = {
            "idle_cpu_percent": self.idle_cpu_percent,
            "max_pressure": self.max_pressure,
            "refault_percent": self.refault_percent,
        }
        for name, value in percents.items():
            if not 0 <= value <= 100:
                raise ValueError(f"{name} is a percentage from 0 to 100, not {value}")
        if self.backoff_seconds < 0 or self.min_rss < 0:
            raise ValueError("backoff_seconds and min_rss cannot be negative")


@dataclass
class Action:
    """One thing the loop did or declined to do, with what it measured."""

    event: str
    pid: int = 0
    start_time: int = 0
    comm: str = ""
    cgroup: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        head: dict[str, Any] = {"event": self.event}
        if self.pid:
            head.update(pid=self.pid, start_time=self.start_time, comm=self.comm, cgroup=self.cgroup)
        return {**head, **self.details}


@dataclass
class Summary:
    """What a run did, in total."""

    steps: int = 0
    seconds: float = 0.0
    pageouts: int = 0
    paged_out_bytes: int = 0  # rss that left the processes paged out (before minus after)
    swapped_bytes: int = 0  # swap they gained meanwhile
    cold_advices: int = 0
    cold_bytes: int = 0  # resident bytes of the VMAs marked cold
    holds: int = 0  # steps in which pageout waited for the host's memory pressure to fall
    backoffs: int = 0
    errors: int = 0
    processes: int = 0  # distinct processes seen

    def to_json(self) -> dict[str, Any]:
        return {"event": "summary", **asdict(self)}


@dataclass
class _Watched:
    """What the loop remembers about one process (pid and start time)."""

    comm: str
    cgroup: str
    cpu: deque[tuple[float, int]] = field(default_factory=deque)  # (when, cpu_time_ns), oldest first
    paged_out: bool = False  # in this idle period
    paged_at: float | None = None  # while a refault would still count
    faults_at_pageout: int = 0
    paged_bytes: int = 0
    left_alone_until: float = 0.0
    sampled_at: float | None = None

    def observe(self, now: float, cpu_time_ns: int, span: float) -> None:
        """Keep the samples that cover the last ``span`` seconds, and no more."""
        self.cpu.append((now, cpu_time_ns))
        while len(self.cpu) > 2 and now - self.cpu[1][0] >= span:
            self.cpu.popleft()

    def due_for_sample(self, now: float, every: float) -> bool:
        """At most one access sample per ``every`` seconds; True (and counted as taken) when due."""
        if self.sampled_at is not None and now - self.sampled_at < every:
            return False
        self.sampled_at = now
        return True

    def idle(self, now: float, span: float, cpu_percent: float) -> bool | None:
        """True idle, False busy, None not watched long enough to say."""
        since, cpu_then = self.cpu[0]
        used = self.cpu[-1][1] - cpu_then
        if used > cpu_percent / 100 * span * NS_PER_S:
            return False  # busy already, whatever the span watched so far
        return True if now - since >= span else None


class AutoReclaimer:
    """The loop over one agent. ``step()`` is one pass; ``run()`` repeats it
    every ``interval`` seconds. ``clock`` is the monotonic time it judges by."""

    def __init__(
        self,
        client: Client,
        settings: LoopSettings,
        *,
        on_action: Callable[[Action], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.settings = settings
        self.summary = Summary()
        self._on_action = on_action
        self._clock = clock
        self._watched: dict[tuple[int, int], _Watched] = {}
        self._seen: set[tuple[int, int]] = set()
        self._holding = False
        self._page_size = 0

    # ---- one step ----------------------------------------------------------------

    def step(self) -> None:
        now = self._clock()
        members = self._members()
        self._forget_all_but(members)
        holding = self._hold_for_pressure()
        to_sample: list[tuple[tuple[int, int], ProcessInfo]] = []
        for key, process in members.items():
            try:
                if self._step_process(now, key, process, holding):
                    to_sample.append((key, process))
            except (ProcessGoneError, ProcessChangedError):  # exited, or its pid names another process now
                self._watched.pop(key, None)
            except VmctlError as error:
                self._failed(now, key, process, error)
        self._sample_and_cool(now, to_sample)
        self.summary.steps += 1
        self.summary.processes = len(self._seen)

    def _members(self) -> dict[tuple[int, int], ProcessInfo]:
        members: dict[tuple[int, int], ProcessInfo] = {}
        for prefix in self.settings.cgroups:
            for process in self.client.list_processes(prefix):
                members[process.pid, process.start_time] = process
        return members

    def _forget_all_but(self, members: Iterable[tuple[int, int]]) -> None:
        alive = set(members)
        for key in [k for k in self._watched if k not in alive]:
            del self._watched[key]

    def _hold_for_pressure(self) -> bool:
        """Whether pageout waits this step; a hold and its end are actions."""
        node = self.client.node_info()
        self._page_size = node.page_size
        pressure = node.memory_pressure
        some = pressure["some"]["avg10"] if pressure else 0.0  # a kernel without PSI never holds
        holding = some > self.settings.max_pressure
        if holding != self._holding:
            event = HOLD if holding else RESUME
            self._act(Action(event, details={"pressure_some_avg10": some, "max_pressure": self.settings.max_pressure}))
        self._holding = holding
        self.summary.holds += holding
        return holding

    def _step_process(self, now: float, key: tuple[int, int], process: ProcessInfo, holding: bool) -> bool:
        """Page the process out if it is due; True if it is busy and due for a cold sample."""
        settings = self.settings
        watched = self._watched.get(key)
        if watched is None:
            watched = self._watched[key] = _Watched(process.comm, process.cgroup)
            self._seen.add(key)
        watched.observe(now, process.cpu_time_ns, settings.idle_seconds)
        self._check_refaults(now, key, watched, process)
        if now < watched.left_alone_until:
            return False
        idle = watched.idle(now, settings.idle_seconds, settings.idle_cpu_percent)
        if idle is False:
            watched.paged_out = False  # the next idle period may page it out again
            return settings.cold_unaccessed and watched.due_for_sample(now, settings.idle_seconds)
        if idle and not watched.paged_out and not holding:
            self._page_out(now, key, watched, process)
        return False

    # ---- pageout and its refaults ----------------------------------------------------

    def _page_out(self, now: float, key: tuple[int, int], watched: _Watched, process: ProcessInfo) -> None:
        pid, start_time = key
        outcome = reclaim_process(
            self.client,
            pid,
            advice="pageout",
            filter="anonymous",
            min_rss=self.settings.min_rss,
            dry_run=self.settings.dry_run,
            start_time=start_time,
            scope="ranges",  # a busy allocator elsewhere in the process does not stop it
        )
        watched.paged_out = True
        if not outcome.vmas_chosen:
            return  # nothing with --min-rss resident: no action to report, and none until it is busy again
        freed = max(outcome.rss_before - outcome.rss_after, 0)
        watched.paged_at, watched.faults_at_pageout, watched.paged_bytes = now, process.major_faults, freed
        self.summary.pageouts += 1
        self.summary.paged_out_bytes += freed
        self.summary.swapped_bytes += max(outcome.swap_after - outcome.swap_before, 0)
        self._act(self._action(PAGEOUT, key, watched, self._pageout_details(now, watched, outcome)))

    def _pageout_details(self, now: float, watched: _Watched, outcome: ProcessReclaim) -> dict[str, Any]:
        return {
            "idle_seconds": round(now - watched.cpu[0][0], 3),
            "dry_run": self.settings.dry_run,
            "vmas": outcome.vmas_chosen,
            "advised_bytes": outcome.advised_bytes,
            "attempts": outcome.attempts,
            "changed_ranges": outcome.changed_ranges,
            "rss_before": outcome.rss_before,
            "rss_after": outcome.rss_after,
            "swap_before": outcome.swap_before,
            "swap_after": outcome.swap_after,
        }

    def _check_refaults(self, now: float, key: tuple[int, int], watched: _Watched, process: ProcessInfo) -> None:
        """Memory paged out that comes back quickly was in use: leave the process alone for a while."""
        if watched.paged_at is None:
            return
        if now - watched.paged_at > self.settings.backoff_seconds or not watched.paged_bytes:
            watched.paged_at = None
            return
        refaulted = (process.major_faults - watched.faults_at_pageout) * self._page_size
        if refaulted * 100 <= self.settings.refault_percent * watched.paged_bytes:
            return
        watched.paged_at = None
        watched.left_alone_until = now + self.settings.backoff_seconds
        self.summary.backoffs += 1
        details = {
            "reason": "refault",
            "refaulted_bytes": refaulted,
            "paged_bytes": watched.paged_bytes,
            "seconds": self.settings.backoff_seconds,
        }
        self._act(self._action(BACKOFF, key, watched, details))

    # ---- cold advice for the untouched memory of busy processes ------------------------

    def _sample_and_cool(self, now: float, due: list[tuple[tuple[int, int], ProcessInfo]]) -> None:
        """Sample the busy processes due for it, several at once (each sample is a window of
        waiting, in the agent's event loop, not on its workers), then record what was cooled."""
        if not due:
            return
        with ThreadPoolExecutor(max_workers=min(SAMPLES_AT_ONCE, len(due))) as pool:
            futures = [(key, process, pool.submit(self._sample_and_advise, key)) for key, process in due]
        for key, process, future in futures:
            try:
                cooled = future.result()
            except (ProcessGoneError, ProcessChangedError):
                self._watched.pop(key, None)
                continue
            except VmctlError as error:
                self._failed(now, key, process, error)
                continue
            if cooled is not None and key in self._watched:
                self._record_cold(key, self._watched[key], *cooled)

    def _sample_and_advise(self, key: tuple[int, int]) -> tuple[list[Vma], AdviceResult] | None:
        """Cold advice for the anonymous VMAs the process did not touch in a window; None if none."""
        pid, start_time = key
        info = self.client.get_vma_info(pid, ("rss", "accessed"), window=self.settings.window)
        if info.process.start_time != start_time:
            raise ProcessChangedError(
                f"pid {pid} names another process now", code="FAILED_PRECONDITION", reason="PROCESS_CHANGED"
            )
        untouched = [v for v in info.vmas if _untouched_anonymous(v, self.settings.min_rss)]
        if not untouched:
            return None
        try:
            # Scope ranges: the process is busy, its layout may well move between the sample and the advice.
            result = self.client.advise_ranges(
                pid,
                untouched,
                "cold",
                cookie=info.cookie,
                filter="anonymous",
                dry_run=self.settings.dry_run,
                scope="ranges",
            )
        except ProcessChangedError:
            raise
        except StaleCookieError:
            return None  # its snapshot was evicted and the whole layout moved meanwhile: next time
        return untouched, result

    def _record_cold(self, key: tuple[int, int], watched: _Watched, untouched: list[Vma], result: AdviceResult) -> None:
        cold_bytes = sum(v.rss for v in untouched)
        self.summary.cold_advices += 1
        self.summary.cold_bytes += cold_bytes
        details = {
            "window_seconds": self.settings.window,
            "dry_run": self.settings.dry_run,
            "vmas": len(untouched),
            "ranges": [[v.start, v.end] for v in untouched],
            "cold_bytes": cold_bytes,
            "advised_bytes": result.advised_bytes,
            "changed_ranges": result.changed_ranges,
        }
        self._act(self._action(COLD, key, watched, details))

    # ---- errors and reporting ------------------------------------------------------

    def _failed(self, now: float, key: tuple[int, int], process: ProcessInfo, error: VmctlError) -> None:
        """A refusal would repeat every step: report it once, then leave the process alone a while."""
        watched = self._watched.get(key) or _Watched(process.comm, process.cgroup)
        watched.left_alone_until = now + self.settings.backoff_seconds
        self.summary.errors += 1
        self._act(self._action(ERROR, key, watched, {"error": error.to_json()}))

    @staticmethod
    def _action(event: str, key: tuple[int, int], watched: _Watched, details: dict[str, Any]) -> Action:
        return Action(event, key[0], key[1], watched.comm, watched.cgroup, details)

    def _act(self, action: Action) -> None:
        if self._on_action is not None:
            self._on_action(action)

    # ---- the loop ----------------------------------------------------------------------

    def run(self, duration: float = 0.0, stop: threading.Event | None = None) -> Summary:
        """Step every ``interval`` seconds for ``duration`` seconds (0: until
        ``stop`` is set). A step that takes longer than the interval is
        followed by the next at once, not by a burst of missed ones."""
        stop = stop or threading.Event()
        self._act(
            Action(START, details={"settings": {**asdict(self.settings), "cgroups": list(self.settings.cgroups)}})
        )
        started = self._clock()
        deadline = started + duration if duration else None
        while not stop.is_set():
            step_started = self._clock()
            try:
                self.step()
            except VmctlError as error:  # the agent restarting, say: the next step tries again
                self.summary.errors += 1
                self._act(Action(ERROR, details={"error": error.to_json()}))
            next_step = step_started + self.settings.interval
            if deadline is not None and next_step >= deadline:
                break
            stop.wait(max(0.0, next_step - self._clock()))
        self.summary.seconds = self._clock() - started
        return self.summary


def _untouched_anonymous(vma: Vma, min_rss: int) -> bool:
    return vma.kind in KINDS_BY_FILTER["anonymous"] and vma.accessed == 0 and vma.rss >= max(min_rss, 1)

"""AdviseRanges without gRPC: validate, check the cookie, split, advise.

Order matters. Everything that can be checked without the process (fields,
alignment, overlap) is checked first; then the cookie's signature, then the
process's identity through a pidfd, then the live layout against the
cookie's digest, then every range against that layout. Only when all of it
passes does the first process_madvise call run, so an invalid request changes
nothing. The re-read and the calls are not one atomic step (the kernel offers
none): a mapping can change in the few microseconds between them. The pidfd
at least guarantees the calls reach the process that was checked, or none.

With SCOPE_RANGES the live layout need not be the cookie's: the agent
plans against the layout the cookie's snapshot saw (kept in a
:class:`~vmctl_server.core.snapshot_cache.SnapshotCache`), then checks each
range against the live process (:meth:`RangeSet.covering`: PROCMAP_QUERY, or
the maps text without it) and leaves out, as RANGE_CHANGED, every range that
no longer lies in memory of the kind the snapshot saw there. The advices are
lossless, which is what makes that safe. Without the snapshot (evicted, or
an agent restarted) the whole layout is checked, and the reply says so.

The per-range work (checks, the split at VMA boundaries, the calls, the
reply's per-range results) is done by a :class:`RangeSet`: in C
(:mod:`vmctl_server.backends.native.ranges`) or in pure Python
(:mod:`vmctl_server.backends.reference.ranges`, built on the reference functions here), which
give the same answers. Both word their refusals through :func:`range_fault`.
"""

from __future__ import annotations

import errno as errno_mod
import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vmctl_api.words import ADVICE_BY_NUMBER, ADVICES, FILTERS, KIND_FILE, KINDS, SCOPES, Advice
from vmctl_server.core import kernel, procfs
from vmctl_server.core.cookie import CookieClaims, CookieSigner
from vmctl_server.core.faults import (
    AccessDenied,
    CookieInvalid,
    CookieRequired,
    InvalidRequest,
    KernelUnsupported,
    LayoutChanged,
    ProcessChanged,
    ProcessGone,
)
from vmctl_server.core.layout import LAYOUT_RECORD, Layout, layout_digest
from vmctl_server.core.snapshot import Identity, SnapshotReader, check_pid, read_identity
from vmctl_server.core.snapshot_cache import SnapshotCache

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# Values of vmctl.v1.Filter, each with the VmaKind values it admits.
FILTER_KINDS = {filter_.number: tuple(KINDS[kind] for kind in filter_.kinds) for filter_ in FILTERS.values()}
FILTER_NONE = FILTERS["none"].number
ADVICE_UNSPECIFIED = 0  # vmctl.v1.Advice.ADVICE_UNSPECIFIED: no advice sent

# The refusals range_fault words, each a VMCTL_RANGE_* of the C back-end too.
RANGE_REASONS = ("RANGE_UNALIGNED", "RANGE_EMPTY", "RANGE_WRAPS", "RANGE_OVERLAP", "RANGE_UNMAPPED")

DEFAULT_MAX_RANGES = 1 << 18  # above vm.max_map_count, so "every VMA" always fits

SCOPE_WHOLE = SCOPES["whole"]  # vmctl.v1.Scope values; SCOPE_UNSPECIFIED and unknown ones are SCOPE_WHOLE
SCOPE_RANGES = SCOPES["ranges"]
RANGE_CHANGED = "RANGE_CHANGED"  # RangeResult.reason of a range SCOPE_RANGES left out (words.RANGE_RESULT_REASONS)


class Plan(Protocol):
    """One request's ranges split into the pieces to advise (see plan_ranges
    and split_for_calls), and what became of each range."""

    requested_bytes: int

    @property
    def advised_bytes(self) -> int: ...
    def dry_run(self) -> None:
        """Count every piece as advised, and make no call."""

    def apply(self, pidfd: int, madv: int) -> tuple[int, int]:
        """Advise every piece: the process_madvise calls made, and the errno
        of the first piece that failed when no piece advised a byte (else 0)."""

    def exclude(self, changed: bytes) -> int:
        """Leave out every range i with ``changed[i]`` (RANGE_CHANGED): none
        of its pieces is advised. How many were left out."""

    def outcomes(self) -> list[RangeOutcome]: ...
    def pieces(self) -> list[tuple[int, int, int]]:
        """(range index, start, end) of every piece, in the order advised."""

    def encode(self, prefix: bytes = b"") -> bytes:
        """``prefix``, then the wire bytes of AdviseRangesResponse's
        ``repeated RangeResult ranges = 4``."""


class RangeSet(Protocol):
    """The ranges of one request; read from the request only when first used,
    so a request refused on its count alone never costs more than that."""

    native: bool

    def __len__(self) -> int: ...
    def total_bytes(self) -> int:
        """The sum of max(0, end - start): what the ranges name, valid or not."""

    def check(self) -> None:
        """check_ranges after its count checks: raises InvalidRequest."""

    def plan(self, layout_records: bytes, filter_: int) -> Plan:
        """plan_ranges against the packed layout: raises InvalidRequest."""

    def covering(self, maps_fd: int, layout_records: bytes) -> bytes:
        """ranges_changed against the live VMAs PROCMAP_QUERY finds on
        ``maps_fd`` (/proc/PID/maps): one byte per range, 1 when it changed
        since the snapshot ``layout_records`` (which covers every range)."""

    def covering_records(self, layout_records: bytes, live_records: bytes) -> bytes:
        """The same against a live layout read from maps (no PROCMAP_QUERY)."""


class RangeBackend(Protocol):
    """Makes RangeSets: pyranges.PyRanges or nativeranges.NativeRanges."""

    native: bool

    def from_pairs(self, pairs: Sequence[tuple[int, int]]) -> RangeSet: ...
    def from_message(self, ranges: Sequence[Any], wire: bytes) -> RangeSet:
        """The ``ranges`` field of a parsed AdviseRangesRequest (items with
        ``start`` and ``end``), with the bytes the request was parsed from."""


@dataclass(frozen=True)
class AdviceRequest:
    pid: int
    ranges: RangeSet
    advice: int  # vmctl.v1.Advice value
    cookie: bytes = b""
    filter: int = FILTER_NONE
    dry_run: bool = False
    scope: int = SCOPE_WHOLE  # vmctl.v1.Scope value


@dataclass
class RangeOutcome:
    start: int
    end: int
    advised_bytes: int = 0
    skipped_bytes: int = 0
    errno: int = 0
    changed: bool = False  # left out by SCOPE_RANGES: RANGE_CHANGED

    @property
    def error(self) -> str:
        return errno_mod.errorcode.get(self.errno, str(self.errno)) if self.errno else ""

    @property
    def reason(self) -> str:
        return RANGE_CHANGED if self.changed else ""


@dataclass(frozen=True)
class ScopeOutcome:
    """How the layout was checked: for the reply, the audit log and the metrics."""

    asked: int  # SCOPE_WHOLE or SCOPE_RANGES, as requested (unknown values: SCOPE_WHOLE)
    applied: int  # SCOPE_RANGES when the per-range check ran, else SCOPE_WHOLE
    fallback: bool = False  # SCOPE_RANGES asked, but the cookie's snapshot was not in the cache
    changed_ranges: int = 0

    @property
    def checked(self) -> bool:
        """Whether the per-range check ran."""
        return self.applied == SCOPE_RANGES


@dataclass(frozen=True)
class SnapshotLookup:
    scope: ScopeOutcome  # before the check: changed_ranges 0
    seen: bytes | None = None  # the layout records of the cookie's snapshot, for SCOPE_RANGES


@dataclass(frozen=True)
class ScopedPlan:
    plan: Plan
    scope: ScopeOutcome


@dataclass
class AdviceResult:
    pid: int
    start_time: int
    comm: str
    requested_bytes: int
    advised_bytes: int
    syscalls: int
    dry_run: bool
    plan: Plan  # the per-range outcomes
    scope: ScopeOutcome = ScopeOutcome(SCOPE_WHOLE, SCOPE_WHOLE)


@dataclass
class RangePlan:
    """One requested range split into the per-VMA segments to advise."""

    outcome: RangeOutcome
    segments: list[tuple[int, int]]


def range_fault(reason: str, index: int, start: int, end: int, *, before: int = 0, address: int = 0) -> InvalidRequest:
    """The refusal of range ``index`` (``start``-``end``) for ``reason``:
    ``before`` is the range it overlaps (RANGE_OVERLAP), ``address`` the
    first address of it nothing maps (RANGE_UNMAPPED)."""
    span = f"0x{start:x}-0x{end:x}"
    where = {"field": f"ranges[{index}]", "range": span}
    if reason == "RANGE_UNALIGNED":
        message = f"range {index} ({span}) is not page aligned ({PAGE_SIZE} bytes)"
    elif reason == "RANGE_EMPTY":
        message = f"range {index} at 0x{start:x} is empty"
    elif reason == "RANGE_WRAPS":
        message = f"range {index} ends (0x{end:x}) before it starts (0x{start:x})"
    elif reason == "RANGE_OVERLAP":
        return InvalidRequest(f"ranges {before} and {index} overlap", reason=reason, field=f"ranges[{index}]")
    elif reason == "RANGE_UNMAPPED":
        message = f"range {index} ({span}) is not inside mapped memory: nothing is mapped at 0x{address:x}"
        return InvalidRequest(message, reason=reason, **where, address=f"0x{address:x}")
    else:
        raise ValueError(f"no such range fault: {reason}")
    return InvalidRequest(message, reason=reason, **where)


def check_count(count: int, max_ranges: int) -> None:
    if not count:
        raise InvalidRequest("no ranges given", reason="NO_RANGES", field="ranges")
    if count > max_ranges:
        raise InvalidRequest(
            f"{count} ranges exceed the limit of {max_ranges}", reason="TOO_MANY_RANGES", field="ranges"
        )


def check_ranges(ranges: Sequence[tuple[int, int]], max_ranges: int) -> None:
    """Everything about the ranges that needs no process: count, alignment,
    emptiness, wrap-around, overlap."""
    check_count(len(ranges), max_ranges)
    check_range_values(ranges)


def check_range_values(ranges: Sequence[tuple[int, int]]) -> None:
    """check_ranges without the count: each range, then overlap, checked in
    address order (equal starts in request order)."""
    mask = PAGE_SIZE - 1
    for i, (start, end) in enumerate(ranges):
        if start & mask or end & mask:
            raise range_fault("RANGE_UNALIGNED", i, start, end)
        if end == start:
            raise range_fault("RANGE_EMPTY", i, start, end)
        if end < start:
            raise range_fault("RANGE_WRAPS", i, start, end)
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    for before, after in itertools.pairwise(order):
        if ranges[after][0] < ranges[before][1]:
            raise range_fault("RANGE_OVERLAP", after, *ranges[after], before=before)


def plan_ranges(layout: Layout, ranges: Sequence[tuple[int, int]], filter_: int) -> list[RangePlan]:
    """Split each range at VMA boundaries; keep the parts the filter admits.

    A range must lie wholly inside mapped memory: a hole means the caller's
    picture of the process is wrong, and advising "around" it would hide that.
    Kernel-provided SPECIAL mappings are never advised; their bytes count as
    skipped, like those the filter leaves out.
    """
    admitted = FILTER_KINDS[filter_]
    plans = []
    for i, (start, end) in enumerate(ranges):
        outcome = RangeOutcome(start, end)
        segments: list[tuple[int, int]] = []
        cursor = start
        v = layout.first_at_or_after(start)
        while cursor < end:
            if v >= len(layout) or layout.starts[v] > cursor:
                raise range_fault("RANGE_UNMAPPED", i, start, end, address=cursor)
            piece_end = min(end, layout.ends[v])
            if layout.kinds[v] in admitted:
                segments.append((cursor, piece_end))
            else:
                outcome.skipped_bytes += piece_end - cursor
            cursor = piece_end
            v += 1
        plans.append(RangePlan(outcome, segments))
    return plans


def split_for_calls(segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Cut segments larger than one process_madvise call may carry."""
    pieces = []
    for start, end in segments:
        while end - start > kernel.MAX_RW_COUNT:
            pieces.append((start, start + kernel.MAX_RW_COUNT))
            start += kernel.MAX_RW_COUNT
        pieces.append((start, end))
    return pieces


@dataclass(frozen=True)
class SeenVma:
    """What matters of one VMA for SCOPE_RANGES: a layout record's fields
    but the permissions (``kind`` 0: unknown, which matches nothing)."""

    start: int
    end: int
    offset: int
    inode: int
    dev_major: int
    dev_minor: int
    kind: int


def seen_vma(records: bytes, index: int) -> SeenVma:
    start, end, offset, inode, major, minor, _perms, kind = LAYOUT_RECORD.unpack_from(
        records, index * LAYOUT_RECORD.size
    )
    return SeenVma(start, end, offset, inode, major, minor, kind)


def same_memory(was: SeenVma, now: SeenVma) -> bool:
    """Whether the same memory lies at an address both cover: the kind, and
    for a file the same file (device, inode) at the same offset there."""
    if not now.kind or was.kind != now.kind:
        return False
    if was.kind != KIND_FILE:
        return True
    return (was.dev_major, was.dev_minor, was.inode) == (now.dev_major, now.dev_minor, now.inode) and (
        was.offset - was.start
    ) % (1 << 64) == (now.offset - now.start) % (1 << 64)


def ranges_changed(
    ranges: Sequence[tuple[int, int]], layout_records: bytes, live: Callable[[int], SeenVma | None]
) -> bytes:
    """SCOPE_RANGES's check: one byte per range, 1 when it no longer lies
    wholly in memory of the kind the snapshot (``layout_records``, which covers
    every range) saw there. ``live(address)`` is the live VMA covering an
    address, or None. VMA boundaries may have moved: the walk steps to the
    nearer end of the snapshot's VMA and the live one."""
    layout = Layout.from_records(layout_records)
    changed = bytearray(len(ranges))
    for i, (start, end) in enumerate(ranges):
        cursor = start
        v = layout.first_at_or_after(cursor)
        while cursor < end:
            if v >= len(layout) or layout.starts[v] > cursor:
                changed[i] = 1  # the snapshot had nothing here: the plan refuses such a range first
                break
            was = seen_vma(layout_records, v)
            now = live(cursor)
            if now is None or not same_memory(was, now):
                changed[i] = 1
                break
            stop = min(was.end, now.end, end)
            if stop <= cursor:
                changed[i] = 1
                break
            cursor = stop
            if cursor >= was.end:
                v += 1
    return bytes(changed)


def records_lookup(live_records: bytes) -> Callable[[int], SeenVma | None]:
    """``live`` for :func:`ranges_changed` from a layout read from maps."""
    layout = Layout.from_records(live_records)

    def live(address: int) -> SeenVma | None:
        v = layout.first_at_or_after(address)
        if v >= len(layout) or layout.starts[v] > address:
            return None
        return seen_vma(live_records, v)

    return live


@dataclass(frozen=True)
class CheckedRequest:
    """A request whose fields, ranges and cookie signature passed: nothing
    about it depends on the process any more."""

    request: AdviceRequest
    advice: Advice  # its name
    claims: CookieClaims | None  # None: no cookie sent (and none required)


class OpenedTarget:
    """The process a request names, pinned by a pidfd and checked against the
    cookie's identity claims; close it (or use ``with``) when done."""

    def __init__(self, pidfd: int, identity: Identity) -> None:
        self.pidfd = pidfd
        self.identity = identity

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def __enter__(self) -> OpenedTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Advisor:
    """AdviseRanges in steps, each returning what the next (and the audit
    record) needs: :meth:`check` (no process touched), :meth:`open` (pidfd
    and identity), :meth:`plan` (layout against the cookie, ranges against
    the layout), :meth:`apply` (the system calls). The caller puts its policy
    check between open and plan, and its audit record between plan and apply.
    """

    def __init__(
        self,
        signer: CookieSigner,
        reader: SnapshotReader,
        ranges: RangeBackend,
        supported_advices: frozenset[int],
        max_ranges: int = DEFAULT_MAX_RANGES,
        snapshots: SnapshotCache | None = None,
    ) -> None:
        self.signer = signer
        self.reader = reader
        self.ranges = ranges  # how requests' ranges are held, checked and planned
        self.supported_advices = supported_advices
        self.max_ranges = max_ranges
        # What recent snapshots saw, for SCOPE_RANGES; without one every call checks the whole layout.
        self.snapshots = snapshots if snapshots is not None else SnapshotCache(0)

    def check(self, request: AdviceRequest, *, require_cookie: bool) -> CheckedRequest:
        """Fields, ranges, kernel support and the cookie's signature, boot and
        pid: every refusal that needs no process."""
        check_pid(request.pid)
        if request.advice == ADVICE_UNSPECIFIED:  # proto3 cannot tell an advice left out from one set to 0
            raise InvalidRequest(
                f"advice is required: one of {', '.join(ADVICES)}", reason="UNKNOWN_ADVICE", field="advice"
            )
        if request.advice not in ADVICE_BY_NUMBER:
            raise InvalidRequest(f"unknown advice {request.advice}", reason="UNKNOWN_ADVICE", field="advice")
        if request.filter not in FILTER_KINDS:
            raise InvalidRequest(f"unknown filter {request.filter}", reason="UNKNOWN_FILTER", field="filter")
        check_count(len(request.ranges), self.max_ranges)
        request.ranges.check()
        name = ADVICE_BY_NUMBER[request.advice]
        if request.advice not in self.supported_advices:
            raise KernelUnsupported(f"this kernel does not accept {name} advice for another process", advice=name)
        claims = None
        if request.cookie:
            claims = self.signer.verify(request.cookie)
            if claims.boot_id != procfs.boot_id_bytes():
                raise CookieInvalid("cookie was issued on another host or before a reboot", field="cookie")
            if claims.pid != request.pid:
                raise CookieInvalid(
                    f"cookie is for pid {claims.pid}, not {request.pid}", field="cookie", cookie_pid=claims.pid
                )
        elif require_cookie:
            raise CookieRequired("a cookie from GetVmaInfo is required: read the layout first", field="cookie")
        return CheckedRequest(request, name, claims)

    @staticmethod
    def open(checked: CheckedRequest) -> OpenedTarget:
        """A pidfd on the process, whose start time and exec id must be the
        cookie's: from here on the calls reach this process or none."""
        pid = checked.request.pid
        pidfd = kernel.pidfd_open(pid)
        try:
            identity = read_identity(pid)
            claims = checked.claims
            if claims is not None:
                if identity.start_time != claims.start_time:
                    # Said before the policy has looked at the new process: nothing of it (its start time).
                    raise ProcessChanged(f"pid {pid} is now another process than the cookie's", pid=pid)
                if identity.exec_id != claims.exec_id:
                    raise ProcessChanged(f"process {pid} has exec'd since the cookie was issued", pid=pid)
        except BaseException:
            os.close(pidfd)
            raise
        return OpenedTarget(pidfd, identity)

    def scope(self, checked: CheckedRequest) -> SnapshotLookup:
        """The scope a request will be checked in: SCOPE_RANGES only with a
        cookie whose snapshot the cache still has (else it falls back)."""
        request, claims = checked.request, checked.claims
        asked = SCOPE_RANGES if request.scope == SCOPE_RANGES else SCOPE_WHOLE
        seen = self.snapshots.get(claims) if asked == SCOPE_RANGES and claims is not None else None
        if seen is not None:
            return SnapshotLookup(ScopeOutcome(asked, SCOPE_RANGES), seen)
        return SnapshotLookup(ScopeOutcome(asked, SCOPE_WHOLE, fallback=asked == SCOPE_RANGES and claims is not None))

    def plan_in_scope(
        self, checked: CheckedRequest, target: OpenedTarget, lookup: SnapshotLookup | None = None
    ) -> ScopedPlan:
        """The plan, in the scope :meth:`scope` found: SCOPE_RANGES plans
        against what the cookie's snapshot saw and leaves out the ranges that
        changed since (:meth:`still_good`); SCOPE_WHOLE is :meth:`plan`."""
        lookup = lookup or self.scope(checked)
        if lookup.seen is None:
            return ScopedPlan(self.plan(checked, target), lookup.scope)
        request = checked.request
        plan = request.ranges.plan(lookup.seen, request.filter)  # RANGE_UNMAPPED: not in what the caller saw
        changed = self.still_good(checked, target, lookup.seen)
        count = plan.exclude(changed)
        return ScopedPlan(plan, ScopeOutcome(lookup.scope.asked, SCOPE_RANGES, changed_ranges=count))

    def still_good(self, checked: CheckedRequest, target: OpenedTarget, seen: bytes) -> bytes:
        """SCOPE_RANGES's check, a step of its own: one byte per range, 1
        for a range that no longer lies in memory of the kind the snapshot
        ``seen`` saw there (RANGE_CHANGED), 0 for one still good to advise.
        Live VMAs from PROCMAP_QUERY, one ioctl per VMA a range crosses, or
        from the maps text where the kernel lacks it."""
        pid = target.identity.pid
        ranges = checked.request.ranges
        if self.reader.sources.procmap_query:
            fd = procfs.open_fd(pid, "maps")
            try:
                changed = ranges.covering(fd, seen)
            finally:
                os.close(fd)
        else:
            changed = ranges.covering_records(seen, self.reader.read_layout(pid))
        if procfs.exec_id(pid) != target.identity.exec_id:
            raise ProcessChanged(f"process {pid} exec'd while it was checked", pid=pid)
        return changed

    def plan(self, checked: CheckedRequest, target: OpenedTarget) -> Plan:
        """The live layout must be the cookie's; then every range is checked
        against it and split into the pieces to advise."""
        pid = target.identity.pid
        records = self.reader.read_layout(pid)
        if procfs.exec_id(pid) != target.identity.exec_id:
            # An exec since the identity was read (a setuid program, say): the
            # policy judged another image than the one whose layout was just read.
            raise ProcessChanged(f"process {pid} exec'd while it was checked", pid=pid)
        claims = checked.claims
        if claims is not None and layout_digest(records) != claims.layout_digest:
            raise LayoutChanged(
                f"the address space of process {target.identity.pid} changed since the cookie was issued;"
                " read it again",
                pid=target.identity.pid,
            )
        return checked.request.ranges.plan(records, checked.request.filter)

    @staticmethod
    def apply(
        checked: CheckedRequest, target: OpenedTarget, plan: Plan, scope: ScopeOutcome | None = None
    ) -> AdviceResult:
        """The process_madvise calls (none for a dry run)."""
        request, identity = checked.request, target.identity
        syscall_count = 0
        if request.dry_run:
            plan.dry_run()
        else:
            syscall_count, first_error = plan.apply(target.pidfd, ADVICES[checked.advice].madvise)
            if first_error == errno_mod.ESRCH:
                raise ProcessGone(f"process {request.pid} exited before it could be advised", pid=request.pid)
            if first_error == errno_mod.EPERM:
                raise AccessDenied("the kernel refused process_madvise: the agent needs CAP_SYS_NICE and ptrace access")
        return AdviceResult(
            pid=request.pid,
            start_time=identity.start_time,
            comm=identity.comm,
            requested_bytes=plan.requested_bytes,
            advised_bytes=plan.advised_bytes,
            syscalls=syscall_count,
            dry_run=request.dry_run,
            plan=plan,
            scope=scope or ScopeOutcome(SCOPE_WHOLE, SCOPE_WHOLE),
        )

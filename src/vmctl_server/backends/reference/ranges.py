"""AdviseRanges's per-range work in pure Python: the reference the native
version (:mod:`vmctl_server.backends.native.ranges`) must equal, and the agent's path
with ``--no-native``.

Built from :mod:`vmctl_server.core.advice`'s reference functions (check_ranges,
plan_ranges, split_for_calls) and :func:`vmctl_server.core.kernel.advise_segments`;
the reply's per-range results are encoded by the protobuf library itself,
which makes it a trustworthy reference for the C encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vmctl_api import vmctl_pb2 as pb
from vmctl_server.core import kernel
from vmctl_server.core.advice import (
    RangeOutcome,
    RangePlan,
    SeenVma,
    check_range_values,
    plan_ranges,
    ranges_changed,
    records_lookup,
    split_for_calls,
)
from vmctl_server.core.layout import Layout, vma_kind


class PyPlan:
    """See advice.Plan."""

    def __init__(self, plans: list[RangePlan]) -> None:
        self.plans = plans
        self.requested_bytes = sum(p.outcome.end - p.outcome.start for p in plans)
        self._pieces = [(i, piece) for i, p in enumerate(plans) for piece in split_for_calls(p.segments)]

    @property
    def advised_bytes(self) -> int:
        return sum(p.outcome.advised_bytes for p in self.plans)

    def dry_run(self) -> None:
        for p in self.plans:
            p.outcome.advised_bytes = sum(end - start for start, end in p.segments)

    def apply(self, pidfd: int, madv: int) -> tuple[int, int]:
        if not self._pieces:
            return 0, 0
        outcome = kernel.advise_segments(pidfd, [piece for _, piece in self._pieces], madv)
        for (owner, _), advised, err in zip(self._pieces, outcome.advised, outcome.errors, strict=True):
            range_outcome = self.plans[owner].outcome
            range_outcome.advised_bytes += advised
            if err and not range_outcome.errno:
                range_outcome.errno = err
        first_error = 0 if any(outcome.advised) else next((e for e in outcome.errors if e), 0)
        return outcome.syscalls, first_error

    def exclude(self, changed: bytes) -> int:
        for i, p in enumerate(self.plans):
            if changed[i]:
                p.outcome.changed = True
                p.outcome.skipped_bytes = 0
                p.segments = []
        self._pieces = [(owner, piece) for owner, piece in self._pieces if not changed[owner]]
        return sum(1 for flag in changed[: len(self.plans)] if flag)

    def outcomes(self) -> list[RangeOutcome]:
        return [p.outcome for p in self.plans]

    def pieces(self) -> list[tuple[int, int, int]]:
        return [(owner, start, end) for owner, (start, end) in self._pieces]

    def encode(self, prefix: bytes = b"") -> bytes:
        response = pb.AdviseRangesResponse(
            ranges=[
                pb.RangeResult(
                    start=o.start,
                    end=o.end,
                    advised_bytes=o.advised_bytes,
                    skipped_bytes=o.skipped_bytes,
                    error=o.error,
                    error_number=o.errno,
                    reason=o.reason,
                )
                for o in self.outcomes()
            ]
        )
        return prefix + response.SerializeToString()


class PyRanges:
    """See advice.RangeSet: the ranges as a list of (start, end) tuples."""

    native = False

    def __init__(self, source: Sequence[Any]) -> None:
        self._source = source
        self._pairs: list[tuple[int, int]] | None = None

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[int, int]]) -> PyRanges:
        return cls(pairs)

    @classmethod
    def from_message(cls, ranges: Sequence[Any], wire: bytes) -> PyRanges:
        return cls(ranges)

    def __len__(self) -> int:
        return len(self._source)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        if self._pairs is None:
            self._pairs = [r if isinstance(r, tuple) else (r.start, r.end) for r in self._source]
        return self._pairs

    def total_bytes(self) -> int:
        return sum(max(0, end - start) for start, end in self.pairs)

    def check(self) -> None:
        check_range_values(self.pairs)

    def plan(self, layout_records: bytes, filter_: int) -> PyPlan:
        return PyPlan(plan_ranges(Layout.from_records(layout_records), self.pairs, filter_))

    def covering(self, maps_fd: int, layout_records: bytes) -> bytes:
        return ranges_changed(self.pairs, layout_records, lambda address: queried(maps_fd, address))

    def covering_records(self, layout_records: bytes, live_records: bytes) -> bytes:
        return ranges_changed(self.pairs, layout_records, records_lookup(live_records))


def queried(maps_fd: int, address: int) -> SeenVma | None:
    """The live VMA covering ``address``, by PROCMAP_QUERY, as ranges_changed compares it."""
    vma = kernel.procmap_query_vma(maps_fd, address)
    if vma is None:
        return None
    has_file = bool(vma.inode or vma.dev_major or vma.dev_minor)
    # A name too long for any buffer is a file's path; without a file the kind is unknown (0: matches nothing).
    kind = vma_kind(vma.dev_major, vma.dev_minor, vma.inode, vma.path or b"") if vma.path is not None or has_file else 0
    return SeenVma(vma.start, vma.end, vma.offset, vma.inode, vma.dev_major, vma.dev_minor, kind)

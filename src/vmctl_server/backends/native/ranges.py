"""AdviseRanges's per-range work in C: the same interface and the same
answers as :mod:`vmctl_server.backends.reference.ranges`, without a Python object per range.

The ranges come straight from the request's wire bytes into a C array (after
protobuf has parsed and accepted the request: C only reads the values, and
leaves any unusual encoding to protobuf); the checks, the split at VMA
boundaries, the process_madvise(2) loop and the reply's RangeResults are C
calls that release the GIL. Refusals are worded by
:func:`vmctl_server.core.advice.range_fault`, as the reference's are.
"""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Sequence
from typing import Any

from vmctl_server.backends.native.tables import ffi, lib
from vmctl_server.core import kernel
from vmctl_server.core.advice import FILTER_KINDS, PAGE_SIZE, RANGE_REASONS, RangeOutcome, range_fault
from vmctl_server.core.layout import LAYOUT_RECORD

_FAULTS = {getattr(lib, f"VMCTL_{reason}"): reason for reason in RANGE_REASONS}
# RangeResult.error names errnos as RangeOutcome.error does: Python's own table.
_ERRNO_NAMES = [
    ffi.new("char[]", errno_mod.errorcode.get(number, str(number)).encode())
    for number in range(max(errno_mod.errorcode) + 1)
]
_ERRNO_TABLE = ffi.new("char *[]", _ERRNO_NAMES)


def request_ranges(wire: bytes, count: int) -> Any | None:
    """The ``count`` ranges of an AdviseRangesRequest's wire bytes (which
    protobuf has parsed) as a C array, or None when C leaves them to protobuf."""
    array = ffi.new("struct vmctl_segment[]", count)
    if lib.vmctl_request_ranges(ffi.from_buffer(wire), len(wire), array, count) != 0:
        return None
    return array


class NativePlan:
    """See advice.Plan; the plan lives in C memory freed with this object."""

    def __init__(self, plan: Any, count: int) -> None:
        self._plan = plan
        self._count = count
        self.requested_bytes = int(lib.vmctl_plan_requested(plan))

    @property
    def advised_bytes(self) -> int:
        return int(lib.vmctl_plan_advised(self._plan))

    def dry_run(self) -> None:
        lib.vmctl_plan_dry_run(self._plan)

    def apply(self, pidfd: int, madv: int) -> tuple[int, int]:
        first_error = ffi.new("int *")
        calls = lib.vmctl_plan_apply(self._plan, pidfd, madv, first_error)
        if calls < 0:
            raise MemoryError("no memory for the iovecs")
        return int(calls), int(first_error[0])

    def exclude(self, changed: bytes) -> int:
        if len(changed) < self._count:
            raise ValueError("one byte per range")
        return int(lib.vmctl_plan_exclude(self._plan, changed))

    def outcomes(self) -> list[RangeOutcome]:
        raw = lib.vmctl_plan_outcomes(self._plan)
        return [
            RangeOutcome(r.start, r.end, r.advised, r.skipped, r.err, bool(r.changed))
            for r in (raw[i] for i in range(self._count))
        ]

    def pieces(self) -> list[tuple[int, int, int]]:
        count = ffi.new("size_t *")
        owners = ffi.new("size_t **")
        pieces = lib.vmctl_plan_pieces(self._plan, count, owners)
        return [(owners[0][k], pieces[k].start, pieces[k].end) for k in range(count[0])]

    def encode(self, prefix: bytes = b"") -> bytes:
        out = ffi.new("char **")
        size = ffi.new("size_t *")
        if lib.vmctl_plan_encode(self._plan, prefix, len(prefix), _ERRNO_TABLE, len(_ERRNO_NAMES), out, size) < 0:
            raise MemoryError("no memory to encode the range results")
        try:
            encoded: bytes = ffi.buffer(out[0], size[0])[:]
            return encoded
        finally:
            lib.vmctl_free(out[0])


class NativeRanges:
    """See advice.RangeSet: the ranges as a C array of struct vmctl_segment."""

    native = True

    def __init__(self, source: Sequence[Any], wire: bytes | None = None) -> None:
        self._source = source
        self._wire = wire
        self._array: Any = None

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[int, int]]) -> NativeRanges:
        return cls(pairs)

    @classmethod
    def from_message(cls, ranges: Sequence[Any], wire: bytes) -> NativeRanges:
        return cls(ranges, wire)

    def __len__(self) -> int:
        return len(self._source)

    def _ranges(self) -> Any:
        """The C array: read from the request's bytes when there are any and
        C reads them, else from the items one by one."""
        if self._array is None:
            array = None if self._wire is None else request_ranges(self._wire, len(self._source))
            if array is None:
                pairs = [item if isinstance(item, tuple) else (item.start, item.end) for item in self._source]
                array = ffi.new("struct vmctl_segment[]", pairs)
            self._array = array
        return self._array

    def total_bytes(self) -> int:
        low, high = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        lib.vmctl_ranges_bytes(self._ranges(), len(self), low, high)
        total: int = high[0] << 64 | low[0]
        return total

    def check(self) -> None:
        fault = ffi.new("struct vmctl_range_fault *")
        rc = lib.vmctl_ranges_check(self._ranges(), len(self), PAGE_SIZE, fault)
        if rc < 0:
            raise MemoryError("no memory to check the ranges")
        if rc:
            raise self._refusal(fault)

    def plan(self, layout_records: bytes, filter_: int) -> NativePlan:
        if len(layout_records) % LAYOUT_RECORD.size:
            raise ValueError("layout records are not a whole number of records")
        admitted = sum(1 << kind for kind in FILTER_KINDS[filter_])
        out = ffi.new("struct vmctl_plan **")
        fault = ffi.new("struct vmctl_range_fault *")
        rc = lib.vmctl_plan_new(
            self._ranges(),
            len(self),
            ffi.from_buffer(layout_records),
            len(layout_records) // LAYOUT_RECORD.size,
            admitted,
            out,
            fault,
        )
        if rc < 0:
            raise MemoryError("no memory to plan the advice")
        if rc:
            raise self._refusal(fault)
        return NativePlan(ffi.gc(out[0], lib.vmctl_plan_free), len(self))

    def covering(self, maps_fd: int, layout_records: bytes) -> bytes:
        changed = ffi.new("uint8_t[]", max(1, len(self)))
        rc = lib.vmctl_ranges_covering(
            maps_fd, self._ranges(), len(self), _records(layout_records), len(layout_records) // LAYOUT_RECORD.size,
            changed,
        )  # fmt: skip
        if rc < 0:
            raise kernel._ioctl_error("PROCMAP_QUERY", -rc) if rc != -errno_mod.ENOMEM else MemoryError()
        result: bytes = ffi.buffer(changed, len(self))[:]
        return result

    def covering_records(self, layout_records: bytes, live_records: bytes) -> bytes:
        changed = ffi.new("uint8_t[]", max(1, len(self)))
        lib.vmctl_ranges_covering_records(
            self._ranges(), len(self), _records(layout_records), len(layout_records) // LAYOUT_RECORD.size,
            _records(live_records), len(live_records) // LAYOUT_RECORD.size, changed,
        )  # fmt: skip
        result: bytes = ffi.buffer(changed, len(self))[:]
        return result

    def _refusal(self, fault: Any) -> Exception:
        where = self._ranges()[fault.index]
        return range_fault(
            _FAULTS[fault.reason], fault.index, where.start, where.end, before=fault.before, address=fault.address
        )


def _records(layout_records: bytes) -> Any:
    """Packed layout records as C reads them (a whole number of records)."""
    if len(layout_records) % LAYOUT_RECORD.size:
        raise ValueError("layout records are not a whole number of records")
    return ffi.from_buffer(layout_records) if layout_records else ffi.NULL

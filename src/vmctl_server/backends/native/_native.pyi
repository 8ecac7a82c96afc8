# Types of the cffi extension that csrc/build.py builds: its ``ffi``, and its ``lib`` of the
# declarations between "cdef: begin" and "cdef: end" in csrc/vmctl_native.h. C integers are Python
# ints; pointers are cdata (``const char *`` takes bytes too); what a pointer points at is the C's
# business. tests/test_cffi_types.py holds ``_Lib`` to the built module's names: a function added
# to the header is added here.

from typing import Final, final, type_check_only

from _cffi_backend import FFI

_CData = FFI.CData

ffi: FFI

@final
@type_check_only
class _Lib:
    VMCTL_RANGES_OK: Final[int]
    VMCTL_RANGE_UNALIGNED: Final[int]
    VMCTL_RANGE_EMPTY: Final[int]
    VMCTL_RANGE_WRAPS: Final[int]
    VMCTL_RANGE_OVERLAP: Final[int]
    VMCTL_RANGE_UNMAPPED: Final[int]

    def vmctl_table_from_maps(self, data: _CData | bytes, len: int, out: _CData, bad_line: _CData, /) -> int: ...
    def vmctl_table_from_smaps(self, data: _CData | bytes, len: int, out: _CData, bad_line: _CData, /) -> int: ...
    def vmctl_table_read(self, fd: int, smaps: int, chunk: int, out: _CData, bad_line: _CData, /) -> int: ...
    def vmctl_table_query(
        self, maps_fd: int, tail: _CData | bytes, tail_len: int, out: _CData, bad_line: _CData, /
    ) -> int: ...
    def vmctl_table_query_layout(
        self, maps_fd: int, tail: _CData | bytes, tail_len: int, out: _CData, bad_line: _CData, /
    ) -> int: ...
    def vmctl_table_free(self, table: _CData, /) -> None: ...
    def vmctl_table_len(self, table: _CData, /) -> int: ...
    def vmctl_table_layout(self, table: _CData, out: _CData, /) -> None: ...
    def vmctl_table_fill_residency(self, table: _CData, pagemap_fd: int, /) -> int: ...
    def vmctl_table_fill_build_ids(self, table: _CData, maps_fd: int, /) -> int: ...
    def vmctl_table_encode(
        self, table: _CData, mask: int, prefix: _CData | bytes, prefix_len: int, out: _CData, out_len: _CData, /
    ) -> int: ...
    def vmctl_table_encode_chunks(
        self,
        table: _CData,
        mask: int,
        max_chunk: int,
        out: _CData,
        out_len: _CData,
        ends: _CData,
        chunk_count: _CData,
        /,
    ) -> int: ...
    def vmctl_free(self, buffer: _CData, /) -> None: ...
    def vmctl_advise(
        self, pidfd: int, segments: _CData, n: int, advice: int, advised: _CData, errors: _CData, /
    ) -> int: ...
    def vmctl_request_ranges(self, data: _CData | bytes, len: int, out: _CData, n: int, /) -> int: ...
    def vmctl_ranges_bytes(self, ranges: _CData, n: int, low: _CData, high: _CData, /) -> None: ...
    def vmctl_ranges_check(self, ranges: _CData, n: int, page_size: int, fault: _CData, /) -> int: ...
    def vmctl_plan_new(
        self,
        ranges: _CData,
        n: int,
        records: _CData | bytes,
        record_count: int,
        admitted_kinds: int,
        out: _CData,
        fault: _CData,
        /,
    ) -> int: ...
    def vmctl_plan_free(self, plan: _CData, /) -> None: ...
    def vmctl_plan_outcomes(self, plan: _CData, /) -> _CData: ...
    def vmctl_plan_pieces(self, plan: _CData, count: _CData, owners: _CData, /) -> _CData: ...
    def vmctl_plan_requested(self, plan: _CData, /) -> int: ...
    def vmctl_plan_advised(self, plan: _CData, /) -> int: ...
    def vmctl_plan_exclude(self, plan: _CData, changed: _CData | bytes, /) -> int: ...
    def vmctl_ranges_covering(
        self, maps_fd: int, ranges: _CData, n: int, records: _CData | bytes, record_count: int, changed: _CData, /
    ) -> int: ...
    def vmctl_ranges_covering_records(
        self,
        ranges: _CData,
        n: int,
        records: _CData | bytes,
        record_count: int,
        live: _CData | bytes,
        live_count: int,
        changed: _CData,
        /,
    ) -> int: ...
    def vmctl_plan_dry_run(self, plan: _CData, /) -> None: ...
    def vmctl_plan_apply(self, plan: _CData, pidfd: int, advice: int, first_error: _CData, /) -> int: ...
    def vmctl_plan_encode(
        self,
        plan: _CData,
        prefix: _CData | bytes,
        prefix_len: int,
        errno_names: _CData,
        name_count: int,
        out: _CData,
        out_len: _CData,
        /,
    ) -> int: ...

lib: _Lib

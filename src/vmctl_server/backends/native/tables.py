"""VMA tables in C: the same interface and the same answers as
:class:`vmctl_server.backends.reference.tables.PyVmaTable`, without a Python object per VMA.

The table lives in C memory owned by a cffi handle that frees it as soon as
the :class:`NativeVmaTable` is dropped. Bytes come out through one copy
each (``layout_records``, ``encode``). The calls release the GIL; ``read``
reads and parses /proc text in one such call, so a large address space never
becomes a Python bytes object and other threads run while the kernel writes
the text.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from vmctl_api.words import ATTR_ACCESS, ATTR_ACCOUNTING, ATTR_BUILD_ID, ATTR_RESIDENCY
from vmctl_server.core import kernel, procfs
from vmctl_server.core.layout import LAYOUT_RECORD

if TYPE_CHECKING:
    from cffi import FFI

try:  # ffi and lib re-exported: backends.native.ranges takes them from here, with this error
    from vmctl_server.backends.native._native import ffi as ffi
    from vmctl_server.backends.native._native import lib as lib
except ImportError as exc:
    raise ImportError(
        "vmctl's native extension (vmctl_server.backends.native._native) is not built or does not load:"
        " reinstall vmctl with a C compiler present (`pip install .`, or"
        " `python src/vmctl_server/backends/native/csrc/build.py` in a checkout), or run the agent with"
        f" --no-native to use the pure-Python tables ({exc})"
    ) from exc


class NativeVmaTable:
    """VMA rows in a C array; see PyVmaTable for the meaning of each method."""

    native = True

    def __init__(self, table: FFI.CData, filled_mask: int) -> None:
        self._layout_only = False  # from query(names=False): no paths to encode
        self._table = table
        self._len = int(lib.vmctl_table_len(table))
        self.filled_mask = filled_mask

    def __len__(self) -> int:
        return self._len

    @classmethod
    def from_maps(cls, data: bytes) -> NativeVmaTable:
        return cls(_parse(lib.vmctl_table_from_maps, data, "maps"), 0)

    @classmethod
    def from_smaps(cls, data: bytes) -> NativeVmaTable:
        return cls(_parse(lib.vmctl_table_from_smaps, data, "smaps"), ATTR_RESIDENCY | ATTR_ACCOUNTING)

    @classmethod
    def read(cls, pid: int, source: str) -> NativeVmaTable:
        """/proc/PID/maps or /proc/PID/smaps (``source``), read and parsed in C."""
        fd = procfs.open_fd(pid, source)
        try:
            return cls.from_fd(fd, source, pid=pid)
        finally:
            os.close(fd)

    @classmethod
    def from_fd(cls, fd: int, source: str, *, chunk: int = 0, pid: int = 0) -> NativeVmaTable:
        """The text of ``source`` read from ``fd`` to its end, at most ``chunk``
        bytes per read(2) (0: as much as the kernel gives)."""
        smaps = source == "smaps"
        out = ffi.new("struct vmctl_table **")
        bad_line = ffi.new("size_t *")
        rc = lib.vmctl_table_read(fd, smaps, chunk, out, bad_line)
        if rc < 0:
            if bad_line[0]:
                raise ValueError(f"/proc/PID/{source} text is malformed at line {bad_line[0]}")
            if rc == -errno.ENOMEM:
                raise MemoryError(f"no memory to parse /proc/PID/{source}")
            raise procfs._gone_or_denied(pid, OSError(-rc, f"reading /proc/{pid}/{source}: {os.strerror(-rc)}"))
        return cls(ffi.gc(out[0], lib.vmctl_table_free), ATTR_RESIDENCY | ATTR_ACCOUNTING if smaps else 0)

    @classmethod
    def query(cls, pid: int, tail: bytes, *, names: bool = True) -> NativeVmaTable:
        """The layout of /proc/PID/maps from a PROCMAP_QUERY loop in C, then
        ``tail`` (maps lines: the gate VMA) parsed: the table :meth:`read`
        makes of the maps text, at the kernel's cost without the text. OSError
        when the ioctl fails (the caller reads the maps text instead). With
        ``names`` False the table is for :meth:`layout_records` alone: file
        VMAs are not asked their paths (the dear part), and it encodes nothing."""
        fd = procfs.open_fd(pid, "maps")
        try:
            out = ffi.new("struct vmctl_table **")
            bad_line = ffi.new("size_t *")
            loop = lib.vmctl_table_query if names else lib.vmctl_table_query_layout
            rc = loop(fd, tail, len(tail), out, bad_line)
        finally:
            os.close(fd)
        if rc < 0:
            if bad_line[0]:
                raise ValueError(f"the gate VMA's maps text is malformed at line {bad_line[0]}")
            if rc == -errno.ENOMEM:
                raise MemoryError("no memory for the VMA table")
            raise procfs._gone_or_denied(pid, OSError(-rc, f"PROCMAP_QUERY on /proc/{pid}/maps: {os.strerror(-rc)}"))
        table = cls(ffi.gc(out[0], lib.vmctl_table_free), 0)
        table._layout_only = not names
        return table

    def _check_paths(self) -> None:
        if self._layout_only:
            raise ValueError("this table holds the layout records alone (query with names=False): no paths")

    def layout_records(self) -> bytes:
        out = ffi.new("char[]", self._len * LAYOUT_RECORD.size)
        lib.vmctl_table_layout(self._table, out)
        records: bytes = ffi.buffer(out)[:]
        return records

    def fill_residency(self, pagemap_fd: int) -> None:
        """rss_bytes and swap_bytes per VMA from one PAGEMAP_SCAN walk."""
        rc = lib.vmctl_table_fill_residency(self._table, pagemap_fd)
        if rc < 0:
            raise kernel._ioctl_error("PAGEMAP_SCAN", -rc)
        self.filled_mask |= ATTR_RESIDENCY

    def fill_build_ids(self, maps_fd: int) -> None:
        rc = lib.vmctl_table_fill_build_ids(self._table, maps_fd)
        if rc < 0:
            raise kernel._ioctl_error("PROCMAP_QUERY", -rc)
        self.filled_mask |= ATTR_BUILD_ID

    def fill_access(self) -> None:
        """accessed_bytes per VMA: the C encoder writes each VMA's Referenced
        as accessed_bytes once the mask it is given has ATTR_ACCESS."""
        if not self.filled_mask & ATTR_ACCOUNTING:
            raise ValueError("accessed bytes come from smaps' Referenced: this table was read from maps")
        self.filled_mask |= ATTR_ACCESS

    def encode(self, mask: int, prefix: bytes = b"") -> bytes:
        """``prefix``, then the wire bytes of ``repeated Vma vmas = 4`` for the
        groups in ``mask``: a whole reply in one copy out of C."""
        self._check_paths()
        out = ffi.new("char **")
        size = ffi.new("size_t *")
        if lib.vmctl_table_encode(self._table, mask & self.filled_mask, prefix, len(prefix), out, size) < 0:
            raise MemoryError("no memory to encode the VMA table")
        try:
            encoded: bytes = ffi.buffer(out[0], size[0])[:]
            return encoded
        finally:
            lib.vmctl_free(out[0])

    def encode_chunks(self, mask: int, max_bytes: int) -> list[bytes]:
        """The wire bytes of ``vmas`` for the groups in ``mask``, cut at VMA
        boundaries into chunks of at most ``max_bytes``: encoded in one C call
        and copied out once, a bytes object per chunk, none per VMA."""
        self._check_paths()
        out = ffi.new("char **")
        size = ffi.new("size_t *")
        ends = ffi.new("size_t **")
        count = ffi.new("size_t *")
        rc = lib.vmctl_table_encode_chunks(self._table, mask & self.filled_mask, max_bytes, out, size, ends, count)
        if rc == -errno.E2BIG:
            raise ValueError(f"a VMA takes more than {max_bytes} bytes on the wire")
        if rc < 0:
            raise MemoryError("no memory to encode the VMA table")
        try:
            whole = ffi.buffer(out[0], size[0])
            cuts = ffi.unpack(ends[0], count[0])
            return [whole[start:end] for start, end in zip([0, *cuts], cuts, strict=False)]
        finally:
            lib.vmctl_free(out[0])
            lib.vmctl_free(ends[0])


def _parse(parser: Callable[[FFI.CData, int, FFI.CData, FFI.CData], int], data: bytes, name: str) -> FFI.CData:
    out = ffi.new("struct vmctl_table **")
    bad_line = ffi.new("size_t *")
    rc = parser(ffi.from_buffer(data), len(data), out, bad_line)
    if rc == -errno.EINVAL:
        raise ValueError(f"/proc/PID/{name} text is malformed at line {bad_line[0]}")
    if rc < 0:
        raise MemoryError(f"no memory to parse /proc/PID/{name}")
    return ffi.gc(out[0], lib.vmctl_table_free)


def advise_segments(pidfd: int, segments: list[tuple[int, int]], advice: int) -> kernel.AdviseOutcome:
    """:func:`vmctl_server.core.kernel.advise_segments`, with the loop in C."""
    n = len(segments)
    advised = ffi.new("uint64_t[]", n)
    errors = ffi.new("int[]", n)
    calls = lib.vmctl_advise(pidfd, ffi.new("struct vmctl_segment[]", segments), n, advice, advised, errors)
    if calls == -errno.EINVAL:
        raise ValueError("a segment ends before it starts")
    if calls < 0:
        raise MemoryError("no memory for the iovecs")
    # ffi.unpack of an integer array is a list of int (its stub allows bytes and str, for char arrays).
    return kernel.AdviseOutcome(
        cast("list[int]", ffi.unpack(advised, n)), cast("list[int]", ffi.unpack(errors, n)), int(calls)
    )

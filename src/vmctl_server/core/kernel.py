"""The one module that makes system calls the standard library lacks.

``pidfd_open(2)``, ``process_madvise(2)`` and the two /proc ioctls
(``PROCMAP_QUERY``, ``PAGEMAP_SCAN``) go through cffi. The compiled extension
(:mod:`vmctl_server.backends.native._native`) supplies the hot loops; this module also keeps a
pure-Python version of each loop over libc's ``syscall``/``ioctl`` (cffi ABI
mode), used when the agent runs with ``--no-native`` and by the tests that
prove both give the same answer.
"""

from __future__ import annotations

import errno as errno_mod
import os
from dataclasses import dataclass, field
from typing import Protocol, cast

import cffi

from vmctl_api.words import ADVICES
from vmctl_server.core.faults import AccessDenied, InvalidRequest, KernelUnsupported, ProcessGone

# Kernel ABI shared with the native extension (see native/vmctl_native.h).
KERNEL_CDEF = """
struct iovec { void *iov_base; size_t iov_len; };
struct procmap_query {
    uint64_t size; uint64_t query_flags; uint64_t query_addr;
    uint64_t vma_start; uint64_t vma_end; uint64_t vma_flags; uint64_t vma_page_size;
    uint64_t vma_offset; uint64_t inode;
    uint32_t dev_major; uint32_t dev_minor; uint32_t vma_name_size; uint32_t build_id_size;
    uint64_t vma_name_addr; uint64_t build_id_addr;
};
struct page_region { uint64_t start; uint64_t end; uint64_t categories; };
struct pm_scan_arg {
    uint64_t size; uint64_t flags; uint64_t start; uint64_t end; uint64_t walk_end;
    uint64_t vec; uint64_t vec_len; uint64_t max_pages;
    uint64_t category_inverted; uint64_t category_mask; uint64_t category_anyof_mask;
    uint64_t return_mask;
};
"""


# What the cdefs declare, for the type checker: cffi's cdata and libraries have the attributes their
# C declarations give them, which its stubs cannot know. tests/test_cffi_types.py holds each of these
# to the declaration it names.
class _Libc(Protocol):
    """libc's ``syscall`` and ``ioctl`` as declared below (variadic: cdata arguments)."""

    def syscall(self, number: int, /, *args: object) -> int: ...
    def ioctl(self, fd: int, request: object, /, *args: object) -> int: ...


class _ProcmapQuery(Protocol):
    """``struct procmap_query``."""

    size: int
    query_flags: int
    query_addr: int
    vma_start: int
    vma_end: int
    vma_flags: int
    vma_page_size: int
    vma_offset: int
    inode: int
    dev_major: int
    dev_minor: int
    vma_name_size: int
    build_id_size: int
    vma_name_addr: int
    build_id_addr: int


class _PmScanArg(Protocol):
    """``struct pm_scan_arg``."""

    size: int
    flags: int
    start: int
    end: int
    walk_end: int
    vec: int
    vec_len: int
    max_pages: int
    category_inverted: int
    category_mask: int
    category_anyof_mask: int
    return_mask: int


ffi = cffi.FFI()
ffi.cdef(KERNEL_CDEF + "long syscall(long number, ...); int ioctl(int fd, unsigned long request, ...);")
_libc = cast(_Libc, ffi.dlopen(None))

SYS_PIDFD_OPEN = 434
SYS_PROCESS_MADVISE = 440

MADV_WILLNEED = ADVICES["willneed"].madvise
MADV_COLD = ADVICES["cold"].madvise
MADV_PAGEOUT = ADVICES["pageout"].madvise
MADV_COLLAPSE = ADVICES["collapse"].madvise

UIO_MAXIOV = 1024  # iovecs per process_madvise call
MAX_RW_COUNT = 0x7FFFF000  # INT_MAX & PAGE_MASK: bytes per call


def _iowr(kind: str, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord(kind) << 8) | nr


PROCMAP_QUERY = _iowr("f", 17, ffi.sizeof("struct procmap_query"))
PAGEMAP_SCAN = _iowr("f", 16, ffi.sizeof("struct pm_scan_arg"))

PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_GUARD = 1 << 8  # Linux 6.15+
BUILD_ID_MAX = 64
_SCAN_VEC_LEN = 4096


def pidfd_open(pid: int) -> int:
    """A pidfd pinned to ``pid``: later calls reach that process or fail."""
    fd = _libc.syscall(SYS_PIDFD_OPEN, ffi.cast("int", pid), ffi.cast("unsigned int", 0))
    if fd >= 0:
        return int(fd)
    err = ffi.errno
    if err == errno_mod.ESRCH:
        raise ProcessGone(f"process {pid} does not exist", pid=pid)
    if err == errno_mod.ENOSYS:
        raise KernelUnsupported("this kernel has no pidfd_open(2)")
    if err == errno_mod.EINVAL:
        raise InvalidRequest(f"pid {pid} is not a valid process id", reason="INVALID_PID", field="pid")
    if err == errno_mod.ENOENT:  # Linux 6.9+: a thread that does not lead its process
        raise InvalidRequest(f"{pid} is a thread id, not a process id", reason="INVALID_PID", field="pid")
    raise OSError(err, os.strerror(err))


def process_madvise(pidfd: int, iovecs: object, count: int, advice: int) -> int:
    """One process_madvise(2) call: bytes advised, or -errno."""
    n = _libc.syscall(
        SYS_PROCESS_MADVISE,
        ffi.cast("int", pidfd),
        iovecs,
        ffi.cast("size_t", count),
        ffi.cast("int", advice),
        ffi.cast("unsigned int", 0),
    )
    return int(n) if n >= 0 else -ffi.errno


@dataclass
class AdviseOutcome:
    """Per-iovec bytes advised and the errno that stopped each (0 if none)."""

    advised: list[int]
    errors: list[int]
    syscalls: int


def batch_end(lengths: list[int], first: int) -> int:
    """End (exclusive) of the batch starting at ``first``: at most UIO_MAXIOV
    iovecs and MAX_RW_COUNT bytes, and never empty."""
    last = min(len(lengths), first + UIO_MAXIOV)
    total = 0
    end = first
    while end < last and total + lengths[end] <= MAX_RW_COUNT:
        total += lengths[end]
        end += 1
    return max(end, first + 1)


def advise_segments(pidfd: int, segments: list[tuple[int, int]], advice: int) -> AdviseOutcome:
    """Advise every segment with as few process_madvise calls as the kernel allows.

    Segments must each be at most MAX_RW_COUNT bytes. The kernel reports whole
    iovecs advised and stops at the first iovec that fails; the loop resumes
    after a short count, records the errno of the iovec that failed, skips it
    and goes on (Android's CachedAppOptimizer does the same). ESRCH or EPERM
    end the loop: no later call could succeed.
    """
    n = len(segments)
    advised = [0] * n
    errors = [0] * n
    iov = ffi.new("struct iovec[]", max(n, 1))
    lengths = [end - start for start, end in segments]
    for i, (start, _end) in enumerate(segments):
        iov[i].iov_base = ffi.cast("void *", start)
        iov[i].iov_len = lengths[i]
    syscalls = 0
    i = 0
    while i < n:
        stop = batch_end(lengths, i)
        result = process_madvise(pidfd, iov + i, stop - i, advice)
        syscalls += 1
        if result == -errno_mod.EINTR:
            continue
        if result < 0:
            errors[i] = -result
            if -result in (errno_mod.ESRCH, errno_mod.EPERM):
                for k in range(i + 1, n):
                    errors[k] = -result
                break
            i += 1
            continue
        # Whole iovecs were advised; a remainder means the kernel stopped part
        # way into one, so advance that iovec and resume from it.
        while i < stop and result >= iov[i].iov_len:
            result -= iov[i].iov_len
            advised[i] += iov[i].iov_len
            i += 1
        if result and i < stop:
            advised[i] += result
            iov[i].iov_base = ffi.cast("char *", iov[i].iov_base) + result
            iov[i].iov_len -= result
    return AdviseOutcome(advised, errors, syscalls)


def pagemap_scan_residency(pagemap_fd: int, start: int, end: int) -> list[tuple[int, int, int]]:
    """Runs of (start, end, categories) of pages present (not the zero page)
    or swapped in [start, end), from PAGEMAP_SCAN on /proc/PID/pagemap."""
    vec = ffi.new("struct page_region[]", _SCAN_VEC_LEN)
    arg = cast(_PmScanArg, ffi.new("struct pm_scan_arg *"))
    arg.size = ffi.sizeof("struct pm_scan_arg")
    arg.vec = int(ffi.cast("uintptr_t", vec))
    arg.vec_len = _SCAN_VEC_LEN
    # The zero page is mapped but holds no memory of the process: smaps
    # leaves it out of Rss, so residency does too. Guard regions
    # (MADV_GUARD_INSTALL) are PTE markers that PAGEMAP_SCAN reports as
    # swapped; they hold no memory either, and smaps leaves them out of Swap.
    arg.category_inverted = PAGE_IS_PFNZERO | PAGE_IS_GUARD
    arg.category_mask = PAGE_IS_PFNZERO | PAGE_IS_GUARD
    arg.category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED
    arg.return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED
    runs: list[tuple[int, int, int]] = []
    while start < end:
        arg.start = start
        arg.end = end
        count = _libc.ioctl(pagemap_fd, ffi.cast("unsigned long", PAGEMAP_SCAN), arg)
        if count < 0:
            err = ffi.errno
            if err == errno_mod.EINTR:
                continue
            if err == errno_mod.EINVAL and arg.category_mask & PAGE_IS_GUARD:
                # A kernel without PAGE_IS_GUARD (before 6.15) refuses the bit.
                # Before 6.13 it has no guard regions; 6.13 and 6.14 have them
                # and cannot tell them from swap.
                arg.category_inverted = arg.category_mask = PAGE_IS_PFNZERO
                continue
            raise _ioctl_error("PAGEMAP_SCAN", err)
        runs.extend((vec[i].start, vec[i].end, vec[i].categories) for i in range(count))
        # The walk reached `end` unless it filled the vector. walk_end alone
        # cannot say: when one call walks in several passes of the kernel's
        # 512-region bounce buffer, it is left where the last pass started
        # (do_pagemap_scan() sets it only on a full buffer), and resuming
        # there would count that pass twice. Past the last run is safe.
        if count < _SCAN_VEC_LEN:
            break
        start = max(arg.walk_end, vec[count - 1].end)
    return runs


def procmap_query_build_id(maps_fd: int, address: int) -> bytes:
    """Build id of the file mapped at ``address`` (b"" when it has none)."""
    build_id = ffi.new("unsigned char[]", BUILD_ID_MAX)
    query = cast(_ProcmapQuery, ffi.new("struct procmap_query *"))
    query.size = ffi.sizeof("struct procmap_query")
    query.query_addr = address
    query.build_id_addr = int(ffi.cast("uintptr_t", build_id))
    query.build_id_size = BUILD_ID_MAX
    if _libc.ioctl(maps_fd, ffi.cast("unsigned long", PROCMAP_QUERY), query) < 0:
        err = ffi.errno
        if err in (errno_mod.ENOENT, errno_mod.ESRCH):
            return b""  # unmapped since the layout was read: nothing to report
        raise _ioctl_error("PROCMAP_QUERY", err)
    found: bytes = ffi.buffer(build_id, query.build_id_size)[:]
    return found


VMA_NAME_MAX = 4352  # a VMA's name as PROCMAP_QUERY writes it: a path (PATH_MAX) or a short [name]


@dataclass(frozen=True)
class QueriedVma:
    """What PROCMAP_QUERY says of the VMA covering an address. ``path`` is
    None when the name did not fit (a path longer than any buffer)."""

    start: int
    end: int
    offset: int
    inode: int
    dev_major: int
    dev_minor: int
    path: bytes | None


def procmap_query_vma(maps_fd: int, address: int) -> QueriedVma | None:
    """The VMA covering ``address`` (None when nothing does), with its name."""
    name = ffi.new("char[]", VMA_NAME_MAX)
    query = cast(_ProcmapQuery, ffi.new("struct procmap_query *"))
    named = True
    while True:
        ffi.buffer(query)[:] = bytes(ffi.sizeof("struct procmap_query"))
        query.size = ffi.sizeof("struct procmap_query")
        query.query_addr = address
        if named:
            query.vma_name_addr = int(ffi.cast("uintptr_t", name))
            query.vma_name_size = VMA_NAME_MAX
        if _libc.ioctl(maps_fd, ffi.cast("unsigned long", PROCMAP_QUERY), query) == 0:
            break
        err = ffi.errno
        if err == errno_mod.ENOENT:
            return None
        if err == errno_mod.ENAMETOOLONG and named:
            named = False
            continue
        if err == errno_mod.EINTR:
            continue
        raise _ioctl_error("PROCMAP_QUERY", err)
    path = (ffi.buffer(name, query.vma_name_size - 1)[:] if query.vma_name_size else b"") if named else None
    return QueriedVma(
        query.vma_start, query.vma_end, query.vma_offset, query.inode, query.dev_major, query.dev_minor, path
    )


PROCMAP_QUERY_COVERING_OR_NEXT_VMA = 0x10


@dataclass(frozen=True)
class LayoutVma:
    """One VMA as the loop of procmap_query_layout gives it; ``flags`` are
    layout.PERM_* (the ioctl's own bits)."""

    start: int
    end: int
    flags: int
    offset: int
    dev_major: int
    dev_minor: int
    inode: int
    name: bytes


def procmap_query_layout(maps_fd: int, names: bool = True) -> list[LayoutVma]:
    """Every VMA of ``maps_fd``'s process with its name, one PROCMAP_QUERY each
    (the loop vmctl_table_query makes in C). OSError with the ioctl's errno
    when it fails (ENOTTY: no PROCMAP_QUERY; ENAMETOOLONG: a name beyond PATH_MAX).
    With ``names`` False a file VMA's name is not asked (b""), and a VMA
    without a file is asked again with it (vmctl_table_query_layout's loop)."""
    name = ffi.new("char[]", VMA_NAME_MAX)
    query = cast(_ProcmapQuery, ffi.new("struct procmap_query *"))
    request = ffi.cast("unsigned long", PROCMAP_QUERY)
    found: list[LayoutVma] = []
    address = 0
    with_name = names
    while True:
        query.size = ffi.sizeof("struct procmap_query")
        query.query_flags = PROCMAP_QUERY_COVERING_OR_NEXT_VMA
        query.query_addr = address
        query.vma_name_addr = int(ffi.cast("uintptr_t", name)) if with_name else 0
        query.vma_name_size = VMA_NAME_MAX if with_name else 0
        query.build_id_addr = query.build_id_size = 0
        if _libc.ioctl(maps_fd, request, query) < 0:
            err = ffi.errno
            if err == errno_mod.EINTR:
                continue
            if err == errno_mod.ENOENT:  # no VMA at or above address: the end
                return found
            raise OSError(err, f"PROCMAP_QUERY: {os.strerror(err)}")
        if not with_name and not (query.inode or query.dev_major or query.dev_minor):
            with_name = True  # no file: the name gives the kind; ask again
            continue
        if query.vma_end <= query.vma_start or query.vma_start < address:
            raise OSError(errno_mod.EIO, "PROCMAP_QUERY went backwards")
        size = query.vma_name_size if with_name else 0  # counts the terminating NUL; 0 for no name
        text: bytes = ffi.string(name, size - 1) if size > 1 else b""  # type: ignore[assignment]
        with_name = names
        found.append(
            LayoutVma(
                query.vma_start,
                query.vma_end,
                query.vma_flags & 0xF,
                query.vma_offset,
                query.dev_major,
                query.dev_minor,
                query.inode,
                text,
            )
        )
        address = query.vma_end


def _ioctl_error(name: str, err: int) -> Exception:
    if err in (errno_mod.ENOTTY, errno_mod.EOPNOTSUPP):
        return KernelUnsupported(f"this kernel has no {name} ioctl")
    if err in (errno_mod.EACCES, errno_mod.EPERM):
        return AccessDenied(f"{name} refused: {os.strerror(err)}")
    if err == errno_mod.ESRCH:
        return ProcessGone("the process exited during the read")
    return OSError(err, f"{name}: {os.strerror(err)}")


@dataclass
class Capabilities:
    """What this kernel supports (the agent probes it once at start: runtime.kernel_probe)."""

    pidfd_open: bool = False
    process_madvise: bool = False
    advices: frozenset[int] = frozenset()  # vmctl.v1.Advice values
    procmap_query: bool = False
    pagemap_scan: bool = False
    advice_permitted: bool = False
    access_sampling: str = ""  # how VMA_ATTR_ACCESS samples ("clear_refs"), or "" when it cannot
    probe_errors: dict[str, str] = field(default_factory=dict)

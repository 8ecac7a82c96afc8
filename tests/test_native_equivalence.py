"""The native (C) tables and AdviseRanges work give exactly what the
pure-Python reference gives: on real, stopped target processes, on synthetic
and arbitrary /proc text and request bytes, and on ranges and layouts of
every shape (hypothesis); and an agent on each path answers alike."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vmctl_api import vmctl_pb2 as pb
from vmctl_api.words import ATTR_ACCESS, ATTR_ACCOUNTING, ATTR_BUILD_ID, ATTR_RESIDENCY
from vmctl_client.errors import VmctlError
from vmctl_server.backends.native import _native
from vmctl_server.backends.native.ranges import NativeRanges, request_ranges
from vmctl_server.backends.native.tables import NativeVmaTable, advise_segments
from vmctl_server.backends.reference.ranges import PyRanges
from vmctl_server.backends.reference.tables import SMAPS_KB_FIELDS, PyVmaTable
from vmctl_server.core import kernel
from vmctl_server.core.advice import FILTER_KINDS, Plan, RangeSet
from vmctl_server.core.faults import InvalidRequest, ProcessGone
from vmctl_server.core.layout import KIND_ANONYMOUS, KIND_FILE, KIND_SPECIAL, LAYOUT_RECORD, layout_digest
from vmctl_server.core.snapshot import SnapshotReader, SourceSupport

PAGE = os.sysconf("SC_PAGE_SIZE")
ALL_MASKS = range(32)
PACKAGE = Path(__file__).resolve().parent.parent / "src" / "vmctl_server"

needs_cap_sys_nice = pytest.mark.skipif(os.geteuid() != 0, reason="process_madvise(2) needs CAP_SYS_NICE")

# A target: maps anonymous and file memory of every kind the tables treat
# differently, touches some of it, prints {name: [start, end]} and stops
# itself, so that nothing changes while it is read.
TARGET = r"""
import ctypes, json, os, signal, sys

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.munmap.argtypes = libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_char_p)
PAGE = os.sysconf("SC_PAGE_SIZE")
HUGE = 2 << 20
READ, RW = 1, 3
SHARED, PRIVATE, FIXED, ANON, NORESERVE, HUGETLB = 0x01, 0x02, 0x10, 0x20, 0x4000, 0x40000
MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_GUARD_INSTALL = 14, 15, 102
FAILED = ctypes.c_void_p(-1).value
regions = {}

def check(ok, what):
    if not ok:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")

def mapping(name, pages, prot=RW, flags=PRIVATE | ANON, fd=-1):
    # An unmapped page after each region keeps neighbours from merging
    # and gives the advice tests a hole.
    size = pages * PAGE
    hole = libc.mmap(None, size + PAGE, 0, PRIVATE | ANON, -1, 0)
    check(hole not in (None, FAILED), "mmap")
    addr = libc.mmap(hole, size, prot, flags | FIXED, fd, 0)
    check(addr == hole, "mmap")
    check(libc.munmap(addr + size, PAGE) == 0, "munmap")
    # khugepaged must not collapse anything while the target is read.
    check(libc.madvise(addr, size, MADV_NOHUGEPAGE) == 0, "madvise")
    regions[name] = [addr, addr + size]
    return addr

def huge_mapping(name):
    raw = libc.mmap(None, 2 * HUGE, RW, PRIVATE | ANON, -1, 0)
    check(raw not in (None, FAILED), "mmap")
    addr = (raw + HUGE - 1) & ~(HUGE - 1)
    check(libc.madvise(addr, HUGE, MADV_HUGEPAGE) == 0, "madvise")
    regions[name] = [addr, addr + HUGE]
    return addr

def touch(addr, pages, write=True):
    for page in pages:
        cell = ctypes.c_char.from_address(addr + page * PAGE)
        if write:
            cell.value = b"x"
        else:
            cell.value

def file_mapping(name, filename, flags, write):
    fd = os.open(os.path.join(os.fsencode(sys.argv[1]), filename), os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 8 * PAGE)
    touch(mapping(name, 8, flags=flags, fd=fd), range(4), write)
    os.close(fd)

touch(mapping("anon", 64), range(0, 64, 2))
# 5,000 runs of PAGEMAP_SCAN: more than its 4,096-region vector, and more
# than the kernel's 512-region bounce buffer in the call after that.
touch(mapping("runs", 10000), range(0, 10000, 2))
touch(mapping("zero", 16, prot=READ), range(16), write=False)
file_mapping("spaces", b"with  spaces  ", PRIVATE, write=False)
file_mapping("bad_utf8", b"bad\xff\xfe \xc0\x80 \xed\xa0\x80 \xf4\x90\x80\x80 \xe2\x82", SHARED, write=True)
file_mapping("newline", b"new\nline", PRIVATE, write=True)
file_mapping("unicode", "üñíçødé ✓ 𝄞".encode(), PRIVATE, write=False)
named = mapping("named", 8)
touch(named, range(3))
if libc.prctl(0x53564D41, 0, named, 8 * PAGE, b"vmctl-test") != 0:  # PR_SET_VMA_ANON_NAME
    del regions["named"]  # CONFIG_ANON_VMA_NAME is off
locked = mapping("locked", 4)
check(libc.mlock(locked, 4 * PAGE) == 0, "mlock")
touch(mapping("shared_anon", 8, flags=SHARED | ANON), range(4))
memfd = os.memfd_create("vmctl-test")
os.ftruncate(memfd, 8 * PAGE)
touch(mapping("memfd", 8, flags=SHARED, fd=memfd), range(5))
touch(huge_mapping("thp"), range(HUGE // PAGE))
touch(huge_mapping("huge_zero"), [0], write=False)
guard = mapping("guard", 16)
touch(guard, range(16))
if libc.madvise(guard + 4 * PAGE, 4 * PAGE, MADV_GUARD_INSTALL) != 0:
    del regions["guard"]  # before Linux 6.13
hugetlb = libc.mmap(None, HUGE, RW, PRIVATE | ANON | HUGETLB, -1, 0)
if hugetlb not in (None, FAILED):  # only when huge pages are reserved
    touch(hugetlb, [0])
    regions["hugetlb"] = [hugetlb, hugetlb + HUGE]
big = libc.mmap(None, 3 << 30, RW, PRIVATE | ANON | NORESERVE, -1, 0)
check(big not in (None, FAILED), "mmap")
regions["big"] = [big, big + (3 << 30)]
print(json.dumps(regions), flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
signal.pause()
"""


@dataclass(frozen=True)
class Target:
    pid: int
    regions: dict[str, tuple[int, int]]

    def read(self, name: str) -> bytes:
        with open(f"/proc/{self.pid}/{name}", "rb") as f:
            return f.read()

    def fd(self, name: str) -> int:
        return os.open(f"/proc/{self.pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    directory = tmp_path_factory.mktemp("target")
    proc = subprocess.Popen([sys.executable, "-c", TARGET, str(directory)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"the target did not start: {line!r}"
        regions = {name: (start, end) for name, (start, end) in json.loads(line).items()}
        yield Target(proc.pid, regions)
    finally:
        proc.kill()
        proc.wait()


def both_tables(target: Target, source: str) -> tuple[PyVmaTable, NativeVmaTable]:
    data = target.read(source)
    if source == "maps":
        return PyVmaTable.from_maps(data), NativeVmaTable.from_maps(data)
    return PyVmaTable.from_smaps(data), NativeVmaTable.from_smaps(data)


def assert_same(py: PyVmaTable | NativeVmaTable, native: NativeVmaTable) -> None:
    assert len(native) == len(py)
    assert native.filled_mask == py.filled_mask
    assert native.layout_records() == py.layout_records()
    for mask in ALL_MASKS:
        assert native.encode(mask) == py.encode(mask), f"mask {mask}"
    header = pb.GetVmaInfoResponse(process=pb.Process(pid=7, comm="x"), cookie=b"c" * 109).SerializeToString()
    assert native.encode(ATTR_ACCOUNTING, prefix=header) == py.encode(ATTR_ACCOUNTING, prefix=header)
    assert native.encode(ATTR_ACCOUNTING, prefix=header) == header + native.encode(ATTR_ACCOUNTING)
    for mask in (0, ATTR_RESIDENCY | ATTR_ACCOUNTING | ATTR_BUILD_ID | ATTR_ACCESS):
        for max_bytes in CHUNK_LIMITS:
            assert chunks_or_refusal(native, mask, max_bytes) == chunks_or_refusal(py, mask, max_bytes), max_bytes
        assert b"".join(native.encode_chunks(mask, 1 << 20)) == native.encode(mask)
    if not native.filled_mask & ATTR_ACCESS:
        assert_same_accessed(py, native)


def assert_same_accessed(py: PyVmaTable | NativeVmaTable, native: NativeVmaTable) -> None:
    """Once marked sampled (smaps read after a clear_refs), both encode accessed_bytes alike:
    each VMA's Referenced; a maps table has no Referenced to give, and both refuse."""
    if not native.filled_mask & ATTR_ACCOUNTING:
        for table in (py, native):
            with pytest.raises(ValueError, match="read from maps"):
                table.fill_access()
        return
    py.fill_access()
    native.fill_access()
    assert_same(py, native)
    for vma in decoded(native, ATTR_ACCESS | ATTR_ACCOUNTING):
        assert vma.accessed_bytes == vma.referenced_bytes


# From "every VMA too big" through "a few VMAs a chunk" to StreamVmaInfo's own limit.
CHUNK_LIMITS = (1, 40, 100, 333, 4096, (1 << 20) - 1)


def chunks_or_refusal(table: PyVmaTable | NativeVmaTable, mask: int, max_bytes: int) -> list[bytes] | str:
    try:
        return table.encode_chunks(mask, max_bytes)
    except ValueError as exc:
        return str(exc)


def fill(table: PyVmaTable | NativeVmaTable, target: Target, residency: bool = True) -> None:
    pagemap, maps = target.fd("pagemap"), target.fd("maps")
    try:
        if residency:
            table.fill_residency(pagemap)
        table.fill_build_ids(maps)
    finally:
        os.close(pagemap)
        os.close(maps)


def decoded(table: PyVmaTable | NativeVmaTable, mask: int) -> list[pb.Vma]:
    return list(pb.GetVmaInfoResponse.FromString(table.encode(mask)).vmas)


# --------------------------------------------------------------- the ABI


@pytest.mark.unprivileged
def test_kernel_structs_match_the_reference() -> None:
    for name in ("struct iovec", "struct procmap_query", "struct page_region", "struct pm_scan_arg"):
        fields = [field for field, _ in kernel.ffi.typeof(name).fields]
        assert _native.ffi.sizeof(name) == kernel.ffi.sizeof(name)
        assert [_native.ffi.offsetof(name, f) for f in fields] == [kernel.ffi.offsetof(name, f) for f in fields]


# ------------------------------------------------------ a real target


@pytest.mark.parametrize("source", ["maps", "smaps"])
def test_tables_equal_on_a_real_process(target: Target, source: str) -> None:
    py, native = both_tables(target, source)
    assert_same(py, native)
    fill(py, target, residency=source == "maps")
    fill(native, target, residency=source == "maps")
    assert_same(py, native)


@pytest.mark.parametrize("source", ["maps", "smaps"])
def test_tables_read_from_proc_equal(target: Target, source: str) -> None:
    """The native read (read(2) and parse in one C call) gives the reference's table."""
    assert_same(PyVmaTable.read(target.pid, source), NativeVmaTable.read(target.pid, source))


def test_reading_a_process_that_is_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    for table in (PyVmaTable, NativeVmaTable):
        with pytest.raises(ProcessGone):
            table.read(proc.pid, "maps")


@pytest.mark.unprivileged
def test_a_failed_read_is_an_os_error(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as caught:
            NativeVmaTable.from_fd(fd, "maps")
    finally:
        os.close(fd)
    assert caught.value.errno == errno.EISDIR


def test_paths_as_python_decodes_them(target: Target) -> None:
    _, native = both_tables(target, "maps")
    by_start = {vma.start: vma for vma in decoded(native, 0)}
    bad = by_start[target.regions["bad_utf8"][0]]
    assert bad.raw_path.endswith(b"bad\xff\xfe \xc0\x80 \xed\xa0\x80 \xf4\x90\x80\x80 \xe2\x82")
    assert bad.path.endswith(r"bad\xff\xfe \xc0\x80 \xed\xa0\x80 \xf4\x90\x80\x80 \xe2\x82")
    assert by_start[target.regions["spaces"][0]].path.endswith("/with  spaces  ")
    assert by_start[target.regions["newline"][0]].path.endswith(r"/new\012line")
    unicode = by_start[target.regions["unicode"][0]]
    assert unicode.path.endswith("/üñíçødé ✓ 𝄞")
    assert unicode.raw_path == b""
    if "named" in target.regions:
        assert by_start[target.regions["named"][0]].path == "[anon:vmctl-test]"


def test_residency_equal_and_as_smaps_counts_it(target: Target) -> None:
    # The target is stopped, but the kernel may still move its pages
    # (compaction, NUMA balancing): read again if smaps moved meanwhile.
    for _attempt in range(3):
        smaps_before = PyVmaTable.from_smaps(target.read("smaps")).rows
        py, native = both_tables(target, "maps")
        fill(py, target)
        fill(native, target)
        smaps = PyVmaTable.from_smaps(target.read("smaps")).rows
        if smaps == smaps_before:
            break
    assert decoded(native, ATTR_RESIDENCY) == decoded(py, ATTR_RESIDENCY)

    assert [r["start"] for r in py.rows] == [r["start"] for r in smaps]
    for row, counted in zip(py.rows, smaps, strict=True):
        if counted["kernel_page_size_bytes"] > PAGE:
            # hugetlb: smaps_hugetlb_range() counts the pages as
            # Shared/Private_Hugetlb, never as Rss; PAGEMAP_SCAN sees them
            # present in the page tables.
            assert counted["rss_bytes"] == 0
            hugetlb = counted["shared_hugetlb_bytes"] + counted["private_hugetlb_bytes"]
            assert (row["rss_bytes"], row["swap_bytes"]) == (hugetlb, 0)
        else:
            assert (row["rss_bytes"], row["swap_bytes"]) == (counted["rss_bytes"], counted["swap_bytes"]), row["path"]

    residency = {(r["start"], r["end"]): (r["rss_bytes"], r["swap_bytes"]) for r in py.rows}
    regions = target.regions
    assert residency[regions["anon"]] == (32 * PAGE, 0)
    assert residency[regions["runs"]] == (5000 * PAGE, 0)
    assert residency[regions["zero"]] == (0, 0)  # the zero page is no memory of the process
    assert residency[regions["huge_zero"]] == (0, 0)  # nor is the huge zero page
    assert residency[regions["thp"]] == (2 << 20, 0)
    assert residency[regions["locked"]] == (4 * PAGE, 0)
    assert residency[regions["shared_anon"]] == (4 * PAGE, 0)
    assert residency[regions["memfd"]] == (5 * PAGE, 0)
    if "guard" in regions:  # guard markers are not swap
        assert residency[regions["guard"]] == (12 * PAGE, 0)


def test_build_ids_equal(target: Target) -> None:
    py, native = both_tables(target, "maps")
    fill(py, target, residency=False)
    fill(native, target, residency=False)
    assert native.encode(ATTR_BUILD_ID) == py.encode(ATTR_BUILD_ID)
    build_ids = {r["path"]: r.get("build_id", b"") for r in py.rows}
    assert any(len(b) == 20 for b in build_ids.values())  # the libc and python images carry one
    assert not any(b for path, b in build_ids.items() if path.endswith("/with  spaces  "))  # not ELF


def test_chunks_are_whole_vmas_under_the_limit_and_as_full_as_they_fit(target: Target) -> None:
    py, native = both_tables(target, "smaps")
    fill(py, target)
    fill(native, target)
    mask = ATTR_RESIDENCY | ATTR_ACCOUNTING | ATTR_BUILD_ID
    limit = 2 << 10
    chunks = native.encode_chunks(mask, limit)
    assert chunks == py.encode_chunks(mask, limit)
    assert len(chunks) > 3
    assert [v for c in chunks for v in pb.StreamVmaInfoResponse.FromString(c).vmas] == decoded(native, mask)
    for chunk, following in itertools.pairwise(chunks):
        assert len(chunk) <= limit
        first_of_next = pb.StreamVmaInfoResponse(vmas=pb.StreamVmaInfoResponse.FromString(following).vmas[:1])
        assert len(chunk) + first_of_next.ByteSize() > limit  # the next VMA would not have fit
    assert NativeVmaTable.from_maps(b"").encode_chunks(mask, limit) == PyVmaTable.from_maps(b"").encode_chunks(
        mask, limit
    ) == []  # fmt: skip


# ---------------------------------------------------------------- advice


def advice_segments(target: Target) -> list[tuple[int, int]]:
    regions = target.regions
    anon_start, anon_end = regions["anon"]
    locked = regions["locked"]
    big_start, big_end = regions["big"]
    half = (big_end - big_start) // 2
    pages = [(a, a + PAGE) for a in range(anon_start, anon_end, PAGE)]
    return (
        pages * 20  # 1,280 iovecs: more than one call's UIO_MAXIOV
        + [locked, (anon_end, anon_end + PAGE), regions["spaces"]]  # mlocked, then a hole
        + [(big_start, big_start + half), (big_start + half, big_end)]  # 3 GiB: more than one call's MAX_RW_COUNT
        + [(big_start, big_end)]  # one iovec over MAX_RW_COUNT: the kernel advises part of it
        + pages[:3]
    )


@needs_cap_sys_nice
@pytest.mark.parametrize(
    ("advice", "locked_errno"),
    [(kernel.MADV_COLD, errno.EINVAL), (kernel.MADV_WILLNEED, 0)],
    ids=["cold", "willneed"],
)
def test_advice_loops_equal(target: Target, advice: int, locked_errno: int) -> None:
    segments = advice_segments(target)
    hole = segments[1281]
    assert not any(r["start"] < hole[1] and hole[0] < r["end"] for r in PyVmaTable.from_maps(target.read("maps")).rows)
    pidfd = kernel.pidfd_open(target.pid)
    try:
        reference = kernel.advise_segments(pidfd, segments, advice)
        native = advise_segments(pidfd, segments, advice)
    finally:
        os.close(pidfd)
    assert native == reference

    # ... and the outcome is the one the loop promises.
    lengths = [end - start for start, end in segments]
    assert native.errors[1280] == locked_errno  # skipped, and the loop went on
    assert native.errors[1281] == errno.ENOMEM  # the hole
    assert [e for i, e in enumerate(native.errors) if i not in (1280, 1281)] == [0] * (len(segments) - 2)
    expected = [0 if e else length for e, length in zip(native.errors, lengths, strict=True)]
    assert native.advised == expected
    # Calls: [0, 1024) one; [1024, 1284) stops at the first failing iovec
    # (the mlocked one for COLD, the hole for WILLNEED); each failing iovec
    # alone one; the rest up to 1284, where MAX_RW_COUNT ends the batch, one;
    # 1284 one; 1285 (3 GiB) two, as the kernel advises MAX_RW_COUNT bytes
    # of it and the loop resumes after the short count; the last three one.
    assert native.syscalls == (9 if locked_errno else 8)


@needs_cap_sys_nice
def test_advice_on_an_exited_process(target: Target) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    pidfd = -1
    try:
        pidfd = kernel.pidfd_open(proc.pid)
        proc.kill()
        proc.wait()
        segments = [target.regions["anon"], target.regions["spaces"], target.regions["locked"]]
        reference = kernel.advise_segments(pidfd, segments, kernel.MADV_COLD)
        native = advise_segments(pidfd, segments, kernel.MADV_COLD)
    finally:
        if pidfd >= 0:
            os.close(pidfd)
        proc.kill()
        proc.wait()
    assert native == reference == kernel.AdviseOutcome([0, 0, 0], [errno.ESRCH] * 3, 1)


@pytest.mark.unprivileged
def test_advice_with_no_segments() -> None:
    assert advise_segments(-1, [], kernel.MADV_COLD) == kernel.advise_segments(-1, [], kernel.MADV_COLD)


# ------------------------------------------------ AdviseRanges per range

PREFIX = pb.AdviseRangesResponse(requested_bytes=1 << 40, syscalls=3, dry_run=True).SerializeToString()
U64 = (1 << 64) - 1


def outcome(ranges: RangeSet, records: bytes, filter_: int) -> tuple:
    """Everything a RangeSet reports for ``ranges`` against ``records``: the
    refusal (reason, words, metadata), or the plan before and after a dry run."""
    try:
        ranges.check()
        plan = ranges.plan(records, filter_)
    except InvalidRequest as exc:
        return ("refused", exc.reason, exc.message, exc.metadata)
    before = (plan.requested_bytes, plan.advised_bytes, plan.pieces(), outcomes(plan), plan.encode())
    plan.dry_run()
    return ("planned", *before, plan.advised_bytes, outcomes(plan), plan.encode(PREFIX))


def outcomes(plan: Plan) -> list[tuple]:
    """The outcomes as they are now (the reference's change as it goes on)."""
    return [astuple(o) for o in plan.outcomes()]


def assert_ranges_agree(pairs: list[tuple[int, int]], records: bytes, filter_: int) -> tuple:
    native = outcome(NativeRanges.from_pairs(pairs), records, filter_)
    assert native == outcome(PyRanges.from_pairs(pairs), records, filter_)
    assert NativeRanges.from_pairs(pairs).total_bytes() == PyRanges.from_pairs(pairs).total_bytes()
    return native


@st.composite
def layouts(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int]]]:
    """Packed layout records as the kernel orders them (sorted, disjoint),
    with holes, VMAs larger than one process_madvise call may carry, and
    sometimes [vsyscall] at the top; and the spans of the VMAs."""
    spans, records = [], []
    cursor = draw(st.integers(0, 16)) * PAGE
    for _ in range(draw(st.integers(1, 10))):
        cursor += draw(st.sampled_from([0, 0, 0, 0, 1, 5])) * PAGE
        pages = draw(st.sampled_from([1, 2, 7]) | st.integers(1, 3 * kernel.MAX_RW_COUNT // PAGE))
        kind = draw(st.sampled_from([KIND_ANONYMOUS, KIND_FILE, KIND_SPECIAL]))
        spans.append((cursor, cursor + pages * PAGE))
        records.append(LAYOUT_RECORD.pack(cursor, cursor + pages * PAGE, 0, 7, 8, 1, 3, kind))
        cursor += pages * PAGE
    if draw(st.booleans()):
        vsyscall = (0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000)
        spans.append(vsyscall)
        records.append(LAYOUT_RECORD.pack(*vsyscall, 0, 0, 0, 0, 4, KIND_SPECIAL))
    return b"".join(records), spans


@st.composite
def ranges_and_layout(draw: st.DrawFn) -> tuple[list[tuple[int, int]], bytes, int]:
    """Ranges and a layout (and a filter): cut from page boundaries in and
    around its VMAs (often valid, sometimes across a hole), in any order,
    sometimes with a defect put in."""
    records, spans = draw(layouts())
    points = {0, PAGE, U64 - PAGE + 1} if draw(st.integers(0, 4)) == 0 else set()
    for start, end in spans:
        points |= {start, end, start + PAGE, end - PAGE, (start + end) // 2 // PAGE * PAGE}
    assume(len(points) >= 2)
    cuts = sorted(draw(st.sets(st.sampled_from(sorted(points)), min_size=2, max_size=16)))
    ranges = [(a, b) for a, b in zip(cuts[::2], cuts[1::2], strict=False)]
    ranges = draw(st.permutations(ranges)) if draw(st.booleans()) else ranges
    if ranges and draw(st.integers(0, 4)) == 0:
        at = draw(st.integers(0, len(ranges) - 1))
        start, end = ranges[at]
        ranges[at] = draw(
            st.sampled_from([(start + 1, end), (start, start), (end, start), (start, end + 7)])
            | st.tuples(st.integers(0, U64), st.integers(0, U64))
        )
    if ranges and draw(st.integers(0, 9)) == 0:
        ranges.append(draw(st.sampled_from(ranges)))  # overlaps (or repeats) another
    return ranges, records, draw(st.sampled_from(sorted(FILTER_KINDS)))


@pytest.mark.unprivileged
@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ranges_and_layout())
def test_range_checks_and_plans_equal(case: tuple[list[tuple[int, int]], bytes, int]) -> None:
    assert_ranges_agree(*case)


addresses = st.one_of(
    st.integers(0, 64).map(lambda n: n * PAGE),
    st.integers(0, U64),
    st.sampled_from([0, PAGE, 1 << 47, U64 - PAGE + 1, U64]),
)


@pytest.mark.unprivileged
@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(addresses, addresses), min_size=1, max_size=40))
def test_refusals_of_any_ranges_equal(pairs: list[tuple[int, int]]) -> None:
    assert_ranges_agree(pairs, b"", 0)


@pytest.mark.unprivileged
@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 1 << 20), min_size=2, max_size=300, unique=True), st.randoms())
def test_many_unsorted_ranges_checked_alike(pages: list[int], rng) -> None:
    """Long, shuffled lists: the native check sorts only when it must, and
    names the same pair as the reference's stable sort."""
    ranges = [(p * PAGE, (p + 1) * PAGE) for p in pages]
    rng.shuffle(ranges)
    assert assert_ranges_agree(ranges, b"", 0)[1] == "RANGE_UNMAPPED"  # every range passed the checks
    ranges.insert(rng.randrange(len(ranges)), ranges[rng.randrange(len(ranges))])
    assert assert_ranges_agree(ranges, b"", 0)[1] == "RANGE_OVERLAP"


@pytest.mark.unprivileged
def test_total_bytes_beyond_64_bits() -> None:
    pairs = [(0, U64)] * 5 + [(U64, 0), (7, 3)]
    assert NativeRanges.from_pairs(pairs).total_bytes() == PyRanges.from_pairs(pairs).total_bytes() == 5 * U64


# Request bytes: what protobuf writes, and what else it accepts.


def varint(value: int, pad: int = 0) -> bytes:
    """``value`` as a varint, with up to ``pad`` redundant bytes (protobuf
    reads varints of up to 10 bytes)."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    pad = min(pad, 9 - len(out))
    if pad <= 0:
        return bytes(out + bytes([value]))
    return bytes(out + bytes([value | 0x80]) + b"\x80" * (pad - 1) + b"\x00")


def field(number: int, wire_type: int, payload: bytes, pad: int = 0) -> bytes:
    return varint(number << 3 | wire_type, pad) + payload


@st.composite
def unknown_field(draw: st.DrawFn) -> bytes:
    number = draw(st.sampled_from([7, 15, 16, 2047, (1 << 29) - 1]))
    wire_type = draw(st.sampled_from([0, 1, 2, 5]))
    payload = {
        0: varint(draw(st.integers(0, U64))),
        1: draw(st.binary(min_size=8, max_size=8)),
        2: (lambda b: varint(len(b)) + b)(draw(st.binary(max_size=12))),
        5: draw(st.binary(min_size=4, max_size=4)),
    }[wire_type]
    return field(number, wire_type, payload)


@st.composite
def address_range(draw: st.DrawFn, odd: bool) -> tuple[bytes, bool]:
    """One AddressRange's bytes (its fields in any order, repeated, padded,
    among unknown ones; with ``odd``, sometimes in an encoding C leaves to
    protobuf) and whether it has none of those."""
    parts, plain = [], True
    kinds = ["start", "end", "start", "end", "unknown", *(["odd"] if odd else [])]
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(kinds))
        if kind == "unknown":
            parts.append(draw(unknown_field()))
        elif kind == "odd":  # start or end as fixed64, or an empty group: protobuf's business
            plain = False
            parts.append(draw(st.sampled_from([field(1, 1, b"\x01" * 8), field(2, 3, b"") + field(2, 4, b"")])))
        else:
            pad = draw(st.sampled_from([0, 0, 0, 1, 3]))
            value = draw(st.integers(0, U64) | st.integers(0, 1 << 48).map(lambda n: n * PAGE))
            parts.append(field(1 if kind == "start" else 2, 0, varint(value, pad), draw(st.sampled_from([0, 0, 2]))))
    body = b"".join(parts)
    return field(2, 2, varint(len(body)) + body), plain


@st.composite
def request_bytes(draw: st.DrawFn) -> tuple[bytes, bool]:
    """An AdviseRangesRequest's bytes, in half of them with some encoding
    C leaves to protobuf; and whether it has none."""
    parts, plain = [], True
    odd = draw(st.booleans())
    kinds = ["range", "range", "range", "scalar", "cookie", "unknown", *(["odd"] if odd else [])]
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(kinds))
        if kind == "range":
            data, range_plain = draw(address_range(odd and draw(st.booleans())))
            parts.append(data)
            plain &= range_plain
        elif kind == "scalar":
            parts.append(field(draw(st.sampled_from([1, 3, 5, 6])), 0, varint(draw(st.integers(0, U64)))))
        elif kind == "cookie":
            cookie = draw(st.binary(max_size=40))
            parts.append(field(4, 2, varint(len(cookie)) + cookie))
        elif kind == "unknown":
            parts.append(draw(unknown_field()))
        else:
            plain = False
            parts.append(draw(st.sampled_from([field(2, 0, b"\x05"), field(9, 3, b"") + field(9, 4, b"")])))
    return b"".join(parts), plain


def assert_read_as_protobuf_reads(wire: bytes, plain: bool) -> None:
    try:
        message = pb.AdviseRangesRequest.FromString(wire)
    except DecodeError:
        assert not plain, "protobuf refused bytes written by the rules"
        return
    expected = [(r.start, r.end) for r in message.ranges]
    array = request_ranges(wire, len(expected))
    if plain:
        assert array is not None
    if array is not None:
        assert [(a.start, a.end) for a in array] == expected
    # Read by C or left to protobuf, the RangeSet holds the same ranges.
    ranges = NativeRanges.from_message(message.ranges, wire)
    assert ranges.total_bytes() == PyRanges.from_message(message.ranges, wire).total_bytes()
    assert outcome(ranges, b"", 0) == outcome(PyRanges.from_pairs(expected), b"", 0)


@pytest.mark.unprivileged
@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_bytes())
def test_ranges_read_from_request_bytes_as_protobuf_reads_them(case: tuple[bytes, bool]) -> None:
    assert_read_as_protobuf_reads(*case)


@st.composite
def garbled(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(request_bytes())[0])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        data[at : at + draw(st.integers(0, 3))] = draw(st.binary(max_size=3))
    return bytes(data)


@pytest.mark.unprivileged
@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200) | garbled())
def test_request_bytes_of_any_kind(wire: bytes) -> None:
    """Whatever protobuf accepts, C reads the same ranges from or leaves alone."""
    assert_read_as_protobuf_reads(wire, plain=False)


@pytest.mark.unprivileged
def test_a_real_request_is_read_in_c() -> None:
    ranges = [(start * PAGE, (start + 3) * PAGE) for start in range(0, 3 << 20, 7)]
    request = pb.AdviseRangesRequest(pid=5, advice=2, cookie=b"\xff" * 97, filter=1, dry_run=True)
    request.ranges.extend(pb.AddressRange(start=s, end=e) for s, e in ranges)
    array = request_ranges(request.SerializeToString(), len(ranges))
    assert array is not None
    assert [(a.start, a.end) for a in array] == ranges


# On a live process: the same plans, the same calls, the same outcomes.


def live_ranges(target: Target) -> list[tuple[int, int]]:
    regions = target.regions
    runs_start, runs_end = regions["runs"]
    return [
        *((a, a + 5 * PAGE) for a in range(runs_start, runs_end - 5 * PAGE, 5 * PAGE)),  # 1,999: several calls
        regions["locked"],
        regions["spaces"],  # a file
        regions["big"],  # 3 GiB: cut at MAX_RW_COUNT
        regions["shared_anon"],
        regions["memfd"],
        regions["anon"],
    ]


@needs_cap_sys_nice
@pytest.mark.parametrize("filter_", sorted(FILTER_KINDS))
@pytest.mark.parametrize("advice", [kernel.MADV_COLD, kernel.MADV_WILLNEED], ids=["cold", "willneed"])
def test_plans_applied_alike(target: Target, advice: int, filter_: int) -> None:
    records = NativeVmaTable.read(target.pid, "maps").layout_records()
    assert records == PyVmaTable.read(target.pid, "maps").layout_records()
    pairs = live_ranges(target)
    native, reference = NativeRanges.from_pairs(pairs), PyRanges.from_pairs(pairs)
    native.check()
    reference.check()
    plans = native.plan(records, filter_), reference.plan(records, filter_)
    assert plans[0].pieces() == plans[1].pieces()
    pidfd = kernel.pidfd_open(target.pid)
    try:
        applied = [plan.apply(pidfd, advice) for plan in plans]
    finally:
        os.close(pidfd)
    assert applied[0] == applied[1]
    assert outcomes(plans[0]) == outcomes(plans[1])
    assert plans[0].advised_bytes == plans[1].advised_bytes
    assert plans[0].encode(PREFIX) == plans[1].encode(PREFIX)
    # ... and what they agree on is right: the mlocked range stops COLD.
    locked = plans[0].outcomes()[len(pairs) - 6]
    if filter_ != 2:  # the file filter leaves the anonymous locked range out
        assert locked.error == ("EINVAL" if advice == kernel.MADV_COLD else "")
    if filter_ == 0:
        assert applied[0][0] > 2  # 1,999 runs and a 3 GiB range take several calls


@needs_cap_sys_nice
def test_plans_applied_to_an_exited_process_alike(target: Target) -> None:
    records = NativeVmaTable.read(target.pid, "maps").layout_records()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    pidfd = -1
    try:
        pidfd = kernel.pidfd_open(proc.pid)
        proc.kill()
        proc.wait()
        plans = [kind.from_pairs(live_ranges(target)).plan(records, 0) for kind in (NativeRanges, PyRanges)]
        applied = [plan.apply(pidfd, kernel.MADV_COLD) for plan in plans]
    finally:
        if pidfd >= 0:
            os.close(pidfd)
        proc.kill()
        proc.wait()
    assert applied[0] == applied[1] == (1, errno.ESRCH)
    assert outcomes(plans[0]) == outcomes(plans[1])
    assert plans[0].encode() == plans[1].encode()
    assert {o.error for o in plans[0].outcomes()} == {"ESRCH"}


# Both agents, end to end: the same reply bytes, the same refusals.


def advise_both(agents: list, target: Target, pairs: list[tuple[int, int]], **kwargs: object) -> list:
    """AdviseRanges through each agent: its reply's bytes, or its refusal."""
    answers = []
    for agent in agents:
        with agent.client() as client:
            cookie = client.get_vma_info(target.pid).cookie
            try:
                answers.append(
                    client.advise_ranges(target.pid, pairs, cookie=cookie, **kwargs).reply.SerializeToString()
                )
            except VmctlError as exc:
                answers.append((type(exc).__name__, exc.code, exc.reason, exc.message, exc.metadata))
    return answers


@pytest.mark.parametrize(
    ("case", "kwargs"),
    [
        ("every region", {"advice": "pageout", "dry_run": True}),
        ("anonymous", {"advice": "cold", "filter": "anonymous", "dry_run": True}),
        ("file", {"advice": "willneed", "filter": "file", "dry_run": True}),
        ("applied", {"advice": "cold"}),
        ("unaligned", {"advice": "cold"}),
        ("overlap", {"advice": "cold"}),
        ("hole", {"advice": "cold"}),
    ],
)
def test_agents_answer_alike(agent, agent_py, target: Target, case: str, kwargs: dict) -> None:
    pairs = live_ranges(target)
    if case == "unaligned":
        pairs[1500] = (pairs[1500][0], pairs[1500][1] - 1)
    elif case == "overlap":
        pairs.insert(3, pairs[1700])
    elif case == "hole":
        pairs.append((target.regions["anon"][1], target.regions["anon"][1] + PAGE))
    native, python = advise_both([agent, agent_py], target, pairs, **kwargs)
    assert native == python
    assert isinstance(native, bytes) == (case in ("every region", "anonymous", "file", "applied"))


# --------------------------------------------------------------- parsers

# Pieces of paths that exercise the UTF-8 validator: well-formed sequences
# of every length, overlongs, surrogates, values above U+10FFFF, stray
# continuation bytes and sequences cut short.
UTF8_PIECES = [
    b"a", b" ", b"[", b"\\", b"\x00", b"\x7f", b"\xc2\x80", b"\xdf\xbf", b"\xe0\xa0\x80", b"\xef\xbf\xbf",
    b"\xed\x9f\xbf", b"\xee\x80\x80", b"\xf0\x90\x80\x80", b"\xf4\x8f\xbf\xbf", b"\xc0\x80", b"\xc1\xbf",
    b"\xe0\x80\x80", b"\xe0\x9f\xbf", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf0\x80\x80\x80", b"\xf4\x90\x80\x80",
    b"\xf5\x80\x80\x80", b"\xff", b"\xfe", b"\x80", b"\xbf", b"\xc2", b"\xe2\x82", b"\xf0\x9f\x98",
]  # fmt: skip
BRACKETS = [b"[heap]", b"[stack]", b"[stack:12]", b"[anon:x y]", b"[vdso]", b"[vvar]", b"[vsyscall]", b"[", b"[]"]

path_bytes = st.one_of(
    st.just(b""),
    st.sampled_from(BRACKETS),
    st.lists(st.sampled_from(UTF8_PIECES) | st.binary(max_size=4), max_size=12).map(b"".join),
    st.text(max_size=12).map(str.encode),
).map(lambda p: p.replace(b"\n", b""))


def hex_field(bits: int, width: int) -> st.SearchStrategy[bytes]:
    return st.integers(0, (1 << bits) - 1).map(lambda v: b"%0*x" % (width, v))


@st.composite
def maps_line(draw: st.DrawFn) -> bytes:
    perms = bytes(draw(st.sampled_from(c)) for c in (b"r-", b"w-", b"x-", b"ps"))
    head = b"%s-%s %s %s %s:%s %d" % (
        draw(hex_field(64, 8)),
        draw(hex_field(64, 8)),
        perms,
        draw(hex_field(64, 8)),
        draw(hex_field(12, 2)),
        draw(hex_field(20, 2)),
        draw(st.integers(0, (1 << 64) - 1)),
    )
    path = draw(path_bytes)
    if path:
        return head + b" " * draw(st.integers(1, 30)) + path
    return head + draw(st.sampled_from([b"", b" "]))


KNOWN_KEYS = [k.decode() for k in SMAPS_KB_FIELDS]
OTHER_KEYS = ["Size", "Pss_Anon", "Pss_File", "Pss_Shmem", "ProtectionKey", "Unknown Key", "X"]


@st.composite
def smaps_field_line(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["kb", "other", "thp", "vmflags"]))
    space = draw(st.sampled_from([" ", "  ", "\t", "        "]))
    if kind == "kb":
        value = draw(st.integers(0, (1 << 64) // 1024 - 1))
        return f"{draw(st.sampled_from(KNOWN_KEYS))}:{space}{value} kB".encode()
    if kind == "other":
        return f"{draw(st.sampled_from(OTHER_KEYS))}:{space}{draw(st.integers(0, 1 << 70))} kB".encode()
    if kind == "thp":
        return f"THPeligible:{space}{draw(st.sampled_from(['0', '1', '2', '', '1 x']))}".encode()
    words = draw(st.lists(st.sampled_from(["rd", "wr", "ex", "mr", "mw", "me", "ac", "sd", "ht", "??"]), max_size=8))
    return f"VmFlags:{space}{' '.join(words)}{draw(st.sampled_from(['', ' ']))}".encode()


def maps_text(lines: list[bytes], newline_at_end: bool) -> bytes:
    return b"\n".join(lines) + (b"\n" if newline_at_end and lines else b"")


maps_texts = st.builds(maps_text, st.lists(maps_line(), max_size=8), st.booleans())
smaps_texts = st.builds(
    maps_text,
    st.lists(st.tuples(maps_line(), st.lists(smaps_field_line(), max_size=8)), max_size=6).map(
        lambda entries: [line for header, fields in entries for line in [header, *fields]]
    ),
    st.booleans(),
)


def parse_both(source: str, data: bytes) -> tuple[PyVmaTable, NativeVmaTable]:
    return getattr(PyVmaTable, f"from_{source}")(data), getattr(NativeVmaTable, f"from_{source}")(data)


def read_in_chunks(source: str, data: bytes, chunk: int) -> NativeVmaTable:
    """``data`` parsed by the native read loop, ``chunk`` bytes per read(2)
    (a regular file gives exactly that much), so lines and records are cut
    at every possible place."""
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        f.seek(0)
        return NativeVmaTable.from_fd(f.fileno(), source, chunk=chunk)


@pytest.mark.unprivileged
@settings(max_examples=400, deadline=None)
@given(data=maps_texts)
def test_maps_parsers_equal(data: bytes) -> None:
    assert_same(*parse_both("maps", data))


@pytest.mark.unprivileged
@settings(max_examples=400, deadline=None)
@given(data=smaps_texts)
def test_smaps_parsers_equal(data: bytes) -> None:
    assert_same(*parse_both("smaps", data))


@st.composite
def damaged(draw: st.DrawFn, texts: st.SearchStrategy[bytes]) -> bytes:
    """Well-formed text with bytes changed, cut out or put in."""
    data = bytearray(draw(texts))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        cut = draw(st.integers(0, 3))
        data[at : at + cut] = draw(st.binary(max_size=3) | st.sampled_from([b"\n", b" ", b":", b"-", b"f", b"9" * 25]))
    return bytes(data)


def assert_native_agrees_or_refuses(source: str, data: bytes) -> None:
    """Native accepts only what the reference accepts, and then agrees; on
    anything else it raises ValueError (the reference accepts a few forms
    the kernel never prints, like "+4" or "1_0", which native refuses)."""
    try:
        native = getattr(NativeVmaTable, f"from_{source}")(data)
    except ValueError:
        return
    assert_same(getattr(PyVmaTable, f"from_{source}")(data), native)


@pytest.mark.unprivileged
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=st.sampled_from(["maps", "smaps"]), data=st.binary(max_size=300) | damaged(maps_texts | smaps_texts))
def test_parsers_on_any_bytes(source: str, data: bytes) -> None:
    assert_native_agrees_or_refuses(source, data)


@pytest.mark.unprivileged
@pytest.mark.parametrize(
    ("source", "data"),
    [
        ("maps", b""),
        ("maps", b"\n\n\n"),
        ("maps", b"00400000-00401000 r-xp 00000000 08:01 42"),  # no space, no path
        ("maps", b"00400000-00401000 r-xp 00000000 08:01 42 "),
        ("maps", b"00400000-00401000 r-xp 00000000 08:01 42      /a path/with  spaces  \n"),
        ("maps", b"ffffffffffffffff-ffffffffffffffff rwxs ffffffffffffffff ffffffff:ffffffff 18446744073709551615 x"),
        ("maps", b"ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]\n"),
        ("smaps", b"Rss: 4 kB\n00400000-00401000 r-xp 00000000 08:01 42 /x\nRss: 8 kB\nSwap:\t16 kB\n"),
        ("smaps", b"00400000-00401000 r-xp 00000000 08:01 42 /x\nVmFlags: rd ex mr mw me \nTHPeligible:    1\n"),
        ("smaps", b"00400000-00401000 r-xp 00000000 08:01 42 /x\nRss: 18014398509481983 kB\n"),  # (2**64 - 1) // 1024
        ("smaps", b"00400000-00401000 r-xp 00000000 08:01 42 /x\nRss: 1 kB\nRss: 2 kB\nNo colon here\n"),
    ],
)
def test_parsers_equal_on_edge_cases(source: str, data: bytes) -> None:
    assert_same(*parse_both(source, data))


@pytest.mark.unprivileged
@pytest.mark.parametrize(
    ("source", "data", "line"),
    [
        ("maps", b"00400000-00401000 r-xp 00000000 08:01\n", 1),  # a field short
        ("maps", b"\n00400000 r-xp 00000000 08:01 42\n", 2),  # no end address
        ("maps", b"10000000000000000-0 r-xp 0 0:0 0", 1),  # more than 64 bits
        ("maps", b"0-0 r-xp 0 100000000:0 0", 1),  # a device number above 32 bits
        ("maps", b"0-0 r-xp 0 0:0 18446744073709551616", 1),  # an inode above 64 bits
        ("maps", b"0-0 r-\xffp 0 0:0 0", 1),  # perms not ASCII
        ("smaps", b"0-0 r-xp 0 0:0 0\nRss: 18014398509481984 kB\n", 2),  # bytes above 64 bits
        ("smaps", b"0-0 r-xp 0 0:0 0\nSwap: kB\n", 2),
        ("smaps", b"Pss: x kB\n", 1),  # checked even before the first VMA, as the reference does
        ("smaps", b"0-0 r-xp 0 0:0 0\nVmFlags: rd \xe2\x9c\x93\n", 2),
    ],
)
def test_native_refuses_malformed_text(source: str, data: bytes, line: int) -> None:
    with pytest.raises(ValueError, match=f"line {line}$"):
        getattr(NativeVmaTable, f"from_{source}")(data)
    # The reference refuses it too, sooner (parsing) or later (packing or encoding).
    with pytest.raises((ValueError, IndexError, struct.error)):
        table = getattr(PyVmaTable, f"from_{source}")(data)
        table.layout_records()
        table.encode(ATTR_RESIDENCY | ATTR_ACCOUNTING)


READ_CHUNKS = st.sampled_from([0, 1, 2, 3, 7, 61, 4096])
well_formed = st.tuples(st.just("maps"), maps_texts) | st.tuples(st.just("smaps"), smaps_texts)


@pytest.mark.unprivileged
@settings(max_examples=300, deadline=None)
@given(text=well_formed, chunk=READ_CHUNKS)
def test_reads_in_chunks_parse_as_the_whole(text: tuple[str, bytes], chunk: int) -> None:
    source, data = text
    assert_same(getattr(PyVmaTable, f"from_{source}")(data), read_in_chunks(source, data, chunk))


@pytest.mark.unprivileged
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    source=st.sampled_from(["maps", "smaps"]),
    data=st.binary(max_size=300) | damaged(maps_texts | smaps_texts),
    chunk=READ_CHUNKS,
)
def test_reads_in_chunks_refuse_as_the_whole(source: str, data: bytes, chunk: int) -> None:
    def outcome(parse: Callable[[], NativeVmaTable]) -> NativeVmaTable | str:
        try:
            return parse()
        except ValueError as exc:
            return str(exc)

    whole = outcome(lambda: getattr(NativeVmaTable, f"from_{source}")(data))
    chunked = outcome(lambda: read_in_chunks(source, data, chunk))
    if isinstance(whole, str) or isinstance(chunked, str):
        assert chunked == whole  # the same bad line
    else:
        assert_same(whole, chunked)


@pytest.mark.unprivileged
@pytest.mark.parametrize("chunk", [0, 4096])
def test_a_line_longer_than_the_read_buffer(chunk: int) -> None:
    data = b"7f0000000000-7f0000001000 r--p 00000000 08:01 7 /%s\n7f0000001000-7f0000002000 rw-p 00000000 00:00 0\n" % (
        b"long/" * 40_000
    )
    assert_same(PyVmaTable.from_maps(data), read_in_chunks("maps", data, chunk))


@pytest.mark.unprivileged
@given(path=st.lists(st.sampled_from(UTF8_PIECES) | st.binary(max_size=6), max_size=20).map(b"".join))
def test_paths_escaped_as_python_escapes_them(path: bytes) -> None:
    assume(b"\n" not in path)
    line = b"7f0000000000-7f0000001000 rw-p 00000000 00:00 0      " + path
    assert_same(*parse_both("maps", line))


# ----------------------------------------------------------- the build


def _build_command(build: str, tmp_path: Path) -> list[str]:
    """A developer's build in place (the extension is all it makes), or a package build told that
    the agent needs it (VMCTL_NATIVE=required: make setup, the container image) from the files the
    container build copies. Without VMCTL_NATIVE a package builds pure Python instead
    (tests/test_packaging.py)."""
    if build == "in-place":
        return [sys.executable, str(PACKAGE / "backends" / "native" / "csrc" / "build.py")]
    root, sources = PACKAGE.parent.parent, tmp_path / "sources"
    shutil.copytree(root / "src", sources / "src", ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(root / name, sources / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    return [*pip_wheel, "-w", str(tmp_path), str(sources)]


@pytest.mark.parametrize("build", ["in-place", "package"])
@pytest.mark.parametrize("cc", ["vmctl-no-such-compiler", ""], ids=["missing", "empty"])
def test_a_build_that_needs_the_extension_says_when_there_is_no_compiler(cc: str, build: str, tmp_path: Path) -> None:
    env = dict(os.environ, CC=cc, VMCTL_NATIVE="required")
    result = subprocess.run(
        _build_command(build, tmp_path), env=env, capture_output=True, text=True, check=False, timeout=600
    )
    assert result.returncode != 0
    assert (
        "vmctl needs a C compiler (cc/gcc) to build its native extension; install gcc / build-essential"
        in result.stdout + result.stderr
    )
    assert not list(tmp_path.glob("*.whl"))


@pytest.mark.unprivileged
def test_missing_extension_is_a_helpful_import_error(tmp_path: Path) -> None:
    shutil.copytree(PACKAGE, tmp_path / "vmctl_server", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    result = subprocess.run(
        [sys.executable, "-c", "import vmctl_server.backends.native.tables"],
        env=dict(os.environ, PYTHONPATH=str(tmp_path)),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "ImportError: vmctl's native extension (vmctl_server.backends.native._native) is not built" in result.stderr
    assert "--no-native" in result.stderr


# ---- the layout from PROCMAP_QUERY equals the layout from the maps text ------------------------


def query_tail() -> bytes:
    reader = SnapshotReader(NativeVmaTable, SourceSupport())
    if reader.layout_query.tail is None:
        pytest.skip(f"no PROCMAP_QUERY layout here: {reader.layout_query.problem}")
    return reader.layout_query.tail


def test_layout_from_procmap_query_equals_the_maps_text(target: Target) -> None:
    """Both back-ends' PROCMAP_QUERY loops give the table the maps text gives: the same
    wire bytes on every mask, the same layout records, on paths with spaces, a newline
    (which maps escapes as \\012), bad UTF-8, memfd, shared anonymous and named memory,
    and the gate VMA added from the tail."""
    tail = query_tail()
    text = NativeVmaTable.read(target.pid, "maps")
    for queried in (NativeVmaTable.query(target.pid, tail), PyVmaTable.query(target.pid, tail)):
        assert queried.filled_mask == 0
        assert queried.layout_records() == text.layout_records()
        for mask in ALL_MASKS:
            assert queried.encode(mask) == text.encode(mask), f"mask {mask}"
    assert_same(PyVmaTable.query(target.pid, tail), NativeVmaTable.query(target.pid, tail))
    assert b"\\012" in target.read("maps")  # the newline case is really there


def test_layout_records_without_file_names_equal_the_maps_text(target: Target) -> None:
    """The cookie check's loop (names=False: file VMAs not asked their paths, the others asked
    again for their kind) gives the same layout records, and such a table encodes nothing."""
    tail = query_tail()
    text = NativeVmaTable.read(target.pid, "maps").layout_records()
    for backend in (NativeVmaTable, PyVmaTable):
        records_only = backend.query(target.pid, tail, names=False)
        assert records_only.layout_records() == text
        with pytest.raises(ValueError, match="layout records alone"):
            records_only.encode(0)
        with pytest.raises(ValueError, match="layout records alone"):
            records_only.encode_chunks(0, 1 << 20)


def test_the_cookie_digest_does_not_depend_on_the_source(target: Target) -> None:
    """A snapshot's layout digest (what the cookie signs) and its reply are the same whether
    the layout came from PROCMAP_QUERY or from the maps text, on either back-end, and the
    check AdviseRanges makes (read_layout) reads the same records."""
    query_tail()
    digests, replies = set(), set()
    for backend in (NativeVmaTable, PyVmaTable):
        for layout_query in (True, False):
            reader = SnapshotReader(backend, SourceSupport(layout_query=layout_query))
            assert (reader.layout_query.tail is not None) == layout_query
            snapshot = reader.take(target.pid, 0)
            digests.add(snapshot.digest)
            digests.add(layout_digest(reader.read_layout(target.pid)))
            replies.add(snapshot.table.encode(0))
    assert len(digests) == 1 and len(replies) == 1


def test_procmap_query_of_a_process_that_is_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    for backend in (NativeVmaTable, PyVmaTable):
        with pytest.raises(ProcessGone):
            backend.query(proc.pid, b"")


@pytest.mark.unprivileged
def test_a_malformed_tail_is_refused() -> None:
    with pytest.raises(ValueError, match="line 1"):
        NativeVmaTable.query(os.getpid(), b"not a maps line\n")

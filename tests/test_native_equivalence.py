"""The native (C) tables and advice loop give exactly what the pure-Python
reference gives: on real, stopped target processes, and on synthetic and
arbitrary /proc text (hypothesis)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vmctl_client.proto import vmctl_pb2 as pb
from vmctl_server import _native, syscalls
from vmctl_server.attrs import ATTR_ACCOUNTING, ATTR_BUILD_ID, ATTR_RESIDENCY
from vmctl_server.errors import ProcessGone
from vmctl_server.nativetable import NativeVmaTable, advise_segments
from vmctl_server.pytable import SMAPS_KB_FIELDS, PyVmaTable

PAGE = os.sysconf("SC_PAGE_SIZE")
ALL_MASKS = range(16)
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


def test_kernel_structs_match_the_reference() -> None:
    for name in ("struct iovec", "struct procmap_query", "struct page_region", "struct pm_scan_arg"):
        fields = [field for field, _ in syscalls.ffi.typeof(name).fields]
        assert _native.ffi.sizeof(name) == syscalls.ffi.sizeof(name)
        assert [_native.ffi.offsetof(name, f) for f in fields] == [syscalls.ffi.offsetof(name, f) for f in fields]


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
    [(syscalls.MADV_COLD, errno.EINVAL), (syscalls.MADV_WILLNEED, 0)],
    ids=["cold", "willneed"],
)
def test_advice_loops_equal(target: Target, advice: int, locked_errno: int) -> None:
    segments = advice_segments(target)
    hole = segments[1281]
    assert not any(r["start"] < hole[1] and hole[0] < r["end"] for r in PyVmaTable.from_maps(target.read("maps")).rows)
    pidfd = syscalls.pidfd_open(target.pid)
    try:
        reference = syscalls.advise_segments(pidfd, segments, advice)
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
        pidfd = syscalls.pidfd_open(proc.pid)
        proc.kill()
        proc.wait()
        segments = [target.regions["anon"], target.regions["spaces"], target.regions["locked"]]
        reference = syscalls.advise_segments(pidfd, segments, syscalls.MADV_COLD)
        native = advise_segments(pidfd, segments, syscalls.MADV_COLD)
    finally:
        if pidfd >= 0:
            os.close(pidfd)
        proc.kill()
        proc.wait()
    assert native == reference == syscalls.AdviseOutcome([0, 0, 0], [errno.ESRCH] * 3, 1)


def test_advice_with_no_segments() -> None:
    assert advise_segments(-1, [], syscalls.MADV_COLD) == syscalls.advise_segments(-1, [], syscalls.MADV_COLD)


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


@settings(max_examples=400, deadline=None)
@given(data=maps_texts)
def test_maps_parsers_equal(data: bytes) -> None:
    assert_same(*parse_both("maps", data))


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


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=st.sampled_from(["maps", "smaps"]), data=st.binary(max_size=300) | damaged(maps_texts | smaps_texts))
def test_parsers_on_any_bytes(source: str, data: bytes) -> None:
    assert_native_agrees_or_refuses(source, data)


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


@settings(max_examples=300, deadline=None)
@given(text=well_formed, chunk=READ_CHUNKS)
def test_reads_in_chunks_parse_as_the_whole(text: tuple[str, bytes], chunk: int) -> None:
    source, data = text
    assert_same(getattr(PyVmaTable, f"from_{source}")(data), read_in_chunks(source, data, chunk))


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


@pytest.mark.parametrize("chunk", [0, 4096])
def test_a_line_longer_than_the_read_buffer(chunk: int) -> None:
    data = b"7f0000000000-7f0000001000 r--p 00000000 08:01 7 /%s\n7f0000001000-7f0000002000 rw-p 00000000 00:00 0\n" % (
        b"long/" * 40_000
    )
    assert_same(PyVmaTable.from_maps(data), read_in_chunks("maps", data, chunk))


@given(path=st.lists(st.sampled_from(UTF8_PIECES) | st.binary(max_size=6), max_size=20).map(b"".join))
def test_paths_escaped_as_python_escapes_them(path: bytes) -> None:
    assume(b"\n" not in path)
    line = b"7f0000000000-7f0000001000 rw-p 00000000 00:00 0      " + path
    assert_same(*parse_both("maps", line))


# ----------------------------------------------------------- the build


@pytest.mark.parametrize("cc", ["vmctl-no-such-compiler", ""], ids=["missing", "empty"])
def test_build_without_a_compiler_says_so(cc: str) -> None:
    env = dict(os.environ, CC=cc)
    result = subprocess.run(
        [sys.executable, str(PACKAGE / "csrc" / "build.py")], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert (
        "vmctl needs a C compiler (cc/gcc) to build its native extension; install gcc / build-essential"
        in result.stderr
    )


def test_missing_extension_is_a_helpful_import_error(tmp_path: Path) -> None:
    shutil.copytree(PACKAGE, tmp_path / "vmctl_server", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    result = subprocess.run(
        [sys.executable, "-c", "import vmctl_server.nativetable"],
        env=dict(os.environ, PYTHONPATH=str(tmp_path)),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "ImportError: vmctl's native extension (vmctl_server._native) is not built" in result.stderr
    assert "--no-native" in result.stderr

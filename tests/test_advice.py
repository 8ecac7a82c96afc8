"""AdviseRanges on real processes: the cookie, validation, filters, batching.

Tests that page anonymous memory out run over a zram swap device they set up
and remove, and every one of them has the target check its own memory byte
for byte afterwards.
"""

from __future__ import annotations

import os

import pytest
from support.expect import expect_error
from support.processes import PAGE

MiB = 1 << 20


def test_pageout_moves_anonymous_memory_to_swap_intact(any_client, target, zram_swap):
    start, end = target.map_anon(32 * MiB, seed=11)
    before = target.smaps_region(start)
    assert before["Rss"] == 32 * 1024 and before["Swap"] == 0
    swap_before = target.status_kb("VmSwap")

    info = any_client.get_vma_info(target.pid, attrs=["rss"])
    result = any_client.advise_ranges(target.pid, [(start, end)], "pageout", cookie=info.cookie)

    assert result.advised_bytes == result.requested_bytes == 32 * MiB
    assert result.syscalls == 1
    assert [(r.start, r.end, r.advised_bytes, r.error) for r in result.ranges] == [(start, end, 32 * MiB, "")]
    after = target.smaps_region(start)
    assert after["Swap"] >= 30 * 1024, after
    assert after["Rss"] <= 2 * 1024, after
    assert target.status_kb("VmSwap") - swap_before >= 30 * 1024
    target.verify()  # every byte comes back from zram as it was


def test_layout_change_refuses_the_old_cookie_and_advises_nothing(any_client, target, zram_swap):
    start, end = target.map_anon(8 * MiB, seed=5)
    info = any_client.get_vma_info(target.pid)
    target.map_anon(4 * PAGE, seed=6)  # a new VMA appears: the layout the cookie names is gone

    expect_error(
        lambda: any_client.advise_ranges(target.pid, [(start, end)], "pageout", cookie=info.cookie),
        "FAILED_PRECONDITION",
        "LAYOUT_CHANGED",
    )
    region = target.smaps_region(start)
    assert region["Swap"] == 0 and region["Rss"] == 8 * 1024
    target.verify()

    fresh = any_client.get_vma_info(target.pid)
    result = any_client.advise_ranges(target.pid, [(start, end)], "pageout", cookie=fresh.cookie)
    assert result.advised_bytes == 8 * MiB
    target.verify()


def test_cookie_after_exec_is_refused(any_client, target):
    info = any_client.get_vma_info(target.pid)
    target.call("exec")
    target._read()  # the new image says hello
    reimaged = any_client.get_vma_info(target.pid)
    heap = next(v for v in reimaged.vmas if v.path == "[heap]")
    assert reimaged.process.start_time == info.process.start_time  # exec keeps the start time...

    expect_error(  # ...but the cookie still knows the image changed
        lambda: any_client.advise_ranges(target.pid, [(heap.start, heap.end)], "cold", cookie=info.cookie),
        "FAILED_PRECONDITION",
        "PROCESS_CHANGED",
    )
    assert any_client.advise_ranges(target.pid, [heap], "cold", cookie=reimaged.cookie).advised_bytes == heap.size


def test_cookie_of_another_process_is_refused(client, spawn_target):
    first, second = spawn_target(), spawn_target()
    cookie = client.get_vma_info(first.pid).cookie
    heap = next(v for v in client.get_vma_info(second.pid).vmas if v.path == "[heap]")
    error = expect_error(
        lambda: client.advise_ranges(second.pid, [heap], "cold", cookie=cookie), "INVALID_ARGUMENT", "COOKIE_INVALID"
    )
    assert str(first.pid) in error.message


def test_every_edited_byte_of_a_cookie_is_refused(client, target):
    info = client.get_vma_info(target.pid)
    heap = next(v for v in info.vmas if v.path == "[heap]")
    for i in range(len(info.cookie)):
        edited = bytearray(info.cookie)
        edited[i] ^= 0x01
        expect_error(
            lambda edited=edited: client.advise_ranges(target.pid, [heap], "cold", cookie=bytes(edited)),
            "INVALID_ARGUMENT",
            "COOKIE_INVALID",
        )
    for mangled in (info.cookie[:-1], info.cookie + b"\0", b"\0" * len(info.cookie)):
        expect_error(
            lambda mangled=mangled: client.advise_ranges(target.pid, [heap], "cold", cookie=mangled),
            "INVALID_ARGUMENT",
            "COOKIE_INVALID",
        )
    expect_error(lambda: client.advise_ranges(target.pid, [heap], "cold"), "INVALID_ARGUMENT", "COOKIE_REQUIRED")
    assert client.advise_ranges(target.pid, [heap], "cold", cookie=info.cookie).advised_bytes == heap.size


def _gap_after(info) -> int:
    """An address in a hole of the layout (between two VMAs)."""
    for before, after in zip(info.vmas, info.vmas[1:], strict=False):
        if after.start - before.end >= 4 * PAGE:
            return before.end + PAGE
    raise AssertionError("no hole in the layout")


def test_invalid_ranges_are_refused_and_nothing_is_applied(any_client, target, zram_swap):
    start, end = target.map_anon(4 * MiB, seed=9)
    info = any_client.get_vma_info(target.pid)
    hole = _gap_after(info)
    valid = (start, end)
    cases = {
        "RANGE_UNALIGNED": [valid, (start + 1, end)],
        "RANGE_EMPTY": [valid, (start, start)],
        "RANGE_WRAPS": [valid, (end, start)],
        "RANGE_UNMAPPED": [valid, (hole, hole + PAGE)],
        "RANGE_OVERLAP": [valid, (start + PAGE, start + 2 * PAGE)],
        "NO_RANGES": [],
    }
    for reason, ranges in cases.items():
        error = expect_error(
            lambda ranges=ranges: any_client.advise_ranges(target.pid, ranges, "pageout", cookie=info.cookie),
            "INVALID_ARGUMENT",
            reason,
        )
        if ranges:
            assert error.metadata.get("field") == "ranges[1]", (reason, error.metadata)
    # A range running off the end of a mapping into a hole, and one beyond
    # any user address.
    last = info.vmas[len(info.vmas) - 2]  # below [vsyscall]
    for bad in [(last.start, last.end + PAGE), (1 << 47, (1 << 47) + PAGE), (2**64 - 2 * PAGE, 2**64 - PAGE)]:
        expect_error(
            lambda bad=bad: any_client.advise_ranges(target.pid, [valid, bad], "pageout", cookie=info.cookie),
            "INVALID_ARGUMENT",
            "RANGE_UNMAPPED",
        )
    expect_error(
        lambda: any_client.advise_ranges(target.pid, [valid], 99, cookie=info.cookie),
        "INVALID_ARGUMENT",
        "UNKNOWN_ADVICE",
    )
    expect_error(
        lambda: any_client.advise_ranges(target.pid, [valid], "pageout", cookie=info.cookie, filter=7),
        "INVALID_ARGUMENT",
        "UNKNOWN_FILTER",
    )
    region = target.smaps_region(start)
    assert region["Swap"] == 0 and region["Rss"] == 4 * 1024, "a refused request advised memory"
    target.verify()


def test_file_filter_advises_only_file_mappings(any_client, target, zram_swap, tmp_path):
    data = tmp_path / "data.bin"
    with open(data, "wb") as f:
        f.write(os.urandom(4 * MiB))
        f.flush()
        os.fsync(f.fileno())  # clean page cache: reclaimable at once
    anon_start, anon_end = target.map_anon(4 * MiB, seed=12)
    file_start, file_end = target.map_file(data, 4 * MiB)
    assert target.smaps_region(file_start)["Rss"] == 4 * 1024

    info = any_client.get_vma_info(target.pid)
    ranges = sorted([(anon_start, anon_end), (file_start, file_end)])
    result = any_client.advise_ranges(target.pid, ranges, "pageout", cookie=info.cookie, filter="file")

    by_start = {r.start: r for r in result.ranges}
    assert by_start[anon_start].advised_bytes == 0 and by_start[anon_start].skipped_bytes == 4 * MiB
    assert by_start[file_start].advised_bytes == 4 * MiB and by_start[file_start].skipped_bytes == 0
    assert result.advised_bytes == 4 * MiB and result.requested_bytes == 8 * MiB
    anon = target.smaps_region(anon_start)
    assert anon["Rss"] == 4 * 1024 and anon["Swap"] == 0, "the file filter touched anonymous memory"
    assert target.smaps_region(file_start)["Rss"] < 1024, "file pages were not reclaimed"
    target.verify()

    # And the other way round: the anonymous filter leaves the file alone.
    target.call("touch", start=file_start)
    info = any_client.get_vma_info(target.pid)
    result = any_client.advise_ranges(target.pid, ranges, "pageout", cookie=info.cookie, filter="anonymous")
    assert result.advised_bytes == 4 * MiB
    assert target.smaps_region(file_start)["Rss"] == 4 * 1024
    assert target.smaps_region(anon_start)["Swap"] >= 3 * 1024
    target.verify()


@pytest.mark.parametrize(("filter_", "advised_part"), [("anonymous", "anon"), ("file", "file"), ("none", "both")])
def test_one_range_over_two_kinds_is_split_by_filter(any_client, target, tmp_path, filter_, advised_part):
    data = tmp_path / "lib.bin"
    data.write_bytes(os.urandom(16 * PAGE))
    layout = target.call("map_file_then_anon", path=str(data), size=16 * PAGE, seed=21)
    info = any_client.get_vma_info(target.pid)
    kinds = {v.start: v.kind for v in info.vmas}
    assert kinds[layout["file_start"]] == "file" and kinds[layout["anon_start"]] == "anonymous"

    whole = (layout["file_start"], layout["end"])
    result = any_client.advise_ranges(target.pid, [whole], "cold", cookie=info.cookie, filter=filter_)
    part = 16 * PAGE
    expected = {"anon": part, "file": part, "both": 2 * part}[advised_part]
    assert result.advised_bytes == expected
    assert result.ranges[0].skipped_bytes == 2 * part - expected
    assert result.syscalls == 1
    target.verify()


def test_range_over_2gib_is_advised_completely_across_calls(any_client, target):
    size = (2 << 30) + 512 * MiB
    start, end = target.map_anon(size, seed=-1)  # untouched: no RAM needed
    info = any_client.get_vma_info(target.pid)
    result = any_client.advise_ranges(target.pid, [(start, end)], "cold", cookie=info.cookie)
    assert result.advised_bytes == size
    assert result.syscalls == 2  # MAX_RW_COUNT caps a call at 2 GiB - 4 KiB
    assert result.ranges[0].error == ""


def test_thousands_of_ranges_take_ceil_n_over_1024_calls(any_client, target):
    pages = 3000
    start, _end = target.map_anon(pages * PAGE, seed=2)
    info = any_client.get_vma_info(target.pid)
    ranges = [(start + i * PAGE, start + (i + 1) * PAGE) for i in range(pages)]
    result = any_client.advise_ranges(target.pid, ranges, "cold", cookie=info.cookie)
    assert result.syscalls == 3
    assert result.advised_bytes == pages * PAGE
    assert all(r.advised_bytes == PAGE and not r.error for r in result.ranges)
    target.verify()


def test_failing_range_reports_its_errno_and_the_rest_go_on(any_client, target, zram_swap):
    locked_start, locked_end = target.map_anon(16 * PAGE, seed=3)
    target.call("mlock", start=locked_start)
    free_start, free_end = target.map_anon(1 * MiB, seed=4)
    info = any_client.get_vma_info(target.pid)
    ranges = sorted([(locked_start, locked_end), (free_start, free_end)])
    result = any_client.advise_ranges(target.pid, ranges, "pageout", cookie=info.cookie)
    by_start = {r.start: r for r in result.ranges}
    assert by_start[locked_start].error == "EINVAL" and by_start[locked_start].advised_bytes == 0
    assert by_start[free_start].error == "" and by_start[free_start].advised_bytes == 1 * MiB
    assert result.syscalls == 2  # the failing iovec, then a resume after it
    assert target.smaps_region(locked_start)["Rss"] == 16 * PAGE // 1024
    target.verify()


def test_dry_run_reports_and_applies_nothing(any_client, target, zram_swap):
    start, end = target.map_anon(2 * MiB, seed=8)
    info = any_client.get_vma_info(target.pid)
    result = any_client.advise_ranges(target.pid, [(start, end)], "pageout", cookie=info.cookie, dry_run=True)
    assert result.dry_run and result.syscalls == 0
    assert result.advised_bytes == 2 * MiB
    region = target.smaps_region(start)
    assert region["Swap"] == 0 and region["Rss"] == 2 * 1024


def test_special_mappings_are_skipped_never_advised(client, target):
    info = client.get_vma_info(target.pid)
    vdso = next(v for v in info.vmas if v.path == "[vdso]")
    result = client.advise_ranges(target.pid, [vdso], "cold", cookie=info.cookie)
    assert result.advised_bytes == 0 and result.syscalls == 0
    assert result.ranges[0].skipped_bytes == vdso.size


@pytest.mark.parametrize("advice", ["cold", "willneed", "collapse", "pageout"])
def test_every_advice_is_accepted(any_client, target, advice):
    start, end = target.map_anon(4 * MiB, seed=13)
    info = any_client.get_vma_info(target.pid)
    result = any_client.advise_ranges(target.pid, [(start, end)], advice, cookie=info.cookie)
    # Collapsing into huge pages may fail for want of a free huge page; it
    # must still reach the kernel and leave the memory as it was.
    acceptable = ("", "EAGAIN", "ENOMEM") if advice == "collapse" else ("",)
    assert result.ranges[0].error in acceptable
    assert result.syscalls == 1
    target.verify()


def test_client_rejects_unknown_words_before_sending(client, target):
    with pytest.raises(ValueError, match="unknown advice"):
        client.advise_ranges(target.pid, [(0, PAGE)], "forget")
    with pytest.raises(ValueError, match="unknown attribute"):
        client.get_vma_info(target.pid, attrs=["nonsense"])

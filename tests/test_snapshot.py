"""GetVmaInfo against the kernel's own view of real processes."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest
from support.expect import expect_error
from support.processes import PAGE, process_state
from support.waiting import wait_for

from vmctl_api import vmctl_pb2 as pb

MAPS_LINE = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+) ?\s*(.*)$")


def read_maps(pid: int) -> list[dict]:
    with open(f"/proc/{pid}/maps", "rb") as f:
        lines = f.read().splitlines()
    entries = []
    for line in lines:
        m = MAPS_LINE.match(line)
        assert m, line
        entries.append(
            {
                "start": int(m[1], 16),
                "end": int(m[2], 16),
                "perms": m[3].decode(),
                "offset": int(m[4], 16),
                "dev_major": int(m[5], 16),
                "dev_minor": int(m[6], 16),
                "inode": int(m[7]),
                "path": m[8],
            }
        )
    return entries


SMAPS_FIELDS = {
    "Rss": "rss",
    "Swap": "swap",
    "Pss": "pss",
    "Pss_Dirty": "pss_dirty",
    "Referenced": "referenced",
    "Anonymous": "anonymous",
    "Shared_Clean": "shared_clean",
    "Shared_Dirty": "shared_dirty",
    "Private_Clean": "private_clean",
    "Private_Dirty": "private_dirty",
    "KSM": "ksm",
    "LazyFree": "lazy_free",
    "AnonHugePages": "anon_huge_pages",
    "ShmemPmdMapped": "shmem_pmd_mapped",
    "FilePmdMapped": "file_pmd_mapped",
    "Shared_Hugetlb": "shared_hugetlb",
    "Private_Hugetlb": "private_hugetlb",
    "SwapPss": "swap_pss",
    "Locked": "locked",
    "KernelPageSize": "kernel_page_size",
    "MMUPageSize": "mmu_page_size",
}


def read_smaps(pid: int) -> list[dict]:
    entries: list[dict] = []
    with open(f"/proc/{pid}/smaps", "rb") as f:
        for line in f.read().splitlines():
            m = MAPS_LINE.match(line)
            if m and not line.split(b" ", 1)[0].endswith(b":"):
                entries.append({"start": int(m[1], 16), "end": int(m[2], 16)})
                continue
            key, _, value = line.decode().partition(":")
            if key in SMAPS_FIELDS:
                entries[-1][SMAPS_FIELDS[key]] = int(value.split()[0]) * 1024
            elif key == "THPeligible":
                entries[-1]["thp_eligible"] = value.strip() == "1"
            elif key == "VmFlags":
                entries[-1]["vm_flags"] = value.strip()
    return entries


def snapshot_as_dicts(info, fields) -> list[dict]:
    return [{"start": v.start, "end": v.end, **{f: getattr(v, f) for f in fields}} for v in info.vmas]


def test_layout_equals_proc_maps(any_client, target, tmp_path):
    data_file = tmp_path / "data with spaces.bin"
    data_file.write_bytes(os.urandom(8 * PAGE))
    odd_name = tmp_path.as_posix().encode() + b"/bad-\xff\xfe-utf8"
    with open(odd_name, "wb") as f:
        f.write(os.urandom(PAGE))
    target.map_anon(16 * PAGE)
    target.map_file(data_file, 8 * PAGE)
    target.map_file(odd_name.decode(errors="surrogateescape"), PAGE, shared=True)
    with target.stopped():
        info = any_client.get_vma_info(target.pid)
        expected = read_maps(target.pid)

    assert info.result_mask == pb.VMA_ATTR_LAYOUT
    assert info.result_attrs == []
    assert info.process.pid == target.pid
    assert info.process.comm == pathlib.Path(f"/proc/{target.pid}/comm").read_text().strip()
    got = [
        {
            "start": v.start,
            "end": v.end,
            "perms": v.perms,
            "offset": v.offset,
            "dev_major": v.dev_major,
            "dev_minor": v.dev_minor,
            "inode": v.inode,
            "path": v.raw_path,
        }
        for v in info.vmas
    ]
    assert got == expected
    names = {v.path for v in info.vmas}
    assert str(data_file) in names
    assert (odd_name.decode("utf-8", "backslashreplace")) in names
    kinds = {v.path: v.kind for v in info.vmas}
    assert kinds["[heap]"] == "anonymous"
    assert kinds[str(data_file)] == "file"
    assert kinds["[vdso]"] == "special"
    # Layout only: no page-table walk was asked for, so no residency came back.
    assert all(v.message.rss_bytes == 0 and v.message.pss_bytes == 0 for v in info.vmas)


def _stable_smaps(pid: int, take) -> tuple[list[dict], object]:
    """smaps read before and after ``take()``; retried until the two agree, so
    a shared page's Pss moving under us (another process mapping libc) cannot
    make the comparison flaky."""
    for _ in range(10):
        before = read_smaps(pid)
        result = take()
        if read_smaps(pid) == before:
            return before, result
    pytest.fail("smaps never held still across a snapshot")


def test_accounting_equals_smaps(any_client, target):
    start, _end = target.map_anon(64 * PAGE, seed=7)
    with target.stopped():
        expected, info = _stable_smaps(target.pid, lambda: any_client.get_vma_info(target.pid, attrs=["accounting"]))
    assert info.result_mask == pb.VMA_ATTR_LAYOUT | pb.VMA_ATTR_RESIDENCY | pb.VMA_ATTR_ACCOUNTING
    fields = [*SMAPS_FIELDS.values(), "thp_eligible", "vm_flags"]
    assert snapshot_as_dicts(info, fields) == expected
    ours = next(v for v in info.vmas if v.start == start)
    assert ours.rss == ours.anonymous == ours.private_dirty == 64 * PAGE


def test_residency_equals_smaps_rss_and_swap(any_client, target):
    target.map_anon(32 * PAGE, seed=3)
    with target.stopped():
        expected, info = _stable_smaps(target.pid, lambda: any_client.get_vma_info(target.pid, attrs=["rss", "swap"]))
    assert info.result_mask == pb.VMA_ATTR_LAYOUT | pb.VMA_ATTR_RESIDENCY
    assert info.result_attrs == ["rss", "swap"]
    assert snapshot_as_dicts(info, ["rss", "swap"]) == [
        {"start": e["start"], "end": e["end"], "rss": e["rss"], "swap": e["swap"]} for e in expected
    ]
    # Residency alone must not carry accounting fields it never read.
    assert all(v.message.pss_bytes == 0 for v in info.vmas)


def test_build_ids_of_file_mappings(any_client, target):
    info = any_client.get_vma_info(target.pid, attrs=["build_id"])
    assert info.result_mask & pb.VMA_ATTR_BUILD_ID
    python_vmas = [v for v in info.vmas if v.path == os.path.realpath(sys.executable)]
    assert python_vmas and all(v.build_id == python_vmas[0].build_id for v in python_vmas)
    assert len(python_vmas[0].build_id) in (16, 20)  # an md5/sha1 GNU build id
    assert all(v.build_id == b"" for v in info.vmas if v.kind == "anonymous")


def test_unknown_attribute_bits_are_refused(client, target):
    expect_error(lambda: client.get_vma_info(target.pid, attrs=1 << 12), "INVALID_ARGUMENT", "UNKNOWN_ATTR")


@pytest.mark.parametrize("pid", [0, -1, 1 << 22, 2**31 - 1])
def test_invalid_pids_are_refused(client, pid):
    expect_error(lambda: client.get_vma_info(pid), "INVALID_ARGUMENT", "INVALID_PID")


def test_missing_process_is_not_found(client):
    proc = subprocess.Popen(["true"])
    proc.wait()
    expect_error(lambda: client.get_vma_info(proc.pid), "NOT_FOUND", "PROCESS_GONE")


def test_kernel_thread_has_no_address_space(client):
    with open("/proc/2/stat") as f:
        assert "(kthreadd)" in f.read()
    error = expect_error(
        lambda: client.get_vma_info(2, attrs=["accounting"]), "FAILED_PRECONDITION", "NO_ADDRESS_SPACE"
    )
    assert "kernel thread" in error.message


def test_zombie_is_gone(client):
    proc = subprocess.Popen(["true"])
    try:
        wait_for(lambda: process_state(proc.pid) == "Z", "the exited child to be a zombie (not reaped)")
        error = expect_error(lambda: client.get_vma_info(proc.pid), "NOT_FOUND", "PROCESS_GONE")
        assert "zombie" in error.message
    finally:
        proc.wait()


def test_process_exiting_during_reads_never_crashes_the_agent(client, spawn_target):
    """Snapshots race against exits; every answer is a snapshot or PROCESS_GONE."""
    for _ in range(20):
        victim = spawn_target()
        os.kill(victim.pid, signal.SIGKILL)
        try:
            client.get_vma_info(victim.pid, attrs=["accounting", "build_id"])
        except Exception as exc:
            assert getattr(exc, "reason", None) == "PROCESS_GONE", exc
        victim.kill()
    assert client.node_info().hostname  # the agent is still serving


@pytest.mark.slow
def test_process_at_max_map_count(any_client, target):
    limit = int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())
    reply = target.call("many_vmas", limit=limit)
    assert reply["vmas"] == limit
    with target.stopped():
        layout = any_client.get_vma_info(target.pid)
        expected = read_maps(target.pid)
        accounting = any_client.get_vma_info(target.pid, attrs=["accounting"])
        residency = any_client.get_vma_info(target.pid, attrs=["residency", "build_id"])
    assert len(layout.vmas) == len(expected)
    assert sum(1 for v in layout.vmas if v.path != "[vsyscall]") == limit
    assert [(v.start, v.end) for v in layout.vmas] == [(e["start"], e["end"]) for e in expected]
    assert len(accounting.vmas) == len(residency.vmas) == len(expected)
    inside = [v for v in residency.vmas if reply["start"] <= v.start < reply["end"]]
    assert len(inside) > limit - 200

"""Process activity in ListProcesses: CPU time, major faults, and the memory pressure of each cgroup.

What a controller compares between two samples to tell idle processes from
busy ones, and memory coming back in: real targets burning CPU or sitting
idle, memory paged out to zram and read back, cgroup v2 groups with PSI on
and off, and a real memory-pressure source (a cgroup v1 memory limit, where
this host has one, with zram swap).
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import pytest
from support import memcg_v1
from support.cgroup2 import CGROUP2, cgroup
from support.processes import PAGE, Target
from support.vmctl_cli import vmctl
from support.waiting import wait_for

from vmctl_client import Client, ProcessInfo

MiB = 1 << 20
TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")

needs_cgroup2 = pytest.mark.skipif(CGROUP2 is None, reason="no cgroup v2 hierarchy is mounted")


def listed(client: Client, *targets: Target) -> dict[int, ProcessInfo]:
    wanted = {t.pid for t in targets}
    found = {p.pid: p for p in client.list_processes() if p.pid in wanted}
    assert set(found) == wanted
    return found


def stat_fields(pid: int) -> list[int]:
    """/proc/PID/stat from its 3rd field on (the state's place holds 0): field N is at N - 3."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return [0, *map(int, fields[1:])]


def unique_name(what: str) -> str:
    return f"vmctl-{what}-{os.getpid()}-{time.monotonic_ns()}"


def test_a_busy_process_uses_cpu_time_and_an_idle_one_does_not(client, spawn_target):
    busy, idle = spawn_target(), spawn_target()
    busy.call("spin")
    first = listed(client, busy, idle)
    later = wait_for(
        lambda: (now := listed(client, busy, idle))[busy.pid].cpu_time_ns > first[busy.pid].cpu_time_ns and now,
        "the busy target's CPU time to advance",
    )
    assert later[idle.pid].cpu_time_ns == first[idle.pid].cpu_time_ns
    assert busy.call("rest")["spins"] > 0
    # user + system, the kernel's ticks in nanoseconds (an idle target may have been charged none:
    # ticks sample who runs, and a quick start can fall between them)
    stat = stat_fields(idle.pid)
    assert later[idle.pid].cpu_time_ns == (stat[14 - 3] + stat[15 - 3]) * TICK_NS
    assert later[busy.pid].cpu_time_ns % TICK_NS == 0


def test_major_faults_rise_when_paged_out_memory_comes_back(client, target, zram_swap):
    start, end = target.map_anon(16 * MiB, seed=21)
    info = client.get_vma_info(target.pid)
    assert client.advise_ranges(target.pid, [(start, end)], "pageout", cookie=info.cookie).advised_bytes
    swapped_kb = target.smaps_region(start)["Swap"]
    assert swapped_kb >= 15 * 1024
    before = listed(client, target)[target.pid].major_faults
    target.call("touch", start=start)  # read back in: a major fault per page from zram
    after = listed(client, target)[target.pid].major_faults
    assert after - before >= swapped_kb * 1024 // PAGE // 2, (before, after, swapped_kb)
    assert after == stat_fields(target.pid)[12 - 3]  # nothing faulted in since
    target.verify()


def pressure_total(path: str) -> int:
    """The "some" total of a cgroup's memory.pressure, as the kernel writes it now."""
    assert CGROUP2 is not None
    line = (CGROUP2 / path.lstrip("/") / "memory.pressure").read_text().splitlines()[0]
    return int(dict(pair.split("=") for pair in line.split()[1:])["total"])


@needs_cgroup2
def test_each_cgroups_memory_pressure_is_reported_once_and_absent_where_the_kernel_has_none(agent, spawn_target):
    watched, unwatched = spawn_target(), spawn_target()
    name = unique_name("psi")
    with cgroup(name), cgroup(f"{name}/on") as on, cgroup(f"{name}/off") as off:
        (off / "cgroup.pressure").write_text("0")  # PSI off in this group: its memory.pressure is gone
        assert not (off / "memory.pressure").exists()
        (on / "cgroup.procs").write_text(str(watched.pid))
        (off / "cgroup.procs").write_text(str(unwatched.pid))
        with agent.client() as client:
            low = pressure_total(f"/{name}/on")
            processes = {p.pid: p for p in client.list_processes(f"/{name}")}
            high = pressure_total(f"/{name}/on")
        assert set(processes) == {watched.pid, unwatched.pid}
        pressure = processes[watched.pid].cgroup_memory_pressure
        assert pressure is not None and low <= pressure["some"]["total_us"] <= high
        assert set(pressure) == {"some", "full"}
        assert processes[unwatched.pid].cgroup_memory_pressure is None  # absent, not zero
        document = json.loads(vmctl("--target", agent.address, "-o", "json", "ps", "--cgroup", f"/{name}").stdout)
        by_pid = {p["pid"]: p for p in document["processes"]}
        assert "cgroup_memory_pressure" in by_pid[watched.pid] and "cgroup_memory_pressure" not in by_pid[unwatched.pid]
        assert {"cpu_time_ns", "major_faults"} <= set(by_pid[unwatched.pid])
        table = vmctl("--target", agent.address, "-o", "wide", "ps", "--cgroup", f"/{name}").stdout.splitlines()
        headers = table[0].split()
        assert headers[-4:] == ["CPU", "MAJFLT", "CG_PSI10", "CGROUP"]
        rows = {row.split()[0]: row.split() for row in table[1:]}
        assert rows[str(unwatched.pid)][headers.index("CG_PSI10")] == "-"
        assert rows[str(watched.pid)][headers.index("CG_PSI10")] != "-"


@needs_cgroup2
@pytest.mark.skipif(not memcg_v1.available(), reason="no cgroup v1 memory controller to limit a process with")
def test_a_cgroup_thrashing_against_its_memory_limit_shows_pressure_and_an_idle_one_none(
    agent, spawn_target, zram_swap
):
    thrashing, idle = spawn_target(), spawn_target()
    name = unique_name("thrash")
    with cgroup(name) as path, cgroup(f"{name}-idle") as idle_path, memcg_v1.memory_limit(name, 32 * MiB) as limit:
        (path / "cgroup.procs").write_text(str(thrashing.pid))
        (idle_path / "cgroup.procs").write_text(str(idle.pid))
        (limit / "cgroup.procs").write_text(str(thrashing.pid))
        with agent.client() as client:
            first = listed(client, thrashing, idle)
            start, _ = thrashing.map_anon(64 * MiB, seed=22)  # twice the limit, read over and over
            thrashing.call("heat", start=start)
            stall = lambda: listed(client, thrashing, idle)[thrashing.pid].cgroup_memory_pressure  # noqa: E731
            wait_for(lambda: stall()["some"]["total_us"] > 100_000, "the thrashing cgroup to stall 100 ms")
            later = listed(client, thrashing, idle)
        thrashing.kill()  # its memory goes, and with it the swapping
    assert first[thrashing.pid].cgroup_memory_pressure["some"]["total_us"] < 100_000
    assert later[idle.pid].cgroup_memory_pressure["some"]["total_us"] == 0  # no stall at all
    assert later[thrashing.pid].major_faults > first[thrashing.pid].major_faults  # swapped back in, again and again

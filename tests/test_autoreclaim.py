"""`vmctl autoreclaim` and its library, on real processes in a real cgroup.

Idle targets (no CPU time) are paged out to zram and a busy one (a thread
spinning, a region read over and over) is spared; memory is checked byte for
byte after. Back-off is shown with real causes: host memory pressure from a
process thrashing against a cgroup v1 memory limit, and a paged-out process
reading its memory back in.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest
from support import memcg_v1
from support.agent_workout import free_tcp_port
from support.cgroup2 import CGROUP2, cgroup
from support.processes import Target
from support.vmctl_cli import VMCTL, usage_error, vmctl
from support.waiting import wait_for

from vmctl_client.autoreclaim import Action, AutoReclaimer, LoopSettings

MiB = 1 << 20

pytestmark = pytest.mark.skipif(CGROUP2 is None, reason="no cgroup v2 hierarchy is mounted")


def unique_name(what: str) -> str:
    return f"vmctl-loop-{what}-{os.getpid()}-{time.monotonic_ns()}"


def join(path, *targets: Target) -> None:
    for target in targets:
        (path / "cgroup.procs").write_text(str(target.pid))


def swapped_kb(target: Target, start: int) -> int:
    return target.smaps_region(start)["Swap"]


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_idle_processes_are_paged_out_and_the_busy_one_keeps_its_memory(agent, spawn_target, zram_swap):
    idle_a, idle_b, busy = spawn_target(), spawn_target(), spawn_target()
    regions = {t.pid: t.map_anon(16 * MiB, seed=i + 40) for i, t in enumerate((idle_a, idle_b, busy))}
    busy.call("spin")  # CPU time
    busy.call("heat", start=regions[busy.pid][0])  # and its memory in use
    name = unique_name("idle")
    tiny = subprocess.Popen(["sleep", "300"])  # idle, but nothing of 1M (--min-rss) resident: passed over
    try:
        with cgroup(name) as path:
            join(path, idle_a, idle_b, busy)
            (path / "cgroup.procs").write_text(str(tiny.pid))
            run = vmctl(
                "--target", agent.address, "autoreclaim", "--cgroup", f"/{name}", "--idle-seconds", "1",
                "--interval", "0.5", "--duration", "4", "-o", "json",
            )  # fmt: skip
    finally:
        tiny.kill()
        tiny.wait()
    assert run.returncode == 0, run.stderr
    lines = events(run.stdout)
    summary = lines[-1]
    assert summary["event"] == "summary" and summary["target"] == agent.address
    pageouts = {e["pid"]: e for e in lines if e["event"] == "pageout"}
    assert set(pageouts) == {idle_a.pid, idle_b.pid}  # once each: one idle period; nothing for tiny
    assert summary["pageouts"] == 2 and summary["steps"] >= 6 and summary["processes"] == 4
    assert not [e for e in lines if e.get("pid") == tiny.pid]
    for target in (idle_a, idle_b):
        event = pageouts[target.pid]
        assert event["cgroup"] == f"/{name}" and event["idle_seconds"] >= 1
        assert event["rss_before"] - event["rss_after"] >= 15 * MiB, event
        assert swapped_kb(target, regions[target.pid][0]) >= 15 * 1024
    assert swapped_kb(busy, regions[busy.pid][0]) == 0
    assert busy.smaps_region(regions[busy.pid][0])["Rss"] == 16 * 1024
    assert summary["paged_out_bytes"] == sum(e["rss_before"] - e["rss_after"] for e in pageouts.values())
    busy.call("cool", start=regions[busy.pid][0])
    busy.call("rest")
    for target in (idle_a, idle_b, busy):
        target.verify()


def test_a_dry_run_on_two_agents_decides_on_each_and_moves_nothing(agent, agent_py, spawn_target, zram_swap):
    idle = spawn_target()
    start, _ = idle.map_anon(8 * MiB, seed=44)
    name = unique_name("dry")
    with cgroup(name) as path:
        join(path, idle)
        run = vmctl(
            "--target", agent.address, "--target", agent_py.address, "autoreclaim", "--cgroup", f"/{name}",
            "--idle-seconds", "0.5", "--interval", "0.25", "--duration", "1.5", "--dry-run", "-o", "json",
        )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = events(run.stdout)
    pageouts = {e["target"]: e for e in lines if e["event"] == "pageout"}
    assert sorted(pageouts) == sorted([agent.address, agent_py.address])  # one loop per agent
    assert [e["target"] for e in lines if e["event"] == "summary"] == [agent.address, agent_py.address]
    for pageout in pageouts.values():
        assert pageout["dry_run"] is True and pageout["pid"] == idle.pid and pageout["vmas"] >= 1
    assert swapped_kb(idle, start) == 0 and idle.smaps_region(start)["Rss"] == 8 * 1024
    idle.verify()


def test_a_process_whose_memory_comes_back_is_left_alone(agent, spawn_target, zram_swap):
    target = spawn_target()
    start, _ = target.map_anon(16 * MiB, seed=45)
    name = unique_name("refault")
    seen: list[Action] = []
    settings = LoopSettings(cgroups=(f"/{name}",), idle_seconds=0.5, interval=0.25, backoff_seconds=60)
    with cgroup(name) as path, agent.client() as client:
        join(path, target)
        loop = AutoReclaimer(client, settings, on_action=seen.append)
        wait_for(lambda: loop.step() or any(a.event == "pageout" for a in seen), "the idle target's pageout")
        assert swapped_kb(target, start) >= 15 * 1024
        target.call("touch", start=start)  # all of it faulted back in from zram: major faults
        loop.step()
        (backoff,) = [a for a in seen if a.event == "backoff"]
        assert backoff.pid == target.pid and backoff.details["reason"] == "refault"
        assert backoff.details["refaulted_bytes"] >= 15 * MiB  # the region read back (of all that was paged out)
        time.sleep(1.0)  # idle again, for twice the idle period: left alone all the same
        loop.step()
        loop.step()
    assert [a.event for a in seen] == ["pageout", "backoff"]
    assert loop.summary.backoffs == 1 and loop.summary.pageouts == 1
    assert swapped_kb(target, start) == 0
    target.verify()


def test_busy_processes_get_cold_advice_for_what_they_did_not_touch(agent, spawn_target):
    """Two busy targets, each with a region it reads over and over and one it leaves alone: the
    loop samples both and advises cold exactly the untouched regions."""
    busy = [spawn_target(), spawn_target()]
    regions = {}
    for i, target in enumerate(busy):
        hot, _ = target.map_anon(8 * MiB, seed=46 + 2 * i)
        regions[target.pid] = (hot, target.map_anon(8 * MiB, seed=47 + 2 * i))
        target.call("spin")
        target.call("heat", start=hot)
    name = unique_name("cold")
    seen: list[Action] = []
    settings = LoopSettings(cgroups=(f"/{name}",), idle_seconds=5, interval=0.25, cold_unaccessed=True, window=0.5)
    with cgroup(name) as path, agent.client() as client:
        join(path, *busy)
        loop = AutoReclaimer(client, settings, on_action=seen.append)
        wait_for(
            lambda: loop.step() or {a.pid for a in seen if a.event == "cold"} == {t.pid for t in busy},
            "cold advice for both busy targets",
        )
    for target in busy:
        target.call("cool", start=regions[target.pid][0])
        target.call("rest")
    cold = {a.pid: a for a in seen if a.event == "cold"}
    for target in busy:
        hot, (cold_start, cold_end) = regions[target.pid]
        ranges = cold[target.pid].details["ranges"]
        assert [cold_start, cold_end] in ranges
        assert not any(start <= hot < end for start, end in ranges)
        assert cold[target.pid].details["cold_bytes"] >= 8 * MiB
        target.verify()
    assert loop.summary.pageouts == 0 and loop.summary.cold_advices == 2  # once each: one sample per idle-seconds


@pytest.mark.skipif(not memcg_v1.available(), reason="no cgroup v1 memory controller to make real pressure with")
def test_no_pageout_starts_while_the_host_is_under_memory_pressure(agent, spawn_target, zram_swap):
    """A real source: a process reading 96 MiB over and over under a 32 MiB limit stalls in reclaim."""
    thrashing, idle = spawn_target(), spawn_target()
    start, _ = idle.map_anon(8 * MiB, seed=48)
    name = unique_name("pressure")
    with cgroup(name) as path, memcg_v1.memory_limit(name, 32 * MiB) as limit, agent.client() as client:
        (limit / "cgroup.procs").write_text(str(thrashing.pid))
        thrash, _ = thrashing.map_anon(96 * MiB, seed=49)
        thrashing.call("heat", start=thrash)
        threshold = 2.0
        host_some = lambda: client.node_info().memory_pressure["some"]["avg10"]  # noqa: E731
        wait_for(lambda: host_some() > 2 * threshold, "the host's memory PSI to rise", timeout=60)
        join(path, idle)
        seen: list[Action] = []
        settings = LoopSettings(cgroups=(f"/{name}",), idle_seconds=0.5, interval=0.25, max_pressure=threshold)
        loop = AutoReclaimer(client, settings, on_action=seen.append)
        for _ in range(6):  # 1.5 s: the idle target is idle long enough, twice over
            loop.step()
            time.sleep(0.25)
        assert host_some() > threshold, "the pressure fell during the test; it proves nothing"
        thrashing.kill()
    assert seen and seen[0].event == "hold" and seen[0].details["pressure_some_avg10"] > threshold
    assert not any(a.event == "pageout" for a in seen)
    assert loop.summary.holds >= 6 and swapped_kb(idle, start) == 0
    idle.verify()


def test_sigterm_stops_the_loop_with_a_summary_and_metrics_are_served_meanwhile(agent):
    name, port = unique_name("stop"), free_tcp_port()
    argv = ["autoreclaim", "--cgroup", f"/{name}", "--interval", "0.2", "--metrics-listen", f"127.0.0.1:{port}"]
    with cgroup(name):
        loop = subprocess.Popen(
            [*VMCTL, "--target", agent.address, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            first = loop.stdout.readline()  # type: ignore[union-attr]  # written once SIGTERM is handled
            assert first.split()[2] == "start:", first
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
                exposition = reply.read().decode()
            loop.send_signal(signal.SIGTERM)
            stdout, stderr = loop.communicate(timeout=30)
        finally:
            if loop.poll() is None:
                loop.kill()
                loop.wait()
    assert loop.returncode == 0, stderr
    assert "summary:" in stdout.splitlines()[-1] and " 0 processes" in stdout, stdout
    assert f'vmctl_autoreclaim_actions_total{{event="start",target="{agent.address}"}} 1.0' in exposition
    assert "_created" not in exposition


@pytest.mark.unprivileged
@pytest.mark.parametrize(
    ("args", "why"),
    [
        ((), "the following arguments are required: --cgroup"),
        (("--cgroup", "app"), "is not a cgroup v2 path"),
        (("--cgroup", "/app", "--window", "0.01"), "the shortest window"),
        (("--cgroup", "/app", "--max-pressure", "150"), "a percentage from 0 to 100"),
        (("--cgroup", "/app", "--interval", "0"), "must be a positive number"),
        (("--cgroup", "/app", "-o", "yaml"), "invalid choice: 'yaml'"),
        (("--cgroup", "/app", "--metrics-listen", "localhost"), "has no port"),
    ],
)
def test_usage_errors(args, why):
    assert why in usage_error(vmctl("autoreclaim", *args))


@pytest.mark.unprivileged
def test_settings_are_checked_for_library_callers_too():
    with pytest.raises(ValueError, match="at least one cgroup"):
        LoopSettings(cgroups=())
    with pytest.raises(ValueError, match="percentage"):
        LoopSettings(cgroups=("/a",), max_pressure=-1)

"""Access sampling (VMA_ATTR_ACCESS, ``accessed``): which VMAs a process touched during a window.

Real targets with a hot region (a thread of the target reads it over and
over) and a cold one (written once, before the window), each its own VMA;
the agent clears the referenced bits with /proc/PID/clear_refs, waits the
window on its event loop and reads smaps. When a window has begun is seen
from outside, the way the agent's clear shows: a probe region touched
before the call loses its Referenced bytes.

The kernel clears the accessed bits without flushing the TLB, so a page
touched through a translation the CPU still caches is not seen: a region
touched once is counted in part (in one run here, 436 KiB of a 1 MiB region
read right after it was written), one touched over and over in full. So a
region touched once is made large (TOUCHED: far more pages than a TLB
holds) and counted as "more than half", against 0 had its bits been cleared.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import pytest
from support.agents import write_policy
from support.audit_lines import audit_records
from support.expect import expect_error
from support.peers import NOBODY, ConnectAs
from support.processes import Target
from support.vmctl_cli import usage_error, vmctl
from support.waiting import wait_for

from vmctl_api import vmctl_pb2 as pb
from vmctl_api import vmctl_pb2_grpc as pb_grpc
from vmctl_api.words import ATTR_ACCESS, ATTR_LAYOUT
from vmctl_client import AsyncClient, Client, RetryPolicy

MiB = 1 << 20
REGION = 8 * MiB
TOUCHED = 32 * MiB
NO_RETRY = RetryPolicy(attempts=1)


def regions(target: Target) -> tuple[tuple[int, int], tuple[int, int]]:
    """A hot region (heated: read over and over by a thread of the target) and a cold one."""
    hot, cold = target.map_anon(REGION, seed=11), target.map_anon(REGION, seed=12)
    target.call("heat", start=hot[0])
    return hot, cold


def vma_at(info, start: int):
    return next(v for v in info.vmas if v.start == start)


def window_began(target: Target, probe_start: int) -> None:
    """Wait until the agent has cleared ``target``'s referenced bits: the probe
    region, touched before the call and not since, shows none referenced."""
    wait_for(lambda: target.smaps_region(probe_start)["Referenced"] == 0, "the sampler's clear_refs")


def test_the_hot_vma_was_accessed_and_the_cold_was_not(any_client, target):
    (hot_start, hot_end), (cold_start, cold_end) = regions(target)
    info = any_client.get_vma_info(target.pid, attrs=("accessed",), window=0.5)
    assert "accessed" in info.result_attrs and "referenced" in info.result_attrs  # smaps came along
    hot, cold = vma_at(info, hot_start), vma_at(info, cold_start)
    assert hot.accessed >= 0.95 * (hot_end - hot_start), hot.accessed
    assert cold.accessed == 0 and cold.rss == cold_end - cold_start  # resident, and untouched in the window
    assert all(v.accessed == v.referenced for v in info.vmas)
    # The cookie is good: the cold VMA is advised with it.
    result = any_client.advise_ranges(target.pid, [(cold_start, cold_end)], "cold", cookie=info.cookie)
    assert result.advised_bytes == cold_end - cold_start
    assert target.call("cool", start=hot_start)["passes"] > 0
    target.verify()


def test_the_cookie_is_the_one_after_the_window_and_new_vmas_count_as_read(client, target):
    probe = target.map_anon(MiB, seed=1)
    before = client.get_vma_info(target.pid)
    with ThreadPoolExecutor(1) as pool:
        sampling = pool.submit(client.get_vma_info, target.pid, ("access",), window=3)
        window_began(target, probe[0])
        born = target.map_anon(2 * MiB, seed=2)  # mapped (and written) inside the window
        info = sampling.result()
    assert vma_at(info, born[0]).accessed == 2 * MiB
    assert vma_at(info, probe[0]).accessed == 0
    expect_error(
        lambda: client.advise_ranges(target.pid, [probe], "cold", cookie=before.cookie),
        "FAILED_PRECONDITION",
        "LAYOUT_CHANGED",
    )
    assert client.advise_ranges(target.pid, [probe], "cold", cookie=info.cookie).advised_bytes == MiB


def test_samplers_of_one_process_take_turns_and_a_window_holds_no_worker(start_agent, spawn_target):
    """One worker: had a window held it, nothing else could run meanwhile."""
    agent = start_agent("--workers", "1")
    first, second = spawn_target(), spawn_target()
    probes = {t.pid: t.map_anon(MiB, seed=3) for t in (first, second)}
    late = first.map_anon(TOUCHED, seed=4)
    with agent.client() as client, ThreadPoolExecutor(3) as pool:
        long_window: Future = pool.submit(client.get_vma_info, first.pid, ("accessed",), window=5)
        window_began(first, probes[first.pid][0])
        # Meanwhile, on the one worker: another process sampled, and a plain read.
        other = client.get_vma_info(second.pid, ("accessed",), window=0.2)
        assert vma_at(other, probes[second.pid][0]).accessed == 0
        assert client.list_processes() and not long_window.done()
        # Touched after the first sampler's clear: it must count it. A second sampler
        # of the same process, had it cleared now, would have erased it.
        first.call("touch", start=late[0])
        finished: list[str] = []
        long_window.add_done_callback(lambda _: finished.append("first"))
        short_window = pool.submit(client.get_vma_info, first.pid, ("accessed",), window=0.2)
        short_window.add_done_callback(lambda _: finished.append("second"))
        assert vma_at(long_window.result(), late[0]).accessed > TOUCHED / 2
        assert vma_at(short_window.result(), late[0]).accessed == 0  # its window came after the touch
    assert finished == ["first", "second"]
    samples = audit_records(agent.log(), "sample")
    assert [(r["pid"], r["window_ms"]) for r in samples] == [(first.pid, 5000), (second.pid, 200), (first.pid, 200)]


def test_a_sampler_that_cannot_have_its_turn_in_time_clears_nothing(client, target):
    probe, other = target.map_anon(MiB, seed=5), target.map_anon(TOUCHED, seed=6)
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(client.get_vma_info, target.pid, ("accessed",), window=4)
        window_began(target, probe[0])
        target.call("touch", start=other[0])
        # Its window fits its deadline, but not after waiting for the holder's.
        with Client(client.target, timeout=0.5, retry=NO_RETRY) as hurried:
            expect_error(
                lambda: hurried.get_vma_info(target.pid, ("accessed",), window=0.5),
                "RESOURCE_EXHAUSTED",
                "SAMPLER_BUSY",
            )
        assert vma_at(holder.result(), other[0]).accessed > TOUCHED / 2  # nothing cleared it meanwhile


def test_a_sampler_whose_caller_goes_away_gives_its_turn_back(agent, target):
    probe = target.map_anon(MiB, seed=13)
    with grpc.insecure_channel(agent.address) as channel:
        request = pb.GetVmaInfoRequest(pid=target.pid, attr_mask=ATTR_ACCESS, access_window_ms=60_000)
        abandoned = pb_grpc.VmControlStub(channel).GetVmaInfo.future(request, timeout=120)
        window_began(target, probe[0])
        abandoned.cancel()
    # Its turn would last a minute more; this sampler waits 5 s at most, then is refused SAMPLER_BUSY.
    with Client(agent.address, timeout=5, retry=NO_RETRY) as client:
        assert vma_at(client.get_vma_info(target.pid, ("accessed",), window=0.2), probe[0]).accessed == 0


def test_a_process_that_execs_during_the_window_is_process_changed(client, target):
    probe = target.map_anon(MiB, seed=7)
    with ThreadPoolExecutor(1) as pool:
        sampling = pool.submit(client.get_vma_info, target.pid, ("accessed",), window=3)
        window_began(target, probe[0])
        target.call("exec")
        expect_error(sampling.result, "FAILED_PRECONDITION", "PROCESS_CHANGED")


def _raw_sample(agent, pid: int, mask: int, window_ms: int, timeout: float = 30) -> None:
    """GetVmaInfo as the bytes say, past the client's own checks."""
    with grpc.insecure_channel(agent.address) as channel:
        request = pb.GetVmaInfoRequest(pid=pid, attr_mask=mask, access_window_ms=window_ms)
        pb_grpc.VmControlStub(channel).GetVmaInfo(request, timeout=timeout)


@pytest.mark.parametrize(
    ("mask", "window_ms", "timeout"),
    [
        (ATTR_ACCESS, 0, 30),  # accessed without a window
        (ATTR_ACCESS, 99, 30),  # below the shortest
        (ATTR_ACCESS, 60_001, 90),  # above the longest
        (ATTR_ACCESS, 2**32 - 1, 90),
        (ATTR_LAYOUT, 500, 30),  # a window without accessed
        (ATTR_ACCESS, 5_000, 2),  # longer than the call's deadline
    ],
    ids=["no window", "too short", "too long", "uint32 max", "without accessed", "beyond the deadline"],
)
def test_windows_out_of_bounds_are_refused_and_clear_nothing(agent, target, mask, window_ms, timeout):
    probe = target.map_anon(MiB, seed=8)
    with pytest.raises(grpc.RpcError) as caught:
        _raw_sample(agent, target.pid, mask, window_ms, timeout)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The same through the client, whose deadline (here a fixed instant) is the same too.
    with Client(agent.address, deadline=time.monotonic() + timeout, retry=NO_RETRY) as client:
        error = expect_error(
            lambda: client.get_vma_info(target.pid, mask, window=window_ms / 1000 or None),
            "INVALID_ARGUMENT",
            "INVALID_WINDOW",
        )
    assert error.metadata == {"field": "access_window_ms"}
    assert target.smaps_region(probe[0])["Referenced"] == 1024  # never cleared


def test_the_clients_deadline_covers_the_window(agent, target):
    hot, _ = regions(target)
    with Client(agent.address, timeout=1, retry=NO_RETRY) as client:
        assert vma_at(client.get_vma_info(target.pid, ("accessed",), window=1.5), hot[0]).accessed

    async def sample() -> int:
        async with AsyncClient(agent.address, timeout=1, retry=NO_RETRY) as aclient:
            info = await aclient.get_vma_info(target.pid, ("accessed",), window=1.5, stream=True)
            return vma_at(info, hot[0]).accessed

    assert asyncio.run(sample()) >= 0.95 * REGION


def test_sampling_takes_leave_to_advise_cold_and_spares_protected_processes(start_agent, target, public_dir):
    comm = pathlib.Path(f"/proc/{target.pid}/comm").read_text().strip()
    policy = write_policy(
        public_dir,
        f"""
protected_pids: [{target.pid}]
rules:
  - name: reader
    identities: ["uid:{NOBODY}"]
    verbs: [read]
    targets: {{comm: ["{comm}"]}}
  - name: pageouter
    identities: ["uid:{NOBODY}"]
    verbs: [advise]
    advices: [pageout]
  - name: root
    identities: ["uid:0"]
    verbs: [read, advise]
""",
    )
    agent = start_agent("--socket-mode", "0666", "--policy", policy, socket_dir=public_dir)
    probe = target.map_anon(MiB, seed=9)
    with ConnectAs(agent.socket_path, NOBODY) as nobody, Client(nobody.address, retry=NO_RETRY) as client:
        assert client.get_vma_info(target.pid, ("rss",)).process.pid == target.pid  # it may read
        error = expect_error(
            lambda: client.get_vma_info(target.pid, ("accessed",), window=0.2), "PERMISSION_DENIED", "POLICY_DENIED"
        )
        assert "advise it cold" in error.message and error.metadata["advice"] == "cold"
    with agent.client(retry=NO_RETRY) as root:
        error = expect_error(
            lambda: root.get_vma_info(target.pid, ("accessed",), window=0.2), "PERMISSION_DENIED", "PROTECTED_TARGET"
        )
        assert error.metadata["protection"] == "protected_pids"
    assert target.smaps_region(probe[0])["Referenced"] == 1024  # nobody cleared it
    assert audit_records(agent.log(), "sample") == []


# ---- the CLI -------------------------------------------------------------------------------


def test_vmctl_maps_samples_over_a_window(agent, target):
    hot, cold = regions(target)
    run = vmctl("--target", agent.address, "maps", str(target.pid), "--attrs", "accessed", "--window", "0.5")
    assert run.returncode == 0, run.stderr
    header = next(line for line in run.stdout.splitlines() if line.startswith("RANGE"))
    assert header.split() == ["RANGE", "PERMS", "OFFSET", "DEV", "INODE", "ACCESSED", "PATH"]
    run = vmctl("--target", agent.address, "-o", "json", "maps", str(target.pid), "--attrs", "accessed",
                "--window", "0.5")  # fmt: skip
    document = json.loads(run.stdout)
    by_start = {v["start"]: v for v in document["vmas"]}
    assert by_start[hot[0]]["accessed"] >= 0.95 * REGION and by_start[cold[0]]["accessed"] == 0
    assert "accessed" in document["result_attrs"]


@pytest.mark.unprivileged
@pytest.mark.parametrize(
    ("args", "why"),
    [
        (("--attrs", "accessed"), "--attrs accessed samples over a window: give --window SECONDS"),
        (("--attrs", "rss,access"), "--attrs accessed samples over a window"),
        (("--window", "1"), "--window is the sampling window of --attrs accessed"),
        (("--attrs", "accessed", "--window", "0.05"), "the shortest window is 0.1 s"),
        (("--attrs", "accessed", "--window", "61"), "must be a positive number up to 60"),
        (("--attrs", "accessed", "--window", "nan"), "must be a positive number"),
    ],
)
def test_a_window_and_accessed_go_together_on_the_command_line(args, why):
    line = usage_error(vmctl("maps", "1", *args, env={"VMCTL_TARGET": ""}))
    assert line.startswith("vmctl maps: error: ") and why in line, line

"""The library: Client and AsyncClient against real agents, typed views,
deadlines, retries, Fleet fan-out, target lists, and the reclaim workflow.

Retries and deadlines are checked against a real gRPC server that answers
UNAVAILABLE or never answers on purpose (``Misbehaving``): the faults a
restarting or overloaded agent produces, on the wire, with the calls counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from support.agents import Agent
from support.cgroup2 import cgroup
from support.expect import expect_error
from support.processes import PAGE

from vmctl_api import vmctl_pb2 as pb
from vmctl_api import vmctl_pb2_grpc as pb_grpc
from vmctl_client import (
    AsyncClient,
    Client,
    Fleet,
    InvalidRequestError,
    ProcessChangedError,
    ProcessGoneError,
    RetryPolicy,
    StaleCookieError,
    VmctlError,
)
from vmctl_client.reclaim import reclaim, reclaim_process
from vmctl_client.targets import expand_targets, parse_dns_target, read_targets_file, split_targets
from vmctl_client.types import LAYOUT_WORDS, WORD_GROUP, VmaList

FAST_RETRY = RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.05)


# ---- a gRPC server that fails on purpose -----------------------------------------


class Misbehaving(pb_grpc.VmControlServicer):
    """Reads fail UNAVAILABLE ``failures`` times, then answer; advice always
    fails UNAVAILABLE; ListProcesses hangs until released or cancelled.
    Counts every call."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}
        self.release = threading.Event()
        self._lock = threading.Lock()

    def _count(self, method: str) -> int:
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            return self.calls[method]

    def GetNodeInfo(self, request, context):
        if self._count("GetNodeInfo") <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return pb.GetNodeInfoResponse(hostname="misbehaving")

    def AdviseRanges(self, request, context):
        self._count("AdviseRanges")
        context.abort(grpc.StatusCode.UNAVAILABLE, "overloaded")

    def ListProcesses(self, request, context):
        self._count("ListProcesses")
        # Until released, or the caller gives up (its deadline cancels the call).
        while context.is_active() and not self.release.wait(0.02):
            pass
        return pb.ListProcessesResponse()


@pytest.fixture
def misbehaving(tmp_path):
    """(servicer, [addresses]): one server listening on four sockets, so a
    fleet can count it as four hosts."""

    def start(failures: int = 0) -> tuple[Misbehaving, list[str]]:
        servicer = Misbehaving(failures)
        server = grpc.server(ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_VmControlServicer_to_server(servicer, server)
        addresses = [f"unix://{tmp_path}/misbehaving-{i}.sock" for i in range(4)]
        for address in addresses:
            server.add_insecure_port(address)
        server.start()
        started.append((servicer, server))
        return servicer, addresses

    started: list[tuple[Misbehaving, grpc.Server]] = []
    try:
        yield start
    finally:
        for servicer, server in started:
            servicer.release.set()
            server.stop(0)


# ---- Client and AsyncClient: one API -----------------------------------------------


def test_async_client_answers_like_the_sync_client(agent, target):
    start, end = target.map_anon(8 * PAGE, seed=11)
    exited = subprocess.Popen(["true"])
    exited.wait()
    exited = exited.pid
    with agent.client() as sync:
        expected = sync.get_vma_info(target.pid, ("rss",))
        processes = {p.pid: p.comm for p in sync.list_processes()}
        hostname = sync.node_info().hostname

    async def use() -> None:
        async with AsyncClient(agent.address) as c:
            info = await c.get_vma_info(target.pid, ("rss",))
            assert info.process == expected.process
            assert info.result_attrs == expected.result_attrs
            assert [(v.start, v.end, v.path, v.rss) for v in info.vmas] == [
                (v.start, v.end, v.path, v.rss) for v in expected.vmas
            ]
            ours = next(v for v in info.vmas if v.start == start)
            result = await c.advise_ranges(target.pid, [ours], "cold", cookie=info.cookie_b64)
            assert (result.advised_bytes, result.syscalls) == (end - start, 1)
            assert target.pid in {p.pid for p in await c.list_processes()} and target.pid in processes
            assert (await c.node_info()).hostname == hostname

            with pytest.raises(InvalidRequestError) as bad:
                await c.advise_ranges(target.pid, [(start + 1, end)], "cold", cookie=info.cookie)
            assert bad.value.reason == "RANGE_UNALIGNED" and bad.value.metadata["field"] == "ranges[0]"
            target.map_anon(PAGE, seed=12)
            with pytest.raises(StaleCookieError) as stale:
                await c.advise_ranges(target.pid, [(start, end)], "cold", cookie=info.cookie)
            assert (stale.value.code, stale.value.reason) == ("FAILED_PRECONDITION", "LAYOUT_CHANGED")
            with pytest.raises(ProcessGoneError):
                await c.get_vma_info(exited)

    asyncio.run(use())
    target.verify()


def test_views_read_every_field_of_the_reply(client, target):
    target.map_anon(4 * PAGE, seed=13)
    info = client.get_vma_info(target.pid, "all")
    assert isinstance(info.vmas, VmaList) and len(info.vmas) == len(info.reply.vmas)
    kinds = {pb.VMA_KIND_ANONYMOUS: "anonymous", pb.VMA_KIND_FILE: "file", pb.VMA_KIND_SPECIAL: "special"}
    for vma, message in zip(info.vmas, info.reply.vmas, strict=True):
        assert vma.message == message
        for word in LAYOUT_WORDS:
            expected = kinds[message.kind] if word == "kind" else getattr(message, word)
            assert getattr(vma, word) == expected, word
        for word in WORD_GROUP:
            if word not in LAYOUT_WORDS:
                field = word if word in ("build_id", "thp_eligible", "vm_flags") else f"{word}_bytes"
                assert getattr(vma, word) == getattr(message, field), word
    assert info.vmas[-1].end == info.reply.vmas[-1].end and len(info.vmas[1:3]) == 2
    with pytest.raises(AttributeError):
        _ = info.vmas[0].no_such_attribute

    (me,) = [p for p in client.list_processes() if p.pid == target.pid]
    assert (me.rss, me.swap) == (me.rss_bytes, me.swap_bytes) and me.rss > 0
    document = me.to_json()
    assert set(document) - {"cgroup_memory_pressure"} == {
        "pid",
        "start_time",
        "comm",
        "cgroup",
        "container_id",
        "uid",
        "ppid",
        "rss",
        "swap",
        "vma_count",
        "cpu_time_ns",
        "major_faults",
    }
    assert document.get("cgroup_memory_pressure") == me.cgroup_memory_pressure  # where the agent read one
    node = client.node_info()
    assert node.mem_total == node.mem_total_bytes > 0
    assert set(node.advice_names) == {"cold", "pageout", "willneed", "collapse"}
    assert node.to_json()["capabilities"]["advices"] == node.advice_names


def test_friendly_arguments_are_checked_before_anything_is_sent(client, target):
    with pytest.raises(ValueError, match="unknown advice"):
        client.advise_ranges(target.pid, [(0, PAGE)], "evaporate")
    with pytest.raises(ValueError, match="unknown filter"):
        client.advise_ranges(target.pid, [(0, PAGE)], "cold", filter="purple")
    with pytest.raises(ValueError, match="unknown attribute"):
        client.get_vma_info(target.pid, "rss,colour")


# ---- deadlines and retries ------------------------------------------------------------


def test_reads_are_retried_on_unavailable_and_advice_never(misbehaving):
    servicer, (address, *_) = misbehaving(failures=2)
    with Client(address, retry=FAST_RETRY) as c:
        assert c.node_info().hostname == "misbehaving"
        assert servicer.calls["GetNodeInfo"] == 3  # two refusals, then the answer
        expect_error(lambda: c.advise_ranges(1, [(0, PAGE)], "cold", cookie=b"x"), "UNAVAILABLE")
        assert servicer.calls["AdviseRanges"] == 1


def test_retries_stop_after_the_policy_s_attempts(misbehaving):
    servicer, (address, *_) = misbehaving(failures=100)
    with Client(address, retry=FAST_RETRY) as c:
        expect_error(c.node_info, "UNAVAILABLE")
    assert servicer.calls["GetNodeInfo"] == FAST_RETRY.attempts

    async def use() -> None:
        async with AsyncClient(address, retry=FAST_RETRY) as c:
            with pytest.raises(VmctlError) as caught:
                await c.node_info()
            assert caught.value.code == "UNAVAILABLE"
            with pytest.raises(VmctlError):
                await c.advise_ranges(1, [(0, PAGE)], "cold", cookie=b"x")

    asyncio.run(use())
    assert servicer.calls["GetNodeInfo"] == 2 * FAST_RETRY.attempts
    assert servicer.calls["AdviseRanges"] == 1


def test_every_call_has_a_deadline(misbehaving):
    servicer, (address, *_) = misbehaving()
    with Client(address, timeout=0.5) as c:
        error = expect_error(c.list_processes, "DEADLINE_EXCEEDED")
        assert address in error.message
    with Client(address, deadline=time.monotonic() - 1) as late:
        expect_error(late.node_info, "DEADLINE_EXCEEDED")
    assert "GetNodeInfo" not in servicer.calls  # past its deadline, nothing was sent


def test_a_read_finds_an_agent_that_starts_while_it_retries(tmp_path):
    address = f"unix://{tmp_path}/late.sock"
    agent = Agent([], tmp_path)

    def start_later() -> None:
        time.sleep(0.3)
        with open(agent.log_path, "ab") as log:
            agent.proc = subprocess.Popen(
                [sys.executable, "-m", "vmctl_server.agent", "--listen", address], stdout=log, stderr=log
            )

    starter = threading.Thread(target=start_later)
    starter.start()
    try:
        patient = RetryPolicy(attempts=1000, initial_backoff=0.05, max_backoff=0.2)
        with Client(address, retry=patient, timeout=60) as c:
            assert c.node_info().hostname == socket.gethostname()
    finally:
        starter.join()
        agent.stop()
        agent.discard_log()


# ---- Fleet ------------------------------------------------------------------------------


def test_fleet_reports_each_host_and_no_host_holds_up_the_others(agent, misbehaving, tmp_path):
    _, (hanging, *_) = misbehaving()
    dead = f"unix://{tmp_path}/dead.sock"
    fleet = Fleet([agent.address, f"{dead},{hanging}"], host_deadline=2.0, retry=FAST_RETRY)
    assert fleet.targets == [agent.address, dead, hanging]
    seen: list[str] = []
    results = fleet.run(lambda c: c.list_processes(), on_done=lambda r: seen.append(r.target))
    assert sorted(seen) == sorted(fleet.targets)
    good, down, slow = results
    assert good.ok and good.value and down.error is not None and slow.error is not None
    assert (good.target, down.target, slow.target) == (agent.address, dead, hanging)
    assert down.error.code == "UNAVAILABLE" and "no vmctl agent answers" in down.error.message
    assert slow.error.code == "DEADLINE_EXCEEDED"

    async def listing(c: AsyncClient) -> int:
        return len(await c.list_processes())

    good, down, slow = asyncio.run(fleet.run_async(listing))
    assert good.ok and good.value > 0
    assert (down.error.code, slow.error.code) == ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_fleet_host_deadline_bounds_the_whole_operation_not_each_call(misbehaving):
    _, addresses = misbehaving()

    async def hang_in_python(c: AsyncClient) -> None:
        await asyncio.sleep(60)  # no gRPC call to time out: only the host deadline can end it

    (result,) = asyncio.run(Fleet(addresses[:1], host_deadline=0.5).run_async(hang_in_python))
    assert result.error is not None and result.error.code == "DEADLINE_EXCEEDED"


def test_fleet_keeps_to_its_concurrency_limit(misbehaving):
    servicer, addresses = misbehaving()
    fleet = Fleet(addresses, host_deadline=0.5, concurrency=2)
    lock = threading.Lock()
    running = {"now": 0, "most": 0}

    @contextlib.contextmanager
    def counted():
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
        try:
            yield
        finally:
            with lock:
                running["now"] -= 1

    def listing(c: Client) -> object:
        with counted():
            return c.list_processes()

    assert all(r.error.code == "DEADLINE_EXCEEDED" for r in fleet.run(listing))
    assert servicer.calls["ListProcesses"] == 4 and running["most"] == 2

    async def listing_async(c: AsyncClient) -> object:
        with counted():
            return await c.list_processes()

    running["most"] = 0
    assert all(r.error.code == "DEADLINE_EXCEEDED" for r in asyncio.run(fleet.run_async(listing_async)))
    assert servicer.calls["ListProcesses"] == 8 and running["most"] == 2


def test_an_exception_in_the_operation_is_that_host_s_error(agent, tmp_path):
    other = f"unix://{tmp_path}/x.sock"

    def op(c: Client) -> str:
        if c.target == other:
            raise RuntimeError("controller bug")
        return c.node_info().hostname

    ok, failed = Fleet([agent.address, other]).run(op)
    assert ok.value == socket.gethostname()
    assert failed.error is not None and failed.error.code == "UNKNOWN" and "controller bug" in failed.error.message


# ---- targets ------------------------------------------------------------------------------


def test_targets_from_lists_files_and_dns(tmp_path):
    assert split_targets(["a:1,b:2", " c:3 ", "", "d:4,"]) == ["a:1", "b:2", "c:3", "d:4"]
    listing = tmp_path / "targets"
    listing.write_text("# the fleet\nhost-a:7443\n\nhost-b:7443, host-c:7443  # rack 2\n   # gone: host-d:7443\n")
    assert read_targets_file(str(listing)) == ["host-a:7443", "host-b:7443", "host-c:7443"]
    assert expand_targets(["dns:///localhost:7443", "x:1", "127.0.0.1:7443"]) == [
        *expand_targets(["dns:///localhost:7443"]),
        "x:1",
    ]
    assert "127.0.0.1:7443" in expand_targets(["dns:///localhost:7443"])
    assert expand_targets(["dns:localhost:9"]) == expand_targets(["dns://8.8.8.8/localhost:9"])
    unresolvable = "dns:///no-such-host.invalid:7443"
    assert expand_targets([unresolvable]) == [unresolvable]  # left to fail as its own host
    for bad in ("dns:///nameonly", "dns:///:80", "dns:///host:port"):
        with pytest.raises(ValueError):
            parse_dns_target(bad)


# ---- reclaim ---------------------------------------------------------------------------------


class LayoutMovingClient(Client):
    """A real client whose first ``moves`` snapshots are made stale: right
    after each, the target maps a new page, so the agent sees a real layout
    change when the cookie comes back."""

    def __init__(self, address: str, target, moves: int) -> None:
        super().__init__(address)
        self.target, self.moves = target, moves

    def get_vma_info(self, pid, attrs=None, *, timeout=None):
        info = super().get_vma_info(pid, attrs, timeout=timeout)
        if self.moves > 0:
            self.moves -= 1
            self.target.map_anon(PAGE, seed=-1)
        return info


def test_reclaim_reads_again_when_the_layout_moves(agent, target):
    start, end = target.map_anon(32 * PAGE, seed=21)
    with LayoutMovingClient(agent.address, target, moves=2) as c:
        outcome = reclaim_process(c, target.pid, advice="cold", retries=3, scope="whole")
    assert outcome.attempts == 3 and outcome.status == "done"
    assert outcome.advised_bytes >= end - start and outcome.syscalls == 1
    assert any(r.start <= start and end <= r.end for r in outcome.ranges)
    assert outcome.rss_before >= 32 * PAGE and outcome.rss_after > 0
    target.verify()


def test_reclaim_gives_up_after_its_retries(agent, target):
    target.map_anon(8 * PAGE, seed=22)
    with LayoutMovingClient(agent.address, target, moves=100) as c, pytest.raises(StaleCookieError) as caught:
        reclaim_process(c, target.pid, advice="cold", retries=2, scope="whole")
    assert caught.value.reason == "LAYOUT_CHANGED"
    assert c.moves == 100 - 3  # three snapshots: the first and two retries


def test_reclaim_chooses_by_filter_and_min_rss(client, target, tmp_path):
    start, end = target.map_anon(64 * PAGE, seed=23)
    data = tmp_path / "data"
    data.write_bytes(b"f" * (16 * PAGE))
    file_start, file_end = target.map_file(data, 16 * PAGE)
    big = reclaim(client, pid=target.pid, advice="cold", min_rss=64 * PAGE, dry_run=True)
    (entry,) = big.processes
    assert any(r.start == start and r.end == end for r in entry.ranges)
    assert all(r.end - r.start >= 64 * PAGE for r in entry.ranges) and big.syscalls == 0
    files = reclaim(client, pid=target.pid, advice="cold", filter="file", dry_run=True)
    assert any(r.start == file_start and r.end == file_end for r in files.processes[0].ranges)
    assert not any(r.start == start for r in files.processes[0].ranges)
    nothing = reclaim(client, pid=target.pid, advice="cold", min_rss=1 << 50)
    assert nothing.processes[0].vmas_chosen == 0 and nothing.syscalls == 0 and nothing.advised_bytes == 0
    with pytest.raises(ValueError):
        reclaim(client, pid=target.pid, cgroup="/")


def test_reclaim_leaves_a_reused_pid_alone(client, target):
    with pytest.raises(ProcessChangedError):
        reclaim_process(client, target.pid, advice="cold", start_time=1)


def test_reclaim_of_a_cgroup_pages_out_its_members(client, spawn_target, zram_swap, tmp_path):
    members = [spawn_target(), spawn_target()]
    outsider = spawn_target()
    regions = [t.map_anon(256 * PAGE, seed=30 + i) for i, t in enumerate([*members, outsider])]
    with cgroup(f"vmctl-test-reclaim-{tmp_path.name}") as group:
        for member in members:
            (group / "cgroup.procs").write_text(str(member.pid))
        outsider_swap = outsider.smaps_region(regions[2][0])["Swap"]
        report = reclaim(client, cgroup=f"/{group.name}", advice="pageout")
        assert sorted(p.pid for p in report.processes) == sorted(m.pid for m in members)
        for outcome in report.processes:
            assert outcome.status == "done" and outcome.attempts == 1
            assert outcome.swap_after - outcome.swap_before >= 256 * PAGE
            assert outcome.rss_before - outcome.rss_after >= 256 * PAGE
        data = report.to_json()
        assert data["advised_bytes"] == sum(p.advised_bytes for p in report.processes)
        assert data["swap_after"] > data["swap_before"] and data["rss_after"] < data["rss_before"]
        assert {r["pid"] for r in data["ranges"]} == {m.pid for m in members}
        assert outsider.smaps_region(regions[2][0])["Swap"] == outsider_swap  # not in the cgroup: untouched
        for member in [*members, outsider]:
            member.verify()

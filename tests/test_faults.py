"""Faults: processes that exit, exec or are replaced under the agent's feet,
an agent stopped under load, and clients that vanish mid-call.

Covered elsewhere, not repeated here: a target that execs between read and
advice (test_advice.py::test_cookie_after_exec_is_refused), an agent
restarted with and without --cookie-key-file
(test_agent.py::test_cookie_key_file_keeps_cookies_valid_across_restarts),
one in-flight call across SIGTERM (test_agent.py), processes exiting during
snapshots (test_snapshot.py).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import threading

import pytest
from support.audit_lines import audit_records
from support.expect import expect_error
from support.pidns import PidNamespace
from support.scrape import Scrape, logged_port
from support.waiting import wait_for

from vmctl_client import VmctlError
from vmctl_client.calls import RetryPolicy

MiB = 1 << 20
NO_RETRY = RetryPolicy(attempts=1)


def test_pid_reuse_inside_a_pid_namespace_refuses_the_old_cookie(zram_swap):
    """The same pid, a different process: made exact with ns_last_pid."""
    with PidNamespace() as ns:
        agent = ns.start_agent()
        pid = 31337
        with agent.client() as client:
            old, second = ns.reuse_pid(client, pid)
            old_stack = next(v for v in old.vmas if v.path == "[stack]")
            start, end = second.map_anon(4 * MiB, seed=9)
            assert second.pid == pid
            error = expect_error(
                lambda: client.advise_ranges(pid, [(start, end), old_stack], "pageout", cookie=old.cookie),
                "FAILED_PRECONDITION",
                "PROCESS_CHANGED",
            )
            assert f"pid {pid} is now another process" in error.message
            region = second.smaps_region(start)
            assert region["Rss"] == 4 * 1024 and region["Swap"] == 0, "the new process was advised"
            second.verify()
            fresh = client.get_vma_info(pid)
            assert fresh.process.start_time > old.process.start_time
            assert client.advise_ranges(pid, [(start, end)], "pageout", cookie=fresh.cookie).advised_bytes == 4 * MiB
            second.verify()
        records = audit_records(agent.log())
        assert [(r["pid"], r["reason"], r["cookie"]) for r in records] == [
            (pid, "PROCESS_CHANGED", "process_changed"),
            (pid, "", "valid"),
        ]


def test_pid_1_is_never_advised():
    with PidNamespace() as ns:
        agent = ns.start_agent()
        target = ns.spawn_target()
        with agent.client() as client:
            for pid in (1, target.pid):
                info = client.get_vma_info(pid)  # pid 1 may be read
                stack = next(v for v in info.vmas if v.path == "[stack]")
                if pid == 1:
                    error = expect_error(
                        lambda info=info, stack=stack: client.advise_ranges(1, [stack], "cold", cookie=info.cookie),
                        "PERMISSION_DENIED",
                        "PROTECTED_TARGET",
                    )
                    assert error.metadata["protection"] == "pid 1 (init)" and error.metadata["comm"] == "sleep"
                else:
                    assert client.advise_ranges(pid, [stack], "cold", cookie=info.cookie).syscalls == 1


def test_target_killed_mid_advise_is_reported_never_crashes(start_agent, spawn_target, zram_swap):
    """SIGKILL lands while the agent is paging the target out. Whatever the
    moment, the answer is the truth: all advised, part advised with ESRCH on
    the rest, or refused because the process is gone or its layout emptied."""
    agent = start_agent()
    seen: set[str] = set()
    with agent.client(retry=NO_RETRY) as client:
        for delay in (0.0, 0.005, 0.01, 0.02, 0.04, 0.08):
            target = spawn_target()
            start, end = target.map_anon(128 * MiB, seed=12)
            info = client.get_vma_info(target.pid)
            chunk = 32 << 10
            ranges = [(a, a + chunk) for a in range(start, end, chunk)]  # 4,096 ranges: 4 calls
            killer = threading.Timer(delay, target.proc.kill)
            killer.start()
            try:
                result = client.advise_ranges(target.pid, ranges, "pageout", cookie=info.cookie)
            except VmctlError as error:
                assert (error.code, error.reason) in {
                    ("NOT_FOUND", "PROCESS_GONE"),
                    ("FAILED_PRECONDITION", "LAYOUT_CHANGED"),
                    ("FAILED_PRECONDITION", "PROCESS_CHANGED"),
                }, error
                seen.add(error.reason)
            else:
                errors = [r.error for r in result.ranges]
                if all(not e for e in errors):
                    seen.add("complete")
                    assert result.advised_bytes == 128 * MiB
                else:
                    seen.add("partial")
                    first = errors.index("ESRCH")  # everything after the death is ESRCH, nothing advised
                    assert all(e == "ESRCH" for e in errors[first + 1 :])
                    assert all(r.advised_bytes == 0 for r in result.ranges[first + 1 :])
                    assert result.advised_bytes == sum(r.advised_bytes for r in result.ranges)
            finally:
                killer.join()
                target.kill()
        assert client.node_info().hostname  # still serving
    assert seen - {"complete"}, f"the kill never landed before the advice ended: {seen}"
    assert len(audit_records(agent.log())) == 6


def _sockets(pid: int) -> int:
    """Sockets the process holds open (listeners, relayed connections and gRPC's own)."""
    count = 0
    for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            count += os.readlink(fd).startswith("socket:")
    return count


CLIENT_PROGRAM = """
import sys
from vmctl_client import Client
with Client(sys.argv[1]) as client:
    client.node_info()
    print("connected", flush=True)
    client.get_vma_info(int(sys.argv[2]), attrs=["accounting"])
    print("finished", flush=True)
"""


def test_a_client_killed_mid_call_leaves_nothing_behind(start_agent, spawn_target):
    agent = start_agent("--no-native", "--metrics-listen", "127.0.0.1:0", "--log-format", "json")
    port = logged_port(agent, "metrics_port")
    big = spawn_target()
    big.call("many_vmas", limit=int(pathlib.Path("/proc/sys/vm/max_map_count").read_text()))
    with agent.client() as client:
        client.node_info()
    wait_for(lambda: Scrape(port).value("vmctl_gateway_connections") == 0, "the gateway to close the connection")
    baseline = _sockets(agent.proc.pid)
    for _ in range(3):
        caller = subprocess.Popen(
            [sys.executable, "-c", CLIENT_PROGRAM, agent.address, str(big.pid)], stdout=subprocess.PIPE, text=True
        )
        assert caller.stdout.readline().strip() == "connected"
        wait_for(lambda: Scrape(port).in_flight("GetVmaInfo") == 1, "the snapshot to be running")
        caller.kill()
        caller.wait()
        assert caller.stdout.read() == ""  # it never got its answer
        caller.stdout.close()
    # The calls finish inside the agent, and their connections (the client's
    # end at the gateway, the relay's at gRPC) are all closed.
    wait_for(lambda: _sockets(agent.proc.pid) <= baseline, f"the agent's sockets back to {baseline}:\n{agent.log()}")
    with agent.client() as client:
        assert client.get_vma_info(big.pid).process.pid == big.pid
    assert "Traceback" not in agent.log()


def test_sigterm_under_load_drains_cleanly(start_agent, spawn_target):
    agent = start_agent()
    targets = [spawn_target() for _ in range(4)]
    regions = [t.map_anon(MiB, seed=20 + i) for i, t in enumerate(targets)]
    stop = threading.Event()
    outcomes: list[tuple[str, str]] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        target, region = targets[index % 4], regions[index % 4]
        with agent.client(retry=NO_RETRY, timeout=30) as client:
            while not stop.is_set():
                try:
                    info = client.get_vma_info(target.pid, attrs=["rss"])
                    client.advise_ranges(target.pid, [region], "cold", cookie=info.cookie)
                    outcome = ("advise", "OK")
                except VmctlError as error:
                    outcome = (error.code, error.reason)
                with lock:
                    outcomes.append(outcome)
                if outcome[0] != "advise":
                    return  # refused: the agent is going away

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in workers:
        thread.start()

    def applied_so_far() -> int:
        with lock:
            return sum(1 for o in outcomes if o == ("advise", "OK"))

    wait_for(lambda: applied_so_far() >= 2 * len(workers), "the workers to have advice applied: under load")
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(60) == 0, agent.log()
    stop.set()
    for thread in workers:
        thread.join(60)
    applied = sum(1 for o in outcomes if o == ("advise", "OK"))
    refused = [o for o in outcomes if o != ("advise", "OK")]
    assert applied > 8
    # In flight when the signal came: finished. Arriving after: UNAVAILABLE,
    # from the draining agent (AGENT_STOPPING) or a socket no longer there.
    assert {code for code, _ in refused} <= {"UNAVAILABLE"}, refused
    assert {reason for _, reason in refused} <= {"AGENT_STOPPING", ""}, refused
    assert not agent.socket_path.exists()
    assert not [p for p in agent.socket_path.parent.iterdir() if p.name.startswith(".vmctl-agent-")]
    records = audit_records(agent.log(), event=None)
    advice = [r for r in records if r["event"] == "advise"]
    assert sum(1 for r in advice if r["status"] == "OK") >= applied  # every applied advice is on record
    assert {(r["status"], r["reason"]) for r in advice} <= {("OK", ""), ("UNAVAILABLE", "AGENT_STOPPING")}
    assert records[-1]["event"] == "agent_stopped"
    for target in targets:
        target.verify()


@pytest.mark.parametrize("signum", [signal.SIGKILL])
def test_an_agent_killed_outright_leaves_a_socket_the_next_one_replaces(start_agent, tmp_path, signum):
    first = start_agent(socket_dir=tmp_path)
    os.kill(first.proc.pid, signum)
    first.proc.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".vmctl-agent-")]
    assert first.socket_path.exists() and leftovers  # nobody cleaned up
    second = start_agent(socket_dir=tmp_path)
    with second.client() as client:
        assert client.node_info().hostname
    # The stale private directory was swept; only the live agent's remains.
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".vmctl-agent-")] != leftovers
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".vmctl-agent-")]) == 1

"""The vmctl command line, run as a user runs it."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pathlib
import pty
import socket
import subprocess
import sys
from collections.abc import Iterator

from support.agents import write_policy
from support.certs import Pki
from support.cgroup2 import cgroup
from support.processes import PAGE
from support.vmctl_cli import usage_error, vmctl

from vmctl_server.core.cookie import COOKIE_SIZE


def test_maps_json_has_the_documented_shape(agent, target):
    start, end = target.map_anon(8 * PAGE, seed=1)
    run = vmctl("--target", agent.address, "maps", str(target.pid), "--attrs", "rss,pss", "-o", "json")
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["process"] == {
        "pid": target.pid,
        "start_time": data["process"]["start_time"],
        "comm": pathlib.Path(f"/proc/{target.pid}/comm").read_text().strip(),
    }
    assert len(base64.b64decode(data["cookie"])) == COOKIE_SIZE
    assert {"rss", "swap", "pss"} <= set(data["result_attrs"])
    ours = next(v for v in data["vmas"] if v["start"] == start)
    assert {"start", "end", "perms", "offset", "inode", "path", "rss", "pss"} <= set(ours)
    assert ours["end"] == end and ours["rss"] == 8 * PAGE and ours["perms"] == "rw-p"


def test_maps_table_is_human(agent, target):
    run = vmctl("--target", agent.address, "maps", str(target.pid), "--attrs", "rss")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"pid {target.pid} ")
    assert lines[1].startswith("cookie ")
    # One RANGE column, 0xSTART-0xEND, which `advise --range` takes back (it was two bare-hex columns).
    assert lines[2].split() == ["RANGE", "PERMS", "OFFSET", "DEV", "INODE", "RSS", "PATH"]
    assert any(line.endswith("[heap]") for line in lines)


def test_a_range_copied_from_the_maps_table_is_taken_back_by_advise(agent, target):
    start, end = target.map_anon(8 * PAGE, seed=6)
    table = vmctl("--target", agent.address, "maps", str(target.pid))
    assert table.returncode == 0, table.stderr
    (row,) = [line for line in table.stdout.splitlines() if line.startswith(f"0x{start:x}-")]
    copied = row.split()[0]
    assert copied == f"0x{start:x}-0x{end:x}"
    advise = ["--target", agent.address, "advise", str(target.pid), "--advice", "cold", "--range", copied]
    run = vmctl(*advise, "-o", "json")
    assert run.returncode == 0, run.stderr
    (result,) = json.loads(run.stdout)["ranges"]
    assert (result["start"], result["end"], result["advised_bytes"], result["error"]) == (start, end, end - start, None)
    again = vmctl(*advise)
    assert again.returncode == 0, again.stderr
    assert any(line.split()[0] == copied for line in again.stdout.splitlines()[1:])  # and prints it the same way
    target.verify()


def test_advise_round_trip_with_the_cookie(agent, target):
    start, end = target.map_anon(16 * PAGE, seed=2)
    maps = json.loads(vmctl("--target", agent.address, "maps", str(target.pid), "-o", "json").stdout)
    run = vmctl(
        "--target",
        agent.address,
        "advise",
        str(target.pid),
        "--advice",
        "cold",
        "--range",
        f"0x{start:x}-0x{end:x}",
        "--cookie",
        maps["cookie"],
        "-o",
        "json",
    )
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["requested_bytes"] == data["advised_bytes"] == 16 * PAGE
    assert data["syscalls"] == 1
    assert data["ranges"] == [
        {"start": start, "end": end, "advised_bytes": 16 * PAGE, "skipped_bytes": 0, "error": None, "reason": None}
    ]
    target.verify()


def test_advise_without_cookie_reads_a_fresh_one_and_takes_decimal(agent, target):
    start, end = target.map_anon(4 * PAGE, seed=3)
    run = vmctl(
        "--target", agent.address, "advise", str(target.pid), "--advice", "willneed", "--range", f"{start}-{end}"
    )
    assert run.returncode == 0, run.stderr
    assert "advised 16.0K of 16.0K" in run.stdout


def test_advise_all_with_filter_and_dry_run(agent, target):
    run = vmctl(
        "--target",
        agent.address,
        "advise",
        str(target.pid),
        "--advice",
        "pageout",
        "--all",
        "--filter",
        "anonymous",
        "--dry-run",
        "-o",
        "json",
    )
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["dry_run"] and data["syscalls"] == 0
    assert 0 < data["advised_bytes"] < data["requested_bytes"]


def test_stale_cookie_exits_3_with_a_json_error(agent, target):
    start, end = target.map_anon(4 * PAGE, seed=4)
    maps = json.loads(vmctl("--target", agent.address, "maps", str(target.pid), "-o", "json").stdout)
    target.map_anon(PAGE, seed=5)
    run = vmctl(
        "--target",
        agent.address,
        "advise",
        str(target.pid),
        "--advice",
        "cold",
        "--range",
        f"0x{start:x}-0x{end:x}",
        "--cookie",
        maps["cookie"],
        "-o",
        "json",
    )
    assert run.returncode == 3, run.stderr
    error = json.loads(run.stdout)["error"]
    assert error["code"] == "FAILED_PRECONDITION" and error["reason"] == "LAYOUT_CHANGED"
    assert error["message"]
    table = vmctl(
        "--target",
        agent.address,
        "advise",
        str(target.pid),
        "--advice",
        "cold",
        "--range",
        f"0x{start:x}-0x{end:x}",
        "--cookie",
        maps["cookie"],
    )
    assert table.returncode == 3
    assert "LAYOUT_CHANGED" in table.stderr


def test_usage_errors_exit_2(agent, target):
    assert vmctl("advise", str(target.pid), "--range", "0x1000-0x2000").returncode == 2  # no --advice
    assert vmctl("advise", str(target.pid), "--advice", "cold", "--range", "nonsense").returncode == 2
    assert vmctl("maps", str(target.pid), "--attrs", "rss,bogus").returncode == 2
    assert vmctl("frobnicate").returncode == 2


def test_invalid_range_is_an_error_with_its_reason(agent, target):
    run = vmctl(
        "--target",
        agent.address,
        "advise",
        str(target.pid),
        "--advice",
        "cold",
        "--range",
        "0x1001-0x3000",
        "-o",
        "json",
    )
    assert run.returncode == 1
    error = json.loads(run.stdout)["error"]
    assert (error["code"], error["reason"]) == ("INVALID_ARGUMENT", "RANGE_UNALIGNED")
    assert error["metadata"]["field"] == "ranges[0]"


def test_no_agent_says_how_to_start_one(tmp_path):
    run = vmctl("--target", f"unix://{tmp_path}/nothing.sock", "--timeout", "3", "node")
    assert run.returncode == 1
    assert "vmctl-agent" in run.stderr and "no vmctl agent answers" in run.stderr


def test_target_from_environment(agent):
    run = vmctl("node", "-o", "json", env={"VMCTL_TARGET": agent.address})
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["hostname"] == os.uname().nodename
    assert data["boot_id"] and "process_madvise" in data["capabilities"]


def test_several_targets_report_per_host_and_the_worst_status(agent, tmp_path):
    dead = f"unix://{tmp_path}/dead.sock"
    run = vmctl("--target", agent.address, "--target", dead, "--timeout", "3", "ps", "-o", "json")
    assert run.returncode == 1
    results = json.loads(run.stdout)["results"]
    assert [r["target"] for r in results] == [agent.address, dead]
    assert "processes" in results[0]["result"]
    assert results[1]["error"]["code"] == "UNAVAILABLE"


# ---- reclaim ---------------------------------------------------------------------


def test_reclaim_a_pid_pages_out_and_reports_before_and_after(agent, target, zram_swap):
    start, end = target.map_anon(256 * PAGE, seed=41)
    run = vmctl("--target", agent.address, "reclaim", str(target.pid), "-o", "json")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # piped: no progress bar
    data = json.loads(run.stdout)
    assert {"requested_bytes", "advised_bytes", "syscalls", "ranges", "processes"} <= set(data)
    assert (data["advice"], data["filter"], data["dry_run"], data["cgroup"]) == ("pageout", "anonymous", False, None)
    assert data["advised_bytes"] >= end - start and data["syscalls"] >= 1
    assert any(r["start"] == start and r["end"] == end and r["pid"] == target.pid for r in data["ranges"])
    (process,) = data["processes"]
    assert process["pid"] == target.pid and process["status"] == "done" and process["attempts"] == 1
    assert process["swap_after"] - process["swap_before"] >= end - start
    assert process["rss_before"] - process["rss_after"] >= end - start
    assert data["swap_after"] == process["swap_after"] and data["rss_before"] == process["rss_before"]
    assert target.smaps_region(start)["Swap"] * 1024 == end - start
    target.verify()


def test_reclaim_table_and_min_rss(agent, target):
    target.map_anon(16 * PAGE, seed=42)
    run = vmctl("--target", agent.address, "reclaim", str(target.pid), "--advice", "cold", "--min-rss", "1T")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["PID", "COMM", "STATUS", "TRIES", "ADVISED", "CALLS", "RSS", "SWAP"]
    comm = pathlib.Path(f"/proc/{target.pid}/comm").read_text().strip()
    assert lines[1].split()[:6] == [str(target.pid), comm, "done", "1", "0B", "0"]
    assert lines[-1].startswith(f"pid {target.pid}, cold (anonymous): advised 0B of 0B requested in 0 process_madvise")
    some = vmctl("--target", agent.address, "reclaim", str(target.pid), "--advice", "cold", "--min-rss", "64k")
    assert some.returncode == 0 and "advised 0B" not in some.stdout


def test_reclaim_a_cgroup_on_one_host(agent, spawn_target, tmp_path):
    members, outsider = [spawn_target(), spawn_target()], spawn_target()
    for i, member in enumerate(members):
        member.map_anon(32 * PAGE, seed=43 + i)
    with cgroup(f"vmctl-test-cli-{tmp_path.name}") as group:
        for member in members:
            (group / "cgroup.procs").write_text(str(member.pid))
        prefix = f"/{group.name}"
        run = vmctl("--target", agent.address, "reclaim", "--cgroup", prefix, "--advice", "cold", "-o", "json")
        assert run.returncode == 0, run.stderr
        data = json.loads(run.stdout)
        assert data["cgroup"] == prefix
        assert sorted(p["pid"] for p in data["processes"]) == sorted(m.pid for m in members)
        assert outsider.pid not in {r["pid"] for r in data["ranges"]}
        assert data["advised_bytes"] == sum(p["advised_bytes"] for p in data["processes"]) >= 2 * 32 * PAGE
        table = vmctl("--target", agent.address, "reclaim", "--cgroup", prefix, "--advice", "cold", "--dry-run")
        assert table.returncode == 0, table.stderr
        assert f"cgroup {prefix}: 2 process(es), cold (anonymous): would advise" in table.stdout


def test_reclaim_usage_errors_exit_2(agent, target):
    assert vmctl("reclaim").returncode == 2  # neither a pid nor --cgroup
    assert vmctl("reclaim", str(target.pid), "--cgroup", "/").returncode == 2
    assert vmctl("reclaim", str(target.pid), "--min-rss", "lots").returncode == 2
    assert vmctl("reclaim", str(target.pid), "--retries", "-1").returncode == 2
    assert vmctl("reclaim", str(target.pid), "--advice", "willneed").returncode == 2


def test_a_progress_bar_on_a_terminal_and_none_when_piped(agent, target):
    args = ["--target", agent.address, "reclaim", str(target.pid), "--advice", "cold", "-o", "json"]
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmctl_client.cli", *args],
            stdout=subprocess.PIPE,
            stderr=terminal,
            env={**os.environ, "TERM": "xterm", "COLUMNS": "100"},
        )
        os.close(terminal)
        terminal = -1
        stdout, _ = proc.communicate(timeout=120)
        drawn = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert proc.returncode == 0
    assert json.loads(stdout)["processes"][0]["pid"] == target.pid  # stdout stays clean JSON
    assert b"reclaim" in drawn and b"1/1" in drawn
    piped = vmctl(*args)
    assert piped.returncode == 0 and piped.stderr == ""


# ---- several targets --------------------------------------------------------------


def test_targets_file_gives_per_host_results_even_for_one_host(agent, tmp_path):
    listing = tmp_path / "targets"
    listing.write_text(f"# one host\n{agent.address}   # the local agent\n")
    run = vmctl("--targets-file", str(listing), "node", "-o", "json")
    assert run.returncode == 0, run.stderr
    (entry,) = json.loads(run.stdout)["results"]
    assert entry["target"] == agent.address and entry["result"]["hostname"] == os.uname().nodename
    dead = f"unix://{tmp_path}/dead.sock"
    listing.write_text(f"{agent.address}\n\n# and one that is gone\n{dead}\n")
    table = vmctl("--targets-file", str(listing), "--timeout", "3", "ps")
    assert table.returncode == 1
    assert f"== {agent.address}: ok" in table.stdout and f"== {dead}: FAILED UNAVAILABLE" in table.stdout
    assert "== 1 of 2 hosts ok" in table.stdout
    assert vmctl("--targets-file", str(tmp_path / "missing"), "ps").returncode == 2
    assert vmctl("--target", "dns:///no-port-here", "ps").returncode == 2


def test_the_worst_exit_status_wins(agent, target, tmp_path):
    start, end = target.map_anon(4 * PAGE, seed=44)
    maps = json.loads(vmctl("--target", agent.address, "maps", str(target.pid), "-o", "json").stdout)
    target.map_anon(PAGE, seed=45)
    # One agent under two spellings of its address: two hosts whose cookie is stale.
    both = f"{agent.address},unix:{agent.socket_path}"
    advise = ["advise", str(target.pid), "--advice", "cold", "--range", f"{start}-{end}", "--cookie", maps["cookie"]]
    stale = vmctl("--target", both, *advise, "-o", "json")
    assert stale.returncode == 3, stale.stdout
    assert [r["error"]["reason"] for r in json.loads(stale.stdout)["results"]] == ["LAYOUT_CHANGED"] * 2
    worse = vmctl("--target", both, "--target", f"unix://{tmp_path}/dead.sock", "--timeout", "3", *advise)
    assert worse.returncode == 1


def test_a_user_the_socket_refuses_is_told_so(agent):
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    run = subprocess.run(
        [*nobody, sys.executable, "-m", "vmctl_client.cli", "--target", agent.address, "--timeout", "5", "node"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert run.returncode == 1, run.stderr
    assert "may not connect to the agent's socket" in run.stderr and "Run as root" in run.stderr


def test_version_names_the_installed_distribution():
    from importlib import metadata

    run = vmctl("--version")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"vmctl {metadata.version('vmctl')}"


# ---- targets: a socket path, and TCP only with TLS or an explicit --insecure ---------------------


def test_a_socket_path_is_a_target(agent):
    for target, cwd in ((str(agent.socket_path), None), ("./agent.sock", str(agent.socket_path.parent))):
        run = vmctl("--target", target, "node", "-o", "json", cwd=cwd)
        assert run.returncode == 0, (target, run.stderr)
        assert json.loads(run.stdout)["hostname"] == os.uname().nodename


def test_bad_targets_are_usage_errors_and_dial_nothing():
    for target, why in (
        ("localhost", "'localhost' has no port"),
        ("http://localhost:50051", "unsupported scheme http://"),
        ("unix://tmp/x", "absolute path, unix:///tmp/x"),
    ):
        assert why in usage_error(vmctl("--target", target, "node")), target
    assert "$VMCTL_TARGET: '???'" in usage_error(vmctl("node", env={"VMCTL_TARGET": "???"}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_plaintext_tcp_needs_insecure_on_the_cli_too(start_agent, tmp_path):
    port = _free_port()
    policy = write_policy(tmp_path, "rules: [{identities: [anonymous], verbs: [read]}]")
    start_agent("--listen", f"127.0.0.1:{port}", "--insecure", "--policy", policy)  # HOST:PORT, no tcp://
    refused = usage_error(vmctl("--target", f"127.0.0.1:{port}", "node"))
    assert "is a TCP target: give --tls-ca" in refused and "--insecure" in refused
    run = vmctl("--target", f"tcp://127.0.0.1:{port}", "--insecure", "node", "-o", "json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["hostname"] == os.uname().nodename


def test_the_tls_flags_have_the_agents_names_and_the_old_ones_still_work(start_agent, tmp_path):
    pki = Pki(tmp_path)
    server = pki.issue("agent", dns=["agent.vmctl.test"])
    reader = pki.issue("reader", uri="spiffe://cluster/ns/ops/sa/reader")
    policy = write_policy(tmp_path, 'rules: [{identities: ["spiffe://cluster/ns/ops/sa/reader"], verbs: [read]}]')
    port = _free_port()
    start_agent(
        *("--listen", f"tcp://127.0.0.1:{port}", "--policy", policy),
        *("--tls-cert", server.cert, "--tls-key", server.key, "--tls-ca", pki.ca),  # --tls-ca: the agent's new name
    )
    new = ("--tls-ca", pki.ca, "--tls-cert", reader.cert, "--tls-key", reader.key, "--tls-server-name")
    old = ("--ca", pki.ca, "--cert", reader.cert, "--key", reader.key, "--server-name")
    for names in (new, old):
        run = vmctl("--target", f"127.0.0.1:{port}", *names, "agent.vmctl.test", "node", "-o", "json")
        assert run.returncode == 0, (names, run.stdout, run.stderr)
        assert json.loads(run.stdout)["hostname"] == os.uname().nodename


# ---- advise and reclaim report every failure, and what was read before it -----------------------


def test_advise_counts_the_ranges_the_kernel_refused_and_exits_1(agent, target):
    locked_start, locked_end = target.map_anon(4 * PAGE, seed=7)
    target.call("mlock", start=locked_start)  # MADV_COLD on an mlocked VMA: EINVAL
    free_start, free_end = target.map_anon(4 * PAGE, seed=8)
    ranges = ("--range", f"0x{locked_start:x}-0x{locked_end:x}", "--range", f"0x{free_start:x}-0x{free_end:x}")
    advise = ["--target", agent.address, "advise", str(target.pid), "--advice", "cold", *ranges]
    run = vmctl(*advise, "-o", "json")
    assert run.returncode == 1, run.stderr
    data = json.loads(run.stdout)  # the result, not an error: the other range was advised
    assert data["failed_ranges"] == 1 and data["advised_bytes"] == 4 * PAGE
    assert {r["start"]: r["error"] for r in data["ranges"]} == {locked_start: "EINVAL", free_start: None}
    table = vmctl(*advise)
    assert table.returncode == 1, table.stderr
    head = table.stdout.splitlines()[0]
    assert head.endswith("; 1 of 2 range(s) FAILED"), head
    assert any(
        line.split()[0] == f"0x{locked_start:x}-0x{locked_end:x}" and line.endswith("EINVAL")
        for line in table.stdout.splitlines()
    )
    target.verify()


# A process whose layout never holds still: a PROT_NONE mapping that grows by a
# page every 0.1 ms. Its size never repeats, so every cookie is stale by the
# time it comes back (the agent re-reads the layout milliseconds later).
GROWING_LAYOUT = """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = libc.mremap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
PAGE, MAP_PRIVATE_ANONYMOUS_NORESERVE, MREMAP_MAYMOVE = os.sysconf("SC_PAGE_SIZE"), 0x02 | 0x20 | 0x4000, 1
size = PAGE
address = libc.mmap(None, size, 0, MAP_PRIVATE_ANONYMOUS_NORESERVE, -1, 0)
print("ready", flush=True)
while address not in (None, ctypes.c_void_p(-1).value):
    address = libc.mremap(address, size, size + PAGE, MREMAP_MAYMOVE)
    size += PAGE
    time.sleep(0.0001)
"""


@contextlib.contextmanager
def growing_layout() -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen([sys.executable, "-c", GROWING_LAYOUT], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_reclaim_reports_a_process_that_stayed_stale_with_its_tries_and_rss(agent, tmp_path):
    with growing_layout() as mover, cgroup(f"vmctl-test-cli-{tmp_path.name}") as group:
        (group / "cgroup.procs").write_text(str(mover.pid))
        reclaim = ["--target", agent.address, "reclaim", "--cgroup", f"/{group.name}", "--advice", "cold"]
        reclaim += ["--scope", "whole"]  # any change refuses the advice (scope ranges would advise what held)
        run = vmctl(*reclaim, "--retries", "2", "-o", "json")
        assert run.returncode == 3, run.stdout + run.stderr
        (process,) = json.loads(run.stdout)["processes"]
        assert (process["pid"], process["status"], process["attempts"]) == (mover.pid, "stale", 3)
        assert process["error"]["reason"] == "LAYOUT_CHANGED"
        # What was read is kept; nothing was advised, so "after" is the last reading.
        assert process["rss_before"] > 0 and process["rss_after"] == process["rss_before"]
        assert process["vmas_chosen"] > 0 and process["advised_bytes"] == 0
        table = vmctl(*reclaim, "--retries", "1")
        assert table.returncode == 3, table.stdout + table.stderr
        row = table.stdout.splitlines()[1].split()
        comm = pathlib.Path(f"/proc/{mover.pid}/comm").read_text().strip()
        assert row[:5] == [str(mover.pid), comm, "stale", "LAYOUT_CHANGED", "2"], row
        rss_before, arrow, rss_after = row[7:10]  # after ADVISED and CALLS
        assert arrow == "->" and rss_before == rss_after != "0B", row


def test_reclaim_of_a_cgroup_with_no_process_says_so_and_exits_0(agent, tmp_path):
    with cgroup(f"vmctl-test-cli-empty-{tmp_path.name}") as empty:
        for prefix in (f"/{empty.name}", f"/{empty.name}-no-such-cgroup"):
            run = vmctl("--target", agent.address, "reclaim", "--cgroup", prefix)
            assert run.returncode == 0, run.stderr
            assert run.stdout.strip() == (
                f"cgroup {prefix}: no process in it or below it on this node (no such cgroup, or it is empty);"
                " nothing to do"
            )
            data = json.loads(vmctl("--target", agent.address, "reclaim", "--cgroup", prefix, "-o", "json").stdout)
            assert (data["cgroup"], data["processes"], data["advised_bytes"]) == (prefix, [], 0)

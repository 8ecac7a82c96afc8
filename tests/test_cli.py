"""The vmctl command line, run as a user runs it."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import subprocess
import sys

from conftest import PAGE

from vmctl_server.cookie import COOKIE_SIZE


def vmctl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vmctl_client.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


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
    assert lines[2].split() == ["START", "END", "PERMS", "OFFSET", "DEV", "INODE", "RSS", "PATH"]
    assert any(line.endswith("[heap]") for line in lines)


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
        {"start": start, "end": end, "advised_bytes": 16 * PAGE, "skipped_bytes": 0, "error": None}
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

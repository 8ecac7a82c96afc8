"""vmctl's output formats beside table and json: yaml (the same data) and wide
(the table with every column), and a table that says what it leaves out."""

from __future__ import annotations

import json
import os

import yaml
from support.processes import PAGE
from support.vmctl_cli import vmctl

LIBC_BUILD_ID_ATTRS = "build_id,vm_flags,thp_eligible,rss"


def test_yaml_is_the_json_document(agent, target, tmp_path):
    target.map_anon(4 * PAGE, seed=31)
    maps = ["--target", agent.address, "maps", str(target.pid)]  # the layout only: the same on every read
    as_json, as_yaml = vmctl(*maps, "-o", "json"), vmctl(*maps, "-o", "yaml")
    assert as_json.returncode == as_yaml.returncode == 0, as_json.stderr + as_yaml.stderr
    assert yaml.safe_load(as_yaml.stdout) == json.loads(as_json.stdout)
    assert as_yaml.stdout.startswith("process:\n")

    gone = vmctl("--target", agent.address, "maps", "4194303", "-o", "yaml")  # no such process
    assert gone.returncode == 1, gone.stderr
    assert yaml.safe_load(gone.stdout)["error"]["reason"] == "PROCESS_GONE"

    listing = tmp_path / "targets"
    listing.write_text(f"{agent.address}\n")
    fleet = vmctl("--targets-file", str(listing), "node", "-o", "yaml")
    assert fleet.returncode == 0, fleet.stderr
    (entry,) = yaml.safe_load(fleet.stdout)["results"]
    assert entry["target"] == agent.address and entry["result"]["boot_id"]


def _row_of(table: str, start: int) -> list[str]:
    (row,) = [line for line in table.splitlines() if line.startswith(f"0x{start:x}-")]
    return row.split()


def test_a_table_names_the_attributes_it_leaves_out_and_wide_shows_them(agent, target):
    maps = ["--target", agent.address, "maps", str(target.pid), "--attrs", LIBC_BUILD_ID_ATTRS]
    data = json.loads(vmctl(*maps, "-o", "json").stdout)
    libc = next(v for v in data["vmas"] if "/libc.so" in v["path"] and v["build_id"] and "x" in v["perms"])

    table = vmctl(*maps)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[2] == "not in this table: build_id, vm_flags, thp_eligible (use -o wide, or -o json for every value)"
    assert lines[3].split() == ["RANGE", "PERMS", "OFFSET", "DEV", "INODE", "RSS", "PATH"]

    wide = vmctl(*maps, "-o", "wide")
    assert wide.returncode == 0, wide.stderr
    lines = wide.stdout.splitlines()
    assert not any(line.startswith("not in this table") for line in lines)
    header = ["RANGE", "PERMS", "OFFSET", "DEV", "INODE", "BUILD_ID", "VM_FLAGS", "THP_ELIGIBLE", "RSS", "PATH"]
    assert lines[2].split() == header
    row = _row_of(wide.stdout, libc["start"])
    assert row[5] == libc["build_id"]
    assert row[6] == ",".join(libc["vm_flags"].split())
    assert row[7] == ("yes" if libc["thp_eligible"] else "no")
    assert row[9] == libc["path"]


def test_wide_spells_out_a_group_the_table_shortens(agent, target):
    maps = ["--target", agent.address, "maps", str(target.pid), "--attrs", "accounting"]
    table = vmctl(*maps)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[3].split() == [
        *("RANGE", "PERMS", "OFFSET", "DEV", "INODE"),
        *("RSS", "PSS", "SWAP", "ANONYMOUS", "REFERENCED", "PATH"),
    ]
    note = table.stdout.splitlines()[2]
    assert note.startswith("not in this table: pss_dirty, shared_clean,") and " more (use -o wide" in note
    wide = vmctl(*maps, "-o", "wide").stdout.splitlines()
    for column in ("PSS_DIRTY", "PRIVATE_DIRTY", "SWAP_PSS", "LOCKED", "VM_FLAGS", "THP_ELIGIBLE"):
        assert column in wide[2].split(), column


def test_wide_ps_and_reclaim_add_columns(agent, target):
    ps = vmctl("--target", agent.address, "ps", "-o", "wide")
    assert ps.returncode == 0, ps.stderr
    lines = ps.stdout.splitlines()
    headers = ["PID", "COMM", "RSS", "SWAP", "VMAS", "UID", "PPID", "START_TIME", "CONTAINER", "CPU", "MAJFLT"]
    headers += ["CG_PSI10", "CGROUP"]
    assert lines[0].split() == headers
    (row,) = [line.split() for line in lines[1:] if line.split()[0] == str(target.pid)]
    assert row[5:7] == ["0", str(os.getpid())]  # root's target, started by this test process
    with open(f"/proc/{target.pid}/maps") as f:
        assert row[4] == str(sum(1 for _ in f))  # -o wide asks for the VMA count
    # The plain table does not: the agent reads no maps file for it, and there is no VMAS column.
    plain = vmctl("--target", agent.address, "ps")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines()[0].split() == ["PID", "COMM", "RSS", "SWAP", "CGROUP"]
    documents = {
        flag: json.loads(vmctl("--target", agent.address, "ps", "-o", "json", *flag).stdout)["processes"]
        for flag in ((), ("--vma-count",))
    }
    assert {p["vma_count"] for p in documents[()]} == {None}
    assert all(isinstance(p["vma_count"], int) and p["vma_count"] > 0 for p in documents[("--vma-count",)])

    reclaim = vmctl(
        "--target", agent.address, "reclaim", str(target.pid), "--advice", "cold", "--dry-run", "-o", "wide"
    )
    assert reclaim.returncode == 0, reclaim.stderr
    assert reclaim.stdout.splitlines()[0].split() == [
        *("PID", "COMM", "STATUS", "TRIES", "ADVISED", "CALLS"),
        *("START_TIME", "VMAS", "REQUESTED", "FAILED", "RSS", "SWAP"),
    ]

"""The audit log, end to end (issue 9, item 4): the record of advice is
written before the advice is applied, a full disk applies nothing and leaves
no half line, callers with no rights cannot flood it, and refused reads and
policy reloads are on record too.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading

import pytest
from support.agents import write_policy
from support.audit_lines import audit_records
from support.expect import expect_error
from support.filesystems import fill
from support.peers import NOBODY, ConnectAs
from support.waiting import wait_for

from vmctl_client import Client, VmctlError
from vmctl_client.calls import RetryPolicy

MiB = 1 << 20
NO_RETRY = RetryPolicy(attempts=1)


def _swap_kb(target, start: int) -> int:
    return target.smaps_region(start)["Swap"]


def _lines_parse(path: pathlib.Path) -> list[dict]:
    """Every line of the file is one whole JSON record."""
    text = path.read_text()
    assert text.endswith("\n"), f"the last line is cut: {text[-80:]!r}"
    return [json.loads(line) for line in text.splitlines()]


def test_the_intent_is_on_record_first_so_a_killed_agent_leaves_it(start_agent, target, tmp_path, zram_swap):
    audit_path = tmp_path / "audit.jsonl"
    agent = start_agent("--audit-log", str(audit_path))
    regions = [target.map_anon(200 * MiB, seed=11 + i) for i in range(3)]  # 600 MiB: a good part of a second
    outcome: dict = {}
    with agent.client(retry=NO_RETRY) as client:
        info = client.get_vma_info(target.pid)

        def advise() -> None:
            try:
                outcome["result"] = client.advise_ranges(target.pid, regions, "pageout", cookie=info.cookie)
            except VmctlError as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=advise)
        thread.start()
        wait_for(lambda: audit_records(audit_path, event="advise_intent"), timeout=30, what="the intent record")
        agent.proc.send_signal(signal.SIGKILL)  # most likely mid-pageout
        thread.join()
    agent.proc.wait()
    (intent,) = audit_records(audit_path, event="advise_intent")
    assert (intent["pid"], intent["advice"], intent["requested_bytes"], intent["identity"]) == (
        target.pid, "pageout", 600 * MiB, "uid:0",
    )  # fmt: skip
    finished = [r for r in audit_records(audit_path) if r["request_id"] == intent["request_id"]]
    # Whatever the kernel had paged out when the agent died, the log says the advice was under way.
    assert finished or "error" in outcome
    assert sum(_swap_kb(target, s) for s, _ in regions) > 0 or finished
    target.verify()


def test_a_full_disk_applies_nothing_and_leaves_no_half_line(tiny_tmpfs, target, zram_swap):
    disk = tiny_tmpfs
    with tempfile.TemporaryDirectory(prefix="vmctl-test-") as sockets:
        audit_path = disk / "audit.jsonl"
        socket_path = pathlib.Path(sockets) / "agent.sock"
        log_path = pathlib.Path(sockets) / "agent.log"
        with open(log_path, "wb") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "vmctl_server.agent", "--listen", f"unix://{socket_path}",
                 "--audit-log", str(audit_path)],
                stdout=log, stderr=log,
            )  # fmt: skip
        try:
            wait_for(lambda: audit_path.exists() and audit_records(audit_path, event="agent_started"), what="a start")
            wait_for(socket_path.exists, what="the socket")
            start, end = target.map_anon(4 * MiB, seed=12)
            fill(disk)
            # Leave the log's last page a few bytes short of a record.
            room = 4096 - audit_path.stat().st_size % 4096
            with open(audit_path, "a") as f:
                f.write(json.dumps({"pad": "x" * max(0, room - 40)}) + "\n")
            with Client(f"unix://{socket_path}", retry=NO_RETRY) as client:
                info = client.get_vma_info(target.pid)
                for _ in range(2):
                    expect_error(
                        lambda: client.advise_ranges(target.pid, [(start, end)], "pageout", cookie=info.cookie),
                        "UNAVAILABLE",
                        "AUDIT_UNAVAILABLE",
                    )
                assert _swap_kb(target, start) == 0  # nothing applied
                records = _lines_parse(audit_path)  # and no half line in the log
                assert not [r for r in records if r.get("event") == "advise_intent"]
                (disk / "filler").unlink()
                result = client.advise_ranges(target.pid, [(start, end)], "pageout", cookie=info.cookie)
                assert result.advised_bytes == end - start
            records = _lines_parse(audit_path)
            assert [r["event"] for r in records if r.get("event", "").startswith("advise")] == [
                "advise_intent", "advise",
            ]  # fmt: skip
            target.verify()
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
        assert "cannot write the audit log" in log_path.read_text()


def test_refusals_of_a_caller_with_no_rights_are_folded_and_counted(start_agent, public_dir):
    agent = start_agent(
        "--socket-mode", "0666", "--rate-per-identity", "20", "--burst-per-identity", "5", socket_dir=public_dir
    )  # fmt: skip
    calls = 300
    refused: dict[str, int] = {}
    with ConnectAs(agent.socket_path, NOBODY) as nobody, Client(nobody.address, retry=NO_RETRY) as client:
        for _ in range(calls):
            with pytest.raises(VmctlError) as caught:
                client.node_info()
            refused[caught.value.reason] = refused.get(caught.value.reason, 0) + 1
    assert set(refused) == {"POLICY_DENIED", "RATE_LIMITED"}  # limits come first, then the policy
    during = audit_records(agent.log(), event="read")
    assert len(during) <= 2 * 2  # one record per kind at once, a count per kind later: not one per call
    assert agent.stop() == 0  # the counts of the windows still open are written on the way out
    records = audit_records(agent.log(), event="read")
    counted: dict[str, int] = {}
    for record in records:
        assert (record["identity"], record["method"]) == (f"uid:{NOBODY}", "GetNodeInfo")
        # A record at once counts one; a later one, the calls folded into it since.
        counted[record["reason"]] = counted.get(record["reason"], 0) + record.get("repeated", 1)
    assert counted == refused  # nothing lost


def test_policy_reloads_are_on_record(start_agent, public_dir):
    policy = write_policy(public_dir, "rules: []")
    agent = start_agent("--policy", policy)
    pathlib.Path(policy).write_text('rules: [{identities: ["uid:0"], verbs: [read]}]')
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: audit_records(agent.log(), event="policy_reload"), what="the reload record")
    pathlib.Path(policy).write_text("rules: [")
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(audit_records(agent.log(), event="policy_reload")) == 2, what="the refusal record")
    done, refused = audit_records(agent.log(), event="policy_reload")
    assert (done["status"], done["rules"], done["policy"]) == ("OK", 1, policy)
    assert refused["status"] == "REFUSED" and "not valid YAML" in refused["detail"]


def test_reads_refused_per_target_are_folded_too(start_agent, spawn_target, public_dir):
    """An identity allowed its own processes cannot write a record per pid it probes."""
    own = f'{{identities: ["uid:{NOBODY}"], verbs: [read], targets: {{uids: [{NOBODY}]}}}}'
    policy = write_policy(public_dir, f"rules: [{own}]")
    agent = start_agent("--socket-mode", "0666", "--policy", policy, socket_dir=public_dir)
    others = [spawn_target().pid for _ in range(3)]  # root's: not nobody's to read
    probes = 60
    with ConnectAs(agent.socket_path, NOBODY) as nobody, Client(nobody.address, retry=NO_RETRY) as client:
        for i in range(probes):
            expect_error(lambda i=i: client.get_vma_info(others[i % 3]), "PERMISSION_DENIED", "POLICY_DENIED")
    assert len(audit_records(agent.log(), event="read")) == 1
    assert agent.stop() == 0
    records = audit_records(agent.log(), event="read")
    assert {(r["method"], r["identity"], r["reason"]) for r in records} == {
        ("GetVmaInfo", f"uid:{NOBODY}", "POLICY_DENIED")
    }
    assert sum(r.get("repeated", 1) for r in records) == probes

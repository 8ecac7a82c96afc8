"""A bounded soak: 32 concurrent clients against one agent for about a minute.

Four targets keep mapping and unmapping memory and checking every byte of it
(tests/churn_target.py) while the clients read them (snapshots with every
attribute tier, process lists, node info) and page them out or cool them
with the cookie of a snapshot they just took, over zram swap. Layouts move
all the time, so many cookies are stale by the time they are used: that is
the point.

It checks that no call gets an answer outside the documented ones, that
every advice was applied or refused with a reason, that the audit log holds
exactly one record per AdviseRanges call, that no target ever found a byte
changed, and that the agent's memory stays bounded. The figures are printed
with the test's output. VMCTL_SOAK_SECONDS changes the duration.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter

from support.audit_lines import audit_records
from support.processes import CHURN_SCRIPT, status_kb

from vmctl_client import VmctlError
from vmctl_client.calls import RetryPolicy

SOAK_SECONDS = float(os.environ.get("VMCTL_SOAK_SECONDS", "60"))
CLIENTS = 32
TARGETS = 4
MiB = 1 << 20
# Every answer the soak may see. Reads of live targets always succeed; advice
# with a snapshot's cookie succeeds or finds the layout moved on.
ALLOWED = {
    ("GetVmaInfo", "OK", ""),
    ("ListProcesses", "OK", ""),
    ("GetNodeInfo", "OK", ""),
    ("AdviseRanges", "OK", ""),
    ("AdviseRanges", "FAILED_PRECONDITION", "LAYOUT_CHANGED"),
}
# A range whose memory the target unmapped between the agent's check and its
# process_madvise call is reported per range: the check-then-act window.
ALLOWED_RANGE_ERRORS = {"", "ENOMEM"}
RSS_LIMIT_KB = 300 * 1024


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answers: Counter[tuple[str, str, str]] = Counter()
        self.range_errors: Counter[str] = Counter()
        self.advised_bytes = 0
        self.requested_bytes = 0
        self.advise_calls = 0

    def answer(self, method: str, code: str = "OK", reason: str = "") -> None:
        with self.lock:
            self.answers[(method, code, reason)] += 1
            self.advise_calls += method == "AdviseRanges"


def _client_loop(agent, pids: list[int], seed: int, stop: threading.Event, tally: Tally) -> None:
    rng = random.Random(seed)
    with agent.client(retry=RetryPolicy(attempts=1), timeout=120) as client:
        while not stop.is_set():
            pid = rng.choice(pids)
            roll = rng.random()
            method = "GetVmaInfo"
            try:
                if roll < 0.08:
                    method = "ListProcesses"
                    client.list_processes()
                elif roll < 0.12:
                    method = "GetNodeInfo"
                    client.node_info()
                elif roll < 0.4:
                    client.get_vma_info(pid, attrs=rng.choice([None, ["rss"], ["accounting"], ["build_id"]]))
                else:
                    info = client.get_vma_info(pid, attrs=["rss"])
                    resident = [v for v in info.vmas if v.kind == "anonymous" and v.rss > 0]
                    if not resident:
                        tally.answer(method)
                        continue
                    chosen = sorted(
                        rng.sample(resident, k=min(len(resident), rng.randint(1, 12))), key=lambda v: v.start
                    )
                    method = "AdviseRanges"
                    result = client.advise_ranges(
                        pid,
                        chosen,
                        rng.choice(["pageout", "pageout", "cold"]),
                        cookie=info.cookie,
                        filter="anonymous",
                        dry_run=rng.random() < 0.05,
                    )
                    with tally.lock:
                        tally.advised_bytes += result.advised_bytes
                        tally.requested_bytes += result.requested_bytes
                        tally.range_errors.update(r.error for r in result.ranges)
            except VmctlError as error:
                tally.answer(method, error.code, error.reason)
            else:
                tally.answer(method)


def test_soak(start_agent, zram_swap, tmp_path, capsys):
    audit_path = tmp_path / "audit.jsonl"
    agent = start_agent("--audit-log", str(audit_path))
    churners = [
        subprocess.Popen([sys.executable, str(CHURN_SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(TARGETS)
    ]
    try:
        pids = [json.loads(proc.stdout.readline())["pid"] for proc in churners]
        tally, stop = Tally(), threading.Event()
        rss: list[int] = []
        sampler_stop = threading.Event()

        def sample() -> None:
            while not sampler_stop.wait(0.5):
                rss.append(status_kb(agent.proc.pid, "VmRSS"))

        sampler = threading.Thread(target=sample)
        sampler.start()
        clients = [
            threading.Thread(target=_client_loop, args=(agent, pids, seed, stop, tally)) for seed in range(CLIENTS)
        ]
        started = time.monotonic()
        for thread in clients:
            thread.start()
        time.sleep(SOAK_SECONDS)
        stop.set()
        for thread in clients:
            thread.join(300)
        elapsed = time.monotonic() - started
        sampler_stop.set()
        sampler.join()
        assert all(not thread.is_alive() for thread in clients), "a client hung"
        with agent.client() as client:
            assert client.node_info().hostname  # still serving
    finally:
        reports = []
        for proc in churners:
            out, _ = proc.communicate(timeout=120)  # closes stdin: the target reports and exits
            reports.append(json.loads(out.strip().splitlines()[-1]))
    assert agent.stop() == 0

    calls = sum(tally.answers.values())
    records = audit_records(audit_path)
    quarter = max(1, len(rss) // 4)
    with capsys.disabled():
        print(f"\n--- soak: {CLIENTS} clients, {TARGETS} churning targets, {elapsed:.0f} s, {calls} calls")
        for (method, code, reason), count in sorted(tally.answers.items()):
            print(f"    {method:14} {code:20} {reason or '-':16} {count:7}")
        print(f"    advice: {tally.advised_bytes / MiB:.0f} MiB advised of {tally.requested_bytes / MiB:.0f} MiB")
        print(f"    per-range errors: {dict(tally.range_errors)}")
        print(f"    audit records: {len(records)} for {tally.advise_calls} AdviseRanges calls")
        print(f"    targets: {[{k: r[k] for k in ('maps', 'unmaps', 'checks', 'failures')} for r in reports]}")
        print(
            f"    agent RSS: first {rss[0] // 1024} MiB, peak {max(rss) // 1024} MiB,"
            f" last quarter peak {max(rss[-quarter:]) // 1024} MiB"
        )

    unexpected = {k: v for k, v in tally.answers.items() if k not in ALLOWED}
    if unexpected:
        notes = [line for line in agent.log().splitlines() if "vmctl.access" not in line and "vmctl.audit" not in line]
        raise AssertionError(f"{unexpected}; the agent's log, calls and audit left out:\n" + "\n".join(notes[-40:]))
    assert tally.answers[("AdviseRanges", "OK", "")] > 0 and tally.advised_bytes > 0
    assert set(tally.range_errors) <= ALLOWED_RANGE_ERRORS, tally.range_errors
    # Every AdviseRanges call is on record, applied or refused, and nothing more.
    assert len(records) == tally.advise_calls
    assert Counter((r["status"], r["reason"]) for r in records) == Counter(
        (code, reason)
        for (method, code, reason), n in tally.answers.items()
        if method == "AdviseRanges"
        for _ in range(n)
    )
    for report in reports:
        assert report["failures"] == 0, report
        assert report["checks"] > 0 and report["maps"] > 0 and report["unmaps"] > 0, report
    assert max(rss) < RSS_LIMIT_KB
    # Bounded: the last quarter of the run peaks no higher than the first
    # three quarters plus a margin for the allocator.
    assert max(rss[-quarter:]) <= max(rss[:-quarter]) + 32 * 1024, rss

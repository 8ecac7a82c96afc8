"""Bad input, field by field, and a fuzz run of raw request bytes.

Every row names one defect and the exact status and reason the agent answers
with (README, "Errors"). Every AdviseRanges row is sent as ``pageout`` over a
zram swap device against a target whose 1 MiB region is all in RAM: had any
process_madvise reached it, the region's Swap would rise. So each row checks,
besides the answer, that the region is still resident and unswapped, that
the target's memory is intact byte for byte, and that the agent's audit
record of the call says no system call was made.

Size limits, the documented choice: a request within --max-ranges always fits
the message limit and one over it is refused by count (INVALID_ARGUMENT
TOO_MANY_RANGES); a message over --max-message-bytes (by default what
--max-ranges ranges can take, about 6.4 MB) is refused by gRPC unread with
RESOURCE_EXHAUSTED and no reason, so a million real ranges (~16 MB) gets
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import random
import secrets
import subprocess
import sys
import tempfile
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.agents import Agent
from support.audit_lines import audit_records
from support.expect import expect_error
from support.processes import PAGE, process_state
from support.waiting import wait_for

from vmctl_api import vmctl_pb2 as pb
from vmctl_client.calls import RetryPolicy
from vmctl_server.core.advice import DEFAULT_MAX_RANGES

MiB = 1 << 20
U64 = 2**64
NO_RETRY = RetryPolicy(attempts=1)


@pytest.fixture(scope="module")
def relaxed_agent():
    """An agent whose policy needs no cookie, so requests reach the process checks."""
    with tempfile.TemporaryDirectory(prefix="vmctl-bad-") as tmp:
        policy = pathlib.Path(tmp) / "policy.yaml"
        policy.write_text('require_cookie: false\nrules: [{identities: ["uid:0"], verbs: [read, advise]}]\n')
        agent = Agent(["--policy", str(policy)], pathlib.Path(tmp))
        try:
            yield agent.start()
        finally:
            agent.stop()
            agent.discard_log()


@pytest.fixture
def victim(target, zram_swap):
    """The target with a resident 1 MiB region, and a snapshot of it."""
    start, end = target.map_anon(MiB, seed=77)
    return target, (start, end)


def assert_untouched(target, region) -> None:
    smaps = target.smaps_region(region[0])
    assert smaps["Rss"] == 1024 and smaps["Swap"] == 0, f"the target was advised: {smaps}"
    target.verify()


def _hole(vmas) -> int:
    """The first address of a hole of at least two pages in the layout."""
    for before, after in itertools.pairwise(vmas):
        if after.start - before.end >= 2 * PAGE:
            return before.end
    raise AssertionError("no hole in the layout")


# Each row: a name, how to build (pid, ranges, advice, cookie, filter, dry_run)
# from the target's facts, and the (code, reason) expected.
def _rows():
    return [
        # -- pid
        ("pid negative", lambda t: dict(pid=-1), "INVALID_ARGUMENT", "INVALID_PID"),
        ("pid zero", lambda t: dict(pid=0), "INVALID_ARGUMENT", "INVALID_PID"),
        ("pid above PID_MAX_LIMIT", lambda t: dict(pid=1 << 22), "INVALID_ARGUMENT", "INVALID_PID"),
        ("pid int32 max", lambda t: dict(pid=2**31 - 1), "INVALID_ARGUMENT", "INVALID_PID"),
        ("pid of another process", lambda t: dict(pid=t["other_pid"]), "INVALID_ARGUMENT", "COOKIE_INVALID"),
        # -- ranges
        ("no ranges", lambda t: dict(ranges=[]), "INVALID_ARGUMENT", "NO_RANGES"),
        ("unaligned start", lambda t: dict(ranges=[(t["start"] + 1, t["end"])]), "INVALID_ARGUMENT", "RANGE_UNALIGNED"),
        ("unaligned end", lambda t: dict(ranges=[(t["start"], t["end"] - 1)]), "INVALID_ARGUMENT", "RANGE_UNALIGNED"),
        ("zero length", lambda t: dict(ranges=[(t["start"], t["start"])]), "INVALID_ARGUMENT", "RANGE_EMPTY"),
        ("wrapping", lambda t: dict(ranges=[(t["end"], t["start"])]), "INVALID_ARGUMENT", "RANGE_WRAPS"),
        ("end zero", lambda t: dict(ranges=[(t["start"], 0)]), "INVALID_ARGUMENT", "RANGE_WRAPS"),
        (
            "overlapping",
            lambda t: dict(ranges=[(t["start"], t["end"]), (t["start"] + PAGE, t["start"] + 2 * PAGE)]),
            "INVALID_ARGUMENT",
            "RANGE_OVERLAP",
        ),
        (
            "the same range twice",
            lambda t: dict(ranges=[(t["start"], t["end"]), (t["start"], t["end"])]),
            "INVALID_ARGUMENT",
            "RANGE_OVERLAP",
        ),
        (
            "a hole in the layout",
            lambda t: dict(ranges=[(t["start"], t["end"]), (t["hole"] + PAGE, t["hole"] + 2 * PAGE)]),
            "INVALID_ARGUMENT",
            "RANGE_UNMAPPED",
        ),
        (
            "running past a mapping into a hole",
            lambda t: dict(ranges=[(t["start"], t["end"]), (t["hole"] - PAGE, t["hole"] + PAGE)]),
            "INVALID_ARGUMENT",
            "RANGE_UNMAPPED",
        ),
        (
            "at TASK_SIZE",
            lambda t: dict(ranges=[(t["start"], t["end"]), (1 << 47, (1 << 47) + PAGE)]),
            "INVALID_ARGUMENT",
            "RANGE_UNMAPPED",
        ),
        (
            "the top of the address space",
            lambda t: dict(ranges=[(t["start"], t["end"]), (U64 - 2 * PAGE, U64 - PAGE)]),
            "INVALID_ARGUMENT",
            "RANGE_UNMAPPED",
        ),
        ("u64 max", lambda t: dict(ranges=[(t["start"], U64 - 1)]), "INVALID_ARGUMENT", "RANGE_UNALIGNED"),
        (
            "one range over --max-ranges",
            lambda t: dict(ranges=[(i * PAGE, (i + 1) * PAGE) for i in range(DEFAULT_MAX_RANGES + 1)]),
            "INVALID_ARGUMENT",
            "TOO_MANY_RANGES",
        ),
        (
            "a million ranges",
            lambda t: dict(ranges=[(t["start"] + i * PAGE, t["start"] + (i + 1) * PAGE) for i in range(1_000_000)]),
            "RESOURCE_EXHAUSTED",
            "",
        ),
        # -- advice and filter
        ("advice unspecified", lambda t: dict(advice=0), "INVALID_ARGUMENT", "UNKNOWN_ADVICE"),
        ("advice unknown", lambda t: dict(advice=99), "INVALID_ARGUMENT", "UNKNOWN_ADVICE"),
        ("advice negative", lambda t: dict(advice=-3), "INVALID_ARGUMENT", "UNKNOWN_ADVICE"),
        ("filter unknown", lambda t: dict(filter=7), "INVALID_ARGUMENT", "UNKNOWN_FILTER"),
        ("filter negative", lambda t: dict(filter=-1), "INVALID_ARGUMENT", "UNKNOWN_FILTER"),
        # -- cookie
        ("cookie empty", lambda t: dict(cookie=b""), "INVALID_ARGUMENT", "COOKIE_REQUIRED"),
        (
            "cookie garbled",
            lambda t: dict(cookie=secrets.token_bytes(len(t["cookie"]))),
            "INVALID_ARGUMENT",
            "COOKIE_INVALID",
        ),
        ("cookie truncated", lambda t: dict(cookie=t["cookie"][:-1]), "INVALID_ARGUMENT", "COOKIE_INVALID"),
        ("cookie half", lambda t: dict(cookie=t["cookie"][:50]), "INVALID_ARGUMENT", "COOKIE_INVALID"),
        ("cookie extended", lambda t: dict(cookie=t["cookie"] + b"\0"), "INVALID_ARGUMENT", "COOKIE_INVALID"),
        ("cookie one bit flipped", lambda t: dict(cookie=_flip(t["cookie"])), "INVALID_ARGUMENT", "COOKIE_INVALID"),
        ("cookie of another process", lambda t: dict(cookie=t["other_cookie"]), "INVALID_ARGUMENT", "COOKIE_INVALID"),
        ("cookie of another agent", lambda t: dict(cookie=t["foreign_cookie"]), "INVALID_ARGUMENT", "COOKIE_INVALID"),
        ("cookie of 1 MB", lambda t: dict(cookie=b"\x01" * MiB), "INVALID_ARGUMENT", "COOKIE_INVALID"),
        ("message over the size limit", lambda t: dict(cookie=b"\x01" * (8 * MiB)), "RESOURCE_EXHAUSTED", ""),
        # -- refused even as a dry run
        (
            "dry run of an unaligned range",
            lambda t: dict(ranges=[(t["start"] + 1, t["end"])], dry_run=True),
            "INVALID_ARGUMENT",
            "RANGE_UNALIGNED",
        ),
    ]


def _flip(cookie: bytes) -> bytes:
    edited = bytearray(cookie)
    edited[len(edited) // 2] ^= 0x10
    return bytes(edited)


@pytest.fixture
def facts(victim, client, spawn_target, relaxed_agent):
    target, (start, end) = victim
    other = spawn_target()
    info = client.get_vma_info(target.pid)
    with relaxed_agent.client() as foreign:  # another agent: another cookie key
        foreign_cookie = foreign.get_vma_info(target.pid).cookie
    return {
        "pid": target.pid,
        "start": start,
        "end": end,
        "cookie": info.cookie,
        "hole": _hole(list(info.vmas)),
        "other_pid": other.pid,
        "other_cookie": client.get_vma_info(other.pid).cookie,
        "foreign_cookie": foreign_cookie,
    }


ROWS = _rows()


@pytest.mark.parametrize(("fields", "code", "reason"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_advise_request_is_refused_and_changes_nothing(agent, client, victim, facts, fields, code, reason):
    target, region = victim
    request = dict(
        pid=facts["pid"], ranges=[region], advice=pb.ADVICE_PAGEOUT, cookie=facts["cookie"], filter=0, dry_run=False
    )
    request.update(fields(facts))
    before = len(audit_records(agent.log()))
    message = pb.AdviseRangesRequest(
        pid=request["pid"],
        ranges=[pb.AddressRange(start=s % U64, end=e % U64) for s, e in request["ranges"]],
        advice=request["advice"],
        cookie=request["cookie"],
        filter=request["filter"],
        dry_run=request["dry_run"],
    )
    with grpc.insecure_channel(agent.address, options=[("grpc.max_send_message_length", -1)]) as channel:
        stub = channel.unary_unary(
            "/vmctl.v1.VmControl/AdviseRanges",
            request_serializer=pb.AdviseRangesRequest.SerializeToString,
            response_deserializer=pb.AdviseRangesResponse.FromString,
        )
        expect_error(lambda: _call(stub, message), code, reason or None)
    assert_untouched(target, region)
    records = audit_records(agent.log())
    if code == "RESOURCE_EXHAUSTED":
        # Refused by gRPC unread, after the caller was admitted: on record as a request that never arrived.
        assert len(records) == before + 1
        assert (records[-1]["status"], records[-1]["reason"], records[-1]["syscalls"]) == (
            "INVALID_ARGUMENT", "MALFORMED_REQUEST", 0,
        )  # fmt: skip
    else:
        assert len(records) == before + 1
        record = records[-1]
        assert (record["status"], record["reason"], record["syscalls"], record["advised_bytes"]) == (
            code,
            reason,
            0,
            0,
        )
    # The target is still advisable: nothing about the refusal stuck.
    fresh = client.get_vma_info(target.pid).cookie  # the target's own heap may have moved meanwhile
    assert client.advise_ranges(target.pid, [region], "pageout", cookie=fresh).advised_bytes == MiB
    target.verify()


def _call(stub, message):
    from vmctl_client.errors import from_rpc_error

    try:
        return stub(message, timeout=60)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None


# ---- processes that cannot be advised ----------------------------------------------------


@contextlib.contextmanager
def _zombie():
    proc = subprocess.Popen(["true"])
    try:
        wait_for(lambda: process_state(proc.pid) == "Z", "the exited child to be a zombie")
        yield proc.pid
    finally:
        proc.wait()


@contextlib.contextmanager
def _thread_id():
    """The id of a thread that is not its process's leader, alive until the block ends."""
    code = (
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(3600,)).start()\n"
        "print(flush=True)\n"
        "time.sleep(3600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        proc.stdout.readline()  # the second thread exists once this line is printed
        (tid,) = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid]
        yield tid
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _exited_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    ("which", "code", "reason"),
    [
        ("kernel thread", "FAILED_PRECONDITION", "NO_ADDRESS_SPACE"),
        ("zombie", "NOT_FOUND", "PROCESS_GONE"),
        ("exited", "NOT_FOUND", "PROCESS_GONE"),
        ("the agent", "PERMISSION_DENIED", "PROTECTED_TARGET"),
        ("a thread, not a process", "INVALID_ARGUMENT", "INVALID_PID"),
    ],
)
def test_processes_that_cannot_be_advised(relaxed_agent, which, code, reason):
    with contextlib.ExitStack() as stack:
        if which == "kernel thread":
            pid = 2
            assert "(kthreadd)" in pathlib.Path("/proc/2/stat").read_text()
        elif which == "zombie":
            pid = stack.enter_context(_zombie())
        elif which == "exited":
            pid = _exited_pid()
        elif which == "the agent":
            pid = relaxed_agent.proc.pid
        else:
            pid = stack.enter_context(_thread_id())  # pidfd_open refuses a thread that is not the leader
        with relaxed_agent.client() as client:
            # Without a cookie (the policy allows it), the request reaches the process checks.
            expect_error(lambda: client.advise_ranges(pid, [(PAGE, 2 * PAGE)], "cold"), code, reason)
        (record,) = [r for r in audit_records(relaxed_agent.log()) if r["pid"] == pid][-1:]
        assert (record["reason"], record["syscalls"]) == (reason, 0)


@pytest.mark.parametrize(
    ("pid", "mask", "code", "reason"),
    [
        (-1, 0, "INVALID_ARGUMENT", "INVALID_PID"),
        (0, 0, "INVALID_ARGUMENT", "INVALID_PID"),
        (2**31 - 1, 0, "INVALID_ARGUMENT", "INVALID_PID"),
        (2, 15, "FAILED_PRECONDITION", "NO_ADDRESS_SPACE"),
        ("self", 1 << 12, "INVALID_ARGUMENT", "UNKNOWN_ATTR"),
        ("self", 2**32 - 1, "INVALID_ARGUMENT", "UNKNOWN_ATTR"),
        ("exited", 0, "NOT_FOUND", "PROCESS_GONE"),
    ],
)
def test_bad_snapshot_requests(client, pid, mask, code, reason):
    pid = os.getpid() if pid == "self" else _exited_pid() if pid == "exited" else pid
    expect_error(lambda: client.get_vma_info(pid, attrs=mask), code, reason)


def test_any_cgroup_prefix_is_only_a_filter(client):
    for prefix in ("../..", "\x00", "/" * 10_000, "é/\n", "/proc/self"):
        assert client.list_processes(cgroup_prefix=prefix) == []


# ---- fuzz: raw bytes into every method ---------------------------------------------------

REPLIES = {  # what each method answers; GetVmaInfo's reply is checked by the snapshot tests
    "GetVmaInfo": None,
    "AdviseRanges": pb.AdviseRangesResponse,
    "ListProcesses": pb.ListProcessesResponse,
    "GetNodeInfo": pb.GetNodeInfoResponse,
}
# Every answer a request can get, whatever its bytes; anything else (INTERNAL,
# UNKNOWN, a dead agent) is a bug.
ACCEPTABLE = {
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "PERMISSION_DENIED",
}


def _mutants(valid: bytes, rng: random.Random):
    """Bytes near a valid request: bit flips, truncations, splices, garbage."""
    data = bytearray(valid)
    kind = rng.randrange(5)
    if kind == 0 and data:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        data = data[: rng.randrange(len(data) + 1)]
    elif kind == 2:
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.randbytes(rng.randint(1, 16))
    elif kind == 3:
        data = bytearray(rng.randbytes(rng.randint(0, 200)))
    else:  # a field of every wire type with a random number, including huge lengths
        data += bytes([rng.randrange(256) for _ in range(rng.randint(1, 12))])
    return bytes(data)


def test_fuzz_raw_request_bytes_never_break_the_agent(agent, client, victim):
    target, (start, end) = victim
    info = client.get_vma_info(target.pid)
    valid = {
        "GetVmaInfo": pb.GetVmaInfoRequest(pid=target.pid, attr_mask=15).SerializeToString(),
        "AdviseRanges": pb.AdviseRangesRequest(
            pid=target.pid,
            ranges=[pb.AddressRange(start=start, end=end)],
            advice=pb.ADVICE_COLD,
            cookie=info.cookie,
            dry_run=True,
        ).SerializeToString(),
        "ListProcesses": pb.ListProcessesRequest(cgroup_prefix="/").SerializeToString(),
        "GetNodeInfo": b"",
    }
    rng = random.Random(20261125)
    answers: Counter[tuple[str, str]] = Counter()
    with grpc.insecure_channel(agent.address) as channel:
        raw = {
            name: channel.unary_unary(
                f"/vmctl.v1.VmControl/{name}", request_serializer=None, response_deserializer=None
            )
            for name in REPLIES
        }
        for _ in range(1500):
            name = rng.choice(list(REPLIES))
            payload = _mutants(valid[name], rng)
            try:
                reply = raw[name](payload, timeout=60)
                code = "OK"
                if REPLIES[name] is not None:
                    REPLIES[name].FromString(reply)  # a well-formed answer
            except grpc.RpcError as exc:
                code = exc.code().name
            answers[(name, code)] += 1
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    print("\nfuzz answers:", dict(sorted(answers.items())))
    assert {code for _, code in answers} <= ACCEPTABLE, answers
    assert answers[("AdviseRanges", "INVALID_ARGUMENT")] > 0 and answers[("GetVmaInfo", "OK")] > 0
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "Traceback" not in agent.log()
    target.verify()  # a mutant may have turned into real advice; advice never changes contents
    assert client.get_vma_info(target.pid).process.pid == target.pid


def test_a_missing_advice_says_advice_is_required(client, target):
    start, end = target.map_anon(1 << 20)
    cookie = client.get_vma_info(target.pid).cookie
    error = expect_error(
        lambda: client.advise_ranges(target.pid, [(start, end)], pb.ADVICE_UNSPECIFIED, cookie=cookie),
        "INVALID_ARGUMENT",
        "UNKNOWN_ADVICE",
    )
    assert error.message.startswith("advice is required: one of cold, pageout, willneed, collapse")
    assert error.metadata["field"] == "advice"
    error = expect_error(lambda: client.advise_ranges(target.pid, [(start, end)], 9, cookie=cookie), "INVALID_ARGUMENT")
    assert error.message == "unknown advice 9"

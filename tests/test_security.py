"""Who may do what: authentication (SO_PEERCRED, mutual TLS), the policy,
protected targets, per-identity limits and the audit log, end to end against
real agents, real target processes and real users.

Other users than root connect through tests/peers.py: a thread whose
effective uid really is that user calls connect(), so the agent's
SO_PEERCRED, the socket's mode and the directory permissions all see it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.agents import Agent, write_policy
from support.audit_lines import audit_records
from support.certs import Pki
from support.cgroup2 import CGROUP2, cgroup
from support.expect import expect_error
from support.peers import NOBODY, ConnectAs, connect_as
from support.processes import PAGE
from support.scrape import Scrape, logged_port
from support.waiting import wait_for

from vmctl_client import Client, TlsOptions
from vmctl_client.calls import RetryPolicy
from vmctl_server.access.policy import PolicyError, load_policy, parse_policy
from vmctl_server.core import faults
from vmctl_server.transport import grpc_status

MiB = 1 << 20
REPO = pathlib.Path(__file__).resolve().parent.parent
NO_RETRY = RetryPolicy(attempts=1)
AGENT = (sys.executable, "-m", "vmctl_server.agent")


def untouched(target, start: int, kb: int) -> None:
    """The region at ``start`` is still all in RAM and byte for byte intact."""
    region = target.smaps_region(start)
    assert region["Rss"] == kb and region["Swap"] == 0, region
    target.verify()


def comm_of(pid: int) -> str:
    return pathlib.Path(f"/proc/{pid}/comm").read_text().strip()


# ---- the mapping of refusals to statuses ---------------------------------------------


@pytest.mark.unprivileged
@pytest.mark.parametrize(
    ("fault", "code", "reason"),
    [
        (faults.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
        (faults.PolicyDenied, grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED"),
        (faults.ProtectedTarget, grpc.StatusCode.PERMISSION_DENIED, "PROTECTED_TARGET"),
        (faults.LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"),
        (faults.AuditUnavailable, grpc.StatusCode.UNAVAILABLE, "AUDIT_UNAVAILABLE"),
    ],
)
def test_security_faults_have_their_documented_status(fault, code, reason):
    rendered = grpc_status.to_status(fault("why", rule="r"))
    assert rendered.code == code
    assert fault("why").reason == reason


# ---- unix peers: SO_PEERCRED -------------------------------------------------------------


def test_root_may_do_everything_without_a_policy_and_is_named_by_its_credentials(start_agent, target):
    agent = start_agent()
    start, end = target.map_anon(MiB)
    with agent.client() as client:
        info = client.get_vma_info(target.pid)
        assert client.advise_ranges(target.pid, [(start, end)], "cold", cookie=info.cookie).advised_bytes == MiB
    (record,) = audit_records(agent.log())
    assert (record["identity"], record["transport"], record["peer_uid"]) == ("uid:0", "unix", 0)
    assert record["peer_pid"] == os.getpid()  # the kernel's word, not anything the client sent
    assert (record["status"], record["rule"]) == ("OK", "default (no policy file): root on the unix socket")


def test_without_a_policy_no_other_user_may_do_anything(start_agent, target, public_dir, zram_swap):
    agent = start_agent("--socket-mode", "0666", socket_dir=public_dir)
    start, end = target.map_anon(MiB, seed=3)
    with agent.client() as root:
        cookie = root.get_vma_info(target.pid).cookie
    with ConnectAs(agent.socket_path, NOBODY) as nobody, Client(nobody.address, retry=NO_RETRY) as client:
        for call in (
            lambda: client.get_vma_info(target.pid),
            lambda: client.list_processes(),
            lambda: client.node_info(),
            lambda: client.advise_ranges(target.pid, [(start, end)], "pageout", cookie=cookie),
        ):
            error = expect_error(call, "PERMISSION_DENIED", "POLICY_DENIED")
            assert error.metadata["identity"] == f"uid:{NOBODY}" and error.metadata["rule"] == "none"
    untouched(target, start, 1024)
    (record,) = audit_records(agent.log())
    assert (record["identity"], record["peer_uid"], record["peer_gid"]) == (f"uid:{NOBODY}", NOBODY, NOBODY)
    assert (record["status"], record["reason"], record["syscalls"], record["advised_bytes"]) == (
        "PERMISSION_DENIED",
        "POLICY_DENIED",
        0,
        0,
    )
    # The refused reads are on record too, named by method.
    reads = audit_records(agent.log(), event="read")
    assert [(r["method"], r["identity"], r["reason"]) for r in reads] == [
        (method, f"uid:{NOBODY}", "POLICY_DENIED") for method in ("GetVmaInfo", "ListProcesses", "GetNodeInfo")
    ]


def test_the_socket_mode_is_the_first_gate(start_agent, public_dir):
    agent = start_agent(socket_dir=public_dir)  # default 0600
    assert agent.socket_path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(PermissionError):
        connect_as(str(agent.socket_path), NOBODY, NOBODY)
    connect_as(str(agent.socket_path), 0, 0).close()


def test_policy_binds_identities_to_verbs_targets_and_advices(start_agent, spawn_target, public_dir, zram_swap):
    python_target = spawn_target()
    comm = comm_of(python_target.pid)
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        policy = write_policy(
            public_dir,
            f"""
rules:
  - name: root
    identities: ["uid:0"]
    verbs: [read, advise]
  - name: nobody-reads-its-targets
    identities: ["uid:{NOBODY}"]
    verbs: [read]
    targets: {{comm: ["{comm}"]}}
  - name: nobody-cools-python
    identities: ["uid:{NOBODY}"]
    verbs: [advise]
    targets: {{comm: ["{comm}"], uids: [0]}}
    advices: [cold]
""",
        )
        agent = start_agent("--socket-mode", "0666", "--policy", policy, socket_dir=public_dir)
        start, end = python_target.map_anon(MiB, seed=4)
        with ConnectAs(agent.socket_path, NOBODY) as nobody, Client(nobody.address, retry=NO_RETRY) as client:
            info = client.get_vma_info(python_target.pid)
            assert client.advise_ranges(python_target.pid, [(start, end)], "cold", cookie=info.cookie).advised_bytes
            error = expect_error(
                lambda: client.advise_ranges(python_target.pid, [(start, end)], "pageout", cookie=info.cookie),
                "PERMISSION_DENIED",
                "POLICY_DENIED",
            )
            assert error.metadata["rule"] == "nobody-cools-python" and error.metadata["advice"] == "pageout"
            untouched(python_target, start, 1024)
            # Not a selected target: another comm.
            error = expect_error(lambda: client.get_vma_info(sleeper.pid), "PERMISSION_DENIED", "POLICY_DENIED")
            assert "nobody-reads-its-targets" in error.metadata["rule"]
            # ListProcesses shows only what the caller may read.
            listed = client.list_processes()
            assert python_target.pid in {p.pid for p in listed} and sleeper.pid not in {p.pid for p in listed}
            assert {p.comm for p in listed} == {comm}
            # GetNodeInfo names no process: the read verb alone decides.
            assert client.node_info().hostname
        outcomes = [(r["identity"], r["advice"], r["status"], r["rule"]) for r in audit_records(agent.log())]
        assert outcomes == [
            (f"uid:{NOBODY}", "cold", "OK", "nobody-cools-python"),
            (f"uid:{NOBODY}", "pageout", "PERMISSION_DENIED", ""),
        ]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_cgroup_prefix_selects_targets(start_agent, spawn_target, public_dir):
    inside, outside = spawn_target(), spawn_target()
    name = f"vmctl-sec-{os.getpid()}-{time.monotonic_ns()}"
    with cgroup(name) as path:
        (path / "cgroup.procs").write_text(str(inside.pid))
        policy = write_policy(
            public_dir,
            f'rules: [{{identities: ["uid:{NOBODY}"], verbs: [read], targets: {{cgroup_prefixes: ["/{name}"]}}}}]',
        )
        agent = start_agent("--socket-mode", "0666", "--policy", policy, socket_dir=public_dir)
        with ConnectAs(agent.socket_path, NOBODY) as nobody, Client(nobody.address, retry=NO_RETRY) as client:
            assert client.get_vma_info(inside.pid).process.pid == inside.pid
            expect_error(lambda: client.get_vma_info(outside.pid), "PERMISSION_DENIED", "POLICY_DENIED")
            assert [p.pid for p in client.list_processes()] == [inside.pid]
        with agent.client() as root:  # the policy names no uid:0: root is a stranger too
            expect_error(lambda: root.node_info(), "PERMISSION_DENIED", "POLICY_DENIED")


# ---- protected targets ------------------------------------------------------------------


def _advise_stack(client: Client, pid: int):
    info = client.get_vma_info(pid)  # reading a protected process is allowed
    stack = next(v for v in info.vmas if v.path == "[stack]")
    return lambda: client.advise_ranges(pid, [stack], "cold", cookie=info.cookie)


def test_the_agent_and_listed_targets_are_never_advised(start_agent, spawn_target, tmp_path):
    by_pid, free = spawn_target(), spawn_target()
    by_comm = subprocess.Popen(["sleep", "300"])
    policy = write_policy(
        tmp_path,
        f"""
protected_pids: [{by_pid.pid}]
protected_comm: ["slee*"]
rules: [{{identities: ["uid:0"], verbs: [read, advise]}}]
""",
    )
    agent = start_agent("--policy", policy)
    with agent.client() as client, contextlib.ExitStack() as cleanup:
        cleanup.callback(by_comm.wait)
        cleanup.callback(by_comm.kill)
        for pid, why in ((agent.proc.pid, "the agent itself"), (by_pid.pid, "protected_pids")):
            error = expect_error(_advise_stack(client, pid), "PERMISSION_DENIED", "PROTECTED_TARGET")
            assert why in error.metadata["protection"], error.metadata
        error = expect_error(_advise_stack(client, by_comm.pid), "PERMISSION_DENIED", "PROTECTED_TARGET")
        assert error.metadata["protection"] == "protected_comm 'slee*'"
        assert _advise_stack(client, free.pid)().syscalls == 1
    records = audit_records(agent.log())
    assert [(r["pid"], r["reason"], r["syscalls"]) for r in records] == [
        (agent.proc.pid, "PROTECTED_TARGET", 0),
        (by_pid.pid, "PROTECTED_TARGET", 0),
        (by_comm.pid, "PROTECTED_TARGET", 0),
        (free.pid, "", 1),
    ]
    assert records[0]["comm"] == comm_of(agent.proc.pid) and records[0]["start_time"] is not None


def test_the_agents_own_cgroup_is_protected(spawn_target, zram_swap):
    sibling = spawn_target()
    start, end = sibling.map_anon(MiB, seed=8)
    name = f"vmctl-agent-cg-{os.getpid()}-{time.monotonic_ns()}"
    with cgroup(name) as path, tempfile.TemporaryDirectory() as socket_dir:
        (path / "cgroup.procs").write_text(str(sibling.pid))
        agent = Agent([], pathlib.Path(socket_dir))
        try:
            # The agent learns its cgroup at start: it must be born inside.
            with open(agent.log_path, "ab") as log:
                agent.proc = subprocess.Popen(
                    [
                        *("sh", "-c", f'echo $$ > {path}/cgroup.procs && exec "$0" "$@"'),
                        *(sys.executable, "-m", "vmctl_server.agent", "--listen", agent.address),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            agent.wait_serving()
            with agent.client() as client:
                info = client.get_vma_info(sibling.pid)
                error = expect_error(
                    lambda: client.advise_ranges(sibling.pid, [(start, end)], "pageout", cookie=info.cookie),
                    "PERMISSION_DENIED",
                    "PROTECTED_TARGET",
                )
                assert error.metadata["protection"] == f"the agent's cgroup /{name}"
                untouched(sibling, start, 1024)
                (CGROUP2 / "cgroup.procs").write_text(str(sibling.pid))  # out of the agent's cgroup
                info = client.get_vma_info(sibling.pid)
                assert client.advise_ranges(sibling.pid, [(start, end)], "pageout", cookie=info.cookie).advised_bytes
        finally:
            assert agent.stop() == 0
            agent.discard_log()
    sibling.verify()


def test_require_cookie_is_the_policys_choice(start_agent, client, target, tmp_path):
    heap = next(v for v in client.get_vma_info(target.pid).vmas if v.path == "[heap]")
    expect_error(lambda: client.advise_ranges(target.pid, [heap], "cold"), "INVALID_ARGUMENT", "COOKIE_REQUIRED")
    relaxed = start_agent(
        # read too: advising takes leave to read (test_trust_targets.py)
        "--policy",
        write_policy(tmp_path, 'require_cookie: false\nrules: [{identities: ["uid:0"], verbs: [read, advise]}]'),
    )
    with relaxed.client() as relaxed_client:
        assert relaxed_client.advise_ranges(target.pid, [heap], "cold").advised_bytes == heap.size
    (record,) = audit_records(relaxed.log())
    assert record["cookie"] == "absent" and record["status"] == "OK"


# ---- the policy file ---------------------------------------------------------------------


def test_sighup_reloads_the_policy_and_a_bad_file_keeps_the_old_one(start_agent, target, public_dir):
    path = pathlib.Path(write_policy(public_dir, 'rules: [{identities: ["uid:0"], verbs: [read]}]'))
    agent = start_agent("--socket-mode", "0666", "--policy", str(path), socket_dir=public_dir)
    with ConnectAs(agent.socket_path, NOBODY) as nobody, Client(nobody.address, retry=NO_RETRY) as client:
        expect_error(lambda: client.get_vma_info(target.pid), "PERMISSION_DENIED", "POLICY_DENIED")
        path.write_text(f'rules: [{{identities: ["uid:{NOBODY}"], verbs: [read]}}]')
        agent.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "policy reloaded" in agent.log())
        assert client.get_vma_info(target.pid).process.pid == target.pid

        path.write_text(f'rules: [{{identities: ["uid:{NOBODY}"], verbs: [read], advices: [forget]}}]')
        agent.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "policy not reloaded" in agent.log())
        assert "rules[0].advices[0]: unknown advice 'forget'" in agent.log()
        assert client.get_vma_info(target.pid).process.pid == target.pid  # the old policy still holds
    assert agent.proc.poll() is None


@pytest.mark.unprivileged
@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "empty"),
        ("rules: [", "not valid YAML"),
        ("- a list", "expected a mapping"),
        ("require_cookie: true", "no rules key"),
        ("rules: []\nprotect_pids: [1]", "unknown key 'protect_pids'"),
        ("rules: [{identities: [root], verbs: [read]}]", "'root' is not an identity"),
        ("rules: [{identities: ['uid://0'], verbs: [read]}]", "reserved"),
        ("rules: [{identities: ['uid:0'], verbs: [write]}]", "unknown verb 'write'"),
        ("rules: [{identities: ['uid:0'], verbs: []}]", "needs at least one verb"),
        ("rules: [{identities: [], verbs: [read]}]", "needs at least one identity"),
        ("rules: [{identities: ['uid:0'], verbs: [read], targets: {cgroups: ['/']}}]", "unknown key 'cgroups'"),
        ("rules: [{identities: ['uid:0'], verbs: [read], targets: {cgroup_prefixes: [kubepods]}}]", "start with /"),
        ("rules: [{identities: ['uid:0'], verbs: [read], targets: {uids: [root]}}]", "expected uids"),
        ("require_cookie: maybe\nrules: []", "require_cookie: expected true or false"),
        ("protected_pids: [one]\nrules: []", "protected_pids[0]: expected pids"),
    ],
)
def test_a_bad_policy_file_is_refused_with_where_and_why(text, complaint, tmp_path):
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "policy.yaml")
    assert complaint in str(caught.value), caught.value
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmctl_server.agent",
            "--listen",
            f"unix://{tmp_path}/a.sock",
            "--policy",
            write_policy(tmp_path, text),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and complaint in result.stderr, result.stderr
    assert not (tmp_path / "a.sock").exists()


@pytest.mark.unprivileged
def test_the_shipped_kubernetes_policy_is_valid():
    shipped = REPO / "deploy" / "kubernetes" / "base" / "policy.yaml"
    if not shipped.exists():
        pytest.skip("no deploy/kubernetes/base/policy.yaml in this checkout")
    policy = load_policy(str(shipped))
    assert policy.require_cookie and policy.rules


# ---- TCP: mutual TLS only ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_is_mutual_tls_or_explicitly_insecure(start_agent, target, tmp_path):
    pki = Pki(tmp_path)
    server = pki.issue("agent", dns=["localhost"])
    port = _free_port()
    no_client_ca = subprocess.run(
        [*AGENT, "--listen", f"tcp://127.0.0.1:{port}", "--tls-cert", server.cert, "--tls-key", server.key],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no_client_ca.returncode == 2 and "--client-ca" in no_client_ca.stderr

    # Mutual TLS without a policy: a valid certificate authenticates, and is granted nothing.
    mtls = start_agent(
        *("--listen", f"tcp://127.0.0.1:{port}", "--tls-cert", server.cert, "--tls-key", server.key),
        *("--client-ca", pki.ca),
    )
    holder = pki.issue("reclaimer", uri="spiffe://cluster/ns/ops/sa/reclaimer")
    tls = TlsOptions(ca=pki.ca, cert=holder.cert, key=holder.key, server_name="localhost")
    with Client(f"127.0.0.1:{port}", tls=tls, retry=NO_RETRY) as stranger:
        error = expect_error(lambda: stranger.get_vma_info(target.pid), "PERMISSION_DENIED", "POLICY_DENIED")
        assert error.metadata["identity"] == "spiffe://cluster/ns/ops/sa/reclaimer"
    mtls.stop()

    port = _free_port()
    agent = start_agent("--listen", f"tcp://127.0.0.1:{port}", "--insecure")
    assert "SERVING PLAINTEXT" in agent.log()
    with Client(f"127.0.0.1:{port}", retry=NO_RETRY) as anonymous:
        error = expect_error(lambda: anonymous.get_vma_info(target.pid), "UNAUTHENTICATED", "UNAUTHENTICATED")
        assert error.metadata["transport"] == "plaintext"
    agent.stop()

    port = _free_port()
    trusting = start_agent(
        "--listen",
        f"tcp://127.0.0.1:{port}",
        "--insecure",
        "--policy",
        write_policy(tmp_path, "rules: [{identities: [anonymous], verbs: [read]}]"),
    )
    with Client(f"127.0.0.1:{port}", retry=NO_RETRY) as anonymous:
        assert anonymous.get_vma_info(target.pid).process.pid == target.pid
        expect_error(
            lambda: anonymous.advise_ranges(target.pid, [(0, PAGE)], "cold"), "UNAUTHENTICATED", "UNAUTHENTICATED"
        )
    assert trusting.proc.poll() is None


@pytest.fixture
def mtls_agent(start_agent, tmp_path):
    pki = Pki(tmp_path / "pki")
    server = pki.issue("agent", dns=["localhost"])
    port = _free_port()
    policy = write_policy(
        tmp_path,
        """
rules:
  - name: readers
    identities: ["spiffe://cluster/ns/ops/sa/reader", "dns:planner.example"]
    verbs: [read]
  - name: reclaimer
    identities: ["spiffe://cluster/ns/ops/sa/reclaimer"]
    verbs: [read, advise]
    advices: [cold, pageout]
""",
    )
    agent = start_agent(
        "--listen",
        f"tcp://127.0.0.1:{port}",
        "--tls-cert",
        server.cert,
        "--tls-key",
        server.key,
        "--client-ca",
        pki.ca,
        "--policy",
        policy,
    )

    def client(**cert_args) -> Client:
        tls = TlsOptions(ca=pki.ca, server_name="localhost", **cert_args)
        return Client(f"127.0.0.1:{port}", tls=tls, retry=NO_RETRY, timeout=10)

    def identity(name: str, **sans) -> Client:
        files = pki.issue(name, **sans)
        return client(cert=files.cert, key=files.key)

    return agent, pki, client, identity


def test_mtls_identity_and_policy_end_to_end(mtls_agent, target, zram_swap, tmp_path):
    agent, _pki, client, identity = mtls_agent
    start, end = target.map_anon(MiB, seed=5)

    with client() as no_certificate:  # refused in the handshake: never reaches a handler
        expect_error(lambda: no_certificate.node_info(), "UNAVAILABLE")
    stranger_pki = Pki(tmp_path / "stranger")
    stranger = stranger_pki.issue("reclaimer", uri="spiffe://cluster/ns/ops/sa/reclaimer")
    with client(cert=stranger.cert, key=stranger.key) as forged:  # right name, wrong CA
        expect_error(lambda: forged.node_info(), "UNAVAILABLE")

    with identity("reader", uri="spiffe://cluster/ns/ops/sa/reader", dns=["ignored.example"]) as reader:
        info = reader.get_vma_info(target.pid)
        error = expect_error(
            lambda: reader.advise_ranges(target.pid, [(start, end)], "pageout", cookie=info.cookie),
            "PERMISSION_DENIED",
            "POLICY_DENIED",
        )
        assert error.metadata["identity"] == "spiffe://cluster/ns/ops/sa/reader"
    untouched(target, start, 1024)
    with identity("planner", dns=["planner.example"]) as planner:  # no URI SAN: the DNS SAN names it
        assert planner.node_info().hostname
    with identity("ops") as common_name_only:  # cn:ops is in no rule
        error = expect_error(lambda: common_name_only.node_info(), "PERMISSION_DENIED", "POLICY_DENIED")
        assert error.metadata["identity"] == "cn:ops"
    with identity("uid:0", uri="uid:0") as impostor:  # a URI SAN that reads like a unix identity
        error = expect_error(lambda: impostor.node_info(), "PERMISSION_DENIED", "POLICY_DENIED")
        assert error.metadata["identity"] == "cn:uid:0"
    with identity("reclaimer", uri="spiffe://cluster/ns/ops/sa/reclaimer") as reclaimer:
        info = reclaimer.get_vma_info(target.pid)
        result = reclaimer.advise_ranges(target.pid, [(start, end)], "pageout", cookie=info.cookie)
        assert result.advised_bytes == MiB
        expect_error(
            lambda: reclaimer.advise_ranges(target.pid, [(start, end)], "willneed", cookie=info.cookie),
            "PERMISSION_DENIED",
            "POLICY_DENIED",
        )
    target.verify()
    records = audit_records(agent.log())
    assert [(r["identity"], r["transport"], r["advice"], r["status"]) for r in records] == [
        # Refused on its headers, before its request was read: which advice it asked for is not known.
        ("spiffe://cluster/ns/ops/sa/reader", "tls", None, "PERMISSION_DENIED"),
        ("spiffe://cluster/ns/ops/sa/reclaimer", "tls", "pageout", "OK"),
        ("spiffe://cluster/ns/ops/sa/reclaimer", "tls", "willneed", "PERMISSION_DENIED"),
    ]
    assert records[1]["peer"].startswith("ipv4:127.0.0.1:")


# ---- limits ------------------------------------------------------------------------------


@pytest.fixture
def big_target(spawn_target):
    """A target at vm.max_map_count VMAs: an accounting snapshot of it on the
    pure-Python path takes over a second, long enough to overlap other calls."""
    target = spawn_target()
    limit = int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())
    target.call("many_vmas", limit=limit)
    return target


def _in_background(call) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except Exception as exc:
            outcome["error"] = exc
        outcome["done"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_concurrency_limit_per_identity(start_agent, big_target, target, public_dir):
    policy = write_policy(public_dir, f'rules: [{{identities: ["uid:0", "uid:{NOBODY}"], verbs: [read]}}]')
    agent = start_agent(
        "--no-native", "--max-calls-per-identity", "1", "--socket-mode", "0666", "--policy", policy,
        socket_dir=public_dir,
    )  # fmt: skip
    refused = None
    with agent.client(retry=NO_RETRY) as slow, agent.client(retry=NO_RETRY) as second:
        second.node_info()  # connected before the slow call starts
        for _attempt in range(5):  # until a quick call lands while the slow one runs
            thread, outcome = _in_background(lambda: slow.get_vma_info(big_target.pid, attrs=["accounting"]))
            while thread.is_alive() and refused is None:
                try:
                    second.get_vma_info(target.pid)
                except Exception as exc:
                    refused = exc
                    # Another identity is not held back by uid 0's busy slot.
                    with ConnectAs(agent.socket_path, NOBODY) as nobody, Client(nobody.address) as other:
                        assert other.get_vma_info(target.pid).process.pid == target.pid
            thread.join()
            error = outcome.get("error")
            if getattr(error, "reason", None) == "CONCURRENCY_LIMIT":
                refused = None  # the quick call was admitted first and the slow one refused: try again
                continue
            assert error is None, outcome
            if refused is not None:
                break
        assert refused is not None, "the slow call never overlapped another"
        assert (refused.code, refused.reason) == ("RESOURCE_EXHAUSTED", "CONCURRENCY_LIMIT")
        assert refused.metadata == {"identity": "uid:0", "limit": "1"}
        assert second.get_vma_info(target.pid).process.pid == target.pid  # the slot is free again


def test_rate_limit_per_identity_and_health_is_never_limited(start_agent, target, public_dir):
    policy = write_policy(public_dir, f'rules: [{{identities: ["uid:0", "uid:{NOBODY}"], verbs: [read]}}]')
    agent = start_agent(
        "--rate-per-identity", "0.5", "--burst-per-identity", "3", "--socket-mode", "0666", "--policy", policy,
        socket_dir=public_dir,
    )  # fmt: skip
    with agent.client(retry=NO_RETRY) as client:
        for _ in range(3):
            client.node_info()
        error = expect_error(lambda: client.node_info(), "RESOURCE_EXHAUSTED", "RATE_LIMITED")
        retry_after = int(error.metadata["retry_after_ms"])
        assert 0 < retry_after <= 2000  # one token every 2 s
        with grpc.insecure_channel(agent.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(20):
                assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
        with ConnectAs(agent.socket_path, NOBODY) as nobody, Client(nobody.address) as other:
            assert other.node_info().hostname  # its own bucket
        time.sleep(retry_after / 1000 + 0.05)
        assert client.node_info().hostname


def test_health_answers_while_every_worker_is_busy(start_agent, big_target):
    agent = start_agent("--no-native", "--workers", "2", "--metrics-listen", "127.0.0.1:0")
    port = logged_port(agent, "metrics_port")
    clients = [agent.client() for _ in range(4)]
    try:
        for client in clients:
            client.node_info()  # connections up
        runs = [_in_background(lambda c=c: c.get_vma_info(big_target.pid, attrs=["accounting"])) for c in clients]
        wait_for(lambda: Scrape(port).in_flight("GetVmaInfo") == 4, "two calls running, two queued behind them")
        with grpc.insecure_channel(agent.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        answered = time.monotonic()
        for thread, _ in runs:
            thread.join()
    finally:
        for client in clients:
            client.close()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert all("error" not in outcome for _, outcome in runs), runs
    # Before even the first snapshot finished: health never waited for a VmControl worker.
    assert answered < min(outcome["done"] for _, outcome in runs)


def _refused(sock: socket.socket) -> bool:
    """Whether the gateway closed this connection unread (it never does for one it relays)."""
    sock.settimeout(1.0)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


def test_connections_per_uid_are_bounded(start_agent):
    agent = start_agent("--max-connections-per-uid", "2")
    held: list[socket.socket] = []

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(agent.socket_path))
        held.append(sock)
        return sock

    try:
        # The fixture's own health check may still hold a slot for a moment.
        wait_for(lambda: not _refused(connect()) or held.pop().close())
        assert not _refused(connect())
        assert _refused(connect())  # the third: accepted by the kernel, closed by the gateway
        assert "refused a connection from uid 0" in agent.log()
        held[0].close()
        wait_for(lambda: _one_call_works(agent))
    finally:
        for sock in held:
            sock.close()


def _one_call_works(agent) -> bool:
    try:
        with agent.client(retry=NO_RETRY, timeout=5) as client:
            return bool(client.node_info().hostname)
    except Exception:
        return False


# ---- the audit log -----------------------------------------------------------------------


def test_audit_file_gets_one_flushed_line_per_advise(start_agent, target, tmp_path, zram_swap):
    log_path = tmp_path / "audit.jsonl"
    agent = start_agent("--audit-log", str(log_path))
    assert log_path.stat().st_mode & 0o777 == 0o600
    start, end = target.map_anon(2 * MiB, seed=6)
    with agent.client() as client:
        info = client.get_vma_info(target.pid)
        client.advise_ranges(target.pid, [(start, end)], "pageout", cookie=info.cookie, filter="anonymous")
        assert len(audit_records(log_path)) == 1  # on disk before the reply came back
        expect_error(
            lambda: client.advise_ranges(target.pid, [(start, end)], "cold", cookie=info.cookie[:-1] + b"x"),
            "INVALID_ARGUMENT",
            "COOKIE_INVALID",
        )
        assert len(audit_records(log_path)) == 2
        client.advise_ranges(target.pid, [(start, end)], "cold", cookie=info.cookie, dry_run=True)
        target.map_anon(PAGE)
        expect_error(
            lambda: client.advise_ranges(target.pid, [(start, end)], "cold", cookie=info.cookie),
            "FAILED_PRECONDITION",
            "LAYOUT_CHANGED",
        )
        expect_error(lambda: client.advise_ranges(target.pid, [(start, end)], "cold"), "INVALID_ARGUMENT")
    records = audit_records(log_path)
    assert [(r["advice"], r["cookie"], r["status"], r["reason"], r["dry_run"]) for r in records] == [
        ("pageout", "valid", "OK", "", False),
        ("cold", "invalid", "INVALID_ARGUMENT", "COOKIE_INVALID", False),
        ("cold", "valid", "OK", "", True),
        ("cold", "layout_changed", "FAILED_PRECONDITION", "LAYOUT_CHANGED", False),
        ("cold", "missing", "INVALID_ARGUMENT", "COOKIE_REQUIRED", False),
    ]
    first = records[0]
    assert first["filter"] == "anonymous" and first["ranges"] == 1
    assert first["requested_bytes"] == first["advised_bytes"] == 2 * MiB and first["syscalls"] == 1
    assert (first["pid"], first["comm"]) == (target.pid, comm_of(target.pid))
    assert first["start_time"] == info.process.start_time and first["cgroup"].startswith("/")
    assert first["time"].endswith("Z") and first["identity"] == "uid:0"
    assert records[2]["advised_bytes"] == 2 * MiB and records[2]["syscalls"] == 0  # dry run
    # The one call that made system calls had its intent on record before them, under the same request id.
    everything = audit_records(log_path, event=None)
    (intent,) = [r for r in everything if r["event"] == "advise_intent"]
    assert everything.index(intent) < everything.index(first) and intent["request_id"] == first["request_id"]
    assert (intent["pid"], intent["advice"], intent["requested_bytes"], intent["cookie"]) == (
        target.pid, "pageout", 2 * MiB, "valid",
    )  # fmt: skip
    for record in records:  # nothing secret: no cookie bytes in any form
        assert info.cookie.hex() not in json.dumps(record)
    target.verify()


@pytest.mark.unprivileged
def test_an_unwritable_audit_log_stops_the_agent_at_start(tmp_path):
    result = subprocess.run(
        [*AGENT, "--listen", f"unix://{tmp_path}/a.sock", "--audit-log", "/dev/full"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "cannot write the audit log /dev/full" in result.stderr
    assert not (tmp_path / "a.sock").exists()


def test_the_audit_log_fails_closed(tmp_path, target, zram_swap):
    """Once a record cannot be written, no further advice is applied."""
    socket_path = tmp_path / "agent.sock"
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "vmctl_server.agent", "--listen", f"unix://{socket_path}"],
            stdout=subprocess.PIPE,  # the audit log: standard output
            stderr=log,
        )
    try:
        assert b"agent_started" in agent.stdout.readline()
        start, end = target.map_anon(MiB, seed=7)
        wait_for(socket_path.exists)
        with Client(f"unix://{socket_path}") as client:
            info = client.get_vma_info(target.pid)
            agent.stdout.close()  # whoever read the audit log went away
            # The record of the call's intent cannot be written before the advice: nothing is applied.
            for advice in ("pageout", "pageout"):
                expect_error(
                    lambda advice=advice: client.advise_ranges(target.pid, [(start, end)], advice, cookie=info.cookie),
                    "UNAVAILABLE",
                    "AUDIT_UNAVAILABLE",
                )
            # A dry run applies nothing and reads go on.
            dry = client.advise_ranges(target.pid, [(start, end)], "pageout", cookie=info.cookie, dry_run=True)
            assert dry.syscalls == 0
            assert client.get_vma_info(target.pid).process.pid == target.pid
        untouched(target, start, 1024)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
    assert "cannot write the audit log" in log_path.read_text()


@pytest.mark.unprivileged
def test_the_readme_policy_example_is_valid():
    """The minimal policy the README shows parses with the agent's own parser and means what it says."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("```yaml\n", readme.index("**A minimal policy.**")) + len("```yaml\n")
    policy = parse_policy(readme[start : readme.index("```", start)], "README.md")
    assert policy.require_cookie and policy.protected_comm == ("sshd",)
    assert [rule.name for rule in policy.rules] == ["operators-read", "operators-cool-the-batch-jobs"]
    assert policy.rules[1].advices == frozenset({"cold", "pageout"})

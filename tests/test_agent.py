"""The agent as a program: sockets, shutdown, keys, health, reflection, TLS,
ListProcesses and GetNodeInfo."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import os
import pathlib
import secrets
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from support.expect import expect_error
from support.scrape import Scrape, logged_port
from support.waiting import wait_for

from vmctl_api import vmctl_pb2 as pb
from vmctl_client import Client, TlsOptions
from vmctl_server.core.node import container_id

CGROUP2 = pathlib.Path("/sys/fs/cgroup/unified")
if not (CGROUP2 / "cgroup.procs").exists():
    CGROUP2 = pathlib.Path("/sys/fs/cgroup")


def test_socket_directory_is_created_and_socket_is_0600(start_agent, tmp_path):
    nested = tmp_path / "run" / "vmctl"
    agent = start_agent(socket_dir=nested)
    assert stat.S_IMODE(os.stat(agent.socket_path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(agent.socket_path).st_mode)


def test_sigterm_lets_in_flight_calls_finish_and_removes_the_socket(start_agent, target):
    # The slower path keeps the call in flight longer.
    agent = start_agent("--no-native", "--metrics-listen", "127.0.0.1:0")
    metrics_port = logged_port(agent, "metrics_port")
    limit = int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())
    target.call("many_vmas", limit=limit)
    outcome: dict = {}
    connected = threading.Event()

    def slow_call() -> None:
        with agent.client() as client:
            try:
                client.node_info()  # the connection is up before the slow call starts
                connected.set()
                outcome["vmas"] = len(client.get_vma_info(target.pid, attrs=["accounting"]).vmas)
            except Exception as exc:
                outcome["error"] = exc
            outcome["finished"] = time.monotonic()

    caller = threading.Thread(target=slow_call)
    caller.start()
    assert connected.wait(30), outcome
    wait_for(lambda: Scrape(metrics_port).in_flight("GetVmaInfo") == 1, what="the slow call admitted")
    sent = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    caller.join(60)
    assert agent.proc.wait(60) == 0, agent.log()
    assert "error" not in outcome, outcome
    assert outcome["vmas"] > limit - 100
    assert outcome["finished"] > sent, "the call ended before SIGTERM: nothing was in flight"
    assert not agent.socket_path.exists()


def test_sigint_also_stops_cleanly(start_agent):
    agent = start_agent()
    assert agent.stop(signal.SIGINT) == 0


SYS_TGKILL = 234  # x86_64


def test_sigterm_delivered_to_any_thread_stops_the_agent(start_agent):
    """A container runtime's kill may reach any thread; the agent hears it from each.

    (It used to wait in the main thread with no timeout, so a signal the
    kernel delivered to another thread was noted and never acted on: podman
    stop lost it 2 runs in 4, leaving the socket behind.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    for turn in range(4):
        agent = start_agent()
        with agent.client() as client:
            client.node_info()  # a worker, the gateway's relays: more threads to choose from
        while True:  # a thread may end between the listing and the signal (a connection's relay): pick again
            tids = sorted(int(t) for t in os.listdir(f"/proc/{agent.proc.pid}/task") if int(t) != agent.proc.pid)
            tid = tids[(turn * 7) % len(tids)]
            if libc.syscall(SYS_TGKILL, agent.proc.pid, tid, signal.SIGTERM) == 0:
                break
            assert ctypes.get_errno() == errno.ESRCH, ctypes.get_errno()
        assert agent.proc.wait(30) == 0, agent.log()
        assert not agent.socket_path.exists()
        assert "stopped" in agent.log()
    assert not agent.socket_path.exists()


def test_a_live_agent_socket_is_never_stolen(start_agent, tmp_path):
    first = start_agent(socket_dir=tmp_path)
    second = subprocess.run(
        [sys.executable, "-m", "vmctl_server.agent", "--listen", first.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0
    assert "already serving" in second.stderr
    with first.client() as client:
        assert client.node_info().hostname


def test_a_stale_socket_is_replaced(start_agent, tmp_path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "agent.sock"))
    stale.close()  # the file stays; nobody accepts on it
    agent = start_agent(socket_dir=tmp_path)
    with agent.client() as client:
        assert client.node_info().hostname


def test_cookie_key_file_keeps_cookies_valid_across_restarts(start_agent, target, tmp_path):
    key_file = tmp_path / "cookie.key"
    agent = start_agent("--cookie-key-file", str(key_file))
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert len(key_file.read_bytes()) == 32
    with agent.client() as client:
        info = client.get_vma_info(target.pid)
    heap = next(v for v in info.vmas if v.path == "[heap]")
    agent.stop()

    restarted = start_agent("--cookie-key-file", str(key_file))
    with restarted.client() as client:
        assert client.advise_ranges(target.pid, [heap], "cold", cookie=info.cookie).advised_bytes == heap.size
    restarted.stop()

    random_key = start_agent()
    with random_key.client() as client:
        expect_error(
            lambda: client.advise_ranges(target.pid, [heap], "cold", cookie=info.cookie),
            "INVALID_ARGUMENT",
            "COOKIE_INVALID",
        )


@pytest.mark.unprivileged
def test_a_readable_key_file_is_refused(tmp_path):
    key_file = tmp_path / "cookie.key"
    key_file.write_bytes(secrets.token_bytes(32))
    key_file.chmod(0o644)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmctl_server.agent",
            "--listen",
            f"unix://{tmp_path}/a.sock",
            "--cookie-key-file",
            str(key_file),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "chmod 600" in result.stderr
    assert not (tmp_path / "a.sock").exists()


def test_health_and_reflection(agent):
    with grpc.insecure_channel(agent.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "vmctl.v1.VmControl"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert "vmctl.v1.VmControl" in services
        assert "grpc.health.v1.Health" in services
        method_names = {m.name for m in database.FindFileContainingSymbol("vmctl.v1.VmControl").service}
        assert method_names == {"VmControl"}


@pytest.mark.unprivileged
def test_tcp_without_tls_is_refused_unless_insecure():
    refused = subprocess.run(
        [sys.executable, "-m", "vmctl_server.agent", "--listen", "tcp://127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "--tls-cert" in refused.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_pki(directory: pathlib.Path) -> dict[str, str]:
    """A CA, a server certificate for localhost and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def write(name: str, data: bytes) -> str:
        path = directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        return str(path)

    def issue(subject: str, key, issuer_name, issuer_key, *, ca: bool = False, san=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def pem_key(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmctl test CA")])
    ca_cert = issue("vmctl test CA", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = issue("localhost", server_key, ca_name, ca_key, san=[x509.DNSName("localhost")])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = issue(
        "reclaimer",
        client_key,
        ca_name,
        ca_key,
        san=[x509.UniformResourceIdentifier("spiffe://cluster/ns/ops/sa/reclaimer")],
    )
    encoding = serialization.Encoding.PEM
    return {
        "ca": write("ca.pem", ca_cert.public_bytes(encoding)),
        "server_cert": write("server.pem", server_cert.public_bytes(encoding)),
        "server_key": write("server.key", pem_key(server_key)),
        "client_cert": write("client.pem", client_cert.public_bytes(encoding)),
        "client_key": write("client.key", pem_key(client_key)),
    }


def test_mutual_tls_over_tcp(start_agent, tmp_path, target):
    pki = _make_pki(tmp_path)
    port = _free_port()
    policy = tmp_path / "policy.yaml"  # without one, only root on the unix socket may call
    policy.write_text('rules: [{identities: ["spiffe://cluster/ns/ops/sa/reclaimer"], verbs: [read]}]\n')
    start_agent(
        "--policy",
        str(policy),
        "--listen",
        f"tcp://127.0.0.1:{port}",
        "--tls-cert",
        pki["server_cert"],
        "--tls-key",
        pki["server_key"],
        "--client-ca",
        pki["ca"],
    )
    tls = TlsOptions(ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"], server_name="localhost")
    with Client(f"127.0.0.1:{port}", tls=tls) as client:
        assert client.get_vma_info(target.pid).process.pid == target.pid
    with Client(f"127.0.0.1:{port}", tls=TlsOptions(ca=pki["ca"], server_name="localhost"), timeout=5) as anonymous:
        expect_error(lambda: anonymous.node_info(), "UNAVAILABLE")


@contextlib.contextmanager
def cgroup(name: str):
    """A real cgroup v2 directory, removed afterwards (its processes moved out)."""
    path = CGROUP2 / name
    path.mkdir()
    try:
        yield path
    finally:
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (CGROUP2 / "cgroup.procs").write_text(pid)
        path.rmdir()


def test_list_processes_reads_cgroups_and_container_ids(client, spawn_target):
    outsider, insider = spawn_target(), spawn_target()
    container = secrets.token_hex(32)
    with tempfile.TemporaryDirectory() as unique:
        name = f"vmctl-test-{os.path.basename(unique)}-docker-{container}.scope"
    with cgroup(name) as path:
        (path / "cgroup.procs").write_text(str(insider.pid))
        prefix = f"/{name}"
        listed = client.list_processes(cgroup_prefix=prefix)
        assert [p.pid for p in listed] == [insider.pid]
        (entry,) = listed
        assert entry.cgroup == prefix
        assert entry.container_id == container
        assert entry.comm == pathlib.Path(f"/proc/{insider.pid}/comm").read_text().strip()
        assert entry.vma_count == 0  # not asked for: no maps file was read
        assert entry.to_json()["vma_count"] is None
        (counted,) = client.list_processes(cgroup_prefix=prefix, vma_count=True)
        with open(f"/proc/{insider.pid}/maps") as f:
            assert counted.vma_count == sum(1 for _ in f) > 0
        assert counted.to_json()["vma_count"] == counted.vma_count
        assert entry.rss_bytes > 0 and entry.uid == 0 and entry.ppid == os.getpid()
        with open(f"/proc/{insider.pid}/stat") as f:
            assert entry.start_time == int(f.read().rsplit(")", 1)[1].split()[19])

    everyone = {p.pid for p in client.list_processes()}
    assert {outsider.pid, insider.pid, os.getpid()} <= everyone
    assert {p.vma_count for p in client.list_processes()} == {0}
    assert all(p.vma_count > 0 for p in client.list_processes(vma_count=True))
    assert 2 not in everyone  # kthreadd: kernel threads are not listed
    assert client.list_processes(cgroup_prefix="/no-such-cgroup-anywhere") == []


@pytest.mark.unprivileged
@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/docker/" + "a" * 64, "a" * 64),
        ("/system.slice/docker-" + "b" * 64 + ".scope", "b" * 64),
        (
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-"
            + "c" * 64
            + ".scope",
            "c" * 64,
        ),
        ("/kubepods/besteffort/pod12/" + "d" * 64, "d" * 64),
        ("/machine.slice/libpod-" + "e" * 64 + ".scope", "e" * 64),
        ("/user.slice/user-0.slice/session-3.scope", ""),
        ("/", ""),
    ],
)
def test_container_id_from_cgroup_path(path, expected):
    assert container_id(path) == expected


def test_node_info(client):
    info = client.node_info()
    assert info.hostname == os.uname().nodename
    assert info.kernel == os.uname().release
    assert info.boot_id == pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert info.page_size == os.sysconf("SC_PAGE_SIZE")
    assert info.mem_total_bytes == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    caps = info.capabilities
    assert caps.pidfd_open and caps.process_madvise and caps.advice_permitted
    assert set(caps.advices) == {pb.ADVICE_COLD, pb.ADVICE_PAGEOUT, pb.ADVICE_WILLNEED, pb.ADVICE_COLLAPSE}
    assert caps.procmap_query and caps.pagemap_scan  # Linux 6.11+ and 6.7+
    assert caps.access_sampling == "clear_refs" and "access_sampling" not in caps.probe_errors  # root: any process
    if os.path.exists("/proc/pressure/memory"):
        assert info.HasField("memory_pressure")

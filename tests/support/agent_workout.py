"""Everything the deployed agent does, done to one agent.

The DaemonSet's agent, with the cluster-mtls overlay's flags, on this
machine: the unix socket (through the gateway), mutual TLS on ``[::]``,
the health-only and metrics listeners on ``[::]``, every RPC and the
refusals a caller can provoke, reflection, a policy reload on SIGHUP (a bad
file, then a good one) and the drain on SIGTERM. The seccomp profile is
derived from this workout run under strace (scripts/trace_agent_syscalls.py)
and checked by running it under the profile (tests/test_seccomp_profile.py),
so the two cannot drift apart.

The agent is started by the caller (under strace, or under the profile) with
``Rig.agent_args()``; each step takes the agent's pid for the signals, since
the process the caller holds may be a tracer in front of it.
"""

from __future__ import annotations

import ctypes
import json
import pathlib
import signal
import socket
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from vmctl_client import Client, TlsOptions, VmctlError
from vmctl_client.calls import RetryPolicy

from .certs import CertFiles, Pki
from .waiting import wait_for

ROOT = pathlib.Path(__file__).resolve().parents[2]
POLICY_FILE = ROOT / "deploy" / "kubernetes" / "base" / "policy.yaml"  # the ConfigMap's file
READER = "spiffe://cluster.local/ns/vmctl-controllers/sa/observer"  # may read (base policy)
RECLAIMER = "spiffe://cluster.local/ns/vmctl-controllers/sa/reclaimer"  # /kubepods only (base policy)
MiB = 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)
LOOPBACKS = ("127.0.0.1", "::1")  # the listeners bind [::]: both families must answer
# The DaemonSet's flags, by name, that a rig sets (tests/test_seccomp_profile.py checks this against the
# rendered cluster-mtls overlay, so the workout runs the agent the way the DaemonSet does).
FLAGS = (
    "--listen",
    "--cookie-key-file",
    "--policy",
    "--health-listen",
    "--metrics-listen",
    "--log-format",
    "--tls-cert",
    "--tls-key",
    "--client-ca",
)


def free_tcp_port() -> int:
    """A port free on [::] (and so on 0.0.0.0) now; the agent binds it next."""
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::", 0))
        return s.getsockname()[1]


def signal_main_thread(pid: int, signum: int) -> None:
    """Send ``signum`` to the process's main thread (tgkill), where Python runs signal handlers.
    A process-directed kill(2) may be delivered to another thread (under strace, whenever the main
    thread is in a ptrace stop), and until issue 9 item 10(b) is fixed the agent's main thread does
    not wake for it: the workout must not depend on that."""
    if _libc.tgkill(pid, pid, signum) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {signum})")


@dataclass
class Rig:
    """The files and addresses of one DaemonSet-shaped agent, under ``directory``."""

    directory: pathlib.Path
    pki: Pki
    server: CertFiles
    reader: CertFiles
    reclaimer: CertFiles
    tcp_port: int

    @classmethod
    def create(cls, directory: pathlib.Path) -> Rig:
        (directory / "state").mkdir(mode=0o700, parents=True)
        pki = Pki(directory / "pki")
        rig = cls(
            directory=directory,
            pki=pki,
            server=pki.issue("vmctl-agent", dns=["vmctl-agent.vmctl-system.svc"]),
            reader=pki.issue("observer", uri=READER),
            reclaimer=pki.issue("reclaimer", uri=RECLAIMER),
            tcp_port=free_tcp_port(),
        )
        rig.policy_path.write_text(POLICY_FILE.read_text())
        return rig

    @property
    def policy_path(self) -> pathlib.Path:
        return self.directory / "policy.yaml"

    def agent_args(self) -> list[str]:
        """The DaemonSet's arguments, with this rig's files, and port 0 where the agent logs what it bound.
        (The unix socket's --listen is the caller's: support.agents.Agent adds it.)"""
        return [
            f"--cookie-key-file={self.directory}/state/cookie.key",
            f"--policy={self.policy_path}",
            "--health-listen=[::]:0",
            "--metrics-listen=[::]:0",
            "--log-format=json",
            f"--listen=tcp://[::]:{self.tcp_port}",
            f"--tls-cert={self.server.cert}",
            f"--tls-key={self.server.key}",
            f"--client-ca={self.pki.ca}",
        ]

    def tls(self, holder: CertFiles) -> TlsOptions:
        return TlsOptions(ca=self.pki.ca, cert=holder.cert, key=holder.key, server_name="vmctl-agent.vmctl-system.svc")


def logged_port(log: str, field: str) -> int:
    """The port the agent logged binding (it was given port 0)."""
    for line in log.splitlines():
        if line.startswith("{"):
            value = json.loads(line).get(field)
            if value is not None:
                return int(value)
    raise AssertionError(f"the agent logged no {field}:\n{log}")


def _expect_refusal(call: Callable[[], object], reason: str) -> None:
    try:
        call()
    except VmctlError as error:
        assert error.reason == reason, f"expected {reason}, got {error.code} {error.reason}: {error.message}"
    else:
        raise AssertionError(f"expected {reason}, the call succeeded")


def exercise_vmcontrol(client: Client, target) -> None:
    """Every RPC on ``target`` (a support.processes.Target), every advice, and the refusals a caller can provoke;
    the target's memory is checked byte for byte after."""
    node = client.node_info()
    assert node.capabilities.advice_permitted, node.capabilities
    assert any(p.pid == target.pid for p in client.list_processes())
    assert client.list_processes("/no-such-cgroup") == []
    start, end = target.map_anon(4 * MiB, seed=7)
    info = client.get_vma_info(target.pid, attrs=("all",))
    assert next(v for v in info.vmas if v.start == start).rss == end - start
    assert {"cold", "pageout"} <= set(node.advice_names), node.advice_names
    for advice in node.advice_names:  # every advice this kernel has (collapse needs 6.1)
        result = client.advise_ranges(target.pid, [(start, end)], advice=advice, cookie=info.cookie)
        assert result.requested_bytes == end - start, (advice, result)
        if advice == "cold":  # always applies to present anonymous memory: the kernel really was called
            assert result.advised_bytes == end - start and result.syscalls == 1, result
    dry = client.advise_ranges(target.pid, [(start, end)], advice="pageout", cookie=info.cookie, dry_run=True)
    assert dry.syscalls == 0
    target.verify()

    forged = bytes(b ^ 0x5A for b in info.cookie)
    _expect_refusal(lambda: client.advise_ranges(target.pid, [(start, end)], "cold", cookie=forged), "COOKIE_INVALID")
    target.map_anon(MiB, seed=8)  # the layout moves: the old cookie is stale
    _expect_refusal(
        lambda: client.advise_ranges(target.pid, [(start, end)], "cold", cookie=info.cookie), "LAYOUT_CHANGED"
    )
    scoped = client.advise_ranges(target.pid, [(start, end)], "cold", cookie=info.cookie, scope="ranges")
    assert (scoped.scope, scoped.advised_bytes) == ("ranges", end - start), scoped  # PROCMAP_QUERY per range
    _expect_refusal(lambda: client.advise_ranges(1, [(start, end)], "cold", cookie=info.cookie), "COOKIE_INVALID")
    _expect_refusal(lambda: client.get_vma_info(2), "NO_ADDRESS_SPACE")  # kthreadd
    _expect_refusal(lambda: client.get_vma_info(4_000_000), "PROCESS_GONE")
    target.verify()


def exercise_tls(rig: Rig, target) -> None:
    """Mutual TLS on [::] from both families: the reader reads, the reclaimer is held to /kubepods,
    a client without a certificate never gets an answer."""
    for host in LOOPBACKS:
        address = f"[{host}]:{rig.tcp_port}" if ":" in host else f"{host}:{rig.tcp_port}"
        with Client(address, tls=rig.tls(rig.reader), timeout=20) as reader:
            assert reader.get_vma_info(target.pid).process.pid == target.pid
            assert reader.node_info().hostname
        with Client(address, tls=rig.tls(rig.reclaimer), timeout=20) as reclaimer:
            _expect_refusal(lambda: reclaimer.get_vma_info(target.pid), "POLICY_DENIED")
        anonymous = TlsOptions(ca=rig.pki.ca, server_name="vmctl-agent.vmctl-system.svc")
        with Client(address, tls=anonymous, timeout=20, retry=RetryPolicy(attempts=1)) as stranger:
            try:
                stranger.node_info()
            except VmctlError as error:
                assert error.code == "UNAVAILABLE", error  # refused in the handshake
            else:
                raise AssertionError("a client without a certificate was answered")


def exercise_reflection(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = stub.ServerReflectionInfo(iter([request]), timeout=20)
        names = {s.name for s in reply.list_services_response.service}
        assert "vmctl.v1.VmControl" in names, names


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def exercise_operations(log: str) -> None:
    """The health-only and metrics listeners, each over IPv4 and IPv6."""
    health_port, metrics_port = logged_port(log, "health_port"), logged_port(log, "metrics_port")
    for host in LOOPBACKS:
        bracketed = f"[{host}]" if ":" in host else host
        for service in ("", "vmctl.v1.VmControl"):
            assert health_status(f"{bracketed}:{health_port}", service) == health_pb2.HealthCheckResponse.SERVING
        with urllib.request.urlopen(f"http://{bracketed}:{metrics_port}/metrics", timeout=10) as reply:
            assert reply.status == 200
            assert b"grpc_server_handled_total" in reply.read()


def _reader_of(rig: Rig, holder: CertFiles, target) -> Callable[[], bool]:
    """A check: may ``holder`` read ``target`` now?"""

    def may_read() -> bool:
        with Client(f"127.0.0.1:{rig.tcp_port}", tls=rig.tls(holder), timeout=20) as client:
            try:
                return client.get_vma_info(target.pid).process.pid == target.pid
            except VmctlError as error:
                assert error.reason == "POLICY_DENIED", error
                return False

    return may_read


def reload_policy(rig: Rig, agent_pid: int, log: Callable[[], str], target) -> None:
    """SIGHUP twice: a broken file keeps the policy in force (the agent says why), a good one that
    grants the reclaimer every target takes effect (its read of the target, refused before, is
    answered)."""
    reclaimer_may_read = _reader_of(rig, rig.reclaimer, target)
    assert not reclaimer_may_read()
    original, logged = rig.policy_path.read_text(), len(log())
    rig.policy_path.write_text("rules: [this is not a policy\n")
    signal_main_thread(agent_pid, signal.SIGHUP)
    wait_for(lambda: "policy" in log()[logged:], "the agent to refuse the broken policy")
    assert not reclaimer_may_read()
    policy = yaml.safe_load(original)
    policy["rules"].append({"name": "workout", "identities": [RECLAIMER], "verbs": ["read"]})
    rig.policy_path.write_text(yaml.safe_dump(policy))
    signal_main_thread(agent_pid, signal.SIGHUP)
    wait_for(reclaimer_may_read, "the reloaded policy to let the reclaimer read")


def exercise_everything(rig: Rig, agent, agent_pid: int, targets: list) -> None:
    """All of the above but the drain; ``agent`` is a support.agents.Agent already serving."""
    with agent.client() as client:
        for target in targets:
            exercise_vmcontrol(client, target)
    exercise_reflection(agent.address)
    exercise_tls(rig, targets[0])
    exercise_operations(agent.log())
    reload_policy(rig, agent_pid, agent.log, targets[0])


def drain(agent_pid: int, wait: Callable[[], int], socket_path: pathlib.Path) -> int:
    """SIGTERM: the agent drains and exits; returns its status. Its socket must be gone."""
    signal_main_thread(agent_pid, signal.SIGTERM)
    status = wait()
    assert not socket_path.exists(), "the agent left its socket behind"
    return status

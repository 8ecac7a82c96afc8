"""A fleet on one machine: several hosts, each a network namespace with its
own address, its own PID namespace (and /proc), its own agent on TCP with
mutual TLS, and its own target processes. The CLI works on all of them at
once; a host whose agent was killed and one whose link is down fail alone,
within the deadline.

Topology: per host a veth pair, one end in the root namespace
(10.X.i.1/30), the other in the host's namespace (10.X.i.2/30), where the
agent listens. Every host's pid 1 is a ``sleep`` started by ``unshare
--pid --fork --mount-proc``; agents and targets join it with ``nsenter``, so
an agent reads a /proc that shows its own host's processes only, with its
own pids. The targets of every host sit in one cgroup v2 path (like one pod
spec on every node); each agent sees only the members it can see.
Everything (processes, namespaces, links, cgroup, /etc/hosts lines) is
removed in ``finally`` blocks, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from support.certs import CertFiles, Pki
from support.cgroup2 import CGROUP2, cgroup
from support.processes import PAGE, TARGET_SCRIPT, Target, child_of

from vmctl_client import Client, RetryPolicy, TlsOptions, VmctlError

HOSTS = 4
TARGETS_PER_HOST = 2
PORT = 7443
ETC_HOSTS = pathlib.Path("/etc/hosts")
REGION = 64 * PAGE

pytestmark = pytest.mark.skipif(CGROUP2 is None, reason="needs a cgroup v2 hierarchy")


# ---- hosts ---------------------------------------------------------------------


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def _start_time(pid: int) -> int:
    return int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


@dataclass
class Host:
    index: int
    netns: str
    veth_root: str
    veth_host: str
    ip: str
    log: pathlib.Path
    init: subprocess.Popen | None = None
    init_pid: int = 0  # the namespace's pid 1, as the root namespace numbers it
    agent: subprocess.Popen | None = None
    agent_pid: int = 0
    targets: list[Target] = field(default_factory=list)
    # (pid inside the host, start time) of each target: what its agent reports
    identities: set[tuple[int, int]] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"{self.ip}:{PORT}"

    def enter(self) -> list[str]:
        """A command prefix that runs inside this host: its network, its pids, its /proc."""
        return ["nsenter", "-t", str(self.init_pid), "-p", "-m", "-n", "--"]


class Fleet:
    """Builds the hosts and takes every one of them down again."""

    def __init__(self, workdir: pathlib.Path, group: pathlib.Path) -> None:
        self.tag = secrets.token_hex(2)
        self.workdir = workdir
        self.subnet = self._free_subnet()
        self.cgroup = group
        self.dns_name = f"vmctl-fleet-{self.tag}.test"
        self.hosts = [
            Host(
                index=i,
                netns=f"vmctl-{self.tag}-h{i}",
                veth_root=f"vm{self.tag}h{i}r",
                veth_host=f"vm{self.tag}h{i}n",
                ip=f"10.{self.subnet}.{i}.2",
                log=workdir / f"agent-{i}.log",
            )
            for i in range(HOSTS)
        ]
        self.pki = Pki(workdir / "pki")
        self.controller: CertFiles = self.pki.issue("controller")
        self.policy = workdir / "policy.yaml"
        self.hosts_lines: list[str] = []

    def _policy(self) -> list[str]:
        """An agent with authorization grants a TCP client nothing by default:
        let the controller's certificate read and advise."""
        usage = subprocess.run(
            [sys.executable, "-m", "vmctl_server.agent", "--help"], capture_output=True, text=True, check=True
        ).stdout
        if "--policy" not in usage:
            return []
        policy = self.workdir / "policy.yaml"
        policy.write_text(
            "rules:\n  - name: fleet-controller\n    identities: [cn:controller]\n    verbs: [read, advise]\n"
        )
        return ["--policy", str(policy)]

    @staticmethod
    def _free_subnet() -> int:
        used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
        for _ in range(100):
            octet = 200 + secrets.randbelow(50)
            if f" 10.{octet}." not in used:
                return octet
        raise RuntimeError("no free 10.x subnet for the test hosts")

    @property
    def tls_args(self) -> list[str]:
        return ["--ca", self.pki.ca, "--cert", self.controller.cert, "--key", self.controller.key]

    @property
    def tls(self) -> TlsOptions:
        return TlsOptions(ca=self.pki.ca, cert=self.controller.cert, key=self.controller.key)

    # -- bring up

    def up(self) -> None:
        # A TCP client is granted nothing by default: the controller's certificate may read and advise.
        self.policy.write_text("rules:\n  - identities: [cn:controller]\n    verbs: [read, advise]\n")
        for host in self.hosts:
            self._network(host)
            self._pid_namespace(host)
        for host in self.hosts:
            self._start_agent(host)
        for host in self.hosts:
            for _ in range(TARGETS_PER_HOST):
                self._spawn_target(host)
        for host in self.hosts:
            self._wait_serving(host)
        self.hosts_lines = [f"{h.ip} {self.dns_name}" for h in self.hosts]
        with ETC_HOSTS.open("a") as f:
            f.write("".join(line + "\n" for line in self.hosts_lines))

    def _network(self, host: Host) -> None:
        _run("ip", "netns", "add", host.netns)
        _run("ip", "link", "add", host.veth_root, "type", "veth", "peer", "name", host.veth_host)
        _run("ip", "link", "set", host.veth_host, "netns", host.netns)
        _run("ip", "addr", "add", f"10.{self.subnet}.{host.index}.1/30", "dev", host.veth_root)
        _run("ip", "link", "set", host.veth_root, "up")
        _run("ip", "-n", host.netns, "addr", "add", f"{host.ip}/30", "dev", host.veth_host)
        _run("ip", "-n", host.netns, "link", "set", host.veth_host, "up")
        _run("ip", "-n", host.netns, "link", "set", "lo", "up")

    def _pid_namespace(self, host: Host) -> None:
        unshare = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
        host.init = subprocess.Popen(["ip", "netns", "exec", host.netns, *unshare, "sleep", "infinity"])
        host.init_pid = child_of(host.init.pid)

    def _start_agent(self, host: Host) -> None:
        server = self.pki.issue(f"agent-{host.index}", ips=[host.ip])
        tls = ["--tls-cert", server.cert, "--tls-key", server.key, "--client-ca", self.pki.ca]
        agent = ["-m", "vmctl_server.agent", "--listen", f"tcp://{host.address}", *tls, "--policy", str(self.policy)]
        with host.log.open("ab") as log:
            host.agent = subprocess.Popen(
                [*host.enter(), sys.executable, *agent],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        host.agent_pid = child_of(host.agent.pid)

    def _spawn_target(self, host: Host) -> None:
        # The shell moves itself into the cgroup, then becomes nsenter, whose
        # child (the target, inside the host) inherits the cgroup.
        join_and_enter = f"echo $$ > {self.cgroup}/cgroup.procs && exec " + " ".join(host.enter())
        target = Target.spawn(TARGET_SCRIPT, prefix=["sh", "-c", join_and_enter + ' "$@"', "sh"])
        host.targets.append(target)
        target.map_anon(REGION, seed=1000 * host.index + len(host.targets))
        host.identities.add((target.pid, _start_time(child_of(target.proc.pid))))

    def _wait_serving(self, host: Host, timeout: float = 60.0) -> None:
        patient = RetryPolicy(attempts=10_000, initial_backoff=0.05, max_backoff=0.2)
        try:
            with Client(host.address, tls=self.tls, retry=patient, timeout=timeout) as client:
                client.node_info()
        except VmctlError as error:
            raise RuntimeError(f"agent of host {host.index} did not serve: {error}\n{host.log.read_text()}") from None

    # -- take down, whatever state things are in

    def down(self) -> None:
        for host in self.hosts:
            if host.init_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(host.init_pid, signal.SIGKILL)  # ends every process in the host's pid namespace
            for proc in (host.init, host.agent):
                if proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
            for target in host.targets:
                target.kill()
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
            subprocess.run(["ip", "link", "del", host.veth_root], capture_output=True)
        if self.hosts_lines:
            kept = [line for line in ETC_HOSTS.read_text().splitlines() if line not in self.hosts_lines]
            ETC_HOSTS.write_text("".join(line + "\n" for line in kept))  # in place: /etc/hosts may be a mount


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    with cgroup(f"vmctl-fleet-{secrets.token_hex(4)}") as group:  # removed after the hosts are down
        hosts = Fleet(tmp_path_factory.mktemp("fleet"), group)
        try:
            hosts.up()
            yield hosts
        finally:
            hosts.down()


def vmctl(fleet: Fleet, *args: str, hosts: list[Host] | None = None) -> subprocess.CompletedProcess:
    """The CLI on ``hosts`` (all by default), named every way a fleet can be:
    a --target, a comma-separated --target, and a targets file."""
    hosts = fleet.hosts if hosts is None else hosts
    targets = ["--target", hosts[0].address]
    if len(hosts) > 1:
        targets += ["--target", ",".join(h.address for h in hosts[1:3])]
    if len(hosts) > 3:
        listing = fleet.workdir / "targets"
        listing.write_text("# the rest\n" + "".join(f"{h.address}  # host {h.index}\n" for h in hosts[3:]))
        targets += ["--targets-file", str(listing)]
    return run_cli(*targets, *fleet.tls_args, *args)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vmctl_client.cli", *args], capture_output=True, text=True, timeout=120
    )


def results_by_target(run: subprocess.CompletedProcess) -> dict[str, dict]:
    return {entry["target"]: entry for entry in json.loads(run.stdout)["results"]}


# ---- the tests ---------------------------------------------------------------


def test_ps_lists_each_host_s_own_processes(fleet):
    prefix = f"/{fleet.cgroup.name}"
    run = vmctl(fleet, "ps", "--cgroup", prefix, "-o", "json")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stderr == ""  # piped: no progress bar
    results = results_by_target(run)
    assert list(results) == [h.address for h in fleet.hosts]
    for host in fleet.hosts:
        processes = results[host.address]["result"]["processes"]
        assert {(p["pid"], p["start_time"]) for p in processes} == host.identities
        assert all(p["cgroup"] == prefix and p["rss"] >= REGION for p in processes)

    table = vmctl(fleet, "ps", "--cgroup", prefix)
    assert table.returncode == 0, table.stderr
    for host in fleet.hosts:
        assert f"== {host.address}: ok" in table.stdout
    assert f"== {HOSTS} of {HOSTS} hosts ok" in table.stdout


def test_reclaim_by_cgroup_pages_out_on_every_host(fleet, zram_swap):
    run = vmctl(fleet, "reclaim", "--cgroup", f"/{fleet.cgroup.name}", "-o", "json")
    assert run.returncode == 0, run.stdout + run.stderr
    results = results_by_target(run)
    for host in fleet.hosts:
        report = results[host.address]["result"]
        assert {(p["pid"], p["start_time"]) for p in report["processes"]} == host.identities
        assert all(p["status"] == "done" and p["error"] is None for p in report["processes"])
        assert report["advised_bytes"] >= TARGETS_PER_HOST * REGION and report["syscalls"] >= TARGETS_PER_HOST
        assert report["swap_after"] - report["swap_before"] >= TARGETS_PER_HOST * REGION
        assert report["rss_after"] < report["rss_before"]
        assert {r["pid"] for r in report["ranges"]} == {pid for pid, _ in host.identities}
        for target in host.targets:
            target.verify()  # paged out and back in, byte for byte


def test_a_dns_name_expands_to_every_host(fleet):
    run = run_cli("--target", f"dns:///{fleet.dns_name}:{PORT}", *fleet.tls_args, "node", "-o", "json")
    assert run.returncode == 0, run.stdout + run.stderr
    results = results_by_target(run)
    assert sorted(results) == sorted(h.address for h in fleet.hosts)
    assert all(entry["result"]["boot_id"] for entry in results.values())


def test_a_client_without_a_certificate_is_refused(fleet):
    host = fleet.hosts[0]
    run = run_cli("--target", host.address, "--ca", fleet.pki.ca, "--timeout", "5", "ps", "-o", "json")
    assert run.returncode == 1
    assert json.loads(run.stdout)["error"]["code"] == "UNAVAILABLE"


def test_a_dead_agent_and_a_down_link_fail_alone_within_the_deadline(fleet):
    """Last in this module: it breaks two hosts for good."""
    healthy, killed, cut = fleet.hosts[:2], fleet.hosts[2], fleet.hosts[3]
    os.kill(killed.agent_pid, signal.SIGKILL)
    _run("ip", "-n", cut.netns, "link", "set", cut.veth_host, "down")
    prefix = f"/{fleet.cgroup.name}"
    for command in (["ps", "--cgroup", prefix], ["reclaim", "--cgroup", prefix, "--advice", "cold"]):
        run = vmctl(fleet, "--timeout", "3", "--deadline", "6", *command, "-o", "json")
        assert run.returncode == 1, run.stdout + run.stderr  # the worst of the hosts: an error
        results = results_by_target(run)
        for host in healthy:
            assert "result" in results[host.address], results[host.address]
            processes = results[host.address]["result"]["processes"]
            assert {(p["pid"], p["start_time"]) for p in processes} == host.identities
            assert all(p.get("status", "done") == "done" for p in processes)  # ps entries have no status
        assert results[killed.address]["error"]["code"] == "UNAVAILABLE"
        assert results[cut.address]["error"]["code"] == "DEADLINE_EXCEEDED", results[cut.address]
        assert cut.address in results[cut.address]["error"]["message"]

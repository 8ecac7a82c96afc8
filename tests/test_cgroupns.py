"""The agent in a private cgroup namespace, the way containerd runs it on
cgroup v2, still reports and matches the node's cgroup paths.

The node is a private PID namespace (tests/pidns.py) whose pid 1 lives in
the test's own cgroup namespace and mount namespace copy: to the agent it is
what the host's init is to a DaemonSet pod with ``hostPID``. The agent's
"container" is the cgroup /TOP/agent: the agent moves in, then
``unshare --cgroup --mount`` makes that cgroup its namespace root and, as a
runtime does, /sys/fs/cgroup becomes a cgroup2 mount from inside the
namespace and nothing else of the host's tree. Target "pods" sit in
sibling cgroups, where the kernel shows the agent ``/../pods/target``.
Everything is removed after the test, whether it passes or not: killing
the namespace's pid 1 ends every process in it, then the cgroups go.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml
from support.agents import Agent
from support.audit_lines import audit_records
from support.cgroup2 import CGROUP2, cgroup
from support.expect import expect_error
from support.pidns import NamespacedTarget, PidNamespace
from support.processes import status_field

from vmctl_server.core.cgroups import CgroupView, _cgroup2_mounts

pytestmark = pytest.mark.skipif(CGROUP2 is None, reason="needs a cgroup v2 hierarchy")

MiB = 1 << 20
# The container's setup before "exec": by default as a runtime leaves it, the
# host's cgroup hierarchies gone and cgroup2 mounted inside the new cgroup
# namespace (so its root is the namespace root). The agent's command line
# follows as "$0" "$@".
CONTAINER_CGROUP_MOUNT = "umount -R /sys/fs/cgroup 2>/dev/null; mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "
CONTAINER_NO_CGROUP_MOUNT = "umount -R /sys/fs/cgroup && exec "


@dataclass
class Node:
    ns: PidNamespace
    top: str  # the node's path of the test's cgroup, e.g. /vmctl-cgns-1a2b3c4d
    groups: dict[str, pathlib.Path]  # "agent", "pods/target", "other" -> directory
    socket_dir: pathlib.Path

    def start_container_agent(self, *args: str, container: str = CONTAINER_CGROUP_MOUNT) -> Agent:
        """An agent in the cgroup /TOP/agent and a cgroup namespace rooted there."""
        agent = Agent(list(args), self.socket_dir)
        join = 'echo $$ > "$0/cgroup.procs" && exec unshare --cgroup --mount sh -c "$VMCTL_CONTAINER" "$@"'
        with open(agent.log_path, "ab") as log:
            agent.proc = subprocess.Popen(
                [
                    *self.ns.enter(),
                    *("sh", "-c", join, str(self.groups["agent"])),
                    *(sys.executable, "-m", "vmctl_server.agent", "--listen", agent.address, *args),
                ],
                env={**os.environ, "VMCTL_CONTAINER": container + '"$0" "$@"'},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.ns.agent = agent  # the namespace stops it and removes its log at close
        agent.wait_serving()
        return agent

    def stop_agent(self) -> tuple[int, str]:
        """Stop the agent cleanly (SIGTERM); its exit status and its log."""
        agent = self.ns.agent
        assert agent is not None and agent.proc is not None
        os.kill(self.ns.agent_pid(), signal.SIGTERM)
        status = agent.proc.wait(30)
        log = agent.log()
        agent.discard_log()
        self.ns.agent = None
        return status, log

    def target_in(self, group: str) -> NamespacedTarget:
        target = self.ns.spawn_target()
        (self.groups[group] / "cgroup.procs").write_text(str(target.host_pid))
        return target

    def path(self, group: str) -> str:
        return f"{self.top}/{group}"


def _pid_inside(host_pid: int) -> int:
    """The pid a host process has in the innermost PID namespace (NSpid's last)."""
    return int(status_field(host_pid, "NSpid").split()[-1])


def _own_cgroup() -> str:
    return next(line[3:] for line in pathlib.Path("/proc/self/cgroup").read_text().splitlines() if line[:3] == "0::")


@pytest.fixture
def node() -> Iterator[Node]:
    name = f"vmctl-cgns-{secrets.token_hex(4)}"
    with contextlib.ExitStack() as stack:
        stack.enter_context(cgroup(name))
        groups = {g: stack.enter_context(cgroup(f"{name}/{g}")) for g in ("agent", "pods", "pods/target", "other")}
        socket_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="vmctl-cgns-"))
        ns = stack.enter_context(PidNamespace())  # closed first: its processes end before the groups go
        # cgroup() makes /NAME at the root of the hierarchy as the test sees it
        yield Node(ns, f"/{name}", groups, pathlib.Path(socket_dir))


def test_the_agent_reports_and_filters_node_paths(node):
    target = node.target_in("pods/target")
    agent = node.start_container_agent()
    agent_pid = _pid_inside(node.ns.agent_pid())
    with agent.client() as client:
        by_pid = {p.pid: p.cgroup for p in client.list_processes()}
        assert by_pid[target.pid] == node.path("pods/target")  # the kernel shows the agent /../pods/target
        assert by_pid[agent_pid] == node.path("agent")  # the kernel shows the agent /
        assert by_pid[1] == _own_cgroup()  # the node's init, outside: what the node itself reads
        assert [p.pid for p in client.list_processes(node.path("pods"))] == [target.pid]
        assert {p.pid for p in client.list_processes(node.top)} == {target.pid, agent_pid}
        assert client.list_processes("/../pods") == []  # the namespace-relative form is not what it matches
        assert "cgroup_paths" not in client.node_info().capabilities.probe_errors
    status, log = node.stop_agent()
    assert status == 0
    assert "cgroup namespace root is the node's " + node.path("agent") in log


def test_a_policy_selects_targets_by_node_paths(node, tmp_path):
    admitted = node.target_in("pods/target")
    outside = node.target_in("other")
    in_agent_container = node.target_in("agent")
    policy = tmp_path / "policy.yaml"
    rules = [
        {
            "name": name,
            "identities": ["uid:0"],
            "verbs": ["read", "advise"],
            "targets": {"cgroup_prefixes": [node.path(group)]},
        }
        # The agent's own container too: the rules are checked before protection,
        # so only a caller they let advise a process learns that it is protected.
        for name, group in (("pods", "pods"), ("agent-container", "agent"))
    ]
    policy.write_text(yaml.safe_dump({"require_cookie": False, "rules": rules}))
    agent = node.start_container_agent("--policy", str(policy))
    with agent.client() as client:
        listed = {p.pid: p.cgroup for p in client.list_processes()}  # what the rules let the caller read
        assert admitted.pid in listed and outside.pid not in listed
        assert set(listed.values()) <= {node.path("pods/target"), node.path("agent")}

        start, end = admitted.map_anon(MiB, seed=3)
        info = client.get_vma_info(admitted.pid)
        assert client.advise_ranges(admitted.pid, [(start, end)], "cold", cookie=info.cookie).advised_bytes == MiB

        start, end = outside.map_anon(MiB, seed=4)
        error = expect_error(
            lambda: client.advise_ranges(outside.pid, [(start, end)], "cold"), "PERMISSION_DENIED", "POLICY_DENIED"
        )
        # The caller may not read it: the refusal names the pid alone (the audit record below keeps the cgroup).
        assert node.path("other") not in error.message and f"pid {outside.pid}" in error.message

        # The agent's own container is protected by its node path (in the
        # namespace it reads "/", which would protect nothing).
        start, end = in_agent_container.map_anon(MiB, seed=5)
        error = expect_error(
            lambda: client.advise_ranges(in_agent_container.pid, [(start, end)], "cold"),
            "PERMISSION_DENIED",
            "PROTECTED_TARGET",
        )
        assert error.metadata["protection"] == f"the agent's cgroup {node.path('agent')}"
    status, log = node.stop_agent()
    assert status == 0
    records = {record["pid"]: record for record in audit_records(log)}
    assert (records[admitted.pid]["cgroup"], records[admitted.pid]["status"]) == (node.path("pods/target"), "OK")
    assert (records[outside.pid]["cgroup"], records[outside.pid]["reason"]) == (node.path("other"), "POLICY_DENIED")
    for target in (admitted, outside, in_agent_container):
        target.verify()


@pytest.mark.parametrize(
    ("container", "problem"),
    [
        # No cgroup2 mount of its own: the namespace root cannot be named.
        (CONTAINER_NO_CGROUP_MOUNT, "no cgroup2 mount"),
        # No CAP_SYS_PTRACE: pid 1 holds capabilities the agent lacks, so
        # its namespace links and root are out of the agent's reach.
        (CONTAINER_CGROUP_MOUNT + "setpriv --bounding-set -sys_ptrace ", "pid 1's cgroup namespace"),
    ],
    ids=["no-cgroup2-mount", "pid-1-unreadable"],
)
def test_without_a_mapping_the_agent_says_so_and_reports_the_kernels_paths(node, container, problem):
    target = node.target_in("pods/target")
    agent = node.start_container_agent(container=container)
    agent_pid = _pid_inside(node.ns.agent_pid())
    with agent.client() as client:
        assert problem in client.node_info().capabilities.probe_errors["cgroup_paths"]
        by_pid = {p.pid: p.cgroup for p in client.list_processes()}
        assert (by_pid[agent_pid], by_pid[target.pid]) == ("/", "/../pods/target")
    status, log = node.stop_agent()
    assert status == 0
    assert log.count("cgroup paths cannot be mapped to the node's") == 1


def test_an_agent_in_the_nodes_namespace_needs_no_mapping(start_agent):
    with start_agent().client() as client:
        assert "cgroup_paths" not in client.node_info().capabilities.probe_errors


@pytest.mark.unprivileged
@pytest.mark.parametrize(
    ("kernel_path", "node_path"),
    [
        ("/", "/pods/a"),  # the namespace root itself
        ("/c", "/pods/a/c"),
        ("/../b/c", "/pods/b/c"),
        ("/../..", "/"),
        ("/../../../x", "/../x"),  # above the node's root: kept, as the node's own view would show it
        ("", ""),  # no cgroup v2 line at all
    ],
)
def test_kernel_paths_climb_from_the_namespace_roots_node_path(kernel_path, node_path):
    assert CgroupView(root="/pods/a").absolute(kernel_path) == node_path
    assert CgroupView().absolute(kernel_path) == kernel_path  # nothing to map


@pytest.mark.unprivileged
def test_mountinfo_cgroup2_lines_with_optional_fields_and_escapes():
    mountinfo = (
        b"31 23 0:28 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755\n"
        b"41 31 0:38 /../.. /sys/fs/cgroup/my\\040tree rw,relatime shared:17 master:3 - cgroup2 cgroup2 rw\n"
        b"82 72 0:38 / /sys/fs/cgroup rw,relatime - cgroup2 none rw\n"
    )
    assert [(m.root, m.mount_point) for m in _cgroup2_mounts(mountinfo)] == [
        ("/../..", "/sys/fs/cgroup/my tree"),
        ("/", "/sys/fs/cgroup"),
    ]

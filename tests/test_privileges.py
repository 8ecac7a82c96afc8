"""The least privilege the deployment files grant is enough, and each grant is needed.

Nothing here runs systemd or a container runtime (neither runs on these
machines). Instead the agent runs under the same kernel mechanisms they use,
with the settings read from the files themselves:

- the systemd unit: an unprivileged uid (DynamicUser=), exactly the unit's
  AmbientCapabilities= and CapabilityBoundingSet=, no_new_privs, the unit's
  SystemCallFilter= expanded by systemd-analyze and loaded with libseccomp
  (any other syscall kills the agent), RestrictAddressFamilies= and
  MemoryDenyWriteExecute=;
- the DaemonSet: uid 0 holding only the capabilities its securityContext adds,
  with no_new_privs (allowPrivilegeEscalation: false).

Under each, the agent must read and advise a root process and another user's
process, and shut down cleanly. Then each capability is taken away in turn
and the agent must fail at what that capability is for.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest
from conftest import TARGET_SCRIPT, Agent, Target, expect_error
from deploy_files import (
    OVERLAYS,
    agent_container,
    render,
    require_tool,
    unit_settings,
    unit_syscall_allow_list,
)

SANDBOX = pathlib.Path(__file__).resolve().parent / "sandbox_exec.py"
MiB = 1 << 20
NOBODY = 65534
SERVICE_UID = 61876  # stands in for the unit's DynamicUser=
ADDRESS_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10}
CAPABILITY_NUMBERS = {"CAP_DAC_READ_SEARCH": 2, "CAP_SYS_PTRACE": 19, "CAP_SYS_NICE": 23}  # linux/capability.h


def _status_field(pid: int, name: str) -> str:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    raise KeyError(name)


class WrappedAgent(Agent):
    """An agent started behind a command prefix (setpriv, the seccomp sandbox)."""

    def __init__(self, prefix: list[str], args: list[str], socket_dir: pathlib.Path) -> None:
        super().__init__(args, socket_dir)
        self.prefix = prefix

    def start(self) -> WrappedAgent:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "vmctl_server.agent", "--listen", self.address, *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_serving()
        return self


@pytest.fixture
def start_wrapped_agent():
    agents: list[WrappedAgent] = []

    def start(prefix: list[str], args: list[str], socket_dir: pathlib.Path) -> WrappedAgent:
        agent = WrappedAgent(prefix, args, socket_dir)
        agents.append(agent)
        return agent.start()

    try:
        yield start
    finally:
        for agent in agents:
            agent.stop()
            agent.discard_log()


@pytest.fixture
def nobody_target():
    """A target process owned by another user (uid 65534), with its own interpreter:
    the project's may live under a directory that user cannot enter."""
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None)
    if python is None:
        pytest.fail("no system python3 for a target owned by another user")
    script_dir = tempfile.mkdtemp(prefix="vmctl-target-")
    os.chmod(script_dir, 0o755)
    script = shutil.copy(TARGET_SCRIPT, script_dir)
    setpriv = require_tool("setpriv", "util-linux")
    proc = subprocess.Popen(
        [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python, script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    target = None
    try:
        target = Target(proc)
        yield target
    finally:
        if target is not None:
            target.kill()
        else:
            proc.kill()
            proc.wait()
        shutil.rmtree(script_dir)


def _cap_list(caps: set[str]) -> str:
    return ",".join(["-all", *(f"+{c.lower().removeprefix('cap_')}" for c in sorted(caps))])


def setpriv_prefix(uid: int, caps: set[str]) -> list[str]:
    """What systemd or the container runtime does before exec: the uid, and exactly these capabilities."""
    setpriv = require_tool("setpriv", "util-linux")
    prefix = [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", f"--bounding-set={_cap_list(caps)}"]
    if uid != 0:  # a non-root process holds capabilities only through the ambient set
        prefix += [f"--inh-caps={_cap_list(caps)}", f"--ambient-caps={_cap_list(caps)}"]
    return [*prefix, "--no-new-privs", "--"]


def exercise(agent: Agent, targets: list[Target]) -> None:
    """Everything the agent is for, against each target; the targets' memory must be intact after."""
    with agent.client() as client:
        caps = client.node_info().capabilities
        assert caps.advice_permitted and caps.pagemap_scan, caps
        assert any(p.pid == targets[0].pid for p in client.list_processes())
        for target in targets:
            start, end = target.map_anon(4 * MiB)
            info = client.get_vma_info(target.pid, attrs=("rss", "accounting", "build_id"))
            region = next(v for v in info.vmas if v.start == start)
            assert region.rss == end - start
            result = client.advise_ranges(target.pid, [(start, end)], advice="cold", cookie=info.cookie)
            assert result.advised_bytes == end - start
            target.verify()


def test_the_systemd_units_sandbox_is_enough(start_wrapped_agent, target, nobody_target, tmp_path):
    settings = unit_settings()
    caps = set(settings["AmbientCapabilities"][0].split())
    assert caps == set(settings["CapabilityBoundingSet"][0].split())
    assert settings["DynamicUser"] == ["yes"] and settings["NoNewPrivileges"] == ["yes"]
    families = settings["RestrictAddressFamilies"][0].split()
    spec = {
        "allow": sorted(unit_syscall_allow_list(settings)),
        "families": [ADDRESS_FAMILIES[f] for f in families],
        "mdwe": settings["MemoryDenyWriteExecute"] == ["yes"],
    }
    assert {"pidfd_open", "process_madvise", "ioctl"} <= set(spec["allow"])
    spec_file = tmp_path / "seccomp.json"
    spec_file.write_text(json.dumps(spec))

    # RuntimeDirectory= and StateDirectory=, owned by the service's user.
    run_dir, state_dir = tmp_path / "run", tmp_path / "state"
    for directory, mode in ((run_dir, 0o755), (state_dir, 0o700)):
        directory.mkdir()
        os.chown(directory, SERVICE_UID, SERVICE_UID)
        directory.chmod(mode)
    tmp_path.chmod(0o755)
    exec_start = settings["ExecStart"][0].split()[1:]
    args = [
        arg.replace("/run/vmctl", str(run_dir)).replace("/var/lib/vmctl", str(state_dir))
        for arg in exec_start
        if not arg.startswith(("--listen=", "--metrics-listen="))  # the test's own socket, no fixed port
    ]
    assert f"--cookie-key-file={state_dir}/cookie.key" in args
    prefix = [*setpriv_prefix(SERVICE_UID, caps), sys.executable, str(SANDBOX), str(spec_file), "--"]
    agent = start_wrapped_agent(prefix, [*args, "--metrics-listen=127.0.0.1:0"], run_dir)

    assert os.stat(agent.socket_path).st_uid == SERVICE_UID
    assert _status_field(agent.proc.pid, "Uid").split() == [str(SERVICE_UID)] * 4
    assert _status_field(agent.proc.pid, "NoNewPrivs") == "1"
    assert _status_field(agent.proc.pid, "Seccomp") == "2"  # filter mode
    assert int(_status_field(agent.proc.pid, "CapEff"), 16) == sum(1 << CAPABILITY_NUMBERS[c] for c in caps)
    exercise(agent, [target, nobody_target])
    key_file = state_dir / "cookie.key"
    assert key_file.stat().st_uid == SERVICE_UID and key_file.stat().st_mode & 0o077 == 0
    assert agent.stop() == 0, agent.log()  # a clean drain under the filter: no SIGSYS on the way out


def daemonset_capabilities() -> set[str]:
    container = agent_container(render(OVERLAYS[0]))
    return {f"CAP_{c}" for c in container["securityContext"]["capabilities"]["add"]}


def test_the_daemonsets_capabilities_are_enough(start_wrapped_agent, target, nobody_target, tmp_path):
    docs = render(OVERLAYS[0])
    pod = next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 0
    assert agent_container(docs)["securityContext"]["allowPrivilegeEscalation"] is False
    caps = daemonset_capabilities()
    agent = start_wrapped_agent(setpriv_prefix(0, caps), [], tmp_path)
    effective = int(_status_field(agent.proc.pid, "CapEff"), 16)
    assert effective == sum(1 << CAPABILITY_NUMBERS[c] for c in caps)
    exercise(agent, [target, nobody_target])
    assert agent.stop() == 0, agent.log()


@pytest.mark.parametrize("missing", ["CAP_SYS_PTRACE", "CAP_SYS_NICE", "CAP_DAC_READ_SEARCH"])
def test_each_capability_is_needed(start_wrapped_agent, nobody_target, tmp_path, missing):
    granted = daemonset_capabilities()
    assert missing in granted
    agent = start_wrapped_agent(setpriv_prefix(0, granted - {missing}), [], tmp_path)
    with agent.client() as client:
        if missing == "CAP_SYS_NICE":
            # Reading works; the startup probe finds process_madvise refused, and advice is refused.
            assert not client.node_info().capabilities.advice_permitted
            start, end = nobody_target.map_anon(MiB)
            info = client.get_vma_info(nobody_target.pid)
            with pytest.raises(Exception) as refused:
                client.advise_ranges(nobody_target.pid, [(start, end)], advice="cold", cookie=info.cookie)
            assert getattr(refused.value, "code", "") in {"FAILED_PRECONDITION", "PERMISSION_DENIED"}
        else:
            # Without ptrace access or the right to open the 0400 /proc files, another user's process is closed.
            expect_error(lambda: client.get_vma_info(nobody_target.pid), "PERMISSION_DENIED", "ACCESS_DENIED")
    assert agent.stop(signal.SIGTERM) == 0


def test_the_sandbox_enforces_what_the_unit_denies(tmp_path):
    """The emulation above is only worth something if it bites: a syscall the unit
    leaves out kills, a socket family it leaves out fails, W+X memory is refused."""
    settings = unit_settings()
    spec = {
        "allow": sorted(unit_syscall_allow_list(settings)),
        "families": [ADDRESS_FAMILIES[f] for f in settings["RestrictAddressFamilies"][0].split()],
        "mdwe": True,
    }
    assert "sched_setaffinity" not in spec["allow"]  # @resources is denied
    spec_file = tmp_path / "seccomp.json"
    spec_file.write_text(json.dumps(spec))
    sandbox = [sys.executable, str(SANDBOX), str(spec_file), "--", sys.executable, "-c"]
    probe = textwrap.dedent(
        """
        import mmap, socket
        try:
            socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        except OSError as e:
            print("packet", e.errno)
        try:
            mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except OSError as e:
            print("wx", e.errno)
        socket.socket(socket.AF_INET6).close()
        print("inet6 ok")
        """
    )
    allowed = subprocess.run([*sandbox, probe], capture_output=True, text=True, timeout=60)
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.split("\n")[:3] == ["packet 97", "wx 13", "inet6 ok"]  # EAFNOSUPPORT, EACCES
    killed = subprocess.run([*sandbox, "import os; os.sched_setaffinity(0, {0})"], capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGSYS

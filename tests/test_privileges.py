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
import signal
import subprocess
import sys
import textwrap

import pytest
from support.agents import Agent
from support.deploy_files import (
    OVERLAYS,
    agent_container,
    daemonset_capabilities,
    render,
    unit_settings,
    unit_syscall_allow_list,
)
from support.expect import expect_error
from support.privileges import SANDBOX, capability_mask, setpriv_prefix
from support.processes import Target, status_field

MiB = 1 << 20
SERVICE_UID = 61876  # stands in for the unit's DynamicUser=
ADDRESS_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10}


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


def test_the_systemd_units_sandbox_is_enough(start_agent, target, nobody_target, tmp_path):
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
    agent = start_agent(*args, "--metrics-listen=127.0.0.1:0", socket_dir=run_dir, prefix=prefix)

    assert os.stat(agent.socket_path).st_uid == SERVICE_UID
    assert status_field(agent.proc.pid, "Uid").split() == [str(SERVICE_UID)] * 4
    assert status_field(agent.proc.pid, "NoNewPrivs") == "1"
    assert status_field(agent.proc.pid, "Seccomp") == "2"  # filter mode
    assert int(status_field(agent.proc.pid, "CapEff"), 16) == capability_mask(caps)
    exercise(agent, [target, nobody_target])
    key_file = state_dir / "cookie.key"
    assert key_file.stat().st_uid == SERVICE_UID and key_file.stat().st_mode & 0o077 == 0
    assert agent.stop() == 0, agent.log()  # a clean drain under the filter: no SIGSYS on the way out


def test_the_daemonsets_capabilities_are_enough(start_agent, target, nobody_target, tmp_path):
    docs = render(OVERLAYS[0])
    pod = next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 0
    assert agent_container(docs)["securityContext"]["allowPrivilegeEscalation"] is False
    caps = daemonset_capabilities()
    agent = start_agent(socket_dir=tmp_path, prefix=setpriv_prefix(0, caps))
    effective = int(status_field(agent.proc.pid, "CapEff"), 16)
    assert effective == capability_mask(caps)
    exercise(agent, [target, nobody_target])
    assert agent.stop() == 0, agent.log()


@pytest.mark.parametrize("missing", ["CAP_SYS_PTRACE", "CAP_SYS_NICE", "CAP_DAC_READ_SEARCH"])
def test_each_capability_is_needed(start_agent, nobody_target, tmp_path, missing):
    granted = daemonset_capabilities()
    assert missing in granted
    agent = start_agent(socket_dir=tmp_path, prefix=setpriv_prefix(0, granted - {missing}))
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


def test_sampling_another_users_process_takes_cap_dac_override(start_agent, target, nobody_target, tmp_path):
    """clear_refs is mode 0200 and its owner's: the DaemonSet's three capabilities sample root's
    processes and refuse another user's, saying what is missing, with nothing cleared; add
    CAP_DAC_OVERRIDE and they are sampled too."""
    caps = daemonset_capabilities()
    assert "CAP_DAC_OVERRIDE" not in caps
    for extra in (set(), {"CAP_DAC_OVERRIDE"}):
        socket_dir = tmp_path / ("override" if extra else "plain")
        socket_dir.mkdir()
        agent = start_agent(socket_dir=socket_dir, prefix=setpriv_prefix(0, caps | extra))
        with agent.client() as client:
            node = client.node_info().capabilities
            assert node.access_sampling == "clear_refs"
            assert ("CAP_DAC_OVERRIDE" in node.probe_errors.get("access_sampling", "")) == (not extra)
            start, _ = target.map_anon(MiB)
            assert client.get_vma_info(target.pid, ("accessed",), window=0.2).process.pid == target.pid
            start, _ = nobody_target.map_anon(MiB)
            sample = lambda: client.get_vma_info(nobody_target.pid, ("accessed",), window=0.2)  # noqa: E731
            if extra:
                assert next(v for v in sample().vmas if v.start == start).accessed == 0
            else:
                error = expect_error(sample, "PERMISSION_DENIED", "ACCESS_DENIED")
                assert "CAP_DAC_OVERRIDE" in error.message and error.metadata["missing"] == "CAP_DAC_OVERRIDE"
                assert nobody_target.smaps_region(start)["Referenced"] == 1024  # nothing was cleared
        assert agent.stop() == 0, agent.log()


@pytest.mark.unprivileged
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

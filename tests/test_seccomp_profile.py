"""The agent's Localhost seccomp profile (deploy/kubernetes/base/seccomp/vmctl-agent.json).

No container runtime runs here, so the agent runs under the same kernel
mechanisms one uses, with the settings read from the deployment files: uid 0
holding only the DaemonSet's capabilities, no_new_privs, and the profile
compiled with libseccomp the way runc compiles it (tests/sandbox_exec.py).
Under it the agent must do everything it is deployed for
(tests/agent_workout.py); a profile missing a syscall fails here naming it.
And the call the profile exists for, open_by_handle_at, must be refused
where, without the profile, the same process reads a file by handle.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from support.agent_workout import FLAGS, Rig, drain, exercise_everything
from support.deploy_files import OVERLAYS, agent_container, daemonset_capabilities, render, require_tool
from support.privileges import SANDBOX, capability_mask, setpriv_prefix
from support.processes import status_field
from support.sandbox_exec import seccomp

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROFILE = ROOT / "deploy" / "kubernetes" / "base" / "seccomp" / "vmctl-agent.json"
TRACE_SCRIPT = ROOT / "scripts" / "trace_agent_syscalls.py"
# Never allowed (issue 9 item 10c): each is a way out of the container or into the kernel or
# another process's memory that the agent never needs.
MUST_REFUSE = {
    "open_by_handle_at",
    "name_to_handle_at",
    "ptrace",
    "process_vm_writev",
    "mount",
    "bpf",
    "init_module",
    "finit_module",
    "kexec_load",
    "kexec_file_load",
    "keyctl",
    "userfaultfd",
    "unshare",
    "setns",
    "pivot_root",
    "perf_event_open",
    # and, besides: reading another process's memory or files, and io_uring, whose file and
    # socket operations seccomp never sees
    "process_vm_readv",
    "pidfd_getfd",
    "io_uring_setup",
}
# What the agent is refused and copes with, by design: glibc makes threads with clone3, and on
# ENOSYS with clone, whose flags the profile can check.
EXPECTED_REFUSALS = {"clone3"}


def load_profile() -> dict:
    return json.loads(PROFILE.read_text())


def rules_for(profile: dict, name: str) -> list[dict]:
    return [entry for entry in profile["syscalls"] if name in entry["names"]]


def sandbox_prefix(tmp_path: pathlib.Path, profile: pathlib.Path, report: pathlib.Path | None) -> list[str]:
    """The DaemonSet's container as the kernel sees it: uid 0, its capabilities, no_new_privs, the profile."""
    spec = tmp_path / f"seccomp-{'report' if report else 'exact'}.json"
    spec.write_text(json.dumps({"oci_profile": str(profile), **({"report": str(report)} if report else {})}))
    return [*setpriv_prefix(0, daemonset_capabilities()), sys.executable, str(SANDBOX), str(spec), "--"]


def refused(report: pathlib.Path) -> dict[str, str]:
    """Each syscall name the profile refused, with the errno it answered."""
    lines = report.read_text().splitlines() if report.exists() else []
    return {line.split()[0]: line.split()[1] for line in lines}


# ---- the profile itself ----------------------------------------------------------------------------


@pytest.mark.unprivileged
def test_the_profile_refuses_by_default_and_never_allows_the_escapes():
    profile = load_profile()
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == errno.ENOSYS  # an unknown syscall looks like one an old kernel lacks
    assert set(profile["architectures"]) == {"SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"}  # no 32-bit ABI
    for name in sorted(MUST_REFUSE):
        rules = rules_for(profile, name)
        assert [(r["action"], r["errnoRet"]) for r in rules] == [("SCMP_ACT_ERRNO", errno.EPERM)], (name, rules)
    (clone3,) = rules_for(profile, "clone3")
    assert (clone3["action"], clone3["errnoRet"]) == ("SCMP_ACT_ERRNO", errno.ENOSYS)
    (clone,) = rules_for(profile, "clone")
    assert clone["args"] == [{"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]
    (socket_rule,) = rules_for(profile, "socket")
    assert {a["value"] for a in socket_rule["args"]} == {1, 2, 10}  # AF_UNIX, AF_INET, AF_INET6
    assert all(set(a) == {"index", "value", "op"} and a["index"] == 0 for a in socket_rule["args"])
    allowed = [n for e in profile["syscalls"] if e["action"] == "SCMP_ACT_ALLOW" for n in e["names"]]
    assert len(allowed) == len(set(allowed)), "a name in two rules"
    assert {"process_madvise", "pidfd_open", "ioctl", "epoll_pwait", "eventfd2", "futex", "rseq"} <= set(allowed)


@pytest.mark.unprivileged
def test_the_configmap_carries_the_profile_file_unchanged():
    config_map = next(
        d for d in render(OVERLAYS[0]) if d["kind"] == "ConfigMap" and "vmctl-agent.json" in d.get("data", {})
    )
    assert json.loads(config_map["data"]["vmctl-agent.json"]) == load_profile()


# ---- the agent under it ----------------------------------------------------------------------------


@pytest.mark.unprivileged
def test_the_workout_runs_the_agent_with_the_daemonsets_flags():
    """The workout below is only worth something if it runs the agent as the DaemonSet does."""
    args = agent_container(render(next(p for p in OVERLAYS if p.name == "cluster-mtls")))["args"]
    assert {a.split("=", 1)[0] for a in args} == set(FLAGS)


@pytest.mark.parametrize("mode", ["exact", "reporting"])
def test_the_agent_does_its_whole_job_under_the_profile(start_agent, target, nobody_target, tmp_path, mode):
    """Serves, reads and advises (the targets check their memory byte for byte), answers health and
    metrics over IPv4 and IPv6, reloads its policy and drains, under the profile: "exact" compiles
    it as runc does, "reporting" turns each refusal into a notification answered with the same
    errno, so a missing syscall is named."""
    report = tmp_path / "refused.txt" if mode == "reporting" else None
    rig = Rig.create(tmp_path / "rig")
    (tmp_path / "run").mkdir()
    prefix = sandbox_prefix(tmp_path, PROFILE, report)
    try:
        agent = start_agent(*rig.agent_args(), socket_dir=tmp_path / "run", prefix=prefix)
        pid = agent.proc.pid
        assert status_field(pid, "Seccomp") == "2" and status_field(pid, "NoNewPrivs") == "1"
        effective = int(status_field(pid, "CapEff"), 16)
        assert effective == capability_mask(daemonset_capabilities())
        exercise_everything(rig, agent, pid, [target, nobody_target])
        assert drain(pid, lambda: agent.proc.wait(60), agent.socket_path) == 0, agent.log()
    finally:
        if report is not None:
            unexpected = sorted(set(refused(report)) - EXPECTED_REFUSALS)
            assert not unexpected, (
                f"the seccomp profile refused the agent {unexpected} ({refused(report)}): allow them in "
                f"{PROFILE.relative_to(ROOT)} (run scripts/trace_agent_syscalls.py --write) if the agent needs them"
            )
    if report is not None:
        assert set(refused(report)) == EXPECTED_REFUSALS  # the report is read: glibc's clone3 is always refused


def test_a_syscall_the_profile_lacks_is_named(tmp_path):
    """The reporting sandbox above cannot stay silent: drop uname (the agent's GetNodeInfo calls it)
    from a copy of the profile, and a uname() under it is refused with the profile's errno and named."""
    profile = load_profile()
    for entry in profile["syscalls"]:
        entry["names"] = [n for n in entry["names"] if n != "uname"]
    lacking = tmp_path / "lacking.json"
    lacking.write_text(json.dumps(profile))
    report = tmp_path / "refused.txt"
    probe = "import os\ntry:\n    os.uname()\nexcept OSError as e:\n    print(e.errno)"
    result = subprocess.run(
        [*sandbox_prefix(tmp_path, lacking, report), sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(errno.ENOSYS)]
    assert refused(report) == {"uname": "ENOSYS"}


# ---- what the profile is for: open_by_handle_at ---------------------------------------------------------


class FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int), ("f_handle", ctypes.c_ubyte * 128)]


def file_handle(path: pathlib.Path) -> tuple[int, bytes]:
    """name_to_handle_at(2) on ``path``: its handle type and bytes."""
    libc = ctypes.CDLL(None, use_errno=True)
    handle, mount_id = FileHandle(handle_bytes=128), ctypes.c_int()
    if libc.name_to_handle_at(-100, os.fsencode(path), ctypes.byref(handle), ctypes.byref(mount_id), 0) != 0:
        raise OSError(ctypes.get_errno(), f"name_to_handle_at {path}")
    return handle.handle_type, bytes(handle.f_handle[: handle.handle_bytes])


# Opens a file by handle through a directory it was never under, as code in the agent's container
# could through its writable hostPath (the "shocker" escape), and tries to make a handle of its own.
OPEN_BY_HANDLE = textwrap.dedent(
    """
    import ctypes, os, sys
    class FileHandle(ctypes.Structure):
        _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int), ("f_handle", ctypes.c_ubyte * 128)]
    libc = ctypes.CDLL(None, use_errno=True)
    mount_dir, handle_type, handle_hex, own = sys.argv[1:]
    raw = bytes.fromhex(handle_hex)
    handle = FileHandle(handle_bytes=len(raw), handle_type=int(handle_type))
    ctypes.memmove(handle.f_handle, raw, len(raw))
    mount_fd = os.open(mount_dir, os.O_RDONLY | os.O_DIRECTORY)
    fd = libc.open_by_handle_at(mount_fd, ctypes.byref(handle), os.O_RDONLY)
    print("open_by_handle_at", os.read(fd, 100).decode() if fd >= 0 else ctypes.get_errno())
    mine, mount_id = FileHandle(handle_bytes=128), ctypes.c_int()
    rc = libc.name_to_handle_at(-100, own.encode(), ctypes.byref(mine), ctypes.byref(mount_id), 0)
    print("name_to_handle_at", "ok" if rc == 0 else ctypes.get_errno())
    """
)


def test_open_by_handle_at_is_refused_under_the_profile(tmp_path):
    """A "host file", and a "hostPath" directory beside it on the same filesystem."""
    (tmp_path / "host").mkdir()
    hostpath = tmp_path / "hostpath"
    hostpath.mkdir()
    secret = tmp_path / "host" / "shadow"
    secret.write_text("root:the-host-secret")
    secret.chmod(0o600)
    handle_type, handle = file_handle(secret)
    command = [sys.executable, "-c", OPEN_BY_HANDLE, str(hostpath), str(handle_type), handle.hex(), str(secret)]
    capabilities_only = [*setpriv_prefix(0, daemonset_capabilities()), *command]
    profiled = [*sandbox_prefix(tmp_path, PROFILE, None), *command]

    escape = subprocess.run(capabilities_only, capture_output=True, text=True, timeout=60)
    assert escape.returncode == 0, escape.stderr
    # Without the profile (RuntimeDefault allows both with CAP_DAC_READ_SEARCH), the file is read by handle.
    assert escape.stdout.splitlines() == ["open_by_handle_at root:the-host-secret", "name_to_handle_at ok"]

    refused_escape = subprocess.run(profiled, capture_output=True, text=True, timeout=60)
    assert refused_escape.returncode == 0, refused_escape.stderr
    assert refused_escape.stdout.splitlines() == [
        f"open_by_handle_at {errno.EPERM}",
        f"name_to_handle_at {errno.EPERM}",
    ]


# What else code in the container might try, by raw syscall number (resolved here, for this
# architecture, by libseccomp), each printed with the errno it met.
ESCAPE_ATTEMPTS = textwrap.dedent(
    """
    import ctypes, errno, json, socket, sys
    libc = ctypes.CDLL(None, use_errno=True)
    numbers = json.loads(sys.argv[1])
    def attempt(label, name, *args):
        rc = libc.syscall(numbers[name], *args)
        print(label, "ok" if rc >= 0 else errno.errorcode[ctypes.get_errno()])
    attempt("unshare(CLONE_NEWUSER)", "unshare", 0x10000000)
    attempt("clone(CLONE_NEWUSER)", "clone", 0x10000000 | 17, 0, 0, 0, 0)
    attempt("clone3", "clone3", ctypes.create_string_buffer(88), 88)
    attempt("setns", "setns", 0, 0)
    attempt("ptrace(PTRACE_ATTACH, 1)", "ptrace", 16, 1, 0, 0)
    attempt("process_vm_readv", "process_vm_readv", 1, 0, 0, 0, 0, 0)
    attempt("bpf", "bpf", 0, 0, 0)
    attempt("io_uring_setup", "io_uring_setup", 4, ctypes.create_string_buffer(120))
    for family, kind in (("AF_NETLINK", "SOCK_RAW"), ("AF_PACKET", "SOCK_RAW"), ("AF_ALG", "SOCK_SEQPACKET"),
                         ("AF_VSOCK", "SOCK_STREAM"), ("AF_UNIX", "SOCK_STREAM"), ("AF_INET", "SOCK_STREAM"),
                         ("AF_INET6", "SOCK_STREAM")):
        try:
            socket.socket(getattr(socket, family), getattr(socket, kind)).close()
            print("socket", family, "ok")
        except OSError as e:
            print("socket", family, errno.errorcode[e.errno])
    """
)


def test_the_profile_refuses_namespaces_other_processes_and_other_socket_families(tmp_path):
    """As code in the agent's container would try them: new or other namespaces, other processes'
    memory, kernel programs, io_uring, and sockets of any family but unix, IPv4 and IPv6, which
    still work."""
    names = ["unshare", "clone", "clone3", "setns", "ptrace", "process_vm_readv", "bpf", "io_uring_setup"]
    numbers = {name: seccomp.seccomp_syscall_resolve_name(name.encode()) for name in names}
    command = [sys.executable, "-c", ESCAPE_ATTEMPTS, json.dumps(numbers)]
    result = subprocess.run(
        [*sandbox_prefix(tmp_path, PROFILE, None), *command], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "unshare(CLONE_NEWUSER) EPERM",
        "clone(CLONE_NEWUSER) ENOSYS",  # no rule admits these flags: the default answer
        "clone3 ENOSYS",
        "setns EPERM",
        "ptrace(PTRACE_ATTACH, 1) EPERM",
        "process_vm_readv EPERM",
        "bpf EPERM",
        "io_uring_setup EPERM",
        "socket AF_NETLINK ENOSYS",
        "socket AF_PACKET ENOSYS",
        "socket AF_ALG ENOSYS",
        "socket AF_VSOCK ENOSYS",
        "socket AF_UNIX ok",
        "socket AF_INET ok",
        "socket AF_INET6 ok",
    ]


# ---- the trace the profile comes from ----------------------------------------------------------------


def test_the_trace_script_finds_nothing_the_profile_lacks():
    """scripts/trace_agent_syscalls.py still runs, and everything it traces the profile allows."""
    require_tool("strace", "strace")
    result = subprocess.run([sys.executable, str(TRACE_SCRIPT)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "allows everything traced" in result.stdout

#!/usr/bin/env python3
"""Trace the agent's system calls and (re)write its Localhost seccomp profile.

    sudo .venv/bin/python scripts/trace_agent_syscalls.py          # trace; say what the profile lacks
    sudo .venv/bin/python scripts/trace_agent_syscalls.py --write  # trace and rewrite the profile

Runs the agent with the DaemonSet's flags under ``strace -f`` (every thread)
through tests/support/agent_workout.py: start-up and its kernel probes, every RPC and
refusal over the unix socket and over mutual TLS on [::] from IPv4 and IPv6,
reflection, the health and metrics listeners, a policy reload on SIGHUP and
the drain on SIGTERM; once on the C extension's paths and once on the
pure-Python ones. The profile (deploy/kubernetes/base/seccomp/vmctl-agent.json,
OCI format, for kubelet's ``seccompProfile: {type: Localhost}``) allows what
was traced plus ``RUNTIME_ALLOWANCE`` below, and refuses everything else.

Rerun it when the agent changes (a new dependency, grpc.aio, a new syscall):
tests/test_seccomp_profile.py runs the agent under the profile and fails
naming every system call the profile refused it.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the workout and the agent are tests/support's (support.*)

PROFILE = ROOT / "deploy" / "kubernetes" / "base" / "seccomp" / "vmctl-agent.json"
# A syscall the profile does not name answers ENOSYS, as one an older kernel lacks: glibc and CPython
# fall back from those (clone3 to clone, close_range, faccessat2, ...) instead of failing. The
# syscalls refused on purpose answer EPERM, like any other refusal.
DEFAULT_ERRNO = errno.ENOSYS
REFUSED_ERRNO = errno.EPERM
# Both 64-bit ABIs Kubernetes nodes run; a name one of them lacks is skipped there by the runtime.
# No 32-bit (x86, x32, arm) ABI: a call through one is refused whatever its number.
ARCHITECTURES = ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"]

# Never allowed, whatever a future trace says: each one is a way out of the container or into
# the kernel that the agent never needs. open_by_handle_at with CAP_DAC_READ_SEARCH opens any
# host file through a writable hostPath's mount, outside every mount the pod has; the agent
# reads processes through /proc and advises them with process_madvise, never through ptrace
# or another process's memory.
NEVER_ALLOWED = {
    "open_by_handle_at": "opens any file on the hostPath's filesystem by handle (with CAP_DAC_READ_SEARCH)",
    "name_to_handle_at": "the handles open_by_handle_at takes",
    "ptrace": "the agent reads /proc and calls process_madvise; it never attaches",
    "process_vm_writev": "writes another process's memory",
    "process_vm_readv": "reads another process's memory (the agent reads only /proc/PID/mem's AT_RANDOM bytes)",
    "pidfd_getfd": "takes a copy of another process's open file",
    "io_uring_setup": "file and socket operations that seccomp never sees",
    "io_uring_enter": "file and socket operations that seccomp never sees",
    "io_uring_register": "file and socket operations that seccomp never sees",
    "mount": "mounts",
    "umount2": "mounts",
    "fsopen": "mounts (the new mount API)",
    "fsconfig": "mounts (the new mount API)",
    "fsmount": "mounts (the new mount API)",
    "fspick": "mounts (the new mount API)",
    "move_mount": "mounts (the new mount API)",
    "open_tree": "mounts (the new mount API)",
    "mount_setattr": "mounts (the new mount API)",
    "pivot_root": "changes the root",
    "chroot": "changes the root",
    "unshare": "new namespaces",
    "setns": "enters other namespaces (the host's, with hostPID)",
    "bpf": "kernel programs",
    "perf_event_open": "kernel attack surface, reads other processes",
    "init_module": "kernel modules",
    "finit_module": "kernel modules",
    "delete_module": "kernel modules",
    "kexec_load": "replaces the kernel",
    "kexec_file_load": "replaces the kernel",
    "keyctl": "kernel keyrings",
    "add_key": "kernel keyrings",
    "request_key": "kernel keyrings",
    "userfaultfd": "stalls the kernel at will: a classic exploit primitive",
}
# Not always seen in a trace, allowed anyway: what any Python process with threads, an asyncio
# event loop and gRPC (grpc.aio included) may call depending on timing, libc and kernel (the
# event loop, threads, futexes, memory, time, signals, files and sockets); the *at, p* and 2/3
# forms arm64 has instead of x86-64's older calls; and what runc itself calls between loading
# the filter and exec'ing the agent (Go's runtime: futex, nanosleep, sched_yield, epoll_pwait,
# tgkill, sigaltstack, ...). None of them reaches beyond the process.
RUNTIME_ALLOWANCE_BY_KIND = {
    "event loop": (
        "epoll_create epoll_create1 epoll_ctl epoll_wait epoll_pwait epoll_pwait2 eventfd eventfd2 pipe pipe2 "
        "poll ppoll select pselect6 timerfd_create timerfd_settime timerfd_gettime"
    ),
    "threads": (
        "futex futex_waitv set_robust_list get_robust_list rseq set_tid_address membarrier sched_yield "
        "sched_getaffinity sched_getparam sched_getscheduler getpriority"
    ),
    "processes": (
        "vfork wait4 waitid exit exit_group execve restart_syscall tgkill getpid gettid getppid getpgrp getpgid getsid"
    ),
    "memory": "mmap munmap mprotect mremap madvise brk mincore msync memfd_create",
    "time and randomness": "nanosleep clock_nanosleep clock_gettime clock_getres gettimeofday time getrandom",
    "signals": "rt_sigaction rt_sigprocmask rt_sigreturn rt_sigpending rt_sigtimedwait rt_sigsuspend sigaltstack",
    "identity and limits": (
        "getuid geteuid getgid getegid getgroups getresuid getresgid capget uname sysinfo prlimit64 getrlimit "
        "getrusage times arch_prctl prctl"
    ),
    "files": (
        "openat openat2 open close close_range read write readv writev pread64 pwrite64 preadv pwritev lseek "
        "fstat newfstatat statx stat lstat fstatfs statfs access faccessat faccessat2 readlink readlinkat "
        "getdents64 getcwd fcntl dup dup2 dup3 ioctl flock fsync fdatasync ftruncate mkdir mkdirat rmdir "
        "unlink unlinkat rename renameat renameat2 link linkat chmod fchmod fchmodat umask"
    ),
    "sockets": (
        "socketpair bind listen accept accept4 connect getsockname getpeername getsockopt setsockopt sendto "
        "recvfrom sendmsg recvmsg sendmmsg recvmmsg shutdown"
    ),
    "the agent's own": "pidfd_open process_madvise",
}
RUNTIME_ALLOWANCE = {name for names in RUNTIME_ALLOWANCE_BY_KIND.values() for name in names.split()}
# socket() only for the families the agent speaks: unix, IPv4, IPv6 (not netlink, packet, AF_ALG, vsock...).
SOCKET_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10}
# clone() only for threads and vfork, never with a namespace flag: CLONE_NEWNS, NEWCGROUP, NEWUTS,
# NEWIPC, NEWUSER, NEWPID, NEWNET (the same mask Docker's profile uses).
CLONE_NAMESPACE_FLAGS = 0x7E020000
# clone3 takes its flags in memory, where seccomp cannot look: it answers ENOSYS, and glibc then
# makes the same thread with clone(), whose flags the rule above checks.
CLONE3_ERRNO = errno.ENOSYS
ARGUMENT_FILTERED = {"socket", "clone", "clone3"}
TRACE_LINE = re.compile(r"^\d+\s+(?:<\.\.\. )?([a-z0-9_]+)(?:\(| resumed>)")
SOCKET_CALL = re.compile(r"^\d+\s+socket\((AF_[A-Z0-9]+)")
CLONE_CALL = re.compile(r"^\d+\s+clone\(.*flags=([A-Z0-9_|]+)")


# ---- the trace -----------------------------------------------------------------------------------


def trace_once(directory: pathlib.Path, extra_args: list[str]) -> str:
    """The workout under ``strace -f``; returns strace's output."""
    from support.agent_workout import Rig, drain, exercise_everything
    from support.agents import Agent
    from support.processes import Target, child_of

    strace = shutil.which("strace")
    if strace is None:
        raise SystemExit("strace is not installed (Debian: apt-get install strace)")
    rig = Rig.create(directory)
    out = directory / "strace.out"
    target = Target.start()
    agent = Agent([*rig.agent_args(), *extra_args], directory, prefix=[strace, "-f", "-qq", "-o", str(out), "--"])
    try:
        agent.start()
        pid = child_of(agent.proc.pid)  # strace forked the agent
        exercise_everything(rig, agent, pid, [target])
        status = drain(pid, lambda: agent.proc.wait(60), agent.socket_path)
        if status != 0:
            raise SystemExit(f"the agent exited with {status} under strace:\n{agent.log()}")
    finally:
        agent.stop()
        agent.discard_log()
        target.kill()
    return out.read_text()


def traced_syscalls(trace: str) -> collections.Counter:
    return collections.Counter(m.group(1) for m in map(TRACE_LINE.match, trace.splitlines()) if m)


def check_arguments(trace: str) -> list[str]:
    """What the trace did that the argument rules would refuse."""
    problems = []
    for family in {m.group(1) for m in map(SOCKET_CALL.match, trace.splitlines()) if m}:
        if family not in SOCKET_FAMILIES:
            problems.append(f"socket({family}): not one of {sorted(SOCKET_FAMILIES)}")
    for flags in {m.group(1) for m in map(CLONE_CALL.match, trace.splitlines()) if m}:
        if any(flag.startswith("CLONE_NEW") for flag in flags.split("|")):
            problems.append(f"clone({flags}): a namespace flag")
    return problems


# ---- the profile ---------------------------------------------------------------------------------


def build_profile(traced: set[str]) -> dict:
    seen = sorted(traced - ARGUMENT_FILTERED)
    allowance = sorted(RUNTIME_ALLOWANCE - traced - ARGUMENT_FILTERED)
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": DEFAULT_ERRNO,
        "architectures": ARCHITECTURES,
        "syscalls": [
            {
                "names": seen,
                "action": "SCMP_ACT_ALLOW",
                "comment": "what vmctl-agent called serving every RPC, mutual TLS, health, metrics, a SIGHUP "
                "reload and a SIGTERM drain (scripts/trace_agent_syscalls.py)",
            },
            {
                "names": allowance,
                "action": "SCMP_ACT_ALLOW",
                "comment": "not seen in that trace: what Python threads, asyncio and gRPC may call besides, "
                "arm64's forms of the same calls, and runc's last steps before it execs the agent",
            },
            {
                "names": ["socket"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": number, "op": "SCMP_CMP_EQ"} for number in SOCKET_FAMILIES.values()],
                "comment": "unix, IPv4 and IPv6 sockets only",
            },
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
                "comment": "threads and vfork; never a new namespace",
            },
            {
                "names": ["clone3"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": CLONE3_ERRNO,
                "comment": "its flags are out of seccomp's sight: ENOSYS, and glibc uses clone() instead",
            },
            {
                "names": sorted(NEVER_ALLOWED),
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": REFUSED_ERRNO,
                "comment": "refused on purpose, whatever a trace shows: ways out of the container (by handle "
                "through a hostPath, mounts, namespaces, a new root), into other processes' memory (ptrace, "
                "process_vm_*, pidfd_getfd) and into the kernel (bpf, modules, kexec, keyrings, perf, userfaultfd, "
                "io_uring, whose operations seccomp never sees); "
                "scripts/trace_agent_syscalls.py says why for each",
            },
        ],
    }


def allowed_names(profile: dict) -> set[str]:
    return {name for entry in profile["syscalls"] if entry["action"] == "SCMP_ACT_ALLOW" for name in entry["names"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"rewrite {PROFILE.relative_to(ROOT)}")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the agent reads other processes")
    traced: collections.Counter = collections.Counter()
    problems = []
    for extra in ([], ["--no-native"]):  # the C extension's paths, and the pure-Python fallbacks
        with tempfile.TemporaryDirectory(prefix="vmctl-trace-") as tmp:
            trace = trace_once(pathlib.Path(tmp), extra)
        traced += traced_syscalls(trace)
        problems += check_arguments(trace)
    problems += [f"{name}: never allowed ({NEVER_ALLOWED[name]})" for name in sorted(set(traced) & set(NEVER_ALLOWED))]
    print(f"{len(traced)} distinct system calls traced: {' '.join(sorted(traced))}")
    if problems:
        print(
            "the agent now does what the profile refuses on purpose; decide before changing it:\n  "
            + "\n  ".join(problems),
            file=sys.stderr,
        )
        return 1
    if args.write:
        PROFILE.parent.mkdir(parents=True, exist_ok=True)
        PROFILE.write_text(json.dumps(build_profile(set(traced)), indent=2) + "\n")
        print(f"wrote {PROFILE.relative_to(ROOT)}")
        return 0
    lacking = sorted(set(traced) - allowed_names(json.loads(PROFILE.read_text())) - ARGUMENT_FILTERED)
    if lacking:
        print(f"{PROFILE.relative_to(ROOT)} lacks {' '.join(lacking)}: rerun with --write", file=sys.stderr)
        return 1
    print(f"{PROFILE.relative_to(ROOT)} allows everything traced")
    return 0


if __name__ == "__main__":
    sys.exit(main())

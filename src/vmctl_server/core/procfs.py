"""The one module that reads /proc (and writes its one file the agent writes, clear_refs).

Every read expects the process to vanish mid-way (psutil's ``_pslinux.py``
lesson): ``ENOENT``/``ESRCH`` become :class:`ProcessGone`, ``EACCES``/``EPERM``
become :class:`AccessDenied`. Values come back as plain Python types.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import struct
from dataclasses import dataclass

from vmctl_server.core.faults import AccessDenied, NoAddressSpace, ProcessGone

PROC = "/proc"
PF_KTHREAD = 0x00200000  # include/linux/sched.h: the task is a kernel thread
AT_RANDOM = 25  # auxv key: address of 16 random bytes the kernel puts on a new stack
_AUXV_PAIR = struct.Struct("=QQ")
CLEAR_REFS_ALL = b"1"  # fs/proc/task_mmu.c: clear the referenced bits of every page the process maps
NS_PER_TICK = 1_000_000_000 // os.sysconf("SC_CLK_TCK")  # /proc/PID/stat counts CPU time in USER_HZ ticks


def _gone_or_denied(pid: int, exc: OSError) -> Exception:
    if exc.errno in (errno.ENOENT, errno.ESRCH):
        return ProcessGone(f"process {pid} does not exist", pid=pid)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return AccessDenied(f"the agent may not read /proc/{pid}: {exc.strerror}", pid=pid)
    return exc


def read_bytes(pid: int, name: str) -> bytes:
    """The whole of /proc/PID/NAME, or ProcessGone / AccessDenied."""
    try:
        with open(f"{PROC}/{pid}/{name}", "rb", buffering=0) as f:
            return f.read()
    except OSError as exc:
        raise _gone_or_denied(pid, exc) from exc


def open_fd(pid: int, name: str, flags: int = os.O_RDONLY) -> int:
    """An fd on /proc/PID/NAME (for the ioctls), or ProcessGone / AccessDenied."""
    try:
        return os.open(f"{PROC}/{pid}/{name}", flags | os.O_CLOEXEC)
    except OSError as exc:
        raise _gone_or_denied(pid, exc) from exc


def exe_elf_class(pid: int) -> int:
    """EI_CLASS of the process's executable (1: 32-bit, 2: 64-bit), or 0 when
    it cannot be read (a process gone, an executable that is not ELF)."""
    try:
        fd = os.open(f"{PROC}/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        head = os.pread(fd, 5, 0)
    except OSError:
        return 0
    finally:
        os.close(fd)
    return head[4] if len(head) == 5 and head[:4] == b"\x7fELF" else 0


@dataclass(frozen=True)
class ProcStat:
    pid: int
    comm: str
    state: str
    ppid: int
    flags: int
    start_time: int  # clock ticks since boot
    major_faults: int  # of every thread, since the process started
    cpu_ticks: int  # user + system time of every thread, in clock ticks

    @property
    def cpu_time_ns(self) -> int:
        return self.cpu_ticks * NS_PER_TICK

    @property
    def is_kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)

    @property
    def is_zombie(self) -> bool:
        return self.state in ("Z", "X", "x")


def parse_stat(pid: int, data: bytes) -> ProcStat:
    # comm may hold spaces and ')' itself; it ends at the last ')'.
    open_paren = data.index(b"(")
    close_paren = data.rindex(b")")
    comm = data[open_paren + 1 : close_paren].decode("utf-8", "backslashreplace")
    fields = data[close_paren + 2 :].split()
    # fields[0] is field 3 (state) of proc(5): field N is fields[N - 3].
    return ProcStat(
        pid=pid,
        comm=comm,
        state=fields[0].decode(),
        ppid=int(fields[1]),
        flags=int(fields[6]),
        start_time=int(fields[19]),
        major_faults=int(fields[9]),
        cpu_ticks=int(fields[11]) + int(fields[12]),
    )


def read_stat(pid: int) -> ProcStat:
    data = read_bytes(pid, "stat")
    if not data:
        raise ProcessGone(f"process {pid} does not exist", pid=pid)
    return parse_stat(pid, data)


def require_user_process(stat: ProcStat) -> None:
    """Refuse kernel threads and zombies: neither has a user address space."""
    # The messages name no comm: they answer callers before the policy has
    # said whether the caller may read this process.
    if stat.is_kernel_thread:
        raise NoAddressSpace(f"pid {stat.pid} is a kernel thread and has no user address space", pid=stat.pid)
    if stat.is_zombie:
        raise ProcessGone(f"process {stat.pid} has exited (zombie)", pid=stat.pid)


def exec_id(pid: int) -> bytes:
    """16 bytes that change whenever the process execs (:meth:`ProcessDir.exec_id`)."""
    with ProcessDir(pid) as proc:
        return proc.exec_id()


@functools.cache
def boot_id() -> str:
    with open(f"{PROC}/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def boot_id_bytes() -> bytes:
    return bytes.fromhex(boot_id().replace("-", ""))


def list_pids() -> list[int]:
    return sorted(int(name) for name in os.listdir(PROC) if name.isdigit())


def parse_cgroup_v2(data: bytes) -> str:
    for line in data.decode("utf-8", "backslashreplace").splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


def read_cgroup_v2(pid: int) -> str:
    """The cgroup v2 path (the ``0::`` line) as the kernel shows it to this
    process: relative to its cgroup namespace root (:mod:`vmctl_server.core.cgroups`
    maps it to the node's path), or "" if the process has none."""
    return parse_cgroup_v2(read_bytes(pid, "cgroup"))


def namespace_id(pid: int, kind: str) -> tuple[int, int]:
    """Which namespace of ``kind`` (cgroup, mnt, pid, ...) the process is in:
    two processes share one exactly when these (device, inode) pairs are equal."""
    try:
        st = os.stat(f"{PROC}/{pid}/ns/{kind}")
    except OSError as exc:
        raise _gone_or_denied(pid, exc) from exc
    return st.st_dev, st.st_ino


def root_directory(pid: int) -> str:
    """A path through which the process's root directory, in its own mount
    namespace, can be opened (with ptrace read access to it)."""
    return f"{PROC}/{pid}/root"


@dataclass(frozen=True)
class ProcStatus:
    uids: tuple[int, ...]  # real, effective, saved, filesystem
    gids: tuple[int, ...]
    dump_owner: int  # the owner of /proc/PID/status (see owner)
    rss_bytes: int
    swap_bytes: int

    @property
    def uid(self) -> int:
        """The real uid: who started the process, not whose it is (see owner)."""
        return self.uids[0]

    @property
    def owner(self) -> int | None:
        """The uid this process wholly belongs to, or None when it belongs to none.

        The kernel lets a user ptrace-read a process (its maps, its memory)
        only when the user's uid is the process's real, effective and saved
        uid, its gid the real, effective and saved gid, and the process is
        dumpable (``__ptrace_may_access``). Each rules out a confused deputy:
        a setuid program the user started (real uid the user's, effective
        root), a setgid one, a daemon that dropped all but its saved root uid,
        a process that made itself non-dumpable to keep its own user out
        (ssh-agent, gpg-agent). No field shows dumpability; the owner of the
        files in /proc/PID does: ``task_dump_owner`` makes them root's (the
        root of the process's user namespace) unless the process is dumpable,
        and its effective uid's otherwise. (The /proc/PID directory itself is
        always the effective uid's, dumpable or not.) For uid 0 the two cannot
        be told apart, and need not be: root's processes are root's.
        """
        uid = self.uids[0]
        if len(set(self.uids)) != 1 or len(set(self.gids)) != 1 or self.dump_owner != uid:
            return None
        return uid


def parse_status(data: bytes, dump_owner: int) -> ProcStatus:
    ids: dict[bytes, tuple[int, ...]] = {b"Uid": (), b"Gid": ()}
    sizes_kb = {b"VmRSS": 0, b"VmSwap": 0}
    for line in data.splitlines():
        key, _, value = line.partition(b":")
        if key in ids:
            ids[key] = tuple(int(field) for field in value.split())
        elif key in sizes_kb:
            sizes_kb[key] = int(value.split()[0])
    if not ids[b"Uid"] or not ids[b"Gid"]:
        raise ValueError("/proc/PID/status without Uid or Gid lines")
    return ProcStatus(ids[b"Uid"], ids[b"Gid"], dump_owner, sizes_kb[b"VmRSS"] * 1024, sizes_kb[b"VmSwap"] * 1024)


def read_status(pid: int) -> ProcStatus:
    with ProcessDir(pid) as proc:
        return proc.status()


def count_vmas(pid: int) -> int:
    """VMA count from /proc/PID/maps: no page-table walk, one line per VMA."""
    return read_bytes(pid, "maps").count(b"\n")


class ProcessDir:
    """/proc/PID, opened once: every file read through it is of that one process.

    Facts read by path one after another can belong to two processes: the
    first may exit and its pid be given to a new one in between. The kernel
    ties an open /proc/PID directory to the process it was opened for; once
    that process is gone, opening anything through it fails (ESRCH) instead
    of reaching the pid's next owner. So the start time read through it, which
    callers compare with the one they identified the process by, vouches for
    every other fact read through it. Use as a context manager.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._fd = os.open(f"{PROC}/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _gone_or_denied(pid, exc) from exc

    def __enter__(self) -> ProcessDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def open(self, name: str) -> int:
        """An fd on /proc/PID/NAME of this process, or ProcessGone / AccessDenied."""
        try:
            return os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._fd)
        except OSError as exc:
            raise _gone_or_denied(self.pid, exc) from exc

    def read_owned(self, name: str) -> tuple[bytes, int]:
        """The whole of /proc/PID/NAME, and the uid that owns it."""
        fd = self.open(name)
        try:
            with open(fd, "rb", buffering=0, closefd=False) as f:
                return f.read(), os.fstat(fd).st_uid
        except OSError as exc:
            raise _gone_or_denied(self.pid, exc) from exc
        finally:
            os.close(fd)

    def read(self, name: str) -> bytes:
        return self.read_owned(name)[0]

    def clear_referenced(self) -> None:
        """Clear the referenced bits of every page this process maps
        (/proc/PID/clear_refs), so that smaps' Referenced counts only what it
        touches from now on.

        The file is mode 0200 and belongs to the process's owner, and the
        kernel checks nothing else, so opening another user's needs
        CAP_DAC_OVERRIDE (CAP_DAC_READ_SEARCH covers reading only)."""
        try:
            fd = os.open("clear_refs", os.O_WRONLY | os.O_CLOEXEC, dir_fd=self._fd)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise AccessDenied(
                    f"the agent may not clear the referenced bits of process {self.pid}: /proc/{self.pid}/clear_refs"
                    " is writable by the process's owner alone, and writing another user's needs CAP_DAC_OVERRIDE",
                    pid=self.pid,
                    missing="CAP_DAC_OVERRIDE",
                ) from exc
            raise _gone_or_denied(self.pid, exc) from exc
        try:
            os.write(fd, CLEAR_REFS_ALL)
        except OSError as exc:
            raise _gone_or_denied(self.pid, exc) from exc
        finally:
            os.close(fd)

    def stat(self) -> ProcStat:
        data = self.read("stat")
        if not data:
            raise ProcessGone(f"process {self.pid} does not exist", pid=self.pid)
        return parse_stat(self.pid, data)

    def status(self) -> ProcStatus:
        data, owner = self.read_owned("status")
        return parse_status(data, owner)

    def cgroup_v2(self) -> str:
        """As :func:`read_cgroup_v2`."""
        return parse_cgroup_v2(self.read("cgroup"))

    def count_vmas(self) -> int:
        return self.read("maps").count(b"\n")

    def exec_id(self) -> bytes:
        """16 bytes that change whenever the process execs.

        The start time survives exec, so it cannot tell an exec'd process from
        the one the cookie named. The auxiliary vector is written afresh by
        every exec (with ASLR its addresses differ each time), and AT_RANDOM
        points at 16 bytes the kernel draws from its RNG for each new image,
        so even without ASLR two images of the same program differ.
        """
        auxv = self.read("auxv")
        if not auxv:
            raise ProcessGone(f"process {self.pid} has no address space any more", pid=self.pid)
        digest = hashlib.sha256(auxv)
        random_addr = next(
            (value for key, value in _AUXV_PAIR.iter_unpack(auxv[: len(auxv) // 16 * 16]) if key == AT_RANDOM),
            None,
        )
        if random_addr is not None:
            fd = self.open("mem")
            try:
                digest.update(os.pread(fd, 16, random_addr))
            except OSError:
                pass  # unreadable (the process is exiting): the auxv alone still differs per exec under ASLR
            finally:
                os.close(fd)
        return digest.digest()[:16]


def read_meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes, by key."""
    values: dict[str, int] = {}
    with open(f"{PROC}/meminfo", "rb") as f:
        for line in f:
            key, _, rest = line.partition(b":")
            parts = rest.split()
            if parts:
                scale = 1024 if len(parts) > 1 and parts[1] == b"kB" else 1
                values[key.decode()] = int(parts[0]) * scale
    return values


Pressure = dict[str, dict[str, float]]  # {"some": {"avg10": ..., "total": ...}, "full": {...}}


def parse_pressure(text: str) -> Pressure:
    """PSI text (/proc/pressure/memory, a cgroup's memory.pressure) by line kind and key."""
    pressure: Pressure = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        pressure[kind] = {key: float(value) for key, value in (pair.split("=") for pair in pairs)}
    return pressure


def read_pressure(path: str) -> Pressure | None:
    """The PSI file at ``path``, or None when there is none to read (no PSI, no such cgroup)."""
    try:
        with open(path) as f:
            return parse_pressure(f.read())
    except OSError:
        return None


def read_memory_pressure() -> Pressure | None:
    """/proc/pressure/memory as {"some": {...}, "full": {...}}, or None without PSI."""
    return read_pressure(f"{PROC}/pressure/memory")

"""What this kernel supports, probed once when the agent starts.

Each probe is a real call that changes nothing: a zero-length
process_madvise per advice against a short-lived child (the kernel checks
remote-advice validity and CAP_SYS_NICE before it looks at the length), one
PROCMAP_QUERY and one PAGEMAP_SCAN on the agent's own /proc files, and a
write of "0" to its own /proc/self/clear_refs (the kernel opens the file, then
refuses the value with EINVAL: clear_refs is there and nothing was cleared).

Access sampling is clear_refs only. DAMON's virtual-address mode would
sample without disturbing the kernel's page aging (it keeps each accessed
bit it clears as the page's young flag, which reclaim honours; clear_refs
keeps nothing), but it is not implemented here, and these machines' kernels
lack CONFIG_DAMON_VADDR, so it is not probed for either.
"""

from __future__ import annotations

import errno as errno_mod
import os
import subprocess
import sys
from collections.abc import Callable

from vmctl_api.words import ADVICES
from vmctl_server.core import kernel, procfs
from vmctl_server.core.faults import VmctlFault
from vmctl_server.core.kernel import Capabilities


def _errno_text(err: int) -> str:
    return f"{errno_mod.errorcode.get(err, err)}: {os.strerror(err)}"


def _probe_advice(caps: Capabilities) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        try:
            pidfd = kernel.pidfd_open(child.pid)
        except VmctlFault as exc:
            caps.probe_errors["pidfd_open"] = exc.message
            return
        caps.pidfd_open = True
        try:
            empty = kernel.ffi.new("struct iovec[1]")
            for name, (number, madv) in ADVICES.items():
                result = kernel.process_madvise(pidfd, empty, 1, madv)
                if result == -errno_mod.ENOSYS:
                    caps.probe_errors["process_madvise"] = _errno_text(errno_mod.ENOSYS)
                    return
                caps.process_madvise = True
                if result >= 0:
                    caps.advices |= {number}
                    caps.advice_permitted = True
                elif result == -errno_mod.EPERM:
                    caps.probe_errors["advice_permitted"] = (
                        "process_madvise needs CAP_SYS_NICE and ptrace access to the target: " + _errno_text(-result)
                    )
                else:
                    caps.probe_errors[f"advice.{name}"] = _errno_text(-result)
        finally:
            os.close(pidfd)
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        child.wait()


def _probe_ioctl(caps: Capabilities, name: str, proc_file: str, call: Callable[[int, int], object]) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    buffer = kernel.ffi.new("char[]", page)  # any mapped address of our own will do
    address = int(kernel.ffi.cast("uintptr_t", buffer)) & ~(page - 1)
    fd = os.open(f"/proc/self/{proc_file}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        call(fd, address)
        setattr(caps, name, True)
    except (VmctlFault, OSError) as exc:
        caps.probe_errors[name] = str(exc)
    finally:
        os.close(fd)


CAP_DAC_OVERRIDE = 1  # linux/capability.h


def _holds_capability(number: int) -> bool:
    status = procfs.read_bytes(os.getpid(), "status")
    effective = next(line for line in status.splitlines() if line.startswith(b"CapEff:"))
    return bool(int(effective.split()[1], 16) >> number & 1)


def _probe_access_sampling(caps: Capabilities) -> None:
    try:
        fd = os.open("/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        caps.probe_errors["access_sampling"] = f"/proc/self/clear_refs: {_errno_text(exc.errno or 0)}"
        return
    try:
        os.write(fd, b"0")  # not a type the kernel knows: refused before anything is cleared
        caps.probe_errors["access_sampling"] = "/proc/self/clear_refs took a value it should refuse"
        return
    except OSError as exc:
        if exc.errno != errno_mod.EINVAL:
            caps.probe_errors["access_sampling"] = f"/proc/self/clear_refs: {_errno_text(exc.errno or 0)}"
            return
    finally:
        os.close(fd)
    caps.access_sampling = "clear_refs"
    if not _holds_capability(CAP_DAC_OVERRIDE):
        caps.probe_errors["access_sampling"] = (
            f"only processes of uid {os.geteuid()} can be sampled: another user's /proc/PID/clear_refs"
            " needs CAP_DAC_OVERRIDE, which the agent does not hold"
        )


def probe() -> Capabilities:
    caps = Capabilities()
    _probe_access_sampling(caps)
    _probe_advice(caps)
    _probe_ioctl(caps, "procmap_query", "maps", kernel.procmap_query_build_id)
    _probe_ioctl(
        caps,
        "pagemap_scan",
        "pagemap",
        lambda fd, address: kernel.pagemap_scan_residency(fd, address, address + os.sysconf("SC_PAGE_SIZE")),
    )
    return caps

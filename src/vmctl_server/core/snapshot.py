"""Reading one process's address space: identity, layout and attributes.

Reads only the sources the attribute mask needs (the layout from a
PROCMAP_QUERY loop where the kernel has it, else the maps text: see
LayoutQuery; PAGEMAP_SCAN for residency, smaps for accounting and access,
PROCMAP_QUERY for build ids) and checks the process's identity before and
after, so a snapshot never mixes two processes or two images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from vmctl_api.words import ATTR_ACCESS, ATTR_ACCOUNTING, ATTR_BUILD_ID, ATTR_KNOWN, ATTR_LAYOUT, ATTR_RESIDENCY
from vmctl_server.core import procfs
from vmctl_server.core.cookie import CookieClaims
from vmctl_server.core.faults import InvalidRequest, ProcessChanged, VmctlFault
from vmctl_server.core.layout import KERNEL_HALF, layout_digest

PID_MAX_LIMIT = 1 << 22  # kernel/pid.c: PID_MAX_LIMIT on 64-bit


class VmaTable(Protocol):
    """What both table implementations offer (see pytable and nativetable)."""

    native: bool
    filled_mask: int

    def __len__(self) -> int: ...
    def layout_records(self) -> bytes: ...
    def fill_residency(self, pagemap_fd: int) -> None: ...
    def fill_build_ids(self, maps_fd: int) -> None: ...
    def fill_access(self) -> None: ...
    def encode(self, mask: int, prefix: bytes = b"") -> bytes: ...
    def encode_chunks(self, mask: int, max_bytes: int) -> list[bytes]: ...


class TableBackend(Protocol):
    def from_maps(self, data: bytes) -> VmaTable: ...
    def from_smaps(self, data: bytes) -> VmaTable: ...
    def read(self, pid: int, source: str) -> VmaTable:
        """/proc/PID/``source`` ("maps" or "smaps") as a table."""
        ...

    def query(self, pid: int, tail: bytes, *, names: bool = True) -> VmaTable:
        """The table ``read(pid, "maps")`` gives, from PROCMAP_QUERY, then
        ``tail`` (maps lines) parsed; OSError when the ioctl fails. With
        ``names`` False, its layout records alone (no file paths asked)."""
        ...


@dataclass(frozen=True)
class Identity:
    pid: int
    start_time: int
    comm: str
    exec_id: bytes


def check_pid(pid: int) -> None:
    if not 0 < pid < PID_MAX_LIMIT:
        raise InvalidRequest(f"pid {pid} is out of range (1..{PID_MAX_LIMIT - 1})", reason="INVALID_PID", field="pid")


def check_attr_mask(attr_mask: int) -> None:
    if attr_mask & ~ATTR_KNOWN:
        raise InvalidRequest(
            f"attr_mask has unknown bits 0x{attr_mask & ~ATTR_KNOWN:x}", reason="UNKNOWN_ATTR", field="attr_mask"
        )


def read_identity(pid: int) -> Identity:
    stat = procfs.read_stat(pid)
    procfs.require_user_process(stat)
    return Identity(pid, stat.start_time, stat.comm, procfs.exec_id(pid))


def _check_same(cleared: Identity, now: Identity) -> None:
    """The process sampled is the one whose bits were cleared: not a new one
    on the same pid, not a new image."""
    if now.start_time != cleared.start_time:
        raise ProcessChanged(f"pid {now.pid} became another process during the sampling window", pid=now.pid)
    if now.exec_id != cleared.exec_id:
        raise ProcessChanged(f"process {now.pid} exec'd during the sampling window", pid=now.pid)


def claims_for(identity: Identity, digest: bytes) -> CookieClaims:
    return CookieClaims(procfs.boot_id_bytes(), identity.pid, identity.start_time, identity.exec_id, digest)


@dataclass
class Snapshot:
    identity: Identity
    table: VmaTable
    layout_records: bytes
    result_mask: int

    @property
    def digest(self) -> bytes:
        return layout_digest(self.layout_records)


@dataclass(frozen=True)
class SourceSupport:
    """Which optional kernel sources this kernel has (from the startup probe);
    ``layout_query`` False keeps the layout on the maps text even so."""

    pagemap_scan: bool = True
    procmap_query: bool = True
    layout_query: bool = True


class LayoutQuery:
    """When the layout may come from a PROCMAP_QUERY loop instead of the maps text.

    The loop costs the kernel less than printing the text (no seq_file, no
    padding, no number formatting: 0.6-0.8x of a maps read here), and the
    table it gives equals the text's, so the layout digest, and the cookie,
    do not depend on which one was read, with one exception: the gate VMA
    (x86-64's [vsyscall]), which maps prints last and PROCMAP_QUERY never
    finds, since it is no VMA of the process. So at start the agent reads its
    own maps text, keeps the lines above the user half as the ``tail`` to add,
    and checks that loop plus tail equals the text for itself; a process whose
    executable has another ELF class than the agent's (a 32-bit process has
    no gate VMA) or cannot be read, a kernel without the ioctl, or a failed
    check keep the maps text."""

    def __init__(self, backend: TableBackend, enabled: bool) -> None:
        self.tail: bytes | None = None
        self.problem = "" if enabled else "off"
        self._elf_class = 0
        if enabled:
            self._probe(backend)

    def _probe(self, backend: TableBackend) -> None:
        me = os.getpid()
        text = procfs.read_bytes(me, "maps")
        tail = b"".join(line + b"\n" for line in text.splitlines() if int(line.split(b"-", 1)[0], 16) >= KERNEL_HALF)
        self._elf_class = procfs.exe_elf_class(me)
        for _attempt in range(3):  # the agent's own threads may map memory between the two reads
            try:
                queried = backend.query(me, tail).layout_records()
            except (OSError, VmctlFault) as exc:
                self.problem = f"PROCMAP_QUERY: {exc}"
                return
            if queried == backend.read(me, "maps").layout_records():
                self.tail, self.problem = tail, ""
                return
        self.problem = "PROCMAP_QUERY's layout of the agent itself differed from its maps text"

    def tail_for(self, pid: int) -> bytes | None:
        """What to add to the loop for ``pid``, or None: read the maps text."""
        if self.tail is None:
            return None
        if not self.tail:
            return b""  # no gate VMA on this machine at all
        return self.tail if procfs.exe_elf_class(pid) == self._elf_class else None


class SnapshotReader:
    def __init__(self, backend: TableBackend, sources: SourceSupport) -> None:
        self.backend = backend
        self.sources = sources
        self.layout_query = LayoutQuery(backend, sources.procmap_query and sources.layout_query)

    def take(self, pid: int, attr_mask: int, cleared: Identity | None = None) -> Snapshot:
        """A snapshot with the groups of ``attr_mask``. ATTR_ACCESS takes
        ``cleared``: the process whose referenced bits were cleared when the
        sampling window began (:mod:`vmctl_server.core.sampling`), which the
        snapshot must still be, or PROCESS_CHANGED."""
        check_pid(pid)
        check_attr_mask(attr_mask)
        if attr_mask & ATTR_ACCESS and cleared is None:
            raise InvalidRequest(
                "VMA_ATTR_ACCESS needs a sampling window", reason="INVALID_WINDOW", field="access_window_ms"
            )
        want = attr_mask | ATTR_LAYOUT
        for _attempt in range(2):
            before = read_identity(pid)
            snapshot = self._read(pid, want, before)
            if read_identity(pid) == before:
                if cleared is not None:
                    _check_same(cleared, before)
                return snapshot
        raise ProcessChanged(f"process {pid} kept exec'ing while it was read", pid=pid)

    def read_layout(self, pid: int) -> bytes:
        """Packed layout records only: the cheapest read, for the cookie check."""
        return self.read_maps(pid, names=False).layout_records()

    def read_maps(self, pid: int, names: bool = True) -> VmaTable:
        """The layout as a table: from PROCMAP_QUERY where :class:`LayoutQuery`
        allows it, else (and whenever the loop fails) from the maps text. With
        ``names`` False only its layout records are wanted: the loop does not
        ask file VMAs their paths (the kernel's d_path, about a third of its cost)."""
        tail = self.layout_query.tail_for(pid)
        if tail is not None:
            try:
                return self.backend.query(pid, tail, names=names)
            except OSError:
                pass
        return self.backend.read(pid, "maps")

    def _read(self, pid: int, want: int, identity: Identity) -> Snapshot:
        use_smaps = bool(want & (ATTR_ACCOUNTING | ATTR_ACCESS)) or (
            want & ATTR_RESIDENCY and not self.sources.pagemap_scan
        )
        table = self.backend.read(pid, "smaps") if use_smaps else self.read_maps(pid)
        if want & ATTR_RESIDENCY and not use_smaps:
            fd = procfs.open_fd(pid, "pagemap")
            try:
                table.fill_residency(fd)
            finally:
                os.close(fd)
        if want & ATTR_BUILD_ID and self.sources.procmap_query:
            fd = procfs.open_fd(pid, "maps")
            try:
                table.fill_build_ids(fd)
            finally:
                os.close(fd)
        if want & ATTR_ACCESS:
            table.fill_access()
        # Like statx, the answer may hold more than was asked when it came
        # free: smaps carries rss and swap along with the accounting.
        return Snapshot(identity, table, table.layout_records(), ATTR_LAYOUT | table.filled_mask)

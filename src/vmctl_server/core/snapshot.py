"""Reading one process's address space: identity, layout and attributes.

Reads only the sources the attribute mask needs (maps for the layout,
PAGEMAP_SCAN for residency, smaps for accounting and access, PROCMAP_QUERY
for build ids) and checks the process's identity before and after, so a
snapshot never mixes two processes or two images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from vmctl_api.words import ATTR_ACCESS, ATTR_ACCOUNTING, ATTR_BUILD_ID, ATTR_KNOWN, ATTR_LAYOUT, ATTR_RESIDENCY
from vmctl_server.core import procfs
from vmctl_server.core.cookie import CookieClaims
from vmctl_server.core.faults import InvalidRequest, ProcessChanged
from vmctl_server.core.layout import layout_digest

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
    """Which optional kernel sources this kernel has (from the startup probe)."""

    pagemap_scan: bool = True
    procmap_query: bool = True


class SnapshotReader:
    def __init__(self, backend: TableBackend, sources: SourceSupport) -> None:
        self.backend = backend
        self.sources = sources

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
        return self.backend.read(pid, "maps").layout_records()

    def _read(self, pid: int, want: int, identity: Identity) -> Snapshot:
        use_smaps = bool(want & (ATTR_ACCOUNTING | ATTR_ACCESS)) or (
            want & ATTR_RESIDENCY and not self.sources.pagemap_scan
        )
        table = self.backend.read(pid, "smaps" if use_smaps else "maps")
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

"""Pure-Python VMA tables: the reference the native (C) tables must equal.

Parses /proc/PID/maps and /proc/PID/smaps text into rows keyed by the
``vmctl.v1.Vma`` field names, fills residency (PAGEMAP_SCAN) and build ids
(PROCMAP_QUERY) through :mod:`vmctl_server.core.kernel`, and encodes the rows as
the wire bytes of ``GetVmaInfoResponse.vmas`` with the protobuf library
itself, which is what makes it a trustworthy reference for the C encoder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from vmctl_api import vmctl_pb2 as pb
from vmctl_api.words import ATTR_ACCESS, ATTR_ACCOUNTING, ATTR_BUILD_ID, ATTR_RESIDENCY, KIND_FILE
from vmctl_server.core import kernel, procfs
from vmctl_server.core.layout import (
    KERNEL_HALF,
    LAYOUT_RECORD,
    PERM_EXEC,
    PERM_READ,
    PERM_SHARED,
    PERM_WRITE,
    perm_flags,
    vma_kind,
)

# smaps keys reported in kB, by the Vma field that carries them in bytes.
SMAPS_KB_FIELDS = {
    b"Rss": "rss_bytes",
    b"Swap": "swap_bytes",
    b"Pss": "pss_bytes",
    b"Referenced": "referenced_bytes",
    b"Anonymous": "anonymous_bytes",
    b"Pss_Dirty": "pss_dirty_bytes",
    b"Shared_Clean": "shared_clean_bytes",
    b"Shared_Dirty": "shared_dirty_bytes",
    b"Private_Clean": "private_clean_bytes",
    b"Private_Dirty": "private_dirty_bytes",
    b"KSM": "ksm_bytes",
    b"LazyFree": "lazy_free_bytes",
    b"AnonHugePages": "anon_huge_pages_bytes",
    b"ShmemPmdMapped": "shmem_pmd_mapped_bytes",
    b"FilePmdMapped": "file_pmd_mapped_bytes",
    b"Shared_Hugetlb": "shared_hugetlb_bytes",
    b"Private_Hugetlb": "private_hugetlb_bytes",
    b"SwapPss": "swap_pss_bytes",
    b"Locked": "locked_bytes",
    b"KernelPageSize": "kernel_page_size_bytes",
    b"MMUPageSize": "mmu_page_size_bytes",
}
RESIDENCY_FIELDS = ("rss_bytes", "swap_bytes")
ACCOUNTING_FIELDS = (
    *(f for f in SMAPS_KB_FIELDS.values() if f not in RESIDENCY_FIELDS),
    "thp_eligible",
    "vm_flags",
)
_HEX_DIGITS = frozenset(b"0123456789abcdef")


def parse_header(line: bytes) -> dict[str, Any]:
    """One /proc/PID/maps line (also the first line of each smaps entry)."""
    parts = line.split(b" ", 5)
    start, _, end = parts[0].partition(b"-")
    major, _, minor = parts[3].partition(b":")
    raw_path = parts[5].lstrip(b" ") if len(parts) == 6 else b""
    try:
        path = raw_path.decode("utf-8")
        raw_copy = b""
    except UnicodeDecodeError:
        path = raw_path.decode("utf-8", "backslashreplace")
        raw_copy = raw_path
    dev_major, dev_minor, inode = int(major, 16), int(minor, 16), int(parts[4])
    return {
        "start": int(start, 16),
        "end": int(end, 16),
        "perms": parts[1].decode("ascii"),
        "offset": int(parts[2], 16),
        "dev_major": dev_major,
        "dev_minor": dev_minor,
        "inode": inode,
        "path": path,
        "raw_path": raw_copy,
        "kind": vma_kind(dev_major, dev_minor, inode, raw_path),
        "_flags": perm_flags(parts[1]),
    }


class PyVmaTable:
    """VMA rows as dicts; slow but obviously correct."""

    native = False

    def __init__(self, rows: list[dict[str, Any]], filled_mask: int) -> None:
        self._layout_only = False  # from query(names=False): no paths to encode
        self.rows = rows
        self.filled_mask = filled_mask

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_maps(cls, data: bytes) -> PyVmaTable:
        return cls([parse_header(line) for line in data.split(b"\n") if line], 0)

    @classmethod
    def from_smaps(cls, data: bytes) -> PyVmaTable:
        rows: list[dict[str, Any]] = []
        row: dict[str, Any] = {}
        for line in data.split(b"\n"):
            if not line:
                continue
            if line[0] in _HEX_DIGITS:
                row = parse_header(line)
                rows.append(row)
                continue
            key, _, value = line.partition(b":")
            field = SMAPS_KB_FIELDS.get(key)
            if field is not None:
                row[field] = int(value.split()[0]) * 1024
            elif key == b"THPeligible":
                row["thp_eligible"] = value.strip() == b"1"
            elif key == b"VmFlags":
                row["vm_flags"] = value.strip().decode("ascii")
        return cls(rows, ATTR_RESIDENCY | ATTR_ACCOUNTING)

    @classmethod
    def read(cls, pid: int, source: str) -> PyVmaTable:
        """/proc/PID/maps or /proc/PID/smaps (``source``), read whole, then parsed."""
        data = procfs.read_bytes(pid, source)
        return cls.from_smaps(data) if source == "smaps" else cls.from_maps(data)

    @classmethod
    def query(cls, pid: int, tail: bytes, *, names: bool = True) -> PyVmaTable:
        """The layout of /proc/PID/maps from PROCMAP_QUERY, one ioctl per VMA,
        then ``tail`` (maps lines: the gate VMA): the rows :meth:`read` makes
        of the maps text. OSError when the ioctl fails. With ``names`` False,
        for :meth:`layout_records` alone: file VMAs' paths are not asked
        (left empty) and it encodes nothing."""
        fd = procfs.open_fd(pid, "maps")
        try:
            try:
                queried = kernel.procmap_query_layout(fd, names=names)
            except OSError as exc:
                raise procfs._gone_or_denied(pid, exc) from exc
        finally:
            os.close(fd)
        rows = [_queried_row(q) for q in queried]
        table = cls(rows + cls.from_maps(tail).rows, 0)
        table._layout_only = not names
        return table

    def _check_paths(self) -> None:
        if self._layout_only:
            raise ValueError("this table holds the layout records alone (query with names=False): no paths")

    def layout_records(self) -> bytes:
        pack = LAYOUT_RECORD.pack
        return b"".join(
            pack(r["start"], r["end"], r["offset"], r["inode"], r["dev_major"], r["dev_minor"], r["_flags"], r["kind"])
            for r in self.rows
        )

    def fill_residency(self, pagemap_fd: int) -> None:
        """rss_bytes and swap_bytes per VMA from one PAGEMAP_SCAN walk."""
        # [vsyscall] lies in the kernel half, where PAGEMAP_SCAN refuses to walk.
        scanned = [r for r in self.rows if r["end"] <= KERNEL_HALF]
        for r in self.rows:
            r["rss_bytes"] = r["swap_bytes"] = 0
        if scanned:
            runs = kernel.pagemap_scan_residency(pagemap_fd, scanned[0]["start"], scanned[-1]["end"])
            _attribute_runs(scanned, runs)
        self.filled_mask |= ATTR_RESIDENCY

    def fill_build_ids(self, maps_fd: int) -> None:
        for r in self.rows:
            if r["kind"] == KIND_FILE:
                r["build_id"] = kernel.procmap_query_build_id(maps_fd, r["start"])
        self.filled_mask |= ATTR_BUILD_ID

    def fill_access(self) -> None:
        """accessed_bytes per VMA: smaps' Referenced, for a table read after the
        process's referenced bits were cleared (the caller vouches for that)."""
        if not self.filled_mask & ATTR_ACCOUNTING:
            raise ValueError("accessed bytes come from smaps' Referenced: this table was read from maps")
        for r in self.rows:
            r["accessed_bytes"] = r.get("referenced_bytes", 0)
        self.filled_mask |= ATTR_ACCESS

    def encode(self, mask: int, prefix: bytes = b"") -> bytes:
        """``prefix``, then the wire bytes of ``repeated Vma vmas = 4`` for the
        groups in ``mask``."""
        self._check_paths()
        response = pb.GetVmaInfoResponse()
        add = response.vmas.add
        for values in self._values(mask):
            add(**values)
        return prefix + response.SerializeToString()

    def encode_chunks(self, mask: int, max_bytes: int) -> list[bytes]:
        """The wire bytes of ``vmas`` for the groups in ``mask``, cut at VMA
        boundaries into chunks of at most ``max_bytes``, each holding as many
        VMAs as fit: every VMA serialized on its own, then gathered."""
        self._check_paths()
        chunks: list[bytes] = []
        pending: list[bytes] = []
        pending_size = 0
        for values in self._values(mask):
            entry = pb.GetVmaInfoResponse(vmas=[pb.Vma(**values)]).SerializeToString()
            if len(entry) > max_bytes:
                raise ValueError(f"a VMA takes more than {max_bytes} bytes on the wire")
            if pending_size + len(entry) > max_bytes:
                chunks.append(b"".join(pending))
                pending, pending_size = [], 0
            pending.append(entry)
            pending_size += len(entry)
        if pending:
            chunks.append(b"".join(pending))
        return chunks

    def _values(self, mask: int) -> Iterator[dict[str, Any]]:
        """Each row's Vma fields for the groups in ``mask`` (and filled)."""
        fields = ["start", "end", "perms", "offset", "dev_major", "dev_minor", "inode", "path", "raw_path", "kind"]
        mask &= self.filled_mask
        if mask & ATTR_RESIDENCY:
            fields += RESIDENCY_FIELDS
        if mask & ATTR_ACCOUNTING:
            fields += ACCOUNTING_FIELDS
        if mask & ATTR_BUILD_ID:
            fields.append("build_id")
        if mask & ATTR_ACCESS:
            fields.append("accessed_bytes")
        for r in self.rows:
            yield {f: r[f] for f in fields if f in r}


def _queried_row(q: kernel.LayoutVma) -> dict[str, Any]:
    """A PROCMAP_QUERY answer as the row parse_header makes of its maps line:
    the name as seq_path prints it, a newline as \\012."""
    perms = "".join(
        (
            "r" if q.flags & PERM_READ else "-",
            "w" if q.flags & PERM_WRITE else "-",
            "x" if q.flags & PERM_EXEC else "-",
            "s" if q.flags & PERM_SHARED else "p",
        )
    )
    return parse_header(
        b"%x-%x %s %08x %02x:%02x %d %s"
        % (q.start, q.end, perms.encode(), q.offset, q.dev_major, q.dev_minor, q.inode, q.name.replace(b"\n", b"\\012"))
    )


def _attribute_runs(rows: list[dict[str, Any]], runs: list[tuple[int, int, int]]) -> None:
    """Add each (start, end, categories) page run to the VMAs it overlaps."""
    i = 0
    for run_start, run_end, categories in runs:
        while i < len(rows) and rows[i]["end"] <= run_start:
            i += 1
        j = i
        while j < len(rows) and rows[j]["start"] < run_end:
            overlap = min(run_end, rows[j]["end"]) - max(run_start, rows[j]["start"])
            if overlap > 0:
                field = "rss_bytes" if categories & kernel.PAGE_IS_PRESENT else "swap_bytes"
                rows[j][field] += overlap
            j += 1

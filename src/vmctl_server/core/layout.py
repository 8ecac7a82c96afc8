"""The layout of an address space as plain values.

A layout is the list of VMAs with what /proc/PID/maps says of each: range,
permissions, offset, device, inode, and the kind derived from them. Both table
implementations (native and pure Python) produce it as packed
:data:`LAYOUT_RECORD` structs, so the cookie digest and the range checks see
the same bytes whichever parser ran.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from dataclasses import dataclass

from vmctl_api.words import KIND_ANONYMOUS, KIND_FILE, KIND_SPECIAL

# start, end, offset, inode, dev_major, dev_minor, perm flags, kind
LAYOUT_RECORD = struct.Struct("<QQQQIIII")
_U64_PER_RECORD = LAYOUT_RECORD.size // 8
_U32_PER_RECORD = LAYOUT_RECORD.size // 4

PERM_READ = 1
PERM_WRITE = 2
PERM_EXEC = 4
PERM_SHARED = 8

# User addresses lie below this on every 64-bit layout; only [vsyscall] is above.
KERNEL_HALF = 1 << 63

# Bracketed names of mappings that are ordinary anonymous memory; any other
# bracketed name without a backing file is a kernel-provided special mapping.
ANONYMOUS_BRACKET_PREFIXES = (b"[heap]", b"[stack", b"[anon:")


def perm_flags(perms: bytes) -> int:
    flags = 0
    if perms[0:1] == b"r":
        flags |= PERM_READ
    if perms[1:2] == b"w":
        flags |= PERM_WRITE
    if perms[2:3] == b"x":
        flags |= PERM_EXEC
    if perms[3:4] == b"s":
        flags |= PERM_SHARED
    return flags


def vma_kind(dev_major: int, dev_minor: int, inode: int, path: bytes) -> int:
    if inode or dev_major or dev_minor:
        return KIND_FILE
    if path.startswith(b"[") and not path.startswith(ANONYMOUS_BRACKET_PREFIXES):
        return KIND_SPECIAL
    return KIND_ANONYMOUS


def layout_digest(records: bytes | memoryview) -> bytes:
    """SHA-256 of the packed layout: any mapped, unmapped, split, merged,
    moved or re-protected VMA changes it."""
    return hashlib.sha256(records).digest()


@dataclass(frozen=True)
class Layout:
    """Sorted VMA boundaries and kinds, for checking ranges against."""

    starts: list[int]
    ends: list[int]
    kinds: list[int]

    @classmethod
    def from_records(cls, records: bytes | memoryview) -> Layout:
        view = memoryview(records)
        if len(view) % LAYOUT_RECORD.size:
            raise ValueError("layout records are not a whole number of records")
        u64 = view.cast("B").cast("Q")
        u32 = view.cast("B").cast("I")
        return cls(
            starts=u64[0::_U64_PER_RECORD].tolist(),
            ends=u64[1::_U64_PER_RECORD].tolist(),
            kinds=u32[_U32_PER_RECORD - 1 :: _U32_PER_RECORD].tolist(),
        )

    def __len__(self) -> int:
        return len(self.starts)

    def first_at_or_after(self, address: int) -> int:
        """Index of the first VMA whose end is above ``address``."""
        return bisect.bisect_right(self.ends, address)

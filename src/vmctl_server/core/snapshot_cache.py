"""What recent snapshots saw, by cookie: the layouts SCOPE_RANGES checks ranges against.

A cookie names one layout of one process by a digest, which cannot say what
the snapshot saw at an address; AdviseRanges with SCOPE_RANGES needs exactly
that. So every snapshot a caller was allowed to read (GetVmaInfo and
StreamVmaInfo replies) leaves its packed layout records here, keyed by the
cookie's claims, and AdviseRanges looks them up by the cookie it was sent.

The key is every claim the cookie signs (boot id, pid, start time, exec id,
layout digest), never the pid alone: an entry answers only a cookie that
names the same process, the same image and the same layout, and a cookie
passes the agent's MAC check before it is looked up. Two snapshots of one
unchanged layout share an entry.

Cost: the entry holds the snapshot's own layout records (``LAYOUT_RECORD``,
48 bytes per VMA: start, end, offset, inode, device, permissions, kind)
without a copy, plus :data:`ENTRY_OVERHEAD` bytes for the key, the bytes
object and the LRU's bookkeeping. A 4,204-VMA process costs about 202 KB an
entry, a 65,490-VMA one about 3.1 MB; the default 64 MiB keeps some 330 of
the first or 20 of the second. The bound is in bytes, least recently used
first out; an entry larger than the whole bound is not kept. Thread safe: the
agent's workers share one cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from vmctl_server.core.cookie import CookieClaims
from vmctl_server.core.layout import LAYOUT_RECORD

DEFAULT_CACHE_BYTES = 64 << 20
BYTES_PER_VMA = LAYOUT_RECORD.size
# The key tuple and its five values, the bytes object's header, the OrderedDict's
# node and slot: measured with sys.getsizeof and rounded up.
ENTRY_OVERHEAD = 400

CacheKey = tuple[bytes, int, int, bytes, bytes]


def cache_key(claims: CookieClaims) -> CacheKey:
    return (claims.boot_id, claims.pid, claims.start_time, claims.exec_id, claims.layout_digest)


def entry_cost(records: bytes) -> int:
    """What one entry holding ``records`` counts against the bound."""
    return len(records) + ENTRY_OVERHEAD


@dataclass(frozen=True)
class CacheStats:
    entries: int
    bytes: int
    hits: int
    misses: int
    evictions: int


class SnapshotCache:
    """A least-recently-used map from a cookie's claims to the layout records
    of its snapshot, bounded in bytes (``max_bytes`` 0: keeps nothing)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError("a snapshot cache's size is 0 (off) or more bytes")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[CacheKey, bytes] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def put(self, claims: CookieClaims, records: bytes) -> None:
        """Keep what the snapshot the cookie of ``claims`` names saw; its
        records must be the ones whose digest the claims carry."""
        cost = entry_cost(records)
        if cost > self.max_bytes:
            return
        key = cache_key(claims)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= entry_cost(old)
            self._entries[key] = records
            self._bytes += cost
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= entry_cost(evicted)
                self._evictions += 1

    def get(self, claims: CookieClaims) -> bytes | None:
        """The layout records of the snapshot the cookie names, or None."""
        if not self.enabled:
            return None
        key = cache_key(claims)
        with self._lock:
            records = self._entries.get(key)
            if records is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return records

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._entries), self._bytes, self._hits, self._misses, self._evictions)

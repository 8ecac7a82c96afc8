"""Give back to the kernel what large calls freed (glibc's malloc).

A 65,490-VMA call needs about 20 MB while it runs (the /proc table, the
layout records, request and reply, gRPC's copies). glibc keeps what a thread
frees in that thread's arena (up to 8 arenas per core) and returns only the
top of an arena beyond a threshold that grows with the largest block freed.
Once 16 clients had spread calls over the agent's workers, every arena kept
the largest working set it had served: the bench's sequence (reads, 16
clients, pageouts on a 4,204- and a 65,490-VMA target) ended at 100-145 MB,
47 MB idle. malloc_trim alone is not enough: it frees the unused pages
inside every arena but trims the top of the main arena only (that sequence
still ended at 94 MB, and held 146 MB after the 65,490-VMA pageouts).

Hence one arena (:data:`ARENAS`) and a trim once the agent is idle
(:class:`HeapTrimmer`). Measured on that sequence: 50 MB at the end, 48-49 MB
a second after the 65,490-VMA pageouts (71 MB with one arena and no trim),
53 MB after the load, peak 73-75 MB during the 65,490-VMA pageouts (was
160-200). Without glibc (musl) both do nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # <malloc.h>
# One arena for the whole process. Its cost, measured beside 8 arenas per core
# (interleaved, medians): 4,204-VMA layout and accounting calls, a 2,074-range
# dry run and a 65,490-VMA layout within run-to-run noise (e.g. 6.1 vs 6.5 ms
# and 20.0 vs 20.4 ms), 16 clients 534 vs 543 calls/s (8 runs each, spread
# ±10%), health probes during a 65,490-VMA accounting call at most 15-18 ms
# (12-13): the agent's Python threads take turns on the GIL, so few allocate
# at once. Two arenas left 68 MB after the 65,490-VMA pageouts (malloc_trim
# cannot trim the second one's top); a fixed mmap threshold (256 KiB or
# 1 MiB) held as little as one arena but cost 1.5-2 ms per 4,204-VMA
# accounting call and 6% of the 16-client throughput.
ARENAS = 1


def _libc() -> ctypes.CDLL | None:
    libc = ctypes.CDLL(None)  # the process's own C library
    if not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


_LIBC = _libc()


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap malloc's arenas; call before any thread exists (threads already
    running keep the arena they have). False without glibc."""
    return _LIBC is not None and _LIBC.mallopt(M_ARENA_MAX, arenas) == 1


def rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class HeapTrimmer:
    """``malloc_trim(0)`` from a thread of its own once the agent is idle,
    if calls have left it more than ``slack_bytes`` above its RSS at start.

    Idle: no VmControl call running (:meth:`call_started`; :meth:`call_ended`
    once its reply is sent) and none ended for ``quiet`` seconds, so calls
    back to back (under load, in the bench's timed loops) never meet a trim.
    A trim takes 0.5-1.5 ms, mostly without the GIL, and gives back 20 MB
    after a 65,490-VMA call; the calls after it fault back in the pages they
    use (the first 4,204-VMA calls after one took 0-1.4 ms more across runs,
    within the noise in most). The 4,204-VMA calls alone, with or without 16
    clients, stay within the slack and never trim.
    """

    def __init__(self, slack_bytes: int = 16 << 20, quiet: float = 0.5) -> None:
        self.slack_bytes = slack_bytes
        self.quiet = quiet
        self.baseline = 0  # the RSS when started
        self.trims = 0
        self._lock = threading.Lock()
        self._running = 0
        self._last_end = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vmctl-heap-trim", daemon=True)

    @property
    def available(self) -> bool:
        return _LIBC is not None

    def start(self) -> HeapTrimmer:
        """Its baseline: the RSS now, idle, once what starting freed (imports,
        the kernel probe, parsing the flags and the policy) is given back."""
        if self.available:
            assert _LIBC is not None
            _LIBC.malloc_trim(0)
        self.baseline = rss_bytes()
        if self.available:
            self._thread.start()
        return self

    def call_started(self) -> None:
        with self._lock:
            self._running += 1

    def call_ended(self) -> None:
        with self._lock:
            self._running -= 1
            self._last_end = time.monotonic()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set() or not self._wait_until_idle():
                return
            before = rss_bytes()
            if before > self.baseline + self.slack_bytes:
                self.trim(before)

    def _wait_until_idle(self) -> bool:
        """True once idle; False if stopped first."""
        while True:
            with self._lock:
                wait = self.quiet if self._running else self._last_end + self.quiet - time.monotonic()
            if wait <= 0:
                return True
            if self._stop.wait(wait):
                return False

    def trim(self, before: int) -> None:
        assert _LIBC is not None
        _LIBC.malloc_trim(0)  # ctypes lets go of the GIL for the call
        self.trims += 1
        after = rss_bytes()
        log.debug(
            "returned %.1f MB to the kernel (RSS %.1f -> %.1f MB)",
            (before - after) / 2**20,
            before / 2**20,
            after / 2**20,
        )

"""The heap trimmer (vmctl_server.runtime.malloc_trim) on this process's own glibc heap.

Real allocations, real malloc_trim: 64 MiB of chunks below glibc's mmap
threshold, every other one freed, so 32 MiB of free pages sit between live
chunks where only malloc_trim can give them back.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator

import pytest
from support.waiting import wait_for

from vmctl_server.runtime import malloc_trim

pytestmark = pytest.mark.unprivileged

CHUNK = 64 << 10  # below glibc's mmap threshold (128 KiB at least): from the heap, not mmap
CHUNKS = 1024
MIB = 1 << 20

libc = ctypes.CDLL(None)
libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None
libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int


@pytest.fixture
def trimmer() -> Iterator[malloc_trim.HeapTrimmer]:
    made = malloc_trim.HeapTrimmer(slack_bytes=8 * MIB, quiet=0.05)
    if not made.available:
        pytest.skip("no glibc malloc_trim in this process")
    # Free pages earlier tests left in this process's heap would take the test's
    # chunks without the RSS growing: give them back before the baseline is read.
    libc.malloc_trim(0)
    made.start()
    try:
        yield made
    finally:
        made.stop()


@pytest.fixture
def freed_holes() -> Iterator[None]:
    """32 MiB freed between live chunks, every page touched first."""
    chunks = [libc.malloc(CHUNK) for _ in range(CHUNKS)]
    try:
        assert all(chunks)
        for chunk in chunks:
            ctypes.memset(chunk, 0x5A, CHUNK)
        for i in range(0, CHUNKS, 2):
            libc.free(chunks[i])
            chunks[i] = None
        yield
    finally:
        for chunk in chunks:
            if chunk:
                libc.free(chunk)


# Two sleeps stay: that no trim happens can only be seen by letting time pass. 0.3 s is six of the
# trimmer's quiet periods, each of which ends with it checking again.
NOTHING_HAPPENS = 0.3


def test_trims_once_idle_and_returns_the_freed_pages(trimmer: malloc_trim.HeapTrimmer, freed_holes: None) -> None:
    held = malloc_trim.rss_bytes()
    assert held > trimmer.baseline + trimmer.slack_bytes
    trimmer.call_started()
    trimmer.call_started()
    trimmer.call_ended()  # wakes the trimmer while the other call still runs
    time.sleep(NOTHING_HAPPENS)
    assert trimmer.trims == 0  # a call is running: not idle, whatever the RSS
    trimmer.call_ended()  # idle now (each end wakes the trimmer: above the slack, it may trim twice)
    wait_for(lambda: trimmer.trims, "a trim once idle")
    # The 32 MiB of holes went back, less the chunk headers' pages; what the
    # process allocates meanwhile is far below the margin.
    assert malloc_trim.rss_bytes() < held - 16 * MIB


def test_no_trim_within_the_slack(trimmer: malloc_trim.HeapTrimmer) -> None:
    trimmer.slack_bytes = 1 << 40
    trimmer.call_started()
    trimmer.call_ended()  # wakes the trimmer: idle, but within the slack
    time.sleep(NOTHING_HAPPENS)
    assert trimmer.trims == 0

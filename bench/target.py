"""A benchmark target: a process shaped like Android's system_server.

It grows to an exact number of VMAs with a fixed, repeating mix, so that a
4,204-VMA and a 65,530-VMA target have the same composition and their
per-VMA costs can be compared:

- libraries: a file mapped privately in four segments (``r--p``, ``r-xp``,
  ``r--p``, ``rw-p``), like a shared object; the read-only parts are read
  (page cache), the ``rw-p`` part is written (copy-on-write anonymous pages);
- heap regions: 8 private anonymous pages each, named ``[anon:...]`` where
  the kernel allows (like ART's ``[anon:dalvik-...]``), written with
  compressible but not same-filled data (so zram really compresses them),
  each followed by an inaccessible guard page (like a thread stack's).

Protocol: one JSON object per line on stdin, one JSON reply per line on stdout.

    {"op": "build", "vmas": N, "files": DIR}  -> {"vmas": count, "heap_regions": n, "heap_bytes": b}
    {"op": "retouch", "generation": G}         -> rewrite every heap page (fault it back in, dirty it)
    {"op": "exit"}
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_char_p]

PROT_NONE, PROT_READ, PROT_WRITE, PROT_EXEC = 0, 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = 0x01, 0x02, 0x20
MAP_FAILED = ctypes.c_void_p(-1).value
PR_SET_VMA, PR_SET_VMA_ANON_NAME = 0x53564D41, 0
PAGE = os.sysconf("SC_PAGE_SIZE")

LIBRARY_PAGES = 16  # segments of 2, 8, 2 and 4 pages
LIBRARY_SEGMENTS = (
    (0, 2, PROT_READ),
    (2, 10, PROT_READ | PROT_EXEC),
    (10, 12, PROT_READ),
    (12, 16, PROT_READ | PROT_WRITE),
)
LIBRARY_FILES = 64
HEAP_PAGES = 8
HEAP_NAMES = (b"dalvik-alloc space", b"dalvik-LinearAlloc", b"libc_malloc", b"dalvik-jit-code-cache")

heap_regions: list[int] = []
# Made once: a retouch allocates nothing, so the layout stays as it was.
heap_generations: list[bytes] = []


def mmap(size: int, prot: int, flags: int, fd: int = -1) -> int:
    address = libc.mmap(None, size, prot, flags, fd, 0)
    if address in (None, MAP_FAILED):
        raise OSError(ctypes.get_errno(), "mmap failed")
    return address


def mprotect(address: int, size: int, prot: int) -> None:
    if libc.mprotect(address, size, prot) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")


def heap_data(generation: int) -> bytes:
    """HEAP_PAGES pages: per page 1 KiB that does not compress, 3 KiB that does."""
    rng = random.Random(generation)
    filler = (b"generation %d " % generation) * (PAGE // 8)
    return b"".join(rng.randbytes(1024) + filler[: PAGE - 1024] for _ in range(HEAP_PAGES))


def library_files(directory: str) -> list[str]:
    """Files named like system_server's mappings, each LIBRARY_PAGES long."""
    names = []
    for i in range(LIBRARY_FILES):
        sub = os.path.join(directory, "system", "framework" if i % 2 else "lib64")
        os.makedirs(sub, exist_ok=True)
        name = os.path.join(sub, f"boot-framework-{i:02d}.oat" if i % 2 else f"libandroid_servers_{i:02d}.so")
        if not os.path.exists(name):
            with open(name, "wb") as f:
                f.write(random.Random(i).randbytes(LIBRARY_PAGES * PAGE))
        names.append(name)
    return names


def map_library(path: str) -> int:
    """Four VMAs."""
    fd = os.open(path, os.O_RDONLY)
    try:
        address = mmap(LIBRARY_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd)
    finally:
        os.close(fd)
    for first, stop, prot in LIBRARY_SEGMENTS:
        if prot & PROT_WRITE:
            ctypes.memset(address + first * PAGE, 1, (stop - first) * PAGE)
        else:
            ctypes.string_at(address + first * PAGE, (stop - first) * PAGE)
        mprotect(address + first * PAGE, (stop - first) * PAGE, prot)
    return address


def map_heap(data: bytes, name: bytes) -> int:
    """Two VMAs: the heap region and the guard page above it."""
    size = HEAP_PAGES * PAGE
    address = mmap(size + PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    mprotect(address + size, PAGE, PROT_NONE)
    libc.prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, address, size, b"%s-%d" % (name, len(heap_regions) % 8))
    ctypes.memmove(address, data, size)
    heap_regions.append(address)
    return address


def vma_count() -> int:
    with open("/proc/self/maps", "rb") as f:
        # [vsyscall] is listed but is no VMA: it does not count to vm.max_map_count.
        return sum(1 for line in f.read().splitlines() if not line.endswith(b"[vsyscall]"))


def build(vmas: int, directory: str) -> dict:
    files = library_files(directory)
    heap_generations[:] = [heap_data(0), heap_data(1)]
    data = heap_generations[0]
    count = vma_count()
    # One cycle adds 8 VMAs: a library and two heap regions with their guards.
    cycle = 0
    while count + 8 <= vmas:
        map_library(files[cycle % len(files)])
        map_heap(data, HEAP_NAMES[cycle % len(HEAP_NAMES)])
        map_heap(data, HEAP_NAMES[(cycle + 1) % len(HEAP_NAMES)])
        cycle += 1
        if cycle % 256 == 0:  # the interpreter maps memory of its own now and then
            count = vma_count()
        else:
            count += 8
    count = vma_count()
    while count < vmas:
        # The last few: inaccessible single pages (each its own VMA: the
        # kernel places them next to a heap region's guard, so alternate
        # protections keep them apart).
        mmap(PAGE, PROT_READ if count % 2 else PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS)
        count = vma_count()
    return {"vmas": count, "heap_regions": len(heap_regions), "heap_bytes": len(heap_regions) * HEAP_PAGES * PAGE}


def retouch(generation: int) -> dict:
    data = heap_generations[generation % 2]
    size = len(data)
    for address in heap_regions:
        ctypes.memmove(address, data, size)
    return {"heap_bytes": len(heap_regions) * size}


def handle(request: dict) -> dict:
    op = request["op"]
    if op == "build":
        return build(request["vmas"], request["files"])
    if op == "retouch":
        return retouch(request["generation"])
    if op == "exit":
        reply({"ok": True})
        os._exit(0)
    raise ValueError(f"unknown op {op!r}")


def reply(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def main() -> None:
    reply({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        try:
            reply(handle(json.loads(line)))
        except Exception as exc:  # report to the bench instead of dying
            reply({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()

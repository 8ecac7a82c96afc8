"""A target for SCOPE_RANGES: it maps regions, churns its layout elsewhere,
grows a region in place, and maps files over its regions on command.

Protocol: JSON lines, as support/target.py (LineProcess drives it).

    {"op": "map_anon", "pages": N, "seed": S, "spare": K} -> {"start", "end"}: a VMA of its own, with K
                                                               inaccessible pages after it to grow into
    {"op": "grow", "start": A, "pages": N}                 -> the region's VMA grows by N pages (merged)
    {"op": "map_file", "start": A, "path": P, "offset": O} -> the file, from O, mapped over the region (MAP_FIXED)
    {"op": "unmap", "start": A}                            -> the region unmapped
    {"op": "churn"} / {"op": "calm"}                       -> a thread maps and unmaps pages elsewhere / stops;
                                                               {"cycles": N} it made
    {"op": "verify"}                                       -> {"ok", "bad"}: every region holds its bytes
    {"op": "exec"}                                         -> a new image of this script
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import sys
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x02, 0x10, 0x20
MAP_FAILED = ctypes.c_void_p(-1).value
PAGE = os.sysconf("SC_PAGE_SIZE")

regions: dict[int, bytes] = {}  # start -> the bytes it must hold
churner: dict[str, object] = {}


def mmap(address: int | None, size: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    got = libc.mmap(address, size, prot, flags, fd, offset)
    if got in (None, MAP_FAILED) or (address is not None and got != address):
        raise OSError(ctypes.get_errno(), "mmap failed")
    return got


def map_anon(pages: int, seed: int, spare: int) -> dict:
    size = pages * PAGE
    # A guard page before, the region, spare pages after it to grow into, a guard page: all one
    # PROT_NONE reservation whose middle is made accessible, so the region is a VMA of its own.
    reserve = mmap(None, size + (spare + 2) * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS)
    start = reserve + PAGE
    if libc.mprotect(start, size, PROT_READ | PROT_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")
    data = random.Random(seed).randbytes(size)
    ctypes.memmove(start, data, size)
    regions[start] = data
    return {"start": start, "end": start + size}


def grow(start: int, pages: int) -> dict:
    end = start + len(regions[start])
    if libc.mprotect(end, pages * PAGE, PROT_READ | PROT_WRITE) != 0:  # the same flags: the VMAs merge
        raise OSError(ctypes.get_errno(), "mprotect failed")
    ctypes.memset(end, 7, pages * PAGE)
    return {"end": end + pages * PAGE}


def map_file(start: int, path: str, offset: int) -> dict:
    size = len(regions[start])
    fd = os.open(path, os.O_RDONLY)
    try:
        mmap(start, size, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, offset)
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        f.seek(offset)
        regions[start] = f.read(size)
    ctypes.string_at(start, size)  # resident
    return {}


def churn() -> dict:
    """Map a region of a random size and unmap a random older one, over and over (a pool of 32):
    the layout never holds still and seldom comes back to one it had."""
    stop = threading.Event()
    counts = {"cycles": 0}

    def loop() -> None:
        rng = random.Random(os.getpid())
        pool: list[tuple[int, int]] = []
        while not stop.is_set():
            size = rng.randint(1, 16) * PAGE
            address = mmap(None, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
            ctypes.memset(address, 1, PAGE)
            pool.append((address, size))
            if len(pool) > 32:
                libc.munmap(*pool.pop(rng.randrange(len(pool))))
            counts["cycles"] += 1
            time.sleep(0.0002)
        for address, size in pool:
            libc.munmap(address, size)

    thread = threading.Thread(target=loop, daemon=True)
    churner.update(stop=stop, thread=thread, counts=counts)
    thread.start()
    return {}


def calm() -> dict:
    churner["stop"].set()  # type: ignore[attr-defined]
    churner["thread"].join()  # type: ignore[attr-defined]
    return dict(churner["counts"])  # type: ignore[call-overload]


def verify() -> dict:
    bad = [start for start, data in regions.items() if ctypes.string_at(start, len(data)) != data]
    return {"ok": not bad, "bad": bad}


def handle(request: dict) -> dict:
    op = request["op"]
    if op == "map_anon":
        return map_anon(request["pages"], request.get("seed", 1), request.get("spare", 0))
    if op == "grow":
        return grow(request["start"], request["pages"])
    if op == "map_file":
        return map_file(request["start"], request["path"], request.get("offset", 0))
    if op == "unmap":
        libc.munmap(request["start"], len(regions.pop(request["start"])))
        return {}
    if op == "churn":
        return churn()
    if op == "calm":
        return calm()
    if op == "verify":
        return verify()
    if op == "exec":
        reply({"ok": True})
        os.execv(sys.executable, [sys.executable, __file__])
    raise ValueError(f"unknown op {op!r}")


def reply(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def main() -> None:
    reply({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        try:
            reply(handle(json.loads(line)))
        except Exception as exc:
            reply({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()

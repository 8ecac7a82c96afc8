"""A target process for the tests: it maps memory on command and checks it.

Protocol: one JSON object per line on stdin, one JSON reply per line on
stdout. Every region it maps is filled with bytes derived from a seed, so
``verify`` can tell, byte for byte, whether the memory survived advice.

    {"op": "map_anon", "size": N, "seed": S}          -> {"start": A, "end": B}
    {"op": "map_file", "path": P, "size": N, "shared": bool, "touch": bool}
    {"op": "map_file_then_anon", "path": P, "size": N, "seed": S}
    {"op": "unmap", "start": A}
    {"op": "verify"}                                   -> {"ok": bool, "bad": [...]}
    {"op": "touch", "start": A}                        -> read every page back in
    {"op": "heat", "start": A}                         -> a thread reads the region over and over, until cooled
    {"op": "cool", "start": A}                         -> that thread stops; {"passes": N} it made
    {"op": "spin"} / {"op": "rest"}                    -> a thread burns CPU / stops; {"spins": N} it made
    {"op": "mlock", "start": A}
    {"op": "many_vmas", "limit": L}                    -> {"vmas": count, "start", "end"}
    {"op": "exec"}                                     -> re-exec this script (a new image)
    {"op": "exit", "code": C}
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import sys
import threading

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_FAILED = ctypes.c_void_p(-1).value
PAGE = os.sysconf("SC_PAGE_SIZE")

# start -> (size, expected bytes or None for file mappings we only read)
regions: dict[int, tuple[int, bytes | None]] = {}
HEAT_PAUSE = 0.01  # seconds between a heated region's passes: every page touched many times a second


class Loop(threading.Thread):
    """Runs ``step`` over and over until stopped; counts the passes."""

    def __init__(self, step, pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.step, self.pause = step, pause
        self.passes = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.step()
            self.passes += 1
            if self.pause:
                self.halt.wait(self.pause)

    def stop(self) -> int:
        self.halt.set()
        self.join()
        return self.passes


loops: dict[object, Loop] = {}  # a region's start, or "spin"


def start_loop(key: object, step, pause: float = 0.0) -> dict:
    if key in loops:
        raise ValueError(f"{key!r} is already looping")
    loops[key] = Loop(step, pause)
    loops[key].start()
    return {}


def heat(start: int) -> dict:
    size, _ = regions[start]
    return start_loop(start, lambda: ctypes.string_at(start, size), HEAT_PAUSE)


def spin_once() -> None:
    sum(range(10_000))


def pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def mmap(size: int, prot: int, flags: int, fd: int = -1) -> int:
    address = libc.mmap(None, size, prot, flags, fd, 0)
    if address in (None, MAP_FAILED):
        raise OSError(ctypes.get_errno(), "mmap failed")
    return address


def map_anon(size: int, seed: int) -> dict:
    # Inaccessible guard pages on both sides keep the region its own VMA: it
    # cannot merge with a neighbour, so tests can find it in smaps by start.
    reserve = mmap(size + 2 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS)
    address = reserve + PAGE
    if libc.mprotect(address, size, PROT_READ | PROT_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")
    data = pattern(size, seed) if seed >= 0 else None
    if data is not None:
        ctypes.memmove(address, data, size)
    regions[address] = (size, data)
    return {"start": address, "end": address + size}


def map_file(path: str, size: int, shared: bool, touch: bool) -> dict:
    fd = os.open(path, os.O_RDONLY)
    try:
        address = mmap(size, PROT_READ, MAP_SHARED if shared else MAP_PRIVATE, fd)
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        expected = f.read(size)
    regions[address] = (size, expected)
    if touch:
        ctypes.string_at(address, size)
    return {"start": address, "end": address + size}


def map_file_then_anon(path: str, size: int, seed: int) -> dict:
    """A file mapping with an anonymous one right after it: two VMAs of
    different kinds that one address range can cover."""
    reserve = mmap(2 * size + 2 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS)
    file_start = reserve + PAGE
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.mmap(file_start, size, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0) != file_start:
            raise OSError(ctypes.get_errno(), "mmap of the file failed")
    finally:
        os.close(fd)
    anon_start = file_start + size
    if (
        libc.mmap(anon_start, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
        != anon_start
    ):
        raise OSError(ctypes.get_errno(), "mmap of the anonymous part failed")
    data = pattern(size, seed)
    ctypes.memmove(anon_start, data, size)
    regions[anon_start] = (size, data)
    return {"file_start": file_start, "anon_start": anon_start, "end": anon_start + size}


def verify() -> dict:
    bad = [
        start
        for start, (size, expected) in regions.items()
        if expected is not None and ctypes.string_at(start, len(expected)) != expected
    ]
    return {"ok": not bad, "bad": bad, "checked": len(regions)}


def many_vmas(limit: int) -> dict:
    """Split one mapping page by page until the process has ``limit`` VMAs."""
    pages = limit + 16
    address = mmap(pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    # Protecting every other page adds two VMAs per call, until the kernel
    # refuses at vm.max_map_count.
    for index in range(1, pages - 1, 2):
        if libc.mprotect(address + index * PAGE, PAGE, PROT_READ) != 0:
            break
    # One short of the limit: protecting the final page adds exactly one.
    libc.mprotect(address + (pages - 1) * PAGE, PAGE, PROT_READ)
    with open("/proc/self/maps", "rb") as f:
        # [vsyscall] is listed but is no VMA: it does not count to the limit.
        count = sum(1 for line in f.read().splitlines() if not line.endswith(b"[vsyscall]"))
    return {"vmas": count, "start": address, "end": address + pages * PAGE}


def handle(request: dict) -> dict:
    op = request["op"]
    if op == "map_anon":
        return map_anon(request["size"], request.get("seed", 1))
    if op == "map_file":
        return map_file(request["path"], request["size"], request.get("shared", False), request.get("touch", True))
    if op == "map_file_then_anon":
        return map_file_then_anon(request["path"], request["size"], request.get("seed", 1))
    if op == "unmap":
        size, _ = regions.pop(request["start"])
        libc.munmap(request["start"], size)
        return {}
    if op == "verify":
        return verify()
    if op == "touch":
        size, _ = regions[request["start"]]
        ctypes.string_at(request["start"], size)
        return {}
    if op == "heat":
        return heat(request["start"])
    if op == "cool":
        return {"passes": loops.pop(request["start"]).stop()}
    if op == "spin":
        return start_loop("spin", spin_once)
    if op == "rest":
        return {"spins": loops.pop("spin").stop()}
    if op == "mlock":
        size, _ = regions[request["start"]]
        if libc.mlock(request["start"], size) != 0:
            raise OSError(ctypes.get_errno(), "mlock failed")
        return {}
    if op == "many_vmas":
        return many_vmas(request["limit"])
    if op == "exec":
        reply({"ok": True})
        os.execv(sys.executable, [sys.executable, __file__])
    if op == "exit":
        reply({"ok": True})
        os._exit(request.get("code", 0))
    raise ValueError(f"unknown op {op!r}")


def reply(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def main() -> None:
    reply({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        try:
            reply(handle(json.loads(line)))
        except Exception as exc:  # report to the test instead of dying
            reply({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()

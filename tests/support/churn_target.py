"""A target that keeps changing its layout and checking its own memory.

Until its standard input closes it loops: map a region and fill it with
bytes from a seed, unmap one, or read every region back and compare it with
its seed's bytes (pages the agent paged out come back from swap). Then it
prints one JSON line: {"pid", "maps", "unmaps", "checks", "failures"}.
It prints {"ready": true, "pid": P} first.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import sys
import threading

PAGE = mmap.PAGESIZE
MAX_BYTES = 48 << 20


def content(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def main() -> None:
    rng = random.Random(os.getpid())
    regions: dict[int, tuple[mmap.mmap, int]] = {}  # seed -> (mapping, size)
    counts = {"pid": os.getpid(), "maps": 0, "unmaps": 0, "checks": 0, "failures": 0}
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    mapped = 0
    while not done.is_set():
        action = rng.random()
        if action < 0.35 and mapped < MAX_BYTES:
            size = rng.randint(16, 1024) * PAGE
            seed = rng.getrandbits(48)
            region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            region[:] = content(seed, size)
            regions[seed] = (region, size)
            mapped += size
            counts["maps"] += 1
            done.wait(rng.uniform(0.1, 0.5))  # a layout lives long enough to be advised, sometimes
        elif action < 0.55 and regions:
            seed = rng.choice(list(regions))
            region, size = regions.pop(seed)
            region.close()
            mapped -= size
            counts["unmaps"] += 1
            done.wait(rng.uniform(0.1, 0.5))
        else:
            for seed, (region, size) in regions.items():
                counts["checks"] += 1
                if region[:] != content(seed, size):
                    counts["failures"] += 1
            done.wait(0.01)
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()

"""An idle Python heap for bench/reclaim.py: MiB of seeded random bytes, then sleep.

    python3 idle_heap.py MIB SEED

Prints ``ready SHA256`` once the heap is written, then answers each ``sum``
line on standard input with ``sum SHA256`` of the heap as it is now (reading
it faults every paged-out page back in), and exits at end of input. The bytes
are random, so zram cannot compress them away: paging them out costs what
real data costs.
"""

from __future__ import annotations

import hashlib
import random
import sys


def main() -> None:
    mib, seed = int(sys.argv[1]), int(sys.argv[2])
    heap = bytearray(random.Random(seed).randbytes(mib << 20))  # private anonymous memory, written
    print("ready", hashlib.sha256(heap).hexdigest(), flush=True)
    for line in sys.stdin:
        if line.strip() == "sum":
            print("sum", hashlib.sha256(heap).hexdigest(), flush=True)


if __name__ == "__main__":
    main()

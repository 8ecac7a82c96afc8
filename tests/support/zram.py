"""zram swap for the tests and the benchmark: a fresh device, always removed.

These machines have no swap by default, and MADV_PAGEOUT of anonymous memory
does nothing without it. Plain (no pytest) so bench/ can use it too.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
from collections.abc import Iterator

from .waiting import wait_for

ZRAM_CONTROL = pathlib.Path("/sys/class/zram-control")


@contextlib.contextmanager
def zram_swap_device(size: str) -> Iterator[str | None]:
    """A fresh zram device as swap (highest priority), removed afterwards
    whatever happens; None when the kernel has no zram-control (CONFIG_ZRAM)."""
    if not ZRAM_CONTROL.exists():
        yield None
        return
    index = int((ZRAM_CONTROL / "hot_add").read_text())
    device = f"/dev/zram{index}"
    block = pathlib.Path(f"/sys/block/zram{index}")
    swapped_on = False
    try:
        (block / "disksize").write_text(size)
        wait_for(lambda: os.path.exists(device), f"{device} to appear (devtmpfs, udev)")
        subprocess.run(["mkswap", device], check=True, capture_output=True)
        subprocess.run(["swapon", "-p", "32000", device], check=True, capture_output=True)
        swapped_on = True
        yield device
    finally:
        if swapped_on:
            subprocess.run(["swapoff", device], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            (block / "reset").write_text("1")
        with contextlib.suppress(OSError):
            (ZRAM_CONTROL / "hot_remove").write_text(str(index))

"""Small file systems a test fills up: what the agent does when its disk is full."""

from __future__ import annotations

import contextlib
import errno
import pathlib
import subprocess
from collections.abc import Iterator


@contextlib.contextmanager
def tmpfs(mount_point: pathlib.Path, size: str) -> Iterator[pathlib.Path]:
    """A tmpfs of ``size`` (mode 0700) on ``mount_point``, unmounted whatever happens: lazily when a
    file is still open on it (an agent that holds its audit log there and has not stopped yet)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "vmctl-test", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def fill(directory: pathlib.Path) -> pathlib.Path:
    """Take every free byte of ``directory``'s file system, with the file ``filler`` there."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        for chunk in (b"\0" * 4096, b"\0"):  # whole pages, then the last bytes one by one
            try:
                while f.write(chunk):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler

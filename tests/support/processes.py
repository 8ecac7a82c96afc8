"""Child processes driven by JSON lines (the tests' target.py, the bench's), and what /proc says of a process.

A driven process prints ``{"ready": true, "pid": P}`` first, then answers
each request line (``{"op": ..., ...}``) with one reply line; a reply with
``"error"`` is the op failing, which :meth:`LineProcess.call` raises.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TypeVar

from .waiting import wait_for

SUPPORT = pathlib.Path(__file__).resolve().parent
TARGET_SCRIPT = SUPPORT / "target.py"
CHURN_SCRIPT = SUPPORT / "churn_target.py"  # changes its layout until its stdin closes (the soak test)
PAGE = os.sysconf("SC_PAGE_SIZE")
Driven = TypeVar("Driven", bound="LineProcess")


def status_field(pid: int, name: str) -> str:
    """One field of /proc/PID/status, as the kernel wrote it after the colon."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    raise KeyError(name)


def status_kb(pid: int, name: str) -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM, VmSwap...)."""
    return int(status_field(pid, name).split()[0])


def threads(pid: int) -> int:
    return int(status_field(pid, "Threads"))


def _stat_from_state(pid: int) -> list[bytes]:
    """/proc/PID/stat's fields from the 3rd (the state) on: after the command name, which may hold any byte."""
    return pathlib.Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()


def process_state(pid: int) -> str:
    """R, S, D, Z (a zombie)..."""
    return _stat_from_state(pid)[0].decode()


def start_ticks(pid: int) -> int:
    """When the process started, in clock ticks since boot (starttime, the 22nd field)."""
    return int(_stat_from_state(pid)[22 - 3])


def ticks_since_boot() -> int:
    """Now, on the clock ``start_ticks`` counts (CLOCK_BOOTTIME in USER_HZ ticks)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def children_of(pid: int) -> list[int]:
    """The children of ``pid``'s main thread (none once it has exited)."""
    try:
        return [int(child) for child in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def child_of(pid: int, timeout: float = 10.0) -> int:
    """The first child of ``pid`` (the process a wrapper such as unshare, nsenter or strace forked)."""
    return wait_for(lambda: children_of(pid), f"process {pid} to start a child", timeout)[0]  # type: ignore[index]


class LineProcess:
    """A child that speaks JSON lines on its standard input and output."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        try:
            hello = self._read()
        except BaseException:
            self.kill()
            raise
        self.pid: int = hello["pid"]

    @classmethod
    def spawn(
        cls: type[Driven], script: str | os.PathLike, prefix: Sequence[str] = (), python: str = sys.executable
    ) -> Driven:
        """``script`` run by ``python`` (this interpreter), behind ``prefix`` (setpriv...) if given."""
        return cls(
            subprocess.Popen([*prefix, python, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        )

    def _read(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"process {self.proc.pid} died (exit {self.proc.poll()})")
        return json.loads(line)

    def call(self, op: str, **args: object) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"{op} failed: {reply['error']}")
        return reply

    def status_kb(self, key: str) -> int:
        return status_kb(self.pid, key)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()


class Target(LineProcess):
    """A support/target.py process: it maps memory on command and checks it byte for byte."""

    @classmethod
    def start(cls) -> Target:
        return cls.spawn(TARGET_SCRIPT)

    def map_anon(self, size: int, seed: int = 1) -> tuple[int, int]:
        reply = self.call("map_anon", size=size, seed=seed)
        return reply["start"], reply["end"]

    def map_file(self, path: str, size: int, shared: bool = False) -> tuple[int, int]:
        reply = self.call("map_file", path=str(path), size=size, shared=shared)
        return reply["start"], reply["end"]

    def verify(self) -> None:
        reply = self.call("verify")
        assert reply["ok"], f"target memory corrupted in regions {reply['bad']}"

    def smaps_region(self, start: int) -> dict[str, int]:
        """The smaps counters (kB) of the VMA starting at ``start``."""
        return smaps_region(self.pid, start)

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """Hold the target still (SIGSTOP) so its memory cannot change."""
        os.kill(self.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.pid, signal.SIGCONT)


def smaps_region(pid: int, start: int) -> dict[str, int]:
    """The smaps counters (kB) of process ``pid``'s VMA starting at ``start``."""
    found: dict[str, int] | None = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                if found is not None:
                    break
                if int(head.split("-")[0], 16) == start:
                    found = {}
            elif found is not None and line.split()[-1:] == ["kB"]:
                key, value = line.split(":")
                found[key] = int(value.split()[0])
    if found is None:
        raise KeyError(f"no VMA at 0x{start:x}")
    return found

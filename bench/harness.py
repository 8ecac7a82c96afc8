"""What the benchmark sets up and always takes down: its own agent on a
private unix socket, target processes, and a zram swap device.

Each piece is a context manager; ``bench/run.py`` enters them on one
ExitStack, so Ctrl-C (or SIGTERM, which run.py turns into KeyboardInterrupt)
still stops the agent, kills the targets and removes the swap device.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pathlib
import platform
import sys
from collections.abc import Iterator
from importlib import metadata

BENCH = pathlib.Path(__file__).resolve().parent
# Agents, driven processes, zram swap and waits are the tests' own (tests/support), imported as ``support``
# the way the tests import it: with tests/ on the path, so there is one copy and one module name.
sys.path.insert(0, str(BENCH.parent / "tests"))
from support.agents import Agent  # noqa: E402
from support.processes import LineProcess  # noqa: E402

TARGET_SCRIPT = BENCH / "target.py"


class Target(LineProcess):
    """A bench/target.py process grown to a given number of VMAs."""

    vmas: int
    heap_regions: int
    generation = 0

    def build(self, vmas: int, files: pathlib.Path) -> None:
        built = self.call("build", vmas=vmas, files=str(files))
        self.vmas, self.heap_regions = built["vmas"], built["heap_regions"]

    def retouch(self) -> None:
        """Fault every heap page back in and dirty it with new data, so the
        next pageout has real work: compress and write every page again."""
        self.generation += 1
        self.call("retouch", generation=self.generation)


@contextlib.contextmanager
def target(vmas: int, files: pathlib.Path) -> Iterator[Target]:
    built = Target.spawn(TARGET_SCRIPT)
    try:
        built.build(vmas, files)
        yield built
    finally:
        built.kill()


def reset_peak_rss(pid: int) -> None:
    """Start VmHWM afresh (proc(5): writing 5 to clear_refs resets the peak RSS)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


@contextlib.contextmanager
def agent(directory: pathlib.Path, extra_args: list[str]) -> Iterator[Agent]:
    """vmctl-agent on a unix socket in ``directory``, serving; stopped (and its log removed) at exit."""
    running = Agent(extra_args, directory)
    try:
        yield running.start()
    finally:
        running.stop()
        running.discard_log()


def machine_info() -> dict:
    """What the numbers were measured on."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    uname = platform.uname()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kernel": uname.release,
        "machine": uname.machine,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "psutil": version("psutil"),
        "cffi": version("cffi"),
        "max_map_count": int(pathlib.Path("/proc/sys/vm/max_map_count").read_text()),
        "load_average": os.getloadavg(),
    }

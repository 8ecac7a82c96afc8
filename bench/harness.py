"""What the benchmark sets up and always takes down: its own agent on a
private unix socket, target processes, and a zram swap device.

Each piece is a context manager; ``bench/run.py`` enters them on one
ExitStack, so Ctrl-C (or SIGTERM, which run.py turns into KeyboardInterrupt)
still stops the agent, kills the targets and removes the swap device.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

BENCH = pathlib.Path(__file__).resolve().parent
# The zram swap set-up is the tests' own (tests/zram.py): run.py imports it from there.
sys.path.append(str(BENCH.parent / "tests"))
TARGET_SCRIPT = BENCH / "target.py"


class Target:
    """A bench/target.py process grown to a given number of VMAs."""

    def __init__(self, vmas: int, files: pathlib.Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(TARGET_SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            self.pid: int = self._read()["pid"]
            built = self.call("build", vmas=vmas, files=str(files))
        except BaseException:
            self.kill()
            raise
        self.vmas: int = built["vmas"]
        self.heap_regions: int = built["heap_regions"]
        self.generation = 0

    def _read(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"target {self.proc.pid} died (exit {self.proc.poll()})")
        return json.loads(line)

    def call(self, op: str, **args: object) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"target {op} failed: {reply['error']}")
        return reply

    def retouch(self) -> None:
        """Fault every heap page back in and dirty it with new data, so the
        next pageout has real work: compress and write every page again."""
        self.generation += 1
        self.call("retouch", generation=self.generation)

    def status_kb(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()


@contextlib.contextmanager
def target(vmas: int, files: pathlib.Path) -> Iterator[Target]:
    built = Target(vmas, files)
    try:
        yield built
    finally:
        built.kill()


class Agent:
    """vmctl-agent on a unix socket in ``directory``, logging to a file there."""

    def __init__(self, directory: pathlib.Path, extra_args: list[str]) -> None:
        self.socket_path = directory / "agent.sock"
        self.address = f"unix://{self.socket_path}"
        self.log_path = directory / "agent.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmctl_server.agent", "--listen", self.address, *extra_args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.pid = self.proc.pid

    def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited with {self.proc.returncode}:\n{self.log()}")
            if self.socket_path.exists():
                with grpc.insecure_channel(self.address) as channel:
                    try:
                        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    except grpc.RpcError:
                        pass
            time.sleep(0.05)
        raise RuntimeError(f"the agent did not serve within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status_kb(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def reset_peak_rss(self) -> None:
        """Start VmHWM afresh (proc(5): writing 5 to clear_refs resets the peak RSS)."""
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def agent(directory: pathlib.Path, extra_args: list[str]) -> Iterator[Agent]:
    running = Agent(directory, extra_args)
    try:
        running.wait_serving()
        yield running
    finally:
        running.stop()


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

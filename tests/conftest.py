"""Fixtures: real agents, real target processes, real zram swap.

Everything a test creates is torn down in ``finally`` blocks or fixture
finalizers, so a failing test leaves no process, socket or swap behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from waiting import wait_for  # noqa: F401  (the tests' one way to wait, re-exported)
from zram import zram_swap_device

from vmctl_client import Client, VmctlError

TESTS = pathlib.Path(__file__).resolve().parent
TARGET_SCRIPT = TESTS / "target.py"
PAGE = os.sysconf("SC_PAGE_SIZE")


def pytest_collection_finish(session: pytest.Session) -> None:
    if not session.items and not session.config.option.collectonly:
        raise pytest.UsageError("no tests collected: refusing to report success")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without root only the tests marked ``unprivileged`` run (parsers, policy,
    cookie, limits, views, the layers): the rest read other processes' memory
    maps, make users and set up swap."""
    if os.geteuid() == 0:
        return
    needs_root = pytest.mark.skip(reason="needs root: it reads other processes, makes users or sets up swap")
    for item in items:
        if item.get_closest_marker("unprivileged") is None:
            item.add_marker(needs_root)


# ---- target processes --------------------------------------------------------


class Target:
    """A tests/target.py process, driven line by line."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        hello = self._read()
        self.pid: int = hello["pid"]

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

    def map_anon(self, size: int, seed: int = 1) -> tuple[int, int]:
        reply = self.call("map_anon", size=size, seed=seed)
        return reply["start"], reply["end"]

    def map_file(self, path: str, size: int, shared: bool = False) -> tuple[int, int]:
        reply = self.call("map_file", path=str(path), size=size, shared=shared)
        return reply["start"], reply["end"]

    def verify(self) -> None:
        reply = self.call("verify")
        assert reply["ok"], f"target memory corrupted in regions {reply['bad']}"

    def status_kb(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def smaps_region(self, start: int) -> dict[str, int]:
        """The smaps counters (kB) of the VMA starting at ``start``."""
        found: dict[str, int] | None = None
        with open(f"/proc/{self.pid}/smaps") as f:
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

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """Hold the target still (SIGSTOP) so its memory cannot change."""
        os.kill(self.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()


@pytest.fixture
def spawn_target() -> Iterator:
    targets: list[Target] = []

    def spawn() -> Target:
        proc = subprocess.Popen(
            [sys.executable, str(TARGET_SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            target = Target(proc)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        targets.append(target)
        return target

    try:
        yield spawn
    finally:
        for target in targets:
            target.kill()


@pytest.fixture
def target(spawn_target) -> Target:
    return spawn_target()


# ---- agents --------------------------------------------------------------------


class Agent:
    def __init__(self, args: list[str], socket_dir: pathlib.Path, python: str = sys.executable) -> None:
        self.python = python  # another venv's, to run the agent as installed there (tests/test_packaging.py)
        self.socket_path = socket_dir / "agent.sock"
        self.address = f"unix://{self.socket_path}"
        self.args = args
        fd, log_name = tempfile.mkstemp(prefix="vmctl-agent-", suffix=".log")
        os.close(fd)
        self.log_path = pathlib.Path(log_name)
        self.proc: subprocess.Popen | None = None

    def start(self) -> Agent:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.python, "-m", "vmctl_server.agent", "--listen", self.address, *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_serving()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            if self.socket_path.exists():
                with grpc.insecure_channel(self.address) as channel:
                    try:
                        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    except grpc.RpcError:
                        pass
            time.sleep(0.05)
        raise RuntimeError(f"agent did not start serving within {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def discard_log(self) -> None:
        self.log_path.unlink(missing_ok=True)

    def client(self, **kwargs: object) -> Client:
        return Client(self.address, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def start_agent() -> Iterator:
    """Start agents with extra arguments; all are stopped at teardown."""
    agents: list[Agent] = []
    dirs: list[tempfile.TemporaryDirectory] = []

    def start(*args: str, socket_dir: pathlib.Path | None = None, python: str = sys.executable) -> Agent:
        if socket_dir is None:
            holder = tempfile.TemporaryDirectory(prefix="vmctl-test-")
            dirs.append(holder)
            socket_dir = pathlib.Path(holder.name)
        agent = Agent(list(args), socket_dir, python)
        agents.append(agent)
        return agent.start()

    try:
        yield start
    finally:
        for agent in agents:
            agent.stop()
            agent.discard_log()
        for holder in dirs:
            holder.cleanup()


@contextlib.contextmanager
def _session_agent(*args: str) -> Iterator[Agent]:
    with tempfile.TemporaryDirectory(prefix="vmctl-test-") as tmp:
        agent = Agent(list(args), pathlib.Path(tmp))
        try:
            yield agent.start()
        finally:
            agent.stop()
            agent.discard_log()


@pytest.fixture(scope="session")
def agent() -> Iterator[Agent]:
    """The native agent, shared by the tests that only read or advise."""
    with _session_agent() as running:
        yield running


@pytest.fixture(scope="session")
def agent_py() -> Iterator[Agent]:
    """The same agent on its pure-Python paths."""
    with _session_agent("--no-native") as running:
        yield running


@pytest.fixture(params=["native", "python"])
def any_agent(request: pytest.FixtureRequest) -> Agent:
    return request.getfixturevalue("agent" if request.param == "native" else "agent_py")


@pytest.fixture
def client(agent: Agent) -> Iterator[Client]:
    with agent.client() as c:
        yield c


@pytest.fixture
def any_client(any_agent: Agent) -> Iterator[Client]:
    with any_agent.client() as c:
        yield c


def expect_error(call, code: str, reason: str | None = None) -> VmctlError:
    """Run ``call`` and return the VmctlError it must raise, with that code and reason."""
    with pytest.raises(VmctlError) as caught:
        call()
    error = caught.value
    assert error.code == code, f"expected {code}/{reason}, got {error.code}/{error.reason}: {error.message}"
    if reason is not None:
        assert error.reason == reason, f"expected reason {reason}, got {error.reason}: {error.message}"
    return error


# ---- zram swap -----------------------------------------------------------------


@pytest.fixture
def zram_swap() -> Iterator[str]:
    with zram_swap_device("1G") as device:
        if device is None:
            pytest.skip("this kernel has no zram-control (CONFIG_ZRAM)")
        yield device


# ---- shared by the security tests ------------------------------------------------


@pytest.fixture
def public_dir() -> Iterator[pathlib.Path]:
    """A directory every user may traverse (mode 0755), for sockets other users reach."""
    from peers import public_directory

    with public_directory() as path:
        yield path


def write_policy(directory: pathlib.Path, text: str) -> str:
    path = directory / "policy.yaml"
    path.write_text(text)
    return str(path)



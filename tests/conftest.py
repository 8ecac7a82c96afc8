"""Fixtures: real agents, real target processes, real zram swap. (What they
are made of, and every other helper, is the package tests/support.)

Everything a test creates is torn down in ``finally`` blocks or fixture
finalizers, so a failing test leaves no process, socket or swap behind.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence

import pytest
from support.agents import Agent
from support.deploy_files import require_tool
from support.filesystems import tmpfs
from support.peers import NOBODY, public_directory
from support.processes import TARGET_SCRIPT, Target
from support.zram import zram_swap_device

from vmctl_client import Client


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


@pytest.fixture
def spawn_target() -> Iterator:
    targets: list[Target] = []

    def spawn() -> Target:
        target = Target.start()
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


@pytest.fixture
def nobody_target() -> Iterator[Target]:
    """A target process owned by another user (uid 65534), run by the system's python3 from a copy of
    the script: the project's interpreter and tree may live under a directory that user cannot enter."""
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None)
    if python is None:
        pytest.fail("no system python3 for a target owned by another user")
    setpriv = require_tool("setpriv", "util-linux")
    with tempfile.TemporaryDirectory(prefix="vmctl-target-") as script_dir:
        os.chmod(script_dir, 0o755)
        script = shutil.copy(TARGET_SCRIPT, script_dir)
        as_nobody = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        target = Target.spawn(script, prefix=as_nobody, python=python)
        try:
            yield target
        finally:
            target.kill()


# ---- agents --------------------------------------------------------------------


@pytest.fixture
def start_agent() -> Iterator:
    """Start agents with extra arguments (behind a command ``prefix``, if given:
    setpriv, a seccomp sandbox); all are stopped at teardown."""
    agents: list[Agent] = []
    dirs: list[tempfile.TemporaryDirectory] = []

    def start(
        *args: str, socket_dir: pathlib.Path | None = None, prefix: Sequence[str] = (), python: str = sys.executable
    ) -> Agent:
        if socket_dir is None:
            holder = tempfile.TemporaryDirectory(prefix="vmctl-test-")
            dirs.append(holder)
            socket_dir = pathlib.Path(holder.name)
        agent = Agent(list(args), socket_dir, prefix, python)
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


# ---- zram swap -----------------------------------------------------------------


@pytest.fixture
def zram_swap() -> Iterator[str]:
    with zram_swap_device("1G") as device:
        if device is None:
            pytest.skip("this kernel has no zram-control (CONFIG_ZRAM)")
        yield device


# ---- a full disk ------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 64 KiB tmpfs, unmounted at the end whatever happened (request it
    before start_agent, so the agent holding a file on it stops first)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    with tmpfs(mount_point, "64k"):
        yield mount_point


# ---- shared by the security tests ------------------------------------------------


@pytest.fixture
def public_dir() -> Iterator[pathlib.Path]:
    """A directory every user may traverse (mode 0755), for sockets other users reach."""
    with public_directory() as path:
        yield path

"""A private PID namespace with an agent and targets inside, for tests that
need pid 1 or pid numbers of their own choosing.

``unshare --pid --fork --mount-proc --kill-child sleep infinity`` makes the
namespace; its pid 1 is that ``sleep``. The agent and the targets join it
with ``nsenter`` (pid and mount namespaces, so /proc numbers pids the
namespace's way), and the agent listens on a unix socket in the host's
filesystem, which the test reaches as usual. Inside the namespace nobody
else forks, so writing ``/proc/sys/kernel/ns_last_pid`` picks the next pid
exactly: pid reuse becomes deterministic. Killing pid 1 ends everything in
the namespace, so teardown cannot leak a process.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING

from .agents import Agent
from .processes import TARGET_SCRIPT, Target, child_of, smaps_region, start_ticks, status_kb, ticks_since_boot
from .waiting import wait_for

if TYPE_CHECKING:
    from vmctl_client import Client, VmaInfo


class NamespacedTarget(Target):
    """A target whose ``pid`` is its pid inside the namespace (what the agent
    sees); ``host_pid`` is the one the test's own /proc reads need."""

    host_pid: int

    def smaps_region(self, start: int) -> dict[str, int]:
        return smaps_region(self.host_pid, start)

    def status_kb(self, key: str) -> int:
        return status_kb(self.host_pid, key)


class PidNamespace:
    def __init__(self) -> None:
        self._unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "sleep", "infinity"]
        )
        self._holder = tempfile.TemporaryDirectory(prefix="vmctl-pidns-")
        self.targets: list[Target] = []
        self.agent: Agent | None = None
        try:
            self.init_pid = child_of(self._unshare.pid)  # pid 1 inside, as the host numbers it
        except BaseException:
            self.close()
            raise

    def enter(self) -> list[str]:
        return ["nsenter", "-t", str(self.init_pid), "-p", "-m", "--"]

    def start_agent(self, *args: str) -> Agent:
        """An agent inside the namespace, on a unix socket the test can reach."""
        self.agent = Agent(list(args), pathlib.Path(self._holder.name), prefix=self.enter())
        return self.agent.start()

    def agent_pid(self) -> int:
        """The agent's pid as the host numbers it (nsenter's child)."""
        assert self.agent is not None and self.agent.proc is not None
        return child_of(self.agent.proc.pid)

    def spawn_target(self, pid: int | None = None) -> NamespacedTarget:
        """A support/target.py process inside; with ``pid``, exactly that pid
        (the shell sets ns_last_pid, then forks the target)."""
        script = f'"$0" "{TARGET_SCRIPT}"; exit $?'  # not exec: the target must be a fork after the write
        if pid is not None:
            script = f"echo {pid - 1} > /proc/sys/kernel/ns_last_pid && {script}"
        proc = subprocess.Popen(
            [*self.enter(), "sh", "-c", script, sys.executable],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            target = NamespacedTarget(proc)
            target.host_pid = child_of(child_of(proc.pid))  # nsenter -> sh -> the target
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        self.targets.append(target)
        if pid is not None and target.pid != pid:
            raise RuntimeError(f"asked for pid {pid}, got {target.pid}: something else forked in the namespace")
        return target

    def exit_target(self, target: Target) -> None:
        """End a target and wait until its pid is free again (reaped)."""
        target.call("exit")
        target.proc.wait(30)

    def reuse_pid(self, client: Client, pid: int) -> tuple[VmaInfo, NamespacedTarget]:
        """A target at ``pid``, read by ``client`` (the snapshot is returned), then gone, and
        another target at the same pid, started a clock tick later: its start time differs."""
        first = self.spawn_target(pid=pid)
        first_started = start_ticks(first.host_pid)
        old = client.get_vma_info(pid)
        self.exit_target(first)
        wait_for(lambda: ticks_since_boot() > first_started, "the clock to tick past the first start time")
        return old, self.spawn_target(pid=pid)

    def close(self) -> None:
        if self.agent is not None:
            with contextlib.suppress(AssertionError, ProcessLookupError):  # no agent left to find
                os.kill(self.agent_pid(), signal.SIGTERM)  # a clean stop first: socket and audit log closed
            if self.agent.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.agent.proc.wait(30)
            self.agent.discard_log()
        with contextlib.suppress(ProcessLookupError, AttributeError):
            os.kill(self.init_pid, signal.SIGKILL)  # ends every process in the namespace
        self._unshare.kill()
        self._unshare.wait()
        for target in self.targets:
            target.kill()
        if self.agent is not None and self.agent.proc is not None:
            self.agent.proc.kill()
            self.agent.proc.wait()
        self._holder.cleanup()

    def __enter__(self) -> PidNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

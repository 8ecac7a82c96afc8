"""A vmctl agent as a child process: started on a unix socket, waited on until it serves, stopped.

Its output (the log, and the audit log when it goes to standard output)
lands in a file of its own, :attr:`Agent.log_path`, which the owner removes
with :meth:`Agent.discard_log` once the agent is stopped.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vmctl_client import Client

from .waiting import wait_for


class Agent:
    """``vmctl_server.agent`` listening on ``socket_dir``/agent.sock with ``args``; behind ``prefix``
    (setpriv, a seccomp sandbox, nsenter) when given, which must exec or fork the agent with its arguments;
    run by ``python`` (another venv's, to run the agent as installed there: tests/test_packaging.py)."""

    def __init__(
        self, args: list[str], socket_dir: pathlib.Path, prefix: Sequence[str] = (), python: str = sys.executable
    ) -> None:
        self.python = python
        self.socket_path = socket_dir / "agent.sock"
        self.address = f"unix://{self.socket_path}"
        self.args = args
        self.prefix = list(prefix)
        fd, log_name = tempfile.mkstemp(prefix="vmctl-agent-", suffix=".log")
        os.close(fd)
        self.log_path = pathlib.Path(log_name)
        self.proc: subprocess.Popen | None = None

    def start(self) -> Agent:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, self.python, "-m", "vmctl_server.agent", "--listen", self.address, *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_serving()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def serving(self) -> bool:
        """True once the health service answers SERVING; raises if the agent has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
        if not self.socket_path.exists():
            return False
        with grpc.insecure_channel(self.address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_serving(self, timeout: float = 30.0) -> None:
        try:
            wait_for(self.serving, f"the agent to serve on {self.address}", timeout)
        except AssertionError as exc:
            raise RuntimeError(f"{exc}:\n{self.log()}") from None

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


def write_policy(directory: pathlib.Path, text: str) -> str:
    """``text`` as ``directory``/policy.yaml, for an agent's ``--policy``."""
    path = directory / "policy.yaml"
    path.write_text(text)
    return str(path)

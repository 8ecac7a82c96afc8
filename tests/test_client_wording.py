"""What the client says when the agent answers UNAVAILABLE itself.

An agent that is shutting down (``AGENT_STOPPING``) or cannot write its audit
log (``AUDIT_UNAVAILABLE``) did answer: the library raises the subclass of
AgentUnavailableError that says so, with the agent's words, and the CLI
prints them; "no vmctl agent answers ... start one" is only for a call no
agent answered. Both refusals are produced for real: the audit log on a
64 KiB tmpfs that fills up, and SIGTERM while calls keep arriving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from support.filesystems import fill
from support.processes import PAGE

from vmctl_api import vmctl_pb2_grpc
from vmctl_client import (
    AgentStoppingError,
    AgentUnavailableError,
    AsyncClient,
    AuditUnavailableError,
    Client,
    VmctlError,
)
from vmctl_client.calls import RetryPolicy

NO_RETRY = RetryPolicy(attempts=1)
NO_AGENT = "no vmctl agent answers"


def vmctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vmctl_client.cli", *args], capture_output=True, text=True, timeout=120
    )


def assert_not_told_to_start_an_agent(text: str) -> None:
    assert NO_AGENT not in text and "Start one" not in text and "sudo vmctl-agent" not in text, text


# ---- AUDIT_UNAVAILABLE: the audit log's file system is full ----------------------------------


def advise_until_refused(client: Client, pid: int, page: tuple[int, int]) -> VmctlError:
    """Advice of one page (each call two audit records: its intent, then its
    outcome) until the agent refuses one: the records first fill what is left
    of the log's last page."""
    cookie = client.get_vma_info(pid).cookie
    for _ in range(100):
        try:
            client.advise_ranges(pid, [page], "cold", cookie=cookie)
        except VmctlError as error:
            return error
    raise AssertionError("the agent never refused advice with its audit log's file system full")


def test_audit_unavailable_says_the_agent_refuses_advice(tiny_tmpfs, start_agent, target):
    audit_log = tiny_tmpfs / "audit.log"
    agent = start_agent("--audit-log", str(audit_log))
    start, _end = target.map_anon(4 * PAGE, seed=11)
    page = (start, start + PAGE)
    fill(tiny_tmpfs)

    with agent.client(retry=NO_RETRY) as client:
        error = advise_until_refused(client, target.pid, page)
        assert isinstance(error, AuditUnavailableError) and isinstance(error, AgentUnavailableError)
        assert (error.code, error.reason) == ("UNAVAILABLE", "AUDIT_UNAVAILABLE")
        assert "audit log" in error.message and "no advice is applied" in error.message, error.message
        assert_not_told_to_start_an_agent(error.message)
        assert client.get_vma_info(target.pid).process.pid == target.pid  # the agent is there: reads go on

    async def advise_async() -> VmctlError:
        async with AsyncClient(agent.address, retry=NO_RETRY) as aclient:
            cookie = (await aclient.get_vma_info(target.pid)).cookie
            with pytest.raises(VmctlError) as refused:
                await aclient.advise_ranges(target.pid, [page], "cold", cookie=cookie)
            return refused.value

    assert type(asyncio.run(advise_async())) is AuditUnavailableError

    page_range = f"{page[0]:#x}-{page[1]:#x}"
    advise = ("--target", agent.address, "advise", str(target.pid), "--advice", "cold", "--range", page_range)
    run = vmctl(*advise)
    assert run.returncode == 1, run.stderr
    assert run.stderr.startswith("vmctl: UNAVAILABLE AUDIT_UNAVAILABLE: the audit log "), run.stderr
    assert "no advice is applied until it can" in run.stderr
    assert_not_told_to_start_an_agent(run.stderr)
    run = vmctl(*advise, "-o", "json")
    assert run.returncode == 1, run.stderr
    refused = json.loads(run.stdout)["error"]
    assert (refused["code"], refused["reason"]) == ("UNAVAILABLE", "AUDIT_UNAVAILABLE")
    assert_not_told_to_start_an_agent(refused["message"])
    target.verify()


# ---- AGENT_STOPPING: SIGTERM while calls keep arriving -----------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Caller(threading.Thread):
    """Calls the agent over and over on one connection until told to stop,
    keeping what each call raised. While it calls, a draining agent stays
    draining: every call that arrives restarts the agent's quiet period."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.client = Client(address, retry=NO_RETRY, timeout=10)
        self.errors: list[VmctlError] = []
        self.refused = threading.Event()  # an AGENT_STOPPING came back
        self.stop = threading.Event()

    def run(self) -> None:
        with self.client:
            while not self.stop.wait(0.05):
                try:
                    self.client.node_info()
                except VmctlError as error:
                    self.errors.append(error)
                    if error.reason == "AGENT_STOPPING":
                        self.refused.set()


@contextlib.contextmanager
def calling(address: str) -> Iterator[Caller]:
    caller = Caller(address)
    caller.client.node_info()  # connected, before the agent stops accepting connections
    caller.start()
    try:
        yield caller
    finally:
        caller.stop.set()
        caller.join(30)


def test_agent_stopping_says_the_agent_is_shutting_down(start_agent, tmp_path):
    port = _free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        'rules: [{identities: ["uid:0"], verbs: [read, advise]}, {identities: [anonymous], verbs: [read]}]'
    )
    agent = start_agent(
        *("--listen", f"tcp://127.0.0.1:{port}", "--insecure", "--policy", str(policy)),
        *("--shutdown-grace", "60"),
    )
    with calling(agent.address) as caller:
        agent.proc.send_signal(signal.SIGTERM)
        assert caller.refused.wait(30), [e.message for e in caller.errors]
        # Draining: the unix socket takes no new connection, gRPC's TCP port still does.
        run = vmctl("--target", f"127.0.0.1:{port}", "--insecure", "--timeout", "20", "node")
        json_run = vmctl("--target", f"127.0.0.1:{port}", "--insecure", "--timeout", "20", "node", "-o", "json")
        assert agent.proc.poll() is None, "the agent stopped draining before the CLI asked"
    assert agent.proc.wait(60) == 0, agent.log()

    error = next(e for e in caller.errors if e.reason == "AGENT_STOPPING")
    assert isinstance(error, AgentStoppingError) and isinstance(error, AgentUnavailableError)
    assert (error.code, error.message) == ("UNAVAILABLE", "the agent is shutting down; the call was not started")
    assert run.returncode == 1, run.stderr
    assert run.stderr == "vmctl: UNAVAILABLE AGENT_STOPPING: the agent is shutting down; the call was not started\n"
    refused = json.loads(json_run.stdout)["error"]
    assert (refused["code"], refused["reason"]) == ("UNAVAILABLE", "AGENT_STOPPING")

    # Gone now: that is what "no agent answers ... start one" is for.
    with Client(agent.address, retry=NO_RETRY, timeout=5) as client, pytest.raises(AgentUnavailableError) as gone:
        client.node_info()
    assert type(gone.value) is AgentUnavailableError and gone.value.reason == ""
    assert NO_AGENT in gone.value.message and "Start one" in gone.value.message
    assert os.path.exists(agent.socket_path) is False


# ---- the rule, for reasons no agent of today sends ---------------------------------------------


class Refusing(vmctl_pb2_grpc.VmControlServicer):
    """A real gRPC server that answers GetNodeInfo with UNAVAILABLE and one ErrorInfo."""

    def __init__(self, message: str, reason: str, domain: str) -> None:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=domain))
        self.status = rpc_status.to_status(
            status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message, details=[info])
        )

    def GetNodeInfo(self, request, context):
        context.abort_with_status(self.status)


@contextlib.contextmanager
def refusing_server(socket_path: pathlib.Path, servicer: Refusing) -> Iterator[str]:
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=1))
    vmctl_pb2_grpc.add_VmControlServicer_to_server(servicer, server)
    address = f"unix://{socket_path}"
    server.add_insecure_port(address)
    server.start()
    try:
        yield address
    finally:
        server.stop(None).wait()


def refusal_from(socket_path: pathlib.Path, servicer: Refusing) -> VmctlError:
    """What the library raises for the server's answer to GetNodeInfo."""
    with (
        refusing_server(socket_path, servicer) as address,
        Client(address, retry=NO_RETRY) as client,
        pytest.raises(VmctlError) as refused,
    ):
        client.node_info()
    return refused.value


@pytest.mark.unprivileged
@pytest.mark.parametrize(
    ("refusal", "cls", "said"),
    [
        # A reason this client does not know yet: still the agent's words.
        (("the agent is busy", "SOME_NEW_REASON", "vmctl.dev"), AgentUnavailableError, "the agent is busy"),
        # An agent that gave no message: what the reason means.
        (
            ("", "AGENT_STOPPING", "vmctl.dev"),
            AgentStoppingError,
            "the agent is shutting down; the call was not started",
        ),
        (("", "AUDIT_UNAVAILABLE", "vmctl.dev"), AuditUnavailableError, "until its audit log can be written"),
    ],
    ids=["unknown-reason", "stopping-no-message", "audit-no-message"],
)
def test_whatever_the_agent_answers_is_shown_as_its_answer(tmp_path, refusal, cls, said):
    refused = refusal_from(tmp_path / "s.sock", Refusing(*refusal))
    assert type(refused) is cls and refused.code == "UNAVAILABLE"
    assert said in refused.message
    assert_not_told_to_start_an_agent(refused.message)


@pytest.mark.unprivileged
def test_an_unavailable_from_something_else_is_no_agent_answering(tmp_path):
    """An ErrorInfo of another domain (a proxy on the way, say) is not the agent speaking."""
    refused = refusal_from(tmp_path / "s.sock", Refusing("upstream connect error", "UPSTREAM_DOWN", "proxy.example"))
    assert type(refused) is AgentUnavailableError
    assert NO_AGENT in refused.message and "upstream connect error" in refused.message

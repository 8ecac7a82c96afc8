"""The unix-socket gateway's connection slots, end to end against real agents.

Local users connect as themselves (tests/peers.py: a thread whose effective
uid really is that user calls connect(), so SO_PEERCRED names it). The
gateway's state is read back from the agent's own metrics
(``vmctl_gateway_connections``, ``..._closed_total{reason}``,
``..._refused_total{reason}``), so every wait is on a condition, not a sleep.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import random
import socket
import subprocess
import sys
import tempfile
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.peers import NOBODY, ConnectAs, connect_as, public_directory
from support.processes import threads
from support.scrape import Scrape, logged_port
from support.waiting import wait_for

from vmctl_client.calls import RetryPolicy
from vmctl_server.runtime import metrics
from vmctl_server.transport.unixgate import UnixGateway

OTHER_USER = 65533  # a second unprivileged uid: SO_PEERCRED needs no passwd entry
METERED = ("--metrics-listen", "127.0.0.1:0", "--log-format", "json")
NO_RETRY = RetryPolicy(attempts=1)
MiB = 1 << 20


class Gate:
    """The gateway's counters, as the agent's /metrics shows them."""

    def __init__(self, agent) -> None:
        self.port = logged_port(agent, "metrics_port")

    def open(self) -> float:
        return Scrape(self.port).value("vmctl_gateway_connections")

    def refused(self, reason: str) -> float:
        return Scrape(self.port).value("vmctl_gateway_connections_refused_total", reason=reason)

    def closed(self, reason: str) -> float:
        return Scrape(self.port).value("vmctl_gateway_connections_closed_total", reason=reason)

    def wait_open(self, count: int) -> None:
        wait_for(lambda: self.open() == count, f"{count} connections relayed")


@contextlib.contextmanager
def held_sockets():
    sockets: list[socket.socket] = []
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def closed_unread(sock: socket.socket) -> bool:
    """The agent closed this connection without a byte: it was refused."""
    sock.settimeout(60)  # only bounds a hang: the close is what is waited for
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def ended(sock: socket.socket) -> bool:
    """The agent closed this connection (after whatever gRPC sent first, its SETTINGS)."""
    sock.settimeout(60)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def health_as(path: pathlib.Path, uid: int) -> int:
    """A health check over a new connection made by ``uid``: the status, so the connection was served."""
    with ConnectAs(path, uid) as peer, grpc.insecure_channel(peer.address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30).status


def test_other_users_can_never_take_the_slots_kept_for_root(start_agent):
    with public_directory() as public:
        agent = start_agent(
            "--socket-mode", "0666", "--max-connections", "4", "--connections-reserved-for-root", "1",
            "--max-connections-per-uid", "2", *METERED, socket_dir=public,
        )  # fmt: skip
        gate = Gate(agent)
        path = str(agent.socket_path)
        gate.wait_open(0)  # the fixture's own health check has gone
        closed_before = {reason: gate.closed(reason) for reason in ("idle", "error")}  # however that one ended
        with held_sockets() as held:
            held += [connect_as(path, uid, uid) for uid in (NOBODY, NOBODY, OTHER_USER)]
            gate.wait_open(3)  # the three slots other users may take
            over_its_own = connect_as(path, NOBODY, NOBODY)
            assert closed_unread(over_its_own)
            assert gate.refused("uid_limit") == 1
            over_the_shared = connect_as(path, OTHER_USER, OTHER_USER)  # its first, but none left for non-root
            assert closed_unread(over_the_shared)
            assert gate.refused("full") == 1
            assert "another 1 are kept for root" in agent.log()
            # Root gets the slot kept for it, and is served; the users' connections all stay.
            with agent.client(retry=NO_RETRY, timeout=30) as root:
                assert root.node_info().hostname
                assert gate.open() == 4
            assert {reason: gate.closed(reason) for reason in ("idle", "error")} == closed_before


def test_an_idle_connection_is_closed_and_its_slot_taken_again(start_agent):
    with public_directory() as public:
        agent = start_agent(
            "--socket-mode", "0666", "--max-connections-per-uid", "1", "--connection-idle-timeout", "1",
            *METERED, socket_dir=public,
        )  # fmt: skip
        gate = Gate(agent)
        with held_sockets() as held:
            idle = connect_as(str(agent.socket_path), NOBODY, NOBODY)  # the user's one slot, and it never closes
            held.append(idle)
            assert ended(idle)  # the gateway closes it
            assert gate.closed("idle") >= 1
            assert health_as(agent.socket_path, NOBODY) == health_pb2.HealthCheckResponse.SERVING  # the slot again


def test_a_client_whose_connection_was_idle_closed_just_calls_again(start_agent):
    agent = start_agent("--connection-idle-timeout", "1", *METERED)
    gate = Gate(agent)
    with agent.client(timeout=30) as client:
        assert client.node_info().hostname
        wait_for(lambda: gate.open() == 0, "the client's idle connection closed by the gateway")
        assert gate.closed("idle") >= 1
        assert client.node_info().hostname  # gRPC reconnects by itself


def test_a_connection_grpc_closes_frees_its_slot_though_the_client_keeps_it(start_agent):
    with public_directory() as public:
        agent = start_agent(
            "--socket-mode", "0666", "--max-connections-per-uid", "1", *METERED, socket_dir=public
        )  # fmt: skip
        gate = Gate(agent)
        path = str(agent.socket_path)
        gate.wait_open(0)
        with held_sockets() as held:
            stubborn = connect_as(path, NOBODY, NOBODY)
            held.append(stubborn)
            # Not the HTTP/2 preface: gRPC drops the connection. The client never closes its socket.
            stubborn.sendall(b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n")
            wait_for(lambda: gate.closed("server_closed") == 1, "gRPC's close seen by the gateway")
            assert gate.open() == 0
            assert ended(stubborn)  # and the gateway passed the close on
            assert health_as(agent.socket_path, NOBODY) == health_pb2.HealthCheckResponse.SERVING


def http2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def header_only_call(path: bytes) -> bytes:
    """The HTTP/2 preface, SETTINGS and the HEADERS of a gRPC call whose body never comes
    (HPACK literals without indexing, RFC 7541 6.2.2: no table, no Huffman)."""
    fields = [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", path), (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"), (b"te", b"trailers"),
    ]  # fmt: skip
    block = b"".join(b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value for name, value in fields)
    settings, headers, end_headers = 0x4, 0x1, 0x4
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    return preface + http2_frame(settings, 0, 0) + http2_frame(headers, end_headers, 1, block)


def test_calls_that_never_send_their_body_lose_their_connections(start_agent):
    with public_directory() as public:
        agent = start_agent(
            "--socket-mode", "0666", "--workers", "2", "--connection-idle-timeout", "2", *METERED, socket_dir=public
        )  # fmt: skip
        gate = Gate(agent)
        with held_sockets() as held:
            for _ in range(4):  # twice --workers, from a user the policy does not know
                held.append(connect_as(str(agent.socket_path), NOBODY, NOBODY))
                held[-1].sendall(header_only_call(b"/vmctl.v1.VmControl/GetNodeInfo"))
            # Headers and nothing more is no activity: the gateway closes those
            # connections, and gRPC lets go of the workers they held.
            assert all(ended(sock) for sock in held)
            assert gate.closed("idle") >= 4
            with agent.client(retry=NO_RETRY, timeout=60) as root:
                assert root.node_info().hostname


def test_a_user_refused_in_a_loop_does_not_flood_the_log(start_agent):
    with public_directory() as public:
        agent = start_agent(
            "--socket-mode", "0666", "--max-connections-per-uid", "1", *METERED, socket_dir=public
        )  # fmt: skip
        gate = Gate(agent)
        path = str(agent.socket_path)
        gate.wait_open(0)
        with held_sockets() as held:
            held.append(connect_as(path, NOBODY, NOBODY))
            gate.wait_open(1)
            for _ in range(200):
                refused = connect_as(path, NOBODY, NOBODY)
                assert closed_unread(refused)
                refused.close()
            assert gate.refused("uid_limit") == 200
            warnings = [line for line in agent.log().splitlines() if f"connection from uid {NOBODY}" in line]
            assert len(warnings) == 1, warnings  # one a uid per 10 s; the count follows in the next


def test_connections_cost_no_threads_and_end_with_the_agent(start_agent):
    agent = start_agent("--max-connections", "128", "--max-connections-per-uid", "128", *METERED)
    gate = Gate(agent)
    gate.wait_open(0)
    before = threads(agent.proc.pid)
    with held_sockets() as held:
        for _ in range(100):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.append(sock)
            sock.connect(str(agent.socket_path))
        gate.wait_open(100)
        # One relay thread moves every connection's bytes (it used to be two threads each: +200).
        assert threads(agent.proc.pid) <= before + 4
        with agent.client(retry=NO_RETRY, timeout=30) as client:
            assert client.node_info().hostname
        assert agent.stop() == 0
        assert all(ended(sock) for sock in held)
    assert not agent.socket_path.exists()


@pytest.mark.unprivileged
def test_a_bad_reserve_is_refused_at_start():
    with tempfile.TemporaryDirectory(prefix="vmctl-test-") as tmp:
        args = ["--listen", f"unix://{tmp}/agent.sock", "--max-connections", "8", "--connections-reserved-for-root"]
        run = subprocess.run(
            [sys.executable, "-m", "vmctl_server.agent", *args, "9"], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 1
        assert "--connections-reserved-for-root 9 must be between 0 and --max-connections (8)" in run.stderr
        assert os.listdir(tmp) == []  # no socket, no private directory left behind


# ---- the relay itself, in this process: every byte, in order, under backpressure ----------


class EchoServer:
    """A unix socket server for one connection: it sends back what it reads until the
    client closes, or, given ``then_close``, sends those bytes at once and closes."""

    def __init__(self, path: str, then_close: bytes | None = None) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.then_close = then_close
        self.saw_end = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            if self.then_close is not None:
                conn.sendall(self.then_close)
                return
            while data := conn.recv(1 << 16):
                conn.sendall(data)
            self.saw_end.set()

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=30)


@contextlib.contextmanager
def relayed(then_close: bytes | None = None):
    """A gateway in this process in front of an echo server; yields (client socket, gateway, echo)."""
    with tempfile.TemporaryDirectory(prefix="vmctl-relay-") as tmp:
        echo = EchoServer(f"{tmp}/upstream.sock", then_close)
        gateway = UnixGateway(f"{tmp}/upstream.sock")
        try:
            gateway.listen(f"{tmp}/public.sock", 0o600)
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                client.connect(f"{tmp}/public.sock")
                yield client, gateway, echo
            finally:
                client.close()
        finally:
            gateway.close(drain_seconds=1)
            echo.close()


def send_until_the_chain_is_full(sock: socket.socket, payload: bytes, chain_full: threading.Event) -> None:
    """Send ``payload``, setting ``chain_full`` once a send would block: every buffer on
    the way (the kernel's, the relay's backlog, the echo's) is then full."""
    view = memoryview(payload)
    sock.setblocking(False)
    try:
        while view:
            view = view[sock.send(view[: 1 << 16]) :]
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)
        chain_full.set()
    sock.sendall(view)


def read_all(sock: socket.socket, chunk: int = 4096) -> bytes:
    """Everything until the end, a small read at a time (a slow reader)."""
    parts = []
    while data := sock.recv(chunk):
        parts.append(data)
    return b"".join(parts)


def closed_total(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("vmctl_gateway_connections_closed_total", {"reason": reason}) or 0.0


@pytest.mark.unprivileged
def test_the_relay_passes_every_byte_in_order_when_the_reader_is_slow():
    payload = random.Random(7).randbytes(16 * MiB)
    with relayed() as (client, gateway, echo):
        chain_full = threading.Event()
        writer = threading.Thread(target=send_until_the_chain_is_full, args=(client, payload, chain_full))
        writer.start()
        try:
            assert chain_full.wait(timeout=60)
            received = hashlib.sha256()
            count = 0
            while count < len(payload):
                data = client.recv(4096)
                assert data, f"the relay ended after {count} bytes"
                received.update(data)
                count += len(data)
        finally:
            writer.join(timeout=60)
        assert received.digest() == hashlib.sha256(payload).digest()
        # The client ends the connection: the upstream side is closed too, and the slot is free.
        before = closed_total("client_closed")
        client.shutdown(socket.SHUT_RDWR)
        assert echo.saw_end.wait(timeout=60)
        wait_for(lambda: gateway.connections == 0, "the slot freed")
        assert closed_total("client_closed") == before + 1


@pytest.mark.unprivileged
@pytest.mark.parametrize("client_sent_first", [False, True], ids=["quiet-client", "unread-request"])
def test_the_relay_passes_on_every_byte_sent_before_the_server_closed(client_sent_first):
    last_words = random.Random(8).randbytes(4 * MiB)
    before = closed_total("server_closed")
    with relayed(then_close=last_words) as (client, gateway, _echo):
        if client_sent_first:
            # Bytes the server never reads: its close is then a reset for the relay, after its data.
            client.sendall(b"request")
        assert read_all(client) == last_words  # every byte, in order, then the end
        wait_for(lambda: gateway.connections == 0, "the slot freed")
    assert closed_total("server_closed") == before + 1

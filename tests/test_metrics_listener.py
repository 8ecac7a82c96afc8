"""The agent's Prometheus listener under abuse, end to end: many idle
connections, a slowloris, paths and methods it does not serve, IPv6.

Real agents with ``--metrics-listen HOST:0`` (the port is read from the
agent's JSON log), real TCP connections, the agent's threads and sockets read
from /proc.
"""

from __future__ import annotations

import contextlib
import pathlib
import resource
import select
import selectors
import socket
import time

import pytest
from support.processes import threads
from support.scrape import Scrape, logged_port
from support.waiting import wait_for

from vmctl_server import __version__
from vmctl_server.runtime import metrics

IDLE_CONNECTIONS = 1000


@pytest.fixture
def metrics_agent(start_agent):
    agent = start_agent("--metrics-listen", "127.0.0.1:0", "--log-format", "json")
    return agent, logged_port(agent, "metrics_port")


def sockets(pid: int) -> int:
    """Sockets the process holds (all kinds: what matters is that the count comes back down)."""
    count = 0
    for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            count += pathlib.Path(fd).readlink().name.startswith("socket:")
    return count


@contextlib.contextmanager
def descriptors(needed: int):
    """This process may open ``needed`` more files (raised up to the hard limit, restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(list(pathlib.Path("/proc/self/fd").iterdir()))
    want = in_use + needed + 64
    if hard != resource.RLIM_INFINITY and want > hard:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is under the {want} descriptors this test needs")
    if soft != resource.RLIM_INFINITY and want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def ended_by_peer(sock: socket.socket) -> bool:
    """The agent closed this connection without answering (FIN or reset)."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def wait_all_ended(sockets: list[socket.socket], timeout: float = 60.0) -> None:
    """Wait until the agent has ended every one of ``sockets``; each must have had no answer."""
    waiting = selectors.DefaultSelector()
    for sock in sockets:
        waiting.register(sock, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while waiting.get_map():
            assert time.monotonic() < deadline, f"{len(waiting.get_map())} connections still open"
            for key, _ in waiting.select(timeout=1.0):
                assert ended_by_peer(key.fileobj), "an idle connection got bytes"  # type: ignore[arg-type]
                waiting.unregister(key.fileobj)
    finally:
        waiting.close()


def exchange(port: int, request: bytes, host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """Send one raw request; the status, headers (lowercase names) and body of the answer."""
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(request)
        reply = b""
        while data := sock.recv(65536):
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def test_a_thousand_idle_connections_cost_no_thread_and_are_all_closed(metrics_agent):
    agent, port = metrics_agent
    pid = agent.proc.pid
    threads_before, sockets_before = threads(pid), sockets(pid)
    held: list[socket.socket] = []
    with descriptors(IDLE_CONNECTIONS):
        try:
            for _ in range(IDLE_CONNECTIONS):
                held.append(socket.create_connection(("127.0.0.1", port), timeout=30))
            # prometheus_client's server had a thread for each of these.
            assert threads(pid) <= threads_before + 2
            # Answered at once: a new connection pushes out the oldest one still sending nothing.
            assert Scrape(port).value("vmctl_agent_info", version=__version__) == 1
            wait_for(
                lambda: sockets(pid) <= sockets_before + metrics.MAX_CONNECTIONS,
                "the agent holding at most its cap of metrics connections",
            )
            wait_all_ended(held)  # those over the cap at once, the rest after the request timeout
            wait_for(lambda: sockets(pid) <= sockets_before, "the agent's sockets back to where they were")
            assert threads(pid) <= threads_before + 2
        finally:
            for sock in held:
                sock.close()


def test_a_request_trickled_a_byte_a_second_is_cut(metrics_agent):
    _agent, port = metrics_agent
    request = b"GET /metrics HTTP/1.1\r\nHost: agent\r\nUser-Agent: " + b"s" * 64 + b"\r\n\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        for byte in request:
            ended, _, _ = select.select([sock], [], [], 1.0)  # a byte a second, unless the agent ends it first
            if ended:
                break
            try:
                sock.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
        assert sent < len(request), "the whole trickled request was taken"
        sock.settimeout(30)
        assert ended_by_peer(sock)  # and never answered
    assert Scrape(port).value("vmctl_agent_info", version=__version__) == 1  # others still are


def test_only_get_and_head_of_metrics_are_answered(metrics_agent):
    _agent, port = metrics_agent
    status, headers, body = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert int(headers["content-length"]) == len(body) and b"vmctl_gateway_connections " in body
    assert headers["connection"] == "close"

    status, headers, body = exchange(port, b"HEAD /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 200 and int(headers["content-length"]) > 0 and body == b""

    status, _, body = exchange(port, b"GET /metrics?name[]=process_cpu_seconds_total HTTP/1.0\r\n\r\n")
    assert status == 200 and b"vmctl_agent_info" in body  # the query is ignored: the whole exposition

    accept = b"Accept: application/openmetrics-text; version=1.0.0\r\n"
    status, headers, body = exchange(port, b"GET /metrics HTTP/1.1\r\n" + accept + b"\r\n")
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")

    for path in (b"/", b"/favicon.ico", b"/metrics/", b"/metricsx", b"//metrics"):
        status, _, body = exchange(port, b"GET " + path + b" HTTP/1.1\r\n\r\n")
        assert status == 404, path
        assert b"vmctl" not in body

    for method in (b"POST", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"):
        status, headers, body = exchange(port, method + b" /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert (status, headers["allow"], body) == (405, "GET, HEAD", b""), method

    not_http1 = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET /metrics\r\n\r\n", b"\xff\xfe /metrics HTTP/1.1\r\n\r\n")
    for garbage in not_http1:
        status, _, _ = exchange(port, garbage)
        assert status == 400, garbage

    big = b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"p" * metrics.MAX_REQUEST_BYTES + b"\r\n\r\n"
    status, _, body = exchange(port, big)
    assert (status, body) == (431, b"")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this host")
@pytest.mark.parametrize(("listen", "hosts"), [("[::1]:0", ["::1"]), ("[::]:0", ["::1", "127.0.0.1"])])
def test_metrics_listen_on_ipv6(start_agent, listen, hosts):
    agent = start_agent("--metrics-listen", listen, "--log-format", "json")
    port = logged_port(agent, "metrics_port")
    for host in hosts:  # [::] takes IPv4 too where the host allows it, as prometheus_client's server did
        assert Scrape(port, host=host).value("vmctl_agent_info", version=__version__) == 1

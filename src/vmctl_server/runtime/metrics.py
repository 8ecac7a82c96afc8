"""Prometheus metrics for the agent, served over HTTP by ``--metrics-listen``.

The series are recorded by :mod:`vmctl_server.transport.interceptor` (one interceptor sees
every call) and by :func:`describe_agent` at start; this module only defines
them and serves them. They live in their own registry so the HTTP endpoint
shows the agent's series and the process's own (CPU, RSS, open fds), nothing
a library registered on the side.

The gRPC series have the names and labels of go-grpc-prometheus and
py-grpc-prometheus (``grpc_service``, ``grpc_method``, ``grpc_type``,
``grpc_code``), so the gRPC ecosystem's dashboards and alerts work unchanged.
``grpc_type`` is the method's type as the proto declares it (``unary``,
``server_stream``, ``bidi_stream``, ...), whatever the agent serves it as
internally. The handling histogram adds ``grpc_code`` (a refusal's latency is
not a success's); queries that sum by ``le`` are unaffected. No
``grpc_server_msg_*`` counters: every method but StreamVmaInfo, health
``Watch`` and reflection sends one message each way.

========================================  ==================================================================
series                                    meaning
========================================  ==================================================================
grpc_server_started_total                 calls started, by grpc_service, grpc_method and grpc_type
grpc_server_handled_total                 calls finished, same labels and grpc_code
grpc_server_handling_seconds              latency histogram, same labels as handled
vmctl_grpc_calls_in_flight                calls being served now, by grpc_service, grpc_method and grpc_type
vmctl_grpc_refusals_total                 refused calls by grpc_service, grpc_method and ErrorInfo reason
vmctl_advice_requested_bytes_total        bytes named by successful, non-dry-run AdviseRanges, by advice
vmctl_advised_bytes_total                 bytes the kernel reported advised, by advice
vmctl_process_madvise_calls_total         process_madvise system calls made, by advice
vmctl_cookie_checks_total                 AdviseRanges calls by cookie outcome (words.COOKIE_OUTCOMES)
vmctl_advice_scope_checks_total           AdviseRanges calls with a cookie checked, by how (words.SCOPE_CHECKS)
vmctl_advice_ranges_changed_total         ranges SCOPE_RANGES left out as RANGE_CHANGED
vmctl_snapshot_cache_entries              snapshots whose layouts SCOPE_RANGES can check against
vmctl_snapshot_cache_bytes                what they hold, against --snapshot-cache-bytes
vmctl_snapshot_cache_hits_total           SCOPE_RANGES calls that found the cookie's snapshot
vmctl_snapshot_cache_misses_total         ... and that did not (they checked the whole layout)
vmctl_snapshot_cache_evictions_total      snapshots dropped to stay within the bound
vmctl_agent_path                          1 for the path each component uses (native C or the fallback)
vmctl_gateway_connections                 unix-socket connections relayed now
vmctl_gateway_connections_closed_total    relayed connections ended, by reason (GATEWAY_CLOSE_REASONS)
vmctl_gateway_connections_refused_total   connections refused at admission, by reason (GATEWAY_REFUSAL_REASONS)
vmctl_agent_info                          version
process_*, python_*                       the agent process (prometheus-client's collectors)
========================================  ==================================================================

No ``*_created`` series: prometheus-client would add one per counter and
histogram child (the time it was first used), which text-format scrapers
store as one more series each; :func:`disable_created_metrics` turns them off
for this process, the agent, whose registry is the only one served.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from vmctl_api.words import COOKIE_OUTCOMES, SCOPE_CHECKS, ScopeCheck
from vmctl_server import __version__
from vmctl_server.core.snapshot_cache import SnapshotCache

disable_created_metrics()
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# go-grpc-prometheus's label names; grpc_type is one of GRPC_TYPES.
_CALL_LABELS = ("grpc_service", "grpc_method", "grpc_type")
GRPC_TYPES = ("unary", "client_stream", "server_stream", "bidi_stream")
# From a sub-millisecond GetNodeInfo to a 65,530-VMA accounting read or a multi-GiB pageout.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

STARTED = Counter("grpc_server_started", "Total number of RPCs started on the server", _CALL_LABELS, registry=REGISTRY)
HANDLED = Counter(
    "grpc_server_handled",
    "Total number of RPCs completed on the server, regardless of success or failure",
    (*_CALL_LABELS, "grpc_code"),
    registry=REGISTRY,
)
HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Time from the call's arrival to its response or refusal, by status code",
    (*_CALL_LABELS, "grpc_code"),
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge("vmctl_grpc_calls_in_flight", "gRPC calls being served", _CALL_LABELS, registry=REGISTRY)
REFUSALS = Counter(
    "vmctl_grpc_refusals",
    "Refused calls by google.rpc.ErrorInfo reason",
    ("grpc_service", "grpc_method", "reason"),
    registry=REGISTRY,
)
REQUESTED_BYTES = Counter(
    "vmctl_advice_requested_bytes",
    "Bytes named by the ranges of successful AdviseRanges calls (dry runs excluded)",
    ("advice",),
    registry=REGISTRY,
)
ADVISED_BYTES = Counter(
    "vmctl_advised_bytes",
    "Bytes process_madvise reported advised (dry runs excluded)",
    ("advice",),
    registry=REGISTRY,
)
MADVISE_CALLS = Counter(
    "vmctl_process_madvise_calls", "process_madvise system calls made", ("advice",), registry=REGISTRY
)


Word = TypeVar("Word", bound=str)


def _counter_by_word(name: str, what: str, label: str, words: Mapping[Word, str]) -> Counter:
    """A counter by one label whose values are ``words`` (each with its meaning, listed in the
    help), every one present at 0 from the start, so rates and alerts see every word."""
    counter = Counter(name, f"{what}: " + "; ".join(f"{k}: {v}" for k, v in words.items()), (label,), registry=REGISTRY)
    for word in words:
        counter.labels(word)
    return counter


COOKIE_CHECKS = _counter_by_word(
    "vmctl_cookie_checks", "AdviseRanges calls read past their headers, by cookie outcome", "outcome", COOKIE_OUTCOMES
)


def record_advice(
    cookie: str, advice: str, requested_bytes: int, advised_bytes: int, syscalls: int, *, applied: bool
) -> None:
    """One AdviseRanges call's outcome, in the audit log's words (``cookie`` is one of COOKIE_OUTCOMES)."""
    COOKIE_CHECKS.labels(cookie).inc()
    if applied:
        REQUESTED_BYTES.labels(advice).inc(requested_bytes)
        ADVISED_BYTES.labels(advice).inc(advised_bytes)
        MADVISE_CALLS.labels(advice).inc(syscalls)


SCOPE_CHECKS_TOTAL = _counter_by_word(
    "vmctl_advice_scope_checks", "AdviseRanges calls whose cookie's layout was checked, by how", "scope", SCOPE_CHECKS
)
RANGES_CHANGED = Counter(
    "vmctl_advice_ranges_changed",
    "Ranges AdviseRanges left out with reason RANGE_CHANGED (SCOPE_RANGES)",
    registry=REGISTRY,
)


def record_scope(scope: ScopeCheck, changed_ranges: int) -> None:
    """How one AdviseRanges call that got as far as its layout check was checked."""
    SCOPE_CHECKS_TOTAL.labels(scope).inc()
    if changed_ranges:
        RANGES_CHANGED.inc(changed_ranges)


class _SnapshotCacheCollector(Collector):
    """The snapshot cache's size and counts, read when scraped."""

    def __init__(self) -> None:
        self.cache: SnapshotCache | None = None

    def collect(self) -> list[GaugeMetricFamily | CounterMetricFamily]:
        cache = self.cache
        if cache is None:
            return []
        stats = cache.stats()
        return [
            GaugeMetricFamily("vmctl_snapshot_cache_entries", "Snapshots kept for SCOPE_RANGES", value=stats.entries),
            GaugeMetricFamily(
                "vmctl_snapshot_cache_bytes",
                "Bytes the kept snapshots count (--snapshot-cache-bytes)",
                value=stats.bytes,
            ),
            CounterMetricFamily(
                "vmctl_snapshot_cache_hits", "SCOPE_RANGES calls that found their cookie's snapshot", value=stats.hits
            ),
            CounterMetricFamily(
                "vmctl_snapshot_cache_misses",
                "SCOPE_RANGES calls whose cookie's snapshot was not kept (the whole layout was checked)",
                value=stats.misses,
            ),
            CounterMetricFamily(
                "vmctl_snapshot_cache_evictions", "Snapshots dropped to stay within the bound", value=stats.evictions
            ),
        ]


_SNAPSHOT_CACHE = _SnapshotCacheCollector()
REGISTRY.register(_SNAPSHOT_CACHE)


def watch_snapshot_cache(cache: SnapshotCache) -> None:
    """Serve ``cache``'s series (the agent's one cache)."""
    _SNAPSHOT_CACHE.cache = cache


PATH = Gauge(
    "vmctl_agent_path",
    "1 for the path each component uses: native (the C extension, PAGEMAP_SCAN, PROCMAP_QUERY) or its fallback",
    ("component", "path"),
    registry=REGISTRY,
)
AGENT_INFO = Info("vmctl_agent", "The agent's version", registry=REGISTRY)

# The unix-socket gateway (see unixgate): its slots, and why connections end or are refused.
GATEWAY_CLOSE_REASONS = {
    "client_closed": "the client closed its end",
    "server_closed": "gRPC closed its end (an idle or broken connection, or the agent stopping)",
    "idle": "no byte either way for --connection-idle-timeout",
    "error": "a socket error on either end",
    "shutdown": "still open when the agent stopped",
}
GATEWAY_REFUSAL_REASONS = {
    "full": "every slot the peer may take is in use (the last --connections-reserved-for-root are root's)",
    "uid_limit": "the peer's uid holds --max-connections-per-uid",
}
GATEWAY_CONNECTIONS = Gauge(
    "vmctl_gateway_connections", "Unix-socket connections the gateway relays now", registry=REGISTRY
)
GATEWAY_CLOSED = _counter_by_word(
    "vmctl_gateway_connections_closed",
    "Relayed unix-socket connections ended, by reason",
    "reason",
    GATEWAY_CLOSE_REASONS,
)
GATEWAY_REFUSED = _counter_by_word(
    "vmctl_gateway_connections_refused",
    "Unix-socket connections closed unread at admission, by reason",
    "reason",
    GATEWAY_REFUSAL_REASONS,
)

AGENT_INFO.info({"version": __version__})


def describe_agent(
    *, native_tables: bool, native_advise_loop: bool, pagemap_scan: bool, procmap_query: bool, access_sampling: str
) -> None:
    """Record which paths this agent took at start (they do not change while it runs)."""
    paths = {
        "tables": "native" if native_tables else "python",
        "advise_loop": "native" if native_advise_loop else "python",
        "residency": "pagemap_scan" if pagemap_scan else "smaps",
        "build_id": "procmap_query" if procmap_query else "unavailable",
        "access_sampling": access_sampling or "unavailable",
    }
    PATH.clear()
    for component, path in paths.items():
        PATH.labels(component, path).set(1)


# ---- the HTTP listener ---------------------------------------------------------------
#
# Not prometheus_client's start_http_server: it gives every connection a thread
# and never times one out, so anyone who reaches the port could hold a
# thread per connection (1,000 idle connections were 1,000 threads) and file
# descriptors the gRPC listeners need. This one is a single thread with an
# asyncio loop of its own, whatever the agent's server does, and bounds what
# a connection may cost: a whole request within REQUEST_TIMEOUT seconds (so a
# byte a second is cut, not just silence), request line and headers within
# MAX_REQUEST_BYTES, the answer taken within WRITE_TIMEOUT, at most
# MAX_CONNECTIONS open. One request per connection (Connection: close), so
# nothing idles between requests.

log = logging.getLogger("vmctl.metrics")

MAX_CONNECTIONS = 32
REQUEST_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
MAX_REQUEST_BYTES = 8 << 10
METRICS_PATH = "/metrics"
ALLOWED_METHODS = ("GET", "HEAD")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}


class BadRequest(Exception):
    pass


def parse_request(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Method, path (without the query) and headers (lowercase names) of a request head."""
    try:
        lines = head.decode("ascii").split("\r\n")
    except UnicodeDecodeError:
        raise BadRequest("not ASCII") from None
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"not an HTTP/1 request line: {lines[0][:80]!r}")
    method, target, _version = parts
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(f"malformed header line: {line[:80]!r}")
        headers[name.lower()] = value.strip()
    return method, target.partition("?")[0], headers


def respond(method: str, path: str, headers: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body: the exposition for GET and HEAD of /metrics, else a refusal."""
    if path != METRICS_PATH:
        return 404, [("Content-Type", "text/plain; charset=utf-8")], b"only /metrics is served here\n"
    if method not in ALLOWED_METHODS:
        return 405, [("Allow", ", ".join(ALLOWED_METHODS)), ("Content-Type", "text/plain; charset=utf-8")], b""
    encoder, content_type = choose_encoder(headers.get("accept", ""))  # text 0.0.4, or OpenMetrics if asked
    return 200, [("Content-Type", content_type)], encoder(REGISTRY)


def _encode_response(status: int, headers: list[tuple[str, str]], body: bytes, *, send_body: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("ascii") + (body if send_body else b"")


def _listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; ``::`` also takes IPv4 where the host allows it, as before."""
    family, _type, _proto, _name, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    unspecified_v6 = family == socket.AF_INET6 and ipaddress.ip_address(address[0]).is_unspecified
    return socket.create_server(
        address, family=family, backlog=128, dualstack_ipv6=unspecified_v6 and socket.has_dualstack_ipv6()
    )


class MetricsServer:
    """``/metrics`` over HTTP on one thread; knows its ``server_port``, and ``shutdown()``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.write_timeout = write_timeout
        # Arrival order; True while the request is still being read (those may be evicted).
        self._open: OrderedDict[asyncio.StreamWriter, bool] = OrderedDict()
        sock = _listen_socket(host, port)
        self.server_port: int = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vmctl-metrics", daemon=True)
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._start(sock), self._loop)
        try:
            self._server = started.result(timeout=10)
        except BaseException:
            self._stop_loop()
            sock.close()
            raise

    async def _start(self, sock: socket.socket) -> asyncio.AbstractServer:
        return await asyncio.start_server(self._serve, sock=sock, limit=MAX_REQUEST_BYTES)

    def shutdown(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=5)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _close(self) -> None:
        self._server.close()
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    # -- one connection ------------------------------------------------------------

    def _make_room(self) -> bool:
        """Room for one more connection: the oldest one still sending its request
        is cut, so a flood of idle connections cannot keep a scraper out; False
        when every open connection is being answered."""
        if len(self._open) < self.max_connections:
            return True
        for writer, reading in self._open.items():
            if reading:
                del self._open[writer]
                writer.transport.abort()
                return True
        return False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._make_room():
            writer.transport.abort()
            return
        self._open[writer] = True
        try:
            reply = await self._answer(reader)
            if writer in self._open and reply:
                self._open[writer] = False
                # drain() returns only once everything is with the kernel: close() then has nothing to flush.
                writer.transport.set_write_buffer_limits(high=0)
                writer.write(reply)
                await asyncio.wait_for(writer.drain(), self.write_timeout)
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug("metrics connection cut: %r", exc)
        except Exception:
            log.exception("metrics request failed")
        finally:
            self._open.pop(writer, None)
            writer.transport.abort()  # whatever was answered is with the kernel already (see above)

    async def _answer(self, reader: asyncio.StreamReader) -> bytes | None:
        """The whole response to one request, or None to close without one."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.request_timeout)
        except asyncio.LimitOverrunError:
            return _encode_response(431, [], b"", send_body=False)
        try:
            method, path, headers = parse_request(head)
        except BadRequest as exc:
            log.debug("bad metrics request: %s", exc)
            return _encode_response(400, [], b"", send_body=False)
        status, reply_headers, body = respond(method, path, headers)
        return _encode_response(status, reply_headers, body, send_body=method != "HEAD")


def serve(host: str, port: int) -> MetricsServer:
    """Serve /metrics on a thread of its own; the returned server knows its port and shuts down."""
    return MetricsServer(host, port)

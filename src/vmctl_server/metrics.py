"""Prometheus metrics for the agent, served over HTTP by ``--metrics-listen``.

The series are recorded by :mod:`vmctl_server.observe` (one interceptor sees
every call) and by :func:`describe_agent` at start; this module only defines
them and serves them. They live in their own registry so the HTTP endpoint
shows the agent's series and the process's own (CPU, RSS, open fds), nothing
a library registered on the side.

=====================================  =============================================================
series                                 meaning
=====================================  =============================================================
vmctl_grpc_calls_total                 calls finished, by service, method and status code
vmctl_grpc_call_duration_seconds       latency histogram, same labels
vmctl_grpc_calls_in_flight             calls being served now, by service and method
vmctl_grpc_refusals_total              refused calls by method and ErrorInfo reason
vmctl_advice_requested_bytes_total     bytes named by successful, non-dry-run AdviseRanges, by advice
vmctl_advised_bytes_total              bytes the kernel reported advised, by advice
vmctl_process_madvise_calls_total      process_madvise system calls made, by advice
vmctl_cookie_checks_total              AdviseRanges calls by cookie outcome (audit.COOKIE_OUTCOMES)
vmctl_agent_path                       1 for the path each component uses (native C or the fallback)
vmctl_agent_info                       version
process_*, python_*                    the agent process (prometheus-client's collectors)
=====================================  =============================================================
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from vmctl_server import __version__
from vmctl_server.audit import COOKIE_OUTCOMES

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

_CALL_LABELS = ("service", "method", "code")
# From a sub-millisecond GetNodeInfo to a 65,530-VMA accounting read or a multi-GiB pageout.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CALLS = Counter("vmctl_grpc_calls", "gRPC calls finished", _CALL_LABELS, registry=REGISTRY)
LATENCY = Histogram(
    "vmctl_grpc_call_duration_seconds",
    "Time from the request to the response or refusal",
    _CALL_LABELS,
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge("vmctl_grpc_calls_in_flight", "gRPC calls being served", ("service", "method"), registry=REGISTRY)
REFUSALS = Counter(
    "vmctl_grpc_refusals", "Refused calls by google.rpc.ErrorInfo reason", ("method", "reason"), registry=REGISTRY
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

COOKIE_CHECKS = Counter(
    "vmctl_cookie_checks",
    "AdviseRanges calls read past their headers, by cookie outcome: "
    + "; ".join(f"{k}: {v}" for k, v in COOKIE_OUTCOMES.items()),
    ("outcome",),
    registry=REGISTRY,
)
for _outcome in COOKIE_OUTCOMES:
    COOKIE_CHECKS.labels(_outcome)  # present at 0 from the start, so rates and alerts see every outcome


def record_advice(
    cookie: str, advice: str, requested_bytes: int, advised_bytes: int, syscalls: int, *, applied: bool
) -> None:
    """One AdviseRanges call's outcome, in the audit log's words (``cookie`` is one of COOKIE_OUTCOMES)."""
    COOKIE_CHECKS.labels(cookie).inc()
    if applied:
        REQUESTED_BYTES.labels(advice).inc(requested_bytes)
        ADVISED_BYTES.labels(advice).inc(advised_bytes)
        MADVISE_CALLS.labels(advice).inc(syscalls)


PATH = Gauge(
    "vmctl_agent_path",
    "1 for the path each component uses: native (the C extension, PAGEMAP_SCAN, PROCMAP_QUERY) or its fallback",
    ("component", "path"),
    registry=REGISTRY,
)
AGENT_INFO = Info("vmctl_agent", "The agent's version", registry=REGISTRY)
AGENT_INFO.info({"version": __version__})


def describe_agent(*, native_tables: bool, native_advise_loop: bool, pagemap_scan: bool, procmap_query: bool) -> None:
    """Record which paths this agent took at start (they do not change while it runs)."""
    paths = {
        "tables": "native" if native_tables else "python",
        "advise_loop": "native" if native_advise_loop else "python",
        "residency": "pagemap_scan" if pagemap_scan else "smaps",
        "build_id": "procmap_query" if procmap_query else "unavailable",
    }
    PATH.clear()
    for component, path in paths.items():
        PATH.labels(component, path).set(1)


def serve(host: str, port: int) -> WSGIServer:
    """Serve /metrics on a daemon thread; the returned server knows its port and shuts down."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return server

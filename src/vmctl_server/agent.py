"""vmctl-agent: the entry point that wires the core to a gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from vmctl_client.proto import vmctl_pb2 as pb
from vmctl_server import __version__, capabilities, guard, heap, logs, metrics, operations
from vmctl_server.advice import DEFAULT_MAX_RANGES, Advisor, RangeBackend
from vmctl_server.cookie import CookieSigner
from vmctl_server.guard import Guard
from vmctl_server.observe import ObservingInterceptor, SideCallCaps
from vmctl_server.pyranges import PyRanges
from vmctl_server.service import DEFAULT_REQUEST_TIMEOUT, SERVICE_NAME, Pipeline, VmControlService, caller_of
from vmctl_server.snapshot import SnapshotReader, SourceSupport, table_backend
from vmctl_server.unixgate import UnixGateway

log = logging.getLogger("vmctl.agent")
DEFAULT_LISTEN = "unix:///run/vmctl/agent.sock"
# The most wire bytes one AddressRange can take (two 10-byte varints, their
# tags, the field's tag and length): the default message limit lets every
# request within --max-ranges through and nothing much larger.
MAX_RANGE_WIRE_BYTES = 26
MESSAGE_SLACK_BYTES = 64 << 10
MAX_SIDE_CALLS_PER_IDENTITY = 16  # health and reflection calls one identity may hold open at once
HANDSHAKE_TIMEOUT_MS = 10_000  # a TCP peer that does not finish TLS in time is dropped
TCP_IDLE_MS = 300_000  # TCP connections with no call for 5 minutes are closed (clients reconnect)
FOLD_FLUSH_SECONDS = 5.0


@dataclass(frozen=True)
class ListenAddress:
    text: str  # as given
    grpc_target: str  # as grpc.Server.add_*_port wants it
    unix_path: str | None


def parse_listen(text: str) -> ListenAddress:
    if text.startswith("unix://"):
        path = text[len("unix://") :]
        if not path.startswith("/"):
            raise argparse.ArgumentTypeError(f"{text}: a unix socket needs an absolute path (unix:///run/x.sock)")
        return ListenAddress(text, f"unix://{path}", path)
    if text.startswith("tcp://"):
        host_port = text[len("tcp://") :]
        host, sep, port = host_port.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"{text}: expected tcp://HOST:PORT")
        return ListenAddress(text, host_port, None)
    raise argparse.ArgumentTypeError(f"{text}: expected unix:///PATH or tcp://HOST:PORT")


def _host_port(text: str) -> tuple[str, int]:
    try:
        return operations.parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmctl-agent",
        description="Node agent: serves vmctl.v1.VmControl (GetVmaInfo, AdviseRanges, ListProcesses, GetNodeInfo)"
        " plus gRPC health and reflection. Needs root, or CAP_SYS_PTRACE and CAP_SYS_NICE.",
    )
    parser.add_argument(
        "--listen",
        action="append",
        type=parse_listen,
        metavar="ADDR",
        help=f"unix:///PATH or tcp://HOST:PORT; repeat for several (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--cookie-key-file",
        metavar="PATH",
        help="HMAC key for cookies; created (mode 0600) if absent. Keeps cookies valid across restarts"
        " (default: a random key per run)",
    )
    parser.add_argument("--tls-cert", metavar="PEM", help="server certificate for tcp:// listeners")
    parser.add_argument("--tls-key", metavar="PEM", help="server private key for tcp:// listeners")
    parser.add_argument("--client-ca", metavar="PEM", help="CA that signs client certificates (mutual TLS)")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow tcp:// without TLS (anyone who reaches the port can advise any process)",
    )
    parser.add_argument("--no-native", action="store_true", help="use the pure-Python parsers and loops")
    parser.add_argument(
        "--workers",
        type=int,
        default=8,
        help="threads doing VmControl calls' work (default 8); admission, health and reflection run on the"
        " event loop and never wait for one",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT,
        metavar="SECONDS",
        help="time an admitted call has to send its whole request (default %(default)g)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        help="largest request accepted; larger ones get RESOURCE_EXHAUSTED unread"
        f" (default: what --max-ranges ranges need, {MAX_RANGE_WIRE_BYTES} bytes each, plus 64 KiB)",
    )
    parser.add_argument(
        "--max-ranges",
        type=int,
        default=DEFAULT_MAX_RANGES,
        help=f"ranges per AdviseRanges (default {DEFAULT_MAX_RANGES})",
    )
    parser.add_argument("--shutdown-grace", type=float, default=10.0, help="seconds in-flight calls get on SIGTERM")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-format", default=logs.DEFAULT_FORMAT, choices=logs.FORMATS, help="one line per record (default text)"
    )
    parser.add_argument(
        "--metrics-listen",
        type=_host_port,
        metavar="HOST:PORT",
        help="serve Prometheus metrics over plain HTTP at http://HOST:PORT/metrics (default: off)",
    )
    parser.add_argument(
        "--health-listen",
        type=_host_port,
        metavar="HOST:PORT",
        help="plaintext gRPC serving only grpc.health.v1.Health, for kubelet grpc probes (default: off)",
    )
    guard.add_arguments(parser)
    parser.add_argument("--version", action="version", version=f"vmctl-agent {__version__}")
    return parser


def _claim_unix_path(path: str) -> None:
    """Create the socket's directory, and refuse to steal a live agent's socket.

    gRPC unlinks whatever is at the path before binding, which would silently
    orphan a running agent; a stale socket (nobody accepting) is fine to replace.
    """
    os.makedirs(os.path.dirname(path) or "/", mode=0o755, exist_ok=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SystemExit(f"vmctl-agent: {path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale: left by an agent that did not shut down
    else:
        raise SystemExit(f"vmctl-agent: another agent is already serving {path}")
    finally:
        probe.close()


def _server_credentials(args: argparse.Namespace) -> grpc.ServerCredentials:
    with open(args.tls_key, "rb") as f:
        key = f.read()
    with open(args.tls_cert, "rb") as f:
        cert = f.read()
    client_ca = None
    if args.client_ca:
        with open(args.client_ca, "rb") as f:
            client_ca = f.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=bool(client_ca))


def _check_tls_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.client_ca and not args.tls_cert:
        parser.error("--client-ca needs --tls-cert and --tls-key")
    has_tcp = any(a.unix_path is None for a in args.listen)
    if has_tcp and not args.client_ca and not args.insecure:
        parser.error(
            "tcp:// listeners need mutual TLS: --tls-cert, --tls-key and --client-ca"
            " (or --insecure, for a trusted test network only)"
        )


def _select_backend(no_native: bool) -> tuple[object, RangeBackend]:
    """The VMA tables and the per-range advice work: in C, or pure Python."""
    if not no_native:
        try:
            from vmctl_server.nativeranges import NativeRanges

            return table_backend(native=True), NativeRanges
        except ImportError as exc:
            log.warning("native extension unavailable, using the pure-Python paths: %s", exc)
    return table_backend(native=False), PyRanges


@dataclass
class Parts:
    """What the agent is made of before its servers exist (they need the event loop)."""

    service: VmControlService
    guard: Guard
    gateway: UnixGateway | None  # in front of the unix listeners
    trimmer: heap.HeapTrimmer  # gives back what large calls freed (see heap)
    max_message_bytes: int


def build_parts(args: argparse.Namespace) -> Parts:
    security = guard.from_args(args)
    signer = (
        CookieSigner.from_key_file(args.cookie_key_file) if args.cookie_key_file else CookieSigner.with_random_key()
    )
    caps = capabilities.probe()
    if not caps.advice_permitted:
        log.warning("remote advice will fail: %s", "; ".join(f"{k}: {v}" for k, v in caps.probe_errors.items()))
    backend, ranges = _select_backend(args.no_native)
    metrics.describe_agent(
        native_tables=backend.native,  # type: ignore[attr-defined]
        native_advise_loop=ranges.native,
        pagemap_scan=caps.pagemap_scan,
        procmap_query=caps.procmap_query,
    )
    reader = SnapshotReader(backend, SourceSupport(pagemap_scan=caps.pagemap_scan, procmap_query=caps.procmap_query))
    advisor = Advisor(signer, reader, ranges, caps.advices, max_ranges=args.max_ranges)
    trimmer = heap.HeapTrimmer()
    workers = futures.ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="vmctl-rpc")
    pipeline = Pipeline(workers, request_timeout=args.request_timeout, activity=trimmer)
    service = VmControlService(reader, advisor, signer, caps, security, pipeline)
    gateway = None
    unix_paths = [a.unix_path for a in args.listen if a.unix_path is not None]
    if unix_paths:
        for path in unix_paths:
            _claim_unix_path(path)
        # Unix peers reach gRPC only through the gateway, which names them by
        # SO_PEERCRED (see unixgate); gRPC itself listens on a private socket.
        gateway = UnixGateway.beside(
            unix_paths[0],
            max_connections=args.max_connections,
            max_connections_per_uid=args.max_connections_per_uid,
            reserved_for_root=args.connections_reserved_for_root,
            idle_timeout=args.connection_idle_timeout,
        )
    max_message_bytes = args.max_message_bytes or args.max_ranges * MAX_RANGE_WIRE_BYTES + MESSAGE_SLACK_BYTES
    return Parts(service, security, gateway, trimmer, max_message_bytes)


def _server(
    parts: Parts, health_servicer: health_aio.HealthServicer, request_timeout: float, *extra: tuple[str, int]
) -> grpc.aio.Server:
    """A server with VmControl, health and reflection. Each listener kind has
    its own, so a flood of TCP connections cannot take the unix callers' room."""
    side_calls = SideCallCaps(MAX_SIDE_CALLS_PER_IDENTITY, lambda context: caller_of(context).identity)
    server = grpc.aio.server(
        # First: it also sees calls inner layers refuse.
        interceptors=[ObservingInterceptor(request_timeout, side_calls)],
        options=[
            ("grpc.max_receive_message_length", parts.max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a second agent on the same port must fail, not share it
            *extra,
        ],
    )
    server.add_generic_rpc_handlers((parts.service.handler(),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["VmControl"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME),
        server,
    )
    return server


def _add_tcp_ports(server: grpc.aio.Server, args: argparse.Namespace) -> None:
    for address in args.listen:
        if address.unix_path is not None:
            continue
        try:
            if args.tls_cert:
                server.add_secure_port(address.grpc_target, _server_credentials(args))
            else:
                log.warning("SERVING PLAINTEXT on %s (--insecure): no authentication, no encryption", address.text)
                server.add_insecure_port(address.grpc_target)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address.text}: {exc}") from exc


class Agent:
    """The running agent: its servers on this thread's event loop, and how it stops."""

    def __init__(self, args: argparse.Namespace, parts: Parts) -> None:
        self.args = args
        self.parts = parts
        self.health = health_aio.HealthServicer()
        self.servers: list[grpc.aio.Server] = []
        self.stop_listeners: list[Callable[[], Awaitable[object]]] = []
        self.stopping = asyncio.Event()

    async def start(self) -> None:
        args, parts = self.args, self.parts
        timeout = args.request_timeout
        if parts.gateway is not None:
            unix_server = _server(parts, self.health, timeout)
            unix_server.add_insecure_port(f"unix://{parts.gateway.upstream}")
            self.servers.append(unix_server)
        if any(a.unix_path is None for a in args.listen):
            tcp_server = _server(
                parts,
                self.health,
                timeout,
                ("grpc.max_allowed_incoming_connections", args.max_connections),
                ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
                ("grpc.max_connection_idle_ms", TCP_IDLE_MS),
            )
            _add_tcp_ports(tcp_server, args)
            self.servers.append(tcp_server)
        self.stop_listeners = await operations.start_listeners(
            args.health_listen, args.metrics_listen, self.health, timeout
        )
        for server in self.servers:
            await server.start()
        policy = parts.guard.policies.current
        started = {"event": "agent_started", "version": __version__, "policy": policy.source}
        if not parts.guard.audit.write(started, f"vmctl-agent {__version__} started"):
            raise OSError(f"cannot write the audit log {parts.guard.audit.path}")
        if parts.gateway is not None:
            for address in args.listen:
                if address.unix_path is not None:
                    parts.gateway.listen(address.unix_path, args.socket_mode)
        for name in (SERVICE_NAME, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        parts.trimmer.start()  # its baseline: the RSS now, idle

    def watch_signals(self) -> None:
        """SIGTERM and SIGINT stop, SIGHUP reloads the policy. The loop hears a
        signal whichever thread the kernel delivered it to (the wakeup fd)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.parts.guard.policies.reload)

    async def fold_refusals(self) -> None:
        """Write the counts of folded refusals as their windows end."""
        while True:
            await asyncio.sleep(FOLD_FLUSH_SECONDS)
            self.parts.guard.refusals.flush()

    async def abandon(self) -> None:
        """Undo a start that failed half way: nothing was served."""
        await asyncio.gather(*(server.stop(None) for server in self.servers))
        if self.parts.gateway is not None:
            self.parts.gateway.close(drain_seconds=0)
        for stop_listener in self.stop_listeners:
            await stop_listener()

    async def stop(self) -> None:
        """Drain: NOT_SERVING, no new connections, calls in flight finish, then the sockets go."""
        grace = self.args.shutdown_grace
        log.info("shutting down: letting in-flight calls finish (up to %.0fs)", grace)
        deadline = time.monotonic() + grace
        parts = self.parts
        loop = asyncio.get_running_loop()
        await self.health.enter_graceful_shutdown()
        if parts.gateway is not None:
            parts.gateway.stop_accepting()  # new connections are refused; open ones finish their calls
        # Calls already admitted finish; later ones get UNAVAILABLE AGENT_STOPPING,
        # an answer that says nothing was done (gRPC's own stop would cancel them).
        if not await loop.run_in_executor(None, parts.guard.drain, grace):
            log.warning("calls still running after %.0fs: cancelling them", grace)
        await asyncio.gather(*(server.stop(max(0.0, deadline - time.monotonic())) for server in self.servers))
        parts.trimmer.stop()
        if parts.gateway is not None:
            await loop.run_in_executor(None, parts.gateway.close)
        for stop_listener in self.stop_listeners:
            await stop_listener()
        parts.guard.refusals.flush(everything=True)
        parts.guard.audit.write({"event": "agent_stopped"}, "vmctl-agent stopped")
        log.info("stopped")


async def serve(args: argparse.Namespace, parts: Parts) -> int:
    agent = Agent(args, parts)
    agent.watch_signals()
    try:
        await agent.start()
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"vmctl-agent: {exc}", file=sys.stderr)
        await agent.abandon()
        return 1
    log.info("vmctl-agent %s serving on %s", __version__, ", ".join(a.text for a in args.listen))
    folding = asyncio.create_task(agent.fold_refusals())
    await agent.stopping.wait()
    folding.cancel()
    await agent.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.listen = args.listen or [parse_listen(DEFAULT_LISTEN)]
    _check_tls_args(parser, args)
    logs.configure(args.log_level, args.log_format)
    # Before any thread exists: a thread keeps the arena it first got.
    heap.limit_arenas()
    # SIGHUP's default action kills; until the reload handler is installed it
    # is ignored, which loses nothing: the policy is read after this point.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        parts = build_parts(args)
    except (OSError, ValueError) as exc:
        print(f"vmctl-agent: {exc}", file=sys.stderr)
        return 1
    return asyncio.run(serve(args, parts))


if __name__ == "__main__":
    sys.exit(main())

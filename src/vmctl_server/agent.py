"""vmctl-agent: the entry point that wires the core to a gRPC server."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vmctl_client.proto import vmctl_pb2 as pb
from vmctl_server import __version__, capabilities, guard, heap, logs, metrics, operations, safefiles
from vmctl_server.advice import DEFAULT_MAX_RANGES, Advisor, RangeBackend
from vmctl_server.cookie import CookieSigner
from vmctl_server.guard import Guard
from vmctl_server.observe import ObservingInterceptor
from vmctl_server.pyranges import PyRanges
from vmctl_server.service import SERVICE_NAME, VmControlService, rpc_handler
from vmctl_server.snapshot import SnapshotReader, SourceSupport, table_backend
from vmctl_server.unixgate import UnixGateway

log = logging.getLogger("vmctl.agent")
DEFAULT_LISTEN = "unix:///run/vmctl/agent.sock"
# The most wire bytes one AddressRange can take (two 10-byte varints, their
# tags, the field's tag and length): the default message limit lets every
# request within --max-ranges through and nothing much larger.
MAX_RANGE_WIRE_BYTES = 26
MESSAGE_SLACK_BYTES = 64 << 10
HEALTH_WORKERS = 4  # health and reflection: never shared with VmControl calls


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
        help="VmControl calls served at once (default 8); health and reflection have threads of their own",
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
    safefiles.prepare_socket_directory(path)  # a safe directory; refuses links and other users' files at path
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
class Agent:
    server: grpc.Server
    health: health.HealthServicer
    guard: Guard
    gateway: UnixGateway | None  # in front of the unix listeners
    trimmer: heap.HeapTrimmer  # gives back what large calls freed (see heap)


def build_server(args: argparse.Namespace) -> Agent:
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
    service = VmControlService(reader, advisor, signer, caps, security)

    max_message_bytes = args.max_message_bytes or args.max_ranges * MAX_RANGE_WIRE_BYTES + MESSAGE_SLACK_BYTES
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=HEALTH_WORKERS, thread_name_prefix="vmctl-health"),
        interceptors=[ObservingInterceptor()],  # first: it also sees calls inner layers refuse
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a second agent on the same port must fail, not share it
        ],
    )
    workers = futures.ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="vmctl-rpc")
    trimmer = heap.HeapTrimmer()
    server.add_generic_rpc_handlers((rpc_handler(service, workers, trimmer),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["VmControl"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME),
        server,
    )
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
        )
        server.add_insecure_port(f"unix://{gateway.upstream}")
    for address in args.listen:
        try:
            if address.unix_path is not None:
                continue  # served by the gateway once the server runs
            if args.tls_cert:
                server.add_secure_port(address.grpc_target, _server_credentials(args))
            else:
                log.warning("SERVING PLAINTEXT on %s (--insecure): no authentication, no encryption", address.text)
                server.add_insecure_port(address.grpc_target)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address.text}: {exc}") from exc
    return Agent(server, health_servicer, security, gateway, trimmer)


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
        agent = build_server(args)
        server, health_servicer = agent.server, agent.health
        stop_listeners = operations.start_listeners(args.health_listen, args.metrics_listen, health_servicer)
    except (OSError, ValueError) as exc:
        print(f"vmctl-agent: {exc}", file=sys.stderr)
        return 1

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: agent.guard.policies.reload())
    policy = agent.guard.policies.current
    started = {"event": "agent_started", "version": __version__, "policy": policy.source}
    if not agent.guard.audit.write(started, f"vmctl-agent {__version__} started"):
        print(f"vmctl-agent: cannot write the audit log {agent.guard.audit.path}", file=sys.stderr)
        return 1

    server.start()
    if agent.gateway is not None:
        for address in args.listen:
            if address.unix_path is not None:
                agent.gateway.listen(address.unix_path, args.socket_mode)
    for name in (SERVICE_NAME, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    agent.trimmer.start()  # its baseline: the RSS now, idle
    log.info("vmctl-agent %s serving on %s", __version__, ", ".join(a.text for a in args.listen))

    stop.wait()
    log.info("shutting down: letting in-flight calls finish (up to %.0fs)", args.shutdown_grace)
    deadline = time.monotonic() + args.shutdown_grace
    health_servicer.enter_graceful_shutdown()
    if agent.gateway is not None:
        agent.gateway.stop_accepting()  # new connections are refused; open ones finish their calls
    # Calls already admitted finish; later ones get UNAVAILABLE AGENT_STOPPING,
    # an answer that says nothing was done (gRPC's own stop would cancel them).
    if not agent.guard.drain(args.shutdown_grace):
        log.warning("calls still running after %.0fs: cancelling them", args.shutdown_grace)
    server.stop(max(0.0, deadline - time.monotonic())).wait()
    agent.trimmer.stop()
    if agent.gateway is not None:
        agent.gateway.close()
    for stop_listener in stop_listeners:
        stop_listener()
    agent.guard.audit.write({"event": "agent_stopped"}, "vmctl-agent stopped")
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

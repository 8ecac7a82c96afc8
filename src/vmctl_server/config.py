"""The agent's command line: every flag, the address syntax, the checks made before anything starts."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from vmctl_api.addresses import AddressError, join_host_port, split_host_port
from vmctl_server import __version__
from vmctl_server.access.admission import DEFAULT_MAX_CALLS
from vmctl_server.access.audit import STDOUT
from vmctl_server.core.advice import DEFAULT_MAX_RANGES
from vmctl_server.core.snapshot_cache import BYTES_PER_VMA, DEFAULT_CACHE_BYTES
from vmctl_server.runtime import logs
from vmctl_server.transport.service import DEFAULT_REQUEST_TIMEOUT
from vmctl_server.transport.unixgate import DEFAULT_IDLE_TIMEOUT

DEFAULT_LISTEN = "unix:///run/vmctl/agent.sock"
# The most wire bytes one AddressRange can take (two 10-byte varints, their
# tags, the field's tag and length): the default message limit lets every
# request within --max-ranges through and nothing much larger.
MAX_RANGE_WIRE_BYTES = 26
MESSAGE_SLACK_BYTES = 64 << 10


LISTEN_FORMS = "unix:///PATH (or /PATH), HOST:PORT or tcp://HOST:PORT"
TCP_FORMS = "HOST:PORT or tcp://HOST:PORT"


@dataclass(frozen=True)
class ListenAddress:
    text: str  # as given
    grpc_target: str  # as grpc.Server.add_*_port wants it
    unix_path: str | None


def parse_listen(text: str) -> ListenAddress:
    """--listen: a unix socket by its absolute path, or a TCP address as the other listeners take it."""
    if text.startswith(("unix:", "/")):
        path = text.removeprefix("unix://") if text.startswith("unix://") else text.removeprefix("unix:")
        if not path.startswith("/"):
            raise argparse.ArgumentTypeError(f"{text}: a unix socket needs an absolute path (unix:///run/x.sock)")
        return ListenAddress(text, f"unix://{path}", path)
    scheme, sep, _ = text.partition("://")
    if sep and scheme != "tcp":
        raise argparse.ArgumentTypeError(f"{text}: expected {LISTEN_FORMS}")
    return ListenAddress(text, join_host_port(*_tcp_address(text)), None)


def _tcp_address(text: str) -> tuple[str, int]:
    """--health-listen and --metrics-listen, and --listen's TCP form: (HOST, PORT), checked here rather
    than failing inside gRPC. ``[::]:9464`` for IPv6; port 0 picks a free one."""
    if text.startswith(("unix:", "/")):
        raise argparse.ArgumentTypeError(f"{text}: this listener is TCP only ({TCP_FORMS})")
    host_port = text.removeprefix("tcp://")
    try:
        return split_host_port(host_port, lowest_port=0)
    except AddressError as exc:
        every = f" (every address: 0.0.0.0{host_port} or [::]{host_port})" if host_port.startswith(":") else ""
        raise argparse.ArgumentTypeError(f"{exc}{every}; expected {TCP_FORMS}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmctl-agent",
        description="Node agent: serves vmctl.v1.VmControl (GetVmaInfo, AdviseRanges, ListProcesses, GetNodeInfo)"
        " plus gRPC health and reflection. Needs root, or CAP_SYS_PTRACE, CAP_SYS_NICE and CAP_DAC_READ_SEARCH"
        " (SECURITY.md says why each).",
    )
    parser.add_argument(
        "--listen",
        action="append",
        type=parse_listen,
        metavar="ADDR",
        help=f"{LISTEN_FORMS}; repeat for several (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--cookie-key-file",
        metavar="PATH",
        help="HMAC key for cookies; created (mode 0600) if absent. Keeps cookies valid across restarts"
        " (default: a random key per run)",
    )
    _add_tls_arguments(parser)
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow tcp listeners without TLS: plaintext callers are 'anonymous', refused UNAUTHENTICATED unless a"
        " policy rule names anonymous (for a trusted test network only)",
    )
    parser.add_argument(
        "--no-native",
        action="store_true",
        help="use the pure-Python parsers and loops (without it the agent refuses to start when its C extension"
        " is not built)",
    )
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
    parser.add_argument(
        "--snapshot-cache-bytes",
        type=_size,
        default=DEFAULT_CACHE_BYTES,
        metavar="BYTES",
        help="memory for the layouts of recent snapshots, which AdviseRanges with SCOPE_RANGES checks ranges"
        f" against ({BYTES_PER_VMA} bytes per VMA; least recently used out first; 64M, 1G, ...; 0: off, every"
        f" call checks the whole layout) (default {DEFAULT_CACHE_BYTES >> 20}M)",
    )
    parser.add_argument("--shutdown-grace", type=float, default=10.0, help="seconds in-flight calls get on SIGTERM")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-format", default=logs.DEFAULT_FORMAT, choices=logs.FORMATS, help="one line per record (default text)"
    )
    parser.add_argument(
        "--metrics-listen",
        type=_tcp_address,
        metavar="ADDR",
        help=f"{TCP_FORMS}: serve Prometheus metrics over plain HTTP at http://HOST:PORT/metrics (default: off)",
    )
    parser.add_argument(
        "--health-listen",
        type=_tcp_address,
        metavar="ADDR",
        help=f"{TCP_FORMS}: plaintext gRPC serving only grpc.health.v1.Health, for kubelet grpc probes (default: off)",
    )
    _add_access_arguments(parser)
    parser.add_argument("--version", action="version", version=f"vmctl-agent {__version__}")
    return parser


def _add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """The names `vmctl` uses too; --client-ca is the old name of --tls-ca, kept."""
    tls = parser.add_argument_group("TLS for tcp listeners (mutual: all three; `vmctl` takes the same names)")
    tls.add_argument("--tls-cert", metavar="PEM", help="the agent's certificate")
    tls.add_argument("--tls-key", metavar="PEM", help="the agent's private key")
    tls.add_argument(
        "--tls-ca",
        "--client-ca",
        dest="client_ca",
        metavar="PEM",
        help="CA that signs the clients' certificates (--client-ca: its old name)",
    )


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _size(text: str) -> int:
    """Bytes, or with K, M or G (binary): 65536, 64M."""
    number, unit = text.strip().upper().removesuffix("IB").removesuffix("B"), ""
    if number[-1:] in _UNITS:
        number, unit = number[:-1], number[-1]
    try:
        value = int(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: expected bytes, or a number with K, M or G (64M)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: a size is 0 or more")
    return value


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: expected an octal mode such as 0600 or 0666") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text}: a socket mode is at most 0777")
    return mode


def _add_access_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("authentication, authorization, limits, audit (see SECURITY.md)")
    group.add_argument(
        "--policy",
        metavar="PATH",
        help="YAML policy: who may read or advise which processes; reloaded on SIGHUP"
        " (default: only root on the unix socket, for everything)",
    )
    group.add_argument(
        "--audit-log",
        metavar="PATH",
        default=STDOUT,
        help="append one JSON line per AdviseRanges here, allowed or refused (default: standard output)",
    )
    group.add_argument(
        "--socket-mode",
        type=_octal_mode,
        default=0o600,
        metavar="MODE",
        help="mode of unix sockets (default 0600: root only; 0666 lets every local user reach the policy)",
    )
    group.add_argument(
        "--max-calls",
        type=int,
        default=DEFAULT_MAX_CALLS,
        metavar="N",
        help="VmControl calls admitted at once, all callers together: running, or waiting for a worker or for"
        f" their request (default {DEFAULT_MAX_CALLS})",
    )
    group.add_argument(
        "--max-calls-per-identity",
        type=int,
        default=0,
        metavar="N",
        help="VmControl calls one identity may have in flight (default 0: up to --max-calls)",
    )
    group.add_argument(
        "--rate-per-identity",
        type=float,
        default=0.0,
        metavar="CALLS_PER_S",
        help="token-bucket rate of VmControl calls per identity (default 0: unlimited)",
    )
    group.add_argument(
        "--burst-per-identity",
        type=int,
        default=0,
        metavar="N",
        help="calls an identity may make at once before the rate applies (default: twice the rate, at least 1)",
    )
    group.add_argument(
        "--max-connections", type=int, default=256, metavar="N", help="unix-socket connections open (default 256)"
    )
    group.add_argument(
        "--max-connections-per-uid",
        type=int,
        default=64,
        metavar="N",
        help="unix-socket connections one uid may hold open (default 64)",
    )
    group.add_argument(
        "--connections-reserved-for-root",
        type=int,
        metavar="N",
        help="the last N of --max-connections are for uid 0 only, so other users together can never"
        " lock root out (default: a sixteenth, at least 1)",
    )
    group.add_argument(
        "--connection-idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a unix-socket connection after this long with no byte either way (gRPC clients"
        " reconnect on their next call); keep it above the longest call clients wait for"
        f" (default {DEFAULT_IDLE_TIMEOUT:.0f})",
    )


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.client_ca and not args.tls_cert:
        parser.error("--tls-ca (--client-ca) needs --tls-cert and --tls-key")
    has_tcp = any(a.unix_path is None for a in args.listen)
    if has_tcp and not args.client_ca and not args.insecure:
        parser.error(
            "tcp listeners need mutual TLS: --tls-cert, --tls-key and --tls-ca (or its old name --client-ca);"
            " or --insecure, for a trusted test network only"
        )


def max_message_bytes(args: argparse.Namespace) -> int:
    return int(args.max_message_bytes or args.max_ranges * MAX_RANGE_WIRE_BYTES + MESSAGE_SLACK_BYTES)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked; a usage error exits 2 as argparse does."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.listen = args.listen or [parse_listen(DEFAULT_LISTEN)]
    check_args(parser, args)
    return args

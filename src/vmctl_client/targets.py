"""Where agents are: what a target may be, target lists, target files, and
DNS names expanded to every address behind them.

A target is one of (and nothing else, so a typo is an error, never a dial to
somewhere unintended):

- ``unix:///PATH`` (gRPC's spelling, also ``unix:/PATH``) or a socket path
  itself: ``/PATH``, ``./PATH``, ``../PATH``;
- ``HOST:PORT`` or ``tcp://HOST:PORT``: a port is required (agents have no
  default TCP port), an IPv6 address goes in brackets (``[::1]:50051``);
- ``dns:///NAME:PORT``, every address NAME resolves to.

A DNS target is ``dns:///NAME:PORT`` (gRPC's own spelling; ``dns:NAME:PORT``
too). gRPC itself would resolve such a name to one channel that balances
calls over the addresses; a fleet wants the opposite, every address as its
own host. That is the Kubernetes headless-Service pattern: a Service with
``clusterIP: None`` in front of the agent DaemonSet resolves to one A/AAAA
record per node's agent pod.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable

from vmctl_api.addresses import AddressError, check_host_name, join_host_port, split_host_port

TARGET_FORMS = "unix:///PATH, /PATH, HOST:PORT, tcp://HOST:PORT or dns:///NAME:PORT"
_PATH_STARTS = ("/", "./", "../")


class TargetError(ValueError):
    """A target that names no agent; the message says why, in one line."""


def grpc_address(target: str) -> str:
    """What gRPC dials for ``target``: ``unix:///ABSOLUTE`` for a socket,
    ``HOST:PORT`` for TCP, ``dns:///NAME:PORT`` as it is; :class:`TargetError`
    for anything else."""
    text = target.strip()
    if text != target or not text:
        raise TargetError(f"{target!r} is not a target: expected {TARGET_FORMS}")
    if text.startswith(_PATH_STARTS):
        return canonical(text)
    if text.startswith("unix:"):
        return _unix_address(text)
    if text.startswith("dns:"):
        parse_dns_target(text)
        return text
    scheme, sep, rest = text.partition("://")
    if sep and scheme != "tcp":
        raise TargetError(f"{target!r}: unsupported scheme {scheme}://; expected {TARGET_FORMS}")
    try:
        return join_host_port(*split_host_port(rest if sep else text))
    except AddressError as exc:
        # Not even HOST:PORT in shape: say what a target may be.
        raise TargetError(f"{exc}; a target is {TARGET_FORMS}" if ":" not in text else str(exc)) from None


def canonical(target: str) -> str:
    """``target`` as results and messages name it: a socket path as ``unix:///ABSOLUTE``
    (so an error about it can say how to start an agent there), anything else as given."""
    return f"unix://{os.path.abspath(target)}" if target.startswith(_PATH_STARTS) else target


def is_tcp(target: str) -> bool:
    """Whether ``target`` is reached over TCP (and so needs TLS, or plaintext on purpose)."""
    return not grpc_address(target).startswith("unix:")


def _unix_address(text: str) -> str:
    path = text[len("unix://") :] if text.startswith("unix://") else text[len("unix:") :]
    if not path.startswith("/"):
        raise TargetError(
            f"{text!r}: a unix socket is named by its absolute path, unix:///{path} (or ./{path} from here)"
        )
    if path == "/" or path.endswith("/"):
        raise TargetError(f"{text!r}: names a directory, not a socket")
    return f"unix://{path}"


def split_targets(items: Iterable[str]) -> list[str]:
    """Targets from repeated and comma-separated values."""
    return [t.strip() for item in items for t in item.split(",") if t.strip()]


def read_targets_file(path: str) -> list[str]:
    """One target per line (commas allowed); ``#`` starts a comment."""
    with open(path) as f:
        return split_targets(line.split("#", 1)[0] for line in f)


def parse_dns_target(target: str) -> tuple[str, str]:
    """(NAME, PORT) of ``dns:///NAME:PORT``; :class:`TargetError` (a ValueError) for anything else."""
    rest = target[len("dns:") :]
    if rest.startswith("//"):  # dns://AUTHORITY/NAME:PORT; only the system resolver is used
        rest = rest[2:].split("/", 1)[1] if "/" in rest[2:] else ""
    name, sep, port = rest.rpartition(":")
    if not sep or not name or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise TargetError(f"{target!r}: expected dns:///NAME:PORT")
    name = name.strip("[]")
    if ":" not in name:  # an IPv6 literal needs no name check
        try:
            check_host_name(name, target)
        except AddressError as exc:
            raise TargetError(str(exc)) from None
    return name, port


def expand_dns(target: str) -> list[str]:
    """``dns:///NAME:PORT`` as ``ADDRESS:PORT`` for every address NAME has, in
    the resolver's order. A name that does not resolve stays as it is: the
    call to it then fails on its own, as that one host's error."""
    name, port = parse_dns_target(target)
    try:
        infos = socket.getaddrinfo(name, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror:
        return [target]
    addresses: list[str] = []
    for family, _, _, _, sockaddr in infos:
        host = str(sockaddr[0])
        address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if address not in addresses:
            addresses.append(address)
    return addresses


def expand_targets(items: Iterable[str]) -> list[str]:
    """Split, expand DNS names, and drop repeats (first one wins)."""
    expanded: list[str] = []
    for target in split_targets(items):
        for address in expand_dns(target) if target.startswith("dns:") else [target]:
            if address not in expanded:
                expanded.append(address)
    return expanded

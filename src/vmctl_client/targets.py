"""Where a fleet's agents are: target lists, target files, and DNS names
expanded to every address behind them.

A DNS target is ``dns:///NAME:PORT`` (gRPC's own spelling; ``dns:NAME:PORT``
too). gRPC itself would resolve such a name to one channel that balances
calls over the addresses; a fleet wants the opposite, every address as its
own host. That is the Kubernetes headless-Service pattern: a Service with
``clusterIP: None`` in front of the agent DaemonSet resolves to one A/AAAA
record per node's agent pod.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable


def split_targets(items: Iterable[str]) -> list[str]:
    """Targets from repeated and comma-separated values."""
    return [t.strip() for item in items for t in item.split(",") if t.strip()]


def read_targets_file(path: str) -> list[str]:
    """One target per line (commas allowed); ``#`` starts a comment."""
    with open(path) as f:
        return split_targets(line.split("#", 1)[0] for line in f)


def parse_dns_target(target: str) -> tuple[str, str]:
    """(NAME, PORT) of ``dns:///NAME:PORT``; ValueError for anything else."""
    rest = target[len("dns:") :]
    if rest.startswith("//"):  # dns://AUTHORITY/NAME:PORT; only the system resolver is used
        rest = rest[2:].split("/", 1)[1] if "/" in rest[2:] else ""
    name, sep, port = rest.rpartition(":")
    if not sep or not name or not port.isdigit():
        raise ValueError(f"{target!r}: expected dns:///NAME:PORT")
    return name.strip("[]"), port


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

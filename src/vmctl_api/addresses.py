"""HOST:PORT, the one spelling of a TCP address both ends read: the agent's
``--listen``, ``--health-listen`` and ``--metrics-listen``, and the client's
targets. HOST is a DNS name or an IPv4 address in ASCII, or an IPv6 address
in brackets (``[::1]:50051``); PORT is decimal. Anything else is refused with
a one-line reason, before gRPC (which would guess, or fail deep inside) sees it.
"""

from __future__ import annotations

import ipaddress
import re

_DNS_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")


class AddressError(ValueError):
    """Not a HOST:PORT; the message says why, in one line."""


def split_host_port(text: str, *, lowest_port: int = 1) -> tuple[str, int]:
    """(HOST, PORT) of ``HOST:PORT`` or ``[IPV6]:PORT`` (HOST without brackets).
    ``lowest_port`` 0 admits port 0, "any free port", for a listener."""
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise AddressError(f"{text!r}: expected [IPV6]:PORT")
        port = port[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"{text!r}: {host!r} is not an IPv6 address") from None
    elif text.count(":") > 1:
        raise AddressError(f"{text!r}: an IPv6 address goes in brackets, e.g. [::1]:50051")
    else:
        host, _, port = text.partition(":")
        if not host:
            raise AddressError(f"{text!r} has no host")
        check_host_name(host, text)
    if not port:
        raise AddressError(f"{text!r} has no port: write HOST:PORT, e.g. {text.removesuffix(':')}:50051")
    if not (_PORT.match(port) and lowest_port <= int(port) <= 65535):
        raise AddressError(f"{text!r}: the port must be a number from {lowest_port} to 65535")
    return host, int(port)


def check_host_name(host: str, text: str) -> None:
    """A DNS name or an IPv4 address, in ASCII (an internationalised name in its xn-- form)."""
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise AddressError(f"{text!r}: {host!r} is not a host name or address")


def join_host_port(host: str, port: int) -> str:
    """The inverse of :func:`split_host_port`: brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

"""The values the command line takes, each checked as argparse reads it, so a
bad one is a usage error (exit 2) with a one-line reason and the usage of the
command it was given to. Nothing here talks to an agent or imports gRPC.

Addresses: ``0x`` then hex digits is hex (what ``vmctl maps`` prints), digits
alone are decimal. Anything else, bare hex such as ``7f12a000`` included, is
refused with a hint rather than guessed at: ``1000`` would be ambiguous.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import math
import os
import re
from collections.abc import Callable, Sequence

from vmctl_api.addresses import AddressError, split_host_port
from vmctl_api.cgroup_paths import prefix_problem

ADDRESS_RULE = "hex with 0x (0x7f12a000, as `vmctl maps` prints them) or decimal digits"
ADDRESS_LIMIT = 1 << 64
# Linux's PID_MAX_LIMIT (4,194,304 on 64-bit, less on 32-bit): no process
# anywhere has a larger pid.
PID_LIMIT = 1 << 22
# gRPC turns a deadline much further off (about 1e10 s) into one already
# past; a week bounds any real call or fleet run.
SECONDS_LIMIT = 7 * 24 * 3600
_HEX = re.compile(r"0[xX][0-9a-fA-F]+\Z")
_DECIMAL = re.compile(r"[0-9]+\Z")
_DECIMAL_FRACTION = re.compile(r"([0-9]+(\.[0-9]*)?|\.[0-9]+)\Z")
_BARE_HEX = re.compile(r"[0-9a-fA-F]+\Z")
_SIZE = re.compile(r"(?P<number>[0-9]+(\.[0-9]+)?)\s*(?P<unit>[KMGT]?)(I?B)?\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _usage(message: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(message)


def parse_address(text: str) -> int:
    """``0x7f12a000`` (hex) or ``2131927040`` (decimal), below 2**64."""
    if _HEX.match(text):
        value = int(text, 16)
    elif _DECIMAL.match(text):
        value = int(text, 10)
    elif _BARE_HEX.match(text):
        raise _usage(f"{text!r} is not an address: hex needs 0x (0x{text}); digits alone are decimal")
    else:
        raise _usage(f"{text!r} is not an address: addresses are {ADDRESS_RULE}")
    if value >= ADDRESS_LIMIT:
        raise _usage(f"{text!r} is beyond a 64-bit address space")
    return value


def parse_range(text: str) -> tuple[int, int]:
    """``START-END``, end exclusive: a row's range from ``vmctl maps`` as it is."""
    start, sep, end = text.strip().partition("-")
    if not sep:
        raise _usage(f"{text!r}: expected START-END, end exclusive; addresses are {ADDRESS_RULE}")
    first, last = parse_address(start.strip()), parse_address(end.strip())
    if last <= first:
        raise _usage(f"{text!r}: END must be above START (END is exclusive)")
    return first, last


def parse_pid(text: str) -> int:
    if not _DECIMAL.match(text):
        raise _usage(f"{text!r} is not a process id (a positive decimal number)")
    pid = int(text)
    if not 0 < pid < PID_LIMIT:
        raise _usage(f"{text!r} is not a process id: Linux pids run from 1 to {PID_LIMIT - 1}")
    return pid


def parse_size(text: str) -> int:
    """Bytes, with an optional binary unit: 4096, 64K, 1.5M, 2G (KiB, MB, ... read the same)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise _usage(f"{text!r} is not a size (bytes, or with K, M, G, T: 64K, 1.5M)")
    value = float(match["number"]) * _SIZE_UNITS[match["unit"].upper()]
    if value >= ADDRESS_LIMIT:
        raise _usage(f"{text!r} is more than any address space holds")
    return int(value)


def parse_cookie(text: str) -> bytes:
    """The cookie as `vmctl maps` prints it (standard base64). Its content is
    the agent's to judge; here only that it is base64 at all."""
    try:
        cookie = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise _usage("not a cookie: expected the base64 text `vmctl maps` prints after 'cookie'") from None
    if not cookie:
        raise _usage("the cookie is empty: leave --cookie out to have a fresh one read first")
    return cookie


def parse_cgroup(text: str) -> str:
    problem = prefix_problem(text)
    if problem:
        raise _usage(f"{text!r} is not a cgroup v2 path: {problem} (e.g. /system.slice; `vmctl ps` shows each)")
    return text


def parse_attrs(known: Sequence[str]) -> Callable[[str], str]:
    """A comma-separated list of attribute words, each one of ``known``."""

    def parse(text: str) -> str:
        words = [w.strip().lower() for w in text.split(",")]
        if not any(words):
            raise _usage(f"name at least one attribute: {', '.join(known)}")
        unknown = [w for w in words if w and w not in known]
        if unknown:
            raise _usage(f"unknown attribute {unknown[0]!r}; known: {', '.join(known)}")
        return ",".join(w for w in words if w)

    return parse


def positive(kind: type[int] | type[float], most: float = math.inf) -> Callable[[str], int | float]:
    """A number above zero and at most ``most``, in ASCII decimal digits
    (``int()`` would also take "٣", "1_0" and "inf")."""
    shape = _DECIMAL if kind is int else _DECIMAL_FRACTION

    def parse(text: str) -> int | float:
        stripped = text.strip()  # str.strip takes more than int() and float() do (e.g. "\x1f")
        value = kind(stripped) if shape.match(stripped) else 0
        if not 0 < value <= most:
            raise _usage(f"{text!r}: must be a positive number" + (f" up to {most:g}" if most < math.inf else ""))
        return value

    return parse


def seconds_or_zero(text: str) -> float:
    """Seconds, zero or more (``--duration 0``: no end)."""
    stripped = text.strip()
    if not _DECIMAL_FRACTION.match(stripped) or float(stripped) > SECONDS_LIMIT:
        raise _usage(f"{text!r}: must be a number of seconds from 0 to {SECONDS_LIMIT}")
    return float(stripped)


def percent(text: str) -> float:
    """A percentage from 0 to 100, without the % sign (or with it)."""
    number = text.strip().removesuffix("%")
    if not _DECIMAL_FRACTION.match(number) or float(number) > 100:
        raise _usage(f"{text!r}: must be a percentage from 0 to 100")
    return float(number)


def listen_address(text: str) -> tuple[str, int]:
    """HOST:PORT to listen on (port 0: any free one), read as the agent reads its listen flags."""
    try:
        return split_host_port(text, lowest_port=0)
    except AddressError as exc:
        raise _usage(str(exc)) from None


def count(text: str) -> int:
    """A whole number, zero or more."""
    if not _DECIMAL.match(text.strip()):
        raise _usage(f"{text!r} is not a whole number (0, 1, 2, ...)")
    return int(text.strip())


def readable_file(text: str) -> str:
    """A file this user can read (PEM files, target lists): checked now, not at the first connection."""
    if not os.path.exists(text):
        raise _usage(f"{text!r}: no such file")
    if not os.path.isfile(text):
        raise _usage(f"{text!r}: not a regular file")
    if not os.access(text, os.R_OK):
        raise _usage(f"{text!r}: not readable by this user")
    return text

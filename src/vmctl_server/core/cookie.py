"""The sequence cookie: a signed name for one layout of one process.

Linux never merged the VMA configuration sequence number the 2019 linux-mm
thread asked for, so the agent builds one: a cookie carries the boot id, the
pid, its start time, an id of the current exec, and a digest of the whole
layout, all under an HMAC-SHA256 with the agent's key. A client cannot forge
or edit one, and one from another host, boot, process or image never passes.

Wire format (little endian), 109 bytes::

    version:u8  boot_id:16s  pid:u32  start_time:u64  exec_id:16s  layout:32s  mac:32s
"""

from __future__ import annotations

import hmac
import secrets
import struct
from dataclasses import dataclass

from vmctl_server.core import files
from vmctl_server.core.faults import CookieInvalid

COOKIE_VERSION = 1
_BODY = struct.Struct("<B16sIQ16s32s")
_MAC_SIZE = 32
COOKIE_SIZE = _BODY.size + _MAC_SIZE
KEY_SIZE = 32
MIN_KEY_SIZE = 16


@dataclass(frozen=True)
class CookieClaims:
    boot_id: bytes
    pid: int
    start_time: int
    exec_id: bytes
    layout_digest: bytes


class CookieSigner:
    """Issues and verifies cookies with one secret key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_SIZE:
            raise ValueError(f"a cookie key needs at least {MIN_KEY_SIZE} bytes, got {len(key)}")
        self._key = key

    def __repr__(self) -> str:
        return "CookieSigner(<key hidden>)"

    @classmethod
    def with_random_key(cls) -> CookieSigner:
        return cls(secrets.token_bytes(KEY_SIZE))

    @classmethod
    def from_key_file(cls, path: str) -> CookieSigner:
        """Read the key from ``path``, creating it if it is absent, so cookies stay
        valid across agent restarts. Anyone who reads the file can forge cookies
        and anyone who writes it can choose the key: it must be the agent's own
        regular file, mode 0600, exactly KEY_SIZE bytes, reached without
        following a link (see :func:`files.read_or_create_secret`)."""
        return cls(files.read_or_create_secret(path, KEY_SIZE, "cookie key file"))

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, "sha256").digest()

    def issue(self, claims: CookieClaims) -> bytes:
        body = _BODY.pack(
            COOKIE_VERSION,
            claims.boot_id,
            claims.pid,
            claims.start_time,
            claims.exec_id,
            claims.layout_digest,
        )
        return body + self._mac(body)

    def verify(self, cookie: bytes) -> CookieClaims:
        """The claims of a cookie this agent's key signed, or CookieInvalid."""
        if len(cookie) != COOKIE_SIZE:
            raise CookieInvalid(
                f"cookie is {len(cookie)} bytes, expected {COOKIE_SIZE}: not a cookie from GetVmaInfo",
                field="cookie",
            )
        body, mac = cookie[: _BODY.size], cookie[_BODY.size :]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise CookieInvalid(
                "cookie signature does not verify: it was altered, or issued by another agent or key",
                field="cookie",
            )
        version, boot_id, pid, start_time, exec_id, digest = _BODY.unpack(body)
        if version != COOKIE_VERSION:
            raise CookieInvalid(f"cookie version {version} is not supported", field="cookie")
        return CookieClaims(boot_id, pid, start_time, exec_id, digest)

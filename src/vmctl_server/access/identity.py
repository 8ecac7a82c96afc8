"""Who is calling: one identity per call, from the transport it came over.

Identities are spelled as the policy file spells them:

- ``uid:N`` — a peer on a unix socket, as the kernel reports it
  (``SO_PEERCRED``, read by :mod:`vmctl_server.transport.unixgate` when it accepts the
  connection); the peer's gid and pid are kept for the audit log;
- the client certificate's URI SAN, verbatim (``spiffe://cluster/ns/ops/sa/x``),
  else ``dns:NAME`` (its first DNS SAN), else ``cn:NAME`` (its common name) —
  a TCP peer under mutual TLS, read from the certificate itself by
  :mod:`vmctl_server.access.certnames`, which also says what a usable name is;
- ``anonymous`` — anyone else: plaintext TCP (``--insecure``), a certificate
  whose name is unusable (a NUL byte in it, say: never a part of the name),
  or a path to the gRPC server that bypassed the unix gateway. The policy admits
  ``anonymous`` only where a rule names it; otherwise such a caller gets
  UNAUTHENTICATED.

Everything here works on plain values (the peer string and the auth-context
mapping gRPC hands the service), so it is tested without a server.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

log = logging.getLogger("vmctl.auth")

ANONYMOUS = "anonymous"

# URI SANs whose scheme would read as one of our own prefixes are not taken
# as identities: a certificate must never pass for "uid:0".
RESERVED_SCHEMES = ("uid", "gid", "dns", "cn", ANONYMOUS)

# The gateway binds the client end of each relayed connection to an abstract
# unix address carrying the peer's credentials, so that gRPC's peer string
# names them. Only the agent can connect to the private gRPC socket (it lives
# in a 0700 directory), so a peer string of this shape can only come from it.
PEER_NAME_PREFIX = "vmctl-peer/"
_PEER_NAME = re.compile(r"^unix-abstract:vmctl-peer/uid=(\d+)/gid=(\d+)/pid=(\d+)/[0-9a-f]+$")


@dataclass(frozen=True)
class Caller:
    identity: str  # as the policy names it: "uid:0", "spiffe://...", "dns:x", "cn:x", "anonymous"
    transport: str  # "unix", "tls" or "plaintext"
    uid: int | None = None  # unix peers: SO_PEERCRED
    gid: int | None = None
    pid: int | None = None
    address: str = ""  # gRPC's peer string, for logs

    @property
    def authenticated(self) -> bool:
        return self.identity != ANONYMOUS

    def audit_fields(self) -> dict[str, object]:
        fields: dict[str, object] = {"identity": self.identity, "transport": self.transport}
        if self.transport == "unix":
            fields.update(peer_uid=self.uid, peer_gid=self.gid, peer_pid=self.pid)
        else:
            fields["peer"] = self.address
        return fields


def peer_name(uid: int, gid: int, pid: int, nonce: str) -> str:
    """The abstract address the gateway binds for one relayed connection."""
    return f"{PEER_NAME_PREFIX}uid={uid}/gid={gid}/pid={pid}/{nonce}"


def _first(auth_context: Mapping[str, Iterable[bytes]], key: str) -> str | None:
    values = auth_context.get(key) or ()
    for value in values:
        text = value.decode("utf-8", "replace")
        if text:
            return text
    return None


@dataclass(frozen=True)
class _Named:
    identity: str | None
    refusal: str = ""  # why the certificate names nobody, as printable ASCII
    fingerprint: str = ""


# One client makes many calls with one certificate: parse each once. Keyed by
# the PEM bytes, so a different certificate is never served another's answer.
@functools.lru_cache(maxsize=64)
def _named_by(pem: bytes) -> _Named:
    # Imported on the first certificate: cryptography adds ~10 MB to the RSS
    # of an agent that serves only its unix socket and would never use it.
    from vmctl_server.access import certnames

    try:
        certificate = certnames.load(pem)
    except certnames.UnusableName as exc:
        return _Named(None, str(exc))
    try:
        return _Named(certnames.certificate_identity(certificate))
    except certnames.UnusableName as exc:
        return _Named(None, str(exc), certnames.fingerprint(certificate))


def certificate_identity(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """URI SAN, else ``dns:`` first DNS SAN, else ``cn:`` common name, read
    from the verified peer certificate (``x509_pem_cert``; gRPC checked it
    against ``--client-ca`` before any call runs). Not from gRPC's own
    ``peer_uri``/``peer_dns``/``x509_common_name``: gRPC core cuts those at a
    NUL byte. None when the certificate names nobody usable; then this logs
    why, once per call (call it once per call)."""
    pem = next(iter(auth_context.get("x509_pem_cert") or ()), None)
    if not pem:
        return None
    named = _named_by(bytes(pem))
    if named.refusal:
        log.warning(
            "client certificate names nobody, caller is %s: %s",
            ANONYMOUS,
            named.refusal,
            extra={"fields": {"certificate_sha256": named.fingerprint}},
        )
    return named.identity


def caller_from(peer: str, auth_context: Mapping[str, Iterable[bytes]]) -> Caller:
    """The caller of one call, from ``context.peer()`` and ``context.auth_context()``."""
    match = _PEER_NAME.match(peer)
    if match:
        uid, gid, pid = (int(g) for g in match.groups())
        return Caller(f"uid:{uid}", "unix", uid=uid, gid=gid, pid=pid, address=peer)
    if _first(auth_context, "transport_security_type") == "ssl":
        identity = certificate_identity(auth_context)
        return Caller(identity or ANONYMOUS, "tls", address=peer)
    return Caller(ANONYMOUS, "plaintext" if not peer.startswith("unix") else "unix", address=peer)

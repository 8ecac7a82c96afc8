"""A throwaway PKI for tests: one CA, server and client certificates, PEM files.

Shared by every test that speaks TLS to an agent (mutual TLS, policy by
certificate identity, fleets of agents in network namespaces)::

    pki = Pki(tmp_path)
    server = pki.issue("agent", dns=["localhost"], ips=["10.0.0.2"])
    reader = pki.issue("reader", uri="spiffe://cluster/ns/ops/sa/reader")
    start_agent("--listen", "tcp://127.0.0.1:PORT", "--tls-cert", server.cert, "--tls-key", server.key,
                "--client-ca", pki.ca)
    TlsOptions(ca=pki.ca, cert=reader.cert, key=reader.key, server_name="localhost")

Keys are P-256 (fast to make); files are mode 0600 and live in the directory
given, which the test owns (``tmp_path``), so nothing outlives the test.

Certificates an attacker would bring, with names of any bytes (a NUL inside
a DNS SAN, a common name that is not UTF-8, several common names)::

    pki.issue_names("nul", sans=[("dns", b"reclaimer.ops\0.attacker.example")], common_names=["x"])

``CertificateAuthority`` does the same in memory, for tests that need only
the parsed certificate or its PEM.
"""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

# A SAN as raw bytes: ("dns" | "uri" | "email" | "x400", value). The value goes
# into the certificate as it is, whatever its bytes (for "x400", DER content).
RawSan = tuple[str, bytes | str]
_GENERAL_NAME_TAGS = {"email": 0x81, "dns": 0x82, "uri": 0x86, "x400": 0xA3}  # [1] [2] [6] IA5String, [3] ORAddress
# AlgorithmIdentifier ecdsa-with-SHA256, the one signature algorithm of this CA's P-256 key.
_ECDSA_WITH_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")


@dataclass(frozen=True)
class CertFiles:
    """Paths of one certificate and its private key (PEM)."""

    cert: str
    key: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _der(tag: int, content: bytes) -> bytes:
    """One DER element: tag, definite length, content."""
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def raw_san_extension(sans: Sequence[RawSan]) -> x509.UnrecognizedExtension:
    """A subjectAltName extension encoded by hand: cryptography's own
    DNSName refuses non-ASCII values, and an attacker's CA may not."""
    names = b"".join(
        _der(_GENERAL_NAME_TAGS[kind], value.encode() if isinstance(value, str) else value) for kind, value in sans
    )
    return x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, _der(0x30, names))


class CertificateAuthority:
    """A CA in memory: ``certificate`` is its own, ``sign`` makes leaf certificates."""

    def __init__(self, ca_name: str = "vmctl test CA") -> None:
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        self._ca_name = _name(ca_name)
        self.certificate = self._build(self._ca_name, self._ca_key.public_key(), ca=True, sans=[])

    def _build(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        *,
        ca: bool,
        sans: list[x509.GeneralName] | x509.UnrecognizedExtension,
        valid_days: float = 1,
    ) -> x509.Certificate:
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if isinstance(sans, x509.UnrecognizedExtension):
            builder = builder.add_extension(sans, critical=False)
        elif sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self._ca_key, hashes.SHA256())

    def _resigned(self, certificate: x509.Certificate, replacements: dict[bytes, bytes]) -> x509.Certificate:
        """``certificate`` with each stand-in's bytes replaced (same length, so
        no DER length changes) and signed again by this CA."""
        tbs = certificate.tbs_certificate_bytes
        for stand_in, value in replacements.items():
            assert tbs.count(stand_in) == 1 and len(stand_in) == len(value)
            tbs = tbs.replace(stand_in, value)
        signature = self._ca_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
        return x509.load_der_x509_certificate(_der(0x30, tbs + _ECDSA_WITH_SHA256 + _der(0x03, b"\0" + signature)))

    def sign(
        self,
        public_key: ec.EllipticCurvePublicKey,
        *,
        common_names: Sequence[str | bytes] = (),
        sans: Sequence[RawSan] | None = None,
    ) -> x509.Certificate:
        """A leaf certificate whose subject has exactly ``common_names`` (str:
        as UTF8String, any length, NUL included; bytes: the UTF8String's raw
        bytes, which need not be UTF-8, at least 8 of them) and whose SAN
        extension holds exactly ``sans`` (None: no SAN extension; empty: an
        empty one, which RFC 5280 forbids)."""
        replacements: dict[bytes, bytes] = {}
        attributes = []
        for value in common_names:
            if isinstance(value, bytes):
                # A unique stand-in of the same length, swapped for the bytes after signing.
                assert len(value) >= 8, "raw common names need 8 bytes or more, to be found again"
                stand_in = secrets.token_hex(len(value))[: len(value)]
                replacements[stand_in.encode()] = value
                value = stand_in
            with warnings.catch_warnings():  # RFC 5280's 1..64 characters is one of the rules under test
                warnings.simplefilter("ignore", UserWarning)
                attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, value, _validate=False))
        extension = raw_san_extension(sans) if sans is not None else []
        certificate = self._build(x509.Name(attributes), public_key, ca=False, sans=extension)
        return self._resigned(certificate, replacements) if replacements else certificate

    def pem(self, *, common_names: Sequence[str | bytes] = (), sans: Sequence[RawSan] | None = None) -> bytes:
        """The PEM of ``sign``'s certificate for a fresh key, as gRPC hands it to the agent."""
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = self.sign(key.public_key(), common_names=common_names, sans=sans)
        return certificate.public_bytes(serialization.Encoding.PEM)


class Pki(CertificateAuthority):
    """A CA whose certificate is at ``self.ca``; ``issue`` signs leaf certificates."""

    def __init__(self, directory: pathlib.Path | str, ca_name: str = "vmctl test CA") -> None:
        super().__init__(ca_name)
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = self._write("ca.pem", self.certificate.public_bytes(serialization.Encoding.PEM))
        self._count = 0

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        return str(path)

    def _files(self, stem: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> CertFiles:
        self._count += 1
        stem = f"{self._count:02d}-{stem.replace('/', '_')}"
        return CertFiles(
            cert=self._write(f"{stem}.pem", certificate.public_bytes(serialization.Encoding.PEM)),
            key=self._write(f"{stem}.key", _key_pem(key)),
        )

    def issue_names(
        self, stem: str, *, common_names: Sequence[str | bytes] = (), sans: Sequence[RawSan] | None = None
    ) -> CertFiles:
        """A client certificate with names of any bytes (see ``sign``); ``stem`` names its files."""
        key = ec.generate_private_key(ec.SECP256R1())
        return self._files(stem, self.sign(key.public_key(), common_names=common_names, sans=sans), key)

    def issue(
        self,
        common_name: str,
        *,
        uri: str | list[str] | None = None,
        dns: list[str] | None = None,
        ips: list[str] | None = None,
    ) -> CertFiles:
        """A leaf certificate (server or client) with the SANs given.

        A server certificate needs a DNS or IP SAN matching the name the
        client checks; a client's identity at the agent is its URI SAN, else
        its first DNS SAN, else its CN.
        """
        uris = [uri] if isinstance(uri, str) else list(uri or [])
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.DNSName(d) for d in dns or []]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips or []]
        key = ec.generate_private_key(ec.SECP256R1())
        return self._files(common_name, self._build(_name(common_name), key.public_key(), ca=False, sans=sans), key)

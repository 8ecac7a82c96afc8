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
"""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


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


class Pki:
    """A CA whose certificate is at ``self.ca``; ``issue`` signs leaf certificates."""

    def __init__(self, directory: pathlib.Path | str, ca_name: str = "vmctl test CA") -> None:
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        self._ca_name = _name(ca_name)
        ca_cert = self._build(self._ca_name, self._ca_key.public_key(), ca=True, sans=[])
        self.ca = self._write("ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
        self._count = 0

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        return str(path)

    def _build(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        *,
        ca: bool,
        sans: list[x509.GeneralName],
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
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self._ca_key, hashes.SHA256())

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
        cert = self._build(_name(common_name), key.public_key(), ca=False, sans=sans)
        self._count += 1
        stem = f"{self._count:02d}-{common_name.replace('/', '_')}"
        return CertFiles(
            cert=self._write(f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM)),
            key=self._write(f"{stem}.key", _key_pem(key)),
        )

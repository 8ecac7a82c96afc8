"""The identity a client certificate names, read from the certificate itself.

gRPC's auth context also lists the peer's SANs (``peer_uri``, ``peer_dns``)
and common name, but gRPC core copies them as C strings: a DNS SAN
``reclaimer.ops\\0.attacker.example`` arrives as ``reclaimer.ops``. So the
agent parses the verified peer certificate (``x509_pem_cert``) with
``cryptography`` and applies the rules below; a certificate whose name breaks
one names nobody (the caller is ``anonymous``), never a part of its name.

Which name: the first URI SAN whose scheme is not one of the policy's own
prefixes (``uid:0`` must not pass for root), else ``dns:`` the first DNS
SAN, else ``cn:`` the common name. A name of the chosen kind that is bad does
not fall through to the next one: the policy author who granted
``dns:reclaimer.ops`` expects that name from the certificate's first DNS SAN,
not from whichever later SAN happens to be well formed.

What a usable name is:

- Nowhere in the certificate's URI SANs, DNS SANs or common names may a
  control, format or line-separator character appear (NUL, ESC, DEL, C1
  controls, zero-width and bidi marks, U+2028/9). They have no place in a
  name and are how one name is made to read as another by some parser, log
  viewer or terminal, so their presence anywhere discredits every name on
  the certificate: which one did the issuer mean?
- The chosen name is printable ASCII. DNS and URI SANs are IA5Strings
  (ASCII) by RFC 5280 (internationalized names travel as ``xn--`` A-labels
  and URIs); a common name could be any Unicode, but an identity is compared
  byte for byte with a policy a person wrote and read back from the audit
  log by a person, where U+043E (Cyrillic o) and ``o``, or U+FF0E (a fullwidth
  full stop) and ``.``, cannot be told apart.
- A URI has a scheme (RFC 3986) and no spaces, and is at most 2,048 bytes
  (SPIFFE's limit for an ID); a DNS name is dot-separated labels of letters,
  digits, ``-`` (not first or last) and ``_`` (``*`` only as a whole first
  label), each at most 63 bytes, at most 253 in all (RFC 1035); a common name has no leading or
  trailing space and is at most 64 bytes (RFC 5280's ub-common-name).
- A certificate with several common names and no SAN names nobody: parsers
  disagree on whether the first or the last one counts.
- A certificate that ``cryptography`` cannot parse (a string that is not
  what its type says, a duplicated extension, an x400Address SAN) names
  nobody.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from vmctl_server.access.identity import RESERVED_SCHEMES

# Unicode categories that are never part of a name: controls (C0, DEL, C1),
# format characters (zero-width, bidi overrides, soft hyphen), surrogates
# (only a broken decoder yields them) and the line and paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[\x21-\x7e]+")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_COMMON_NAME = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
MAX_URI = 2048
MAX_DNS = 253
MAX_COMMON_NAME = 64
_SHOWN_CHARS = 96  # of a refused name, in the log: enough to recognise it, not a way to flood the log

# cryptography warns on stderr when it reads a common name over 64
# characters; the rules here refuse such a name with a reason in the log.
warnings.filterwarnings("ignore", message="Attribute's length must be", category=UserWarning)


class UnusableName(ValueError):
    """Why a certificate names nobody. The message is printable ASCII: a
    refused name is shown escaped, never raw."""


def shown(name: str) -> str:
    """``name`` (or a parser's complaint about one) as printable ASCII for a
    log line: escapes for every control or non-ASCII character, cut at a
    bound, with its length."""
    head = ascii(name[:_SHOWN_CHARS])
    return head if len(name) <= _SHOWN_CHARS else f"{head}... ({len(name)} characters)"


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the certificate (hex), by which an operator finds it."""
    return certificate.fingerprint(hashes.SHA256()).hex()


def load(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise UnusableName(f"the certificate cannot be parsed: {shown(str(exc))}") from None


def _san_names(certificate: x509.Certificate) -> tuple[list[str], list[str]]:
    """(URI SANs, DNS SANs) in the certificate's order."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return [], []
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        # A malformed SAN, two SAN extensions, or a kind of name cryptography
        # does not read: what it cannot read could be the name that counts.
        raise UnusableName(f"its extensions cannot be read: {shown(str(exc))}") from None
    sans = extension.value
    return sans.get_values_for_type(x509.UniformResourceIdentifier), sans.get_values_for_type(x509.DNSName)


def _common_names(certificate: x509.Certificate) -> list[str]:
    try:
        attributes = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as exc:  # e.g. a UTF8String that is not UTF-8
        raise UnusableName(f"its subject cannot be read: {shown(str(exc))}") from None
    values = [attribute.value for attribute in attributes]
    if not all(isinstance(value, str) for value in values):
        raise UnusableName("its common name is not a string")
    return values  # type: ignore[return-value]


def _forbidden_character(names: Iterable[str]) -> tuple[str, str] | None:
    for name in names:
        for char in name:
            if unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
                return name, char
    return None


def check_uri(uri: str) -> str:
    if len(uri) > MAX_URI:
        raise UnusableName(f"its URI SAN is longer than {MAX_URI} characters: {shown(uri)}")
    if not _URI.fullmatch(uri):
        raise UnusableName(f"its URI SAN is not a printable ASCII URI with a scheme: {shown(uri)}")
    return uri


def check_dns(name: str) -> str:
    labels = name.split(".")
    wildcard_first = labels[0] == "*" and len(labels) > 1
    if len(name) > MAX_DNS or not all(_DNS_LABEL.fullmatch(label) for label in labels[wildcard_first:]):
        raise UnusableName(f"its first DNS SAN is not a DNS name: {shown(name)}")
    return name


def check_common_name(name: str) -> str:
    if len(name) > MAX_COMMON_NAME or not _COMMON_NAME.fullmatch(name):
        raise UnusableName(
            f"its common name is not 1 to {MAX_COMMON_NAME} printable ASCII characters without"
            f" leading or trailing space: {shown(name)}"
        )
    return name


def _scheme(uri: str) -> str:
    return uri.partition(":")[0].lower()


def choose_identity(uris: Sequence[str], dns_names: Sequence[str], common_names: Sequence[str]) -> str | None:
    """The identity these names give (see the module's rules), None for a
    certificate with no name at all; UnusableName when the names are bad."""
    bad = _forbidden_character([*uris, *dns_names, *common_names])
    if bad is not None:
        name, char = bad
        raise UnusableName(f"a name holds the character U+{ord(char):04X}: {shown(name)}")
    own = [uri for uri in uris if _scheme(uri) not in RESERVED_SCHEMES]
    if own:
        return check_uri(own[0])
    if dns_names:
        return f"dns:{check_dns(dns_names[0])}"
    if len(common_names) > 1:
        raise UnusableName(f"it has {len(common_names)} common names and no SAN to choose among them")
    if common_names:
        return f"cn:{check_common_name(common_names[0])}"
    return None


def certificate_identity(certificate: x509.Certificate) -> str | None:
    """The identity ``certificate`` names: None for no name, UnusableName for bad ones."""
    uris, dns_names = _san_names(certificate)
    return choose_identity(uris, dns_names, _common_names(certificate))

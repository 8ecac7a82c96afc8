"""Certificate names as an attacker writes them: a NUL byte inside a DNS SAN,
a URI SAN or the common name (gRPC core cuts its own copies of these at the
NUL), control and invisible characters, UTF-8 tricks, several names where
the first is bad, a common name reading ``uid:0``.

The rules are in src/vmctl_server/access/certnames.py. Here they are checked on
real certificates signed by a test CA (tests/certs.py builds any bytes into
a name), through ``caller_from`` as the service calls it, and end to end:
an agent under mutual TLS whose policy grants ``dns:reclaimer.ops`` must not
admit ``reclaimer.ops\\0.attacker.example``, and its log and audit must not
show the cut name.
"""

from __future__ import annotations

import json
import logging
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.audit_lines import audit_records
from support.certs import CertificateAuthority, Pki
from support.expect import expect_error
from support.processes import PAGE

from vmctl_client import Client, TlsOptions, VmctlError
from vmctl_client.calls import RetryPolicy
from vmctl_server.access import certnames
from vmctl_server.access.identity import ANONYMOUS, caller_from

# cryptography warns of a common name over 64 characters; the agent silences
# that (certnames refuses such a name itself), but pytest resets the filters.
pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length must be:UserWarning")

NO_RETRY = RetryPolicy(attempts=1)
NUL_DNS = b"reclaimer.ops\0.attacker.example"
NUL_URI = b"spiffe://cluster/ns/ops/sa/reclaimer\0.attacker.example"
NUL_CN = "reclaimer.ops\0.attacker.example"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


def tls_caller(pem: bytes):
    """The caller as the service sees one with this certificate over mutual TLS."""
    return caller_from("ipv4:127.0.0.1:5", {"transport_security_type": [b"ssl"], "x509_pem_cert": [pem]})


def identity_of(ca: CertificateAuthority, **names) -> str | None:
    """The identity the certificate with these names gives: None if it names nobody."""
    try:
        return certnames.certificate_identity(certnames.load(ca.pem(**names)))
    except certnames.UnusableName:
        return None


def refusal_of(ca: CertificateAuthority, **names) -> str:
    with pytest.raises(certnames.UnusableName) as refused:
        certnames.certificate_identity(certnames.load(ca.pem(**names)))
    return str(refused.value)


# ---- which name: the precedence of today, on real certificates -----------------------------


@pytest.mark.unprivileged
@pytest.mark.parametrize(
    ("names", "identity"),
    [
        (
            {"sans": [("uri", "spiffe://c/x"), ("dns", "a.example")], "common_names": ["cn"]},
            "spiffe://c/x",
        ),
        ({"sans": [("uri", "uid:0"), ("dns", "a.example")]}, "dns:a.example"),  # a URI must not pass for root
        ({"sans": [("uri", "UID:0"), ("uri", "Anonymous:x")], "common_names": ["ops"]}, "cn:ops"),
        ({"sans": [("dns", "a.example"), ("dns", "b.example")], "common_names": ["cn"]}, "dns:a.example"),
        ({"sans": [("email", "ops@example.com")], "common_names": ["ops"]}, "cn:ops"),  # e-mail names nobody
        ({"common_names": ["ops"]}, "cn:ops"),
        ({"sans": [], "common_names": ["ops"]}, "cn:ops"),  # an empty SAN extension: the CN, as with none
        ({"common_names": ["uid:0"]}, "cn:uid:0"),  # a CN is always cn:, never passes for a unix peer
        ({"sans": [("dns", "*.ops.example")]}, "dns:*.ops.example"),
        ({"sans": [("dns", "node_7.ops-east.example")]}, "dns:node_7.ops-east.example"),
        ({"sans": [("dns", "a.example"), ("dns", "b.example")], "common_names": ["x", "y"]}, "dns:a.example"),
        ({"common_names": ["Reclaimer for ops (east)"]}, "cn:Reclaimer for ops (east)"),
        ({}, None),  # no name at all
    ],
)
def test_certificate_identity_precedence(ca, names, identity):
    caller = tls_caller(ca.pem(**names))
    assert caller.identity == (identity or ANONYMOUS) and caller.transport == "tls"


@pytest.mark.unprivileged
def test_tls_without_a_client_certificate_is_anonymous():
    caller = caller_from("ipv4:127.0.0.1:5", {"transport_security_type": [b"ssl"]})
    assert caller.identity == ANONYMOUS and caller.transport == "tls"


@pytest.mark.unprivileged
def test_gRPCs_own_name_properties_are_not_believed(ca):
    """What gRPC core hands over as peer_dns is what it cut at the NUL: only
    the certificate counts."""
    pem = ca.pem(sans=[("dns", NUL_DNS)])
    context = {"transport_security_type": [b"ssl"], "x509_pem_cert": [pem], "peer_dns": [b"reclaimer.ops"]}
    assert caller_from("ipv4:127.0.0.1:5", context).identity == ANONYMOUS
    forged = {"transport_security_type": [b"ssl"], "peer_dns": [b"reclaimer.ops"], "x509_common_name": [b"x"]}
    assert caller_from("ipv4:127.0.0.1:5", forged).identity == ANONYMOUS  # names without a certificate


# ---- what is not a name -----------------------------------------------------------------------


@pytest.mark.unprivileged
@pytest.mark.parametrize(
    ("names", "why"),
    [
        ({"sans": [("dns", NUL_DNS)]}, "U+0000"),
        ({"sans": [("uri", NUL_URI)]}, "U+0000"),
        ({"common_names": [NUL_CN]}, "U+0000"),  # the CN only: no SAN to fall back from
        ({"sans": [("dns", "reclaimer.ops")], "common_names": [NUL_CN]}, "U+0000"),  # NUL in a name not chosen
        ({"sans": [("uri", "spiffe://c/x"), ("dns", NUL_DNS)]}, "U+0000"),
        ({"sans": [("uri", b"uid:0\0"), ("dns", "reclaimer.ops")]}, "U+0000"),  # even in a reserved-scheme URI
        ({"sans": [("dns", "reclaimer.ops\n")]}, "U+000A"),
        ({"common_names": ["reclaimer.ops\x1b[2K"]}, "U+001B"),  # a terminal escape
        ({"common_names": ["reclaimer.ops\x7f"]}, "U+007F"),
        ({"common_names": ["reclaimer.ops\x85x"]}, "U+0085"),  # C1 next line
        ({"common_names": ["spo.remialcer\u202e"]}, "U+202E"),  # right-to-left override: shows as reclaimer.ops
        ({"common_names": ["reclaimer\u200b.ops"]}, "U+200B"),  # zero-width space
        ({"common_names": ["reclaimer.ops\u2028x"]}, "U+2028"),  # line separator
    ],
)
def test_a_control_or_invisible_character_anywhere_discredits_every_name(ca, names, why):
    refusal = refusal_of(ca, **names)
    assert why in refusal and refusal.isascii() and refusal.isprintable(), refusal


@pytest.mark.unprivileged
@pytest.mark.parametrize(
    ("names", "why"),
    [
        # UTF-8 tricks: look-alikes and bytes that are not what the string type says.
        ({"sans": [("dns", "r\u00e9claimer.ops".encode())]}, "not a DNS name"),
        ({"sans": [("dns", "reclaimer\uff0eops".encode())]}, "not a DNS name"),  # fullwidth full stop
        ({"sans": [("dns", "\u0440eclaimer.ops".encode())]}, "not a DNS name"),  # Cyrillic er
        ({"sans": [("dns", b"reclaimer.ops\xff")]}, "cannot be read"),  # not UTF-8
        ({"sans": [("uri", "spiffe://c/\u00e9".encode())]}, "not a printable ASCII URI"),
        ({"common_names": ["reclaimer\uff0eops"]}, "common name is not"),
        ({"common_names": [b"reclaimer.ops\xc0\x80xx"]}, "cannot be read"),  # overlong NUL
        ({"common_names": [b"reclaimer\xc0\xaeops"]}, "cannot be read"),  # overlong full stop
        # Several names where the first is bad: no falling through to a later, different one.
        ({"sans": [("dns", "-"), ("dns", "reclaimer.ops")]}, "not a DNS name"),
        ({"sans": [("dns", "r\u00e9claimer.ops".encode()), ("dns", "reclaimer.ops")]}, "not a DNS name"),
        ({"sans": [("uri", "spiffe ://c/x"), ("dns", "reclaimer.ops")]}, "not a printable ASCII URI"),
        ({"sans": [("uri", ""), ("dns", "reclaimer.ops")]}, "not a printable ASCII URI"),
        ({"sans": [("uri", "//c/x"), ("uri", "spiffe://c/x")]}, "not a printable ASCII URI"),
        ({"common_names": ["reclaimer.ops", "attacker.example"]}, "2 common names"),
        ({"sans": [("x400", b"\x30\x00"), ("dns", "reclaimer.ops")]}, "cannot be read"),  # a SAN it cannot read
        # Shapes no name has.
        ({"sans": [("dns", "reclaimer..ops")]}, "not a DNS name"),
        ({"sans": [("dns", "reclaimer.ops.")]}, "not a DNS name"),
        ({"sans": [("dns", "a.*.ops")]}, "not a DNS name"),
        ({"sans": [("dns", "reclaimer ops")]}, "not a DNS name"),
        ({"sans": [("dns", "a" * 64 + ".ops")]}, "not a DNS name"),
        ({"sans": [("dns", ".".join(["a" * 60] * 5))]}, "not a DNS name"),  # 304 bytes
        ({"sans": [("uri", "spiffe://c/" + "x" * 2040)]}, "longer than 2048 characters"),
        ({"common_names": [" reclaimer.ops"]}, "common name is not"),
        ({"common_names": ["x" * 65]}, "common name is not"),
    ],
)
def test_a_name_that_cannot_be_a_name_names_nobody(ca, names, why):
    refusal = refusal_of(ca, **names)
    assert why in refusal and refusal.isascii() and refusal.isprintable(), refusal


@pytest.mark.unprivileged
def test_a_refused_name_is_logged_once_escaped_and_bounded(ca, caplog):
    pem = ca.pem(sans=[("dns", NUL_DNS + b"\x1b[2K" + b"x" * 500)])
    with caplog.at_level(logging.WARNING, logger="vmctl.auth"):
        assert tls_caller(pem).identity == ANONYMOUS
        assert tls_caller(pem).identity == ANONYMOUS  # the second call: parsed once, logged again
    warnings = [r for r in caplog.records if r.name == "vmctl.auth"]
    assert len(warnings) == 2 and {r.levelno for r in warnings} == {logging.WARNING}
    message = warnings[0].getMessage()
    assert message.isascii() and message.isprintable(), message
    assert "reclaimer.ops\\x00.attacker.example\\x1b[2K" in message and "535 characters" in message
    assert len(message) < 400
    assert len(warnings[0].fields["certificate_sha256"]) == 64


@pytest.mark.unprivileged
def test_a_certificate_with_no_names_is_anonymous_without_a_warning(ca, caplog):
    with caplog.at_level(logging.WARNING, logger="vmctl.auth"):
        assert tls_caller(ca.pem()).identity == ANONYMOUS
    assert not [r for r in caplog.records if r.name == "vmctl.auth"]


# Names as an attacker might try them: mostly printable, with the odd control,
# invisible or non-ASCII character, a NUL and the separators that matter.
_name_text = st.text(
    st.one_of(
        st.sampled_from("abcz09.-_:/*@ "),
        st.sampled_from("\0\n\x1b\x7f\x85\u200b\u202e\u2028\u00e9\uff0e\u0440"),
        st.characters(exclude_categories=("Cs",)),
    ),
    max_size=40,
)


@pytest.mark.unprivileged
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    uris=st.lists(_name_text, max_size=2),
    dns_names=st.lists(_name_text, max_size=2),
    common_names=st.lists(_name_text.filter(bool), max_size=2),
)
def test_an_identity_is_always_one_whole_printable_name_of_the_certificate(ca, uris, dns_names, common_names):
    sans = [("uri", u.encode()) for u in uris] + [("dns", d.encode()) for d in dns_names]
    identity = identity_of(ca, sans=sans, common_names=common_names)
    if identity is None:
        return
    whole_names = set(uris) | {f"dns:{d}" for d in dns_names} | {f"cn:{c}" for c in common_names}
    assert identity in whole_names  # never a part of a name
    assert identity.isascii() and identity.isprintable() and "\0" not in identity
    assert not identity.startswith(("uid:", "gid:", "anonymous"))


# ---- end to end: an agent under mutual TLS ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


POLICY = """
rules:
  - name: reclaimers
    identities: ["dns:reclaimer.ops", "spiffe://cluster/ns/ops/sa/reclaimer", "cn:reclaimer.ops"]
    verbs: [read, advise]
    advices: [cold]
"""


@pytest.fixture
def mtls_agent(start_agent, tmp_path):
    """(agent, pki, client for a CertFiles) of an agent whose policy grants the reclaimers."""
    pki = Pki(tmp_path / "pki")
    server = pki.issue("agent", dns=["localhost"])
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    port = _free_port()
    agent = start_agent(
        *("--listen", f"tcp://127.0.0.1:{port}", "--tls-cert", server.cert, "--tls-key", server.key),
        *("--client-ca", pki.ca, "--policy", str(policy), "--log-format", "json"),
    )

    def client(files) -> Client:
        tls = TlsOptions(ca=pki.ca, cert=files.cert, key=files.key, server_name="localhost")
        return Client(f"127.0.0.1:{port}", tls=tls, retry=NO_RETRY, timeout=10)

    return agent, pki, client


def _log_entries(agent) -> list[dict]:
    return [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]


def test_a_name_cut_at_nul_is_not_the_name_it_starts_with(mtls_agent, target):
    agent, pki, client = mtls_agent
    start, _end = target.map_anon(16 * PAGE, seed=3)
    genuine = {
        "dns": pki.issue_names("dns-reclaimer", sans=[("dns", "reclaimer.ops")]),
        "uri": pki.issue_names("uri-reclaimer", sans=[("uri", "spiffe://cluster/ns/ops/sa/reclaimer")]),
        "cn": pki.issue_names("cn-reclaimer", common_names=["reclaimer.ops"]),
    }
    forged = {
        "dns": pki.issue_names("dns-nul", sans=[("dns", NUL_DNS)], common_names=["reclaimer.ops"]),
        "uri": pki.issue_names("uri-nul", sans=[("uri", NUL_URI)]),
        "cn": pki.issue_names("cn-nul", common_names=[NUL_CN]),
    }
    for kind in ("dns", "uri", "cn"):
        with client(genuine[kind]) as reclaimer:  # the policy does grant the whole name
            cookie = reclaimer.get_vma_info(target.pid).cookie
            reclaimer.advise_ranges(target.pid, [(start, start + PAGE)], "cold", cookie=cookie, dry_run=True)
        with client(forged[kind]) as attacker:
            error = expect_error(lambda: attacker.get_vma_info(target.pid), "UNAUTHENTICATED", "UNAUTHENTICATED")
            assert error.metadata["transport"] == "tls"
            expect_error(
                lambda attacker=attacker, cookie=cookie: attacker.advise_ranges(
                    target.pid, [(start, start + PAGE)], "cold", cookie=cookie
                ),
                "UNAUTHENTICATED",
                "UNAUTHENTICATED",
            )
    target.verify()

    assert agent.stop() == 0  # the counts of folded refusals are written on the way out
    records = audit_records(agent.log())
    assert [(r["identity"], r["transport"]) for r in records if r["status"] == "OK"] == [
        ("dns:reclaimer.ops", "tls"),
        ("spiffe://cluster/ns/ops/sa/reclaimer", "tls"),
        ("cn:reclaimer.ops", "tls"),
    ]
    refused = [r for r in records if r["status"] != "OK"]
    assert {(r["identity"], r["transport"], r["status"]) for r in refused} == {("anonymous", "tls", "UNAUTHENTICATED")}
    assert sum(r.get("repeated", 1) for r in refused) == 3  # one per forged advice, folded (SECURITY.md)
    warnings = [e for e in _log_entries(agent) if e["logger"] == "vmctl.auth"]
    assert len(warnings) == 6 and {e["level"] for e in warnings} == {"warning"}  # once per forged call
    for entry in warnings:
        assert "holds the character U+0000" in entry["message"], entry
        assert "\\x00.attacker.example" in entry["message"] and entry["request_id"], entry
    raw_log = agent.log_path.read_bytes()
    assert b"\0" not in raw_log and b"\\u0000" not in raw_log  # never echoed raw, nor as JSON's escape of it


@pytest.mark.parametrize(
    "names",
    [
        {"sans": [("dns", "r\u00e9claimer.ops".encode())]},
        {"sans": [("dns", "-"), ("dns", "reclaimer.ops")]},  # the first DNS SAN is bad: no fall through
        {"common_names": ["reclaimer.ops", "reclaimer.ops"]},
        {"common_names": ["spo.remialcer\u202e"]},
        {"common_names": ["reclaimer.ops" + "." * 60]},  # over 64 characters
    ],
    ids=["utf8-dns", "bad-first-dns", "two-cns", "rtl-override", "long-cn"],
)
def test_other_forged_names_are_not_admitted_and_the_agent_goes_on(mtls_agent, target, names):
    """None is admitted under any name, none breaks the call with INTERNAL, and
    the agent serves the next caller. (The TLS layer may refuse a certificate
    itself: UNAVAILABLE. A common name that is not UTF-8 is not here: gRPC's
    client will not even load such a certificate, so only the unit tests above
    show what the agent does with one.)"""
    agent, pki, client = mtls_agent
    with client(pki.issue_names("forged", **names)) as attacker, pytest.raises(VmctlError) as refused:
        attacker.get_vma_info(target.pid)
    assert (refused.value.code, refused.value.reason) in {("UNAUTHENTICATED", "UNAUTHENTICATED"), ("UNAVAILABLE", "")}
    with client(pki.issue_names("genuine", sans=[("dns", "reclaimer.ops")])) as reclaimer:
        assert reclaimer.get_vma_info(target.pid).process.pid == target.pid
    entries = _log_entries(agent)
    assert not [e for e in entries if e["level"] in ("error", "critical")], entries
    assert "Traceback" not in agent.log() and "Warning:" not in agent.log()  # nothing on stderr but log lines

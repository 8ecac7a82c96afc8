"""The agent's log after real calls: JSON lines with levels and request ids,
and never a secret (the cookie key, the TLS key, a cookie)."""

from __future__ import annotations

import base64
import json
import pathlib
import re
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.certs import Pki

from vmctl_api import vmctl_pb2 as pb
from vmctl_api import vmctl_pb2_grpc
from vmctl_client import Client, TlsOptions

MiB = 1 << 20
GENERATED_ID = re.compile(r"[0-9a-f]{16}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encodings(secret: bytes) -> list[bytes]:
    """How a secret could show up in a text log."""
    return [
        secret,
        secret.hex().encode(),
        base64.b64encode(secret),
        base64.urlsafe_b64encode(secret),
        repr(secret).encode(),
    ]


def _call(stub_method, request, request_id: str | None):
    metadata = (("x-request-id", request_id),) if request_id else None
    try:
        return stub_method(request, metadata=metadata, timeout=30), None
    except grpc.RpcError as exc:
        return None, exc.code()


def _access_lines(log_text: str) -> list[dict]:
    return [entry for entry in map(json.loads, log_text.splitlines()) if entry["logger"] == "vmctl.access"]


def test_json_log_has_levels_request_ids_and_no_secrets(start_agent, target, tmp_path):
    key_file = tmp_path / "cookie.key"
    pki = Pki(tmp_path / "pki")
    server = pki.issue("localhost", dns=["localhost"])
    reader = pki.issue("log-reader")
    tls_key_pem = pathlib.Path(server.key).read_bytes()
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        'rules: [{identities: ["uid:0"], verbs: [read, advise]}, {identities: ["cn:log-reader"], verbs: [read]}]'
    )
    port = _free_port()
    agent = start_agent(
        "--cookie-key-file",
        str(key_file),
        "--policy",
        str(policy),
        "--listen",
        f"tcp://127.0.0.1:{port}",
        "--tls-cert",
        server.cert,
        "--tls-key",
        server.key,
        "--client-ca",
        pki.ca,
        "--log-format",
        "json",
        "--log-level",
        "debug",
    )
    start, end = target.map_anon(2 * MiB)
    cookies = []
    with grpc.insecure_channel(agent.address) as channel:
        stub = vmctl_pb2_grpc.VmControlStub(channel)
        info, _ = _call(stub.GetVmaInfo, pb.GetVmaInfoRequest(pid=target.pid, attr_mask=4), "read-1")
        cookies.append(info.cookie)
        advise = pb.AdviseRangesRequest(
            pid=target.pid, ranges=[pb.AddressRange(start=start, end=end)], advice=1, cookie=info.cookie
        )
        assert _call(stub.AdviseRanges, advise, "advise-1")[0].advised_bytes == end - start
        garbled = pb.AdviseRangesRequest()
        garbled.CopyFrom(advise)
        garbled.cookie = info.cookie[:-1] + bytes([info.cookie[-1] ^ 1])
        assert _call(stub.AdviseRanges, garbled, "forged-1")[1] == grpc.StatusCode.INVALID_ARGUMENT
        target.map_anon(MiB)
        assert _call(stub.AdviseRanges, advise, None)[1] == grpc.StatusCode.FAILED_PRECONDITION
        unusable_id = "x" * 300  # too long to be an id: the agent makes its own
        assert _call(stub.GetNodeInfo, pb.GetNodeInfoRequest(), unusable_id)[0].hostname
    tls = TlsOptions(ca=pki.ca, cert=reader.cert, key=reader.key, server_name="localhost")
    with Client(f"127.0.0.1:{port}", tls=tls) as over_tls:
        cookies.append(over_tls.get_vma_info(target.pid).cookie)
    assert agent.stop() == 0
    log_text = agent.log()

    # Every line is one JSON object with the documented keys (grpc's own loggers included).
    entries = [json.loads(line) for line in log_text.splitlines()]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        assert entry["level"] in {"debug", "info", "warning", "error", "critical"}
    access = _access_lines(log_text)
    by_id = {entry["request_id"]: entry for entry in access if "VmControl" in entry["method"]}
    assert by_id["read-1"]["code"] == "OK" and by_id["read-1"]["level"] == "info"
    assert by_id["read-1"]["pid"] == target.pid and by_id["read-1"]["duration_ms"] >= 0
    assert by_id["advise-1"]["method"] == "vmctl.v1.VmControl/AdviseRanges"
    assert (by_id["forged-1"]["code"], by_id["forged-1"]["reason"]) == ("INVALID_ARGUMENT", "COOKIE_INVALID")
    generated = [entry for entry in access if GENERATED_ID.fullmatch(entry["request_id"])]
    assert {(e["method"].rsplit("/")[-1], e.get("reason")) for e in generated} >= {
        ("AdviseRanges", "LAYOUT_CHANGED"),
        ("GetNodeInfo", None),
        ("GetVmaInfo", None),  # the TLS call
    }
    assert unusable_id not in log_text

    # No secret, in any encoding.
    secrets = [key_file.read_bytes(), *cookies]
    pem_body = b"".join(line for line in tls_key_pem.splitlines() if not line.startswith(b"-----"))
    secrets += [pem_body[i : i + 24] for i in range(0, len(pem_body) - 24, 24)]
    raw_log = agent.log_path.read_bytes()
    for secret in secrets:
        for form in _encodings(secret):
            assert form not in raw_log, f"a secret reached the log: {form[:12]!r}..."


def test_text_log_is_the_default_and_carries_the_request_id(start_agent, target):
    agent = start_agent()
    with grpc.insecure_channel(agent.address) as channel:
        stub = vmctl_pb2_grpc.VmControlStub(channel)
        _call(stub.GetVmaInfo, pb.GetVmaInfoRequest(pid=target.pid), "trace-42")
    agent.stop()
    lines = [line for line in agent.log().splitlines() if "vmctl.access" in line]
    assert len(lines) == 1, agent.log()
    assert re.search(
        r" INFO vmctl\.access: GetVmaInfo OK request_id=trace-42 method=vmctl\.v1\.VmControl/GetVmaInfo", lines[0]
    )
    assert f"pid={target.pid}" in lines[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])


def test_the_request_id_is_echoed_in_the_trailers(agent, target):
    with grpc.insecure_channel(agent.address) as channel:
        stub = vmctl_pb2_grpc.VmControlStub(channel)
        _, call = stub.GetNodeInfo.with_call(pb.GetNodeInfoRequest(), metadata=[("x-request-id", "trace-7")])
        assert dict(call.trailing_metadata())["x-request-id"] == "trace-7"
        stream = stub.StreamVmaInfo(pb.StreamVmaInfoRequest(pid=target.pid), metadata=[("x-request-id", "trace-8")])
        assert len(list(stream)) >= 2
        assert dict(stream.trailing_metadata())["x-request-id"] == "trace-8"
        with pytest.raises(grpc.RpcError) as refused:  # a refusal too, beside its ErrorInfo
            stub.GetVmaInfo(pb.GetVmaInfoRequest(pid=0), metadata=[("x-request-id", "trace-9")])
        trailers = dict(refused.value.trailing_metadata())
        assert trailers["x-request-id"] == "trace-9" and "grpc-status-details-bin" in trailers
        health = health_pb2_grpc.HealthStub(channel)  # every service's calls, not VmControl's alone
        _, call = health.Check.with_call(health_pb2.HealthCheckRequest(), metadata=[("x-request-id", "trace-10")])
        assert dict(call.trailing_metadata())["x-request-id"] == "trace-10"
        _, call = stub.GetNodeInfo.with_call(pb.GetNodeInfoRequest(), metadata=[("x-request-id", "not usable!")])
        made = dict(call.trailing_metadata())["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", made)
    assert f"request_id={made} " in agent.log()  # the id the agent made is the one it logged

"""The contract: generated stubs, status mapping, cookies (the shared numbers: test_words.py)."""

from __future__ import annotations

import filecmp
import functools
import os
import pathlib
import re
import subprocess
import sys

import pytest
from google.rpc import code_pb2
from support.node_tools import bin_path

from vmctl_api import vmctl_pb2 as pb
from vmctl_server.core import faults
from vmctl_server.core.advice import ADVICE_UNSPECIFIED
from vmctl_server.core.cookie import COOKIE_SIZE, CookieClaims, CookieSigner
from vmctl_server.transport import grpc_status

pytestmark = pytest.mark.unprivileged

ROOT = pathlib.Path(__file__).resolve().parent.parent
STUBS = ROOT / "src" / "vmctl_api"
PROTO = ROOT / "proto" / "vmctl" / "v1" / "vmctl.proto"


def test_committed_stubs_equal_what_the_proto_generates(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)], check=True)
    for name in ("vmctl_pb2.py", "vmctl_pb2.pyi", "vmctl_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / name, STUBS / name, shallow=False), (
            f"{name} is stale: run `make proto` and commit the result"
        )


def test_a_left_out_advice_is_the_protos_unspecified():
    assert ADVICE_UNSPECIFIED == pb.ADVICE_UNSPECIFIED


def test_buf_lint_is_clean():
    """STANDARD and COMMENTS (a leading comment on everything), with the one
    exception buf.yaml writes down (the fixed service name VmControl)."""
    result = subprocess.run(
        [str(bin_path("buf")), "lint", "--error-format", "text"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_buf_lint_can_fail(tmp_path):
    """The lint above is not vacuous: an RPC without a comment, in a copy of the module, is found."""
    copy = tmp_path / PROTO.relative_to(ROOT)
    copy.parent.mkdir(parents=True)
    undocumented = "  rpc Undocumented(UndocumentedRequest) returns (UndocumentedResponse);"
    messages = "\n// Documented.\nmessage UndocumentedRequest {}\n// Documented.\nmessage UndocumentedResponse {}\n"
    copy.write_text(PROTO.read_text().replace("service VmControl {", "service VmControl {\n" + undocumented) + messages)
    (tmp_path / "buf.yaml").write_text((ROOT / "buf.yaml").read_text())
    result = subprocess.run(
        [str(bin_path("buf")), "lint", "--error-format", "text"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert 'RPC "Undocumented" should have a non-empty comment' in result.stdout
    assert "should be suffixed" not in result.stdout  # the exception buf.yaml writes down holds in the copy too


def test_every_rpc_says_whether_it_is_safe_to_retry():
    rpcs = re.findall(r"((?:^  //.*\n)+)  rpc (\w+)\(", PROTO.read_text(), re.MULTILINE)
    assert {name for _, name in rpcs} == set(pb.DESCRIPTOR.services_by_name["VmControl"].methods_by_name)
    for comment, name in rpcs:
        assert re.search(r"// Retry: (safe|not safe)", comment), f"{name} does not say whether a retry is safe"


def test_other_languages_can_generate_from_the_proto():
    assert pb.DESCRIPTOR.GetOptions().go_package == "vmctl.dev/api/vmctl/v1;vmctlv1"
    # The errno field is error_number on the same number: generated C++ has an errno() accessor otherwise,
    # which the errno macro breaks. The wire is unchanged.
    fields = pb.RangeResult.DESCRIPTOR.fields_by_name
    assert "errno" not in fields
    assert (fields["error_number"].number, fields["error_number"].type) == (6, fields["error_number"].TYPE_INT32)


def _fields(message) -> list[tuple]:
    return [
        (f.name, f.number, f.type, f.is_repeated, f.message_type and f.message_type.full_name) for f in message.fields
    ]


def test_stream_vma_info_takes_get_vma_infos_request_and_answers_its_fields():
    """So one request's bytes serve either RPC, and a stream's messages,
    concatenated, parse as the GetVmaInfoResponse of that snapshot."""
    assert _fields(pb.StreamVmaInfoRequest.DESCRIPTOR) == _fields(pb.GetVmaInfoRequest.DESCRIPTOR)
    assert _fields(pb.StreamVmaInfoResponse.DESCRIPTOR) == _fields(pb.GetVmaInfoResponse.DESCRIPTOR)
    method = pb.DESCRIPTOR.services_by_name["VmControl"].methods_by_name["StreamVmaInfo"]
    assert (method.client_streaming, method.server_streaming) == (False, True)


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (functools.partial(faults.InvalidRequest, reason="RANGE_EMPTY"), code_pb2.INVALID_ARGUMENT),
        (faults.CookieInvalid, code_pb2.INVALID_ARGUMENT),
        (faults.CookieRequired, code_pb2.INVALID_ARGUMENT),
        (faults.LayoutChanged, code_pb2.FAILED_PRECONDITION),
        (faults.ProcessGone, code_pb2.NOT_FOUND),
        (faults.ProcessChanged, code_pb2.FAILED_PRECONDITION),
        (faults.NoAddressSpace, code_pb2.FAILED_PRECONDITION),
        (faults.AccessDenied, code_pb2.PERMISSION_DENIED),
        (faults.KernelUnsupported, code_pb2.FAILED_PRECONDITION),
    ],
)
def test_every_fault_has_its_documented_status(fault, code):
    rendered = grpc_status.to_status(fault("why", field="ranges[3]"))
    assert rendered.code.value[0] == code
    assert rendered.details == "why"
    assert any(key == "grpc-status-details-bin" for key, _ in rendered.trailing_metadata)


def _claims(**overrides) -> CookieClaims:
    values = dict(boot_id=b"b" * 16, pid=42, start_time=1234, exec_id=b"e" * 16, layout_digest=b"d" * 32)
    values.update(overrides)
    return CookieClaims(**values)


def test_cookie_round_trip_and_tamper_evidence():
    signer = CookieSigner.with_random_key()
    cookie = signer.issue(_claims())
    assert len(cookie) == COOKIE_SIZE
    assert signer.verify(cookie) == _claims()
    with pytest.raises(faults.CookieInvalid):
        CookieSigner.with_random_key().verify(cookie)  # another agent's key
    assert signer.issue(_claims(pid=43)) != cookie


def test_cookie_key_file_is_created_private_and_reused(tmp_path):
    path = tmp_path / "key"
    first = CookieSigner.from_key_file(str(path))
    assert os.stat(path).st_mode & 0o777 == 0o600
    cookie = first.issue(_claims())
    assert CookieSigner.from_key_file(str(path)).verify(cookie) == _claims()
    path.chmod(0o640)
    with pytest.raises(OSError, match="chmod 600"):  # files.UnsafePath
        CookieSigner.from_key_file(str(path))
    short = tmp_path / "short"
    short.write_bytes(b"x" * 8)
    short.chmod(0o600)
    with pytest.raises(ValueError, match="holds 8 bytes, not the 32 it must"):
        CookieSigner.from_key_file(str(short))
    assert "key" not in repr(first).replace("<key hidden>", "")

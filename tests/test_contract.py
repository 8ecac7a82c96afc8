"""The contract: generated stubs, shared numbers, status mapping, cookies."""

from __future__ import annotations

import filecmp
import os
import pathlib
import subprocess
import sys

import pytest
from google.rpc import code_pb2

from vmctl_api import vmctl_pb2 as pb
from vmctl_server.core import attrs, faults, layout
from vmctl_server.core.advice import ADVICES, FILTER_ANONYMOUS, FILTER_FILE, FILTER_NONE
from vmctl_server.core.cookie import COOKIE_SIZE, CookieClaims, CookieSigner
from vmctl_server.transport import grpc_status

pytestmark = pytest.mark.unprivileged

ROOT = pathlib.Path(__file__).resolve().parent.parent
STUBS = ROOT / "src" / "vmctl_api"


def test_committed_stubs_equal_what_the_proto_generates(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)], check=True)
    for name in ("vmctl_pb2.py", "vmctl_pb2.pyi", "vmctl_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / name, STUBS / name, shallow=False), (
            f"{name} is stale: run `make proto` and commit the result"
        )


def test_core_numbers_equal_the_proto_enums():
    assert (attrs.ATTR_LAYOUT, attrs.ATTR_BUILD_ID, attrs.ATTR_RESIDENCY, attrs.ATTR_ACCOUNTING) == (
        pb.VMA_ATTR_LAYOUT,
        pb.VMA_ATTR_BUILD_ID,
        pb.VMA_ATTR_RESIDENCY,
        pb.VMA_ATTR_ACCOUNTING,
    )
    assert (layout.KIND_ANONYMOUS, layout.KIND_FILE, layout.KIND_SPECIAL) == (
        pb.VMA_KIND_ANONYMOUS,
        pb.VMA_KIND_FILE,
        pb.VMA_KIND_SPECIAL,
    )
    assert {name: number for name, (number, _) in ADVICES.items()} == {
        name.removeprefix("ADVICE_").lower(): number
        for name, number in pb.Advice.items()
        if number != pb.ADVICE_UNSPECIFIED
    }
    assert (FILTER_NONE, FILTER_ANONYMOUS, FILTER_FILE) == (
        pb.FILTER_UNSPECIFIED,
        pb.FILTER_ANONYMOUS,
        pb.FILTER_FILE,
    )


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (faults.InvalidRequest, code_pb2.INVALID_ARGUMENT),
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

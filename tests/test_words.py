"""One vocabulary: vmctl_api.words against everything that repeats it.

The proto's enums (through the generated descriptor), the C extension's
numbers (read from its header and source text), the kernel's madvise numbers
(from its uapi header), every reason a fault can carry, the client's
exception for each reason (through a real gRPC server and the agent's own
status mapping), the README's error table, and the cookie outcomes audit and
metrics share. Runs without root.
"""

from __future__ import annotations

import ast
import itertools
import pathlib
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from vmctl_api import vmctl_pb2 as pb
from vmctl_api import vmctl_pb2_grpc as pb_grpc
from vmctl_api import words
from vmctl_client import (
    AgentStoppingError,
    AuditUnavailableError,
    Client,
    InvalidRequestError,
    PermissionDeniedError,
    ProcessChangedError,
    ProcessGoneError,
    RetryPolicy,
    StaleCookieError,
    VmctlError,
)
from vmctl_client.errors import ERRORS_BY_REASON
from vmctl_server.access import audit
from vmctl_server.core import faults
from vmctl_server.core.advice import RANGE_REASONS, range_fault
from vmctl_server.runtime import metrics
from vmctl_server.transport import grpc_status

pytestmark = pytest.mark.unprivileged

ROOT = pathlib.Path(__file__).resolve().parent.parent
SERVER = ROOT / "src" / "vmctl_server"
CSRC = SERVER / "backends" / "native" / "csrc"


# ---- the proto ---------------------------------------------------------------------


def _enum(name: str) -> dict[str, int]:
    return {value.name: value.number for value in pb.DESCRIPTOR.enum_types_by_name[name].values}


def test_the_proto_enums_are_the_words() -> None:
    assert _enum("VmaAttr") == {
        "VMA_ATTR_UNSPECIFIED": 0,
        **{f"VMA_ATTR_{group.upper()}": bits for group, bits in words.GROUPS.items() if group != "all"},
    }
    assert words.ATTR_ALL == words.GROUPS["all"] == words.ATTR_KNOWN & ~words.ATTR_ACCESS  # "all" needs no window
    assert sum(words.GROUP_WORDS) == words.ATTR_KNOWN
    assert _enum("VmaKind") == {
        "VMA_KIND_UNSPECIFIED": 0,
        **{f"VMA_KIND_{k.upper()}": n for k, n in words.KINDS.items()},
    }
    assert _enum("Advice") == {
        "ADVICE_UNSPECIFIED": 0,
        **{f"ADVICE_{name.upper()}": numbers.number for name, numbers in words.ADVICES.items()},
    }
    assert _enum("Filter") == {
        ("FILTER_UNSPECIFIED" if name == "none" else f"FILTER_{name.upper()}"): filter_.number
        for name, filter_ in words.FILTERS.items()
    }


def test_every_word_names_a_field_of_the_vma_message_and_every_field_has_a_word() -> None:
    fields = set(pb.Vma.DESCRIPTOR.fields_by_name)
    assert set(words.VMA_FIELDS.values()) == fields - {"raw_path"}  # raw_path: the bytes behind path
    assert set(words.WORD_GROUP) == set(words.VMA_FIELDS) == set(itertools.chain(*words.GROUP_WORDS.values()))
    numbers = [field.number for field in pb.Vma.DESCRIPTOR.fields]
    assert len(numbers) == len(set(numbers))


# ---- the kernel and the C extension -------------------------------------------------

MMAN_H = pathlib.Path("/usr/include/asm-generic/mman-common.h")


def _defines(text: str, pattern: str) -> dict[str, int]:
    """``#define NAME 123[u]`` lines whose NAME matches ``pattern``."""
    return {m[1]: int(m[2]) for m in re.finditer(rf"^#define\s+({pattern})\s+(\d+)u?\b", text, re.MULTILINE)}


@pytest.mark.skipif(not MMAN_H.exists(), reason="no Linux uapi headers (linux-libc-dev) on this machine")
def test_the_madvise_numbers_are_the_kernel_s() -> None:
    kernel = _defines(MMAN_H.read_text(), r"MADV_\w+")
    assert {f"MADV_{name.upper()}": numbers.madvise for name, numbers in words.ADVICES.items()} == {
        f"MADV_{name.upper()}": kernel[f"MADV_{name.upper()}"] for name in words.ADVICES
    }


def test_the_c_extension_has_the_words_numbers() -> None:
    shared = _defines((CSRC / "vmctl_internal.h").read_text(), r"KIND_\w+|ATTR_\w+")
    assert set(shared) == {
        "KIND_ANONYMOUS",
        "KIND_FILE",
        "KIND_SPECIAL",
        "ATTR_BUILD_ID",
        "ATTR_RESIDENCY",
        "ATTR_ACCOUNTING",
        "ATTR_ACCESS",
    }
    assert shared == {name: getattr(words, name) for name in shared}


def _c_enum(text: str, prefix: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(rf"\b({prefix}\w+)\s*=\s*(\d+)", text)}


def test_the_c_encoder_numbers_vma_fields_as_the_proto_does() -> None:
    constants = _c_enum((CSRC / "vmctl_native.c").read_text(), "F_")
    constants.pop("F_UNKNOWN")

    def field(constant: str) -> str:
        name = constant.removeprefix("F_").lower()
        return words.VMA_FIELDS.get(name, name)

    by_field = {field(constant): number for constant, number in constants.items()}
    assert by_field == {f.name: f.number for f in pb.Vma.DESCRIPTOR.fields}


def test_the_c_range_refusals_are_the_reasons_range_fault_words() -> None:
    refusals = _c_enum((CSRC / "vmctl_native.h").read_text(), "VMCTL_RANGE_")
    assert sorted(refusals, key=refusals.get) == [f"VMCTL_{reason}" for reason in RANGE_REASONS]
    for reason in RANGE_REASONS:
        assert range_fault(reason, 3, 0, 4096).reason == reason
        assert reason in words.REASONS
    with pytest.raises(ValueError, match="no such range fault"):
        range_fault("RANGE_PURPLE", 3, 0, 4096)


# ---- every reason the agent can send ------------------------------------------------


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _raised_reasons() -> dict[str, str]:
    """Every ``reason="..."`` given to a fault class anywhere in the agent: reason -> where."""
    fault_names = {cls.__name__ for cls in (faults.VmctlFault, *_subclasses(faults.VmctlFault))}
    found: dict[str, str] = {}
    for path in SERVER.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            for keyword in node.keywords:
                if callee in fault_names and keyword.arg == "reason" and isinstance(keyword.value, ast.Constant):
                    found[keyword.value.value] = f"{path.relative_to(ROOT)}:{node.lineno}"
    return found


def test_every_reason_a_fault_can_carry_is_in_the_registry() -> None:
    classes = [faults.VmctlFault, *_subclasses(faults.VmctlFault)]
    assert len(classes) > 15
    assert {cls.__name__: cls.reason for cls in classes if cls.reason not in words.REASONS} == {}
    raised = _raised_reasons()
    assert {"MALFORMED_REQUEST", "CONCURRENCY_LIMIT", "INVALID_PID", "UNKNOWN_ADVICE"} <= set(raised)  # the scan sees
    assert {reason: where for reason, where in raised.items() if reason not in words.REASONS} == {}
    assert set(RANGE_REASONS) <= set(words.REASONS)
    assert set(audit._COOKIE_BY_REASON) | audit._AFTER_COOKIE <= set(words.REASONS)


def test_an_invalid_request_always_names_its_reason() -> None:
    with pytest.raises(TypeError, match="reason"):
        faults.InvalidRequest("no reason given")


# The client's class for each reason, where it says more than the status code does.
SPECIFIC_ERRORS: dict[str, type[VmctlError]] = {
    "LAYOUT_CHANGED": StaleCookieError,
    "PROCESS_CHANGED": ProcessChangedError,
    "PROCESS_GONE": ProcessGoneError,
    "AGENT_STOPPING": AgentStoppingError,
    "AUDIT_UNAVAILABLE": AuditUnavailableError,
}
ERRORS_BY_STATUS: dict[str, type[VmctlError]] = {
    "INVALID_ARGUMENT": InvalidRequestError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "UNAUTHENTICATED": PermissionDeniedError,
}
REASON_ORDER = sorted(words.REASONS)


class Refuser(pb_grpc.VmControlServicer):
    """Answers GetVmaInfo(pid=i) with the agent's own status for the i-th
    reason: a fault with no message, as grpc_status renders it."""

    def GetVmaInfo(self, request: pb.GetVmaInfoRequest, context: grpc.ServicerContext) -> Any:
        fault = faults.VmctlFault("", reason=REASON_ORDER[request.pid], field="pid")
        context.abort_with_status(grpc_status.to_status(fault))


@pytest.fixture
def refuser(tmp_path: pathlib.Path) -> Iterator[str]:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_VmControlServicer_to_server(Refuser(), server)
    address = f"unix://{tmp_path}/refuser.sock"
    server.add_insecure_port(address)
    server.start()
    try:
        yield address
    finally:
        server.stop(0)


def test_every_reason_reaches_the_client_with_its_status_class_and_meaning(refuser: str) -> None:
    assert set(ERRORS_BY_REASON) == set(words.REASONS)
    with Client(refuser, retry=RetryPolicy(attempts=1)) as client:
        for pid, reason in enumerate(REASON_ORDER):
            with pytest.raises(VmctlError) as caught:
                client.get_vma_info(pid)
            error, meaning = caught.value, words.REASONS[reason]
            expected = SPECIFIC_ERRORS.get(reason) or ERRORS_BY_STATUS.get(meaning.status, VmctlError)
            assert (type(error), error.code, error.reason) == (expected, meaning.status, reason)
            assert error.message == meaning.means  # the agent sent none: what the reason means
            assert error.metadata == {"field": "pid"}


def test_every_status_in_the_registry_is_a_grpc_status() -> None:
    for reason, meaning in words.REASONS.items():
        assert grpc_status.code_for(faults.VmctlFault("", reason=reason)) == grpc.StatusCode[meaning.status].value[0]
    assert grpc_status.code_for(faults.VmctlFault("", reason="NO_SUCH_REASON")) == grpc.StatusCode.INTERNAL.value[0]


def _readme_error_table() -> dict[str, str]:
    """The README's table of refusals: reason -> status."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("**Errors**") : text.index("## The agent")]
    table: dict[str, str] = {}
    for row in re.findall(r"^\|(.*)\|$", section, re.MULTILINE):
        cells = [cell.strip() for cell in row.split("|")]
        if len(cells) == 3 and cells[1].startswith("`"):
            for reason in re.findall(r"`([A-Z_]+)`", cells[2]):
                table[reason] = cells[1].strip("`")
    return table


def test_the_readme_documents_every_reason_with_its_status() -> None:
    documented = _readme_error_table()
    assert len(documented) > 20
    assert {reason: words.REASONS[reason].status for reason in documented} == documented
    assert set(words.REASONS) - set(documented) <= {"INTERNAL"}  # a bug, not a refusal to document


# ---- cookie outcomes: the audit log's words are the metrics' -------------------------


def test_audit_and_metrics_speak_the_same_cookie_outcomes() -> None:
    outcomes = {
        audit.cookie_outcome(sent, status, reason)
        for sent in (False, True)
        for status in ("OK", *{m.status for m in words.REASONS.values()})
        for reason in ("", *words.REASONS)
    }
    assert outcomes == set(words.COOKIE_OUTCOMES)
    labels = {s.labels["outcome"] for family in metrics.COOKIE_CHECKS.collect() for s in family.samples}
    assert labels == set(words.COOKIE_OUTCOMES)

"""What mypy is told about the cffi boundary matches the C it stands for.

cffi's stubs cannot know what a cdef declares, so the agent says it twice:
``core.kernel``'s Protocols for the structs and libc functions it declares,
and ``backends/native/_native.pyi`` for the extension's functions. These
tests hold each to the declaration itself (through cffi's own view of it), so
a field or function added, removed or reshaped in C fails here, by name,
rather than leaving the type checker believing the old shape. Runs without
root.
"""

from __future__ import annotations

import pytest

from vmctl_server.core import kernel

pytestmark = pytest.mark.unprivileged


@pytest.mark.parametrize(
    ("protocol", "struct"),
    [(kernel._ProcmapQuery, "struct procmap_query"), (kernel._PmScanArg, "struct pm_scan_arg")],
)
def test_kernel_struct_protocols_are_the_cdef(protocol: type, struct: str) -> None:
    declared = [name for name, _field in kernel.ffi.typeof(struct).fields]
    assert list(protocol.__annotations__) == declared
    assert set(protocol.__annotations__.values()) == {"int"}  # every field is a uint*_t


def test_kernel_libc_protocol_is_what_is_declared() -> None:
    for name in ("syscall", "ioctl"):
        assert kernel.ffi.typeof(getattr(kernel._libc, name)).ellipsis, name  # variadic, as the Protocol says
    assert [n for n in vars(kernel._Libc) if not n.startswith("_")] == ["syscall", "ioctl"]

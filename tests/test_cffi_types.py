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

import ast
import pathlib

import pytest

from vmctl_server.backends.native import _native
from vmctl_server.core import kernel

pytestmark = pytest.mark.unprivileged

STUB = pathlib.Path(_native.__file__).resolve().parent / "_native.pyi"


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


def _stub_lib() -> ast.ClassDef:
    tree = ast.parse(STUB.read_text(encoding="utf-8"))
    (lib,) = (node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "_Lib")
    return lib


def test_native_stub_names_everything_the_extension_has() -> None:
    stub = {
        node.target.id if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) else node.name
        for node in _stub_lib().body
        if isinstance(node, (ast.AnnAssign, ast.FunctionDef))
    }
    assert stub == set(dir(_native.lib))


def test_native_stub_signatures_are_the_c_ones() -> None:
    """Each function's arity, and an int for every C integer, cdata for every pointer, None for void."""
    for node in _stub_lib().body:
        if not isinstance(node, ast.FunctionDef):
            continue
        ctype = _native.ffi.typeof(getattr(_native.lib, node.name))
        params = node.args.posonlyargs[1:]  # after self
        assert not node.args.args and not node.args.kwonlyargs, f"{node.name}: C takes positional arguments only"
        assert len(params) == len(ctype.args), node.name
        for param, arg in zip(params, ctype.args, strict=True):
            assert param.annotation is not None
            written = ast.unparse(param.annotation)
            allowed = {"int"} if arg.kind == "primitive" else {"_CData", "_CData | bytes"}
            assert written in allowed, (node.name, param.arg, arg.cname)
        assert node.returns is not None
        result = {"void": "None", "primitive": "int", "pointer": "_CData"}[ctype.result.kind]
        assert ast.unparse(node.returns) == result, node.name

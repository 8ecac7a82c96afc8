"""cffi (API mode) build of :mod:`vmctl_server.backends.native._native` from vmctl_native.c.

setup.py names ``ffibuilder`` in ``cffi_modules``. To build in place while
developing, run this file: the extension lands in src/vmctl_server/backends/native/.

In a package build the extension is optional: without a working compiler (or the C library's
headers) the package installs without it, pure Python, so that the client installs anywhere.
``VMCTL_NATIVE=required`` (the container build, make setup) and the in-place build want it or
an error, and say first when there is no compiler at all.
"""

from __future__ import annotations

import ast
import os
import shlex
import shutil
import sysconfig
import tempfile
from pathlib import Path

import cffi

CSRC = Path(__file__).resolve().parent
PACKAGE = CSRC.parent  # vmctl_server/backends/native, where the module lands
KERNEL_MODULE = PACKAGE.parent.parent / "core" / "kernel.py"
HEADER = CSRC / "vmctl_native.h"
SOURCES = (CSRC / "vmctl_native.c", CSRC / "vmctl_advice.c")
NO_COMPILER = "vmctl needs a C compiler (cc/gcc) to build its native extension; install gcc / build-essential"


def require_compiler() -> None:
    """Fail now, with a plain sentence, rather than deep in setuptools."""
    # setuptools compiles with $CC whenever it is set (even empty), else with
    # the compiler Python was built with.
    if "CC" in os.environ:
        command = shlex.split(os.environ["CC"])
        if not command:
            raise RuntimeError(f"{NO_COMPILER} ($CC is set but empty)")
    else:
        command = shlex.split(sysconfig.get_config_var("CC") or "cc")
    if shutil.which(command[0]) is None:
        raise RuntimeError(f"{NO_COMPILER} (no {command[0]!r} on PATH)")


def kernel_cdef() -> str:
    """core.kernel.KERNEL_CDEF, read from the source: vmctl_server is not
    importable while a wheel is being built. Declaring it to cffi makes the
    extension check, when it loads, that the structs in vmctl_native.h have
    exactly the reference's layout."""
    tree = ast.parse(KERNEL_MODULE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "KERNEL_CDEF" for t in node.targets):
            cdef: str = ast.literal_eval(node.value)  # a string literal in kernel.py
            return cdef
    raise RuntimeError("vmctl_server/core/kernel.py defines no KERNEL_CDEF")


def api_cdef() -> str:
    """The API part of vmctl_native.h, so the declarations live in one place."""
    header = HEADER.read_text(encoding="utf-8")
    begin = header.index("/* cdef: begin")
    return header[begin : header.index("/* cdef: end */")]


NATIVE_REQUIRED = __name__ == "__main__" or os.environ.get("VMCTL_NATIVE") == "required"
if NATIVE_REQUIRED:
    require_compiler()
ffibuilder = cffi.FFI()
ffibuilder.cdef(kernel_cdef() + api_cdef())
ffibuilder.set_source(
    "vmctl_server.backends.native._native",
    '#include "vmctl_native.h"',
    # setuptools insists on paths relative to setup.py's directory (the cwd of
    # a package build); cffi's own compile() changes directory, so the
    # in-place build below needs them absolute.
    sources=[str(source) if __name__ == "__main__" else os.path.relpath(source) for source in SOURCES],
    include_dirs=[str(CSRC) if __name__ == "__main__" else os.path.relpath(CSRC)],
    extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
    optional=not NATIVE_REQUIRED,  # setuptools warns and goes on; setup.py then ships no extension
)

if __name__ == "__main__":
    # Build in a scratch directory (objects land under the absolute source
    # paths there) and keep only the module.
    with tempfile.TemporaryDirectory() as scratch:
        built = Path(ffibuilder.compile(tmpdir=scratch, verbose=True))
        shutil.copy2(built, PACKAGE / built.name)

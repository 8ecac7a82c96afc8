"""What pyproject.toml cannot spell: the agent's C extension (cffi_modules) and a wheel tagged
for what was really built. Everything else lives in pyproject.toml.

The extension is optional, so the client installs anywhere: on Linux it is built when a C
compiler works; a build that fails leaves a pure-Python package (py3-none-any), whose
vmctl-agent refuses to start without --no-native and says why. VMCTL_NATIVE=required (the
container build, make setup) turns that failure into an error (csrc/build.py). A built
extension is abi3, so its wheel is tagged cp310-abi3-<platform>: one wheel for every CPython
from requires-python's floor up.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext

NATIVE_BUILD = "src/vmctl_server/backends/native/csrc/build.py:ffibuilder"
OLDEST_PYTHON = "cp310"  # requires-python's floor: the stable ABI loads there and on every later CPython


class build_ext_where_possible(build_ext):
    """Builds the (optional) extensions; one that failed is dropped from the distribution, so
    that what is installed and how the wheel is tagged say there is none."""

    def run(self) -> None:
        super().run()
        built = [ext for ext in self.extensions if os.path.exists(self.get_ext_fullpath(ext.name))]
        self.distribution.ext_modules = built


class bdist_wheel_as_built(bdist_wheel):
    """py3-none-any without the extension, cp310-abi3-<platform> with it."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if any(getattr(ext, "py_limited_api", False) for ext in self.distribution.ext_modules or ()):
            self.py_limited_api = OLDEST_PYTHON

    # bdist_wheel decides purity in finalize_options, from the extensions declared; it reads the
    # decision only after building (install location, tag, WHEEL file), by then from what was built.
    @property
    def root_is_pure(self) -> bool:
        return not (self.distribution.has_ext_modules() or self.distribution.has_c_libraries())

    @root_is_pure.setter
    def root_is_pure(self, _declared: bool | None) -> None:
        pass


native = {"cffi_modules": [NATIVE_BUILD]} if sys.platform.startswith("linux") else {}
setup(cmdclass={"build_ext": build_ext_where_possible, "bdist_wheel": bdist_wheel_as_built}, **native)

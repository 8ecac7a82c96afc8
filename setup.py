"""Only for cffi: the native extension is declared here because cffi_modules
has no pyproject.toml spelling. Everything else lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["src/vmctl_server/backends/native/csrc/build.py:ffibuilder"])

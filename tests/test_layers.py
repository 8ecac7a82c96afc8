"""The layers the tree shows, held to: each module imported alone, in a fresh
interpreter, loads nothing of the layers it must not know.

- ``vmctl_server.core`` and ``vmctl_server.access``: no gRPC, no protobuf, no
  client, no transport (they take and return plain values);
- ``vmctl_api``: nothing of the client or the agent (a leaf both import);
- ``vmctl_client``: nothing of the agent (it installs and runs on its own).

Runs without root.
"""

from __future__ import annotations

import json
import pathlib
import pkgutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unprivileged

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"
NO_TRANSPORT = ("grpc", "google.protobuf", "vmctl_client", "vmctl_api.vmctl_pb2", "vmctl_server.transport")


def _modules(package: str) -> list[str]:
    path = SRC / package.replace(".", "/")
    return [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(path)]) if not m.name.startswith("_")]


def _loaded_by(module: str) -> list[str]:
    """The modules a fresh interpreter has loaded after importing ``module`` alone."""
    code = f"import importlib, json, sys; importlib.import_module({module!r}); print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(result.stdout)


def _offending(loaded: list[str], forbidden: tuple[str, ...]) -> list[str]:
    return [name for name in loaded if any(name == f or name.startswith(f + ".") for f in forbidden)]


@pytest.mark.parametrize("module", _modules("vmctl_server.core") + _modules("vmctl_server.access"))
def test_the_core_and_access_control_import_no_transport(module: str) -> None:
    assert _offending(_loaded_by(module), NO_TRANSPORT) == []


@pytest.mark.parametrize("module", _modules("vmctl_api"))
def test_the_contract_package_is_a_leaf(module: str) -> None:
    assert _offending(_loaded_by(module), ("vmctl_client", "vmctl_server")) == []


@pytest.mark.parametrize("module", _modules("vmctl_client"))
def test_the_client_imports_nothing_of_the_agent(module: str) -> None:
    assert _offending(_loaded_by(module), ("vmctl_server",)) == []


def test_the_checks_see_a_forbidden_import() -> None:
    """The transport does load gRPC: the check above is not vacuous."""
    assert "grpc" in _offending(_loaded_by("vmctl_server.transport.service"), NO_TRANSPORT)

"""Reading the files under deploy/ the way their tools read them.

Kubernetes manifests are rendered with the real ``kubectl kustomize``; the
systemd unit is parsed like systemd parses it (continuation lines, settings
that accumulate) and its syscall groups are expanded by the real
``systemd-analyze syscall-filter``. Tests then check what those tools see,
not a copy of it.
"""

from __future__ import annotations

import functools
import pathlib
import shutil
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZE_BASE = DEPLOY / "kubernetes" / "base"
OVERLAYS = sorted(p for p in (DEPLOY / "kubernetes" / "overlays").iterdir() if (p / "kustomization.yaml").exists())
UNIT = DEPLOY / "systemd" / "vmctl-agent.service"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"


def require_tool(name: str, package: str) -> str:
    """The tool's path; a missing tool fails the test (CI installs it), never skips it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: the deployment checks need it (Debian: apt-get install {package})")
    return path


@functools.cache
def render(overlay: pathlib.Path) -> tuple[dict, ...]:
    kubectl = require_tool("kubectl", "kubectl (Kubernetes apt repository)")
    result = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def only(docs: tuple[dict, ...], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


AGENT = "agent"
SIDECAR = "autoreclaim"  # the one container an overlay may run beside the agent (overlays/autoreclaim)


def agent_container(docs: tuple[dict, ...]) -> dict:
    containers = only(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    names = [c["name"] for c in containers]
    assert names in ([AGENT], [AGENT, SIDECAR]), f"the DaemonSet runs the agent, and at most the reclaim loop: {names}"
    return containers[0]


def sidecar_container(docs: tuple[dict, ...]) -> dict | None:
    """The reclaim loop's container, where the overlay has one."""
    containers = only(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    return next((c for c in containers if c["name"] == SIDECAR), None)


def daemonset_capabilities() -> set[str]:
    """The capabilities the DaemonSet's agent container adds (it drops all others)."""
    container = agent_container(render(OVERLAYS[0]))
    return {f"CAP_{c}" for c in container["securityContext"]["capabilities"]["add"]}


# ---- systemd ---------------------------------------------------------------------


def unit_settings(path: pathlib.Path = UNIT) -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit in order, continuation lines joined."""
    settings: dict[str, list[str]] = {}
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@functools.cache
def syscall_groups() -> dict[str, tuple[str, ...]]:
    """systemd's syscall groups (``@system-service`` ...), as this systemd defines them."""
    analyze = require_tool("systemd-analyze", "systemd")
    out = subprocess.run(
        [analyze, "syscall-filter", "--no-pager"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
        elif not line.strip():
            current = None
    return {name: tuple(entries) for name, entries in groups.items()}


def expand_syscalls(entries: list[str]) -> set[str]:
    groups = syscall_groups()
    names: set[str] = set()
    for entry in entries:
        if entry.startswith("@"):
            names |= expand_syscalls(list(groups[entry]))
        else:
            names.add(entry)
    return names


def unit_syscall_allow_list(settings: dict[str, list[str]]) -> set[str]:
    """SystemCallFilter= as systemd applies it: the first, positive, assignment
    is the allow list; each later ``~`` assignment removes from it."""
    filters = settings["SystemCallFilter"]
    assert not filters[0].startswith("~"), "the unit's filter must be an allow list"
    allowed: set[str] = set()
    for value in filters:
        if value.startswith("~"):
            allowed -= expand_syscalls(value[1:].split())
        else:
            allowed |= expand_syscalls(value.split())
    return allowed

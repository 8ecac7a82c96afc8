"""What systemd or a container runtime does to a process before exec, done with the kernel mechanisms they use.

``setpriv_prefix`` sets the uid and exactly the capabilities a deployment
grants; ``SANDBOX`` (support/sandbox_exec.py) loads a seccomp filter built
the way systemd or runc builds it. Either goes in front of a command, e.g.
an agent's (``Agent(..., prefix=...)``).
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable

from .deploy_files import require_tool

SANDBOX = pathlib.Path(__file__).resolve().parent / "sandbox_exec.py"
CAPABILITY_NUMBERS = {  # linux/capability.h
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_NICE": 23,
}


def capability_mask(caps: Iterable[str]) -> int:
    """The bits /proc/PID/status shows (CapEff...) for exactly these capabilities."""
    return sum(1 << CAPABILITY_NUMBERS[c] for c in caps)


def _cap_list(caps: set[str]) -> str:
    return ",".join(["-all", *(f"+{c.lower().removeprefix('cap_')}" for c in sorted(caps))])


def setpriv_prefix(uid: int, caps: set[str]) -> list[str]:
    """What systemd or the container runtime does before exec: the uid, and exactly these capabilities."""
    setpriv = require_tool("setpriv", "util-linux")
    prefix = [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", f"--bounding-set={_cap_list(caps)}"]
    if uid != 0:  # a non-root process holds capabilities only through the ambient set
        prefix += [f"--inh-caps={_cap_list(caps)}", f"--ambient-caps={_cap_list(caps)}"]
    return [*prefix, "--no-new-privs", "--"]

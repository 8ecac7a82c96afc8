"""Running the vmctl command as a user does: a subprocess, its exit status and both streams."""

from __future__ import annotations

import os
import subprocess
import sys

VMCTL = [sys.executable, "-m", "vmctl_client.cli"]


def vmctl(*args: str, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*VMCTL, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}, cwd=cwd
    )


def usage_error(run: subprocess.CompletedProcess) -> str:
    """The one line a usage error ends with (``vmctl ...: error: why``), after checking it is one:
    exit 2, nothing on stdout, no traceback, and only argparse's usage before that line."""
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert run.stdout == "", run.stdout
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.rstrip("\n").splitlines()
    assert lines[0].startswith("usage: "), run.stderr
    assert all(line.startswith(" ") for line in lines[1:-1]), run.stderr  # the usage's continuation lines
    assert ": error: " in lines[-1], run.stderr
    return lines[-1]

"""The project's Node.js tools (package.json: buf, @grpc/grpc-js), installed with `npm ci`.

`npm ci` installs exactly package-lock.json into node_modules/ at the
repository's root. It runs once per lock: the lock's digest is kept in
node_modules/, and a later session with the same lock uses what is there.
Install scripts are not run (`--ignore-scripts`): none of these packages
needs one (buf's binary comes in a per-platform package of its own).
"""

from __future__ import annotations

import hashlib
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NODE_MODULES = ROOT / "node_modules"
LOCK = ROOT / "package-lock.json"
STAMP = NODE_MODULES / ".vmctl-lock-sha256"


def _lock_digest() -> str:
    return hashlib.sha256(LOCK.read_bytes()).hexdigest()


def node_modules() -> pathlib.Path:
    """node_modules/ as package-lock.json says, installed if it is not; the
    test is skipped where Node.js itself is missing."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: apt-get install nodejs npm)")
    digest = _lock_digest()
    if not (STAMP.exists() and STAMP.read_text() == digest):
        result = subprocess.run(
            ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"
        STAMP.write_text(digest)
    return NODE_MODULES


def bin_path(name: str) -> pathlib.Path:
    return node_modules() / ".bin" / name

"""Waiting on a condition instead of sleeping (tests, the agent workout, the bench)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], object], what: str = "a condition", timeout: float = 30.0) -> object:
    """Poll ``condition`` until it is true and return its value; ``timeout`` only bounds a wait that would hang."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.05)

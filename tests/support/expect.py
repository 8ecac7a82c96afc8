"""Refusals a test expects from an agent, checked by code and reason."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from vmctl_client import VmctlError


def expect_error(call: Callable[[], object], code: str, reason: str | None = None) -> VmctlError:
    """Run ``call`` and return the VmctlError it must raise, with that code and reason."""
    with pytest.raises(VmctlError) as caught:
        call()
    error = caught.value
    assert error.code == code, f"expected {code}/{reason}, got {error.code}/{error.reason}: {error.message}"
    if reason is not None:
        assert error.reason == reason, f"expected reason {reason}, got {error.reason}: {error.message}"
    return error

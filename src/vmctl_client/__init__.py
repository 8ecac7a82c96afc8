"""vmctl_client: the Python library for vmctl agents.

from vmctl_client import Client
c = Client("unix:///run/vmctl/agent.sock")
info = c.get_vma_info(pid, attrs=("rss", "swap"))
res = c.advise_ranges(pid, [v for v in info.vmas if v.kind == "anonymous"], advice="pageout", cookie=info.cookie)

``AsyncClient`` is the same from asyncio; ``Fleet`` runs one operation on many
agents; ``vmctl_client.reclaim`` is the read-choose-advise-retry workflow.

The names below are imported on first use (PEP 562), so that importing a
light submodule, as ``vmctl --version`` and ``--help`` do, does not load gRPC.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from vmctl_api.words import Advice, Attr, Filter  # plain words: no gRPC to load

if TYPE_CHECKING:
    from vmctl_client.aio import AsyncClient
    from vmctl_client.calls import RetryPolicy
    from vmctl_client.channel import TlsOptions
    from vmctl_client.client import Client
    from vmctl_client.errors import (
        AgentStoppingError,
        AgentUnavailableError,
        AuditUnavailableError,
        InvalidRequestError,
        PermissionDeniedError,
        ProcessChangedError,
        ProcessGoneError,
        StaleCookieError,
        VmctlError,
    )
    from vmctl_client.fleet import Fleet, HostDone, HostFailed, HostResult
    from vmctl_client.types import AdviceResult, NodeInfo, ProcessInfo, RangeResult, Vma, VmaInfo

_MODULE_OF = {
    "AsyncClient": "aio",
    "RetryPolicy": "calls",
    "TlsOptions": "channel",
    "Client": "client",
    **dict.fromkeys(
        (
            "AgentStoppingError",
            "AgentUnavailableError",
            "AuditUnavailableError",
            "InvalidRequestError",
            "PermissionDeniedError",
            "ProcessChangedError",
            "ProcessGoneError",
            "StaleCookieError",
            "VmctlError",
        ),
        "errors",
    ),
    "Fleet": "fleet",
    **dict.fromkeys(("HostDone", "HostFailed", "HostResult"), "fleet"),
    **dict.fromkeys(("AdviceResult", "NodeInfo", "ProcessInfo", "RangeResult", "Vma", "VmaInfo"), "types"),
}

__all__ = [
    "Advice",
    "AdviceResult",
    "AgentStoppingError",
    "AgentUnavailableError",
    "AsyncClient",
    "Attr",
    "AuditUnavailableError",
    "Client",
    "Filter",
    "Fleet",
    "HostDone",
    "HostFailed",
    "HostResult",
    "InvalidRequestError",
    "NodeInfo",
    "PermissionDeniedError",
    "ProcessChangedError",
    "ProcessGoneError",
    "ProcessInfo",
    "RangeResult",
    "RetryPolicy",
    "StaleCookieError",
    "TlsOptions",
    "Vma",
    "VmaInfo",
    "VmctlError",
]


def __getattr__(name: str) -> object:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

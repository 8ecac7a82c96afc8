"""vmctl_client: the Python library for vmctl agents.

from vmctl_client import Client
c = Client("unix:///run/vmctl/agent.sock")
info = c.get_vma_info(pid, attrs=("rss", "swap"))
res = c.advise_ranges(pid, [v for v in info.vmas if v.kind == "anonymous"], advice="pageout", cookie=info.cookie)

``AsyncClient`` is the same from asyncio; ``Fleet`` runs one operation on many
agents; ``vmctl_client.reclaim`` is the read-choose-advise-retry workflow.
"""

from vmctl_api.words import Advice, Attr, Filter
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

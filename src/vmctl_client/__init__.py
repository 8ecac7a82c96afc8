"""vmctl_client: the Python library for vmctl agents.

from vmctl_client import Client
c = Client("unix:///run/vmctl/agent.sock")
info = c.get_vma_info(pid, attrs=("rss", "swap"))
res = c.advise_ranges(pid, [(v.start, v.end) for v in info.vmas if v.kind == "anonymous"],
                      advice="pageout", cookie=info.cookie)
"""

from vmctl_client.channel import TlsOptions
from vmctl_client.client import Client
from vmctl_client.errors import (
    AgentUnavailableError,
    InvalidRequestError,
    PermissionDeniedError,
    ProcessChangedError,
    ProcessGoneError,
    StaleCookieError,
    VmctlError,
)
from vmctl_client.types import AdviceResult, RangeResult, Vma, VmaInfo

__all__ = [
    "AdviceResult",
    "AgentUnavailableError",
    "Client",
    "InvalidRequestError",
    "PermissionDeniedError",
    "ProcessChangedError",
    "ProcessGoneError",
    "RangeResult",
    "StaleCookieError",
    "TlsOptions",
    "Vma",
    "VmaInfo",
    "VmctlError",
]

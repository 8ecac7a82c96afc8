"""A node-memory controller: deactivate the idle anonymous memory of one
workload's processes on every node, and read each node's memory pressure.

    python3 controller.py CGROUP_PREFIX [TARGET ...]
"""

import asyncio
import sys

from vmctl_client import AsyncClient, Client, Fleet, StaleCookieError, TlsOptions
from vmctl_client.reclaim import reclaim

CGROUP = sys.argv[1]  # e.g. "/kubepods.slice/kubepods-besteffort.slice"
TARGETS = sys.argv[2:] or ["unix:///run/vmctl/agent.sock"]  # or "dns:///vmctl-agent.vmctl.svc:7443", "10.0.0.7:7443"
TLS: TlsOptions | None = None  # for tcp targets: TlsOptions(ca="ca.pem", cert="controller.pem", key="controller.key")
MIB = 1 << 20


def cool_one(c: Client, pid: int) -> int:
    """What reclaim() does for one process, by hand: read, choose, advise with the cookie, retry."""
    for _ in range(3):
        info = c.get_vma_info(pid, attrs=("rss", "swap"))  # .process, .cookie, .result_attrs, .vmas (a lazy view)
        idle = [v for v in info.vmas if v.kind == "anonymous" and v.rss >= MIB]  # Vma: .start .end .path .rss ...
        if not idle:
            return 0
        try:
            result = c.advise_ranges(pid, idle, advice="cold", cookie=info.cookie, filter="anonymous")
            return result.advised_bytes  # also .syscalls, and .ranges with each range's .error
        except StaleCookieError:  # the layout moved since the snapshot: nothing was advised; read again
            continue
    return 0


async def pressure(c: AsyncClient) -> float:
    node = await c.node_info()
    return node.memory_pressure["some"]["avg10"] if node.memory_pressure else 0.0


def main() -> None:
    fleet = Fleet(TARGETS, tls=TLS, host_deadline=60, concurrency=32)

    # Every node at once: a thread per host (at most `concurrency`), each host
    # with its own client and deadline; a failed host is an entry, not an exception.
    for host in fleet.run(lambda c: reclaim(c, cgroup=CGROUP, advice="cold", min_rss=MIB)):
        if host.ok:
            report = host.value
            print(f"{host.target}: {len(report.processes)} processes, advised {report.advised_bytes} bytes"
                  f" in {report.syscalls} process_madvise calls")
        else:
            print(f"{host.target}: failed: {host.error.code} {host.error.reason} {host.error.message}")

    # The same fan-out from asyncio, with AsyncClient.
    for node in asyncio.run(fleet.run_async(pressure)):
        print(f"{node.target}: memory pressure {node.value if node.ok else node.error.code}")

    # One agent, one call at a time.
    with Client(TARGETS[0], tls=TLS) as c:
        for process in c.list_processes(CGROUP)[:3]:  # .pid .comm .cgroup .rss .swap .vma_count
            print(f"pid {process.pid} ({process.comm}): {cool_one(c, process.pid)} bytes deactivated")


if __name__ == "__main__":
    main()

"""vmctl-agent: the wiring. Reads the flags (config), builds the core, access control and
back-end, puts them behind the gRPC servers (transport) and runs them on one event loop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent import futures
from dataclasses import dataclass

try:
    import grpc
    from grpc_health.v1 import health_pb2
    from grpc_health.v1.health import aio as health_aio

    from vmctl_server import __version__, backends, config
    from vmctl_server.access.admission import Guard
    from vmctl_server.access.audit import AuditLog
    from vmctl_server.access.limits import IdentityLimits, LimitSettings
    from vmctl_server.access.policy import PolicyStore
    from vmctl_server.core.advice import Advisor
    from vmctl_server.core.cookie import CookieSigner
    from vmctl_server.core.snapshot import SnapshotReader, SourceSupport
    from vmctl_server.core.snapshot_cache import SnapshotCache
    from vmctl_server.runtime import kernel_probe, logs, malloc_trim, meters
    from vmctl_server.transport import listeners, servers
    from vmctl_server.transport.service import SERVICE_NAME, Pipeline, VmControlService
    from vmctl_server.transport.unixgate import UnixGateway, claim_unix_path
except ModuleNotFoundError as missing:
    # `pip install vmctl` is the client alone; the agent's dependencies come with its extra.
    # A module of vmctl's own missing is a broken install, not this: let it raise.
    if missing.name is None or missing.name.startswith("vmctl"):
        raise
    sys.exit(
        f"vmctl-agent: {missing}: the agent's dependencies are not installed (plain `vmctl` is the client);"
        " install them with: pip install 'vmctl[agent]'"
    )

log = logging.getLogger("vmctl.agent")
FOLD_FLUSH_SECONDS = 5.0


def _guard(args: argparse.Namespace) -> Guard:
    """The guard the flags describe; a bad policy or an unwritable audit log is an error here, at start."""
    audit = AuditLog(args.audit_log)
    policies = PolicyStore(args.policy, on_reload=audit.write)
    burst = args.burst_per_identity or max(1, round(2 * args.rate_per_identity))
    limits = IdentityLimits(LimitSettings(args.max_calls_per_identity, args.rate_per_identity, burst))
    return Guard(policies, limits, audit, max_calls=args.max_calls)


def _backend(no_native: bool) -> backends.Backend:
    """The C back-end, or the pure-Python one only when asked for: an agent
    several times slower than it should be must not start unnoticed."""
    if no_native:
        return backends.select_reference()
    try:
        return backends.select_native()
    except ImportError as exc:
        raise RuntimeError(
            f"the C extension is not installed or does not load ({exc}). vmctl installs without it where it"
            " cannot be compiled: reinstall it where a C compiler and the C library's headers are (Debian: gcc"
            " libc6-dev), with VMCTL_NATIVE=required so that a failed build says why"
            " (VMCTL_NATIVE=required pip install --force-reinstall --no-cache-dir --no-binary vmctl 'vmctl[agent]'),"
            " or run with --no-native for the pure-Python paths (several times slower)"
        ) from exc


@dataclass
class Parts:
    """What the agent is made of before its servers exist (they need the event loop)."""

    service: VmControlService
    guard: Guard
    gateway: UnixGateway | None  # in front of the unix listeners
    trimmer: malloc_trim.HeapTrimmer  # gives back what large calls freed


def build_parts(args: argparse.Namespace) -> Parts:
    guard = _guard(args)
    signer = (
        CookieSigner.from_key_file(args.cookie_key_file) if args.cookie_key_file else CookieSigner.with_random_key()
    )
    backend = _backend(args.no_native)
    caps = kernel_probe.probe()
    if not caps.advice_permitted:
        log.warning("remote advice will fail: %s", "; ".join(f"{k}: {v}" for k, v in caps.probe_errors.items()))
    if args.metrics_listen:
        meters.enable()  # prometheus-client is loaded only when metrics are served
    meters.describe_agent(
        native_tables=backend.native,
        native_advise_loop=backend.native,
        pagemap_scan=caps.pagemap_scan,
        procmap_query=caps.procmap_query,
        access_sampling=caps.access_sampling,
    )
    sources = SourceSupport(pagemap_scan=caps.pagemap_scan, procmap_query=caps.procmap_query)
    reader = SnapshotReader(backend.tables, sources)
    snapshots = SnapshotCache(args.snapshot_cache_bytes)
    meters.watch_snapshot_cache(snapshots)
    advisor = Advisor(signer, reader, backend.ranges, caps.advices, max_ranges=args.max_ranges, snapshots=snapshots)
    trimmer = malloc_trim.HeapTrimmer()
    workers = futures.ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="vmctl-rpc")
    pipeline = Pipeline(workers, request_timeout=args.request_timeout, activity=trimmer)
    service = VmControlService(reader, advisor, signer, caps, guard, pipeline)
    gateway = None
    unix_paths = [a.unix_path for a in args.listen if a.unix_path is not None]
    if unix_paths:
        for path in unix_paths:
            claim_unix_path(path)
        # Unix peers reach gRPC only through the gateway, which names them by
        # SO_PEERCRED (see unixgate); gRPC itself listens on a private socket.
        gateway = UnixGateway.beside(
            unix_paths[0],
            max_connections=args.max_connections,
            max_connections_per_uid=args.max_connections_per_uid,
            reserved_for_root=args.connections_reserved_for_root,
            idle_timeout=args.connection_idle_timeout,
        )
    return Parts(service, guard, gateway, trimmer)


class Agent:
    """The running agent: its servers on this thread's event loop, and how it stops."""

    def __init__(self, args: argparse.Namespace, parts: Parts) -> None:
        self.args = args
        self.parts = parts
        self.health = health_aio.HealthServicer()
        self.servers: list[grpc.aio.Server] = []
        self.stop_listeners: list[Callable[[], Awaitable[object]]] = []
        self.stopping = asyncio.Event()

    def _server(self, options: tuple[tuple[str, int], ...] = ()) -> grpc.aio.Server:
        server = servers.grpc_server(
            self.parts.service.handler(),
            self.health,
            max_message_bytes=config.max_message_bytes(self.args),
            request_timeout=self.args.request_timeout,
            options=options,
        )
        self.servers.append(server)
        return server

    async def start(self) -> None:
        args, parts = self.args, self.parts
        if parts.gateway is not None:
            self._server().add_insecure_port(f"unix://{parts.gateway.upstream}")
        tcp = [(a.text, a.grpc_target) for a in args.listen if a.unix_path is None]
        if tcp:
            credentials = servers.server_credentials(args) if args.tls_cert else None
            servers.add_tcp_ports(self._server(servers.tcp_options(args.max_connections)), tcp, credentials)
        self.stop_listeners = await listeners.start_listeners(
            args.health_listen, args.metrics_listen, self.health, args.request_timeout
        )
        for server in self.servers:
            await server.start()
        policy = parts.guard.policies.current
        started = {"event": "agent_started", "version": __version__, "policy": policy.source}
        if not parts.guard.audit.write(started, f"vmctl-agent {__version__} started"):
            raise OSError(f"cannot write the audit log {parts.guard.audit.path}")
        if parts.gateway is not None:
            for address in args.listen:
                if address.unix_path is not None:
                    parts.gateway.listen(address.unix_path, args.socket_mode)
        for name in (SERVICE_NAME, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        parts.trimmer.start()  # its baseline: the RSS now, idle

    def watch_signals(self) -> None:
        """SIGTERM and SIGINT stop, SIGHUP reloads the policy. The loop hears a
        signal whichever thread the kernel delivered it to (the wakeup fd)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.parts.guard.policies.reload)

    async def fold_refusals(self) -> None:
        """Write the counts of folded refusals as their windows end."""
        while True:
            await asyncio.sleep(FOLD_FLUSH_SECONDS)
            self.parts.guard.refusals.flush()

    async def abandon(self) -> None:
        """Undo a start that failed half way: nothing was served."""
        await asyncio.gather(*(server.stop(None) for server in self.servers))
        if self.parts.gateway is not None:
            self.parts.gateway.close(drain_seconds=0)
        for stop_listener in self.stop_listeners:
            await stop_listener()

    async def stop(self) -> None:
        """Drain: NOT_SERVING, no new connections, calls in flight finish, then the sockets go."""
        grace = self.args.shutdown_grace
        log.info("shutting down: letting in-flight calls finish (up to %.0fs)", grace)
        deadline = time.monotonic() + grace
        parts = self.parts
        loop = asyncio.get_running_loop()
        await self.health.enter_graceful_shutdown()
        if parts.gateway is not None:
            parts.gateway.stop_accepting()  # new connections are refused; open ones finish their calls
        # Calls already admitted finish; later ones get UNAVAILABLE AGENT_STOPPING,
        # an answer that says nothing was done (gRPC's own stop would cancel them).
        if not await loop.run_in_executor(None, parts.guard.drain, grace):
            log.warning("calls still running after %.0fs: cancelling them", grace)
        await asyncio.gather(*(server.stop(max(0.0, deadline - time.monotonic())) for server in self.servers))
        parts.trimmer.stop()
        if parts.gateway is not None:
            await loop.run_in_executor(None, parts.gateway.close)
        for stop_listener in self.stop_listeners:
            await stop_listener()
        parts.guard.refusals.flush(everything=True)
        parts.guard.audit.write({"event": "agent_stopped"}, "vmctl-agent stopped")
        log.info("stopped")


async def serve(args: argparse.Namespace, parts: Parts) -> int:
    agent = Agent(args, parts)
    agent.watch_signals()
    try:
        await agent.start()
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"vmctl-agent: {exc}", file=sys.stderr)
        await agent.abandon()
        return 1
    log.info("vmctl-agent %s serving on %s", __version__, ", ".join(a.text for a in args.listen))
    folding = asyncio.create_task(agent.fold_refusals())
    await agent.stopping.wait()
    folding.cancel()
    await agent.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = config.parse(argv)
    logs.configure(args.log_level, args.log_format)
    # Before any thread exists: a thread keeps the arena it first got.
    malloc_trim.limit_arenas()
    # SIGHUP's default action kills; until the reload handler is installed it
    # is ignored, which loses nothing: the policy is read after this point.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        parts = build_parts(args)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"vmctl-agent: {exc}", file=sys.stderr)
        return 1
    return asyncio.run(serve(args, parts))


if __name__ == "__main__":
    sys.exit(main())

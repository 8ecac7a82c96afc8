"""The unix-socket gateway: who is on the other end, by the kernel's word.

grpc-python cannot tell a handler who connected over a unix socket: gRPC core
never reads ``SO_PEERCRED`` (grpc/grpc#15511, #28755), ``context.peer()`` is
just ``"unix:"``, and the auth context of ``local_server_credentials(UDS)``
says only "local" (checked on grpcio 1.85). Nor can a Python server adopt a
socket it accepted itself. So the agent owns the public socket:

1. the gateway accepts each connection and reads the peer's uid, gid and pid
   with ``getsockopt(SO_PEERCRED)`` — the kernel's record of who connected,
   which the peer cannot forge;
2. it opens a connection to the gRPC server on a private socket, in a
   directory only the agent's user may enter (mode 0700), after binding that
   connection's own end to an abstract address that spells the credentials
   (``vmctl-peer/uid=U/gid=G/pid=P/NONCE``, see :mod:`vmctl_server.access.identity`);
3. it relays bytes both ways until either side closes, and then closes the
   other side too.

gRPC reports the bound address as the call's peer, so every call carries its
connection's credentials with no shared table and no race between a
connection's arrival and its first call. Nobody but the agent (or root) can
connect to the private socket, so nobody else can present such an address.

Connection slots. A connection holds a slot from its admission until either
side closes it (gRPC closing an idle or broken connection frees it as surely
as the client closing), or until no byte has moved either way for
``idle_timeout`` seconds: gRPC clients reconnect by themselves on their next
call, so closing an idle connection costs a legitimate client one reconnect.
Bytes are all the gateway sees, so a call waiting for its answer is as idle
as an abandoned connection: the timeout must be longer than the longest call
a client waits for (the client's default deadline is 30 s; the default
timeout 120 s). Headers of a call whose body never comes are no activity.
Slots are bounded three ways: ``max_connections`` in all, ``max_connections_per_uid``
for each local user, and the last ``reserved_for_root`` of ``max_connections``
are for uid 0 alone, so local users together can never lock root out.
Nothing at the byte level tells a connection kept busy on purpose (a health
check every minute is a legitimate call) from a useful one, so these caps,
not the idle timeout, are what bound a user who holds connections
deliberately; the timeout frees what clients abandon.

The relay is one thread for every connection: non-blocking sockets on one
epoll, a 256 KiB buffer shared by all, and a per-direction backlog only while
a reader is slower than its writer (the source is not read meanwhile, so a
peer that never reads holds at most one buffer's worth). It used to be two
threads and two 64 KiB buffers per connection; measured against that on this
project's 2-core machine (medians of 5 interleaved rounds, a loaded machine),
it costs the same: +0.035 ms on a health check over gRPC's private socket
(0.38 ms), a 30,000-VMA snapshot 21.9 ms (was 23.3), and 16 or 64 clients of
accounting reads the same p50, p99 and calls/s within noise (64 clients: p99
212 ms, was 228; the same agent over plain TCP 245 ms). Most of the cost is
handing the GIL to the relay; a relay in C would remove that.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import secrets
import select
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmctl_server.access.identity import peer_name
from vmctl_server.core import files
from vmctl_server.runtime import meters as metrics  # the real series only when served

log = logging.getLogger("vmctl.gate")

_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
BUFFER_BYTES = 256 << 10  # one recv takes whatever a unix socket has queued
PRIVATE_PREFIX = ".vmctl-agent-"
PRIVATE_SOCKET = "grpc.sock"
DEFAULT_IDLE_TIMEOUT = 120.0
UPSTREAM_CONNECT_TIMEOUT = 5.0
REFUSAL_LOG_INTERVAL = 10.0  # a refused user may retry in a loop: one warning per uid per interval

_READ = select.EPOLLIN
_WRITE = select.EPOLLOUT
_HANGUP = select.EPOLLHUP | select.EPOLLERR


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCred:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return PeerCred(pid, uid, gid)


def default_reserved_for_root(max_connections: int) -> int:
    """A sixteenth of the slots (16 of the default 256), at least one: room for
    root's controllers and an operator's CLI however many users hold the rest."""
    return max(1, max_connections // 16)


def _is_live_socket(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def claim_unix_path(path: str) -> None:
    """Create the socket's directory, and refuse to steal a live agent's socket.

    gRPC unlinks whatever is at the path before binding, which would silently
    orphan a running agent; a stale socket (nobody accepting) is fine to replace.
    """
    files.prepare_socket_directory(path)  # a safe directory; refuses links and other users' files at path
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket; refusing to replace it")
    if _is_live_socket(path):
        raise OSError(f"another agent is already serving {path}")
    os.unlink(path)  # stale: left by an agent that did not shut down


def make_private_dir(near: str) -> str:
    """A fresh mode-0700 directory beside the public socket ``near`` for the
    private gRPC socket; stale ones left by agents that were killed are swept.

    Beside the public socket because that directory is known to be writable
    (a container's root filesystem may be read-only) and mkdtemp's random
    name is safe even in a world-writable directory.
    """
    parent = os.path.dirname(near) or "/"
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if not name.startswith(PRIVATE_PREFIX):
            continue
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid():
            inner = os.path.join(path, PRIVATE_SOCKET)
            if not _is_live_socket(inner):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(inner)
                with contextlib.suppress(OSError):
                    os.rmdir(path)
    return tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir=parent)  # mode 0700, created exclusively


def remove_private_dir(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(path, PRIVATE_SOCKET))
    with contextlib.suppress(OSError):
        os.rmdir(path)


# ---- the relay: one thread, every connection ---------------------------------------


class _End:
    """One socket of a relayed connection: whether it is being read, and the
    bytes read from its peer that wait to be written to it."""

    __slots__ = ("backlog", "fd", "link", "mask", "peer", "reading", "sock")

    def __init__(self, sock: socket.socket, link: _Link) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.link = link
        self.peer: _End = self
        self.reading = True
        self.backlog: memoryview | None = None
        self.mask = 0  # what the epoll watches for now; 0: not registered

    @property
    def wanted(self) -> int:
        return (_READ if self.reading else 0) | (_WRITE if self.backlog is not None else 0)


class _Link:
    """A relayed connection: the public client's socket and its private upstream one."""

    __slots__ = ("client", "closed", "cred", "id", "last_active", "upstream")

    def __init__(self, conn_id: int, cred: PeerCred, client: socket.socket, upstream: socket.socket) -> None:
        self.id = conn_id
        self.cred = cred
        self.client = _End(client, self)
        self.upstream = _End(upstream, self)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.last_active = time.monotonic()
        self.closed = False

    def side(self, end: _End) -> str:
        return "client" if end is self.client else "server"


class _Relay:
    """Moves the bytes of every link on one thread, which alone touches the
    epoll and the links; ``on_close(link, reason)`` is called on that thread
    when a link ends, before its sockets are closed."""

    def __init__(self, idle_timeout: float, on_close: Callable[[_Link, str], None]) -> None:
        self.idle_timeout = idle_timeout
        self._on_close = on_close
        # Idle links are found by a sweep this often: closed between idle_timeout
        # and idle_timeout plus a tenth of it, and an idle agent wakes rarely.
        self._sweep_every = min(max(idle_timeout / 10, 0.05), 5.0)
        self._epoll = select.epoll()
        self._ends: dict[int, _End] = {}
        self._links: set[_Link] = set()
        self._arrivals: queue.SimpleQueue[_Link] = queue.SimpleQueue()
        self._buffer = bytearray(BUFFER_BYTES)
        self._view = memoryview(self._buffer)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._epoll.register(self._wake_r.fileno(), _READ)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vmctl-gate-relay", daemon=True)
        self._thread.start()

    def add(self, link: _Link) -> None:
        """Hand ``link`` to the relay thread (from any thread)."""
        if self._stopping:
            raise OSError(errno.ESHUTDOWN, "the gateway is stopping")
        self._arrivals.put(link)
        self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        """Close every link still open (reason ``shutdown``) and end the thread."""
        self._stopping = True
        self._wake()
        self._thread.join(timeout)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError: wakes are already pending
            self._wake_w.send(b"x")

    # -- the loop ------------------------------------------------------------------

    def _run(self) -> None:
        next_sweep = time.monotonic() + self._sweep_every
        wake_fd = self._wake_r.fileno()
        while not self._stopping:
            events = self._epoll.poll(self._sweep_every)
            now = time.monotonic()
            for fd, mask in events:
                end = self._ends.get(fd)
                if end is None:
                    if fd == wake_fd:
                        self._take_arrivals()
                    continue
                if end.link.closed:
                    continue  # closed earlier in this batch
                end.link.last_active = now
                try:
                    self._handle(end, mask)
                except Exception:  # a bug must cost one connection, never the relay of all of them
                    log.exception("relaying a connection of uid %d failed", end.link.cred.uid)
                    self._close(end.link, "error")
            if now >= next_sweep:
                self._close_idle(now)
                next_sweep = now + self._sweep_every
        self._close_all()

    def _handle(self, end: _End, mask: int) -> None:
        if end.backlog is not None and mask & (_WRITE | _HANGUP):
            self._flush(end)
        if end.reading and mask & (_READ | _HANGUP) and not end.link.closed:
            self._forward(end)

    def _take_arrivals(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        while True:
            try:
                link = self._arrivals.get_nowait()
            except queue.Empty:
                return
            self._links.add(link)
            for end in (link.client, link.upstream):
                end.sock.setblocking(False)
                self._ends[end.fd] = end
                self._update(end)

    def _forward(self, source: _End) -> None:
        """Read what ``source`` has and write it on to its peer."""
        link, sink = source.link, source.peer
        try:
            count = source.sock.recv_into(self._buffer)
        except BlockingIOError:
            return
        except ConnectionResetError:
            count = 0  # it closed with bytes of ours unread: an end all the same, after all it sent
        except OSError:
            self._close(link, "error")
            return
        if not count:
            # gRPC never half-closes a connection, so one side's end is the
            # connection's end: the client reconnects, and its slot is free at
            # once. Everything the source sent has reached its peer: a source
            # is read only while its peer has no backlog.
            self._close(link, f"{link.side(source)}_closed")
            return
        try:
            sent = sink.sock.send(self._view[:count])
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(link, "error")
            return
        if sent < count:
            # The sink is slower: keep the rest, and read no more of the source until it drains.
            sink.backlog = memoryview(bytes(self._view[sent:count]))
            source.reading = False
            self._update(source)
            self._update(sink)

    def _flush(self, sink: _End) -> None:
        link = sink.link
        try:
            sent = sink.sock.send(sink.backlog)  # type: ignore[arg-type]  # not None: checked by the caller
        except BlockingIOError:
            return
        except OSError:
            self._close(link, "error")
            return
        backlog = sink.backlog[sent:]  # type: ignore[index]
        if backlog:
            sink.backlog = backlog
            return
        sink.backlog = None
        self._update(sink)
        sink.peer.reading = True  # the source may be read again
        self._update(sink.peer)

    def _close_idle(self, now: float) -> None:
        for link in [link for link in self._links if now - link.last_active > self.idle_timeout]:
            self._close(link, "idle")

    def _close_all(self) -> None:
        self._take_arrivals()
        for link in list(self._links):
            self._close(link, "shutdown")
        self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()

    def _close(self, link: _Link, reason: str) -> None:
        if link.closed:
            return
        link.closed = True
        for end in (link.client, link.upstream):
            end.reading, end.backlog = False, None
            self._update(end)
            self._ends.pop(end.fd, None)
        self._links.discard(link)
        try:
            self._on_close(link, reason)  # the slot is free before the client can see its end
        finally:
            for end in (link.client, link.upstream):
                end.sock.close()

    def _update(self, end: _End) -> None:
        """Make the epoll watch ``end`` for what it wants now. An end that wants
        nothing is unregistered: epoll reports a hang-up whatever the mask, and
        an end that is not being read must not spin the loop."""
        mask = end.wanted
        if mask == end.mask:
            return
        if not end.mask:
            self._epoll.register(end.fd, mask)
        elif not mask:
            self._epoll.unregister(end.fd)
        else:
            self._epoll.modify(end.fd, mask)
        end.mask = mask


# ---- admission ---------------------------------------------------------------------


class _RefusalLog:
    """One warning per uid per ``REFUSAL_LOG_INTERVAL``, with the count left unsaid meanwhile."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[float, int]] = {}

    def refused(self, cred: PeerCred, why: str) -> None:
        now = time.monotonic()
        if len(self._last) > 1024:  # uids heard from long ago: their next refusal is logged anyway
            self._last = {uid: seen for uid, seen in self._last.items() if now - seen[0] < REFUSAL_LOG_INTERVAL}
        last, unsaid = self._last.get(cred.uid, (-REFUSAL_LOG_INTERVAL, 0))
        if now - last < REFUSAL_LOG_INTERVAL:
            self._last[cred.uid] = (last, unsaid + 1)
            return
        self._last[cred.uid] = (now, 0)
        more = f" ({unsaid} more from this uid since the last warning)" if unsaid else ""
        log.warning("refused a connection from uid %d pid %d: %s%s", cred.uid, cred.pid, why, more)


class UnixGateway:
    """Accepts on public unix sockets and relays to ``upstream`` (a path)."""

    @classmethod
    def beside(cls, public_path: str, **limits: Any) -> UnixGateway:
        """A gateway whose private socket lives in a fresh directory beside ``public_path``."""
        private_dir = make_private_dir(public_path)
        try:
            gateway = cls(os.path.join(private_dir, PRIVATE_SOCKET), **limits)
        except ValueError:
            remove_private_dir(private_dir)
            raise
        gateway.private_dir = private_dir
        return gateway

    def __init__(
        self,
        upstream: str,
        *,
        max_connections: int = 256,
        max_connections_per_uid: int = 64,
        reserved_for_root: int | None = None,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        if reserved_for_root is None:
            reserved_for_root = default_reserved_for_root(max_connections)
        if max_connections < 1 or max_connections_per_uid < 1:
            raise ValueError("--max-connections and --max-connections-per-uid must be at least 1")
        if not 0 <= reserved_for_root <= max_connections:
            raise ValueError(
                f"--connections-reserved-for-root {reserved_for_root} must be between 0 and"
                f" --max-connections ({max_connections})"
            )
        idle_timeout = DEFAULT_IDLE_TIMEOUT if idle_timeout is None else idle_timeout
        if idle_timeout <= 0:
            raise ValueError(f"--connection-idle-timeout {idle_timeout} must be more than 0 seconds")
        self.upstream = upstream
        self.private_dir: str | None = None
        self.paths: list[str] = []
        self.max_connections = max_connections
        self.max_connections_per_uid = max_connections_per_uid
        self.reserved_for_root = reserved_for_root
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._listeners: list[socket.socket] = []
        self._open: dict[int, _Link | None] = {}  # None: admitted, upstream being connected
        self._per_uid: dict[int, int] = {}
        self._next_id = 0
        self._refusals = _RefusalLog()
        self.refused = 0
        self._relay = _Relay(idle_timeout, self._closed)

    def listen(self, path: str, mode: int) -> None:
        """Bind ``path`` (already claimed by the caller) with ``mode`` and start accepting."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # born 0600: nobody connects before the mode is set
        try:
            listener.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        listener.listen(128)
        self._listeners.append(listener)
        self.paths.append(path)
        threading.Thread(target=self._accept_loop, args=(listener,), name="vmctl-gate-accept", daemon=True).start()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._open)

    def stop_accepting(self) -> None:
        """New connections are refused from now on; open ones go on."""
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            listener.close()
        self._listeners.clear()

    def close(self, drain_seconds: float = 5.0) -> None:
        """Stop, let relayed connections end, remove the public and private sockets.

        Called after the gRPC server stopped: it has written its last replies
        and is closing its ends, so each link forwards what is still in
        flight and ends by itself. Links still open after ``drain_seconds``
        (a client that never reads) are cut.
        """
        self.stop_accepting()
        with self._drained:
            self._drained.wait_for(lambda: not self._open, timeout=drain_seconds)
        self._relay.stop()
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if self.private_dir:
            remove_private_dir(self.private_dir)

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.EBADF):  # shut down by stop_accepting
                    return
                log.warning("accept failed: %s", exc)
                continue
            try:
                self._admit(client)
            except Exception:
                log.exception("could not relay a new connection")
                client.close()

    def _refusal(self, uid: int) -> str | None:
        """Why a connection from ``uid`` may not have a slot now (None: it may). Under the lock."""
        if self._per_uid.get(uid, 0) >= self.max_connections_per_uid:
            return "uid_limit"
        slots = self.max_connections if uid == 0 else self.max_connections - self.reserved_for_root
        if len(self._open) >= slots:
            return "full"
        return None

    def _admit(self, client: socket.socket) -> None:
        cred = peer_credentials(client)
        with self._lock:
            refusal = self._refusal(cred.uid)
            if refusal is None:
                self._per_uid[cred.uid] = self._per_uid.get(cred.uid, 0) + 1
                self._next_id += 1
                conn_id = self._next_id
                self._open[conn_id] = None  # the slot is held from here
            else:
                self.refused += 1
        if refusal is not None:
            metrics.GATEWAY_REFUSED.labels(refusal).inc()
            self._refusals.refused(cred, self._refusal_text(refusal, cred.uid))
            client.close()
            return
        try:
            upstream = self._connect_upstream(cred)
        except OSError:
            self._forget(conn_id, cred.uid)
            client.close()
            raise
        link = _Link(conn_id, cred, client, upstream)
        with self._lock:
            self._open[conn_id] = link
        metrics.GATEWAY_CONNECTIONS.inc()  # before the relay has it: it may end the link at once
        try:
            self._relay.add(link)
        except OSError:  # stopping: the relay takes no more
            self._forget(conn_id, cred.uid)
            metrics.GATEWAY_CONNECTIONS.dec()
            client.close()
            upstream.close()

    def _refusal_text(self, refusal: str, uid: int) -> str:
        if refusal == "uid_limit":
            return f"uid {uid} has {self.max_connections_per_uid} connections open"
        if uid == 0:
            return f"{self.max_connections} connections open"
        return (
            f"the {self.max_connections - self.reserved_for_root} connections other users may hold are open"
            f" (another {self.reserved_for_root} are kept for root)"
        )

    def _connect_upstream(self, cred: PeerCred) -> socket.socket:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for _attempt in range(8):
                try:
                    upstream.bind("\0" + peer_name(cred.uid, cred.gid, cred.pid, secrets.token_hex(8)))
                    break
                except OSError as exc:  # a name already taken: draw another nonce
                    if exc.errno != errno.EADDRINUSE:
                        raise
            upstream.settimeout(UPSTREAM_CONNECT_TIMEOUT)  # gRPC's backlog full: do not hang the accept loop
            upstream.connect(self.upstream)
        except OSError:
            upstream.close()
            raise
        return upstream

    def _closed(self, link: _Link, reason: str) -> None:
        """The relay ended ``link``: free its slot (the relay closes the sockets next)."""
        self._forget(link.id, link.cred.uid)
        metrics.GATEWAY_CONNECTIONS.dec()
        metrics.GATEWAY_CLOSED.labels(reason).inc()
        log.debug("closed the connection of uid %d pid %d: %s", link.cred.uid, link.cred.pid, reason)

    def _forget(self, conn_id: int, uid: int) -> None:
        with self._lock:
            self._open.pop(conn_id, None)
            left = self._per_uid.get(uid, 1) - 1
            if left:
                self._per_uid[uid] = left
            else:
                self._per_uid.pop(uid, None)
            if not self._open:
                self._drained.notify_all()

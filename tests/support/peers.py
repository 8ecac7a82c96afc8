"""Callers other than root, for tests of the agent's unix-socket authentication.

The agent names a unix peer by ``SO_PEERCRED``: the credentials of the thread
that called ``connect()``. :class:`ConnectAs` makes that call from a thread
whose effective uid and gid are switched with the raw ``setresuid(2)`` /
``setresgid(2)`` system calls — which, unlike the libc wrappers, change only
the calling thread — so the kernel really sees another user (the socket's
mode and the directories' permissions are checked against it too), while the
rest of the test process stays root and the interpreter never has to be
re-executed as that user. gRPC cannot adopt a connected socket, so a tiny
relay hands each such connection to a local socket the test's Client uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator

_libc = ctypes.CDLL(None, use_errno=True)
SYS_SETRESUID = 117  # x86_64
SYS_SETRESGID = 119
NOBODY = 65534


def connect_as(path: str, uid: int, gid: int) -> socket.socket:
    """A unix connection to ``path`` made with effective ids ``uid``/``gid``."""
    result: dict[str, object] = {}

    def connect() -> None:
        if _libc.syscall(SYS_SETRESGID, -1, gid, -1) != 0:
            result["error"] = OSError(ctypes.get_errno(), "setresgid")
            return
        if _libc.syscall(SYS_SETRESUID, -1, uid, -1) != 0:
            _libc.syscall(SYS_SETRESGID, -1, 0, -1)
            result["error"] = OSError(ctypes.get_errno(), "setresuid")
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            result["sock"] = sock
        except OSError as exc:
            sock.close()
            result["error"] = exc
        finally:
            # Back to root before the thread ends (the saved uid is still 0).
            assert _libc.syscall(SYS_SETRESUID, -1, 0, -1) == 0
            assert _libc.syscall(SYS_SETRESGID, -1, 0, -1) == 0

    thread = threading.Thread(target=connect)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["sock"]  # type: ignore[return-value]


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    for sock in (sink, source):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class ConnectAs:
    """``address`` is a unix socket whose every connection reaches
    ``target_path`` as user ``uid``. Use as a context manager."""

    def __init__(self, target_path: str | os.PathLike, uid: int = NOBODY, gid: int | None = None) -> None:
        self.target_path = str(target_path)
        self.uid = uid
        self.gid = uid if gid is None else gid
        self._dir = tempfile.mkdtemp(prefix="vmctl-as-")
        self.path = os.path.join(self._dir, "relay.sock")
        self.address = f"unix://{self.path}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(16)
        self._open: list[socket.socket] = []
        self.refused = 0  # connections the agent's socket would not take from this user
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = connect_as(self.target_path, self.uid, self.gid)
            except OSError:
                self.refused += 1
                client.close()
                continue
            self._open += [client, upstream]
            for pair in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=pair, daemon=True).start()

    def __enter__(self) -> ConnectAs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def public_directory(mode: int = 0o755) -> Iterator[pathlib.Path]:
    """A directory of root's every user may traverse (0755), for sockets other users reach; with mode 0o1777,
    one like /tmp (anyone may add entries, only their owner remove them)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="vmctl-public-"))
    path.chmod(mode)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)

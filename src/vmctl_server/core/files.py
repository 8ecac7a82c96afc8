"""The files the agent trusts: its sockets' directories, its cookie key, its audit log.

The agent runs as root (or with capabilities that reach every process), so a
path it uses is only as safe as the directories on the way to it: whoever can
write one of them can put a symlink, a socket or a file of their own where
the agent expects its own, and have it listen, read or append elsewhere. So,
as OpenSSH checks the directories of its keys, every directory from ``/`` to
the file, through every symbolic link met on the way, must belong to root or
to the agent's user and be writable by nobody else unless it is sticky (in a
sticky directory such as /tmp others may add entries but may not remove or
rename the agent's). The file itself is then opened with ``O_NOFOLLOW`` and
judged on the open descriptor (type, owner, mode), so what is checked is what
is used. Nothing here unlinks, connects to or writes through anything another
user made: it is refused, with its owner's name and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import secrets
import stat

SOCKET_DIRECTORY_MODE = 0o755  # others may traverse it; --socket-mode decides who may connect
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH
_OTHERS_ANY = stat.S_IRWXG | stat.S_IRWXO
_MAX_SYMLINKS = 40  # the kernel's own limit on links followed in one lookup


class UnsafePath(OSError):
    """A path the agent refuses to use; the message says what is wrong and how to fix it."""


def describe_user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _trusted_uids() -> set[int]:
    return {0, os.geteuid()}


def _writers(mode: int) -> str:
    return " and ".join(who for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if mode & bit)


def _kind(mode: int) -> str:
    kinds = [
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISREG, "a regular file"),
    ]
    return next((name for test, name in kinds if test(mode)), "a special file")


def _describe_link(path: str, info: os.stat_result, dir_fd: int | None = None) -> str:
    try:
        target = os.readlink(path, dir_fd=dir_fd)
    except OSError:
        target = "?"
    return f"a symbolic link to {target} owned by {describe_user(info.st_uid)}"


# ---- directories ---------------------------------------------------------------------------


def _check_entry(path: str, info: os.stat_result, purpose: str) -> None:
    """One entry met on the way to a file: trusted owner, and no other writer unless sticky."""
    if info.st_uid not in _trusted_uids():
        raise UnsafePath(
            f"cannot {purpose}: {path} belongs to {describe_user(info.st_uid)}; every directory (and link) on the way"
            f" must belong to root or to the agent's user ({describe_user(os.geteuid())}), or its owner can put"
            " anything in its place"
        )
    mode = info.st_mode
    if stat.S_ISDIR(mode) and mode & _OTHERS_WRITE and not mode & stat.S_ISVTX:
        raise UnsafePath(
            f"cannot {purpose}: {path} is writable by {_writers(mode)} (mode {stat.S_IMODE(mode):04o}) and not"
            " sticky, so they can replace anything in it: chmod go-w it, or use another directory"
        )


def resolve_trusted_directory(directory: str, purpose: str) -> tuple[str, os.stat_result]:
    """The real path of ``directory`` and its stat, after checking every entry on the way.

    Resolved by hand, one component at a time with ``lstat``, so the symbolic
    links are checked as well as every directory a link leads through (what
    ``os.path.realpath`` would hide). Raises UnsafePath, or OSError when a
    component is missing.
    """
    pending = list(reversed(os.path.abspath(directory).split("/")))
    current, info = "/", os.lstat("/")
    _check_entry(current, info, purpose)
    links = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = os.path.dirname(current)  # ``current`` has no links in it: its parent is a checked prefix
            info = os.lstat(current)
            continue
        candidate = os.path.join(current, name)
        info = os.lstat(candidate)
        _check_entry(candidate, info, purpose)
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), directory)
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            pending.extend(reversed(target.split("/")))
        elif not stat.S_ISDIR(info.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), candidate)
        else:
            current = candidate
    return current, info


def _make_missing_directories(directory: str, purpose: str) -> None:
    """Create ``directory`` and its missing parents, mode 0755, inside a trusted existing one only."""
    missing = []
    existing = os.path.abspath(directory)
    while not os.path.lexists(existing):
        missing.append(existing)
        existing = os.path.dirname(existing)
    if not missing:
        return
    resolve_trusted_directory(existing, purpose)  # never create inside a directory someone else controls
    for path in reversed(missing):
        try:
            os.mkdir(path, SOCKET_DIRECTORY_MODE)  # never follows a link planted at ``path``: EEXIST instead
        except FileExistsError:
            continue  # made by someone meanwhile: the full check after this judges it
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, SOCKET_DIRECTORY_MODE)  # exactly 0755, whatever the umask (systemd's UMask=0077)
        finally:
            os.close(fd)


def _refuse_foreign_occupant(socket_path: str, purpose: str) -> None:
    """Refuse a link, or anything another user made, at the socket's path; never unlink or connect to it."""
    try:
        info = os.lstat(socket_path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePath(
            f"cannot {purpose}: {_describe_link(socket_path, info)} is there; the agent neither follows nor removes"
            " it. Remove it yourself, and give the socket a directory only root or the agent's user can write"
        )
    if info.st_uid != os.geteuid():
        raise UnsafePath(
            f"cannot {purpose}: {_kind(info.st_mode)} owned by {describe_user(info.st_uid)} is there; the agent"
            f" ({describe_user(os.geteuid())}) neither connects to nor removes another user's file. Remove it"
            " yourself if it is not in use, and give the socket a directory only root or the agent's user can write"
        )


def prepare_socket_directory(socket_path: str) -> None:
    """Make the directory for a public unix socket safe to bind in, or raise UnsafePath.

    Missing directories are created (0755). Then the whole way to the socket,
    links included, must be trusted (see :func:`resolve_trusted_directory`),
    and the socket's own directory writable by no one else at all, sticky or
    not: whoever can add entries there can take the socket's name before the
    agent does, or plant a link in its place. A link, or another user's file,
    at the path is refused, never unlinked or connected to. What remains at
    the path after this is the agent's user's own (a stale socket, say).
    """
    purpose = f"listen on {socket_path}"
    directory = os.path.dirname(socket_path) or "/"
    _make_missing_directories(directory, purpose)
    _refuse_foreign_occupant(socket_path, purpose)
    resolved, info = resolve_trusted_directory(directory, purpose)
    if info.st_mode & _OTHERS_WRITE:
        raise UnsafePath(
            f"cannot {purpose}: its directory {resolved} is writable by {_writers(info.st_mode)} (mode"
            f" {stat.S_IMODE(info.st_mode):04o}), so they could take the socket's name or plant a link in its place."
            " Give the socket a directory only root or the agent's user can write, such as /run/vmctl"
        )


# ---- files ---------------------------------------------------------------------------------


def _open_no_follow(path: str, flags: int, purpose: str, *, mode: int = 0o600, dir_fd: int | None = None) -> int:
    """``open`` that refuses a symbolic link at the last component, and never blocks on a FIFO or device."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        # A link fails with ELOOP, or EACCES when O_CREAT meets one in a sticky directory; a FIFO or
        # device with nobody on the other end with ENXIO.
        try:
            info = os.lstat(path, dir_fd=dir_fd)
        except OSError:
            raise exc from None
        if stat.S_ISLNK(info.st_mode):
            raise UnsafePath(
                f"cannot {purpose}: it is {_describe_link(path, info, dir_fd)}, which the agent never follows"
                " there. Remove the link"
            ) from exc
        if exc.errno == errno.ENXIO:
            raise UnsafePath(f"cannot {purpose}: it is {_kind(info.st_mode)}, not a regular file") from exc
        raise


def _require_own_regular_file(info: os.stat_result, purpose: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise UnsafePath(f"cannot {purpose}: it is {_kind(info.st_mode)}, not a regular file")
    if info.st_uid != os.geteuid():
        raise UnsafePath(
            f"cannot {purpose}: it belongs to {describe_user(info.st_uid)}, not to the agent's user"
            f" ({describe_user(os.geteuid())}), so its owner controls what is in it. Remove it, or chown it"
        )


def open_append_log(path: str, what: str = "audit log") -> int:
    """A descriptor to append records to ``path``, created mode 0600 if absent, or UnsafePath.

    The log must be the agent's user's own regular file, with one name, that
    no one else may write: whoever can write it can forge or erase records,
    and a second name (a hard link made in a sticky directory) could be any
    file of the agent's user, which appending would corrupt.
    """
    purpose = f"write the {what} {path}"
    resolve_trusted_directory(os.path.dirname(os.path.abspath(path)), purpose)
    fd = _open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, purpose)
    try:
        info = os.fstat(fd)
        _require_own_regular_file(info, purpose)
        if info.st_mode & _OTHERS_WRITE:
            raise UnsafePath(
                f"cannot {purpose}: it is writable by {_writers(info.st_mode)} (mode {stat.S_IMODE(info.st_mode):04o}),"
                " who could forge or erase records: chmod go-w it"
            )
        if info.st_nlink != 1:
            raise UnsafePath(
                f"cannot {purpose}: it has {info.st_nlink} names (hard links), so it may be another file of the"
                " agent's user; give the log a file of its own"
            )
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_up_to(fd: int, limit: int) -> bytes:
    data = b""
    while len(data) < limit and (chunk := os.read(fd, limit - len(data))):
        data += chunk
    return data


def _read_secret(dir_fd: int, name: str, size: int, purpose: str) -> bytes:
    fd = _open_no_follow(name, os.O_RDONLY, purpose, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        _require_own_regular_file(info, purpose)
        if info.st_mode & _OTHERS_ANY:
            raise UnsafePath(
                f"cannot {purpose}: it is accessible to group or others (mode {stat.S_IMODE(info.st_mode):04o}),"
                " and anyone who reads it has the secret: chmod 600 it"
            )
        data = _read_up_to(fd, size + 1)
    finally:
        os.close(fd)
    if len(data) != size:
        raise ValueError(f"cannot {purpose}: {_wrong_size(len(data), size)}")
    return data


def _wrong_size(held: int, size: int) -> str:
    if held == 0:
        found = f"it is empty, not {size} bytes (an older vmctl-agent left it so when the disk was full)"
    elif held < size:
        found = f"it holds {held} bytes, not the {size} it must (cut short, or not written by vmctl-agent)"
    else:
        found = f"it holds more than the {size} bytes it must (not written by vmctl-agent)"
    return (
        f"{found}. Remove it and restart the agent, which creates a new one; cookies issued under the old key"
        " stop verifying"
    )


def _write_new_file(dir_fd: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        os.fchmod(fd, 0o600)  # a umask could have left the agent's own user unable to read it back
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_secret(dir_fd: int, name: str, size: int, purpose: str) -> None:
    """Put ``size`` random bytes at ``name``, whole or not at all.

    Written to a temporary file and linked into place only once on disk, so a
    full disk or a crash never leaves an empty or partial secret behind. The
    link never replaces: if another agent got there first, its (whole) file
    stays and is the one used.
    """
    temporary = f".{name}.{secrets.token_hex(8)}.new"
    try:
        try:
            _write_new_file(dir_fd, temporary, secrets.token_bytes(size))
            with contextlib.suppress(FileExistsError):
                os.link(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary, dir_fd=dir_fd)
        os.fsync(dir_fd)  # the new name is on disk before anything is signed with it
    except OSError as exc:
        raise OSError(
            f"cannot {purpose}: creating it failed ({exc.strerror}); nothing was left behind. Fix that (free some"
            " space, make the directory writable) and restart the agent"
        ) from exc


def read_or_create_secret(path: str, size: int, what: str = "cookie key file") -> bytes:
    """The ``size`` secret bytes in ``path``, created (mode 0600, atomically) if it is absent.

    The file must be the agent's user's own regular file, that no one else may
    read, write or run, of exactly ``size`` bytes, in a trusted directory (see
    :func:`resolve_trusted_directory`); a link at ``path`` is refused. Raises
    UnsafePath (an OSError) or ValueError with what to do.
    """
    purpose = f"use the {what} {path}"
    name = os.path.basename(path)
    if not name:
        raise ValueError(f"cannot {purpose}: it names a directory, not a file")
    directory, _ = resolve_trusted_directory(os.path.dirname(os.path.abspath(path)), purpose)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            return _read_secret(dir_fd, name, size, purpose)
        except FileNotFoundError:
            _create_secret(dir_fd, name, size, purpose)
        return _read_secret(dir_fd, name, size, purpose)
    finally:
        os.close(dir_fd)

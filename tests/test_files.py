"""The agent's files against a local attacker: squatted sockets, planted links, foreign keys, a full disk.

The attacker is user ``nobody``: every file, link, FIFO and socket it plants
is made by a real process running as uid 65534, in a world-writable sticky
directory (the /tmp of a host) unless the test says otherwise. Each refusal is
checked end to end on a real agent: it exits 1 with ``vmctl-agent: <why>``,
and what the attacker planted, or pointed at, is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from support.audit_lines import audit_records
from support.filesystems import fill
from support.peers import NOBODY, public_directory
from support.waiting import wait_for

AGENT = [sys.executable, "-m", "vmctl_server.agent"]
NOBODY_NAME = f"uid {NOBODY} (nobody)"
KEY_SIZE = 32

# A unix socket held by the attacker; after "report" on stdin it says how many
# connections reached it (accepting whatever is queued), so a test can tell
# that the agent never connected.
SQUATTER = """
import socket, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(16)
if sys.argv[2] == "dead":
    listener.close()
print("ready", flush=True)
sys.stdin.readline()
count = 0
if sys.argv[2] == "live":
    listener.setblocking(False)
    while True:
        try:
            listener.accept()[0].close()
        except BlockingIOError:
            break
        count += 1
print(count, flush=True)
"""


def system_python() -> str:
    """An interpreter the attacker can run: the project's may live under a directory it cannot enter."""
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None)
    if python is None:
        pytest.fail("no system python3 to run as another user")
    return python


def as_nobody(*argv: str) -> None:
    """Run ``argv`` as the attacker: uid and gid nobody, no supplementary groups."""
    subprocess.run(argv, user=NOBODY, group=NOBODY, extra_groups=[], cwd="/", check=True, timeout=60)


def _got_past_the_checks(socket_dir: pathlib.Path) -> bool:
    """The agent makes its private directory beside the socket only once its files were all accepted."""
    with contextlib.suppress(OSError):
        return any(name.startswith(".vmctl-agent-") for name in os.listdir(socket_dir))
    return False


def refused(*args: str, socket_dir: pathlib.Path) -> str:
    """Start an agent that must refuse to start; its message. Fails at once if it gets as far as serving."""
    with tempfile.TemporaryFile("w+") as stderr:
        agent = subprocess.Popen(
            [*AGENT, "--listen", f"unix://{socket_dir}/agent.sock", *args], stdout=subprocess.DEVNULL, stderr=stderr
        )

        def exited_before_serving() -> bool:
            assert not _got_past_the_checks(socket_dir), "the agent accepted its files and is starting to serve"
            return agent.poll() is not None

        try:
            wait_for(exited_before_serving, "the agent to refuse (neither refused nor started: blocked?)", 60)
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
        stderr.seek(0)
        message = stderr.read()
    assert agent.returncode == 1, (agent.returncode, message)
    assert message.startswith("vmctl-agent: cannot "), message
    return message


def snapshot(path: pathlib.Path) -> tuple:
    """What a test checks is left alone: the entry itself (never followed) and what it holds or points to."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        held: object = os.readlink(path)
    elif stat.S_ISREG(info.st_mode):
        held = path.read_bytes()
    else:
        held = None
    return info.st_ino, info.st_uid, stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_mtime_ns, held


@pytest.fixture
def shared_dir() -> Iterator[pathlib.Path]:
    """A directory like /tmp: root's, mode 1777 (anyone may add entries, only their owner remove them)."""
    with public_directory(0o1777) as path:
        yield path


@pytest.fixture
def victim(tmp_path) -> pathlib.Path:
    """A root-owned file an attacker would like the agent to append to or read."""
    path = tmp_path / "victim"
    path.write_bytes(b"root's own file\n")
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def squatter(path: pathlib.Path, state: str) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(
        [system_python(), "-I", "-S", "-c", SQUATTER, str(path), state],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        cwd="/",
    )
    try:
        assert proc.stdout.readline() == "ready\n"  # type: ignore[union-attr]
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()  # type: ignore[union-attr]
        proc.stdout.close()  # type: ignore[union-attr]


def connections_received(proc: subprocess.Popen) -> int:
    proc.stdin.write("report\n")  # type: ignore[union-attr]
    proc.stdin.flush()  # type: ignore[union-attr]
    return int(proc.stdout.readline())  # type: ignore[union-attr]


# ---- the socket --------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["live", "dead"])
def test_another_users_socket_at_the_path_is_refused_never_connected_to_or_removed(shared_dir, state):
    path = shared_dir / "agent.sock"
    with squatter(path, state) as attacker:
        before = snapshot(path)
        message = refused(socket_dir=shared_dir)
        assert f"a socket owned by {NOBODY_NAME} is there" in message
        assert "neither connects to nor removes" in message
        assert snapshot(path) == before
        assert connections_received(attacker) == 0
    assert sorted(p.name for p in shared_dir.iterdir()) == ["agent.sock"]  # no private directory either


def test_a_link_at_the_socket_path_is_refused_and_left_alone(shared_dir, victim):
    path = shared_dir / "agent.sock"
    as_nobody("ln", "-s", str(victim), str(path))
    before, victim_before = snapshot(path), snapshot(victim)
    message = refused(socket_dir=shared_dir)
    assert f"a symbolic link to {victim} owned by {NOBODY_NAME} is there" in message
    assert snapshot(path) == before and snapshot(victim) == victim_before


@pytest.mark.parametrize("mode", [0o1777, 0o0777, 0o0770])
def test_a_socket_directory_others_may_write_is_refused(tmp_path, mode):
    directory = tmp_path / "run"
    directory.mkdir()
    directory.chmod(mode)
    message = refused(socket_dir=directory)
    assert f"{directory} is writable by" in message and f"(mode {mode:04o})" in message
    assert list(directory.iterdir()) == []  # neither socket nor private directory


def _open_parent(tmp_path: pathlib.Path, shared_dir: pathlib.Path) -> pathlib.Path:
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)  # not sticky: anyone could rename the directory below and put another in its place
    (parent / "run").mkdir()
    return parent / "run"


def _parent_owned_by_nobody(tmp_path: pathlib.Path, shared_dir: pathlib.Path) -> pathlib.Path:
    parent = tmp_path / "nobodys"
    parent.mkdir()
    (parent / "run").mkdir()
    os.chown(parent, NOBODY, NOBODY)
    return parent / "run"


def _link_owned_by_nobody(tmp_path: pathlib.Path, shared_dir: pathlib.Path) -> pathlib.Path:
    (tmp_path / "safe").mkdir()
    as_nobody("ln", "-s", str(tmp_path / "safe"), str(shared_dir / "run"))
    return shared_dir / "run"


def _root_link_through_nobodys_directory(tmp_path: pathlib.Path, shared_dir: pathlib.Path) -> pathlib.Path:
    _parent_owned_by_nobody(tmp_path, shared_dir)
    (tmp_path / "run").symlink_to("nobodys/run")  # root's own link, into a directory nobody owns
    return tmp_path / "run"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_open_parent, "/open is writable by group and others (mode 0777) and not sticky"),
        (_parent_owned_by_nobody, f"/nobodys belongs to {NOBODY_NAME}"),
        (_link_owned_by_nobody, f"/run belongs to {NOBODY_NAME}"),
        (_root_link_through_nobodys_directory, f"/nobodys belongs to {NOBODY_NAME}"),
    ],
    ids=["writable-parent", "parent-of-another-user", "link-of-another-user", "link-through-another-users-directory"],
)
def test_every_directory_and_link_on_the_way_to_the_socket_is_checked(tmp_path, shared_dir, make, expected):
    directory = make(tmp_path, shared_dir)
    message = refused(socket_dir=directory)
    assert expected in message
    assert list(pathlib.Path(os.path.realpath(directory)).iterdir()) == []


def test_a_socket_directory_reached_through_roots_own_link_is_fine(start_agent, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")  # like /var/run -> /run
    agent = start_agent(socket_dir=tmp_path / "link")
    with agent.client() as client:
        assert client.node_info().hostname
    assert stat.S_ISSOCK(os.lstat(tmp_path / "real" / "agent.sock").st_mode)


def test_missing_socket_directories_are_created_0755_whatever_the_umask(start_agent, tmp_path):
    socket_dir = tmp_path / "run" / "vmctl"
    old_umask = os.umask(0o077)  # systemd's UMask=0077; the agent inherits it
    try:
        agent = start_agent(socket_dir=socket_dir)
    finally:
        os.umask(old_umask)
    for directory in (tmp_path / "run", socket_dir):
        info = os.lstat(directory)
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o755 and info.st_uid == 0
    with agent.client() as client:
        assert client.node_info().hostname


def test_a_link_planted_where_a_directory_would_be_created_is_refused(shared_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    as_nobody("ln", "-s", str(elsewhere), str(shared_dir / "run"))
    message = refused(socket_dir=shared_dir / "run" / "vmctl")
    assert f"{shared_dir}/run belongs to {NOBODY_NAME}" in message
    assert list(elsewhere.iterdir()) == []  # nothing made through the link


# ---- the audit log -----------------------------------------------------------------------------


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-root-file", "dangling"])
def test_a_link_at_the_audit_log_path_is_refused_and_its_target_untouched(shared_dir, tmp_path, victim, dangling):
    target = tmp_path / "would-be-created" if dangling else victim
    log_path = shared_dir / "audit.log"
    as_nobody("ln", "-s", str(target), str(log_path))
    before = snapshot(log_path)
    victim_before = snapshot(victim)
    message = refused("--audit-log", str(log_path), socket_dir=tmp_path)
    assert f"write the audit log {log_path}: it is a symbolic link to {target} owned by {NOBODY_NAME}" in message
    assert snapshot(log_path) == before and snapshot(victim) == victim_before
    assert not (tmp_path / "would-be-created").exists()


def _nobodys_file(path: pathlib.Path, spare: pathlib.Path) -> None:
    as_nobody("sh", "-c", 'umask 077 && echo "{}" > "$1"', "sh", str(path))


def _writable_by_others(path: pathlib.Path, spare: pathlib.Path) -> None:
    path.write_text("{}\n")
    path.chmod(0o666)


def _writable_by_group(path: pathlib.Path, spare: pathlib.Path) -> None:
    path.write_text("{}\n")
    path.chmod(0o620)


def _hard_link_to_a_root_file(path: pathlib.Path, spare: pathlib.Path) -> None:
    # What an attacker can do in a sticky directory where fs.protected_hardlinks is 0; root makes it here.
    other = spare / "root-file"
    other.write_text("root's own file\n")
    os.link(other, path)


def _nobodys_fifo(path: pathlib.Path, spare: pathlib.Path) -> None:
    as_nobody("mkfifo", "-m", "600", str(path))


@pytest.mark.parametrize(
    ("plant", "expected"),
    [
        (_nobodys_file, f"it belongs to {NOBODY_NAME}, not to the agent's user (uid 0 (root))"),
        (_writable_by_others, "it is writable by group and others (mode 0666), who could forge or erase records"),
        (_writable_by_group, "it is writable by group (mode 0620)"),
        (_hard_link_to_a_root_file, "it has 2 names (hard links)"),
        (_nobodys_fifo, "it is a FIFO, not a regular file"),  # without O_NONBLOCK the agent would hang here
    ],
    ids=["owned-by-nobody", "writable-by-others", "writable-by-group", "hard-link", "fifo"],
)
def test_an_audit_log_that_is_not_the_agents_own_private_file_is_refused(shared_dir, tmp_path, plant, expected):
    log_path = shared_dir / "audit.log"
    plant(log_path, tmp_path)
    before = snapshot(log_path)
    message = refused("--audit-log", str(log_path), socket_dir=tmp_path)
    assert f"cannot write the audit log {log_path}: {expected}" in message
    assert snapshot(log_path) == before


# ---- the cookie key ----------------------------------------------------------------------------


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-root-file", "dangling"])
def test_a_link_at_the_key_path_is_refused_and_its_target_untouched(shared_dir, tmp_path, dangling):
    target = tmp_path / "would-be-created" if dangling else tmp_path / "roots-secret"
    if not dangling:
        target.write_bytes(secrets.token_bytes(KEY_SIZE))
        target.chmod(0o600)
    key_path = shared_dir / "cookie.key"
    as_nobody("ln", "-s", str(target), str(key_path))
    before = snapshot(key_path)
    target_before = None if dangling else snapshot(target)
    message = refused("--cookie-key-file", str(key_path), socket_dir=tmp_path)
    assert f"use the cookie key file {key_path}: it is a symbolic link to {target} owned by {NOBODY_NAME}" in message
    assert snapshot(key_path) == before
    assert (not target.exists()) if dangling else snapshot(target) == target_before
    assert sorted(p.name for p in shared_dir.iterdir()) == ["cookie.key"]  # no temporary file left


def test_a_key_file_of_another_user_is_refused(shared_dir, tmp_path):
    # A key the attacker wrote is a key the attacker knows: it could forge every cookie.
    key_path = shared_dir / "cookie.key"
    as_nobody("sh", "-c", 'umask 077 && head -c 32 /dev/urandom > "$1"', "sh", str(key_path))
    before = snapshot(key_path)
    message = refused("--cookie-key-file", str(key_path), socket_dir=tmp_path)
    assert f"it belongs to {NOBODY_NAME}, not to the agent's user" in message and "Remove it" in message
    assert snapshot(key_path) == before


@pytest.mark.parametrize("size", [0, 20, KEY_SIZE + 1])
def test_a_key_file_of_the_wrong_size_says_what_to_do(start_agent, tmp_path, size):
    # An older agent left an empty key on a full disk, and every later start failed without saying why.
    key_path = tmp_path / "cookie.key"
    key_path.write_bytes(secrets.token_bytes(size))
    key_path.chmod(0o600)
    message = refused("--cookie-key-file", str(key_path), socket_dir=tmp_path)
    assert "Remove it and restart the agent, which creates a new one" in message
    assert (
        "it is empty, not 32 bytes" if size == 0 else "bytes, not the 32 it must" if size < 32 else "more than"
    ) in message
    assert len(key_path.read_bytes()) == size  # left for the operator to remove
    key_path.unlink()  # what the message says to do
    agent = start_agent("--cookie-key-file", str(key_path))
    with agent.client() as client:
        assert client.node_info().hostname
    assert len(key_path.read_bytes()) == KEY_SIZE


def test_a_key_created_on_a_full_disk_leaves_nothing_and_the_next_start_makes_a_good_one(start_agent, tiny_tmpfs):
    filler = fill(tiny_tmpfs)
    key_path = tiny_tmpfs / "cookie.key"
    message = refused("--cookie-key-file", str(key_path), socket_dir=tiny_tmpfs.parent)
    assert f"use the cookie key file {key_path}: creating it failed (No space left on device)" in message
    assert "nothing was left behind" in message
    assert [p.name for p in tiny_tmpfs.iterdir()] == ["filler"]  # no key, no temporary file

    filler.unlink()  # space is freed
    agent = start_agent("--cookie-key-file", str(key_path))
    with agent.client() as client:
        assert client.node_info().hostname
    info = os.lstat(key_path)
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0
    assert info.st_size == KEY_SIZE and key_path.read_bytes() != bytes(KEY_SIZE)
    assert [p.name for p in tiny_tmpfs.iterdir()] == ["cookie.key"]


# Each racer loads the key through the agent's own entry point, then signs the same claims: equal
# cookies mean one key.
RACER = """
import sys
from vmctl_server.core.cookie import CookieClaims, CookieSigner
print("ready", flush=True)
sys.stdin.readline()
signer = CookieSigner.from_key_file(sys.argv[1])
print(signer.issue(CookieClaims(bytes(16), 1, 1, bytes(16), bytes(32))).hex(), flush=True)
"""


def test_agents_creating_the_key_at_once_all_use_the_one_that_won(tmp_path):
    for attempt in range(4):
        key_path = tmp_path / f"try{attempt}" / "cookie.key"
        key_path.parent.mkdir()
        racers = [
            subprocess.Popen(
                [sys.executable, "-c", RACER, str(key_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            for _ in range(6)
        ]
        try:
            for racer in racers:
                assert racer.stdout.readline() == b"ready\n"  # type: ignore[union-attr]
            for racer in racers:  # all of them at once, as near as the test can
                racer.stdin.write(b"go\n")  # type: ignore[union-attr]
                racer.stdin.flush()  # type: ignore[union-attr]
            cookies = [racer.stdout.readline().strip() for racer in racers]  # type: ignore[union-attr]
        finally:
            for racer in racers:
                racer.kill()
                racer.wait()
                racer.stdin.close()  # type: ignore[union-attr]
                racer.stdout.close()  # type: ignore[union-attr]
        assert len(set(cookies)) == 1 and cookies[0], cookies
        assert len(key_path.read_bytes()) == KEY_SIZE
        assert [p.name for p in key_path.parent.iterdir()] == ["cookie.key"]


# ---- directories of the key and the log --------------------------------------------------------


@pytest.mark.parametrize("option", ["--cookie-key-file", "--audit-log"])
def test_a_key_or_log_in_a_directory_others_may_write_is_refused(tmp_path, option):
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(0o777)  # not sticky: anyone could swap the file between two starts, or erase it
    message = refused(option, str(directory / "file"), socket_dir=tmp_path)
    assert f"{directory} is writable by group and others (mode 0777) and not sticky" in message
    assert list(directory.iterdir()) == []


def test_a_key_and_log_in_a_sticky_shared_directory_are_the_agents_own(start_agent, shared_dir):
    key_path, log_path = shared_dir / "cookie.key", shared_dir / "audit.log"
    agent = start_agent("--cookie-key-file", str(key_path), "--audit-log", str(log_path))
    with agent.client() as client:
        assert client.node_info().hostname
    for path in (key_path, log_path):
        info = os.lstat(path)
        assert stat.S_ISREG(info.st_mode) and info.st_uid == 0 and stat.S_IMODE(info.st_mode) == 0o600
    assert key_path.stat().st_size == KEY_SIZE
    assert audit_records(log_path, event="agent_started")

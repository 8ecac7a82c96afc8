"""Which processes a caller reaches, and what a refusal tells it (issue 9, items 1, 7 and 8).

Against real agents, real users and real processes:

- a process belongs to a uid only wholly: a setuid-root program a user started,
  a process that kept a root id, a setgid one and one that made itself
  non-dumpable are not that user's, as the kernel itself says (it refuses the
  user their /proc/PID/maps), so a rule for "the caller's own processes"
  neither reads, advises nor lists them;
- a cgroup prefix is a path: ``/…-app`` never selects ``/…-app-evil``, in the
  policy, its protection, ListProcesses, ``vmctl ps`` and ``vmctl reclaim``;
- a refusal tells a caller only what it may read: for a process it may not
  read the pid alone (no comm, uid, cgroup or address), never the policy's
  path, and advice, whose answers map a layout, takes leave to read.

Throwaway users are made with useradd and removed with userdel by the
``user`` fixture, after every process the test started as them has ended.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import json
import os
import pathlib
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator

import grpc
import pytest
from support.agents import write_policy
from support.audit_lines import audit_records
from support.cgroup2 import cgroup
from support.expect import expect_error
from support.peers import NOBODY, ConnectAs
from support.processes import PAGE, status_field
from support.waiting import wait_for

from vmctl_api import vmctl_pb2 as pb
from vmctl_api import vmctl_pb2_grpc
from vmctl_api.cgroup_paths import is_under
from vmctl_client import Client, VmctlError, calls
from vmctl_client.calls import RetryPolicy
from vmctl_server.access.admission import Guard
from vmctl_server.access.policy import PolicyError, load_policy, parse_policy
from vmctl_server.core import procfs
from vmctl_server.core.faults import ProcessChanged, ProcessGone
from vmctl_server.core.snapshot import read_identity
from vmctl_server.core.targets import Target, read_target

REPO = pathlib.Path(__file__).resolve().parent.parent
NO_RETRY = RetryPolicy(attempts=1)
PR_SET_DUMPABLE = 4
# What a POLICY_DENIED may carry: who asked, for what, which of its rules were
# considered, and the pid it sent. Nothing about the process.
REFUSAL_METADATA = {"identity", "verb", "advice", "rule", "pid"}


def comm_of(pid: int) -> str:
    return pathlib.Path(f"/proc/{pid}/comm").read_text().strip()


def ids_of(pid: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(real, effective, saved, fs) uids and gids, as /proc/PID/status has them."""
    uids, gids = (tuple(int(n) for n in status_field(pid, name).split()) for name in ("Uid", "Gid"))
    return uids, gids


def stack_of(client: Client, pid: int):
    """The cookie and the [stack] VMA of ``pid``, as a caller that may read it sees them."""
    info = client.get_vma_info(pid)
    return info.cookie, next(v for v in info.vmas if v.path == "[stack]")


# ---- throwaway users ----------------------------------------------------------------------


@dataclasses.dataclass
class ThrowawayUser:
    name: str
    uid: int
    gid: int
    processes: list[subprocess.Popen] = dataclasses.field(default_factory=list)

    def start(self, *argv: str) -> subprocess.Popen:
        """``argv`` run as this user alone: every uid and gid its own, no other groups."""
        proc = subprocess.Popen(list(argv), user=self.uid, group=self.gid, extra_groups=[], stdin=subprocess.DEVNULL)
        self.processes.append(proc)
        return proc

    def kernel_lets_read_maps(self, pid: int) -> bool:
        """Whether the kernel lets this user open /proc/PID/maps (its ptrace read check)."""
        run = subprocess.run(
            ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "cat", f"/proc/{pid}/maps"],
            capture_output=True,
        )
        return run.returncode == 0

    def connect(self, agent) -> ConnectAs:
        return ConnectAs(agent.socket_path, self.uid, self.gid)


def _account_tool(*argv: str) -> None:
    """useradd/userdel, again while another one holds the account files' lock."""

    def done() -> bool:
        run = subprocess.run(argv, capture_output=True, text=True)
        if run.returncode != 0 and "lock" not in run.stderr:
            raise RuntimeError(f"{' '.join(argv)}: exit {run.returncode}: {run.stderr}")
        return run.returncode == 0

    wait_for(done, f"{argv[0]} to get the account files' lock")


@pytest.fixture
def user() -> Iterator[ThrowawayUser]:
    """A new user with a group of its own; gone at the end, with its processes, even when the test fails."""
    name = f"vmctl-tt-{secrets.token_hex(4)}"
    _account_tool("useradd", "--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name)
    made = None
    try:
        entry = pwd.getpwnam(name)
        made = ThrowawayUser(name, entry.pw_uid, entry.pw_gid)
        yield made
    finally:
        for proc in made.processes if made else ():
            proc.kill()
            proc.wait()
        _account_tool("userdel", name)
        with contextlib.suppress(KeyError):
            grp.getgrnam(name)
            _account_tool("groupdel", name)


@pytest.fixture
def setuid_sleep() -> Iterator[str]:
    """A setuid-root copy of sleep, on a filesystem where setuid bits count (not mounted nosuid)."""
    parent = next((p for p in (tempfile.gettempdir(), "/var/tmp") if not os.statvfs(p).f_flag & os.ST_NOSUID), None)
    if parent is None:
        pytest.skip("every temporary directory is on a nosuid filesystem")
    directory = tempfile.mkdtemp(prefix="vmctl-suid-", dir=parent)
    try:
        os.chmod(directory, 0o755)  # the user must reach it
        path = os.path.join(directory, "vmctl-suid")
        shutil.copy(shutil.which("sleep") or "/bin/sleep", path)
        os.chown(path, 0, 0)
        os.chmod(path, 0o4755)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# A root process that sets its own ids and dumpability, then waits: the shapes
# a daemon takes when it drops only part of its privilege, or hides itself.
_SET_IDS = """
import ctypes, json, os, sys
uids, gids, dumpable = json.loads(sys.argv[1])
os.setgroups([])
os.setresgid(*gids)
os.setresuid(*uids)
if ctypes.CDLL(None, use_errno=True).prctl(4, dumpable, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl")
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def with_ids() -> Iterator:
    """Start a root process that switches to the given (real, effective, saved) uids and gids and dumpability."""
    started: list[subprocess.Popen] = []

    def start(uids: tuple[int, int, int], gids: tuple[int, int, int], dumpable: bool) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SET_IDS, json.dumps([uids, gids, int(dumpable)])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        if proc.stdout.readline() != "ready\n":  # type: ignore[union-attr]
            raise RuntimeError(f"the process setting ids {uids} {gids} failed (exit {proc.wait()})")
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.kill()
            proc.wait()


# ---- item 1: a process is a user's only when it is wholly theirs ---------------------------------


def _own_processes_policy(directory: pathlib.Path, uid: int) -> str:
    """The user may read and advise its own processes; root may read everything (to hand out layouts and cookies)."""
    return write_policy(
        directory,
        f"""
require_cookie: false
rules:
  - name: own-processes
    identities: ["uid:{uid}"]
    verbs: [read, advise]
    targets: {{uids: [{uid}]}}
  - name: root-reads
    identities: ["uid:0"]
    verbs: [read]
""",
    )


def _refused_everything(client: Client, root: Client, pid: int) -> None:
    """Read, advise with a cookie, advise without one (dry run): each POLICY_DENIED naming the pid alone."""
    comm = comm_of(pid)
    cookie, stack = stack_of(root, pid)
    for call in (
        lambda: client.get_vma_info(pid),
        lambda: client.advise_ranges(pid, [stack], "pageout", cookie=cookie),
        lambda: client.advise_ranges(pid, [stack], "cold", dry_run=True),
    ):
        error = expect_error(call, "PERMISSION_DENIED", "POLICY_DENIED")
        assert_names_only_the_pid(error, pid, [comm])
    assert pid not in {p.pid for p in client.list_processes()}


def _allowed_everything(client: Client, pid: int) -> None:
    cookie, stack = stack_of(client, pid)
    assert client.advise_ranges(pid, [stack], "cold", cookie=cookie).syscalls == 1
    assert pid in {p.pid for p in client.list_processes()}


def test_a_setuid_program_a_user_started_is_not_that_users(start_agent, public_dir, user, setuid_sleep):
    own = user.start("sleep", "300")
    setuid = user.start(setuid_sleep, "300")
    # The setup is what the attack needs: the setuid bit took (real uid the
    # user's, effective and saved root), and the kernel refuses the user the
    # program's maps while it lets them read their own sleep's.
    assert ids_of(setuid.pid)[0] == (user.uid, 0, 0, 0)
    assert ids_of(own.pid)[0] == (user.uid,) * 4
    assert not user.kernel_lets_read_maps(setuid.pid) and user.kernel_lets_read_maps(own.pid)

    agent = start_agent(
        "--socket-mode", "0666", "--policy", _own_processes_policy(public_dir, user.uid), socket_dir=public_dir
    )
    with agent.client() as root, user.connect(agent) as peer, Client(peer.address, retry=NO_RETRY) as client:
        _allowed_everything(client, own.pid)
        _refused_everything(client, root, setuid.pid)

    records = audit_records(agent.log())
    by_pid = {pid: [r for r in records if r["pid"] == pid] for pid in (own.pid, setuid.pid)}
    assert [(r["status"], r["rule"], r["target_uid"]) for r in by_pid[own.pid]] == [("OK", "own-processes", user.uid)]
    # Refused, nothing applied; the record keeps what the caller was not told.
    assert [(r["reason"], r["syscalls"], r["comm"], r["target_uid"]) for r in by_pid[setuid.pid]] == [
        ("POLICY_DENIED", 0, "vmctl-suid", user.uid)
    ] * 2


# (uids, gids, dumpable): each keeps the user from ptrace-reading the process, so each is not the user's.
PARTLY_THEIRS = {
    "real-uid-only": lambda u, g: ((u, 0, 0), (g, g, g), True),  # started by root, dropped only the real uid
    "saved-uid-root": lambda u, g: ((u, u, 0), (g, g, g), True),  # may take root back at any time
    "setgid": lambda u, g: ((u, u, u), (g, 0, 0), True),  # a setgid-root-group program
    "not-dumpable": lambda u, g: ((u, u, u), (g, g, g), False),  # hides itself from its user (ssh-agent)
}


def test_a_process_that_is_only_partly_a_users_is_not_theirs(start_agent, public_dir, user, with_ids):
    own = with_ids((user.uid,) * 3, (user.gid,) * 3, True)  # the same program, wholly the user's
    partly = {kind: with_ids(*ids(user.uid, user.gid)) for kind, ids in PARTLY_THEIRS.items()}
    assert user.kernel_lets_read_maps(own.pid)
    for kind, proc in partly.items():
        uids, gids, _ = PARTLY_THEIRS[kind](user.uid, user.gid)
        assert ids_of(proc.pid) == ((*uids, uids[1]), (*gids, gids[1])), kind
        assert not user.kernel_lets_read_maps(proc.pid), kind

    agent = start_agent(
        "--socket-mode", "0666", "--policy", _own_processes_policy(public_dir, user.uid), socket_dir=public_dir
    )
    with agent.client() as root, user.connect(agent) as peer, Client(peer.address, retry=NO_RETRY) as client:
        _allowed_everything(client, own.pid)
        for kind, proc in partly.items():
            try:
                _refused_everything(client, root, proc.pid)
            except AssertionError as exc:
                raise AssertionError(f"{kind}: {exc}") from exc


def test_facts_read_through_one_open_proc_dir_are_of_one_process(spawn_target):
    """Once the process is gone, the open /proc/PID answers ProcessGone: it
    can never read the pid's next owner, so its start time vouches for the rest."""
    target = spawn_target()
    with procfs.ProcessDir(target.pid) as proc:
        assert proc.stat().start_time == read_identity(target.pid).start_time
        assert proc.status().owner == 0
        target.kill()  # exited and reaped: the pid is free for another process
        with pytest.raises(ProcessGone):
            proc.status()


def test_a_process_that_execs_after_the_check_is_not_the_one_checked(spawn_target):
    """What GetVmaInfo does for a caller with rules on targets: the facts name
    the image they were read from, and a snapshot of a later image (a setuid
    program exec'd in between) is PROCESS_CHANGED."""
    target = spawn_target()
    checked = read_target(target.pid)
    Guard.same_process(checked, read_identity(target.pid).start_time, read_identity(target.pid).exec_id)
    target.call("exec")
    target._read()  # the new image's hello
    after = read_identity(target.pid)
    assert after.start_time == checked.start_time  # the start time alone cannot tell
    with pytest.raises(ProcessChanged):
        Guard.same_process(checked, after.start_time, after.exec_id)


# ---- item 7: a cgroup prefix is a path ---------------------------------------------------------


@pytest.mark.unprivileged
@pytest.mark.parametrize(
    ("path", "prefix", "under"),
    [
        ("/app", "/app", True),
        ("/app/web", "/app", True),
        ("/app/web", "/app/", True),
        ("/app-evil", "/app", False),
        ("/app-evil/x", "/app/", False),
        ("/application", "/app", False),
        ("/", "/app", False),
        ("/app", "/", True),
        ("/anything/at/all", "/", True),
        ("", "/", True),  # no cgroup v2 line: "/" still selects every process
        ("/app", "app", False),  # not a path
        ("/app/web", "/app//web", False),  # an empty component names no cgroup
        ("/app", "", False),
    ],
)
def test_a_prefix_selects_whole_path_components(path, prefix, under):
    assert is_under(path, prefix) is under


@pytest.mark.unprivileged
def test_the_client_holds_an_agents_answer_to_the_rule():
    """An agent older than the rule matched string prefixes; the client drops what it let through."""
    older_reply = pb.ListProcessesResponse(
        processes=[pb.ProcessInfo(pid=pid, cgroup=path) for pid, path in ((1, "/app"), (2, "/app-evil"), (3, "/app/x"))]
    )
    assert [p.pid for p in calls.list_processes("/app").wrap(older_reply)] == [1, 3]
    assert [p.pid for p in calls.list_processes(None).wrap(older_reply)] == [1, 2, 3]


@dataclasses.dataclass
class AppAndEvil:
    prefix: str  # "/<unique>-app"
    app: object  # the target in it
    evil: object  # the target in "/<unique>-app-evil", whose name only starts like it


@pytest.fixture
def app_and_evil(spawn_target) -> Iterator[AppAndEvil]:
    base = f"vmctl-tt-{os.getpid()}-{secrets.token_hex(3)}-app"
    with cgroup(base) as app_group, cgroup(f"{base}-evil") as evil_group:
        app, evil = spawn_target(), spawn_target()
        (app_group / "cgroup.procs").write_text(str(app.pid))
        (evil_group / "cgroup.procs").write_text(str(evil.pid))
        yield AppAndEvil(f"/{base}", app, evil)


def test_policy_prefixes_select_and_protect_whole_components(start_agent, public_dir, app_and_evil):
    app, evil, prefix = app_and_evil.app, app_and_evil.evil, app_and_evil.prefix
    policy = write_policy(
        public_dir,
        f"""
require_cookie: false
protected_cgroup_prefixes: ["{prefix}/"]
rules:
  - name: root
    identities: ["uid:0"]
    verbs: [read, advise]
  - name: app-team
    identities: ["uid:{NOBODY}"]
    verbs: [read, advise]
    targets: {{cgroup_prefixes: ["{prefix}"]}}
""",
    )
    agent = start_agent("--socket-mode", "0666", "--policy", policy, socket_dir=public_dir)
    with ConnectAs(agent.socket_path, NOBODY) as nobody, Client(nobody.address, retry=NO_RETRY) as team:
        assert team.get_vma_info(app.pid).process.pid == app.pid
        expect_error(lambda: team.get_vma_info(evil.pid), "PERMISSION_DENIED", "POLICY_DENIED")
        assert [p.pid for p in team.list_processes()] == [app.pid]
        # The team's own cgroup is protected: it may read it and so may learn that.
        cookie, stack = stack_of(team, app.pid)
        error = expect_error(
            lambda: team.advise_ranges(app.pid, [stack], "cold", cookie=cookie), "PERMISSION_DENIED", "PROTECTED_TARGET"
        )
        assert error.metadata["protection"] == f"protected_cgroup_prefixes '{prefix}/'"
    with agent.client() as root:
        cookie, stack = stack_of(root, evil.pid)
        assert root.advise_ranges(evil.pid, [stack], "cold", cookie=cookie).syscalls == 1  # not protected
        cookie, stack = stack_of(root, app.pid)
        expect_error(
            lambda: root.advise_ranges(app.pid, [stack], "cold", cookie=cookie), "PERMISSION_DENIED", "PROTECTED_TARGET"
        )


def vmctl_json(agent, *args: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-m", "vmctl_client.cli", "--target", agent.address, *args, "-o", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout)


def test_list_processes_ps_and_reclaim_select_whole_components(agent, app_and_evil):
    app, evil, prefix = app_and_evil.app, app_and_evil.evil, app_and_evil.prefix
    # The agent itself, asked without the client library (which holds replies to the rule again):
    with grpc.insecure_channel(agent.address) as channel:
        reply = vmctl_pb2_grpc.VmControlStub(channel).ListProcesses(pb.ListProcessesRequest(cgroup_prefix=prefix))
        assert [p.pid for p in reply.processes] == [app.pid]
    with agent.client() as client:
        for form in (prefix, prefix + "/"):
            assert [p.pid for p in client.list_processes(form)] == [app.pid], form
        assert {app.pid, evil.pid} <= {p.pid for p in client.list_processes("/")}
    assert [p["pid"] for p in vmctl_json(agent, "ps", "--cgroup", prefix)["processes"]] == [app.pid]
    report = vmctl_json(agent, "reclaim", "--cgroup", prefix, "--dry-run")
    assert [(p["pid"], p["status"]) for p in report["processes"]] == [(app.pid, "done")]


@pytest.mark.unprivileged
@pytest.mark.parametrize("prefix", ["app", "/app//web"])
@pytest.mark.parametrize("where", ["rules[0].targets.cgroup_prefixes[0]", "protected_cgroup_prefixes[0]"])
def test_a_prefix_that_is_no_path_is_refused_saying_what_a_prefix_is(prefix, where, tmp_path):
    if where.startswith("rules"):
        text = f"rules: [{{identities: ['uid:0'], verbs: [read], targets: {{cgroup_prefixes: ['{prefix}']}}}}]"
    else:
        text = f"protected_cgroup_prefixes: ['{prefix}']\nrules: []"
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "policy.yaml")
    complaint = str(caught.value)
    assert complaint.startswith(f"{where}: '{prefix}' is not a cgroup path"), complaint
    assert "/app selects /app and /app/web, not /app-evil" in complaint
    agent = (sys.executable, "-m", "vmctl_server.agent", "--listen", f"unix://{tmp_path}/a.sock")
    result = subprocess.run(
        [*agent, "--policy", write_policy(tmp_path, text)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "not /app-evil" in result.stderr, result.stderr


@pytest.mark.unprivileged
@pytest.mark.parametrize(
    ("cgroup_path", "selected"),
    [
        ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-1.scope", True),
        ("/kubepods/burstable/pod1/0123", True),  # the cgroupfs driver
        ("/kubepods-evil/x", False),
        ("/system.slice/kubelet.service", False),
    ],
)
def test_the_shipped_policy_gives_the_reclaimer_the_pods_of_both_cgroup_drivers(cgroup_path, selected):
    policy = load_policy(str(REPO / "deploy" / "kubernetes" / "base" / "policy.yaml"))
    reclaimer = next(rule for rule in policy.rules if rule.name == "reclaimer")
    assert reclaimer.selects(Target(300, 0, "app", cgroup_path, 1, owner=0)) is selected


# ---- item 8: a refusal tells only what the caller may read ---------------------------------------


def assert_names_only_the_pid(error: VmctlError, pid: int, facts: Iterable[str]) -> None:
    """A POLICY_DENIED that names ``pid`` and holds none of ``facts`` (the
    process's comm, cgroup, the policy's path...) nor any address."""
    assert error.reason == "POLICY_DENIED", error.to_json()
    assert set(error.metadata) <= REFUSAL_METADATA and error.metadata["pid"] == str(pid), error.metadata
    for text in (error.message, *error.metadata.values()):
        for fact in facts:
            assert fact not in text, f"{fact!r} told in {text!r}"
        assert "0x" not in text, text


@pytest.fixture
def stranger_setup(start_agent, spawn_target, public_dir) -> Iterator[tuple]:
    """A root process in a protected cgroup, with a protected comm; nobody may
    read only its own processes and cool any process (but advice takes read)."""
    name = f"vmctl-tt-secret-{secrets.token_hex(3)}"
    with cgroup(name) as group:
        hidden = spawn_target()
        (group / "cgroup.procs").write_text(str(hidden.pid))
        own = subprocess.Popen(["sleep", "300"], user=NOBODY, group=NOBODY, extra_groups=[])
        try:
            policy = write_policy(
                public_dir,
                f"""
require_cookie: false
protected_comm: ["{comm_of(hidden.pid)}"]
protected_cgroup_prefixes: ["/{name}"]
rules:
  - name: root
    identities: ["uid:0"]
    verbs: [read, advise]
  - name: own-processes
    identities: ["uid:{NOBODY}"]
    verbs: [read]
    targets: {{uids: [{NOBODY}]}}
  - name: cool-anything
    identities: ["uid:{NOBODY}"]
    verbs: [advise]
    advices: [cold]
""",
            )
            agent = start_agent("--socket-mode", "0666", "--policy", policy, socket_dir=public_dir)
            yield agent, hidden, own, f"/{name}", policy
        finally:
            own.kill()
            own.wait()


def test_refusals_to_a_caller_that_may_not_read_name_the_pid_alone(stranger_setup):
    agent, hidden, own, hidden_cgroup, policy_path = stranger_setup
    facts = [comm_of(hidden.pid), hidden_cgroup, "uid 0", policy_path, os.path.basename(os.path.dirname(policy_path))]
    with agent.client() as root:
        cookie, stack = stack_of(root, hidden.pid)
    unmapped = (PAGE, 2 * PAGE)  # nothing is mapped at the first pages: a reader would hear RANGE_UNMAPPED
    with ConnectAs(agent.socket_path, NOBODY) as nobody, Client(nobody.address, retry=NO_RETRY) as client:
        listed = client.list_processes()
        # Its own processes only: this one, and whatever else of uid nobody the machine runs now.
        assert own.pid in {p.pid for p in listed} and {p.uid for p in listed} == {NOBODY}
        for call in (
            lambda: client.get_vma_info(hidden.pid),
            # protected twice over, and its rules would select it for cold: still only "no"
            lambda: client.advise_ranges(hidden.pid, [stack], "cold", cookie=cookie),
            lambda: client.advise_ranges(hidden.pid, [stack], "pageout", cookie=cookie),
            # without a cookie, a dry run of a hole: no layout comes back
            lambda: client.advise_ranges(hidden.pid, [unmapped], "cold", dry_run=True),
            lambda: client.advise_ranges(hidden.pid, [stack], "cold", dry_run=True),
        ):
            assert_names_only_the_pid(expect_error(call, "PERMISSION_DENIED", "POLICY_DENIED"), hidden.pid, facts)
        # A kernel thread is refused before any policy: without its name.
        error = expect_error(lambda: client.get_vma_info(2), "FAILED_PRECONDITION", "NO_ADDRESS_SPACE")
        assert comm_of(2) not in error.message
    # An identity no rule names hears that, without where the policy lives.
    with ConnectAs(agent.socket_path, NOBODY - 1) as other, Client(other.address, retry=NO_RETRY) as client:
        for call in (client.node_info, lambda: client.get_vma_info(hidden.pid)):
            error = expect_error(call, "PERMISSION_DENIED", "POLICY_DENIED")
            assert error.metadata["rule"] == "none"
            for text in (error.message, *error.metadata.values()):
                assert policy_path not in text and "policy.yaml" not in text, text
    # The audit log keeps what the caller was not told.
    refused = [r for r in audit_records(agent.log()) if r["pid"] == hidden.pid]
    assert len(refused) == 4 and all(r["reason"] == "POLICY_DENIED" and r["syscalls"] == 0 for r in refused)
    assert {(r["comm"], r["cgroup"], r["target_uid"]) for r in refused} == {(comm_of(hidden.pid), hidden_cgroup, 0)}


def test_a_caller_that_may_read_the_target_hears_the_detail(stranger_setup):
    agent, hidden, own, hidden_cgroup, _ = stranger_setup
    with ConnectAs(agent.socket_path, NOBODY) as nobody, Client(nobody.address, retry=NO_RETRY) as client:
        cookie, stack = stack_of(client, own.pid)
        assert client.advise_ranges(own.pid, [stack], "cold", cookie=cookie).syscalls == 1
        error = expect_error(
            lambda: client.advise_ranges(own.pid, [stack], "pageout", cookie=cookie),
            "PERMISSION_DENIED",
            "POLICY_DENIED",
        )
        own_cgroup = pathlib.Path(f"/proc/{own.pid}/cgroup").read_text().split("::", 1)[1].strip()
        assert f"pid {own.pid} (sleep, uid {NOBODY}, cgroup {own_cgroup})" in error.message
        assert error.metadata["rule"] == "cool-anything"
        error = expect_error(
            lambda: client.advise_ranges(own.pid, [(PAGE, 2 * PAGE)], "cold", dry_run=True),
            "INVALID_ARGUMENT",
            "RANGE_UNMAPPED",
        )
        assert error.metadata["address"] == f"0x{PAGE:x}"
    with agent.client() as root:  # may read everything: protection and its reason, by name
        cookie, stack = stack_of(root, hidden.pid)
        error = expect_error(
            lambda: root.advise_ranges(hidden.pid, [stack], "cold", cookie=cookie),
            "PERMISSION_DENIED",
            "PROTECTED_TARGET",
        )
        assert error.metadata["comm"] == comm_of(hidden.pid)
        assert error.metadata["protection"] == f"protected_comm '{comm_of(hidden.pid)}'"
        assert hidden_cgroup in error.message

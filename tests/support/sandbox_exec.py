"""Run a command under a seccomp filter built like systemd or a container runtime builds one.

    python sandbox_exec.py SPEC.json -- COMMAND [ARGS...]

SPEC.json is one of two shapes.

The systemd unit's filter: {"allow": [syscall names], "families": [address
family numbers], "mdwe": bool}. Every syscall outside "allow" kills the
process (SIGSYS), so a test sees any call the unit would deny; socket() with
a family outside "families" fails with EAFNOSUPPORT, as
RestrictAddressFamilies= does; "mdwe" refuses writable-and-executable
memory, as MemoryDenyWriteExecute= does (prctl PR_SET_MDWE, Linux 6.3+).

A Kubernetes Localhost seccomp profile: {"oci_profile": PATH, "report":
PATH or absent}. The profile (OCI/Docker JSON: defaultAction,
defaultErrnoRet, architectures, syscalls with names, action, errnoRet, args)
is compiled the way runc compiles it (libcontainer/seccomp): a rule whose
action is the default's is skipped, a name this architecture lacks is
skipped, conditions on the same argument become separate rules (any of
them matches), others one rule (all must match). With "report", every
refusal (the default action's and each refusing rule's) is a user
notification instead: a supervisor process, forked before the filter is
loaded, answers it with exactly the errno the profile gives and appends the
syscall's name to the report file first. The program sees what it would
see under the profile, and the test learns the name of every syscall the
profile refused it.

libseccomp sets no_new_privs when it loads the filter, as NoNewPrivileges=
and allowPrivilegeEscalation: false do. Then this execs the command, which
inherits all of it. libseccomp is the library systemd and runc use, loaded
here through cffi.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import sys

from cffi import FFI

ffi = FFI()
ffi.cdef(
    """
    struct scmp_arg_cmp { unsigned int arg; int op; uint64_t datum_a; uint64_t datum_b; };
    struct seccomp_data { int nr; uint32_t arch; uint64_t instruction_pointer; uint64_t args[6]; };
    struct seccomp_notif { uint64_t id; uint32_t pid; uint32_t flags; struct seccomp_data data; };
    struct seccomp_notif_resp { uint64_t id; int64_t val; int32_t error; uint32_t flags; };
    void *seccomp_init(uint32_t def_action);
    uint32_t seccomp_arch_resolve_name(const char *arch_name);
    int seccomp_arch_add(void *ctx, uint32_t arch_token);
    int seccomp_syscall_resolve_name(const char *name);
    char *seccomp_syscall_resolve_num_arch(uint32_t arch_token, int num);
    int seccomp_rule_add_array(void *ctx, uint32_t action, int syscall, unsigned int arg_cnt,
                               const struct scmp_arg_cmp *arg_array);
    int seccomp_load(void *ctx);
    int seccomp_notify_fd(const void *ctx);
    int seccomp_notify_alloc(struct seccomp_notif **req, struct seccomp_notif_resp **resp);
    int seccomp_notify_receive(int fd, struct seccomp_notif *req);
    int seccomp_notify_respond(int fd, struct seccomp_notif_resp *resp);
    int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5);
    """
)
seccomp = ffi.dlopen("libseccomp.so.2")
libc = ffi.dlopen(None)

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_NOTIFY = 0x7FC00000
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
OCI_COMPARISONS = {"SCMP_CMP_EQ": SCMP_CMP_EQ, "SCMP_CMP_MASKED_EQ": SCMP_CMP_MASKED_EQ}
OCI_ARCHITECTURES = {"SCMP_ARCH_X86_64": "x86_64", "SCMP_ARCH_AARCH64": "aarch64"}
OCI_SYSCALL_KEYS = {"names", "action", "errnoRet", "args", "comment"}
OCI_PROFILE_KEYS = {"defaultAction", "defaultErrnoRet", "architectures", "syscalls"}
AF_MAX = 46  # include/linux/socket.h
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def scmp_act_errno(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


def _add(ctx: object, action: int, syscall: int, *comparisons: tuple[int, int, int, int]) -> None:
    """One rule; each comparison is (argument index, operator, datum_a, datum_b), all must match."""
    args = ffi.new("struct scmp_arg_cmp[]", list(comparisons) or 1)
    rc = seccomp.seccomp_rule_add_array(ctx, action, syscall, len(comparisons), args)
    if rc < 0:
        raise OSError(-rc, f"seccomp_rule_add_array({syscall}): {os.strerror(-rc)}")


def _load(ctx: object) -> None:
    rc = seccomp.seccomp_load(ctx)
    if rc < 0:
        raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")


# ---- the systemd unit's filter ----------------------------------------------------------------------------


def load(spec: dict) -> None:
    ctx = seccomp.seccomp_init(SCMP_ACT_KILL_PROCESS)
    if ctx == ffi.NULL:
        raise OSError("seccomp_init failed")
    for name in sorted(set(spec["allow"])):
        number = seccomp.seccomp_syscall_resolve_name(name.encode())
        if number < 0 or name == "socket":
            continue  # not a syscall on this architecture; socket is handled below
        _add(ctx, SCMP_ACT_ALLOW, number)
    socket_nr = seccomp.seccomp_syscall_resolve_name(b"socket")
    if "socket" in spec["allow"]:
        for family in range(AF_MAX + 1):
            allowed = family in spec["families"]
            action = SCMP_ACT_ALLOW if allowed else scmp_act_errno(errno.EAFNOSUPPORT)
            _add(ctx, action, socket_nr, (0, SCMP_CMP_EQ, family, 0))
    if spec.get("mdwe") and libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ffi.errno, "prctl(PR_SET_MDWE)")
    _load(ctx)


# ---- a Kubernetes Localhost (OCI) profile -----------------------------------------------------------------


def _oci_action(action: str, errno_ret: int | None) -> int:
    if action == "SCMP_ACT_ALLOW":
        return SCMP_ACT_ALLOW
    if action == "SCMP_ACT_ERRNO":
        return scmp_act_errno(errno.EPERM if errno_ret is None else errno_ret)  # runc's default errno
    raise ValueError(f"{action}: this sandbox compiles only SCMP_ACT_ALLOW and SCMP_ACT_ERRNO rules")


def _oci_rules(entry: dict) -> list[tuple[tuple[int, int, int, int], ...]]:
    """The rules one entry's conditions make, as runc makes them: one rule with every condition,
    unless two conditions test the same argument, then one rule per condition."""
    conditions = []
    for arg in entry.get("args") or []:
        op = OCI_COMPARISONS.get(arg["op"])
        if op is None:
            raise ValueError(f"{arg['op']}: unsupported comparison in {entry['names']}")
        conditions.append((arg["index"], op, arg["value"], arg.get("valueTwo", 0)))
    if not conditions:
        return [()]
    indexes = [c[0] for c in conditions]
    if len(set(indexes)) < len(indexes):
        return [(c,) for c in conditions]
    return [tuple(conditions)]


def refusal_errnos(profile: dict) -> tuple[int, dict[str, int]]:
    """The default errno, and the errno of each syscall a rule refuses (by name)."""
    default = profile.get("defaultErrnoRet", errno.EPERM)
    by_name = {}
    for entry in profile["syscalls"]:
        if entry["action"] == "SCMP_ACT_ERRNO":
            for name in entry["names"]:
                by_name[name] = entry.get("errnoRet", errno.EPERM)
    return default, by_name


def compile_oci(profile: dict, notify: bool) -> object:
    """A libseccomp filter for ``profile``; with ``notify`` every refusal is a user notification."""
    unknown = set(profile) - OCI_PROFILE_KEYS
    if unknown or profile["defaultAction"] != "SCMP_ACT_ERRNO":
        raise ValueError(f"unsupported profile: keys {sorted(unknown)}, default {profile['defaultAction']}")
    default = SCMP_ACT_NOTIFY if notify else _oci_action("SCMP_ACT_ERRNO", profile.get("defaultErrnoRet"))
    ctx = seccomp.seccomp_init(default)
    if ctx == ffi.NULL:
        raise OSError("seccomp_init failed")
    for arch in profile.get("architectures", []):
        rc = seccomp.seccomp_arch_add(ctx, seccomp.seccomp_arch_resolve_name(OCI_ARCHITECTURES[arch].encode()))
        if rc < 0 and rc != -errno.EEXIST:
            raise OSError(-rc, f"seccomp_arch_add({arch})")
    for entry in profile["syscalls"]:
        if set(entry) - OCI_SYSCALL_KEYS:
            raise ValueError(f"unsupported keys {sorted(set(entry) - OCI_SYSCALL_KEYS)} in {entry['names']}")
        action = _oci_action(entry["action"], entry.get("errnoRet"))
        if notify and action != SCMP_ACT_ALLOW:
            if entry.get("args"):
                raise ValueError(f"a conditional refusal cannot be reported by name: {entry['names']}")
            action = SCMP_ACT_NOTIFY
        if action == default:
            continue  # runc skips a rule that only repeats the default (libseccomp refuses it)
        for name in entry["names"]:
            number = seccomp.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                continue  # not a syscall of this architecture: runc skips it too
            for comparisons in _oci_rules(entry):
                _add(ctx, action, number, *comparisons)
    return ctx


def _syscall_name(data: object) -> str:
    name = seccomp.seccomp_syscall_resolve_num_arch(data.arch, data.nr)
    return ffi.string(name).decode() if name != ffi.NULL else f"syscall#{data.nr}"


def supervise(listener: int, report_path: str, default_errno: int, errnos: dict[str, int]) -> None:
    """Answer each notification with the profile's errno, after writing the syscall's name down;
    return when no process is left under the filter."""
    request, response = ffi.new("struct seccomp_notif **"), ffi.new("struct seccomp_notif_resp **")
    if seccomp.seccomp_notify_alloc(request, response) < 0:
        raise OSError("seccomp_notify_alloc failed")
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    with open(report_path, "a", buffering=1) as report:
        while True:
            events = poller.poll()
            if not any(mask & select.POLLIN for _, mask in events):
                return  # POLLHUP: every process under the filter has exited
            # The kernel refuses (EINVAL) a request buffer that is not zeroed; libseccomp 2.5 leaves that to us.
            ffi.memmove(request[0], bytes(ffi.sizeof("struct seccomp_notif")), ffi.sizeof("struct seccomp_notif"))
            rc = seccomp.seccomp_notify_receive(listener, request[0])
            if rc == -errno.ENOENT:
                continue  # the caller was killed meanwhile
            if rc < 0:
                raise OSError(-rc, f"seccomp_notify_receive: {os.strerror(-rc)}")
            name = _syscall_name(request[0].data)
            err = errnos.get(name, default_errno)
            report.write(f"{name} {errno.errorcode.get(err, err)} pid {request[0].pid}\n")
            response[0].id, response[0].val, response[0].flags = request[0].id, 0, 0
            response[0].error = -err
            seccomp.seccomp_notify_respond(listener, response[0])  # fails only if the caller is gone


def _start_supervisor(report_path: str, profile: dict) -> socket.socket:
    """Fork the supervisor before any filter exists; it waits for the listener on the returned socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    default_errno, errnos = refusal_errnos(profile)
    if os.fork() == 0:
        code = 0
        try:
            ours.close()
            _, fds, _, _ = socket.recv_fds(theirs, 1, 1)
            if fds:
                supervise(fds[0], report_path, default_errno, errnos)
        except BaseException as exc:
            code = 1
            with open(report_path, "a") as report:  # the report must not look clean
                report.write(f"supervisor-failed {type(exc).__name__}: {exc}\n")
        finally:
            os._exit(code)
    theirs.close()
    return ours


def _check_the_handover_is_allowed(profile: dict) -> None:
    """Between loading the filter and exec, this process sends the listener to the supervisor:
    if the profile refused those calls, they would wait for a supervisor that has no listener yet."""
    plainly_allowed = set()
    for entry in profile["syscalls"]:
        if entry["action"] == "SCMP_ACT_ALLOW" and not entry.get("args"):
            plainly_allowed |= set(entry["names"])
    missing = {"sendmsg", "close", "execve"} - plainly_allowed
    if missing:
        raise ValueError(f"the profile refuses {sorted(missing)}: the listener cannot be handed over")


def load_oci(spec: dict) -> None:
    with open(spec["oci_profile"]) as f:
        profile = json.load(f)
    report = spec.get("report")
    if report:
        _check_the_handover_is_allowed(profile)
    channel = _start_supervisor(report, profile) if report else None
    ctx = compile_oci(profile, notify=channel is not None)
    _load(ctx)
    if channel is not None:
        # Under the filter from here: sendmsg and close must be allowed, or this waits forever.
        socket.send_fds(channel, [b"x"], [seccomp.seccomp_notify_fd(ctx)])
        channel.close()


def main() -> None:
    spec_path, separator, *command = sys.argv[1:]
    if separator != "--" or not command:
        raise SystemExit(__doc__)
    with open(spec_path) as f:
        spec = json.load(f)
    if "oci_profile" in spec:
        load_oci(spec)
    else:
        load(spec)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()

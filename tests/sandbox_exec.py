"""Run a command under a seccomp filter built like systemd builds one.

    python sandbox_exec.py SPEC.json -- COMMAND [ARGS...]

SPEC.json: {"allow": [syscall names], "families": [address family numbers],
"mdwe": bool}. Every syscall outside "allow" kills the process (SIGSYS), so a
test sees any call the unit would deny; socket() with a family outside
"families" fails with EAFNOSUPPORT, as RestrictAddressFamilies= does; "mdwe"
refuses writable-and-executable memory, as MemoryDenyWriteExecute= does
(prctl PR_SET_MDWE, Linux 6.3+). libseccomp sets no_new_privs when it loads
the filter, as NoNewPrivileges= does. Then it execs the command, which
inherits all of it.

libseccomp is the library systemd itself uses, loaded here through cffi.
"""

from __future__ import annotations

import errno
import json
import os
import sys

from cffi import FFI

ffi = FFI()
ffi.cdef(
    """
    struct scmp_arg_cmp { unsigned int arg; int op; uint64_t datum_a; uint64_t datum_b; };
    void *seccomp_init(uint32_t def_action);
    int seccomp_syscall_resolve_name(const char *name);
    int seccomp_rule_add_array(void *ctx, uint32_t action, int syscall, unsigned int arg_cnt,
                               const struct scmp_arg_cmp *arg_array);
    int seccomp_load(void *ctx);
    int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5);
    """
)
seccomp = ffi.dlopen("libseccomp.so.2")
libc = ffi.dlopen(None)

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
AF_MAX = 46  # include/linux/socket.h
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def scmp_act_errno(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


def _add(ctx: object, action: int, syscall: int, *comparisons: tuple[int, int]) -> None:
    args = ffi.new("struct scmp_arg_cmp[]", [(arg, SCMP_CMP_EQ, value, 0) for arg, value in comparisons] or 1)
    rc = seccomp.seccomp_rule_add_array(ctx, action, syscall, len(comparisons), args)
    if rc < 0:
        raise OSError(-rc, f"seccomp_rule_add_array({syscall}): {os.strerror(-rc)}")


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
            _add(ctx, SCMP_ACT_ALLOW if allowed else scmp_act_errno(errno.EAFNOSUPPORT), socket_nr, (0, family))
    if spec.get("mdwe") and libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ffi.errno, "prctl(PR_SET_MDWE)")
    rc = seccomp.seccomp_load(ctx)
    if rc < 0:
        raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")


def main() -> None:
    spec_path, separator, *command = sys.argv[1:]
    if separator != "--" or not command:
        raise SystemExit(__doc__)
    with open(spec_path) as f:
        load(json.load(f))
    os.execv(command[0], command)


if __name__ == "__main__":
    main()

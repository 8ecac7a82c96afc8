"""What the tests, the benchmark (bench/) and scripts/trace_agent_syscalls.py share.

Imported as ``support`` with tests/ on the path: pytest puts it there
(``pythonpath`` in pyproject.toml), bench/harness.py and the trace script
insert it. One copy, one module name: no helper exists twice.

    agents         Agent: vmctl-agent as a child process (behind setpriv, a sandbox or nsenter if asked); write_policy
    processes      LineProcess and Target (target.py driven by JSON lines); /proc/PID/status fields; child_of; PAGE
    waiting        wait_for: the one way to wait, on a condition
    expect         expect_error: a refusal with its code and reason
    peers          connect as another uid (SO_PEERCRED), public directories
    certs          a throwaway PKI, and certificates with names of any bytes
    scrape         /metrics parsed; the port an agent logged
    audit_lines    audit records read back from a log
    stalls         calls that send headers and never a request
    cgroup2        throwaway cgroup v2 groups
    pidns          a private PID namespace with an agent and targets inside
    zram           a zram swap device, always removed
    filesystems    a tiny tmpfs, and filling it
    deploy_files   deploy/ read the way kubectl, systemd and the DaemonSet read it
    privileges     setpriv and the seccomp sandbox in front of a command
    agent_workout  everything the deployed agent does, done to one agent (the seccomp profile's trace)
    as_nobody      run a command as user nobody though the interpreter lives under /root (the unprivileged tier)

Run as scripts, never imported by the tests (they must work as a lone file,
e.g. copied where another user can read it): target.py, churn_target.py,
sandbox_exec.py (imported only for its libseccomp binding).
"""

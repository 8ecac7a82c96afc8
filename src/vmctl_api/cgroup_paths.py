"""What a cgroup prefix selects: the one rule, shared by the agent and its clients.

A prefix is a cgroup v2 path, not a string: it selects the cgroup it names and
every cgroup below it, comparing whole path components. ``/app`` selects
``/app`` and ``/app/web``, never ``/app-evil`` (a string prefix would, and a
policy rule for one team's cgroup would then reach another's). ``/`` selects
every process; a trailing slash changes nothing. The agent applies it to
ListProcesses' ``cgroup_prefix`` and to the policy's ``cgroup_prefixes`` and
``protected_cgroup_prefixes``; the client applies it again to what
ListProcesses answers, so ``vmctl ps --cgroup`` and ``reclaim --cgroup`` keep
to it even against an agent that predates it.
"""

from __future__ import annotations

RULE = (
    "a prefix is a cgroup path: it selects that cgroup and those below it, by whole components"
    " (/app selects /app and /app/web, not /app-evil)"
)


def prefix_problem(prefix: str) -> str:
    """Why ``prefix`` is not a cgroup path, or "" when it is one."""
    if not prefix.startswith("/"):
        return "it must start with /"
    if "//" in prefix:
        return "it has an empty component (//)"
    return ""


def is_under(path: str, prefix: str) -> bool:
    """Whether cgroup ``path`` is the cgroup ``prefix`` names or lies below it.
    A prefix that is no cgroup path (see :func:`prefix_problem`) selects nothing."""
    if prefix_problem(prefix):
        return False
    base = prefix.rstrip("/")  # "/app/" is "/app"; "/" becomes "", the root: everything is below it
    return not base or path == base or path.startswith(base + "/")

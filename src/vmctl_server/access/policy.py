"""Who may do what to which process: the YAML policy, as plain values.

A policy is a list of rules, each binding identities (see
:mod:`vmctl_server.access.identity` for their spelling) to verbs — ``read``
(GetVmaInfo, ListProcesses, GetNodeInfo) and ``advise`` (AdviseRanges) — and,
optionally, to target selectors and to the advices allowed::

    require_cookie: true                # AdviseRanges without a cookie is refused
    protected_pids: [1234]              # never advised, whatever the rules say
    protected_comm: ["etcd", "kube*"]   # fnmatch patterns on /proc/PID/comm
    protected_cgroup_prefixes: ["/system.slice/sshd.service"]
    rules:
      - name: reclaimer                 # optional; names the rule in refusals
        identities: ["spiffe://cluster/ns/ops/sa/reclaimer", "uid:0"]
        verbs: [read, advise]
        targets: {cgroup_prefixes: ["/kubepods"], uids: [], comm: []}
        advices: [cold, pageout]

A rule without ``targets`` selects every process; within ``targets`` each
non-empty list must match (any of its entries), and empty lists match all.

- ``cgroup_prefixes`` are cgroup v2 paths as the node names them
  (:mod:`vmctl_server.core.cgroups`), matched by whole components as ListProcesses'
  filter is: ``/app`` selects ``/app`` and ``/app/web``, never ``/app-evil``;
  ``/`` selects everything (:mod:`vmctl_api.cgroup_paths`).
- ``uids`` select the processes that wholly belong to one of those uids: real,
  effective and saved uid all that uid, no setgid, and dumpable
  (:attr:`vmctl_server.core.procfs.ProcStatus.owner`), which is when the kernel
  itself would let that user read the process. A setuid program a user
  started is not that user's, and belongs to no uid at all.
- ``comm`` patterns match a name any process may give itself: they say what
  a process calls itself, never whose it is.

A rule without ``advices`` allows every advice. Rules only grant: a call is
allowed when some rule allows it, and advising a process also takes leave to
read it (:meth:`Policy.check_target`).

What a refusal tells a caller about a process is only what the caller may
read: for a process it may not read, the pid it sent, nothing else.

Without a policy file the agent behaves as if it had one rule: ``uid:0``
(root on the unix socket) may read and advise anything. Protected targets
(:meth:`Policy.protection`) are never advised under any policy.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vmctl_api.words import ADVICES
from vmctl_server.access.identity import RESERVED_SCHEMES, Caller
from vmctl_server.core import cgroups
from vmctl_server.core.faults import PolicyDenied, ProtectedTarget, Unauthenticated
from vmctl_server.core.targets import Target

log = logging.getLogger("vmctl.policy")

READ = "read"
ADVISE = "advise"
VERBS = (READ, ADVISE)
METHOD_VERBS = {
    "GetVmaInfo": READ,
    "StreamVmaInfo": READ,
    "ListProcesses": READ,
    "GetNodeInfo": READ,
    "AdviseRanges": ADVISE,
}

_IDENTITY = re.compile(r"^(?:uid:\d+|gid:\d+|dns:\S+|cn:.+|anonymous|[a-z][a-z0-9+.-]*://\S+)$")


class PolicyError(ValueError):
    """A policy file that cannot be used, with where and why."""


@dataclass(frozen=True)
class AgentSelf:
    """The agent's own process, always protected."""

    pid: int
    cgroup: str  # "/" or "" means none of its own: the root cgroup holds every unconfined process

    @classmethod
    def current(cls) -> AgentSelf:
        pid = os.getpid()
        return cls(pid, cgroups.read_cgroup(pid))

    @property
    def has_own_cgroup(self) -> bool:
        return self.cgroup not in ("", "/")


@dataclass(frozen=True)
class TargetSelector:
    cgroup_prefixes: tuple[str, ...] = ()  # whole-component prefixes (cgroups.is_under)
    uids: frozenset[int] = frozenset()  # owners (Target.owner), never the real uid alone
    comm: tuple[str, ...] = ()  # fnmatch patterns

    def matches(self, target: Target) -> bool:
        if self.cgroup_prefixes and not any(cgroups.is_under(target.cgroup, p) for p in self.cgroup_prefixes):
            return False
        if self.uids and target.owner not in self.uids:
            return False
        return not self.comm or any(fnmatch.fnmatchcase(target.comm, p) for p in self.comm)

    def describe(self) -> str:
        parts = []
        if self.cgroup_prefixes:
            parts.append(f"cgroup_prefixes {list(self.cgroup_prefixes)}")
        if self.uids:
            parts.append(f"uids {sorted(self.uids)} (processes wholly theirs: no setuid, setgid or non-dumpable ones)")
        if self.comm:
            parts.append(f"comm {list(self.comm)}")
        return ", ".join(parts) or "every process"


@dataclass(frozen=True)
class Rule:
    name: str
    identities: frozenset[str]
    verbs: frozenset[str]
    targets: TargetSelector | None = None  # None: every unprotected process
    advices: frozenset[str] | None = None  # None: every advice

    def grants(self, caller_principals: Iterable[str], verb: str) -> bool:
        return verb in self.verbs and not self.identities.isdisjoint(caller_principals)

    def selects(self, target: Target) -> bool:
        return self.targets is None or self.targets.matches(target)


def principals(caller: Caller) -> tuple[str, ...]:
    """The names a rule may give a caller: its identity, and a unix peer's group."""
    if caller.transport == "unix" and caller.gid is not None and caller.authenticated:
        return (caller.identity, f"gid:{caller.gid}")
    return (caller.identity,)


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    require_cookie: bool = True
    protected_pids: frozenset[int] = frozenset()
    protected_comm: tuple[str, ...] = ()
    protected_cgroup_prefixes: tuple[str, ...] = ()
    source: str = "built-in default"
    agent: AgentSelf = field(default_factory=AgentSelf.current)

    def _granting(self, caller: Caller, verb: str) -> list[Rule]:
        names = principals(caller)
        return [rule for rule in self.rules if rule.grants(names, verb)]

    def check_verb(self, caller: Caller, verb: str) -> None:
        """UNAUTHENTICATED or POLICY_DENIED unless some rule grants ``verb`` to the caller."""
        if self._granting(caller, verb):
            return
        if not caller.authenticated:
            raise Unauthenticated(
                f"{verb} needs credentials: a unix-socket peer, or a client certificate over mutual TLS",
                verb=verb,
                transport=caller.transport,
            )
        # Not the policy file's path: that is the agent's business (its log says where the policy came from).
        raise PolicyDenied(
            f"no rule of the policy grants {verb} to {caller.identity}",
            identity=caller.identity,
            verb=verb,
            rule="none",
        )

    def reads_any_process(self, caller: Caller) -> bool:
        """Whether some rule lets the caller read every process (no target facts needed)."""
        return any(rule.targets is None for rule in self._granting(caller, READ))

    def may_read(self, caller: Caller, target: Target) -> bool:
        return any(rule.selects(target) for rule in self._granting(caller, READ))

    def check_target(self, caller: Caller, verb: str, target: Target, advice: str | None = None) -> Rule:
        """The rule that allows ``verb`` (and ``advice``) on ``target``, or POLICY_DENIED naming the rules tried.

        Advising a process takes leave to read it too. Every answer AdviseRanges
        gives is a reading of the target's layout (RANGE_UNMAPPED names the first
        unmapped address; even a dry run that passes says the ranges are mapped;
        the per-range bytes tell file from anonymous memory), so an identity that
        may advise what it may not read would read it anyway. The kernel asks the
        same of process_madvise(2): ptrace read access to the target.

        A refusal describes the target only to a caller that may read it; to any
        other it names the pid alone, and it is decided before the caller's advise
        rules are looked at, so which of them select the target (by comm, by
        cgroup) shows in no answer.
        """
        readable = self.may_read(caller, target)
        if verb == ADVISE and not readable:
            readers = [rule.name for rule in self._granting(caller, READ)]
            raise PolicyDenied(
                f"{caller.identity} may not advise pid {target.pid}: advice needs leave to read the process too"
                " (its answers reveal the layout), and no rule granting read to it selects this one",
                identity=caller.identity,
                verb=verb,
                advice=advice or "",
                rule=", ".join(readers) or "none",
                pid=target.pid,
            )
        shown = target.describe_to(readable)
        granting = self._granting(caller, verb)
        selecting = [rule for rule in granting if rule.selects(target)]
        for rule in selecting:
            if advice is None or rule.advices is None or advice in rule.advices:
                return rule
        if selecting:
            allowed = sorted({a for rule in selecting for a in rule.advices or ()})
            names = ", ".join(rule.name for rule in selecting)
            raise PolicyDenied(
                f"{caller.identity} may not advise {advice} on {shown}: rule {names} allows only {', '.join(allowed)}",
                identity=caller.identity,
                verb=verb,
                advice=advice or "",
                rule=names,
                pid=target.pid,
            )
        # The caller's own rules' selectors, whatever the target: they say what it was granted, not what the target is.
        tried = "; ".join(f"{rule.name} selects {rule.targets.describe()}" for rule in granting if rule.targets)
        raise PolicyDenied(
            f"no rule granting {verb} to {caller.identity} selects {shown}" + (f" ({tried})" if tried else ""),
            identity=caller.identity,
            verb=verb,
            rule=", ".join(rule.name for rule in granting) or "none",
            pid=target.pid,
        )

    def protection(self, target: Target) -> str | None:
        """Why ``target`` may never be advised, or None."""
        if target.pid == 1:
            return "pid 1 (init)"
        if target.pid == self.agent.pid:
            return "the agent itself"
        if self.agent.has_own_cgroup and cgroups.is_under(target.cgroup, self.agent.cgroup):
            return f"the agent's cgroup {self.agent.cgroup}"
        if target.pid in self.protected_pids:
            return "protected_pids"
        for pattern in self.protected_comm:
            if fnmatch.fnmatchcase(target.comm, pattern):
                return f"protected_comm {pattern!r}"
        for prefix in self.protected_cgroup_prefixes:
            if cgroups.is_under(target.cgroup, prefix):
                return f"protected_cgroup_prefixes {prefix!r}"
        return None

    def check_protected(self, target: Target) -> None:
        """PROTECTED_TARGET, naming the protection and the target's facts: check
        the rules first (:meth:`check_target`), so only a caller that may read
        the target (advising takes that) ever learns it is protected, or why."""
        why = self.protection(target)
        if why is not None:
            raise ProtectedTarget(
                f"{target.describe()} is never advised: {why}", pid=target.pid, protection=why, comm=target.comm
            )


DEFAULT_RULE = Rule(
    name="default (no policy file): root on the unix socket", identities=frozenset({"uid:0"}), verbs=frozenset(VERBS)
)


def default_policy() -> Policy:
    return Policy(rules=(DEFAULT_RULE,))


# ---- the file --------------------------------------------------------------------


_T = TypeVar("_T")


def _expect(value: Any, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PolicyError(f"{where}: expected {what}, got {value!r}")
    return value


def _list_of(value: Any, kind: type[_T], where: str, what: str) -> list[_T]:
    if value is None:
        return []
    _expect(value, list, where, f"a list of {what}")
    return [_expect(item, kind, f"{where}[{i}]", what) for i, item in enumerate(value)]


def _only_keys(mapping: Mapping[Any, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(map(str, mapping)) - set(allowed))
    if unknown:
        raise PolicyError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(allowed)})")


def _identity(text: str, where: str) -> str:
    if not _IDENTITY.match(text):
        raise PolicyError(
            f"{where}: {text!r} is not an identity: use uid:N, gid:N, dns:NAME, cn:NAME, anonymous,"
            " or a certificate URI such as spiffe://DOMAIN/PATH"
        )
    scheme = text.partition(":")[0].lower()
    if "://" in text and scheme in RESERVED_SCHEMES:
        raise PolicyError(f"{where}: {text!r}: the URI scheme {scheme!r} is reserved")
    return text


def _cgroup_prefixes(value: Any, where: str) -> list[str]:
    prefixes = _list_of(value, str, where, "cgroup paths")
    for i, prefix in enumerate(prefixes):
        problem = cgroups.prefix_problem(prefix)
        if problem:
            raise PolicyError(f"{where}[{i}]: {prefix!r} is not a cgroup path: {problem}; {cgroups.RULE}")
    return prefixes


def _selector(value: Any, where: str) -> TargetSelector:
    _expect(value, dict, where, "a mapping with cgroup_prefixes, uids, comm")
    _only_keys(value, ("cgroup_prefixes", "uids", "comm"), where)
    prefixes = _cgroup_prefixes(value.get("cgroup_prefixes"), f"{where}.cgroup_prefixes")
    uids = _list_of(value.get("uids"), int, f"{where}.uids", "uids")
    comm = _list_of(value.get("comm"), str, f"{where}.comm", "comm patterns")
    return TargetSelector(tuple(prefixes), frozenset(uids), tuple(comm))


def _rule(value: Any, index: int) -> Rule:
    where = f"rules[{index}]"
    _expect(value, dict, where, "a mapping with identities and verbs")
    _only_keys(value, ("name", "identities", "verbs", "targets", "advices"), where)
    name = _expect(value.get("name", where), str, f"{where}.name", "a string")
    identities = [
        _identity(text, f"{where}.identities[{i}]")
        for i, text in enumerate(_list_of(value.get("identities"), str, f"{where}.identities", "identities"))
    ]
    if not identities:
        raise PolicyError(f"{where}.identities: a rule needs at least one identity")
    verbs = _list_of(value.get("verbs"), str, f"{where}.verbs", "verbs")
    if not verbs:
        raise PolicyError(f"{where}.verbs: a rule needs at least one verb ({', '.join(VERBS)})")
    for i, verb in enumerate(verbs):
        if verb not in VERBS:
            raise PolicyError(f"{where}.verbs[{i}]: unknown verb {verb!r} (known: {', '.join(VERBS)})")
    targets = _selector(value["targets"], f"{where}.targets") if value.get("targets") is not None else None
    advices = None
    if value.get("advices") is not None:
        advices = _list_of(value["advices"], str, f"{where}.advices", "advice names")
        for i, advice in enumerate(advices):
            if advice not in ADVICES:
                raise PolicyError(f"{where}.advices[{i}]: unknown advice {advice!r} (known: {', '.join(ADVICES)})")
    return Rule(
        name, frozenset(identities), frozenset(verbs), targets, frozenset(advices) if advices is not None else None
    )


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    import yaml  # only an agent with a policy file loads it

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from exc
    if document is None:
        raise PolicyError(f"{source}: the file is empty (an empty policy would deny everyone; say so with rules: [])")
    _expect(document, dict, source, "a mapping with rules")
    _only_keys(
        document, ("require_cookie", "protected_pids", "protected_comm", "protected_cgroup_prefixes", "rules"), source
    )
    if "rules" not in document:
        raise PolicyError(f"{source}: no rules key (write rules: [] to deny everyone)")
    rules = tuple(_rule(rule, i) for i, rule in enumerate(_list_of(document["rules"], dict, "rules", "rules")))
    return Policy(
        rules=rules,
        require_cookie=_expect(document.get("require_cookie", True), bool, "require_cookie", "true or false"),
        protected_pids=frozenset(_list_of(document.get("protected_pids"), int, "protected_pids", "pids")),
        protected_comm=tuple(_list_of(document.get("protected_comm"), str, "protected_comm", "comm patterns")),
        protected_cgroup_prefixes=tuple(
            _cgroup_prefixes(document.get("protected_cgroup_prefixes"), "protected_cgroup_prefixes")
        ),
        source=source,
    )


def load_policy(path: str) -> Policy:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise PolicyError(f"{path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: not UTF-8 text") from exc
    return parse_policy(text, path)


class PolicyStore:
    """The policy in force; ``reload`` swaps in the file's new contents, or
    keeps the old policy and says why when the file is bad. ``on_reload``
    hears of every reload, done or refused, as an audit record and a message."""

    def __init__(self, path: str | None, on_reload: Callable[[dict[str, object], str], object] | None = None) -> None:
        self.path = path
        self.on_reload = on_reload
        self._lock = threading.Lock()
        self._policy = load_policy(path) if path else default_policy()

    @property
    def current(self) -> Policy:
        return self._policy

    def reload(self) -> bool:
        if not self.path:
            log.info("SIGHUP: no --policy file; the built-in default stays")
            self._report({"status": "UNCHANGED", "detail": "no --policy file"}, "no policy file to reload")
            return False
        with self._lock:
            try:
                policy = load_policy(self.path)
            except PolicyError as exc:
                log.error("policy not reloaded, the previous one stays in force: %s", exc)
                self._report({"status": "REFUSED", "detail": str(exc)}, "policy not reloaded: the old one stays")
                return False
            self._policy = policy
        log.info("policy reloaded from %s: %d rules", self.path, len(policy.rules))
        self._report({"status": "OK", "rules": len(policy.rules)}, f"policy reloaded: {len(policy.rules)} rules")
        return True

    def _report(self, fields: dict[str, object], message: str) -> None:
        if self.on_reload is not None:
            self.on_reload({"event": "policy_reload", "policy": self.path or "", **fields}, message)

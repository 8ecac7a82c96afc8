"""Property-based tests (hypothesis) of the plain logic the agent's safety rests on:
range validation, splitting ranges by VMA and filter, batching into
process_madvise calls, policy decisions, the token bucket and peer names.

Each property is checked against an oracle written the obvious, slow way
(byte coverage by intervals, all-pairs overlap), never against the code's own
helpers.
"""

from __future__ import annotations

import fnmatch
import functools
import itertools

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from support.certs import CertificateAuthority

from vmctl_server.access.identity import ANONYMOUS, caller_from, peer_name
from vmctl_server.access.limits import TokenBucket
from vmctl_server.access.policy import ADVISE, READ, AgentSelf, Policy, Rule, Target, TargetSelector
from vmctl_server.core import kernel
from vmctl_server.core.advice import FILTER_KINDS, check_ranges, plan_ranges, split_for_calls
from vmctl_server.core.faults import InvalidRequest, PolicyDenied, ProtectedTarget
from vmctl_server.core.layout import KIND_ANONYMOUS, KIND_FILE, KIND_SPECIAL, Layout

pytestmark = pytest.mark.unprivileged

PAGE = 4096
U64 = 2**64 - 1
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- range validation --------------------------------------------------------------

addresses = st.one_of(
    st.integers(0, 64).map(lambda n: n * PAGE),  # small, often aligned and overlapping
    st.integers(0, U64),  # anything on the wire
    st.sampled_from([0, PAGE, 1 << 47, (1 << 47) - PAGE, U64 - PAGE + 1, U64]),
)
range_lists = st.lists(st.tuples(addresses, addresses), max_size=12)


def _reason(call) -> str | None:
    try:
        call()
    except InvalidRequest as exc:
        return exc.reason
    return None


@SETTINGS
@given(range_lists)
def test_check_ranges_accepts_exactly_aligned_nonempty_disjoint_ranges(ranges):
    reason = _reason(lambda: check_ranges(ranges, max_ranges=10))
    aligned = all(s % PAGE == 0 and e % PAGE == 0 for s, e in ranges)
    nonempty = all(e > s for s, e in ranges)
    disjoint = all(a[1] <= b[0] or b[1] <= a[0] for a, b in itertools.combinations(ranges, 2))
    valid = bool(ranges) and len(ranges) <= 10 and aligned and nonempty and disjoint
    assert (reason is None) == valid, (reason, ranges)


@SETTINGS
@given(range_lists)
def test_a_refusal_names_a_range_with_that_defect(ranges):
    try:
        check_ranges(ranges, max_ranges=10)
    except InvalidRequest as exc:
        if exc.reason in ("NO_RANGES", "TOO_MANY_RANGES"):
            assert not ranges or len(ranges) > 10
            return
        index = int(exc.metadata["field"].removeprefix("ranges[").rstrip("]"))
        start, end = ranges[index]
        if exc.reason == "RANGE_UNALIGNED":
            assert start % PAGE or end % PAGE
        elif exc.reason == "RANGE_EMPTY":
            assert start == end
        elif exc.reason == "RANGE_WRAPS":
            assert end < start
        else:
            assert exc.reason == "RANGE_OVERLAP"
            assert any(max(start, s) < min(end, e) for i, (s, e) in enumerate(ranges) if i != index), (
                "the named range overlaps no other"
            )


@SETTINGS
@given(range_lists, st.randoms())
def test_validity_does_not_depend_on_order(ranges, rng):
    shuffled = list(ranges)
    rng.shuffle(shuffled)
    first = _reason(lambda: check_ranges(ranges, max_ranges=10))
    second = _reason(lambda: check_ranges(shuffled, max_ranges=10))
    assert (first is None) == (second is None)


# ---- splitting by VMA and filter -----------------------------------------------------


@st.composite
def layouts(draw) -> Layout:
    """Sorted, disjoint VMAs of random kinds with random gaps between them."""
    count = draw(st.integers(1, 8))
    starts, ends, kinds = [], [], []
    cursor = draw(st.integers(1, 16)) * PAGE
    for _ in range(count):
        cursor += draw(st.sampled_from([0, 0, 1, 3])) * PAGE  # often adjacent, sometimes a hole
        size = draw(st.integers(1, 8)) * PAGE
        starts.append(cursor)
        ends.append(cursor + size)
        kinds.append(draw(st.sampled_from([KIND_ANONYMOUS, KIND_FILE, KIND_SPECIAL])))
        cursor += size
    return Layout(starts, ends, kinds)


@st.composite
def layout_and_ranges(draw):
    layout = draw(layouts())
    top = layout.ends[-1] // PAGE + 2
    pages = sorted(draw(st.sets(st.integers(0, top), min_size=2, max_size=10)))
    # Disjoint, aligned ranges cut from consecutive points: check_ranges' job is done.
    cuts = list(zip(pages[::2], pages[1::2], strict=False))
    ranges = [(a * PAGE, b * PAGE) for a, b in cuts if b > a]
    assume(ranges)
    return layout, ranges


def _kind_at(layout: Layout, address: int) -> int | None:
    for start, end, kind in zip(layout.starts, layout.ends, layout.kinds, strict=True):
        if start <= address < end:
            return kind
    return None


@SETTINGS
@given(layout_and_ranges(), st.sampled_from(sorted(FILTER_KINDS)))
def test_plan_covers_each_range_exactly_and_only_admitted_kinds(case, filter_):
    layout, ranges = case
    covered = all(_kind_at(layout, a) is not None for s, e in ranges for a in range(s, e, PAGE))
    try:
        plans = plan_ranges(layout, ranges, filter_)
    except InvalidRequest as exc:
        assert exc.reason == "RANGE_UNMAPPED"
        assert not covered
        index = int(exc.metadata["field"].removeprefix("ranges[").rstrip("]"))
        address = int(exc.metadata["address"], 16)
        start, end = ranges[index]
        assert start <= address < end and _kind_at(layout, address) is None
        return
    assert covered
    admitted = FILTER_KINDS[filter_]
    for (start, end), plan in zip(ranges, plans, strict=True):
        want = [a for a in range(start, end, PAGE) if _kind_at(layout, a) in admitted]
        got = [a for s, e in plan.segments for a in range(s, e, PAGE)]
        assert got == want  # in order, no page twice, exactly the admitted pages
        assert plan.outcome.skipped_bytes == (end - start) - len(want) * PAGE
        for s, e in plan.segments:  # no segment spans two VMAs
            assert any(vs <= s and e <= ve for vs, ve in zip(layout.starts, layout.ends, strict=True))


# ---- cutting and batching for process_madvise ----------------------------------------

big_segments = st.lists(
    st.tuples(st.integers(0, 1 << 20), st.integers(1, 3 * kernel.MAX_RW_COUNT // PAGE)).map(
        lambda t: (t[0] * PAGE, t[0] * PAGE + t[1] * PAGE)
    ),
    max_size=6,
)


@SETTINGS
@given(big_segments)
def test_split_for_calls_keeps_every_byte_in_pieces_a_call_can_carry(segments):
    pieces = split_for_calls(segments)
    assert all(0 < e - s <= kernel.MAX_RW_COUNT for s, e in pieces)
    remaining = iter(pieces)
    for start, end in segments:  # each segment, rebuilt from consecutive pieces
        cursor = start
        while cursor < end:
            piece_start, piece_end = next(remaining)
            assert piece_start == cursor and piece_end <= end
            cursor = piece_end
    assert next(remaining, None) is None


@st.composite
def iovec_lengths(draw) -> list[int]:
    """Up to 3,000 iovecs: many small ones (the UIO_MAXIOV limit bites) with
    some up to MAX_RW_COUNT (the byte limit bites) at random places."""
    count = draw(st.integers(0, 3000))
    sizes = [PAGE * draw(st.sampled_from([1, 1, 1, 16])) for _ in range(min(count, 8))] + [PAGE] * max(0, count - 8)
    for _ in range(draw(st.integers(0, 6))):
        if sizes:
            index = draw(st.integers(0, len(sizes) - 1))
            sizes[index] = PAGE * draw(st.integers(1, kernel.MAX_RW_COUNT // PAGE))
    return sizes


@SETTINGS
@given(iovec_lengths())
def test_batches_respect_both_kernel_limits_are_maximal_and_cover_everything(sizes):
    first, batches = 0, []
    while first < len(sizes):
        end = kernel.batch_end(sizes, first)
        batches.append((first, end))
        first = end
    assert [i for a, b in batches for i in range(a, b)] == list(range(len(sizes)))
    for a, b in batches:
        assert 1 <= b - a <= kernel.UIO_MAXIOV
        assert b - a == 1 or sum(sizes[a:b]) <= kernel.MAX_RW_COUNT
        if b < len(sizes):  # one more iovec would break a limit
            assert b - a == kernel.UIO_MAXIOV or sum(sizes[a : b + 1]) > kernel.MAX_RW_COUNT
    full_calls = -(-len(sizes) // kernel.UIO_MAXIOV)
    if all(s == PAGE for s in sizes):
        assert len(batches) == full_calls  # small ranges: ceil(n / 1024) calls


# ---- policy decisions ----------------------------------------------------------------

IDENTITIES = ["uid:0", "uid:1000", "spiffe://c/ns/a/sa/x", "dns:ctl.example", "cn:ops"]
ADVICE_NAMES = ["cold", "pageout", "willneed", "collapse"]
AGENT = AgentSelf(pid=4242, cgroup="/system.slice/vmctl-agent.service")

selectors = st.one_of(
    st.none(),
    st.builds(
        TargetSelector,
        cgroup_prefixes=st.lists(
            st.sampled_from(["/kubepods", "/kube", "/kubepods/", "/user.slice", "/system.slice", "/"]), max_size=2
        ).map(tuple),
        uids=st.frozensets(st.sampled_from([0, 1000, 65534]), max_size=2),
        comm=st.lists(st.sampled_from(["python*", "java", "*d"]), max_size=2).map(tuple),
    ),
)
rules = st.builds(
    Rule,
    name=st.sampled_from(["a", "b", "c"]),
    identities=st.frozensets(st.sampled_from(IDENTITIES), min_size=1),
    verbs=st.frozensets(st.sampled_from([READ, ADVISE]), min_size=1),
    targets=selectors,
    advices=st.one_of(st.none(), st.frozensets(st.sampled_from(ADVICE_NAMES), min_size=1)),
)
CGROUPS = [
    "/kubepods/pod1/c1",
    "/kubepods-evil/c2",  # a string prefix of /kubepods, never below it
    "/user.slice/user-0.slice",
    "/system.slice/vmctl-agent.service",
    "/system.slice/vmctl-agent.service-evil",
    "/",
    "",  # no cgroup v2 line
]


PIDS = st.sampled_from([1, 4242, 300, 301, 302])


@st.composite
def targets(draw, pid=PIDS):
    uid = draw(st.sampled_from([0, 1000, 65534]))
    return Target(
        pid=draw(pid),
        uid=uid,
        comm=draw(st.sampled_from(["python3", "java", "sshd", "etcd"])),
        cgroup=draw(st.sampled_from(CGROUPS)),
        start_time=draw(st.integers(1, 10**9)),
        owner=draw(st.sampled_from([uid, None])),  # None: setuid, setgid or not dumpable
    )


_CA = CertificateAuthority()


@functools.cache
def _certificate_naming(identity: str) -> bytes:
    """A real client certificate (PEM) whose name is ``identity``."""
    kind, _, name = identity.partition(":")
    if kind == "dns":
        return _CA.pem(sans=[("dns", name)])
    if kind == "cn":
        return _CA.pem(common_names=[name])
    return _CA.pem(sans=[("uri", identity)])


def _caller(identity: str):
    if identity.startswith("uid:"):
        return caller_from(f"unix-abstract:{peer_name(int(identity[4:]), 0, 77, 'ab')}", {})
    context = {"transport_security_type": [b"ssl"], "x509_pem_cert": [_certificate_naming(identity)]}
    caller = caller_from("ipv4:10.0.0.1:5", context)
    assert caller.identity == identity
    return caller


def _in_cgroup(path: str, prefix: str) -> bool:
    """Whole components, the slow way: the prefix's names begin the path's names."""
    names, prefix_names = [n for n in path.split("/") if n], [n for n in prefix.split("/") if n]
    return names[: len(prefix_names)] == prefix_names


def _oracle(policy: Policy, identity: str, verb: str, target: Target, advice: str | None) -> bool:
    if verb == ADVISE and not _oracle(policy, identity, READ, target, None):
        return False  # advice answers reveal the layout: advising takes leave to read
    for rule in policy.rules:
        if identity not in rule.identities or verb not in rule.verbs:
            continue
        sel = rule.targets
        if sel is not None:
            if sel.cgroup_prefixes and not any(_in_cgroup(target.cgroup, p) for p in sel.cgroup_prefixes):
                continue
            if sel.uids and (target.owner is None or target.owner not in sel.uids):
                continue
            if sel.comm and not any(fnmatch.fnmatchcase(target.comm, p) for p in sel.comm):
                continue
        if advice is not None and rule.advices is not None and advice not in rule.advices:
            continue
        return True
    return False


def _allowed(policy: Policy, identity: str, verb: str, target: Target, advice: str | None) -> bool:
    caller = _caller(identity)
    try:
        policy.check_verb(caller, verb)
        policy.check_target(caller, verb, target, advice)
    except PolicyDenied:
        return False
    return True


@SETTINGS
@given(
    st.lists(rules, max_size=4),
    st.sampled_from(IDENTITIES),
    st.sampled_from([READ, ADVISE]),
    targets(),
    st.sampled_from(ADVICE_NAMES),
)
def test_a_call_is_allowed_exactly_when_some_rule_allows_it(rule_list, identity, verb, target, advice):
    policy = Policy(rules=tuple(rule_list), agent=AGENT)
    advice_or_none = advice if verb == ADVISE else None
    assert _allowed(policy, identity, verb, target, advice_or_none) == _oracle(
        policy, identity, verb, target, advice_or_none
    )


@SETTINGS
@given(st.lists(rules, max_size=4), rules, st.sampled_from(IDENTITIES), targets(), st.sampled_from(ADVICE_NAMES))
def test_adding_a_rule_never_takes_a_permission_away(rule_list, extra, identity, target, advice):
    before = Policy(rules=tuple(rule_list), agent=AGENT)
    after = Policy(rules=(*rule_list, extra), agent=AGENT)
    for verb, adv in ((READ, None), (ADVISE, advice)):
        if _allowed(before, identity, verb, target, adv):
            assert _allowed(after, identity, verb, target, adv)


@SETTINGS
@given(
    st.lists(rules, max_size=4),
    targets(),
    st.frozensets(st.sampled_from([300, 301]), max_size=1),
    st.lists(st.sampled_from(["/kubepods", "/kube", "/user.slice/"]), max_size=2).map(tuple),
)
def test_protected_targets_are_protected_under_every_policy(rule_list, target, protected_pids, protected_cgroups):
    policy = Policy(
        rules=tuple(rule_list),
        protected_pids=protected_pids,
        protected_cgroup_prefixes=protected_cgroups,
        agent=AGENT,
    )
    protected = (
        target.pid in (1, AGENT.pid)
        or target.pid in protected_pids
        or _in_cgroup(target.cgroup, AGENT.cgroup)
        or any(_in_cgroup(target.cgroup, prefix) for prefix in protected_cgroups)
    )
    if protected:
        with pytest.raises(ProtectedTarget):
            policy.check_protected(target)
    else:
        policy.check_protected(target)


@SETTINGS
@given(
    st.lists(rules, max_size=4),
    st.sampled_from(IDENTITIES),
    st.sampled_from([READ, ADVISE]),
    st.sampled_from(ADVICE_NAMES),
    st.data(),
)
def test_a_refusal_says_nothing_of_a_target_the_caller_may_not_read(rule_list, identity, verb, advice, data):
    """Two processes the caller may not read, with one pid and any other facts,
    are refused in the same words: nothing of comm, uid, owner or cgroup shows."""
    policy = Policy(rules=tuple(rule_list), agent=AGENT)
    caller = _caller(identity)
    first, second = (data.draw(targets(pid=st.just(300))) for _ in range(2))
    assume(not policy.may_read(caller, first) and not policy.may_read(caller, second))
    refusals = []
    for target in (first, second):
        with pytest.raises(PolicyDenied) as refused:
            policy.check_target(caller, verb, target, advice if verb == ADVISE else None)
        refusals.append((refused.value.message, refused.value.metadata))
    assert refusals[0] == refusals[1]


def test_an_agent_in_the_root_cgroup_does_not_protect_every_process():
    policy = Policy(rules=(), agent=AgentSelf(pid=4242, cgroup="/"))
    policy.check_protected(Target(300, 0, "python3", "/", 1))
    policy.check_protected(Target(300, 0, "python3", "/user.slice", 1))


# ---- the token bucket ----------------------------------------------------------------


@SETTINGS
@given(
    st.floats(0.5, 1000),
    st.integers(1, 50),
    st.lists(st.floats(0, 5), min_size=1, max_size=200),
)
def test_token_bucket_never_admits_more_than_burst_plus_rate_times_time(rate, burst, gaps):
    bucket = TokenBucket(rate, burst, now=0.0)
    now, admitted = 0.0, 0
    for gap in gaps:
        now += gap
        wait = bucket.take(now)
        if wait == 0.0:
            admitted += 1
        else:
            assert wait > 0 and bucket.take(now + wait + 1e-9) == 0.0  # waiting as told is enough
            admitted += 1
            now += wait + 1e-9
        assert admitted <= burst + rate * now + 1e-6


# ---- peer names ----------------------------------------------------------------------


@SETTINGS
@given(
    st.integers(0, 2**32 - 2), st.integers(0, 2**32 - 2), st.integers(0, 2**22), st.text("0123456789abcdef", min_size=1)
)
def test_gateway_peer_names_round_trip(uid, gid, pid, nonce):
    caller = caller_from(f"unix-abstract:{peer_name(uid, gid, pid, nonce)}", {})
    assert (caller.identity, caller.transport, caller.uid, caller.gid, caller.pid) == (
        f"uid:{uid}",
        "unix",
        uid,
        gid,
        pid,
    )


@SETTINGS
@given(st.text(max_size=80))
def test_no_other_peer_string_passes_for_a_unix_peer(peer):
    assume(not peer.startswith("unix-abstract:vmctl-peer/"))
    caller = caller_from(peer, {})
    assert caller.identity == ANONYMOUS and not caller.authenticated

"""What SCOPE_RANGES stands on: the snapshot cache (bounded in bytes, least
recently used out first, keyed so that no cookie reads another process's or
image's snapshot), and the per-range check, whose C (PROCMAP_QUERY or a maps
layout) and pure-Python twins give the same answers: on arbitrary layouts
(hypothesis) and on a real process whose kinds PROCMAP_QUERY must see as the
maps parser does. Also the agent's series for the cache, and the back-end
selectors no longer shadowed by their subpackages."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.scrape import Scrape, logged_port

from vmctl_server.backends import select_native, select_reference
from vmctl_server.backends.native.ranges import NativeRanges
from vmctl_server.backends.native.tables import NativeVmaTable
from vmctl_server.backends.reference.ranges import PyRanges
from vmctl_server.core import procfs
from vmctl_server.core.advice import SCOPE_RANGES, AdviceRequest, Advisor
from vmctl_server.core.cookie import CookieClaims, CookieSigner
from vmctl_server.core.layout import KIND_ANONYMOUS, KIND_FILE, KIND_SPECIAL, LAYOUT_RECORD
from vmctl_server.core.snapshot import SnapshotReader, SourceSupport, claims_for
from vmctl_server.core.snapshot_cache import ENTRY_OVERHEAD, SnapshotCache, entry_cost

PAGE = os.sysconf("SC_PAGE_SIZE")
BOOT = bytes(16)


def claims(pid: int = 100, start_time: int = 5, exec_id: bytes = b"e" * 16, digest: bytes = b"d" * 32) -> CookieClaims:
    return CookieClaims(BOOT, pid, start_time, exec_id, digest)


def records(count: int) -> bytes:
    return b"".join(LAYOUT_RECORD.pack(i * PAGE, (i + 1) * PAGE, 0, 0, 0, 0, 3, KIND_ANONYMOUS) for i in range(count))


# ---- the cache -------------------------------------------------------------------------------


@pytest.mark.unprivileged
def test_the_cache_is_bounded_in_bytes_and_drops_the_least_recently_used() -> None:
    entry = records(10)
    cache = SnapshotCache(3 * entry_cost(entry))
    keys = [claims(digest=bytes([i]) * 32) for i in range(4)]
    for key in keys[:3]:
        cache.put(key, entry)
    assert cache.get(keys[0]) == entry  # used: the least recently used is now keys[1]
    cache.put(keys[3], entry)
    assert cache.get(keys[1]) is None
    assert [cache.get(k) is not None for k in (keys[0], keys[2], keys[3])] == [True, True, True]
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (3, 3 * entry_cost(entry), 1)
    assert (stats.hits, stats.misses) == (4, 1)
    cache.put(keys[3], entry)  # the same snapshot again: one entry, counted once
    assert cache.stats().entries == 3 and cache.stats().bytes == 3 * entry_cost(entry)
    assert entry_cost(entry) == 10 * LAYOUT_RECORD.size + ENTRY_OVERHEAD == 10 * 48 + ENTRY_OVERHEAD


@pytest.mark.unprivileged
def test_a_snapshot_larger_than_the_bound_is_not_kept_and_zero_keeps_nothing() -> None:
    cache = SnapshotCache(entry_cost(records(10)))
    cache.put(claims(), records(11))
    assert cache.get(claims()) is None and cache.stats().entries == 0
    cache.put(claims(), records(10))
    assert cache.get(claims()) == records(10)
    off = SnapshotCache(0)
    off.put(claims(), records(1))
    assert not off.enabled and off.get(claims()) is None and off.stats().entries == 0
    with pytest.raises(ValueError):
        SnapshotCache(-1)


@pytest.mark.unprivileged
def test_only_every_claim_alike_finds_a_snapshot() -> None:
    cache = SnapshotCache()
    cache.put(claims(), records(2))
    assert cache.get(claims()) == records(2)
    for other in (
        claims(pid=101),
        claims(start_time=6),  # the pid reused
        claims(exec_id=b"f" * 16),  # the process exec'd
        claims(digest=b"x" * 32),  # another layout
        dataclasses.replace(claims(), boot_id=b"\1" * 16),  # another boot
    ):
        assert cache.get(other) is None


# ---- the check, C against Python ---------------------------------------------------------------


@st.composite
def snapshot_and_live(draw: st.DrawFn) -> tuple[bytes, bytes, list[tuple[int, int]]]:
    """A snapshot layout, a live one made from it by the changes a process makes (a VMA split,
    merged with its neighbour, unmapped, grown, remapped as another kind, file or offset), and
    ranges inside what the snapshot saw."""
    vmas = []
    cursor = draw(st.integers(1, 8)) * PAGE
    for _ in range(draw(st.integers(1, 8))):
        cursor += draw(st.sampled_from([0, 0, PAGE]))
        pages = draw(st.integers(1, 6))
        kind = draw(st.sampled_from([KIND_ANONYMOUS, KIND_FILE, KIND_SPECIAL]))
        inode, dev = (draw(st.sampled_from([7, 8])), 1) if kind == KIND_FILE else (0, 0)
        offset = draw(st.integers(0, 4)) * PAGE if kind == KIND_FILE else cursor
        vmas.append([cursor, cursor + pages * PAGE, offset, inode, dev, 0, 3, kind])
        cursor += pages * PAGE
    live = [list(v) for v in vmas]
    for _ in range(draw(st.integers(0, 4))):
        if not live:
            break
        i = draw(st.integers(0, len(live) - 1))
        v = live[i]
        change = draw(st.sampled_from(["split", "merge", "unmap", "grow", "kind", "file", "offset", "shrink"]))
        if change == "split" and v[1] - v[0] > PAGE:
            cut = v[0] + draw(st.integers(1, (v[1] - v[0]) // PAGE - 1)) * PAGE
            tail = [cut, v[1], v[2] + (cut - v[0]), *v[3:]]
            v[1] = cut
            live.insert(i + 1, tail)
        elif change == "merge" and i + 1 < len(live) and live[i + 1][0] == v[1]:
            v[1] = live.pop(i + 1)[1]
        elif change == "unmap":
            live.pop(i)
        elif change == "grow" and (i + 1 == len(live) or live[i + 1][0] > v[1]):
            v[1] += PAGE
        elif change == "shrink" and v[1] - v[0] > PAGE:
            v[1] -= PAGE
        elif change == "kind":
            v[7] = draw(st.sampled_from([KIND_ANONYMOUS, KIND_FILE, KIND_SPECIAL]))
        elif change == "file":
            v[3] += 1
        elif change == "offset":
            v[2] += PAGE
    pack = lambda rows: b"".join(LAYOUT_RECORD.pack(*row) for row in rows)  # noqa: E731
    ranges = []
    for v in vmas:
        if draw(st.booleans()):
            pages = (v[1] - v[0]) // PAGE
            first = draw(st.integers(0, pages - 1))
            ranges.append((v[0] + first * PAGE, v[0] + draw(st.integers(first + 1, pages)) * PAGE))
    if len(vmas) > 1 and vmas[0][1] == vmas[1][0] and draw(st.booleans()):
        ranges.append((vmas[0][0], vmas[1][1]))  # across two VMAs of the snapshot
        ranges = [r for r in ranges if not (r[0] < vmas[1][1] and vmas[0][0] < r[1])] + [ranges[-1]]
    return pack(vmas), pack(live), sorted(set(ranges))


def expected_changes(snapshot: bytes, live: bytes, ranges: list[tuple[int, int]]) -> bytes:
    """Page by page, the plain definition: same kind, and for files the same file and offset."""

    def at(layout: bytes, address: int) -> tuple | None:
        for row in LAYOUT_RECORD.iter_unpack(layout):
            if row[0] <= address < row[1]:
                start, _, offset, inode, major, minor, _, kind = row
                return (kind, major, minor, inode, offset + address - start) if kind == KIND_FILE else (kind,)
        return None

    return bytes(
        any(at(live, a) is None or at(live, a) != at(snapshot, a) for a in range(start, end, PAGE))
        for start, end in ranges
    )


@pytest.mark.unprivileged
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshot_and_live())
def test_the_checks_equal_each_other_and_the_plain_definition(case: tuple[bytes, bytes, list]) -> None:
    snapshot, live, ranges = case
    native = NativeRanges.from_pairs(ranges).covering_records(snapshot, live)
    assert native == PyRanges.from_pairs(ranges).covering_records(snapshot, live)
    assert native == expected_changes(snapshot, live, ranges)


@pytest.mark.unprivileged
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshot_and_live(), st.data())
def test_plans_leave_out_the_same_ranges_and_say_so_alike(case: tuple[bytes, bytes, list], data) -> None:
    snapshot, _, ranges = case
    changed = bytes(data.draw(st.lists(st.integers(0, 1), min_size=len(ranges), max_size=len(ranges))))
    answers = []
    for backend in (NativeRanges, PyRanges):
        plan = backend.from_pairs(ranges).plan(snapshot, 0)
        left_out = plan.exclude(changed)
        before = (left_out, plan.pieces(), [dataclasses.astuple(o) for o in plan.outcomes()], plan.encode(b"x"))
        plan.dry_run()
        answers.append((*before, plan.advised_bytes, [dataclasses.astuple(o) for o in plan.outcomes()]))
    assert answers[0] == answers[1]
    assert answers[0][0] == sum(changed)
    assert all(owner not in {i for i, c in enumerate(changed) if c} for owner, _, _ in answers[0][1])


def test_procmap_query_sees_every_vma_as_the_maps_parser_does(target, tmp_path) -> None:
    """The live VMAs from PROCMAP_QUERY ([heap], [stack], [vdso], named and plain anonymous memory,
    files) compare equal to the snapshot's parsed from maps; and each change is seen by all four."""
    data = tmp_path / "data"
    data.write_bytes(b"d" * 8 * PAGE)
    target.map_file(str(data), 8 * PAGE)
    target.map_anon(4 * PAGE, seed=2)
    with target.stopped():
        layout = NativeVmaTable.read(target.pid, "maps").layout_records()
        rows = [list(row) for row in LAYOUT_RECORD.iter_unpack(layout)]
        ranges = [(row[0], row[1]) for row in rows if row[0] < 1 << 63]  # not [vsyscall]: PROCMAP_QUERY skips it
        assert {row[7] for row in rows} == {KIND_ANONYMOUS, KIND_FILE, KIND_SPECIAL}
        mutated = [list(row) for row in rows]
        for i, row in enumerate(mutated):
            if i % 3 == 1:
                row[7] = KIND_ANONYMOUS if row[7] != KIND_ANONYMOUS else KIND_FILE
            elif i % 3 == 2 and row[7] == KIND_FILE:
                row[2] += PAGE
        for snapshot_rows in (rows, mutated):
            snapshot = b"".join(LAYOUT_RECORD.pack(*row) for row in snapshot_rows)
            fd = procfs.open_fd(target.pid, "maps")
            try:
                answers = {
                    "native query": NativeRanges.from_pairs(ranges).covering(fd, snapshot),
                    "python query": PyRanges.from_pairs(ranges).covering(fd, snapshot),
                    "native maps": NativeRanges.from_pairs(ranges).covering_records(snapshot, layout),
                    "python maps": PyRanges.from_pairs(ranges).covering_records(snapshot, layout),
                }
            finally:
                os.close(fd)
            assert len(set(answers.values())) == 1, answers
            expected = bytes(row != seen for row, seen in zip(rows, snapshot_rows, strict=False) if row[0] < 1 << 63)
            assert answers["native query"] == expected


@pytest.mark.parametrize("procmap_query", [True, False], ids=["procmap_query", "maps"])
@pytest.mark.parametrize("backend", [select_native, select_reference], ids=["native", "python"])
def test_the_advisor_s_scoped_step_with_and_without_procmap_query(target, procmap_query, backend) -> None:
    """The core alone (no gRPC): the snapshot a read left in the cache, the ranges checked
    against it with PROCMAP_QUERY or, where the kernel lacks it, against the maps text."""
    chosen = backend()
    reader = SnapshotReader(chosen.tables, SourceSupport(procmap_query=procmap_query))
    signer, cache = CookieSigner.with_random_key(), SnapshotCache()
    advisor = Advisor(signer, reader, chosen.ranges, frozenset({1}), snapshots=cache)
    gone, kept = target.map_anon(4 * PAGE, seed=1), target.map_anon(4 * PAGE, seed=2)
    snapshot = reader.take(target.pid, 0)
    snapshot_claims = claims_for(snapshot.identity, snapshot.digest)
    cache.put(snapshot_claims, snapshot.layout_records)
    target.call("unmap", start=gone[0])
    request = AdviceRequest(
        target.pid, chosen.ranges.from_pairs([gone, kept]), 1, signer.issue(snapshot_claims), 0, True, SCOPE_RANGES
    )
    checked = advisor.check(request, require_cookie=True)
    with advisor.open(checked) as opened:
        planned = advisor.plan_in_scope(checked, opened)
        result = advisor.apply(checked, opened, planned.plan, planned.scope)
    assert (planned.scope.applied, planned.scope.changed_ranges) == (SCOPE_RANGES, 1)
    assert [(o.changed, o.advised_bytes) for o in result.plan.outcomes()] == [(True, 0), (False, 4 * PAGE)]
    assert result.plan.pieces() == [(1, *kept)]
    target.verify()


# ---- the agent's series, and the back-end selectors -------------------------------------------


def test_the_cache_s_series(start_agent, target) -> None:
    agent = start_agent("--metrics-listen", "127.0.0.1:0", "--log-format", "json", "--snapshot-cache-bytes", "1M")
    port = logged_port(agent, "metrics_port")
    start, end = target.map_anon(4 * PAGE, seed=3)
    with agent.client() as client:
        info = client.get_vma_info(target.pid)
        client.advise_ranges(target.pid, [(start, end)], "cold", cookie=info.cookie, scope="ranges")
        client.advise_ranges(target.pid, [(start, end)], "cold", cookie=info.cookie)
        target.map_anon(PAGE, seed=4)
        stale = client.get_vma_info(target.pid)
        with agent.client() as other:
            other.get_vma_info(target.pid)
    scrape = Scrape(port)
    assert scrape.value("vmctl_snapshot_cache_entries") == 2 == len({info.cookie, stale.cookie})
    assert 0 < scrape.value("vmctl_snapshot_cache_bytes") <= 1 << 20
    assert scrape.value("vmctl_snapshot_cache_hits_total") == 1
    assert scrape.value("vmctl_snapshot_cache_misses_total") == 0
    assert scrape.value("vmctl_advice_scope_checks_total", scope="ranges") == 1
    assert scrape.value("vmctl_advice_scope_checks_total", scope="whole") == 1
    assert scrape.value("vmctl_advice_scope_checks_total", scope="fallback") == 0
    assert scrape.value("vmctl_advice_ranges_changed_total") == 0
    target.verify()


@pytest.mark.unprivileged
def test_the_back_end_selectors_survive_their_subpackages_being_imported() -> None:
    code = (
        "import vmctl_server.backends as b, vmctl_server.backends.native.ranges,"
        " vmctl_server.backends.reference.ranges;"
        "assert b.select_native().native and b.select_native().native;"
        "assert not b.select_reference().native and not b.select_reference().native"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

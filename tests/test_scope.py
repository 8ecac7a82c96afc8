"""SCOPE_RANGES end to end: advice checked range by range against what the
cookie's snapshot saw, on real targets that churn, grow and remap their
memory; the identity checks that stay; the fallback when the agent no longer
has the snapshot; the CLI's --scope and its exit status; reclaim's default.
After every advice the targets' memory is checked byte for byte."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import time
from collections.abc import Iterator

import pytest
from support.audit_lines import audit_records
from support.pidns import PidNamespace
from support.processes import LineProcess, smaps_region
from support.vmctl_cli import vmctl

from vmctl_api import vmctl_pb2 as pb
from vmctl_api import words
from vmctl_client import Client, InvalidRequestError, ProcessChangedError, StaleCookieError
from vmctl_client.reclaim import reclaim, reclaim_process

PAGE = os.sysconf("SC_PAGE_SIZE")
SCOPE_TARGET = pathlib.Path(__file__).resolve().parent / "support" / "scope_target.py"


class ScopeTarget(LineProcess):
    def map_anon(self, pages: int, seed: int, spare: int = 0) -> tuple[int, int]:
        reply = self.call("map_anon", pages=pages, seed=seed, spare=spare)
        return reply["start"], reply["end"]

    def verify(self) -> None:
        reply = self.call("verify")
        assert reply["ok"], f"regions changed: {[hex(a) for a in reply['bad']]}"

    @contextlib.contextmanager
    def churning(self) -> Iterator[None]:
        self.call("churn")
        try:
            yield
        finally:
            assert self.call("calm")["cycles"] > 0


@pytest.fixture
def scope_target() -> Iterator[ScopeTarget]:
    target = ScopeTarget.spawn(SCOPE_TARGET)
    try:
        yield target
    finally:
        target.kill()


def data_file(directory: pathlib.Path, name: str, pages: int) -> pathlib.Path:
    path = directory / name
    path.write_bytes(os.urandom(pages * PAGE))
    return path


# ---- the contract's words --------------------------------------------------------------


@pytest.mark.unprivileged
def test_the_scope_enum_is_the_words() -> None:
    values = {v.name: v.number for v in pb.DESCRIPTOR.enum_types_by_name["Scope"].values}
    assert values == {"SCOPE_UNSPECIFIED": 0, **{f"SCOPE_{name.upper()}": n for name, n in words.SCOPES.items()}}
    assert words.SCOPE_BY_NUMBER[0] == "whole"
    assert set(words.RANGE_RESULT_REASONS) == {"RANGE_CHANGED"}
    assert not set(words.RANGE_RESULT_REASONS) & set(words.REASONS)  # a range's outcome, never a refusal


# ---- churn elsewhere, growth in place --------------------------------------------------


def test_ranges_scope_advises_a_stable_region_while_another_churns(any_agent, scope_target) -> None:
    start, end = scope_target.map_anon(64, seed=1)
    with any_agent.client() as client, scope_target.churning():
        refused = 0
        for _ in range(20):
            info = client.get_vma_info(scope_target.pid)
            time.sleep(0.02)  # the churn moves the layout meanwhile
            try:
                client.advise_ranges(scope_target.pid, [(start, end)], "cold", cookie=info.cookie)
            except StaleCookieError as exc:
                assert exc.reason == "LAYOUT_CHANGED"
                refused += 1
        assert refused >= 15  # whole scope: the churn makes nearly every cookie stale
        for _ in range(10):
            info = client.get_vma_info(scope_target.pid)
            time.sleep(0.02)
            result = client.advise_ranges(scope_target.pid, [(start, end)], "cold", cookie=info.cookie, scope="ranges")
            assert (result.scope, result.scope_fallback, result.changed_ranges) == ("ranges", False, 0)
            assert result.advised_bytes == end - start and result.ranges[0].reason == ""
    scope_target.verify()


def test_ranges_scope_advises_a_region_that_grew_into_its_neighbour(client, scope_target) -> None:
    start, end = scope_target.map_anon(16, seed=2, spare=8)
    info = client.get_vma_info(scope_target.pid)
    grown = scope_target.call("grow", start=start, pages=8)["end"]
    (vma,) = [v for v in client.get_vma_info(scope_target.pid).vmas if v.start == start]
    assert vma.end == grown  # one VMA now: the snapshot's boundary moved
    with pytest.raises(StaleCookieError):
        client.advise_ranges(scope_target.pid, [(start, end)], "cold", cookie=info.cookie)
    result = client.advise_ranges(scope_target.pid, [(start, end)], "cold", cookie=info.cookie, scope="ranges")
    assert (result.scope, result.changed_ranges, result.advised_bytes) == ("ranges", 0, end - start)
    scope_target.verify()


# ---- memory of another kind, another file, another offset ------------------------------


def test_a_range_mapped_over_by_a_file_is_changed_and_not_advised(client, scope_target, zram_swap, tmp_path) -> None:
    remapped = scope_target.map_anon(16, seed=3)
    kept = scope_target.map_anon(16, seed=4)
    info = client.get_vma_info(scope_target.pid)
    scope_target.call("map_file", start=remapped[0], path=str(data_file(tmp_path, "f", 16)))
    rss = smaps_region(scope_target.pid, remapped[0])["Rss"]
    assert rss == 16 * PAGE // 1024
    result = client.advise_ranges(scope_target.pid, [remapped, kept], "pageout", cookie=info.cookie, scope="ranges")
    assert (result.scope, result.changed_ranges) == ("ranges", 1)
    changed, advised = result.ranges
    assert (changed.reason, changed.advised_bytes, changed.skipped_bytes, changed.error) == ("RANGE_CHANGED", 0, 0, "")
    assert (advised.reason, advised.advised_bytes) == ("", kept[1] - kept[0])
    assert result.advised_bytes == kept[1] - kept[0]
    assert smaps_region(scope_target.pid, remapped[0])["Rss"] == rss  # the file's pages were not paged out
    assert smaps_region(scope_target.pid, kept[0])["Swap"] > 0  # the anonymous ones were (most of them: under
    # load the kernel may leave a page it could not isolate at that moment)
    assert result.to_json()["changed_ranges"] == 1 and result.ranges[0].to_json()["reason"] == "RANGE_CHANGED"
    scope_target.verify()


def test_another_file_or_offset_is_changed_and_the_same_file_is_not(client, scope_target, tmp_path) -> None:
    first, second = data_file(tmp_path, "first", 32), data_file(tmp_path, "second", 32)
    regions = [scope_target.map_anon(8, seed=10 + i) for i in range(4)]
    for region in regions:
        scope_target.call("map_file", start=region[0], path=str(first))
    info = client.get_vma_info(scope_target.pid)
    scope_target.call("map_file", start=regions[0][0], path=str(second))  # another file
    scope_target.call("map_file", start=regions[1][0], path=str(first), offset=8 * PAGE)  # another offset
    scope_target.call("map_file", start=regions[2][0], path=str(first))  # mapped again, as it was
    result = client.advise_ranges(scope_target.pid, regions, "cold", cookie=info.cookie, scope="ranges")
    assert [r.reason for r in result.ranges] == ["RANGE_CHANGED", "RANGE_CHANGED", "", ""]
    assert [r.advised_bytes for r in result.ranges] == [0, 0, 8 * PAGE, 8 * PAGE]
    assert result.changed_ranges == 2
    scope_target.verify()


def test_an_unmapped_range_is_changed_but_one_the_snapshot_never_saw_is_refused(client, scope_target) -> None:
    gone = scope_target.map_anon(8, seed=5)
    kept = scope_target.map_anon(8, seed=9)
    info = client.get_vma_info(scope_target.pid)
    scope_target.call("unmap", start=gone[0])
    result = client.advise_ranges(scope_target.pid, [gone, kept], "cold", cookie=info.cookie, scope="ranges")
    assert [r.reason for r in result.ranges] == ["RANGE_CHANGED", ""] and result.advised_bytes == PAGE * 8
    # Memory the snapshot never saw (below mmap_min_addr nothing is ever mapped): the caller's picture
    # is wrong, and the call is refused as under SCOPE_WHOLE, before anything is advised.
    never = (16 * PAGE, 18 * PAGE)
    with pytest.raises(InvalidRequestError) as caught:
        client.advise_ranges(scope_target.pid, [kept, never], "cold", cookie=info.cookie, scope="ranges")
    assert caught.value.reason == "RANGE_UNMAPPED"
    scope_target.verify()


# ---- identity stays --------------------------------------------------------------------


def test_identity_is_checked_under_ranges_scope(client, scope_target, spawn_target) -> None:
    start, end = scope_target.map_anon(8, seed=6)
    info = client.get_vma_info(scope_target.pid)
    other = spawn_target()
    with pytest.raises(Exception) as caught:  # another process's cookie
        client.advise_ranges(other.pid, [(start, end)], "cold", cookie=info.cookie, scope="ranges")
    assert getattr(caught.value, "reason", "") == "COOKIE_INVALID"
    scope_target.call("exec")
    scope_target._read()  # the new image says hello
    with pytest.raises(ProcessChangedError):
        client.advise_ranges(scope_target.pid, [(start, end)], "cold", cookie=info.cookie, scope="ranges")


def test_a_reused_pid_is_refused_under_ranges_scope(zram_swap) -> None:
    """The same pid, another process (made exact with ns_last_pid): the old cookie's snapshot is
    cached, and the new process has memory of the same kind where it saw it; still refused."""
    with PidNamespace() as ns:
        agent = ns.start_agent()
        pid = 31337
        with agent.client() as client:
            old, second = ns.reuse_pid(client, pid)
            old_stack = next(v for v in old.vmas if v.path == "[stack]")
            start, end = second.map_anon(4 << 20, seed=9)
            with pytest.raises(ProcessChangedError) as caught:
                client.advise_ranges(pid, [(start, end), old_stack], "pageout", cookie=old.cookie, scope="ranges")
            assert caught.value.reason == "PROCESS_CHANGED"
            region = second.smaps_region(start)
            assert region["Rss"] == 4 * 1024 and region["Swap"] == 0, "the new process was advised"
            second.verify()


# ---- without the snapshot: the whole layout ----------------------------------------------


def test_without_the_snapshot_ranges_scope_checks_the_whole_layout(start_agent, scope_target, tmp_path) -> None:
    audit = tmp_path / "audit.log"
    agent = start_agent("--snapshot-cache-bytes", "0", "--audit-log", str(audit))
    start, end = scope_target.map_anon(8, seed=7)
    with agent.client() as client:
        info = client.get_vma_info(scope_target.pid)
        result = client.advise_ranges(scope_target.pid, [(start, end)], "cold", cookie=info.cookie, scope="ranges")
        assert (result.scope, result.scope_fallback, result.advised_bytes) == ("whole", True, end - start)
        with scope_target.churning(), pytest.raises(StaleCookieError):
            for _ in range(20):
                info = client.get_vma_info(scope_target.pid)
                time.sleep(0.02)
                client.advise_ranges(scope_target.pid, [(start, end)], "cold", cookie=info.cookie, scope="ranges")
    first, *_ = audit_records(audit)
    assert (first["scope"], first["scope_checked"], first["scope_fallback"]) == ("ranges", False, True)
    intents = audit_records(audit, "advise_intent")
    assert intents[0]["scope_fallback"] is True
    scope_target.verify()


def test_an_evicted_snapshot_falls_back_and_a_kept_one_does_not(start_agent, scope_target, tmp_path) -> None:
    audit = tmp_path / "audit.log"
    start, end = scope_target.map_anon(8, seed=8)
    vmas = len(pathlib.Path(f"/proc/{scope_target.pid}/maps").read_text().splitlines())
    # Room for about three snapshots of this target.
    agent = start_agent("--snapshot-cache-bytes", str(3 * (vmas + 8) * 48 + 3 * 400), "--audit-log", str(audit))
    with agent.client() as client:
        old = client.get_vma_info(scope_target.pid)
        for seed in range(5):  # five other layouts, each a snapshot of its own
            scope_target.map_anon(1, seed=100 + seed)
            newest = client.get_vma_info(scope_target.pid)
        with pytest.raises(StaleCookieError):  # evicted: the whole layout is checked, and it moved since
            client.advise_ranges(scope_target.pid, [(start, end)], "cold", cookie=old.cookie, scope="ranges")
        kept = client.advise_ranges(scope_target.pid, [(start, end)], "cold", cookie=newest.cookie, scope="ranges")
        assert (kept.scope, kept.scope_fallback) == ("ranges", False)
    records = audit_records(audit)
    assert [(r["scope_checked"], r["scope_fallback"], r["status"]) for r in records] == [
        (False, True, "FAILED_PRECONDITION"),  # old cookie, no snapshot: the whole layout moved since
        (True, False, "OK"),
    ]
    assert records[0]["reason"] == "LAYOUT_CHANGED"
    scope_target.verify()


# ---- the command line --------------------------------------------------------------------


def test_advise_scope_on_the_command_line_and_exit_3_for_changed_ranges(agent, scope_target, tmp_path) -> None:
    remapped = scope_target.map_anon(8, seed=20)
    kept = scope_target.map_anon(8, seed=21)
    maps = json.loads(vmctl("--target", agent.address, "maps", str(scope_target.pid), "-o", "json").stdout)
    scope_target.call("map_file", start=remapped[0], path=str(data_file(tmp_path, "g", 8)))
    advise = ["--target", agent.address, "advise", str(scope_target.pid), "--advice", "cold"]
    advise += ["--cookie", maps["cookie"]]
    advise += ["--range", f"0x{remapped[0]:x}-0x{remapped[1]:x}", "--range", f"{kept[0]}-{kept[1]}"]
    whole = vmctl(*advise, "-o", "json")
    assert whole.returncode == 3 and json.loads(whole.stdout)["error"]["reason"] == "LAYOUT_CHANGED"
    ranges = vmctl(*advise, "--scope", "ranges", "-o", "json")
    assert ranges.returncode == 3, ranges.stdout + ranges.stderr
    data = json.loads(ranges.stdout)
    assert (data["scope"], data["changed_ranges"], data["advised_bytes"]) == ("ranges", 1, 8 * PAGE)
    assert [r["reason"] for r in data["ranges"]] == ["RANGE_CHANGED", None]
    assert {"rss_before", "swap_before", "rss_after", "swap_after"} <= set(data)
    assert data["rss_before"] > 0 and data["rss_after"] > 0
    table = vmctl(*advise, "--scope", "ranges")
    assert table.returncode == 3
    assert "1 range(s) CHANGED" in table.stdout and "RANGE_CHANGED" in table.stdout
    assert "scope ranges; rss " in table.stdout.splitlines()[-1]
    ok = vmctl(*advise[:-4], "--range", f"{kept[0]}-{kept[1]}", "--scope", "ranges", "-o", "json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["changed_ranges"] == 0
    scope_target.verify()


def test_advise_all_with_a_stale_cookie_exits_3(agent, scope_target) -> None:
    scope_target.map_anon(8, seed=22)
    maps = json.loads(vmctl("--target", agent.address, "maps", str(scope_target.pid), "-o", "json").stdout)
    advise = ["--target", agent.address, "advise", str(scope_target.pid), "--advice", "cold", "--all"]
    fresh = vmctl(*advise, "--cookie", maps["cookie"], "-o", "json")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr  # the layout is still the cookie's
    scope_target.map_anon(1, seed=23)
    for scope in ("whole", "ranges"):
        run = vmctl(*advise, "--cookie", maps["cookie"], "--scope", scope, "-o", "json")
        assert run.returncode == 3, run.stdout + run.stderr
        assert json.loads(run.stdout)["error"]["reason"] == "LAYOUT_CHANGED"
    scope_target.verify()


def test_the_scope_flags_and_their_defaults(agent, scope_target) -> None:
    for command in ("advise", "reclaim"):
        assert "--scope {ranges,whole}" in vmctl(command, "--help").stdout
    assert "or (advise) changed ranges" in " ".join(vmctl("--help").stdout.split())  # what exit status 3 means
    assert vmctl("advise", "1", "--advice", "cold", "--all", "--scope", "some").returncode == 2
    scope_target.map_anon(8, seed=24)
    with scope_target.churning():
        run = vmctl("--target", agent.address, "reclaim", str(scope_target.pid), "--advice", "cold", "-o", "json")
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(run.stdout)
    assert data["scope"] == "ranges" and data["processes"][0]["status"] == "done"
    scope_target.verify()


# ---- reclaim --------------------------------------------------------------------------------


def test_reclaim_pages_out_a_churning_target_with_ranges_scope(client, scope_target, zram_swap) -> None:
    start, _ = scope_target.map_anon(256, seed=30)
    with scope_target.churning():
        for _ in range(3):
            outcome = reclaim_process(client, scope_target.pid, retries=0)
            assert outcome.status == "done" and outcome.scope == "ranges"
    assert smaps_region(scope_target.pid, start)["Swap"] > 128 * PAGE // 1024
    report = reclaim(client, pid=scope_target.pid, advice="cold")
    assert report.to_json()["scope"] == "ranges"
    scope_target.verify()


def test_the_library_defaults() -> None:
    from vmctl_client.defaults import DEFAULT_RECLAIM_SCOPE, DEFAULT_RETRIES

    assert (DEFAULT_RETRIES, DEFAULT_RECLAIM_SCOPE) == (8, "ranges")
    with Client("unix:///nonexistent") as client, pytest.raises(ValueError, match="unknown scope"):
        client.advise_ranges(1, [(0, PAGE)], "cold", scope="some")

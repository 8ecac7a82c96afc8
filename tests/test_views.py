"""The client's result views read exactly what the reply holds: Vma views and
their columns, and AdviseRanges's lazy per-range results, on replies from a
real agent about a real process."""

from __future__ import annotations

import pytest
from support.processes import PAGE

from vmctl_client.types import LAYOUT_WORDS, WORD_GROUP, RangeResult


def test_every_column_equals_the_views(client, target):
    target.map_anon(16 * PAGE, seed=3)
    info = client.get_vma_info(target.pid, attrs="all")
    vmas = list(info.vmas)
    assert len(vmas) > 10
    for word in (*LAYOUT_WORDS, *WORD_GROUP):
        assert info.vmas.column(word) == [getattr(v, word) for v in vmas], word
    assert "anonymous" in info.vmas.column("kind") and "file" in info.vmas.column("kind")
    with pytest.raises(ValueError, match="no column 'size'"):
        info.vmas.column("size")


def test_range_results_read_through_to_the_reply(client, target):
    start, end = target.map_anon(64 * PAGE, seed=4)
    info = client.get_vma_info(target.pid)
    pages = [(a, a + PAGE) for a in range(start, end, PAGE)]
    file_vma = next(v for v in info.vmas if v.kind == "file")
    result = client.advise_ranges(
        target.pid, [*pages, (file_vma.start, file_vma.end)], "cold", cookie=info.cookie, filter="anonymous"
    )

    messages = result.reply.ranges
    assert len(result.ranges) == len(messages) == 65
    for view, message in zip(result.ranges, messages, strict=True):
        assert (view.start, view.end, view.advised_bytes, view.skipped_bytes, view.error, view.errno) == (
            message.start,
            message.end,
            message.advised_bytes,
            message.skipped_bytes,
            message.error,
            message.error_number,
        )
        assert view.message == message
    assert [r.start for r in result.ranges[10:20]] == [a for a, _ in pages[10:20]]
    assert result.ranges[-1].skipped_bytes == file_vma.end - file_vma.start  # the filter left the file out
    assert result.ranges[-1].advised_bytes == 0
    assert result.ranges[0].to_json() == {
        "start": start,
        "end": start + PAGE,
        "advised_bytes": PAGE,
        "skipped_bytes": 0,
        "error": None,
        "reason": None,
    }
    # Views of the same values are equal, whichever reply they come from.
    again = client.advise_ranges(target.pid, pages[:3], "cold", cookie=info.cookie)
    assert list(again.ranges) == list(result.ranges[:3])
    assert len({*again.ranges, *result.ranges[:3]}) == 3
    assert isinstance(result.ranges[0], RangeResult) and "RangeResult(start=0x" in repr(result.ranges[0])

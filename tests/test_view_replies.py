"""The client's views over replies made here, field by field: every word a Vma
view or a column has reads its own field of the message, and nothing else.
(test_views.py checks the same views on a real agent's replies.) No agent, no
process: runs without root."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import FieldDescriptor

from vmctl_api import vmctl_pb2 as pb
from vmctl_client.types import LAYOUT_WORDS, WORD_GROUP, AdviceResult, RangeResult, VmaInfo

pytestmark = pytest.mark.unprivileged

ALL_ATTRS = pb.VMA_ATTR_LAYOUT | pb.VMA_ATTR_BUILD_ID | pb.VMA_ATTR_RESIDENCY | pb.VMA_ATTR_ACCOUNTING


def distinct_vma() -> pb.Vma:
    """A Vma message whose every field holds a value no other field holds."""
    message = pb.Vma()
    for number, field in enumerate(pb.Vma.DESCRIPTOR.fields, start=1):
        if field.name == "kind":
            message.kind = pb.VMA_KIND_FILE
        elif field.type == FieldDescriptor.TYPE_STRING:
            setattr(message, field.name, f"{field.name}-{number}")
        elif field.type == FieldDescriptor.TYPE_BYTES:
            setattr(message, field.name, bytes([number]) * 3)
        elif field.type == FieldDescriptor.TYPE_BOOL:
            setattr(message, field.name, True)
        else:
            setattr(message, field.name, 1000 + number)
    return message


def field_of(message: pb.Vma, word: str) -> object:
    """The message's value for ``word``: its field of that name, or with the ``_bytes`` suffix."""
    return getattr(message, word if word in pb.Vma.DESCRIPTOR.fields_by_name else f"{word}_bytes")


def test_every_word_reads_its_own_field():
    message = distinct_vma()
    info = VmaInfo(pb.GetVmaInfoResponse(result_mask=ALL_ATTRS, vmas=[message, message]))
    (vma, _) = info.vmas
    for word in (*LAYOUT_WORDS, *WORD_GROUP):
        expected = "file" if word == "kind" else field_of(message, word)
        assert getattr(vma, word) == expected, word
        assert info.vmas.column(word) == [expected, expected], word
    assert vma.size == message.end - message.start


def test_json_holds_the_layout_and_the_words_asked_for():
    message = distinct_vma()
    info = VmaInfo(pb.GetVmaInfoResponse(result_mask=pb.VMA_ATTR_LAYOUT | pb.VMA_ATTR_RESIDENCY, vmas=[message]))
    assert info.result_attrs == ["rss", "swap"]
    (row,) = info.to_json()["vmas"]
    assert set(row) == {*LAYOUT_WORDS, "rss", "swap"}
    assert row["rss"] == message.rss_bytes and row["swap"] == message.swap_bytes


def test_a_kind_this_client_does_not_know_is_unknown():
    info = VmaInfo(pb.GetVmaInfoResponse(vmas=[pb.Vma(kind=99)]))
    assert info.vmas[0].kind == "unknown"
    assert info.vmas.column("kind") == ["unknown"]


def test_range_results_read_through_and_compare_by_value():
    messages = [
        pb.RangeResult(
            start=0x1000, end=0x3000, advised_bytes=0x1000, skipped_bytes=0x1000, error="EAGAIN", error_number=11
        ),
        pb.RangeResult(start=0x8000, end=0x9000, advised_bytes=0x1000),
    ]
    result = AdviceResult(pb.AdviseRangesResponse(ranges=messages, advised_bytes=0x2000, syscalls=1))
    assert len(result.ranges) == 2
    for view, message in zip(result.ranges, messages, strict=True):
        assert (view.start, view.end, view.advised_bytes, view.skipped_bytes, view.error, view.errno) == (
            message.start,
            message.end,
            message.advised_bytes,
            message.skipped_bytes,
            message.error,
            message.error_number,
        )
    assert result.ranges[1].to_json()["error"] is None  # no error: null, not ""
    again = RangeResult(pb.RangeResult(start=0x8000, end=0x9000, advised_bytes=0x1000))
    assert again == result.ranges[1] and len({again, result.ranges[1]}) == 1
    assert again != result.ranges[0]

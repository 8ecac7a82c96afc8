"""Typed results: thin views over the protobuf replies.

A 65,530-VMA snapshot is one protobuf message; :class:`VmaList` wraps its
entries lazily, so nothing is built per VMA until it is looked at, and
:meth:`VmaList.column` reads one attribute of every VMA without a view at all.
AdviseRanges's per-range results are lazy the same way (:class:`RangeResultList`).
Attributes are named by lowercase words (``rss``, ``pss``, ``swap``) in bytes.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import overload

from vmctl_api import vmctl_pb2 as pb

# Attribute words by the VmaAttr group that fills them.
LAYOUT_WORDS = ("start", "end", "perms", "offset", "dev_major", "dev_minor", "inode", "path", "kind")
GROUP_WORDS: dict[int, tuple[str, ...]] = {
    pb.VMA_ATTR_BUILD_ID: ("build_id",),
    pb.VMA_ATTR_RESIDENCY: ("rss", "swap"),
    pb.VMA_ATTR_ACCOUNTING: (
        "pss",
        "pss_dirty",
        "referenced",
        "anonymous",
        "shared_clean",
        "shared_dirty",
        "private_clean",
        "private_dirty",
        "ksm",
        "lazy_free",
        "anon_huge_pages",
        "shmem_pmd_mapped",
        "file_pmd_mapped",
        "shared_hugetlb",
        "private_hugetlb",
        "swap_pss",
        "locked",
        "kernel_page_size",
        "mmu_page_size",
        "thp_eligible",
        "vm_flags",
    ),
}
GROUP_NAMES = {
    "layout": pb.VMA_ATTR_LAYOUT,
    "build_id": pb.VMA_ATTR_BUILD_ID,
    "residency": pb.VMA_ATTR_RESIDENCY,
    "accounting": pb.VMA_ATTR_ACCOUNTING,
    "all": pb.VMA_ATTR_LAYOUT | pb.VMA_ATTR_BUILD_ID | pb.VMA_ATTR_RESIDENCY | pb.VMA_ATTR_ACCOUNTING,
}
WORD_GROUP = {word: group for group, words in GROUP_WORDS.items() for word in words}
WORD_GROUP.update(dict.fromkeys(LAYOUT_WORDS, pb.VMA_ATTR_LAYOUT))
ATTR_WORDS = sorted(set(WORD_GROUP) | set(GROUP_NAMES))
# Words whose proto field carries a _bytes suffix.
_NOT_BYTES = {"build_id", "thp_eligible", "vm_flags"}
KIND_NAMES = {pb.VMA_KIND_ANONYMOUS: "anonymous", pb.VMA_KIND_FILE: "file", pb.VMA_KIND_SPECIAL: "special"}
ADVICE_NAMES = {
    "cold": pb.ADVICE_COLD,
    "pageout": pb.ADVICE_PAGEOUT,
    "willneed": pb.ADVICE_WILLNEED,
    "collapse": pb.ADVICE_COLLAPSE,
}
FILTER_NAMES = {"none": pb.FILTER_UNSPECIFIED, "anonymous": pb.FILTER_ANONYMOUS, "file": pb.FILTER_FILE}


def attr_mask(attrs: Sequence[str] | str | int | None) -> int:
    """The VmaAttr mask for attribute words ("rss", "pss", "accounting", ...)."""
    if attrs is None:
        return pb.VMA_ATTR_LAYOUT
    if isinstance(attrs, int):
        return attrs
    if isinstance(attrs, str):
        attrs = [a for a in attrs.split(",") if a.strip()]
    mask = pb.VMA_ATTR_LAYOUT
    for word in attrs:
        word = word.strip().lower()
        if word in GROUP_NAMES:
            mask |= GROUP_NAMES[word]
        elif word in WORD_GROUP:
            mask |= WORD_GROUP[word]
        else:
            raise ValueError(f"unknown attribute {word!r}; known: {', '.join(ATTR_WORDS)}")
    return mask


def words_for_mask(mask: int) -> list[str]:
    return [word for group, words in GROUP_WORDS.items() if mask & group for word in words]


def _field(word: str) -> str:
    return word if word in _NOT_BYTES else f"{word}_bytes"


class _KindNames(dict):
    """KIND_NAMES, with "unknown" for any other value (read in C by map())."""

    def __missing__(self, kind: int) -> str:
        return "unknown"


_KIND_LOOKUP = _KindNames(KIND_NAMES).__getitem__
_GET_KIND = attrgetter("kind")


class Vma:
    """One VMA. Layout fields always; attributes in bytes when they were asked for.

    A view: it holds the reply's message and reads fields on demand. Each
    attribute is a property over ``operator.attrgetter`` (C, no Python frame),
    so iterating 65,530 of them costs little more than iterating the messages.
    """

    __slots__ = ("_m",)

    def __init__(self, message: pb.Vma) -> None:
        self._m = message

    start = property(attrgetter("_m.start"))
    end = property(attrgetter("_m.end"))
    perms = property(attrgetter("_m.perms"))
    offset = property(attrgetter("_m.offset"))
    dev_major = property(attrgetter("_m.dev_major"))
    dev_minor = property(attrgetter("_m.dev_minor"))
    inode = property(attrgetter("_m.inode"))
    path = property(attrgetter("_m.path"))

    @property
    def kind(self) -> str:
        return KIND_NAMES.get(self._m.kind, "unknown")

    @property
    def raw_path(self) -> bytes:
        """The exact bytes of the path (differs from ``path`` only for non-UTF-8 names)."""
        return self._m.raw_path or self._m.path.encode()

    @property
    def size(self) -> int:
        return self._m.end - self._m.start

    @property
    def message(self) -> pb.Vma:
        return self._m

    def __repr__(self) -> str:
        return f"Vma(0x{self.start:x}-0x{self.end:x} {self.perms} {self.path!r})"

    def to_json(self, words: Sequence[str]) -> dict:
        m = self._m
        data: dict = {
            "start": m.start,
            "end": m.end,
            "perms": m.perms,
            "offset": m.offset,
            "dev_major": m.dev_major,
            "dev_minor": m.dev_minor,
            "inode": m.inode,
            "path": m.path,
            "kind": self.kind,
        }
        for word in words:
            value = getattr(m, _field(word))
            data[word] = value.hex() if isinstance(value, bytes) else value
        return data


# The attribute words (rss, pss, swap, ...) read their ``_bytes`` fields.
for _word in WORD_GROUP:
    if not hasattr(Vma, _word):
        setattr(Vma, _word, property(attrgetter(f"_m.{_field(_word)}")))
del _word


class VmaList(Sequence[Vma]):
    """A lazy sequence of :class:`Vma` over the reply's repeated field."""

    __slots__ = ("_items",)

    def __init__(self, items: Sequence[pb.Vma]) -> None:
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> Vma: ...
    @overload
    def __getitem__(self, index: slice) -> list[Vma]: ...
    def __getitem__(self, index: int | slice) -> Vma | list[Vma]:
        if isinstance(index, slice):
            return [Vma(m) for m in self._items[index]]
        return Vma(self._items[index])

    def __iter__(self) -> Iterator[Vma]:
        return map(Vma, self._items)

    def column(self, word: str) -> list:
        """Every VMA's ``word`` (``start``, ``end``, ``perms``, ``path``,
        ``kind``, ``rss``, ``pss``, ...: a field of :class:`Vma`), in order,
        read straight from the messages: for a whole column a few times
        cheaper than ``[v.start for v in vmas]``."""
        if word == "kind":
            return list(map(_KIND_LOOKUP, map(_GET_KIND, self._items)))
        if word in LAYOUT_WORDS:
            return list(map(attrgetter(word), self._items))
        if word in WORD_GROUP:
            return list(map(attrgetter(_field(word)), self._items))
        raise ValueError(f"no column {word!r}; known: {', '.join(sorted({*LAYOUT_WORDS, *WORD_GROUP}))}")


@dataclass(frozen=True)
class ProcessRef:
    pid: int
    start_time: int
    comm: str

    @classmethod
    def from_pb(cls, m: pb.Process) -> ProcessRef:
        return cls(m.pid, m.start_time, m.comm)

    def to_json(self) -> dict:
        return {"pid": self.pid, "start_time": self.start_time, "comm": self.comm}


class VmaInfo:
    """GetVmaInfo's answer: ``process``, ``cookie``, ``result_attrs``, ``vmas``."""

    def __init__(self, reply: pb.GetVmaInfoResponse) -> None:
        self.reply = reply
        self.process = ProcessRef.from_pb(reply.process)
        self.cookie: bytes = reply.cookie
        self.result_mask: int = reply.result_mask
        self.result_attrs: list[str] = words_for_mask(reply.result_mask)
        self.vmas = VmaList(reply.vmas)

    @property
    def cookie_b64(self) -> str:
        return base64.b64encode(self.cookie).decode()

    def to_json(self) -> dict:
        words = self.result_attrs
        return {
            "process": self.process.to_json(),
            "cookie": self.cookie_b64,
            "result_attrs": words,
            "vmas": [Vma(m).to_json(words) for m in self.reply.vmas],
        }


class RangeResult:
    """One requested range's outcome: ``start``, ``end``, ``advised_bytes``,
    ``skipped_bytes`` (left out by the filter, or kernel mappings) and
    ``error`` (the errno name that stopped part of it, or ""). A view over
    the reply's message, like :class:`Vma`; equal to another with the same
    values."""

    __slots__ = ("_m",)

    def __init__(self, message: pb.RangeResult) -> None:
        self._m = message

    start = property(attrgetter("_m.start"))
    end = property(attrgetter("_m.end"))
    advised_bytes = property(attrgetter("_m.advised_bytes"))
    skipped_bytes = property(attrgetter("_m.skipped_bytes"))
    error = property(attrgetter("_m.error"))
    errno = property(attrgetter("_m.error_number"))  # the proto field is error_number (C++ has an errno macro)

    @property
    def message(self) -> pb.RangeResult:
        return self._m

    def _values(self) -> tuple[int, int, int, int, str]:
        m = self._m
        return m.start, m.end, m.advised_bytes, m.skipped_bytes, m.error

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeResult) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return (
            f"RangeResult(start=0x{self.start:x}, end=0x{self.end:x}, advised_bytes={self.advised_bytes},"
            f" skipped_bytes={self.skipped_bytes}, error={self.error!r})"
        )

    def to_json(self) -> dict:
        m = self._m
        return {
            "start": m.start,
            "end": m.end,
            "advised_bytes": m.advised_bytes,
            "skipped_bytes": m.skipped_bytes,
            "error": m.error or None,
        }


class RangeResultList(Sequence[RangeResult]):
    """A lazy sequence of :class:`RangeResult` over the reply's repeated field."""

    __slots__ = ("_items",)

    def __init__(self, items: Sequence[pb.RangeResult]) -> None:
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> RangeResult: ...
    @overload
    def __getitem__(self, index: slice) -> list[RangeResult]: ...
    def __getitem__(self, index: int | slice) -> RangeResult | list[RangeResult]:
        if isinstance(index, slice):
            return [RangeResult(m) for m in self._items[index]]
        return RangeResult(self._items[index])

    def __iter__(self) -> Iterator[RangeResult]:
        return map(RangeResult, self._items)


class AdviceResult:
    """AdviseRanges's answer: ``advised_bytes``, ``syscalls``, ``ranges`` (a
    lazy sequence of :class:`RangeResult`: nothing is built per range until
    it is looked at)."""

    def __init__(self, reply: pb.AdviseRangesResponse) -> None:
        self.reply = reply
        self.process = ProcessRef.from_pb(reply.process)
        self.requested_bytes: int = reply.requested_bytes
        self.advised_bytes: int = reply.advised_bytes
        self.syscalls: int = reply.syscalls
        self.dry_run: bool = reply.dry_run
        self.ranges = RangeResultList(reply.ranges)

    def to_json(self) -> dict:
        return {
            "process": self.process.to_json(),
            "requested_bytes": self.requested_bytes,
            "advised_bytes": self.advised_bytes,
            "syscalls": self.syscalls,
            "dry_run": self.dry_run,
            "ranges": [r.to_json() for r in self.ranges],
        }


class ProcessInfo:
    """One ListProcesses entry: identity, cgroup, and a cheap rollup in bytes
    (``rss``, ``swap``). Every field of the message reads through as well."""

    __slots__ = ("_m",)

    def __init__(self, message: pb.ProcessInfo) -> None:
        self._m = message

    pid = property(attrgetter("_m.pid"))
    start_time = property(attrgetter("_m.start_time"))
    comm = property(attrgetter("_m.comm"))
    cgroup = property(attrgetter("_m.cgroup"))
    container_id = property(attrgetter("_m.container_id"))
    uid = property(attrgetter("_m.uid"))
    ppid = property(attrgetter("_m.ppid"))
    rss = property(attrgetter("_m.rss_bytes"))
    swap = property(attrgetter("_m.swap_bytes"))
    vma_count = property(attrgetter("_m.vma_count"))

    @property
    def message(self) -> pb.ProcessInfo:
        return self._m

    def __getattr__(self, name: str) -> object:
        return getattr(self._m, name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProcessInfo) and self._m == other._m

    __hash__ = None  # type: ignore[assignment]  # mutable underneath, like the message

    def __repr__(self) -> str:
        return f"ProcessInfo(pid={self.pid}, comm={self.comm!r}, cgroup={self.cgroup!r})"

    def to_json(self) -> dict:
        return {
            "pid": self.pid,
            "start_time": self.start_time,
            "comm": self.comm,
            "cgroup": self.cgroup,
            "container_id": self.container_id,
            "uid": self.uid,
            "ppid": self.ppid,
            "rss": self.rss,
            "swap": self.swap,
            "vma_count": self.vma_count,
        }


class NodeInfo:
    """GetNodeInfo's answer, with sizes in bytes under short names
    (``mem_total``, ``swap_free``, ...), ``advice_names``, and ``to_json``.
    Every field of the message reads through (``capabilities``, ``boot_id``)."""

    def __init__(self, reply: pb.GetNodeInfoResponse) -> None:
        self.reply = reply

    mem_total = property(attrgetter("reply.mem_total_bytes"))
    mem_available = property(attrgetter("reply.mem_available_bytes"))
    swap_total = property(attrgetter("reply.swap_total_bytes"))
    swap_free = property(attrgetter("reply.swap_free_bytes"))

    @property
    def advice_names(self) -> list[str]:
        """The advices this kernel accepts, by name ("cold", "pageout", ...)."""
        return [pb.Advice.Name(a).removeprefix("ADVICE_").lower() for a in self.reply.capabilities.advices]

    @property
    def memory_pressure(self) -> dict[str, dict[str, float]] | None:
        """Memory PSI as {"some": {"avg10", "avg60", "avg300", "total_us"}, "full": {...}}, or None."""
        if not self.reply.HasField("memory_pressure"):
            return None
        return {
            kind: {"avg10": stall.avg10, "avg60": stall.avg60, "avg300": stall.avg300, "total_us": stall.total_us}
            for kind in ("some", "full")
            for stall in [getattr(self.reply.memory_pressure, kind)]
        }

    def __getattr__(self, name: str) -> object:
        return getattr(self.reply, name)

    def to_json(self) -> dict:
        info, caps = self.reply, self.reply.capabilities
        data: dict = {
            "hostname": info.hostname,
            "kernel": info.kernel,
            "machine": info.machine,
            "boot_id": info.boot_id,
            "agent_version": info.agent_version,
            "page_size": info.page_size,
            "mem_total": self.mem_total,
            "mem_available": self.mem_available,
            "swap_total": self.swap_total,
            "swap_free": self.swap_free,
            "capabilities": {
                "pidfd_open": caps.pidfd_open,
                "process_madvise": caps.process_madvise,
                "advices": self.advice_names,
                "procmap_query": caps.procmap_query,
                "pagemap_scan": caps.pagemap_scan,
                "advice_permitted": caps.advice_permitted,
                "probe_errors": dict(caps.probe_errors),
            },
        }
        pressure = self.memory_pressure
        if pressure is not None:
            data["memory_pressure"] = pressure
        return data

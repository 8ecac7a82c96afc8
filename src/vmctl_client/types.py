"""Typed results: thin views over the protobuf replies.

A 65,530-VMA snapshot is one protobuf message; :class:`VmaList` wraps its
entries lazily, so nothing is built per VMA until it is looked at, and
:meth:`VmaList.column` reads one attribute of every VMA without a view at all.
AdviseRanges's per-range results are lazy the same way (:class:`RangeResultList`).
Attributes are named by lowercase words (``rss``, ``pss``, ``swap``) in bytes;
the words, groups, advice and filter names are :mod:`vmctl_api.words`'.

Every field of a view is declared with its type (``rss: int``), so type
checkers and IDEs see it, and reads its message field through a C getter
(:func:`_reads`), so a declared field costs no more than the message's own.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Literal, overload

from vmctl_api import vmctl_pb2 as pb
from vmctl_api.words import (
    ADVICE_BY_NUMBER,
    ADVICES,
    ATTR_LAYOUT,
    FILTERS,
    GROUP_WORDS,
    GROUPS,
    KIND_NAMES,
    SCOPE_BY_NUMBER,
    VMA_FIELDS,
    WORD_GROUP,
    Attr,
    AttrWord,
    Kind,
)

LAYOUT_WORDS = GROUP_WORDS[ATTR_LAYOUT]
# The VmaAttr bits of each word and group, by the names attr_mask takes.
_MASKS: dict[str, int] = {name: bits for table in (WORD_GROUP, GROUPS) for name, bits in table.items()}
ATTR_WORDS: list[str] = sorted(_MASKS)
# The proto's numbers by the names the library and the CLI take.
ADVICE_NAMES: dict[str, int] = {name: numbers.number for name, numbers in ADVICES.items()}
FILTER_NAMES: dict[str, int] = {name: kinds.number for name, kinds in FILTERS.items()}


def attr_mask(attrs: Iterable[Attr] | Attr | str | int | None) -> int:
    """The VmaAttr mask for attribute words ("rss", "pss", "accounting", ...),
    or for a comma-separated list of them (as the CLI takes them)."""
    if attrs is None:
        return ATTR_LAYOUT
    if isinstance(attrs, int):
        return attrs
    words: Iterable[str] = [a for a in attrs.split(",") if a.strip()] if isinstance(attrs, str) else attrs
    mask = ATTR_LAYOUT
    for word in words:
        try:
            mask |= _MASKS[word.strip().lower()]
        except KeyError:
            raise ValueError(f"unknown attribute {word.strip()!r}; known: {', '.join(ATTR_WORDS)}") from None
    return mask


def words_for_mask(mask: int) -> list[AttrWord]:
    """The words the groups of ``mask`` fill, beyond the layout every VMA has."""
    return [word for group, words in GROUP_WORDS.items() if group != ATTR_LAYOUT and mask & group for word in words]


def _reads(path: str) -> Any:
    """A read-only attribute reading ``path`` (``"_m.rss_bytes"``) with
    ``operator.attrgetter``: a property over a C function, so reading it runs
    no Python frame. Typed ``Any`` so that the annotation it is assigned to
    (``rss: int = ...``) is the type checkers see."""
    return property(attrgetter(path))


def _field(word: AttrWord) -> Any:
    """The attribute of a :class:`Vma` that reads ``word``'s message field."""
    return _reads(f"_m.{VMA_FIELDS[word]}")


class _KindNames(dict[int, Kind | Literal["unknown"]]):
    """KIND_NAMES, with "unknown" for any other value."""

    def __missing__(self, kind: int) -> Literal["unknown"]:
        return "unknown"


_KIND_LOOKUP = _KindNames(KIND_NAMES).__getitem__  # for a column: called in C by map()
_GET_KIND = attrgetter("kind")
# For one view: bound once, because CPython 3.11 compiles a method call through
# an imported name (KIND_NAMES.get(...)) into an attribute load and a new bound
# method per call, a fifth slower per VMA; dict.get is the fastest call there is.
_KIND_NAME = KIND_NAMES.get


class Vma:
    """One VMA. Layout fields always; attributes in bytes when they were asked for.

    A view: it holds the reply's message and reads fields on demand, each
    through a C getter, so iterating 65,530 of them costs little more than
    iterating the messages.
    """

    __slots__ = ("_m",)

    def __init__(self, message: pb.Vma) -> None:
        self._m = message

    # layout
    start: int = _field("start")
    end: int = _field("end")
    perms: str = _field("perms")
    offset: int = _field("offset")
    dev_major: int = _field("dev_major")
    dev_minor: int = _field("dev_minor")
    inode: int = _field("inode")
    path: str = _field("path")
    # build_id
    build_id: bytes = _field("build_id")
    # residency
    rss: int = _field("rss")
    swap: int = _field("swap")
    # accounting
    pss: int = _field("pss")
    pss_dirty: int = _field("pss_dirty")
    referenced: int = _field("referenced")
    anonymous: int = _field("anonymous")
    shared_clean: int = _field("shared_clean")
    shared_dirty: int = _field("shared_dirty")
    private_clean: int = _field("private_clean")
    private_dirty: int = _field("private_dirty")
    ksm: int = _field("ksm")
    lazy_free: int = _field("lazy_free")
    anon_huge_pages: int = _field("anon_huge_pages")
    shmem_pmd_mapped: int = _field("shmem_pmd_mapped")
    file_pmd_mapped: int = _field("file_pmd_mapped")
    shared_hugetlb: int = _field("shared_hugetlb")
    private_hugetlb: int = _field("private_hugetlb")
    swap_pss: int = _field("swap_pss")
    locked: int = _field("locked")
    kernel_page_size: int = _field("kernel_page_size")
    mmu_page_size: int = _field("mmu_page_size")
    thp_eligible: bool = _field("thp_eligible")
    vm_flags: str = _field("vm_flags")
    # access (sampled over a window)
    accessed: int = _field("accessed")

    @property
    def kind(self) -> Kind | Literal["unknown"]:
        return _KIND_NAME(self._m.kind, "unknown")

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

    def to_json(self, words: Sequence[AttrWord]) -> dict[str, Any]:
        m = self._m
        data: dict[str, Any] = {
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
            value = getattr(m, VMA_FIELDS[word])
            data[word] = value.hex() if isinstance(value, bytes) else value
        return data


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

    def column(self, word: AttrWord) -> list[Any]:
        """Every VMA's ``word`` (``start``, ``end``, ``perms``, ``path``,
        ``kind``, ``rss``, ``pss``, ...: a field of :class:`Vma`), in order,
        read straight from the messages: for a whole column a few times
        cheaper than ``[v.start for v in vmas]``."""
        if word == "kind":
            return list(map(_KIND_LOOKUP, map(_GET_KIND, self._items)))
        if word in VMA_FIELDS:
            return list(map(attrgetter(VMA_FIELDS[word]), self._items))
        raise ValueError(f"no column {word!r}; known: {', '.join(sorted(VMA_FIELDS))}")


@dataclass(frozen=True)
class ProcessRef:
    pid: int
    start_time: int
    comm: str

    @classmethod
    def from_pb(cls, m: pb.Process) -> ProcessRef:
        return cls(m.pid, m.start_time, m.comm)

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_time": self.start_time, "comm": self.comm}


class VmaInfo:
    """GetVmaInfo's answer: ``process``, ``cookie``, ``result_attrs``, ``vmas``."""

    def __init__(self, reply: pb.GetVmaInfoResponse) -> None:
        self.reply = reply
        self.process = ProcessRef.from_pb(reply.process)
        self.cookie: bytes = reply.cookie
        self.result_mask: int = reply.result_mask
        self.result_attrs: list[AttrWord] = words_for_mask(reply.result_mask)
        self.vmas = VmaList(reply.vmas)

    @property
    def cookie_b64(self) -> str:
        return base64.b64encode(self.cookie).decode()

    def to_json(self) -> dict[str, Any]:
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

    start: int = _reads("_m.start")
    end: int = _reads("_m.end")
    advised_bytes: int = _reads("_m.advised_bytes")
    skipped_bytes: int = _reads("_m.skipped_bytes")
    error: str = _reads("_m.error")
    errno: int = _reads("_m.error_number")  # the proto field is error_number (C++ has an errno macro)
    reason: str = _reads("_m.reason")  # "RANGE_CHANGED": left out by scope "ranges", not advised; or ""

    @property
    def message(self) -> pb.RangeResult:
        return self._m

    def _values(self) -> tuple[int, int, int, int, str, str]:
        m = self._m
        return m.start, m.end, m.advised_bytes, m.skipped_bytes, m.error, m.reason

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeResult) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return (
            f"RangeResult(start=0x{self.start:x}, end=0x{self.end:x}, advised_bytes={self.advised_bytes},"
            f" skipped_bytes={self.skipped_bytes}, error={self.error!r}"
            + (f", reason={self.reason!r})" if self.reason else ")")
        )

    def to_json(self) -> dict[str, Any]:
        m = self._m
        return {
            "start": m.start,
            "end": m.end,
            "advised_bytes": m.advised_bytes,
            "skipped_bytes": m.skipped_bytes,
            "error": m.error or None,
            "reason": m.reason or None,
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
        # The scope the agent applied ("whole" for an agent older than scopes), how many ranges it
        # left out as RANGE_CHANGED, and whether "ranges" fell back to "whole" (snapshot not cached).
        self.scope: str = SCOPE_BY_NUMBER.get(reply.scope, "whole")
        self.changed_ranges: int = reply.changed_ranges
        self.scope_fallback: bool = reply.scope_fallback

    def to_json(self) -> dict[str, Any]:
        return {
            "process": self.process.to_json(),
            "requested_bytes": self.requested_bytes,
            "advised_bytes": self.advised_bytes,
            "syscalls": self.syscalls,
            "dry_run": self.dry_run,
            "scope": self.scope,
            "scope_fallback": self.scope_fallback,
            "changed_ranges": self.changed_ranges,
            "ranges": [r.to_json() for r in self.ranges],
        }


Pressure = dict[str, dict[str, float]]
"""Memory PSI: {"some": {"avg10", "avg60", "avg300", "total_us"}, "full": {...}}."""


def _pressure(message: pb.MemoryPressure) -> Pressure:
    return {
        kind: {"avg10": stall.avg10, "avg60": stall.avg60, "avg300": stall.avg300, "total_us": stall.total_us}
        for kind in ("some", "full")
        for stall in [getattr(message, kind)]
    }


_NO_PRESSURE: Mapping[str, pb.MemoryPressure] = {}


class ProcessInfo:
    """One ListProcesses entry: identity, cgroup, a cheap rollup in bytes
    (``rss``, ``swap``), activity (``cpu_time_ns``, ``major_faults``: compare
    two samples) and its cgroup's ``cgroup_memory_pressure``; ``vma_count`` is
    0 unless the call asked for it (``list_processes(vma_count=True)``). Every field of
    the message reads through as well, under its own name (``rss_bytes``)."""

    __slots__ = ("_m", "_pressures")

    def __init__(self, message: pb.ProcessInfo, pressures: Mapping[str, pb.MemoryPressure] = _NO_PRESSURE) -> None:
        self._m = message
        self._pressures = pressures  # the reply's, by cgroup: shared by every process of one cgroup

    pid: int = _reads("_m.pid")
    start_time: int = _reads("_m.start_time")
    comm: str = _reads("_m.comm")
    cgroup: str = _reads("_m.cgroup")
    container_id: str = _reads("_m.container_id")
    uid: int = _reads("_m.uid")
    ppid: int = _reads("_m.ppid")
    rss: int = _reads("_m.rss_bytes")
    swap: int = _reads("_m.swap_bytes")
    vma_count: int = _reads("_m.vma_count")
    cpu_time_ns: int = _reads("_m.cpu_time_ns")
    major_faults: int = _reads("_m.major_faults")

    @property
    def cgroup_memory_pressure(self) -> Pressure | None:
        """The memory PSI of the process's cgroup, as :attr:`NodeInfo.memory_pressure`
        gives the host's; None when the agent had none to read (no PSI, no
        cgroup v2, or an agent older than this field)."""
        message = self._pressures.get(self._m.cgroup)
        return None if message is None else _pressure(message)

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

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "pid": self.pid,
            "start_time": self.start_time,
            "comm": self.comm,
            "cgroup": self.cgroup,
            "container_id": self.container_id,
            "uid": self.uid,
            "ppid": self.ppid,
            "rss": self.rss,
            "swap": self.swap,
            "vma_count": self.vma_count or None,  # 0: not counted (not asked for)
            "cpu_time_ns": self.cpu_time_ns,
            "major_faults": self.major_faults,
        }
        pressure = self.cgroup_memory_pressure
        if pressure is not None:
            data["cgroup_memory_pressure"] = pressure
        return data


class NodeInfo:
    """GetNodeInfo's answer, with sizes in bytes under short names
    (``mem_total``, ``swap_free``, ...), ``advice_names``, and ``to_json``.
    Every field of the message reads through under its own name as well
    (``mem_total_bytes``)."""

    __slots__ = ("reply",)

    def __init__(self, reply: pb.GetNodeInfoResponse) -> None:
        self.reply = reply

    hostname: str = _reads("reply.hostname")
    kernel: str = _reads("reply.kernel")
    machine: str = _reads("reply.machine")
    boot_id: str = _reads("reply.boot_id")
    agent_version: str = _reads("reply.agent_version")
    page_size: int = _reads("reply.page_size")
    mem_total: int = _reads("reply.mem_total_bytes")
    mem_available: int = _reads("reply.mem_available_bytes")
    swap_total: int = _reads("reply.swap_total_bytes")
    swap_free: int = _reads("reply.swap_free_bytes")
    capabilities: pb.Capabilities = _reads("reply.capabilities")

    @property
    def advice_names(self) -> list[str]:
        """The advices this kernel accepts, by name ("cold", "pageout", ...;
        the number of one newer than this client)."""
        return [ADVICE_BY_NUMBER.get(a, str(a)) for a in self.reply.capabilities.advices]

    @property
    def memory_pressure(self) -> Pressure | None:
        """Memory PSI as {"some": {"avg10", "avg60", "avg300", "total_us"}, "full": {...}}, or None."""
        if not self.reply.HasField("memory_pressure"):
            return None
        return _pressure(self.reply.memory_pressure)

    def __getattr__(self, name: str) -> object:
        return getattr(self.reply, name)

    def to_json(self) -> dict[str, Any]:
        info, caps = self.reply, self.reply.capabilities
        data: dict[str, Any] = {
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
                "access_sampling": caps.access_sampling,
                "probe_errors": dict(caps.probe_errors),
            },
        }
        pressure = self.memory_pressure
        if pressure is not None:
            data["memory_pressure"] = pressure
        return data

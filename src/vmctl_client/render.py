"""What the command line prints: documents (JSON, YAML) of each result's own
``to_json``, and tables for people, with human sizes and aligned columns,
one function per command. ``wide`` tables add the columns a terminal line
usually has no room for.

Addresses in tables are hex with ``0x``, ranges ``START-END``: exactly what
``vmctl advise --range`` takes back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vmctl_api.words import GROUPS
from vmctl_client.reclaim import ReclaimReport
from vmctl_client.types import AdviceResult, NodeInfo, ProcessInfo, Vma, VmaInfo, words_for_mask

_UNITS = ("B", "K", "M", "G", "T")


def human_bytes(n: int) -> str:
    """1536 -> "1.5K"; binary units, as ps and free print them."""
    value = float(n)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def document(data: dict[str, Any], output: str) -> str:
    """``data`` as JSON or YAML (the same keys and values: YAML is for people
    who read it; JSON for programs)."""
    if output == "yaml":
        import yaml  # only here: a few tens of milliseconds nobody else should pay

        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml when present: 65,530 VMAs in a blink
        text: str = yaml.dump(data, Dumper=dumper, sort_keys=False, allow_unicode=True, width=1 << 16)
        return text.rstrip("\n")
    return json.dumps(data, indent=2)


def address_range(start: int, end: int) -> str:
    return f"0x{start:x}-0x{end:x}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            last = i == len(cells) - 1
            out.append(cell.rjust(widths[i]) if right[i] else (cell if last else cell.ljust(widths[i])))
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


# Columns a maps table shows for a group asked for by name; -o wide shows every
# word of the group, and -o json all that was read.
_TABLE_GROUP_WORDS = {
    "residency": ("rss", "swap"),
    "access": ("rss", "accessed"),
    "accounting": ("rss", "pss", "swap", "anonymous", "referenced"),
    "all": ("rss", "pss", "swap", "anonymous", "referenced"),
}
# Words that are not byte counts: too wide for the table (build_id, vm_flags)
# or not sizes at all; -o wide shows them.
_NOT_SIZES = ("vm_flags", "build_id", "thp_eligible")
_NAMED_HIDDEN = 6  # a table's note names this many attributes it leaves out, then counts the rest


def _asked_words(attrs: str | None, wide: bool) -> list[str]:
    """The attribute words ``--attrs`` named, groups spelled out (in a table
    as its short list, in a wide table whole), in order, without repeats."""
    asked: list[str] = []
    for word in filter(None, (attrs or "").split(",")):
        if word not in GROUPS:
            asked.append(word)
        elif wide:
            asked += words_for_mask(GROUPS[word])
        else:
            asked += _TABLE_GROUP_WORDS.get(word, ())
    return list(dict.fromkeys(asked))


def _attribute_cell(vma: Vma, word: str) -> str:
    value = getattr(vma, word)
    if word == "build_id":
        return value.hex() or "-"
    if word == "vm_flags":
        return ",".join(value.split()) or "-"  # one cell, as the kernel's two-letter codes
    if word == "thp_eligible":
        return "yes" if value else "no"
    return human_bytes(value)


def maps_table(info: VmaInfo, attrs: str | None, wide: bool = False) -> str:
    filled = set(info.result_attrs)
    words = [w for w in _asked_words(attrs, wide) if w in filled and (wide or w not in _NOT_SIZES)]
    headers = ["RANGE", "PERMS", "OFFSET", "DEV", "INODE", *(w.upper() for w in words), "PATH"]
    rows = [
        [
            address_range(vma.start, vma.end),
            vma.perms,
            f"0x{vma.offset:x}",
            f"{vma.dev_major:02x}:{vma.dev_minor:02x}",
            str(vma.inode),
            *(_attribute_cell(vma, w) for w in words),
            vma.path,
        ]
        for vma in info.vmas
    ]
    right = [False, False, False, False, True, *(w not in ("build_id", "vm_flags") for w in words), False]
    head = [
        f"pid {info.process.pid} ({info.process.comm}), start time {info.process.start_time},"
        f" {len(info.vmas)} VMAs, attrs: {', '.join(['layout', *info.result_attrs])}",
        f"cookie {info.cookie_b64}",
    ]
    hidden = [w for w in _asked_words(attrs, True) if w in filled and w not in words]
    if hidden:
        named = ", ".join(hidden[:_NAMED_HIDDEN]) + (
            f" and {len(hidden) - _NAMED_HIDDEN} more" if len(hidden) > _NAMED_HIDDEN else ""
        )
        head.append(f"not in this table: {named} (use -o wide, or -o json for every value)")
    return "\n".join([*head, format_table(headers, rows, right)])


def failed_ranges(result: AdviceResult) -> int:
    return sum(1 for r in result.ranges if r.error)


@dataclass(frozen=True)
class AdviseReport:
    """`vmctl advise`'s result: the reply, and the process's rss and swap before and after it (the
    residency tier: PAGEMAP_SCAN, which does not see shared memory in swap)."""

    result: AdviceResult
    rss_before: int
    swap_before: int
    rss_after: int
    swap_after: int


def advise_table(report: AdviseReport) -> str:
    result = report.result
    verb = "would advise" if result.dry_run else "advised"
    failed = failed_ranges(result)
    changed = result.changed_ranges
    head = (
        f"pid {result.process.pid} ({result.process.comm}): {verb} {human_bytes(result.advised_bytes)}"
        f" of {human_bytes(result.requested_bytes)} requested in {result.syscalls} process_madvise call(s)"
        + (f"; {failed} of {len(result.ranges)} range(s) FAILED" if failed else "")
        + (f"; {changed} range(s) CHANGED since the cookie, not advised: read again" if changed else "")
    )
    rows = [
        [
            address_range(r.start, r.end),
            human_bytes(r.advised_bytes),
            human_bytes(r.skipped_bytes),
            r.error or r.reason or "-",
        ]
        for r in result.ranges
    ]
    table = format_table(["RANGE", "ADVISED", "SKIPPED", "ERROR"], rows, [False, True, True, False])
    fallback = " (ranges asked; the agent no longer had the cookie's snapshot)" if result.scope_fallback else ""
    scope = result.scope + fallback
    foot = (
        f"scope {scope}; rss {human_bytes(report.rss_before)} -> {human_bytes(report.rss_after)},"
        f" swap {human_bytes(report.swap_before)} -> {human_bytes(report.swap_after)}"
    )
    return f"{head}\n{table}\n{foot}"


def cpu_seconds(ns: int) -> str:
    """CPU time as seconds to the kernel's tick (10 ms at USER_HZ 100)."""
    return f"{ns / 1e9:.2f}s"


def pressure_cell(pressure: dict[str, dict[str, float]] | None) -> str:
    """A cgroup's memory pressure, "some" averaged over 10 s, in percent; "-" when unknown."""
    return "-" if pressure is None else f"{pressure['some']['avg10']:.2f}"


def ps_table(processes: Sequence[ProcessInfo], wide: bool = False) -> str:
    # VMAS only where counted (-o wide, --vma-count): the agent reads every whole maps file for it.
    counted = wide or any(p.vma_count for p in processes)
    headers = ["PID", "COMM", "RSS", "SWAP", "CGROUP"]
    right = [True, False, True, True, False]
    if counted:
        headers[4:4] = ["VMAS"]
        right[4:4] = [True]
    if wide:
        headers[-1:-1] = ["UID", "PPID", "START_TIME", "CONTAINER", "CPU", "MAJFLT", "CG_PSI10"]
        right[-1:-1] = [True, True, True, False, True, True, True]
    rows = []
    for p in processes:
        row = [str(p.pid), p.comm, human_bytes(p.rss), human_bytes(p.swap), p.cgroup]
        if counted:
            row[4:4] = [str(p.vma_count)]
        if wide:
            row[-1:-1] = [
                str(p.uid),
                str(p.ppid),
                str(p.start_time),
                p.container_id or "-",
                cpu_seconds(p.cpu_time_ns),
                str(p.major_faults),
                pressure_cell(p.cgroup_memory_pressure),
            ]
        rows.append(row)
    return format_table(headers, rows, right)


def node_table(info: NodeInfo) -> str:
    data = info.to_json()
    caps = data.pop("capabilities")
    pressure = data.pop("memory_pressure", None)
    lines = [f"{key}: {human_bytes(v) if key.startswith(('mem_', 'swap_')) else v}" for key, v in data.items()]
    if pressure is not None:
        some = pressure["some"]
        lines.append(f"memory pressure (some): avg10={some['avg10']} avg60={some['avg60']} avg300={some['avg300']}")
    flags = ("pidfd_open", "process_madvise", "procmap_query", "pagemap_scan", "advice_permitted")
    present = [name for name in flags if caps[name]] + [f"advice={a}" for a in caps["advices"]]
    lines.append("capabilities: " + ", ".join(present))
    lines.append(f"access sampling: {caps['access_sampling'] or 'unavailable'}")
    lines += [f"  probe {name}: {why}" for name, why in caps["probe_errors"].items()]
    return "\n".join(lines)


def reclaim_table(report: ReclaimReport, wide: bool = False) -> str:
    data = report.to_json()
    verb = "would advise" if report.dry_run else "advised"
    if report.cgroup is not None and not report.processes:
        return (
            f"cgroup {report.cgroup}: no process in it or below it on this node (no such cgroup, or it is empty);"
            " nothing to do"
        )
    scope = (
        f"cgroup {report.cgroup}: {len(report.processes)} process(es)"
        if report.cgroup is not None
        else f"pid {report.processes[0].pid}"
    )
    headers = ["PID", "COMM", "STATUS", "TRIES", "ADVISED", "CALLS", "RSS", "SWAP"]
    right = [True, False, False, True, True, True, True, True]
    if wide:
        headers[6:6] = ["START_TIME", "VMAS", "REQUESTED", "FAILED"]
        right[6:6] = [True, True, True, True]
    rows = []
    for p in report.processes:
        reason = f" {p.error.reason or p.error.code}" if p.error else ""
        row = [
            str(p.pid),
            p.comm,
            p.status + reason,
            str(p.attempts),
            human_bytes(p.advised_bytes),
            str(p.syscalls),
            f"{human_bytes(p.rss_before)} -> {human_bytes(p.rss_after)}",
            f"{human_bytes(p.swap_before)} -> {human_bytes(p.swap_after)}",
        ]
        if wide:
            row[6:6] = [str(p.start_time), str(p.vmas_chosen), human_bytes(p.requested_bytes), str(p.failed_ranges)]
        rows.append(row)
    failed = report.failed_ranges
    foot = (
        f"{scope}, {report.advice} ({report.filter}): {verb}"
        f" {human_bytes(report.advised_bytes)} of {human_bytes(report.requested_bytes)} requested in"
        f" {report.syscalls} process_madvise call(s)"
        + (f", {failed} range(s) refused by the kernel" if failed else "")
        + f"; rss {human_bytes(data['rss_before'])} -> {human_bytes(data['rss_after'])},"
        f" swap {human_bytes(data['swap_before'])} -> {human_bytes(data['swap_after'])}"
    )
    return f"{format_table(headers, rows, right)}\n{foot}"

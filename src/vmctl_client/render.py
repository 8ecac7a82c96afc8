"""Tables for people: human sizes, aligned columns, one function per command.
(JSON comes from each result's own ``to_json``.)"""

from __future__ import annotations

from collections.abc import Sequence

from vmctl_client.reclaim import ReclaimReport
from vmctl_client.types import AdviceResult, NodeInfo, ProcessInfo, VmaInfo

_UNITS = ("B", "K", "M", "G", "T")


def human_bytes(n: int) -> str:
    """1536 -> "1.5K"; binary units, as ps and free print them."""
    value = float(n)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            last = i == len(cells) - 1
            out.append(cell.rjust(widths[i]) if right[i] else (cell if last else cell.ljust(widths[i])))
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


# Columns a maps table shows for a group asked for by name (JSON has them all).
_TABLE_GROUP_WORDS = {
    "residency": ("rss", "swap"),
    "accounting": ("rss", "pss", "swap", "anonymous", "referenced"),
    "all": ("rss", "pss", "swap", "anonymous", "referenced"),
}
_NOT_SIZES = ("vm_flags", "build_id", "thp_eligible")


def maps_table(info: VmaInfo, attrs: str | None) -> str:
    asked: list[str] = []
    for word in (attrs or "").split(","):
        word = word.strip().lower()
        asked += _TABLE_GROUP_WORDS.get(word, (word,))
    sizes = [w for w in info.result_attrs if w not in _NOT_SIZES]
    words = [w for w in dict.fromkeys(asked) if w in sizes]
    headers = ["START", "END", "PERMS", "OFFSET", "DEV", "INODE", *(w.upper() for w in words), "PATH"]
    rows = [
        [
            f"{vma.start:x}",
            f"{vma.end:x}",
            vma.perms,
            f"{vma.offset:x}",
            f"{vma.dev_major:02x}:{vma.dev_minor:02x}",
            str(vma.inode),
            *(human_bytes(getattr(vma, w)) for w in words),
            vma.path,
        ]
        for vma in info.vmas
    ]
    right = [False, False, False, False, False, True, *([True] * len(words)), False]
    head = (
        f"pid {info.process.pid} ({info.process.comm}), start time {info.process.start_time},"
        f" {len(info.vmas)} VMAs, attrs: {', '.join(['layout', *info.result_attrs])}\n"
        f"cookie {info.cookie_b64}\n"
    )
    return head + format_table(headers, rows, right)


def advise_table(result: AdviceResult) -> str:
    verb = "would advise" if result.dry_run else "advised"
    head = (
        f"pid {result.process.pid} ({result.process.comm}): {verb} {human_bytes(result.advised_bytes)}"
        f" of {human_bytes(result.requested_bytes)} requested in {result.syscalls} process_madvise call(s)\n"
    )
    rows = [
        [f"{r.start:x}", f"{r.end:x}", human_bytes(r.advised_bytes), human_bytes(r.skipped_bytes), r.error or "-"]
        for r in result.ranges
    ]
    return head + format_table(["START", "END", "ADVISED", "SKIPPED", "ERROR"], rows, [False, False, True, True, False])


def ps_table(processes: Sequence[ProcessInfo]) -> str:
    rows = [
        [str(p.pid), p.comm, human_bytes(p.rss), human_bytes(p.swap), str(p.vma_count), p.cgroup] for p in processes
    ]
    return format_table(["PID", "COMM", "RSS", "SWAP", "VMAS", "CGROUP"], rows, [True, False, True, True, True, False])


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
    lines += [f"  probe {name}: {why}" for name, why in caps["probe_errors"].items()]
    return "\n".join(lines)


def reclaim_table(report: ReclaimReport) -> str:
    data = report.to_json()
    verb = "would advise" if report.dry_run else "advised"
    count = len(report.processes)
    scope = (
        f"cgroup {report.cgroup}: {count} process(es)"
        if report.cgroup is not None
        else f"pid {report.processes[0].pid}"
    )
    rows = []
    for p in report.processes:
        reason = f" {p.error.reason or p.error.code}" if p.error else ""
        rows.append(
            [
                str(p.pid),
                p.comm,
                p.status + reason,
                str(p.attempts),
                human_bytes(p.advised_bytes),
                str(p.syscalls),
                f"{human_bytes(p.rss_before)} -> {human_bytes(p.rss_after)}",
                f"{human_bytes(p.swap_before)} -> {human_bytes(p.swap_after)}",
            ]
        )
    table = format_table(
        ["PID", "COMM", "STATUS", "TRIES", "ADVISED", "CALLS", "RSS", "SWAP"],
        rows,
        [True, False, False, True, True, True, True, True],
    )
    foot = (
        f"{scope}, {report.advice} ({report.filter}): {verb}"
        f" {human_bytes(report.advised_bytes)} of {human_bytes(report.requested_bytes)} requested in"
        f" {report.syscalls} process_madvise call(s);"
        f" rss {human_bytes(data['rss_before'])} -> {human_bytes(data['rss_after'])},"
        f" swap {human_bytes(data['swap_before'])} -> {human_bytes(data['swap_after'])}"
    )
    return f"{table}\n{foot}"

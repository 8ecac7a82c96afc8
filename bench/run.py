"""make bench: vmctl's costs beside the kernel's own, measured in one run.

Builds its targets (a system_server-sized process of 4,204 VMAs, one at
vm.max_map_count less some headroom, a small one for the load test), starts
its own agent on a private unix socket and a zram swap device, times every
variant interleaved (see measure.interleaved), prints one table with the
goals under it, and writes bench/results.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import grpc
import harness  # first: it puts tests/ on the path, for support.*
import measure
import psutil
from measure import Floor, Iovecs, Samples, Variant, agent_cpu_ns, interleaved, iqr, percentile
from support.agents import write_policy
from support.processes import status_field, status_kb
from support.waiting import wait_for
from support.zram import zram_swap_device

from vmctl_api import vmctl_pb2, vmctl_pb2_grpc
from vmctl_client import Client

SYSTEM_SERVER_VMAS = 4204
MAX_VMAS = 65530
HEADROOM = 40  # VMAs the target's interpreter may still need after it is built
SMALL_VMAS = 400
ACCOUNTING = ("rss", "pss", "swap", "referenced", "anonymous")
RESIDENCY = ("rss", "swap")
RESULTS = harness.BENCH / "results.json"
IDLE_SECONDS = 1.5  # after the last call, before the agent's RSS is read again
MADV_COLD = 20
FLOOR_SOURCE = harness.BENCH / "floor.c"
# AdviseRanges' scope (SCOPE_RANGES: check only the ranges, not the whole layout), where the client has it.
HAS_SCOPE = "scope" in inspect.signature(Client.advise_ranges).parameters


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9, help="rounds of the reads and of the 4,204-VMA pageout (9)")
    parser.add_argument("--big-reps", type=int, default=5, help="rounds of the ~65,530-VMA pageout (default 5)")
    parser.add_argument(
        "--big-vmas", type=int, help="VMAs of the big target (default: min(65,530, max_map_count) - 40)"
    )
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients in the load test (default 16)")
    parser.add_argument("--load-seconds", type=float, default=10.0, help="length of the load test (default 10)")
    parser.add_argument(
        "--transport-clients", type=int, default=64, help="clients of the unix-vs-TCP comparison (default 64; 0: skip)"
    )
    parser.add_argument(
        "--transport-seconds", type=float, default=4.0, help="length of each of its four phases (default 4)"
    )
    parser.add_argument("--no-pageout", action="store_true", help="skip the pageout cases (and the zram device)")
    parser.add_argument("--no-strace", action="store_true", help="skip counting the agent's calls with strace")
    parser.add_argument("--json", type=pathlib.Path, default=RESULTS, help=f"results file (default {RESULTS})")
    return parser.parse_args()


def c_floor(floor: Floor, name: str, *command: object, fact: str = "value") -> Variant:
    """A floor the C helper measures: its own time of the work, its value as a fact."""

    def run(_: object) -> dict:
        seconds, value = floor(*command)
        if value < 0:
            raise OSError(-value, f"bench/floor.c {' '.join(map(str, command))}: {os.strerror(-value)}")
        return {"seconds": seconds, fact: value}

    return Variant(name, run)


def with_agent_cpu(variant: Variant, agent_pid: int) -> Variant:
    """The agent's CPU time during each timed call (all its threads), as the fact agent_cpu_ms."""
    inner_prepare, inner_after = variant.prepare, variant.after

    def prepare() -> tuple[object, int]:
        prepared = inner_prepare()
        return prepared, agent_cpu_ns(agent_pid)

    def after(prepared: tuple[object, int], facts: dict) -> None:
        facts["agent_cpu_ms"] = (agent_cpu_ns(agent_pid) - prepared[1]) / 1e6
        inner_after(prepared[0], facts)

    run = variant.run
    return Variant(variant.name, lambda p: run(p[0]), prepare, after, variant.pair)


def read_cases(
    client: Client, stub: vmctl_pb2_grpc.VmControlStub, floor: Floor, target: harness.Target, agent_pid: int
) -> list[Variant]:
    """The read variants of one target, named "VMAS name"."""
    pid = target.pid
    raw_request = vmctl_pb2.GetVmaInfoRequest(pid=pid)
    variants = [
        c_floor(floor, "maps floor", "read", pid, "maps", fact="bytes"),
        c_floor(floor, "query floor", "query", pid, 1, fact="vmas"),
        c_floor(floor, "query floor bare", "query", pid, 0, fact="vmas"),
        Variant(
            "layout raw stub", lambda _: {"vmas": len(stub.GetVmaInfo(raw_request, timeout=60).vmas)}, pair="layout"
        ),
        with_agent_cpu(
            Variant("layout", lambda _: {"vmas": len(client.get_vma_info(pid).vmas)}, pair="layout"), agent_pid
        ),
        Variant("layout+starts", lambda _: {"vmas": len([v.start for v in client.get_vma_info(pid).vmas])}),
        Variant("layout+column", lambda _: {"vmas": len(client.get_vma_info(pid).vmas.column("start"))}),
        c_floor(floor, "smaps read", "read", pid, "smaps", fact="bytes"),
        c_floor(floor, "smaps floor", "smaps", pid, fact="vmas"),
        with_agent_cpu(
            Variant("accounting", lambda _: {"vmas": len(client.get_vma_info(pid, attrs=ACCOUNTING).vmas)}), agent_pid
        ),
        Variant("residency", lambda _: {"vmas": len(client.get_vma_info(pid, attrs=RESIDENCY).vmas)}),
        Variant("psutil", lambda _: {"vmas": len(psutil.Process(pid).memory_maps(grouped=False))}),
    ]
    for variant in variants:
        variant.name = f"{target.vmas} {variant.name}"
    return variants


@dataclass
class PageoutPlan:
    ranges: list[tuple[int, int]]
    cookie: bytes
    iovecs: Iovecs | None
    swap_kb_before: int


def pageout_cases(client: Client, target: harness.Target) -> list[Variant]:
    """Every anonymous VMA paged out, three ways; before each, the target
    rewrites its heap (so there is real work) and a fresh snapshot gives the
    ranges and the cookie (so all three advise exactly the same ranges)."""
    pid = target.pid

    def plan(with_iovecs: bool) -> PageoutPlan:
        target.retouch()
        info = client.get_vma_info(pid)
        ranges = [(v.start, v.end) for v in info.vmas if v.kind == "anonymous"]
        return PageoutPlan(ranges, info.cookie, Iovecs(ranges) if with_iovecs else None, target.status_kb("VmSwap"))

    def swapped(prepared: PageoutPlan, facts: dict) -> None:
        facts["ranges"] = len(prepared.ranges)
        facts["swapped_kb"] = target.status_kb("VmSwap") - prepared.swap_kb_before

    def vmctl(prepared: PageoutPlan, dry_run: bool = False) -> dict:
        result = client.advise_ranges(
            pid, prepared.ranges, "pageout", cookie=prepared.cookie, filter="anonymous", dry_run=dry_run
        )
        return {"syscalls": result.syscalls, "advised_bytes": result.advised_bytes}

    variants = [
        Variant("pageout floor", lambda p: measure.pageout_batched(pid, p.iovecs), lambda: plan(True), swapped),
        Variant("pageout", vmctl, lambda: plan(False), swapped),
        Variant("pageout dry run", lambda p: vmctl(p, dry_run=True), lambda: plan(False), swapped),
        Variant("pageout per VMA", lambda p: measure.pageout_per_vma(pid, p.iovecs), lambda: plan(True), swapped),
    ]
    for variant in variants:
        variant.name = f"{target.vmas} {variant.name}"
    return variants


def one_range(client: Client, target: harness.Target) -> tuple[int, int]:
    """An anonymous heap VMA from the middle of the target's layout."""
    anonymous = [
        v for v in client.get_vma_info(target.pid).vmas if v.kind == "anonymous" and v.path.startswith("[anon")
    ]
    chosen = (
        anonymous[len(anonymous) // 2]
        if anonymous
        else next(v for v in client.get_vma_info(target.pid).vmas if v.kind == "anonymous")
    )
    return chosen.start, chosen.end


def advise_one_cases(client: Client, floor: Floor, target: harness.Target, agent_pid: int) -> list[Variant]:
    """AdviseRanges of one range with MADV_COLD (cheap, and the same work every time,
    unlike pageout, whose cost is zram's compression) beside its floor: what the call
    must do at least. With the whole scope that is the layout read whole (the cookie
    check) and one process_madvise; with the ranges scope, one PROCMAP_QUERY for the
    range and one process_madvise. A fresh cookie before each call, untimed."""
    pid = target.pid
    start, end = one_range(client, target)

    def floor_whole(_: object) -> dict:
        layout, _bytes = floor("read", pid, "maps")
        advise, advised = floor("madvise", pid, f"{start:x}", f"{end:x}", MADV_COLD)
        return {"seconds": layout + advise, "advised_bytes": advised, "layout_ms": layout * 1e3}

    def floor_ranges(_: object) -> dict:
        query, _end = floor("query1", pid, f"{start:x}")
        advise, advised = floor("madvise", pid, f"{start:x}", f"{end:x}", MADV_COLD)
        return {"seconds": query + advise, "advised_bytes": advised}

    def cookie() -> bytes:
        return client.get_vma_info(pid).cookie

    def vmctl(prepared: bytes, **options: object) -> dict:
        result = client.advise_ranges(pid, [(start, end)], "cold", cookie=prepared, **options)  # type: ignore[arg-type]
        return {"advised_bytes": result.advised_bytes, "syscalls": result.syscalls}

    variants = [
        Variant("advise1 floor", floor_whole),
        with_agent_cpu(Variant("advise1", vmctl, cookie), agent_pid),
        Variant("advise1 dry run", lambda c: vmctl(c, dry_run=True), cookie),
    ]
    if HAS_SCOPE:
        variants += [
            Variant("advise1 ranges floor", floor_ranges),
            Variant("advise1 ranges", lambda c: vmctl(c, scope="ranges"), cookie),
        ]
    for variant in variants:
        variant.name = f"{target.vmas} {variant.name}"
    return variants


def list_cases(client: Client, agent_pid: int) -> list[Variant]:
    """ListProcesses on this node (the bench's three targets on it, the largest of
    65,490 VMAs), as it comes and with every VMA counted."""
    return [
        with_agent_cpu(Variant("ps", lambda _: {"processes": len(client.list_processes())}), agent_pid),
        with_agent_cpu(
            Variant("ps counted", lambda _: {"processes": len(client.list_processes(vma_count=True))}), agent_pid
        ),
    ]


def rss_breakdown(pid: int) -> dict:
    """Where the agent's resident memory is: status' anon/file/shmem split, and
    the resident kB of each mapped file (and of anonymous memory) from smaps."""
    status = {key: status_kb(pid, key) / 1024 for key in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}
    by_path: dict[str, int] = {}
    path = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and first[0] in "0123456789abcdef" and not first.endswith(":"):
                parts = line.split(maxsplit=5)
                path = parts[5].strip() if len(parts) == 6 else "[anonymous]"
                if path.startswith("[anon") or path in ("[heap]", "[stack]"):
                    path = "[anonymous]"
            elif first == "Rss:":
                by_path[os.path.basename(path) or path] = by_path.get(os.path.basename(path) or path, 0) + int(
                    line.split()[1]
                )
    top = sorted(by_path.items(), key=lambda item: -item[1])[:10]
    return {"status_mb": status, "top_kb": dict(top)}


def traces_every_thread(tracer: subprocess.Popen, pid: int) -> bool:
    """Whether ``tracer`` is attached to every thread of ``pid`` (each thread's TracerPid)."""
    if tracer.poll() is not None:
        raise subprocess.SubprocessError(f"strace exited with {tracer.returncode}: {tracer.stderr.read()}")  # type: ignore[union-attr]
    tids = [int(task.name) for task in pathlib.Path(f"/proc/{pid}/task").iterdir()]
    return all(status_field(tid, "TracerPid") == str(tracer.pid) for tid in tids)


def strace_calls(agent_pid: int, client: Client, target: harness.Target) -> dict:
    """process_madvise calls the agent makes for one AdviseRanges, counted
    by strace attached to it (untimed: strace slows every call)."""
    target.retouch()
    info = client.get_vma_info(target.pid)
    ranges = [(v.start, v.end) for v in info.vmas if v.kind == "anonymous"]
    with tempfile.NamedTemporaryFile("r", prefix="vmctl-bench-strace-") as summary:
        tracer = subprocess.Popen(
            ["strace", "-f", "-c", "-e", "trace=process_madvise", "-o", summary.name, "-p", str(agent_pid)],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: traces_every_thread(tracer, agent_pid), "strace to attach to every thread of the agent")
            result = client.advise_ranges(target.pid, ranges, "pageout", cookie=info.cookie, filter="anonymous")
        finally:
            tracer.send_signal(signal.SIGINT)
            tracer.communicate(timeout=30)
        text = summary.read()
    match = re.search(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?process_madvise$", text, re.MULTILINE)
    return {"ranges": len(ranges), "reply_syscalls": result.syscalls, "strace_calls": int(match[1]) if match else 0}


# ---- the table -------------------------------------------------------------------


def ms(seconds: float) -> str:
    value = seconds * 1e3
    return f"{value:,.0f} ms" if value >= 100 else f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f} µs"


def median_fact(samples: Samples, key: str) -> float:
    values = [f[key] for f in samples.facts if key in f]
    return percentile(values, 50) if values else 0


def cpu(samples: Samples) -> str:
    """The agent's CPU time per call, median (only where it was measured)."""
    value = median_fact(samples, "agent_cpu_ms")
    return f"{value:.1f} ms" if value else ""


def per_round(a: Samples, b: Samples, combine) -> list[float]:
    """The figure of each round (a and b ran in the same rounds): its spread is the noise."""
    return [combine(x, y) for x, y in zip(a.seconds, b.seconds, strict=True)]


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []
        self.goals: list[dict] = []

    def row(
        self,
        what: str,
        vmas: int | str,
        median: str,
        per_vma: str = "",
        against: str = "",
        calls: str = "",
        agent_cpu: str = "",
    ) -> None:
        self.rows.append(
            (what, f"{vmas:,}" if isinstance(vmas, int) else vmas, median, per_vma, against, agent_cpu, calls)
        )

    def goal(self, text: str, met: bool | None, measured: str) -> None:
        """met None: unresolved, the noise is larger than the margin."""
        self.goals.append({"goal": text, "met": met, "measured": measured})

    def judged(self, text: str, figure: float, limit: float, spread: float, unit: str, measured: str) -> None:
        """A goal "figure ≤ limit", judged against the spread of the figure across rounds:
        met or not only when the margin (limit - figure, either way) exceeds the spread.
        A figure below its floor is noise unless it is below by more than the spread;
        the same rule covers it."""
        margin = limit - figure
        fmt = (lambda v: f"{v:.2f}x") if unit == "x" else (lambda v: f"{v * 1e3:.2f} ms")
        detail = f"{measured} (spread {fmt(spread)}, margin {fmt(margin)})"
        if abs(margin) <= spread:
            self.goal(text, None, f"unresolved (spread {fmt(spread)} > margin {fmt(abs(margin))}): {measured}")
        else:
            self.goal(text, margin > 0, detail)

    def render(self) -> str:
        header = ("measurement", "VMAs", "median", "per VMA", "against the floor", "agent CPU", "process_madvise")
        widths = [max(len(r[i]) for r in [header, *self.rows]) for i in range(len(header))]
        right = {1, 2, 3, 5, 6}

        def line(cells: tuple[str, ...]) -> str:
            pairs = enumerate(zip(cells, widths, strict=True))
            padded = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in pairs]
            return "| " + " | ".join(padded) + " |"

        rule = (
            "|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
        )
        lines = [line(header), rule, *(line(r) for r in self.rows), ""]
        marks = {True: "[x]", False: "[ ]", None: "[?]"}
        lines += [f"- {marks[g['met']]} {g['goal']}: {g['measured']}" for g in self.goals]
        return "\n".join(lines)


def report_reads(report: Report, vmas: int, samples: dict[str, Samples]) -> None:
    s = samples
    query, maps, smaps = s["query floor"].median, s["maps floor"].median, s["smaps floor"].median

    def ratio(name: str, floor: float) -> str:
        return f"{s[name].median / floor:.2f}x"

    report.row("layout: PROCMAP_QUERY loop with names, C (floor)", vmas, ms(query), us(query / vmas), "1.00")
    bare = s["query floor bare"].median
    report.row("layout: PROCMAP_QUERY loop without names, C", vmas, ms(bare), us(bare / vmas), f"{bare / query:.2f}x")
    report.row("layout: read /proc/PID/maps, C", vmas, ms(maps), us(maps / vmas), f"{maps / query:.2f}x")
    raw, layout = s["layout raw stub"].median, s["layout"].median
    report.row(
        "layout: GetVmaInfo, the generated stub alone", vmas, ms(raw), us(raw / vmas), ratio("layout raw stub", query)
    )
    report.row(
        "layout: GetVmaInfo through Client",
        vmas,
        ms(layout),
        us(layout / vmas),
        f"{layout / query:.2f}x ({layout / raw:.2f}x the stub, {layout / maps:.2f}x maps)",
        agent_cpu=cpu(s["layout"]),
    )
    for name, label in (
        ("layout+starts", "… and every vma.start read"),
        ("layout+column", "… every start as vmas.column"),
    ):
        report.row(f"layout: {label}", vmas, ms(s[name].median), us(s[name].median / vmas), ratio(name, query))
    read = s["smaps read"].median
    report.row("accounting: read /proc/PID/smaps, C", vmas, ms(read), us(read / vmas), f"{read / smaps:.2f}x")
    report.row("accounting: read and parse smaps, C (floor)", vmas, ms(smaps), us(smaps / vmas), "1.00")
    accounting = s["accounting"].median
    report.row(
        "accounting: GetVmaInfo through Client",
        vmas,
        ms(accounting),
        us(accounting / vmas),
        f"{accounting / smaps:.2f}x ({accounting / read:.2f}x the read alone)",
        agent_cpu=cpu(s["accounting"]),
    )
    residency = s["residency"].median
    report.row(
        "residency only (rss, swap: layout + PAGEMAP_SCAN) through Client",
        vmas,
        ms(residency),
        us(residency / vmas),
        f"{residency / smaps:.2f}x",
    )
    psutil_time = s["psutil"].median
    report.row(
        "accounting: psutil memory_maps(grouped=False)",
        vmas,
        ms(psutil_time),
        us(psutil_time / vmas),
        f"{psutil_time / smaps:.2f}x ({psutil_time / accounting:.1f}x vmctl)",
    )


def report_advise1(report: Report, vmas: int, samples: dict[str, Samples]) -> None:
    floor = samples["advise1 floor"]
    report.row(
        "AdviseRanges, one range, cold: read maps + one process_madvise, C (floor)",
        vmas,
        ms(floor.median),
        "",
        "+0",
        "1",
    )
    for name, label in (("advise1", "through Client (whole scope)"), ("advise1 dry run", "dry run (no call)")):
        s = samples[name]
        report.row(
            f"AdviseRanges, one range, cold: {label}",
            vmas,
            ms(s.median),
            "",
            f"{(s.median - floor.median) * 1e3:+.1f} ms",
            f"{median_fact(s, 'syscalls'):.0f}",
            cpu(s),
        )
    if "advise1 ranges" in samples:
        rfloor, ranges = samples["advise1 ranges floor"], samples["advise1 ranges"]
        report.row(
            "AdviseRanges, one range, cold: one PROCMAP_QUERY + one process_madvise, C (ranges floor)",
            vmas,
            ms(rfloor.median),
            "",
            "+0",
            "1",
        )
        report.row(
            "AdviseRanges, one range, cold: through Client, scope ranges",
            vmas,
            ms(ranges.median),
            "",
            f"{(ranges.median - rfloor.median) * 1e3:+.1f} ms",
            f"{median_fact(ranges, 'syscalls'):.0f}",
        )


def report_pageout(report: Report, vmas: int, samples: dict[str, Samples]) -> None:
    floor = samples["pageout floor"]
    ranges = int(median_fact(floor, "ranges"))
    heading = f"pageout of {ranges:,} anonymous VMAs"
    report.row(
        f"{heading}: batched process_madvise (floor)",
        vmas,
        ms(floor.median),
        "",
        f"+0 (spread {floor.iqr * 1e3:.1f} ms)",
        f"{median_fact(floor, 'syscalls'):,.0f}",
    )
    for name, label in (
        ("pageout", "AdviseRanges through Client"),
        ("pageout dry run", "AdviseRanges dry run (no calls)"),
        ("pageout per VMA", "one process_madvise per VMA"),
    ):
        s = samples[name]
        # A dry run makes no calls: it is the overhead alone, not comparable to the floor.
        spread = iqr(per_round(s, floor, lambda a, b: a - b))
        against = (
            "overhead alone"
            if name == "pageout dry run"
            else f"{(s.median - floor.median) * 1e3:+.1f} ms (spread {spread * 1e3:.1f} ms)"
        )
        report.row(f"{heading}: {label}", vmas, ms(s.median), "", against, f"{median_fact(s, 'syscalls'):,.0f}")


# ---- the run --------------------------------------------------------------------


def interrupt(*_: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so every cleanup runs."""
    raise KeyboardInterrupt


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        print("bench: run as root (it reads other processes' smaps, advises them, and sets up zram swap)")
        return 2
    # Ctrl-C and SIGTERM unwind the ExitStack, even when started with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    machine = harness.machine_info()
    big_vmas = args.big_vmas or min(MAX_VMAS, machine["max_map_count"]) - HEADROOM
    results: dict = {"machine": machine, "settings": vars(args) | {"json": str(args.json)}, "cases": {}}
    report = Report()

    def progress(text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    with contextlib.ExitStack() as stack:
        scratch = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vmctl-bench-")))
        floor = Floor(str(FLOOR_SOURCE), str(scratch))
        stack.callback(floor.close)
        swap = None if args.no_pageout else stack.enter_context(zram_swap_device("4G"))
        if not args.no_pageout and swap is None:
            progress("no zram on this kernel: skipping the pageout cases")
        progress(f"building targets of {SYSTEM_SERVER_VMAS:,} and {big_vmas:,} VMAs")
        mid = stack.enter_context(harness.target(SYSTEM_SERVER_VMAS, scratch))
        big = stack.enter_context(harness.target(big_vmas, scratch))
        small = stack.enter_context(harness.target(SMALL_VMAS, scratch))
        agent = stack.enter_context(harness.agent(scratch, []))
        agent_pid = agent.proc.pid  # type: ignore[union-attr]

        def agent_mb(key: str) -> float:
            return status_kb(agent_pid, key) / 1024

        def reset_peak_rss() -> None:
            harness.reset_peak_rss(agent_pid)

        client = stack.enter_context(Client(agent.address))
        # The generated stub on a channel of its own: what the call costs with no client library at all.
        stub = vmctl_pb2_grpc.VmControlStub(
            stack.enter_context(grpc.insecure_channel(agent.address, options=[("grpc.max_receive_message_length", -1)]))
        )
        time.sleep(IDLE_SECONDS)
        agent_idle_rss_mb = agent_mb("VmRSS")
        results["agent_idle_memory"] = rss_breakdown(agent_pid)
        results["targets"] = {
            name: {"vmas": t.vmas, "heap_regions": t.heap_regions}
            for name, t in (("mid", mid), ("big", big), ("small", small))
        }

        measured: dict[int, dict[str, Samples]] = {mid.vmas: {}, big.vmas: {}, 0: {}}
        rss: dict[str, float] = {"idle_at_start": agent_idle_rss_mb}

        def collect(samples: dict[str, Samples]) -> None:
            for key, sample in samples.items():
                vmas, _, name = key.partition(" ")
                if not vmas.isdigit():  # node-wide cases
                    vmas, name = "0", key
                measured[int(vmas)][name] = sample

        # Both targets in the same rounds: the per-VMA comparison between
        # them sees the same drift too.
        progress(f"{mid.vmas:,} and {big.vmas:,} VMAs: floors, layout, smaps, accounting, residency, psutil")
        reset_peak_rss()
        collect(
            interleaved(
                read_cases(client, stub, floor, mid, agent_pid) + read_cases(client, stub, floor, big, agent_pid),
                args.reps,
            )
        )
        rss |= {"peak_during_reads": agent_mb("VmHWM"), "after_reads": agent_mb("VmRSS")}
        progress("AdviseRanges of one range (cold) and ListProcesses")
        collect(
            interleaved(
                advise_one_cases(client, floor, mid, agent_pid)
                + advise_one_cases(client, floor, big, agent_pid)
                + list_cases(client, agent_pid),
                args.reps,
            )
        )
        # The load before any pageout, so its peak is the reads' alone. It
        # leaves a thread per client in the agent's pool; big calls after it
        # (GetVmaInfo and AdviseRanges over tens of thousands of VMAs) spread
        # over those threads, all on one malloc arena (vmctl_server.runtime.malloc_trim).
        progress(f"{args.clients} clients for {args.load_seconds:.0f}s on a {small.vmas}-VMA target")
        load = measure.concurrent_load(
            agent.address, small.pid, ACCOUNTING, args.clients, args.load_seconds, reset_peak_rss
        )
        peak_rss_mb = agent_mb("VmHWM")
        results["load"] = {
            "clients": load.clients,
            "seconds": load.seconds,
            "calls": len(load.latencies),
            "calls_per_second": load.calls_per_second,
            "p50_ms": percentile(load.latencies, 50) * 1e3,
            "p99_ms": percentile(load.latencies, 99) * 1e3,
            "agent_peak_rss_mb": peak_rss_mb,
        }

        if args.transport_clients:
            # A second agent on a unix socket and a plaintext TCP port (loopback), a policy
            # letting both callers read: the same calls over each transport, phases alternating.
            port = free_port()
            policy = write_policy(scratch, 'rules: [{identities: [anonymous, "uid:0"], verbs: [read]}]')
            tcp_dir = scratch / "transport"
            tcp_dir.mkdir()
            twin = stack.enter_context(
                harness.agent(tcp_dir, ["--listen", f"tcp://127.0.0.1:{port}", "--insecure", "--policy", policy])
            )
            tcp = f"tcp://127.0.0.1:{port}"
            progress(
                f"{args.transport_clients} clients, unix socket and TCP in turn, {args.transport_seconds:.0f}s each"
            )
            order = [twin.address, tcp, tcp, twin.address]
            phases = measure.phased_load(order, small.pid, ACCOUNTING, args.transport_clients, args.transport_seconds)
            by_transport: dict[str, list[float]] = {"unix": [], "tcp": []}
            for address, phase in zip(order, phases, strict=True):
                by_transport["tcp" if address == tcp else "unix"] += phase.latencies
            results["transports"] = {
                name: {
                    "clients": args.transport_clients,
                    "calls": len(latencies),
                    "p50_ms": percentile(latencies, 50) * 1e3,
                    "p99_ms": percentile(latencies, 99) * 1e3,
                    "phase_p99_ms": [
                        percentile(p.latencies, 99) * 1e3
                        for a, p in zip(order, phases, strict=True)
                        if ("tcp" if a == tcp else "unix") == name
                    ],
                }
                for name, latencies in by_transport.items()
            }

        if swap is not None:
            progress(f"{mid.vmas:,} VMAs: pageout floor, AdviseRanges, dry run, per VMA")
            collect(interleaved(pageout_cases(client, mid), args.reps))
            if not args.no_strace:
                progress("counting the agent's process_madvise calls with strace")
                try:
                    results["strace"] = strace_calls(agent_pid, client, mid)
                except (OSError, subprocess.SubprocessError) as exc:
                    results["strace"] = {"error": str(exc)}

        if swap is not None:
            progress(f"{big.vmas:,} VMAs: pageout floor, AdviseRanges, dry run, per VMA")
            rss["before_big_pageout"] = agent_mb("VmRSS")
            reset_peak_rss()
            collect(interleaved(pageout_cases(client, big), args.big_reps))
            rss["peak_during_big_pageout"] = agent_mb("VmHWM")
        progress(f"health checks during accounting calls on {big.vmas:,} VMAs")
        health = measure.health_during(
            agent.address, lambda: len(client.get_vma_info(big.pid, attrs=ACCOUNTING).vmas), 3
        )
        results["health"] = health
        rss["at_end"] = agent_mb("VmRSS")
        # Once idle, the agent gives back what the large calls freed (vmctl_server.runtime.malloc_trim).
        time.sleep(IDLE_SECONDS)
        rss["idle_after_end"] = agent_mb("VmRSS")
        results["agent_rss_mb"] = rss

        for vmas, samples in measured.items():
            for name, s in samples.items():
                results["cases"][f"{name} @ {vmas}"] = {
                    "vmas": vmas,
                    "median_ms": s.median * 1e3,
                    "iqr_ms": s.iqr * 1e3,
                    "samples_ms": [x * 1e3 for x in s.seconds],
                    "facts": s.facts,
                }

    # ---- the table and the goals
    mid_samples, big_samples, node_samples = measured[mid.vmas], measured[big.vmas], measured[0]
    for vmas in (mid.vmas, big.vmas):
        report_reads(report, vmas, measured[vmas])
    for vmas in (mid.vmas, big.vmas):
        report_advise1(report, vmas, measured[vmas])
    ps, counted = node_samples["ps"], node_samples["ps counted"]
    processes = int(median_fact(ps, "processes"))
    report.row(
        f"ListProcesses ({processes} processes, one of {big.vmas:,} VMAs) through Client",
        "node",
        ms(ps.median),
        "",
        "",
        agent_cpu=cpu(ps),
    )
    report.row(
        "ListProcesses with every VMA counted (with_vma_count)",
        "node",
        ms(counted.median),
        "",
        f"{counted.median / ps.median:.1f}x",
        agent_cpu=cpu(counted),
    )
    if swap is not None:
        for vmas in (mid.vmas, big.vmas):
            report_pageout(report, vmas, measured[vmas])
    lr = results["load"]
    report.row(
        f"{load.clients} clients, accounting GetVmaInfo: p50 (p99), {lr['calls_per_second']:,.0f} calls/s,"
        f" agent peak RSS {peak_rss_mb:.0f} MB",
        small.vmas,
        ms(lr["p50_ms"] / 1e3),
        "",
        f"p99 {ms(lr['p99_ms'] / 1e3)}",
    )
    transports = results.get("transports")
    if transports:
        for name, label in (("unix", "unix socket"), ("tcp", "plaintext TCP, loopback")):
            t = transports[name]
            report.row(
                f"{t['clients']} clients, accounting GetVmaInfo over {label}: p50 (p99), {t['calls']:,} calls",
                small.vmas,
                ms(t["p50_ms"] / 1e3),
                "",
                f"p99 {ms(t['p99_ms'] / 1e3)}",
            )
    report.row(
        f"health check during accounting GetVmaInfo ({health['probes_during']} probes): p50 (max)",
        big.vmas,
        ms(health["during_p50"]),
        "",
        f"max {ms(health['during_max'])}",
    )
    idle = results["agent_idle_memory"]["status_mb"]
    report.row(
        f"agent idle RSS (anon {idle['RssAnon']:.1f} MB, file {idle['RssFile']:.1f} MB,"
        f" shmem {idle['RssShmem']:.1f} MB)",
        "",
        f"{idle['VmRSS']:.1f} MB",
    )

    m = {k: s.median for k, s in mid_samples.items()}
    b = {k: s.median for k, s in big_samples.items()}
    for vmas, samples in ((mid.vmas, mid_samples), (big.vmas, big_samples)):
        layout, query = samples["layout"], samples["query floor"]
        report.judged(
            f"layout GetVmaInfo through Client ≤ 2x the C PROCMAP_QUERY loop with names, {vmas:,} VMAs",
            layout.median / query.median,
            2.0,
            iqr(per_round(layout, query, lambda a, q: a / q)),
            "x",
            f"{layout.median / query.median:.2f}x (agent CPU {cpu(layout)} a call)",
        )
    client_ratio = b["layout"] / b["layout raw stub"]
    report.judged(
        f"a {big.vmas:,}-VMA snapshot through Client ≤ 2x the raw stub call (issue 3)",
        client_ratio,
        2.0,
        iqr(per_round(big_samples["layout"], big_samples["layout raw stub"], lambda a, r: a / r)),
        "x",
        f"{client_ratio:.2f}x (at {mid.vmas:,}: {m['layout'] / m['layout raw stub']:.2f}x; the two run back to"
        " back in alternating order every round)",
    )
    for vmas, samples in ((mid.vmas, mid_samples), (big.vmas, big_samples)):
        accounting, smaps = samples["accounting"], samples["smaps floor"]
        report.judged(
            f"accounting GetVmaInfo ≤ 1.3x the C smaps read and parse, {vmas:,} VMAs",
            accounting.median / smaps.median,
            1.3,
            iqr(per_round(accounting, smaps, lambda a, f: a / f)),
            "x",
            f"{accounting.median / smaps.median:.2f}x; psutil takes {samples['psutil'].median / accounting.median:.1f}x"
            " vmctl's time",
        )
    for vmas, samples in ((mid.vmas, mid_samples), (big.vmas, big_samples)):
        one, floor1 = samples["advise1"], samples["advise1 floor"]
        report.judged(
            f"AdviseRanges of one range (cold, whole scope) ≤ its C floor + 2 ms, {vmas:,} VMAs",
            (one.median - floor1.median),
            0.002,
            iqr(per_round(one, floor1, lambda a, f: a - f)),
            "ms",
            f"floor + {(one.median - floor1.median) * 1e3:.1f} ms (floor {ms(floor1.median)}: a maps read and one"
            f" process_madvise; a dry run {ms(samples['advise1 dry run'].median)})",
        )
        if "advise1 ranges" in samples:
            rone, rfloor = samples["advise1 ranges"], samples["advise1 ranges floor"]
            report.judged(
                f"AdviseRanges of one range (cold, ranges scope) ≤ its C floor + 2 ms, {vmas:,} VMAs",
                rone.median - rfloor.median,
                0.002,
                iqr(per_round(rone, rfloor, lambda a, f: a - f)),
                "ms",
                f"floor + {(rone.median - rfloor.median) * 1e3:.1f} ms (floor {ms(rfloor.median)})",
            )
    if not HAS_SCOPE:
        # Hook: once AdviseRangesRequest.scope is on main, Client.advise_ranges takes scope= and
        # advise_one_cases adds the ranges-scope rows and this goal judges them.
        report.goal(
            "AdviseRanges of one range, ranges scope ≤ its C floor + 2 ms",
            None,
            "not measured: this client has no scope",
        )
    per_process = [f["agent_cpu_ms"] / 1e3 / max(1, f["processes"]) for f in ps.facts]
    report.judged(
        f"ListProcesses with a {big.vmas:,}-VMA process on the node: ≤ 0.5 ms of agent CPU per process listed"
        " (no read grows with a process's VMAs)",
        statistics.median(per_process),
        0.0005,
        iqr(per_process),
        "ms",
        f"{statistics.median(per_process) * 1e3:.2f} ms ({cpu(ps)} for {processes} processes, {ms(ps.median)} end"
        f" to end; {cpu(counted)} with every VMA counted, {ms(counted.median)})",
    )
    if swap is not None:
        pageout = mid_samples["pageout"]
        ranges = int(median_fact(pageout, "ranges"))
        expected = math.ceil(ranges / measure.UIO_MAXIOV)
        calls = int(median_fact(pageout, "syscalls"))
        resumes = int(median_fact(mid_samples["pageout floor"], "resumes"))
        report.goal(
            "AdviseRanges: process_madvise calls = ceil(ranges / 1024) + resumes",
            calls == expected + resumes,
            f"{calls} calls for {ranges:,} ranges (ceil = {expected}, the floor loop resumed {resumes} times)"
            + (f"; strace counted {results['strace'].get('strace_calls')}" if "strace" in results else ""),
        )
    for key, label, floor_key in (("layout", "layout", "query floor"), ("accounting", "accounting", "smaps floor")):
        scale = (b[key] / big.vmas) / (m[key] / mid.vmas)
        floor_scale = (b[floor_key] / big.vmas) / (m[floor_key] / mid.vmas)
        report.goal(
            f"{label} per VMA at {big.vmas:,} VMAs ≤ 1.2x per VMA at {mid.vmas:,}",
            scale <= 1.2,
            f"{scale:.2f}x (the C floor's own: {floor_scale:.2f}x)",
        )
    if transports:
        unix_p99, tcp_p99 = transports["unix"]["p99_ms"], transports["tcp"]["p99_ms"]
        phase_spread = max(max(t["phase_p99_ms"]) - min(t["phase_p99_ms"]) for t in transports.values()) / 1e3
        report.judged(
            f"unix socket p99 ≤ 1.2x TCP's at {args.transport_clients} clients",
            unix_p99 / 1e3,
            1.2 * tcp_p99 / 1e3,
            phase_spread,
            "ms",
            f"unix {unix_p99:.0f} ms, TCP {tcp_p99:.0f} ms ({unix_p99 / tcp_p99:.2f}x; spread: the largest"
            " difference between two phases of one transport)",
        )
    report.goal(
        f"health check < 50 ms during a {big.vmas:,}-VMA accounting call",
        0 < health["during_max"] < 0.050,
        f"max {health['during_max'] * 1e3:.1f} ms over {health['probes_during']} probes",
    )
    top_kb = results["agent_idle_memory"]["top_kb"]
    report.goal(
        "agent idle RSS ≤ 30 MB",
        idle["VmRSS"] <= 30,
        f"{idle['VmRSS']:.1f} MB (anon {idle['RssAnon']:.1f}, file {idle['RssFile']:.1f});"
        f" largest: {', '.join(f'{k} {v / 1024:.1f}' for k, v in list(top_kb.items())[:5])} MB",
    )
    rss = results["agent_rss_mb"]
    elsewhere = f"{rss['peak_during_reads']:.0f} MB during the reads (both targets)"
    if "peak_during_big_pageout" in rss:
        elsewhere += (
            f", {rss['peak_during_big_pageout']:.0f} MB during the {big.vmas:,}-VMA pageout"
            f" (from {rss['before_big_pageout']:.0f} MB before it)"
        )
    report.goal(
        f"agent peak RSS ≤ 80 MB under {load.clients} clients",
        peak_rss_mb <= 80,
        f"{peak_rss_mb:.0f} MB (VmHWM; {rss['idle_at_start']:.0f} MB idle); its peaks elsewhere: {elsewhere};"
        f" it held {rss['at_end']:.0f} MB right after the last call, {rss['idle_after_end']:.0f} MB"
        f" {IDLE_SECONDS:.1f} s later",
    )

    results["goals"] = report.goals
    results["table"] = report.render()
    load_average = os.getloadavg()
    results["machine"]["load_average_at_end"] = load_average
    machine_line = (
        f"Linux {machine['kernel']} {machine['machine']}, {machine['cpu']} ({machine['cores']} cores),"
        f" Python {machine['python']}, grpcio {machine['grpcio']}, protobuf {machine['protobuf']},"
        f" psutil {machine['psutil']}; {machine['date']}; load average {machine['load_average'][0]:.2f} at start,"
        f" {load_average[0]:.2f} at end; medians of {args.reps} interleaved rounds"
        f" ({args.big_reps} for the {big.vmas:,}-VMA pageout); spread = interquartile range of the rounds"
    )
    print(machine_line)
    print()
    print(results["table"])
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; the agent, the targets and the swap device are gone", file=sys.stderr)
        sys.exit(130)

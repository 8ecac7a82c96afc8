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
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import grpc
import harness  # first: it puts tests/ on the path, for support.*
import measure
import psutil
from measure import Iovecs, Samples, Variant, interleaved, percentile
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9, help="rounds of the reads and of the 4,204-VMA pageout (9)")
    parser.add_argument("--big-reps", type=int, default=5, help="rounds of the ~65,530-VMA pageout (default 5)")
    parser.add_argument(
        "--big-vmas", type=int, help="VMAs of the big target (default: min(65,530, max_map_count) - 40)"
    )
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients in the load test (default 16)")
    parser.add_argument("--load-seconds", type=float, default=10.0, help="length of the load test (default 10)")
    parser.add_argument("--no-pageout", action="store_true", help="skip the pageout cases (and the zram device)")
    parser.add_argument("--no-strace", action="store_true", help="skip counting the agent's calls with strace")
    parser.add_argument("--json", type=pathlib.Path, default=RESULTS, help=f"results file (default {RESULTS})")
    return parser.parse_args()


def read_floor(pid: int, name: str) -> Variant:
    """/proc/PID/NAME read to its end into a buffer made beforehand: the
    kernel's cost of producing the text, and next to nothing else."""
    buffer = memoryview(bytearray(256 << 20))
    path = f"/proc/{pid}/{name}"

    def run(_: object) -> dict:
        fd = os.open(path, os.O_RDONLY)
        size = 0
        try:
            while n := os.readv(fd, [buffer[size:]]):
                size += n
        finally:
            os.close(fd)
        return {"bytes": size}

    return Variant(f"{name} floor", run)


def read_cases(client: Client, stub: vmctl_pb2_grpc.VmControlStub, target: harness.Target) -> list[Variant]:
    """The read variants of one target, named "VMAS name"."""
    pid = target.pid
    raw_request = vmctl_pb2.GetVmaInfoRequest(pid=pid)
    variants = [
        read_floor(pid, "maps"),
        Variant("layout raw stub", lambda _: {"vmas": len(stub.GetVmaInfo(raw_request, timeout=60).vmas)}),
        Variant("layout", lambda _: {"vmas": len(client.get_vma_info(pid).vmas)}),
        Variant("layout+starts", lambda _: {"vmas": len([v.start for v in client.get_vma_info(pid).vmas])}),
        Variant("layout+column", lambda _: {"vmas": len(client.get_vma_info(pid).vmas.column("start"))}),
        read_floor(pid, "smaps"),
        Variant("accounting", lambda _: {"vmas": len(client.get_vma_info(pid, attrs=ACCOUNTING).vmas)}),
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


def median_fact(samples: Samples, key: str) -> int:
    values = [f[key] for f in samples.facts if key in f]
    return int(percentile(values, 50)) if values else 0


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []
        self.goals: list[dict] = []

    def row(
        self, what: str, vmas: int | str, median: str, per_vma: str = "", against: str = "", calls: str = ""
    ) -> None:
        self.rows.append((what, f"{vmas:,}" if isinstance(vmas, int) else vmas, median, per_vma, against, calls))

    def goal(self, text: str, met: bool, measured: str) -> None:
        self.goals.append({"goal": text, "met": met, "measured": measured})

    def render(self) -> str:
        header = ("measurement", "VMAs", "median", "per VMA", "against the floor", "process_madvise")
        widths = [max(len(r[i]) for r in [header, *self.rows]) for i in range(len(header))]
        right = {1, 2, 3, 5}

        def line(cells: tuple[str, ...]) -> str:
            pairs = enumerate(zip(cells, widths, strict=True))
            padded = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in pairs]
            return "| " + " | ".join(padded) + " |"

        rule = (
            "|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
        )
        lines = [line(header), rule, *(line(r) for r in self.rows), ""]
        lines += [f"- [{'x' if g['met'] else ' '}] {g['goal']}: {g['measured']}" for g in self.goals]
        return "\n".join(lines)


def report_reads(report: Report, vmas: int, samples: dict[str, Samples]) -> None:
    maps, smaps = samples["maps floor"].median, samples["smaps floor"].median
    layout, accounting = samples["layout"].median, samples["accounting"].median
    psutil_time = samples["psutil"].median
    report.row("layout: read /proc/PID/maps (floor)", vmas, ms(maps), us(maps / vmas), "1.00")
    raw = samples["layout raw stub"].median
    report.row("layout: GetVmaInfo, the generated stub alone", vmas, ms(raw), us(raw / vmas), f"{raw / maps:.2f}x")
    report.row(
        "layout: GetVmaInfo through Client",
        vmas,
        ms(layout),
        us(layout / vmas),
        f"{layout / maps:.2f}x ({layout / raw:.2f}x the stub)",
    )
    starts = samples["layout+starts"].median
    report.row("layout: … and every vma.start read", vmas, ms(starts), us(starts / vmas), f"{starts / maps:.2f}x")
    column = samples["layout+column"].median
    report.row("layout: … every start as vmas.column", vmas, ms(column), us(column / vmas), f"{column / maps:.2f}x")
    report.row("accounting: read /proc/PID/smaps (floor)", vmas, ms(smaps), us(smaps / vmas), "1.00")
    report.row(
        "accounting: GetVmaInfo through Client",
        vmas,
        ms(accounting),
        us(accounting / vmas),
        f"{accounting / smaps:.2f}x",
    )
    residency = samples["residency"].median
    report.row(
        "residency only (rss, swap: maps + PAGEMAP_SCAN) through Client",
        vmas,
        ms(residency),
        us(residency / vmas),
        f"{residency / smaps:.2f}x",
    )
    report.row(
        "accounting: psutil memory_maps(grouped=False)",
        vmas,
        ms(psutil_time),
        us(psutil_time / vmas),
        f"{psutil_time / smaps:.2f}x ({psutil_time / accounting:.1f}x vmctl)",
    )


def report_pageout(report: Report, vmas: int, samples: dict[str, Samples]) -> None:
    floor = samples["pageout floor"]
    ranges = median_fact(floor, "ranges")
    heading = f"pageout of {ranges:,} anonymous VMAs"
    report.row(
        f"{heading}: batched process_madvise (floor)",
        vmas,
        ms(floor.median),
        "",
        "+0",
        f"{median_fact(floor, 'syscalls'):,}",
    )
    for name, label in (
        ("pageout", "AdviseRanges through Client"),
        ("pageout dry run", "AdviseRanges dry run (no calls)"),
        ("pageout per VMA", "one process_madvise per VMA"),
    ):
        s = samples[name]
        # A dry run makes no calls: it is the overhead alone, not comparable to the floor.
        against = "overhead alone" if name == "pageout dry run" else f"{(s.median - floor.median) * 1e3:+.1f} ms"
        report.row(f"{heading}: {label}", vmas, ms(s.median), "", against, f"{median_fact(s, 'syscalls'):,}")


# ---- the run --------------------------------------------------------------------


def interrupt(*_: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so every cleanup runs."""
    raise KeyboardInterrupt


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
        agent_idle_rss_mb = agent_mb("VmRSS")
        results["targets"] = {
            name: {"vmas": t.vmas, "heap_regions": t.heap_regions}
            for name, t in (("mid", mid), ("big", big), ("small", small))
        }

        measured: dict[int, dict[str, Samples]] = {mid.vmas: {}, big.vmas: {}}
        rss: dict[str, float] = {"idle_at_start": agent_idle_rss_mb}

        def collect(samples: dict[str, Samples]) -> None:
            for key, sample in samples.items():
                vmas, name = key.split(" ", 1)
                measured[int(vmas)][name] = sample

        # Both targets in the same rounds: the per-VMA comparison between
        # them sees the same drift too.
        progress(f"{mid.vmas:,} and {big.vmas:,} VMAs: maps, layout, smaps, accounting, residency, psutil")
        reset_peak_rss()
        collect(interleaved(read_cases(client, stub, mid) + read_cases(client, stub, big), args.reps))
        rss |= {"peak_during_reads": agent_mb("VmHWM"), "after_reads": agent_mb("VmRSS")}
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
                    "samples_ms": [x * 1e3 for x in s.seconds],
                    "facts": s.facts,
                }

    # ---- the table and the goals
    mid_samples, big_samples = measured[mid.vmas], measured[big.vmas]
    for vmas, samples in measured.items():
        report_reads(report, vmas, samples)
    if swap is not None:
        for vmas, samples in measured.items():
            report_pageout(report, vmas, samples)
    lr = results["load"]
    report.row(
        f"{load.clients} clients, accounting GetVmaInfo: p50 (p99), {lr['calls_per_second']:,.0f} calls/s,"
        f" agent peak RSS {peak_rss_mb:.0f} MB",
        small.vmas,
        ms(lr["p50_ms"] / 1e3),
        "",
        f"p99 {ms(lr['p99_ms'] / 1e3)}",
    )
    report.row(
        f"health check during accounting GetVmaInfo ({health['probes_during']} probes): p50 (max)",
        big.vmas,
        ms(health["during_p50"]),
        "",
        f"max {ms(health['during_max'])}",
    )

    m = {k: s.median for k, s in mid_samples.items()}
    b = {k: s.median for k, s in big_samples.items()}
    layout_ratio, accounting_ratio = m["layout"] / m["maps floor"], m["accounting"] / m["smaps floor"]
    report.goal("layout-only GetVmaInfo ≤ 3x the maps floor", layout_ratio <= 3, f"{layout_ratio:.2f}x")
    client_ratio = b["layout"] / b["layout raw stub"]
    report.goal(
        f"a {big.vmas:,}-VMA snapshot through Client ≤ 2x the raw stub call (issue 3)",
        client_ratio <= 2,
        f"{client_ratio:.2f}x",
    )
    report.goal(
        "accounting GetVmaInfo ≤ 1.5x the smaps floor",
        accounting_ratio <= 1.5,
        f"{accounting_ratio:.2f}x; psutil takes {m['psutil'] / m['accounting']:.1f}x vmctl's time",
    )
    if swap is not None:
        pageout = mid_samples["pageout"]
        ranges = median_fact(pageout, "ranges")
        expected = math.ceil(ranges / measure.UIO_MAXIOV)
        calls = median_fact(pageout, "syscalls")
        resumes = median_fact(mid_samples["pageout floor"], "resumes")
        report.goal(
            "AdviseRanges: process_madvise calls = ceil(ranges / 1024) + resumes",
            calls == expected + resumes,
            f"{calls} calls for {ranges:,} ranges (ceil = {expected}, the floor loop resumed {resumes} times)"
            + (f"; strace counted {results['strace'].get('strace_calls')}" if "strace" in results else ""),
        )
        extra = (m["pageout"] - m["pageout floor"]) * 1e3
        report.goal(
            "AdviseRanges time ≤ floor + 2 ms",
            extra <= 2,
            f"floor + {extra:.1f} ms (dry run, everything but the calls: {m['pageout dry run'] * 1e3:.1f} ms)",
        )
    for key, label in (("layout", "layout"), ("accounting", "accounting")):
        scale = (b[key] / big.vmas) / (m[key] / mid.vmas)
        floor_key = "maps floor" if key == "layout" else "smaps floor"
        floor_scale = (b[floor_key] / big.vmas) / (m[floor_key] / mid.vmas)
        report.goal(
            f"{label} per VMA at {big.vmas:,} VMAs ≤ 1.2x per VMA at {mid.vmas:,}",
            scale <= 1.2,
            f"{scale:.2f}x (the kernel's own floor: {floor_scale:.2f}x)",
        )
    report.goal(
        f"health check < 50 ms during a {big.vmas:,}-VMA accounting call",
        0 < health["during_max"] < 0.050,
        f"max {health['during_max'] * 1e3:.1f} ms over {health['probes_during']} probes",
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
    machine_line = (
        f"Linux {machine['kernel']} {machine['machine']}, {machine['cpu']} ({machine['cores']} cores),"
        f" Python {machine['python']}, grpcio {machine['grpcio']}, protobuf {machine['protobuf']},"
        f" psutil {machine['psutil']}; {machine['date']}; medians of {args.reps} interleaved rounds"
        f" ({args.big_reps} for the {big.vmas:,}-VMA pageout)"
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

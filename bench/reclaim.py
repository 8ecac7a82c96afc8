"""make bench-reclaim: what a reclaim controller buys and costs, on real workloads.

A busy Redis served by redis-benchmark, idle Redis instances holding data and
idle Python heaps, all in cgroup v2 groups of their own, under one of three
controllers per run: none; blunt (pageout of every process in the cgroups,
busy included, every interval); and autoreclaim (``vmctl autoreclaim``, which
should page out the idle processes only). Rounds are interleaved, each run
from fresh workloads; the table shows medians, the goals are judged under it,
and bench/reclaim-results.json gets every sample. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import harness  # first: it puts tests/ on the path, for support.*
from support.cgroup2 import CGROUP2
from support.processes import status_kb
from support.waiting import wait_for
from support.zram import zram_swap_device

BENCH = harness.BENCH
RESULTS = BENCH / "reclaim-results.json"
IDLE_HEAP = BENCH / "idle_heap.py"
BLUNT_LOOP = BENCH / "blunt_loop.py"
CONTROLLERS = ("none", "blunt", "autoreclaim")
VALUE_SIZE = 1024  # bytes per Redis value, loaded and served
FIRST_PORT = 16379
SAMPLE_EVERY = 0.5  # seconds between smaps_rollup readings of the workloads
SETTLE_SECONDS = 2.0  # after loading, before the controller starts: the idle ones go quiet
PAGED_OUT_GOAL = 0.90
THROUGHPUT_GOAL = 0.97
TICKS = os.sysconf("SC_CLK_TCK")
REDIS_TOOLS = ("redis-server", "redis-cli", "redis-benchmark")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/reclaim.py",
        description=__doc__.splitlines()[0],
        epilog="Needs root, zram, cgroup v2 and redis-server/redis-tools (make bench-reclaim installs them).",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every controller (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="one round, smaller workloads: a check that it all works (~2 min)"
    )
    parser.add_argument(
        "--controllers",
        default=",".join(CONTROLLERS),
        help=f"comma-separated subset of {','.join(CONTROLLERS)} (default all; none is the baseline)",
    )
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="autoreclaim --idle-seconds (default 10)")
    parser.add_argument(
        "--interval", type=float, default=2.0, help="autoreclaim --interval and blunt's period (default 2)"
    )
    parser.add_argument(
        "--duration", type=float, help="seconds each run measures (default 2 x idle-seconds + interval + 8)"
    )
    parser.add_argument("--idle-redis", type=int, default=2, help="idle Redis instances (default 2)")
    parser.add_argument("--idle-python", type=int, default=2, help="idle Python heaps (default 2)")
    parser.add_argument("--heap-mib", type=int, default=96, help="MiB of each Python heap (default 96)")
    parser.add_argument("--keys", type=int, default=60000, help="1 KiB values in each Redis (default 60,000)")
    parser.add_argument("--clients", type=int, default=16, help="redis-benchmark connections (default 16)")
    parser.add_argument(
        "--chunk", type=int, default=50000, help="requests per redis-benchmark test per chunk (default 50,000)"
    )
    parser.add_argument("--json", type=pathlib.Path, default=RESULTS, help=f"results file (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
        args.heap_mib = min(args.heap_mib, 48)
        args.keys = min(args.keys, 30000)
    chosen = tuple(c for c in args.controllers.split(",") if c)
    unknown = [c for c in chosen if c not in CONTROLLERS]
    if unknown or not chosen:
        parser.error(f"--controllers: unknown {unknown or 'empty list'}; choose from {','.join(CONTROLLERS)}")
    args.controllers = tuple(c for c in CONTROLLERS if c in chosen)  # the canonical order; rounds rotate it
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.idle_seconds <= 0 or args.interval <= 0:
        parser.error("--idle-seconds and --interval must be positive")
    if args.duration is None:
        args.duration = 2 * args.idle_seconds + args.interval + 8
    if args.duration <= 0:
        parser.error("--duration must be positive")
    return args


def deadline_seconds(args: argparse.Namespace) -> float:
    """The idle goal's deadline: 2 x idle-seconds + interval after the controller starts."""
    return 2 * args.idle_seconds + args.interval


# ---- reading processes ---------------------------------------------------------------------------


def rollup(pid: int) -> dict[str, int]:
    """Rss, Anonymous and Swap of /proc/PID/smaps_rollup, in bytes."""
    wanted = {"Rss:": "rss", "Anonymous:": "anon", "Swap:": "swap"}
    found = dict.fromkeys(wanted.values(), 0)
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(" ")
            if key in wanted:
                found[wanted[key]] = int(rest.split()[0]) * 1024
    return found


def cpu_and_faults(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) and major faults, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS, int(fields[9])


def swap_in_use(device: str | None) -> int | None:
    """Bytes used on our swap device per /proc/swaps, or None when it is no longer swap (someone
    else's swapoff would fault everything on it back in, and the run would measure that)."""
    for line in pathlib.Path("/proc/swaps").read_text().splitlines()[1:]:
        fields = line.split()
        if device is not None and fields and fields[0] == device:
            return int(fields[3]) * 1024
    return None


def loadavg() -> list[float]:
    return [float(x) for x in pathlib.Path("/proc/loadavg").read_text().split()[:3]]


def zram_stats(device: str | None) -> dict[str, int]:
    """What zram holds (/sys/block/zramN/mm_stat): data stored, compressed, memory used."""
    if device is None:
        return {}
    fields = pathlib.Path(f"/sys/block/{os.path.basename(device)}/mm_stat").read_text().split()
    return {"orig_data_size": int(fields[0]), "compr_data_size": int(fields[1]), "mem_used_total": int(fields[2])}


# ---- cgroups ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def cgroup_tree(name: str, children: Sequence[str]) -> Iterator[dict[str, pathlib.Path]]:
    """/NAME and /NAME/CHILD for each child in the cgroup v2 hierarchy; at exit, members still
    there move back to the root and every group is removed, whatever happened."""
    if CGROUP2 is None:
        raise RuntimeError("no cgroup v2 hierarchy is mounted")
    root = CGROUP2 / name
    made: list[pathlib.Path] = []
    try:
        root.mkdir()
        made.append(root)
        paths = {"": root}
        for child in children:
            (root / child).mkdir()
            made.append(root / child)
            paths[child] = root / child
        yield paths
    finally:
        for path in reversed(made):  # children first
            wait_for(lambda path=path: _emptied_and_removed(path), f"cgroup {path} to be removed")


def _emptied_and_removed(path: pathlib.Path) -> bool:
    assert CGROUP2 is not None
    if not path.exists():
        return True
    for pid in (path / "cgroup.procs").read_text().split():
        with contextlib.suppress(OSError):  # exited meanwhile
            (CGROUP2 / "cgroup.procs").write_text(pid)
    try:
        path.rmdir()
    except OSError:  # EBUSY: a member still on its way out
        return False
    return True


def cgroup_name(path: pathlib.Path) -> str:
    """The cgroup's path as /proc/PID/cgroup and vmctl name it."""
    assert CGROUP2 is not None
    return "/" + str(path.relative_to(CGROUP2))


def in_cgroup(group: pathlib.Path, argv: Sequence[str]) -> list[str]:
    """argv, run from its first instruction in ``group`` (a shell joins it, then execs argv)."""
    return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs"), *argv]


# ---- workloads -------------------------------------------------------------------------------------


def free_port(start: int) -> int:
    for port in range(start, start + 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}..{start + 999}")


class Redis:
    """A redis-server of our own: no persistence, DEBUG allowed from localhost."""

    def __init__(self, name: str, group: pathlib.Path, workdir: pathlib.Path, port: int) -> None:
        self.name, self.port = name, port
        self.log = workdir / f"{name}.log"
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--enable-debug-command", "local", "--dir", str(workdir), "--logfile", str(self.log)]
        self.proc = subprocess.Popen(in_cgroup(group, argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        wait_for(self._pings, f"redis {name} to answer on port {port}")

    @property
    def pid(self) -> int:
        return self.proc.pid  # the shell exec'd redis-server: the same process

    def _pings(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis {self.name} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        return subprocess.run(["redis-cli", "-p", str(self.port), "PING"], capture_output=True, text=True).stdout == (
            "PONG\n"
        )

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, check=True, timeout=120
        )
        return out.stdout.strip()

    def digest(self) -> str:
        return self.cli("DEBUG", "DIGEST")

    def load_benchmark_keys(self, keys: int) -> None:
        """Every key redis-benchmark -r KEYS will touch (key:%012d), each holding the value its SETs
        write (Redis 7's redis-benchmark writes one fixed pseudo-random payload, learnt here from one
        SET): the load then rewrites what is there, and DEBUG DIGEST stays the same."""
        one_set = ["-t", "set", "-n", "1", "-c", "1", "-r", "1", "-d", str(VALUE_SIZE), "--csv"]
        subprocess.run(
            ["redis-benchmark", "-p", str(self.port), *one_set],
            capture_output=True,
            check=True,
            timeout=60,
        )
        value = self.cli("--raw", "GET", "key:000000000000").encode()
        if len(value) != VALUE_SIZE:
            raise RuntimeError(f"redis-benchmark wrote a {len(value)}-byte value, not {VALUE_SIZE}")
        tail = b"\r\n$%d\r\n" % VALUE_SIZE + value + b"\r\n"
        data = b"".join(b"*3\r\n$3\r\nSET\r\n$16\r\nkey:%012d" % i + tail for i in range(keys))
        subprocess.run(["redis-cli", "-p", str(self.port), "--pipe"], input=data, capture_output=True, check=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Heap:
    """bench/idle_heap.py: MiB of seeded random bytes, its checksum on request."""

    def __init__(self, name: str, group: pathlib.Path, mib: int, seed: int) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            in_cgroup(group, [sys.executable, str(IDLE_HEAP), str(mib), str(seed)]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            self.checksum_at_start = self._answer("ready")
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _answer(self, word: str) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != word:
            raise RuntimeError(f"heap {self.name}: expected '{word} SHA256', got {line} (exit {self.proc.poll()})")
        return line[1]

    def checksum(self) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write("sum\n")
        self.proc.stdin.flush()
        return self._answer("sum")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Workloads:
    busy: Redis
    idle_redis: list[Redis]
    heaps: list[Heap]

    @property
    def idle(self) -> list[Redis | Heap]:
        return [*self.idle_redis, *self.heaps]

    def stop(self) -> None:
        for w in [self.busy, *self.idle]:
            w.stop()


@contextlib.contextmanager
def workloads(args: argparse.Namespace, groups: dict[str, pathlib.Path], workdir: pathlib.Path, run: int):
    started: list[Redis | Heap] = []
    try:
        port = free_port(FIRST_PORT)
        busy = Redis("busy", groups["busy"], workdir, port)
        started.append(busy)
        busy.load_benchmark_keys(args.keys)
        idle_redis = []
        for i in range(args.idle_redis):
            port = free_port(port + 1)
            r = Redis(f"idle-redis-{i}", groups["idle"], workdir, port)
            started.append(r)
            r.cli("DEBUG", "POPULATE", str(args.keys), f"idle{i}", str(VALUE_SIZE))
            idle_redis.append(r)
        heaps = []
        for i in range(args.idle_python):
            h = Heap(f"idle-python-{i}", groups["idle"], args.heap_mib, seed=1000 * run + i)
            started.append(h)
            heaps.append(h)
        yield Workloads(busy, idle_redis, heaps)
    finally:
        for w in started:
            w.stop()


# ---- load ------------------------------------------------------------------------------------------


def parse_benchmark_csv(text: str) -> dict[str, dict[str, float]]:
    """redis-benchmark --csv (Redis 7): one row per test, "rps" and latencies in ms."""
    rows = [line.replace('"', "").split(",") for line in text.strip().splitlines() if line.strip()]
    if not rows or rows[0][:2] != ["test", "rps"]:
        raise ValueError(f"not redis-benchmark --csv output: {text[:200]!r}")
    header = rows[0]
    return {row[0]: {k: float(v) for k, v in zip(header[1:], row[1:], strict=True)} for row in rows[1:]}


@dataclass
class Load:
    """redis-benchmark against the busy Redis in chunks until a deadline, each chunk timed here."""

    port: int
    args: argparse.Namespace
    chunks: list[dict[str, Any]] = field(default_factory=list)

    def run_until(self, t0: float, deadline: float) -> None:
        argv = ["redis-benchmark", "-p", str(self.port), "-t", "set,get", "-n", str(self.args.chunk)]
        argv += ["-c", str(self.args.clients), "-d", str(VALUE_SIZE), "-r", str(self.args.keys), "--csv"]
        while time.monotonic() < deadline:
            began = time.monotonic()
            out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=300)
            seconds = time.monotonic() - began
            tests = parse_benchmark_csv(out.stdout)
            self.chunks.append(
                {
                    "t": round(began - t0, 3),
                    "seconds": round(seconds, 4),
                    "requests": self.args.chunk * len(tests),
                    "tests": tests,
                }
            )

    def summary(self) -> dict[str, Any]:
        requests = sum(c["requests"] for c in self.chunks)
        seconds = sum(c["seconds"] for c in self.chunks)
        p99s = [max(t["p99_latency_ms"] for t in c["tests"].values()) for c in self.chunks]
        return {
            "chunks": len(self.chunks),
            "requests": requests,
            "seconds": round(seconds, 3),
            "throughput": requests / seconds if seconds else 0.0,
            # Percentiles do not add up across chunks: the median chunk's and the worst chunk's p99.
            "p99_ms": statistics.median(p99s) if p99s else math.nan,
            "p99_worst_ms": max(p99s) if p99s else math.nan,
        }


# ---- controllers -----------------------------------------------------------------------------------


def vmctl_command() -> str:
    beside = pathlib.Path(sys.executable).parent / "vmctl"
    return str(beside) if beside.exists() else shutil.which("vmctl") or "vmctl"


def autoreclaim_available() -> tuple[bool, str]:
    out = subprocess.run([vmctl_command(), "autoreclaim", "--help"], capture_output=True, text=True, timeout=60)
    if out.returncode == 0:
        return True, ""
    return False, (out.stderr.strip().splitlines() or ["vmctl autoreclaim --help failed"])[-1]


def controller_argv(name: str, args: argparse.Namespace, target: str, cgroup: str) -> list[str] | None:
    if name == "none":
        return None
    if name == "blunt":
        return [sys.executable, str(BLUNT_LOOP), target, cgroup, str(args.interval), str(args.duration)]
    return [
        vmctl_command(), "--target", target, "autoreclaim", "--cgroup", cgroup,
        "--idle-seconds", f"{args.idle_seconds:g}", "--interval", f"{args.interval:g}",
        "--duration", f"{args.duration:g}", "-o", "json",
    ]  # fmt: skip


class Controller:
    """A controller process: its JSON lines timestamped as they come, its CPU time from wait4."""

    def __init__(self, argv: list[str], t0: float, stderr_path: pathlib.Path) -> None:
        self.t0 = t0
        self.events: list[dict[str, Any]] = []
        self.other_lines: list[str] = []
        self.rusage: Any = None
        self.returncode: int | None = None
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        with open(stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            t = time.monotonic() - self.t0
            try:
                event = json.loads(raw)
            except ValueError:
                self.other_lines.append(raw.decode(errors="replace").rstrip())
                continue
            if isinstance(event, dict):
                event["_t"] = round(t, 3)
                self.events.append(event)

    def finish(self, timeout: float) -> None:
        """Wait for it to stop by itself (its --duration), then SIGTERM, then SIGKILL; reap with wait4
        for its CPU time (Popen.wait would reap it without)."""
        deadline = time.monotonic() + timeout
        signals = [signal.SIGTERM, signal.SIGKILL]
        while True:
            pid, status, rusage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                self.proc.returncode = self.returncode
                self.rusage = rusage
                break
            if time.monotonic() > deadline and signals:
                self.proc.send_signal(signals.pop(0))
                deadline = time.monotonic() + 10
            time.sleep(0.05)
        self.reader.join(timeout=10)

    @property
    def cpu_seconds(self) -> float:
        return self.rusage.ru_utime + self.rusage.ru_stime if self.rusage else 0.0


# ---- one run ---------------------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    groups: dict[str, pathlib.Path]
    workdir: pathlib.Path
    agent_address: str
    agent_pid: int
    zram: str | None


def progress(text: str) -> None:
    print(f"bench-reclaim: {text}", file=sys.stderr, flush=True)


def run_once(ctx: Context, controller: str, round_index: int, run_index: int) -> dict[str, Any]:
    args = ctx.args
    with workloads(args, ctx.groups, ctx.workdir, run_index) as w:
        digests = {r.name: r.digest() for r in [w.busy, *w.idle_redis]}
        time.sleep(SETTLE_SECONDS)
        idle_pids = {x.name: x.pid for x in w.idle}
        base = {name: rollup(pid) for name, pid in idle_pids.items()}
        busy_base = rollup(w.busy.pid)
        agent_cpu0, _ = cpu_and_faults(ctx.agent_pid)
        busy_cpu0, busy_faults0 = cpu_and_faults(w.busy.pid)
        load_before = loadavg()

        t0 = time.monotonic()
        argv = controller_argv(controller, args, ctx.agent_address, cgroup_name(ctx.groups[""]))
        proc = Controller(argv, t0, ctx.workdir / f"{controller}-{run_index}.stderr") if argv else None
        samples: list[dict[str, Any]] = []
        stop_sampling = threading.Event()

        controller_hwm = 0
        sampler_errors: list[str] = []

        def sample() -> None:
            nonlocal controller_hwm
            while not stop_sampling.is_set():
                t = time.monotonic() - t0
                if proc is not None:  # its peak RSS since exec (wait4's ru_maxrss counts the bench's, from fork)
                    with contextlib.suppress(OSError, ValueError, KeyError):  # KeyError: exited, a zombie
                        controller_hwm = max(controller_hwm, status_kb(proc.proc.pid, "VmHWM") * 1024)
                try:
                    now = {name: rollup(pid) for name, pid in idle_pids.items()}
                    samples.append({"t": round(t, 3), "idle": now, "busy": rollup(w.busy.pid)})
                except Exception as exc:  # a workload gone: the run is not valid, and says so
                    sampler_errors.append(f"at {t:.1f} s: {exc!r}")
                    return
                stop_sampling.wait(SAMPLE_EVERY)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        load = Load(w.busy.port, args)
        try:
            load.run_until(t0, t0 + args.duration)
        finally:
            stop_sampling.set()
            sampler.join()
            if proc is not None:
                proc.finish(timeout=max(0.0, t0 + args.duration - time.monotonic()) + 15)
        elapsed = time.monotonic() - t0
        agent_cpu1, _ = cpu_and_faults(ctx.agent_pid)
        busy_cpu1, busy_faults1 = cpu_and_faults(w.busy.pid)
        busy_end = rollup(w.busy.pid)
        zram = zram_stats(ctx.zram)
        swap_used = swap_in_use(ctx.zram)
        agent_rss = status_kb(ctx.agent_pid, "VmRSS") * 1024

        # Nothing lost: every Redis digest and every heap checksum as before (reading faults it all back in).
        data = {r.name: {"before": digests[r.name], "after": r.digest()} for r in [w.busy, *w.idle_redis]}
        data |= {h.name: {"before": h.checksum_at_start, "after": h.checksum()} for h in w.heaps}
        data_ok = all(d["before"] == d["after"] for d in data.values())
        load_after = loadavg()

    anon_base = sum(b["anon"] for b in base.values())
    curve = []
    for s in samples:
        paged = sum(max(0, base[n]["anon"] - s["idle"][n]["anon"]) for n in base)
        curve.append((s["t"], paged / anon_base if anon_base else 0.0))
    t90 = next((t for t, frac in curve if frac >= PAGED_OUT_GOAL), None)
    last = samples[-1]["idle"] if samples else base
    idle_pid_set = set(idle_pids.values())
    acted = [e for e in (proc.events if proc else []) if e.get("event") in ("pageout", "cold")]
    first_idle_action = next((e["_t"] for e in acted if e.get("pid") in idle_pid_set or "pid" not in e), None)
    busy_actions = [e for e in acted if e.get("pid") == w.busy.pid]
    # The first pass: blunt's loop times each pass itself; autoreclaim's actions are timed by arrival.
    first_pass: dict[str, Any] = {}
    if controller == "blunt" and acted:
        e = acted[0]
        moved = e["rss_before"] - e["rss_after"]
        first_pass = {"seconds": e.get("seconds"), "bytes": moved, "processes": e.get("processes")}
    elif acted:
        idle_acts = [e for e in acted if e.get("pid") in idle_pid_set]
        if idle_acts:
            first_pass = {
                "seconds": round(idle_acts[-1]["_t"] - idle_acts[0]["_t"], 3),
                "bytes": sum(e["rss_before"] - e["rss_after"] for e in idle_acts),
                "processes": len(idle_acts),
            }
    counts: dict[str, int] = {}
    for e in proc.events if proc else []:
        counts[str(e.get("event"))] = counts.get(str(e.get("event")), 0) + 1
    summary_event = next((e for e in reversed(proc.events) if e.get("event") == "summary"), None) if proc else None
    return {
        "controller": controller,
        "round": round_index,
        "run": run_index,
        "seconds": round(elapsed, 3),
        "load_average": {"before": load_before, "after": load_after},
        "idle": {
            "anon_before": anon_base,
            "swap_before": sum(b["swap"] for b in base.values()),
            "anon_after": sum(v["anon"] for v in last.values()),
            "swap_after": sum(v["swap"] for v in last.values()),
            "paged_out_fraction": curve[-1][1] if curve else 0.0,
            "peak_paged_out_fraction": max((f for _, f in curve), default=0.0),
            "seconds_to_90": t90,
            "first_action_seconds": first_idle_action,
            "per_process": {n: {"before": base[n], "after": last[n]} for n in base},
            "curve": [[t, round(f, 4)] for t, f in curve],
        },
        "busy": load.summary()
        | split_at_first_action(load.chunks, acted[0]["_t"] if acted else None)
        | {
            "rss_before": busy_base["rss"],
            "rss_after": busy_end["rss"],
            "swap_after": busy_end["swap"],
            "major_faults": busy_faults1 - busy_faults0,
            "cpu_seconds": round(busy_cpu1 - busy_cpu0, 3),
            "actions_on_it": len(busy_actions),
            "chunk_detail": load.chunks,
        },
        "agent_cpu_seconds": round(agent_cpu1 - agent_cpu0, 3),
        "controller_cpu_seconds": round(proc.cpu_seconds, 3) if proc else 0.0,
        "controller_max_rss": controller_hwm,
        "agent_rss_after": agent_rss,
        "first_pass": first_pass,
        "controller_exit": proc.returncode if proc else None,
        "controller_events": counts,
        "controller_event_log": (proc.events[:300] if proc else []),
        "controller_summary": summary_event,
        "controller_other_output": proc.other_lines[:20] if proc else [],
        "zram": zram,
        "swap_device_used": swap_used,
        "swap_device_intact": swap_used is not None,
        "sampler_errors": sampler_errors,
        "data_ok": data_ok,
        "data": data,
    }


def split_at_first_action(chunks: list[dict[str, Any]], first: float | None) -> dict[str, Any]:
    """The busy Redis's throughput in the chunks that ended before the controller's first action and in
    those that began after it: a comparison within one run, which other load on the machine (that
    comes and goes between runs) disturbs much less than one between runs."""

    def rate(part: list[dict[str, Any]]) -> float | None:
        seconds = sum(c["seconds"] for c in part)
        return sum(c["requests"] for c in part) / seconds if seconds else None

    if first is None:
        return {"throughput_before_first_action": None, "throughput_after_first_action": None}
    before = [c for c in chunks if c["t"] + c["seconds"] <= first]
    after = [c for c in chunks if c["t"] >= first]
    return {"throughput_before_first_action": rate(before), "throughput_after_first_action": rate(after)}


# ---- judging and the table -------------------------------------------------------------------------


def judge(values: list[float], goal: float, higher_is_better: bool) -> dict[str, Any]:
    """Met or NOT met when every round says so; when the rounds disagree, the median against the
    goal, unless their spread is wider than the median's distance from the goal (then they do not
    settle it either way: unresolved)."""
    finite = [v for v in values if math.isfinite(v)]
    med = statistics.median(values) if values else math.nan
    meets = [v >= goal if higher_is_better else v <= goal for v in values]
    ok = med >= goal if higher_is_better else med <= goal
    margin = abs(med - goal) if math.isfinite(med) else math.inf
    spread = (max(values) - min(values)) if len(finite) == len(values) and values else math.inf
    if all(meets) or not any(meets):
        verdict = "met" if all(meets) else "NOT met"
    else:
        verdict = "unresolved" if spread > margin else "met" if ok else "NOT met"
    return {"verdict": verdict, "median": med, "spread": spread, "margin": margin, "values": values}


def med(values: list[float]) -> float:
    clean = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(clean) if clean else math.nan


def fmt_seconds(v: float | None) -> str:
    return "never" if v is None or not math.isfinite(v) else f"{v:.1f} s"


def mib(v: float) -> str:
    return f"{v / (1 << 20):.0f} MiB"


def cpu_per_request(run: dict[str, Any]) -> float:
    """The busy Redis's CPU time per request served, in microseconds: what faulting its memory back
    costs it shows here, and other load on the machine much less than in throughput."""
    busy = run["busy"]
    return busy["cpu_seconds"] / busy["requests"] * 1e6 if busy["requests"] else math.nan


def within_run_ratio(run: dict[str, Any]) -> float:
    """Throughput after the controller's first action over throughput before it, in one run."""
    before, after = run["busy"].get("throughput_before_first_action"), run["busy"].get("throughput_after_first_action")
    return after / before if before and after else math.nan


def summarize(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = {c: [r for r in runs if r["controller"] == c] for c in args.controllers}
    base_tput = {r["round"]: r["busy"]["throughput"] for r in by.get("none", [])}
    base_p99 = {r["round"]: r["busy"]["p99_ms"] for r in by.get("none", [])}
    base_cpu = {r["round"]: cpu_per_request(r) for r in by.get("none", [])}
    rows = {}
    for c, rs in by.items():
        if not rs:
            continue
        ratios = [r["busy"]["throughput"] / base_tput[r["round"]] for r in rs if base_tput.get(r["round"])]
        p99_ratios = [r["busy"]["p99_ms"] / base_p99[r["round"]] for r in rs if base_p99.get(r["round"])]
        t90 = [r["idle"]["seconds_to_90"] for r in rs]
        rows[c] = {
            "rounds": len(rs),
            "idle_anon_before": med([r["idle"]["anon_before"] for r in rs]),
            "paged_out_fraction": med([r["idle"]["paged_out_fraction"] for r in rs]),
            "seconds_to_90": med([math.inf if t is None else t for t in t90]),
            "seconds_to_90_values": t90,
            "first_action_seconds": med([r["idle"]["first_action_seconds"] for r in rs]),
            "throughput": med([r["busy"]["throughput"] for r in rs]),
            "throughput_ratio": med(ratios),
            "within_run_ratio": med([within_run_ratio(r) for r in rs]),
            "throughput_ratios": ratios,
            "p99_ms": med([r["busy"]["p99_ms"] for r in rs]),
            "p99_ratio": med(p99_ratios),
            "p99_worst_ms": med([r["busy"]["p99_worst_ms"] for r in rs]),
            "busy_major_faults": med([r["busy"]["major_faults"] for r in rs]),
            "busy_swap_after": med([r["busy"]["swap_after"] for r in rs]),
            "busy_cpu_seconds": med([r["busy"]["cpu_seconds"] for r in rs]),
            "busy_cpu_us_per_request": med([cpu_per_request(r) for r in rs]),
            "busy_cpu_per_request_ratio": med(
                [cpu_per_request(r) / base_cpu[r["round"]] for r in rs if base_cpu.get(r["round"])]
            ),
            "agent_cpu_seconds": med([r["agent_cpu_seconds"] for r in rs]),
            "controller_cpu_seconds": med([r["controller_cpu_seconds"] for r in rs]),
            "zram_mem_used": med([r["zram"].get("mem_used_total", 0) for r in rs]),
            "zram_compr_data": med([r["zram"].get("compr_data_size", 0) for r in rs]),
            "controller_max_rss": med([r["controller_max_rss"] for r in rs]),
            "agent_rss_after": med([r["agent_rss_after"] for r in rs]),
            "first_pass_seconds": med([r["first_pass"].get("seconds") for r in rs]),
            "first_pass_bytes": med([r["first_pass"].get("bytes") for r in rs]),
            "zram_orig_data": med([r["zram"].get("orig_data_size", 0) for r in rs]),
            "data_ok": all(r["data_ok"] for r in rs),
        }
    return rows


def goals(args: argparse.Namespace, runs: list[dict[str, Any]], rows: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = deadline_seconds(args)
    auto = [r for r in runs if r["controller"] == "autoreclaim"]
    if auto:
        t90 = [math.inf if r["idle"]["seconds_to_90"] is None else r["idle"]["seconds_to_90"] for r in auto]
        j = judge(t90, deadline, higher_is_better=False)
        limits = []
        if j["verdict"] != "met":
            first = rows["autoreclaim"]["first_action_seconds"]
            limits.append(
                f"first advice to an idle process at {fmt_seconds(first)} (a process must be seen idle for"
                f" --idle-seconds {args.idle_seconds:g} first, at --interval {args.interval:g})"
            )
            limits.append(
                f"paged out at the end: {rows['autoreclaim']['paged_out_fraction']:.0%} of"
                f" {mib(rows['autoreclaim']['idle_anon_before'])} idle anonymous memory"
                " (the rest not chosen, not reclaimable, or faulted back in)"
            )
        out.append(
            {
                "goal": f">= {PAGED_OUT_GOAL:.0%} of idle anonymous memory paged out within 2 x idle-seconds +"
                f" interval = {deadline:g} s (autoreclaim)",
                **j,
                "limits": limits,
            }
        )
        if "none" in rows:
            ratios = rows["autoreclaim"]["throughput_ratios"]
            j = judge(ratios, THROUGHPUT_GOAL, higher_is_better=True)
            limits = []
            if j["verdict"] != "met":
                a = rows["autoreclaim"]
                cores = os.cpu_count() or 1
                share = (a["agent_cpu_seconds"] + a["controller_cpu_seconds"]) / (args.duration * cores)
                limits.append(
                    f"agent {a['agent_cpu_seconds']:.2f} s + controller {a['controller_cpu_seconds']:.2f} s CPU"
                    f" in a {args.duration:g} s run = {share:.1%} of {cores} cores, taken from Redis and"
                    " redis-benchmark"
                )
                if math.isfinite(a["within_run_ratio"]):
                    limits.append(
                        f"within its own runs the busy Redis served {a['within_run_ratio']:.1%} after autoreclaim's"
                        " first pageout of what it served before it (the same run, the same neighbours)"
                    )
                if a["busy_major_faults"] or a["busy_swap_after"]:
                    limits.append(
                        f"busy Redis: {a['busy_major_faults']:.0f} major faults, {mib(a['busy_swap_after'])} in swap"
                        " at the end: its own memory was paged out and faulted back"
                    )
                else:
                    limits.append("busy Redis: no major faults, nothing in swap: its memory was left alone")
                if j["verdict"] == "unresolved":
                    ratios_text = ", ".join(f"{r:.1%}" for r in ratios)
                    limits.append(
                        f"the rounds disagree (ratios {ratios_text}) by more than the median's distance from"
                        f" {THROUGHPUT_GOAL:.0%}: other load on the machine (see the load average); run more --rounds"
                    )
            beside = rows.get("blunt", {}).get("throughput_ratio")
            out.append(
                {
                    "goal": f"busy throughput >= {THROUGHPUT_GOAL:.0%} of no controller (autoreclaim; blunt: "
                    + (f"{beside:.1%})" if beside is not None and math.isfinite(beside) else "not run)"),
                    **j,
                    "limits": limits,
                }
            )
    unsampled = [
        f"{r['controller']} round {r['round'] + 1}: {r['sampler_errors'][0]}" for r in runs if r["sampler_errors"]
    ]
    if unsampled:
        out.append(
            {
                "goal": "every workload sampled to the end of every run",
                "verdict": "NOT met",
                "limits": [f"sampling stopped in {', '.join(unsampled)}: rerun"],
            }
        )
    broken = [f"{r['controller']} round {r['round'] + 1}" for r in runs if not r["swap_device_intact"]]
    if broken:
        out.append(
            {
                "goal": "the bench's own swap device stayed swap through every run",
                "verdict": "NOT met",
                "limits": [f"gone (someone else's swapoff?) by the end of: {', '.join(broken)}: rerun"],
            }
        )
    lost = [f"{r['controller']} round {r['round'] + 1}" for r in runs if not r["data_ok"]]
    out.append(
        {
            "goal": "nothing lost (Redis DEBUG DIGEST and heap checksums equal before and after, every run)",
            "verdict": "met" if not lost else "NOT met",
            "limits": [f"changed in: {', '.join(lost)}"] if lost else [],
        }
    )
    return out


def table(args: argparse.Namespace, rows: dict[str, Any]) -> str:
    head = (
        "controller", "idle paged out", "to 90%", "busy ops/s", "vs none", "p99 ms", "vs none",
        "Redis CPU/req", "vs none", "busy majflt", "agent CPU", "ctrl CPU", "data",
    )  # fmt: skip
    lines = [head]
    for c, r in rows.items():
        ratio = r["throughput_ratio"]
        lines.append(
            (
                c,
                f"{r['paged_out_fraction']:.0%} of {mib(r['idle_anon_before'])}",
                fmt_seconds(r["seconds_to_90"]),
                f"{r['throughput']:,.0f}",
                "-" if c == "none" or not math.isfinite(ratio) else f"{ratio:.1%}",
                f"{r['p99_ms']:.3f}",
                "-" if c == "none" or not math.isfinite(r["p99_ratio"]) else f"{r['p99_ratio']:.2f}x",
                f"{r['busy_cpu_us_per_request']:.1f} us",
                "-" if c == "none" or not math.isfinite(r["busy_cpu_per_request_ratio"])
                else f"{r['busy_cpu_per_request_ratio']:.2f}x",
                f"{r['busy_major_faults']:,.0f}",
                f"{r['agent_cpu_seconds']:.2f} s",
                f"{r['controller_cpu_seconds']:.2f} s",
                "ok" if r["data_ok"] else "CHANGED",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )


def costs_table(rows: dict[str, Any]) -> str:
    """Where the time and memory go, per controller (medians)."""
    head = ("controller", "agent CPU", "ctrl CPU", "ctrl max RSS", "agent RSS", "first pass", "in zram",
            "zram holds it in")  # fmt: skip
    lines = [head]
    for c, r in rows.items():
        if c == "none":
            continue
        seconds, moved = r["first_pass_seconds"], r["first_pass_bytes"]
        first = "-" if not math.isfinite(seconds) else f"{mib(moved)} in {seconds:.2f} s"
        lines.append(
            (
                c,
                f"{r['agent_cpu_seconds']:.2f} s",
                f"{r['controller_cpu_seconds']:.2f} s",
                mib(r["controller_max_rss"]),
                mib(r["agent_rss_after"]),
                first,
                mib(r["zram_orig_data"]),
                mib(r["zram_mem_used"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )


def goal_lines(judged: list[dict[str, Any]]) -> list[str]:
    lines = []
    for g in judged:
        detail = ""
        if "median" in g:
            spread = "n/a (1 round)" if len(g["values"]) < 2 else f"{g['spread']:.3g}"
            detail = f" (median {g['median']:.3g}, spread {spread}, margin {g['margin']:.3g})"
        lines.append(f"  [{g['verdict']}] {g['goal']}{detail}")
        label = "why" if g["verdict"] == "unresolved" else "limited by"
        lines += [f"      {label}: {why}" for why in g["limits"]]
    return lines


# ---- main ------------------------------------------------------------------------------------------


def interrupt(*_: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so every cleanup runs."""
    raise KeyboardInterrupt


def schedule(controllers: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """Every controller once per round, starting one further along each round."""
    order = []
    for r in range(rounds):
        shift = r % len(controllers)
        order += [(r, c) for c in [*controllers[shift:], *controllers[:shift]]]
    return order


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench-reclaim: run as root (cgroups, zram swap, other processes' memory)", file=sys.stderr)
        return 2
    missing = [t for t in REDIS_TOOLS if shutil.which(t) is None]
    if missing:
        print(
            f"bench-reclaim: {', '.join(missing)} not found: apt-get install redis-server redis-tools"
            " (make bench-reclaim does)",
            file=sys.stderr,
        )
        return 2
    if CGROUP2 is None:
        print("bench-reclaim: no cgroup v2 hierarchy is mounted", file=sys.stderr)
        return 2
    if "autoreclaim" in args.controllers:
        ok, why = autoreclaim_available()
        if not ok:
            progress(f"skipping autoreclaim: this vmctl has no autoreclaim command ({why})")
            args.controllers = tuple(c for c in args.controllers if c != "autoreclaim")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    machine = harness.machine_info()
    settings = vars(args) | {"json": str(args.json), "deadline_seconds": deadline_seconds(args)}
    runs: list[dict[str, Any]] = []
    order = schedule(args.controllers, args.rounds)
    with contextlib.ExitStack() as stack:
        workdir = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vmctl-bench-reclaim-")))
        swap = stack.enter_context(zram_swap_device("4G"))
        if swap is None:
            print("bench-reclaim: this kernel has no zram: nothing can be paged out", file=sys.stderr)
            return 2
        groups = stack.enter_context(cgroup_tree(f"vmctl-bench-{os.getpid()}", ("busy", "idle")))
        agent = stack.enter_context(harness.agent(workdir, []))
        assert agent.proc is not None
        ctx = Context(args, groups, workdir, agent.address, agent.proc.pid, swap)
        progress(
            f"{len(order)} runs of {args.duration:g} s ({', '.join(args.controllers)} x {args.rounds} rounds);"
            f" cgroup {cgroup_name(groups[''])}, swap {swap}"
        )
        for i, (round_index, controller) in enumerate(order):
            began = time.monotonic()
            result = run_once(ctx, controller, round_index, i)
            runs.append(result)
            progress(
                f"run {i + 1}/{len(order)} round {round_index + 1} {controller}:"
                f" idle paged out {result['idle']['paged_out_fraction']:.0%}"
                f" (90% at {fmt_seconds(result['idle']['seconds_to_90'])}),"
                f" busy {result['busy']['throughput']:,.0f} ops/s, p99 {result['busy']['p99_ms']:.3f} ms,"
                f" data {'ok' if result['data_ok'] else 'CHANGED'} ({time.monotonic() - began:.0f} s)"
            )
            if not result["swap_device_intact"]:
                progress(f"WARNING: {swap} is no longer swap (swapoff by someone else?): this run is not valid")
    rows = summarize(args, runs)
    judged = goals(args, runs, rows)
    text = table(args, rows)
    load = loadavg()
    header = (
        f"vmctl reclaim bench: {machine['kernel']}, {machine['cpu']}, {machine['cores']} cores;"
        f" medians of {args.rounds} interleaved round(s) of {args.duration:g} s;"
        f" idle-seconds {args.idle_seconds:g}, interval {args.interval:g};"
        f" load average {machine['load_average'][0]:.2f} at start, {load[0]:.2f} at end"
    )
    print(header)
    print()
    print(text)
    costs = costs_table(rows)
    if costs.count("\n"):
        print()
        print(f"where the time and memory go (each {args.duration:g} s run; zram at the end of it):")
        print(costs)
    print()
    print("goals:")
    print("\n".join(goal_lines(judged)))
    results = {
        "machine": machine | {"load_average_end": load},
        "settings": settings,
        "table": text,
        "costs": costs,
        "summary": rows,
        "goals": judged,
        "runs": runs,
    }
    args.json.write_text(dumps(results))
    print(f"\nwrote {args.json}")
    return 0


CHUNK_COLUMNS = ["t", "seconds", "requests", "SET rps", "GET rps", "SET p99 ms", "GET p99 ms"]


def compact(results: dict[str, Any]) -> dict[str, Any]:
    """The benchmark chunks as rows of CHUNK_COLUMNS, so the file stays readable."""
    for run in results["runs"]:
        busy = run["busy"]
        if busy.get("chunk_detail") and isinstance(busy["chunk_detail"][0], dict):
            busy["chunk_columns"] = CHUNK_COLUMNS
            busy["chunk_detail"] = [
                [c["t"], c["seconds"], c["requests"]]
                + [c["tests"].get(test, {}).get(key) for key in ("rps", "p99_latency_ms") for test in ("SET", "GET")]
                for c in busy["chunk_detail"]
            ]
    return results


def dumps(results: dict[str, Any]) -> str:
    """Indented JSON with every innermost list (a chunk, a curve point) on one line. JSON strings
    hold no raw newline, so taking out newlines and indents changes only the layout."""
    text = json.dumps(_finite(compact(results)), indent=2)
    one_line = re.compile(r"\[[^\[\]{}]*\]")
    return one_line.sub(lambda m: re.sub(r"\n\s*", " ", m.group(0)).replace("[ ", "[").replace(" ]", "]"), text) + "\n"


def _finite(value: Any) -> Any:
    """JSON has no infinity or NaN: "never" and "not measured" are null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, pathlib.Path):
        return str(value)
    return value


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench-reclaim: interrupted; the agent, the workloads, the cgroups and the swap device are gone",
              file=sys.stderr)  # fmt: skip
        sys.exit(130)

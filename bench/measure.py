"""Timing: interleaved repetitions, the pageout loops vmctl is measured
against, and the processes that load the agent or probe its health.

Load and health run in their own processes (spawned, not forked: gRPC does
not survive fork), so neither the bench's GIL nor its parsing of large
replies can slow what they measure.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmctl_server.core import kernel

UIO_MAXIOV = kernel.UIO_MAXIOV


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class Variant:
    """One thing to time. ``prepare`` (untimed) runs before every timed
    ``run`` and hands it what it needs; ``run`` may return facts (syscall
    counts) recorded beside the time, and ``after`` (untimed) may add more.
    A fact "seconds" replaces the time measured around ``run`` (the C floor
    helper times its own work, without the pipe to it). Variants with the
    same ``pair`` run back to back in every round, in alternating order, so
    that neither always follows the same neighbour."""

    name: str
    run: Callable[[Any], dict | None]
    prepare: Callable[[], Any] = lambda: None
    after: Callable[[Any, dict], None] = lambda prepared, facts: None  # untimed, may add facts
    pair: str = ""


@dataclass
class Samples:
    seconds: list[float] = field(default_factory=list)
    facts: list[dict] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def iqr(self) -> float:
        return iqr(self.seconds)


def iqr(values: list[float]) -> float:
    """The interquartile range: how far the middle half of the rounds spread."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def _order(variants: list[Variant], rep: int) -> list[Variant]:
    """The round's order: rotated one further each round, each pair kept
    together, its two members swapped every other round."""
    units: list[list[Variant]] = []
    for variant in variants:
        if variant.pair and units and units[-1][0].pair == variant.pair:
            units[-1].append(variant)
        else:
            units.append([variant])
    shift = rep % len(units)
    ordered = units[shift:] + units[:shift]
    return [v for unit in ordered for v in (reversed(unit) if rep % 2 else unit)]


def interleaved(variants: list[Variant], reps: int, warmup: int = 1) -> dict[str, Samples]:
    """Round-robin: every repetition times each variant once, starting one
    further along each time, so drift (other load, frequency, caches) hits
    all of them alike. The warm-up rounds are not recorded."""
    samples = {v.name: Samples() for v in variants}
    for rep in range(-warmup, reps):
        for variant in _order(variants, rep):
            prepared = variant.prepare()
            start = time.perf_counter()
            facts = variant.run(prepared) or {}
            elapsed = time.perf_counter() - start
            elapsed = facts.pop("seconds", elapsed)
            variant.after(prepared, facts)
            if rep >= 0:
                samples[variant.name].seconds.append(elapsed)
                samples[variant.name].facts.append(facts)
    return samples


# ---- the pageout loops vmctl's AdviseRanges is measured against ---------------


class Iovecs:
    """A prebuilt iovec array for ranges: building it is not the kernel's
    work, so it happens before the clock starts."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.count = len(ranges)
        self.lengths = [end - start for start, end in ranges]
        self.array = kernel.ffi.new("struct iovec[]", max(1, self.count))
        for i, (start, _end) in enumerate(ranges):
            self.array[i].iov_base = kernel.ffi.cast("void *", start)
            self.array[i].iov_len = self.lengths[i]


def pageout_batched(pid: int, iovecs: Iovecs) -> dict:
    """The floor: process_madvise(MADV_PAGEOUT) with up to UIO_MAXIOV iovecs
    per call, resuming after a short count (and skipping an iovec that fails)."""
    pidfd = kernel.pidfd_open(pid)
    iov, lengths, n = iovecs.array, iovecs.lengths, iovecs.count
    calls = resumes = advised = 0
    i = 0
    try:
        while i < n:
            stop = kernel.batch_end(lengths, i)
            result = kernel.process_madvise(pidfd, iov + i, stop - i, kernel.MADV_PAGEOUT)
            calls += 1
            if result == -errno.EINTR:
                continue
            if result < 0:
                i += 1
                resumes += 1
                continue
            advised += result
            while i < stop and result >= iov[i].iov_len:
                result -= iov[i].iov_len
                i += 1
            if i < stop:
                resumes += 1
                iov[i].iov_base = kernel.ffi.cast("char *", iov[i].iov_base) + result
                iov[i].iov_len -= result
                lengths[i] -= result
    finally:
        os.close(pidfd)
    return {"syscalls": calls, "resumes": resumes, "advised_bytes": advised}


def pageout_per_vma(pid: int, iovecs: Iovecs) -> dict:
    """The design the seed argues against: one process_madvise per VMA."""
    pidfd = kernel.pidfd_open(pid)
    advised = 0
    try:
        for i in range(iovecs.count):
            advised += max(0, kernel.process_madvise(pidfd, iovecs.array + i, 1, kernel.MADV_PAGEOUT))
    finally:
        os.close(pidfd)
    return {"syscalls": iovecs.count, "advised_bytes": advised}


# ---- concurrent clients --------------------------------------------------------

_spawn = multiprocessing.get_context("spawn")


def _load_worker(address: str, pid: int, attrs: tuple[str, ...], seconds: float, ready, start, results) -> None:
    from vmctl_client import Client

    with Client(address) as client:
        len(client.get_vma_info(pid, attrs=attrs).vmas)  # connected and warm
        ready.put(True)
        start.wait()
        latencies = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            began = time.perf_counter()
            len(client.get_vma_info(pid, attrs=attrs).vmas)
            latencies.append(time.perf_counter() - began)
    results.put(latencies)


@dataclass
class LoadResult:
    clients: int
    seconds: float
    latencies: list[float]

    @property
    def calls_per_second(self) -> float:
        return len(self.latencies) / self.seconds


def concurrent_load(
    address: str, pid: int, attrs: tuple[str, ...], clients: int, seconds: float, on_start: Callable[[], None]
) -> LoadResult:
    """``clients`` processes, each one Client calling GetVmaInfo back to back
    for ``seconds``; ``on_start`` runs once all are connected, just before
    they are let go."""
    ready, results, start = _spawn.Queue(), _spawn.Queue(), _spawn.Event()
    workers = [
        _spawn.Process(target=_load_worker, args=(address, pid, attrs, seconds, ready, start, results), daemon=True)
        for _ in range(clients)
    ]
    try:
        for worker in workers:
            worker.start()
        for _ in workers:
            ready.get(timeout=120)
        on_start()
        began = time.perf_counter()
        start.set()
        latencies = [x for _ in workers for x in results.get(timeout=seconds + 120)]
        elapsed = time.perf_counter() - began
        for worker in workers:
            worker.join()
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()
    return LoadResult(clients, elapsed, latencies)


def _phased_worker(
    addresses: list[str], pid: int, attrs: tuple[str, ...], seconds: float, ready, starts, results
) -> None:
    from vmctl_client import Client

    clients = {address: Client(address) for address in set(addresses)}
    for client in clients.values():
        len(client.get_vma_info(pid, attrs=attrs).vmas)  # connected and warm
    ready.put(True)
    for phase, address in enumerate(addresses):
        starts[phase].wait()
        client, latencies = clients[address], []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            began = time.perf_counter()
            len(client.get_vma_info(pid, attrs=attrs).vmas)
            latencies.append(time.perf_counter() - began)
        results.put((phase, latencies))
    for client in clients.values():
        client.close()


def phased_load(
    addresses: list[str], pid: int, attrs: tuple[str, ...], clients: int, seconds: float
) -> list[LoadResult]:
    """``clients`` processes, each with a Client on every address, connected
    once; then, phase by phase, all of them call GetVmaInfo back to back on
    ``addresses[phase]`` for ``seconds`` (phases alternate transports, so
    drift hits both)."""
    ready, results = _spawn.Queue(), _spawn.Queue()
    starts = [_spawn.Event() for _ in addresses]
    workers = [
        _spawn.Process(
            target=_phased_worker, args=(addresses, pid, attrs, seconds, ready, starts, results), daemon=True
        )
        for _ in range(clients)
    ]
    phases: list[LoadResult] = []
    try:
        for worker in workers:
            worker.start()
        for _ in workers:
            ready.get(timeout=300)
        for phase, event in enumerate(starts):
            began = time.perf_counter()
            event.set()
            latencies = []
            for _ in workers:
                got_phase, got = results.get(timeout=seconds + 120)
                assert got_phase == phase
                latencies += got
            phases.append(LoadResult(clients, time.perf_counter() - began, latencies))
        for worker in workers:
            worker.join(timeout=60)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()
    return phases


# ---- the C floors ---------------------------------------------------------------


class Floor:
    """bench/floor.c, compiled into ``directory`` and running: each call one
    command, timed by the helper itself (CLOCK_MONOTONIC around the work)."""

    def __init__(self, source: str, directory: str) -> None:
        import subprocess

        binary = os.path.join(directory, "floor")
        subprocess.run(["cc", "-O2", "-Wall", "-o", binary, source], check=True)
        self.proc = subprocess.Popen([binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, *words: object) -> tuple[float, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(" ".join(str(w) for w in words) + "\n")
        self.proc.stdin.flush()
        ns, value = self.proc.stdout.readline().split()
        return int(ns) / 1e9, int(value)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def agent_cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in ns (/proc/PID/task/*/schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


# ---- health while the agent is busy -------------------------------------------


def _health_prober(address: str, interval: float, ready, stop, results) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        ready.put(True)
        probes = []
        while not stop.is_set():
            wall = time.time()
            began = time.perf_counter()
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            probes.append((wall, time.perf_counter() - began))
            time.sleep(interval)
    results.put(probes)


def health_during(address: str, busy: Callable[[], None], calls: int, interval: float = 0.005) -> dict:
    """Health-check latency from another process while ``busy`` runs ``calls``
    times back to back: the probes that overlapped a busy call, and those
    that did not (the idle baseline)."""
    ready, stop, results = _spawn.Queue(), _spawn.Event(), _spawn.Queue()
    prober = _spawn.Process(target=_health_prober, args=(address, interval, ready, stop, results), daemon=True)
    busy_windows = []
    try:
        prober.start()
        ready.get(timeout=120)
        time.sleep(0.2)  # some idle probes first
        for _ in range(calls):
            began = time.time()
            busy()
            busy_windows.append((began, time.time()))
        time.sleep(0.2)
        stop.set()
        probes = results.get(timeout=60)
        prober.join()
    finally:
        if prober.is_alive():
            prober.kill()
            prober.join()

    def overlaps(wall: float, latency: float) -> bool:
        return any(wall < end and wall + latency > begin for begin, end in busy_windows)

    during = [latency for wall, latency in probes if overlaps(wall, latency)]
    idle = [latency for wall, latency in probes if not overlaps(wall, latency)]
    return {
        "busy_calls": calls,
        "busy_seconds": [end - begin for begin, end in busy_windows],
        "probes_during": len(during),
        "during_max": max(during, default=0.0),
        "during_p50": percentile(during, 50) if during else 0.0,
        "during_p99": percentile(during, 99) if during else 0.0,
        "idle_p50": percentile(idle, 50) if idle else 0.0,
    }

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
    counts) recorded beside the time, and ``after`` (untimed) may add more."""

    name: str
    run: Callable[[Any], dict | None]
    prepare: Callable[[], Any] = lambda: None
    after: Callable[[Any, dict], None] = lambda prepared, facts: None  # untimed, may add facts


@dataclass
class Samples:
    seconds: list[float] = field(default_factory=list)
    facts: list[dict] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def interleaved(variants: list[Variant], reps: int, warmup: int = 1) -> dict[str, Samples]:
    """Round-robin: every repetition times each variant once, starting one
    further along each time, so drift (other load, frequency, caches) hits
    all of them alike. The warm-up rounds are not recorded."""
    samples = {v.name: Samples() for v in variants}
    for rep in range(-warmup, reps):
        shift = rep % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            prepared = variant.prepare()
            start = time.perf_counter()
            facts = variant.run(prepared) or {}
            elapsed = time.perf_counter() - start
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

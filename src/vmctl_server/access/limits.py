"""Per-identity limits: calls in flight and a token-bucket rate.

Each VmControl call is admitted under its caller's identity (``uid:0``,
``spiffe://...``); one busy controller can then hold at most
``max_concurrent`` of the agent's workers and spend ``rate`` calls a second
(with bursts of ``burst``), and the rest stay free for everyone else. A call
over a limit is refused at once with RESOURCE_EXHAUSTED (``CONCURRENCY_LIMIT``
or ``RATE_LIMITED`` with ``retry_after_ms``): a refusal costs microseconds, so
a flood drains instead of queueing. Health checks are not VmControl calls and
are never limited.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vmctl_server.core.faults import LimitExceeded

MAX_TRACKED_IDENTITIES = 4096  # idle, full buckets beyond this are forgotten


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> float:
        """0.0 if a token was taken, else the seconds until one is due."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


@dataclass(frozen=True)
class LimitSettings:
    max_concurrent: int  # calls in flight per identity; 0: no limit
    rate: float  # calls per second per identity; 0: no limit
    burst: float


class IdentityLimits:
    def __init__(self, settings: LimitSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._buckets: dict[str, TokenBucket] = {}

    def in_flight(self, identity: str) -> int:
        with self._lock:
            return self._in_flight.get(identity, 0)

    def acquire(self, identity: str) -> None:
        """Take one of ``identity``'s slots (give it back with :meth:`release`), or raise LimitExceeded."""
        settings = self.settings
        with self._lock:
            running = self._in_flight.get(identity, 0)
            if settings.max_concurrent and running >= settings.max_concurrent:
                raise LimitExceeded(
                    f"{identity} already has {running} calls in flight (limit {settings.max_concurrent})",
                    reason="CONCURRENCY_LIMIT",
                    identity=identity,
                    limit=settings.max_concurrent,
                )
            if settings.rate:
                now = self.clock()
                bucket = self._buckets.get(identity)
                if bucket is None:
                    self._forget_idle(now)
                    bucket = self._buckets[identity] = TokenBucket(settings.rate, settings.burst, now)
                wait = bucket.take(now)
                if wait:
                    raise LimitExceeded(
                        f"{identity} exceeds {settings.rate:g} calls/s (burst {settings.burst:g});"
                        f" retry in {wait * 1000:.0f} ms",
                        reason="RATE_LIMITED",
                        identity=identity,
                        retry_after_ms=max(1, round(wait * 1000)),
                    )
            self._in_flight[identity] = running + 1

    def release(self, identity: str) -> None:
        with self._lock:
            left = self._in_flight[identity] - 1
            if left:
                self._in_flight[identity] = left
            else:
                del self._in_flight[identity]

    def _forget_idle(self, now: float) -> None:
        if len(self._buckets) >= MAX_TRACKED_IDENTITIES:
            for name in [name for name, bucket in self._buckets.items() if bucket.full(now)]:
                del self._buckets[name]

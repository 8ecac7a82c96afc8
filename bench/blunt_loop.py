"""The "blunt" controller of bench/reclaim.py: ``vmctl reclaim --cgroup PREFIX``
(pageout of all anonymous memory of every process under the prefix, busy or
not) every INTERVAL seconds for DURATION seconds, through the library call the
CLI makes (vmctl_client.reclaim.reclaim), in one process so that no
interpreter start-up is charged to each pass.

    python3 blunt_loop.py TARGET CGROUP INTERVAL DURATION

One JSON line per pass on standard output (time since start, bytes advised,
rss and swap before and after), and a summary line at the end.
"""

from __future__ import annotations

import json
import signal
import sys
import time

from vmctl_client import Client
from vmctl_client.reclaim import reclaim


def main() -> int:
    target, cgroup, interval, duration = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    start = time.monotonic()
    passes = advised = 0
    with Client(target) as client:
        while not stop and time.monotonic() - start < duration:
            began = time.monotonic()
            report = reclaim(client, cgroup=cgroup, advice="pageout", filter="anonymous")
            passes += 1
            advised += report.advised_bytes
            line = {
                "event": "pageout",
                "t": round(began - start, 3),
                "seconds": round(time.monotonic() - began, 3),
                "processes": len(report.processes),
                "advised_bytes": report.advised_bytes,
                "rss_before": sum(p.rss_before for p in report.processes),
                "rss_after": sum(p.rss_after for p in report.processes),
                "swap_before": sum(p.swap_before for p in report.processes),
                "swap_after": sum(p.swap_after for p in report.processes),
            }
            print(json.dumps(line), flush=True)
            next_pass = began + interval
            while not stop and time.monotonic() < min(next_pass, start + duration):
                time.sleep(0.05)
    print(json.dumps({"event": "summary", "passes": passes, "advised_bytes": advised}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""One-range AdviseRanges under SCOPE_WHOLE and SCOPE_RANGES, on system_server-shaped targets.

    .venv/bin/python bench/scope.py [--reps 31] [--big-vmas N]

A whole-scope call re-reads the whole layout to compare its digest with the
cookie's, so it costs what reading /proc/PID/maps costs; a ranges-scope call
asks PROCMAP_QUERY about the VMAs the range crosses (one here), whatever the
size of the process. Both advise MADV_COLD on one 8-page heap region with the
same cookie (the target holds still, so both pass), interleaved call by call;
the medians and their ratio are printed, and written as JSON with --json.
Needs root (process_madvise); starts its own agent and targets and stops them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import sys
import tempfile
import time

import harness  # sets up sys.path for support.*

from vmctl_client import Client

SYSTEM_SERVER_VMAS = 4204
BIG_VMAS = 65490


def max_map_count() -> int:
    return int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())


def measure(client: Client, pid: int, reps: int) -> dict:
    info = client.get_vma_info(pid)
    heap = next(v for v in info.vmas if v.kind == "anonymous" and v.size == 8 * 4096 and v.perms == "rw-p")
    ranges = [(heap.start, heap.end)]
    times: dict[str, list[float]] = {"whole": [], "ranges": []}
    for _ in range(3):  # warm both paths
        for scope in times:
            client.advise_ranges(pid, ranges, "cold", cookie=info.cookie, scope=scope)  # type: ignore[arg-type]
    for rep in range(reps):
        order = ("whole", "ranges") if rep % 2 == 0 else ("ranges", "whole")
        for scope in order:
            began = time.perf_counter()
            result = client.advise_ranges(pid, ranges, "cold", cookie=info.cookie, scope=scope)  # type: ignore[arg-type]
            times[scope].append(time.perf_counter() - began)
            assert result.scope == scope and result.advised_bytes == heap.size, result.to_json()
    medians = {scope: statistics.median(samples) for scope, samples in times.items()}
    return {
        "vmas": len(info.vmas),
        "whole_ms": round(medians["whole"] * 1e3, 3),
        "ranges_ms": round(medians["ranges"] * 1e3, 3),
        "ratio": round(medians["whole"] / medians["ranges"], 1),
        "reps": reps,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=31, help="calls of each scope per target (default 31)")
    parser.add_argument(
        "--big-vmas", type=int, help=f"VMAs of the big target (default min({BIG_VMAS}, max_map_count - 40))"
    )
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows here")
    args = parser.parse_args()
    sizes = [SYSTEM_SERVER_VMAS, args.big_vmas or min(BIG_VMAS, max_map_count() - 40)]
    rows = []
    with contextlib.ExitStack() as stack:
        scratch = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vmctl-bench-scope-")))
        agent = stack.enter_context(harness.agent(scratch, []))
        client = stack.enter_context(Client(agent.address))
        for vmas in sizes:
            with harness.target(vmas, scratch / "files") as target:
                rows.append(measure(client, target.pid, args.reps))
                print(
                    f"{rows[-1]['vmas']:>6} VMAs: whole {rows[-1]['whole_ms']:.2f} ms,"
                    f" ranges {rows[-1]['ranges_ms']:.2f} ms (x{rows[-1]['ratio']}), medians of {args.reps}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps({"machine": harness.machine_info(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

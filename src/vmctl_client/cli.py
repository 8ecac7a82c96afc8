"""vmctl: the command line for vmctl agents.

    vmctl [--target ADDR]... COMMAND [-o table|json]

Exit status: 0 done, 1 error, 2 usage, 3 stale cookie or changed process.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vmctl_client.channel import DEFAULT_TARGET, DEFAULT_TIMEOUT, TARGET_ENV, TlsOptions, default_target
from vmctl_client.client import Client
from vmctl_client.errors import StaleCookieError, VmctlError
from vmctl_client.proto import vmctl_pb2 as pb
from vmctl_client.types import ADVICE_NAMES, ATTR_WORDS, FILTER_NAMES, AdviceResult, VmaInfo, attr_mask

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_STALE = 0, 1, 2, 3
# For several targets the exit status is the worst one: an error outranks a
# stale cookie, which a retry may cure.
_SEVERITY = {EXIT_OK: 0, EXIT_STALE: 1, EXIT_ERROR: 2}


def parse_address(text: str) -> int:
    """Hex (0x7f...) or decimal."""
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address (hex 0x... or decimal)") from None


def parse_range(text: str) -> tuple[int, int]:
    start, sep, end = text.partition("-")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected START-END (end exclusive)")
    return parse_address(start), parse_address(end)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
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


# ---- commands: each returns a JSON-able result and renders a table ----------


def run_maps(client: Client, args: argparse.Namespace) -> VmaInfo:
    return client.get_vma_info(args.pid, args.attrs)


# Columns a table shows for an attribute group asked for by name (JSON has them all).
_TABLE_GROUP_WORDS = {
    "residency": ("rss", "swap"),
    "accounting": ("rss", "pss", "swap", "anonymous", "referenced"),
    "all": ("rss", "pss", "swap", "anonymous", "referenced"),
}


def table_maps(info: VmaInfo, args: argparse.Namespace) -> str:
    asked: list[str] = []
    for word in (args.attrs or "").split(","):
        word = word.strip().lower()
        asked += _TABLE_GROUP_WORDS.get(word, (word,))
    numeric = [w for w in info.result_attrs if w not in ("vm_flags", "build_id", "thp_eligible")]
    words = [w for w in dict.fromkeys(asked) if w in numeric]
    headers = ["START", "END", "PERMS", "OFFSET", "DEV", "INODE", *(w.upper() for w in words), "PATH"]
    rows = []
    for vma in info.vmas:
        m = vma.message
        rows.append(
            [
                f"{m.start:x}",
                f"{m.end:x}",
                m.perms,
                f"{m.offset:x}",
                f"{m.dev_major:02x}:{m.dev_minor:02x}",
                str(m.inode),
                *(human_bytes(getattr(vma, w)) for w in words),
                m.path,
            ]
        )
    right = [False, False, False, False, False, True, *([True] * len(words)), False]
    head = (
        f"pid {info.process.pid} ({info.process.comm}), start time {info.process.start_time},"
        f" {len(info.vmas)} VMAs, attrs: {', '.join(['layout', *info.result_attrs])}\n"
        f"cookie {info.cookie_b64}\n"
    )
    return head + format_table(headers, rows, right)


def run_advise(client: Client, args: argparse.Namespace) -> AdviceResult:
    cookie = args.cookie
    if args.all:
        info = client.get_vma_info(args.pid)
        ranges: list[tuple[int, int]] = [(v.start, v.end) for v in info.vmas if v.message.kind != pb.VMA_KIND_SPECIAL]
        cookie = cookie or info.cookie
    else:
        ranges = args.range
        if cookie is None:
            cookie = client.get_vma_info(args.pid).cookie
    return client.advise_ranges(args.pid, ranges, args.advice, cookie=cookie, filter=args.filter, dry_run=args.dry_run)


def table_advise(result: AdviceResult, args: argparse.Namespace) -> str:
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


def run_ps(client: Client, args: argparse.Namespace) -> list[pb.ProcessInfo]:
    return client.list_processes(args.cgroup)


def json_ps(processes: list[pb.ProcessInfo]) -> dict:
    return {
        "processes": [
            {
                "pid": p.pid,
                "start_time": p.start_time,
                "comm": p.comm,
                "cgroup": p.cgroup,
                "container_id": p.container_id,
                "uid": p.uid,
                "ppid": p.ppid,
                "rss": p.rss_bytes,
                "swap": p.swap_bytes,
                "vma_count": p.vma_count,
            }
            for p in processes
        ]
    }


def table_ps(processes: list[pb.ProcessInfo], args: argparse.Namespace) -> str:
    rows = [
        [str(p.pid), p.comm, human_bytes(p.rss_bytes), human_bytes(p.swap_bytes), str(p.vma_count), p.cgroup]
        for p in processes
    ]
    return format_table(["PID", "COMM", "RSS", "SWAP", "VMAS", "CGROUP"], rows, [True, False, True, True, True, False])


def json_node(info: pb.GetNodeInfoResponse) -> dict:
    caps = info.capabilities
    data: dict[str, Any] = {
        "hostname": info.hostname,
        "kernel": info.kernel,
        "machine": info.machine,
        "boot_id": info.boot_id,
        "agent_version": info.agent_version,
        "page_size": info.page_size,
        "mem_total": info.mem_total_bytes,
        "mem_available": info.mem_available_bytes,
        "swap_total": info.swap_total_bytes,
        "swap_free": info.swap_free_bytes,
        "capabilities": {
            "pidfd_open": caps.pidfd_open,
            "process_madvise": caps.process_madvise,
            "advices": [pb.Advice.Name(a).removeprefix("ADVICE_").lower() for a in caps.advices],
            "procmap_query": caps.procmap_query,
            "pagemap_scan": caps.pagemap_scan,
            "advice_permitted": caps.advice_permitted,
            "probe_errors": dict(caps.probe_errors),
        },
    }
    if info.HasField("memory_pressure"):
        data["memory_pressure"] = {
            kind: {
                "avg10": stall.avg10,
                "avg60": stall.avg60,
                "avg300": stall.avg300,
                "total_us": stall.total_us,
            }
            for kind in ("some", "full")
            for stall in [getattr(info.memory_pressure, kind)]
        }
    return data


def table_node(info: pb.GetNodeInfoResponse, args: argparse.Namespace) -> str:
    data = json_node(info)
    caps = data.pop("capabilities")
    lines = [
        f"{key}: {human_bytes(v) if key.startswith(('mem_', 'swap_')) else v}"
        for key, v in data.items()
        if key != "memory_pressure"
    ]
    if "memory_pressure" in data:
        some = data["memory_pressure"]["some"]
        lines.append(f"memory pressure (some): avg10={some['avg10']} avg60={some['avg60']} avg300={some['avg300']}")
    lines.append(
        "capabilities: "
        + ", ".join(
            [
                name
                for name in ("pidfd_open", "process_madvise", "procmap_query", "pagemap_scan", "advice_permitted")
                if caps[name]
            ]
            + [f"advice={a}" for a in caps["advices"]]
        )
    )
    lines += [f"  probe {name}: {why}" for name, why in caps["probe_errors"].items()]
    return "\n".join(lines)


Command = tuple[
    Callable[[Client, argparse.Namespace], Any], Callable[[Any], dict], Callable[[Any, argparse.Namespace], str]
]
COMMANDS: dict[str, Command] = {
    "maps": (run_maps, lambda info: info.to_json(), table_maps),
    "advise": (run_advise, lambda result: result.to_json(), table_advise),
    "ps": (run_ps, json_ps, table_ps),
    "node": (lambda client, args: client.node_info(), json_node, table_node),
}


def build_parser() -> argparse.ArgumentParser:
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "-o", "--output", choices=["table", "json"], default=argparse.SUPPRESS, help="output format (default table)"
    )
    parser = argparse.ArgumentParser(
        prog="vmctl",
        description="Read process address spaces and apply memory advice through vmctl agents.",
        epilog=f"Exit status: 0 done, 1 error, 2 usage, 3 stale cookie or changed process. Target: --target, else"
        f" ${TARGET_ENV}, else {DEFAULT_TARGET}.",
        parents=[output],
    )
    parser.add_argument(
        "--target",
        action="append",
        metavar="ADDR",
        help="agent address: unix:///PATH, HOST:PORT or tcp://HOST:PORT; repeat or comma-separate for several",
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per call (default 30)")
    parser.add_argument("--ca", help="CA certificate (PEM) that signs the agents' certificates")
    parser.add_argument("--cert", help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--key", help="client private key (PEM) for mutual TLS")
    parser.add_argument("--server-name", help="name to expect in the agent's certificate")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    maps = sub.add_parser("maps", parents=[output], help="snapshot of a process's VMAs, with its cookie")
    maps.add_argument("pid", type=int)
    maps.add_argument(
        "--attrs",
        default=None,
        help=f"comma-separated attributes to read (default layout only): {', '.join(ATTR_WORDS)}",
    )

    advise = sub.add_parser(
        "advise",
        parents=[output],
        help="apply memory advice to address ranges",
        description="Apply process_madvise advice to ranges of PID. Without --cookie, a fresh cookie is read first.",
    )
    advise.add_argument("pid", type=int)
    advise.add_argument("--advice", required=True, choices=sorted(ADVICE_NAMES))
    where = advise.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--range",
        action="append",
        type=parse_range,
        metavar="START-END",
        help="page-aligned range, end exclusive, hex (0x...) or decimal; repeatable",
    )
    where.add_argument("--all", action="store_true", help="every VMA of the process")
    advise.add_argument("--filter", choices=sorted(FILTER_NAMES), default="none")
    advise.add_argument("--cookie", help="cookie (base64) from `vmctl maps`; refused if the layout changed since")
    advise.add_argument("--dry-run", action="store_true", help="report what would be advised, change nothing")

    ps = sub.add_parser("ps", parents=[output], help="processes on the node with a memory rollup")
    ps.add_argument("--cgroup", metavar="PREFIX", help="only processes whose cgroup v2 path starts with PREFIX")

    sub.add_parser("node", parents=[output], help="node info and kernel capabilities")
    return parser


def _targets(args: argparse.Namespace) -> list[str]:
    raw = args.target or [default_target()]
    return [t.strip() for item in raw for t in item.split(",") if t.strip()]


def _exit_code(error: VmctlError) -> int:
    return EXIT_STALE if isinstance(error, StaleCookieError) else EXIT_ERROR


def _run_one(target: str, args: argparse.Namespace, tls: TlsOptions) -> tuple[Any, VmctlError | None]:
    run = COMMANDS[args.command][0]
    try:
        with Client(target, tls=tls, timeout=args.timeout) as client:
            return run(client, args), None
    except VmctlError as error:
        return None, error
    except ValueError as error:  # bad cookie base64, bad TLS files, ...
        return None, VmctlError(str(error), code="INVALID_ARGUMENT", target=target)
    except OSError as error:
        return None, VmctlError(str(error), code="UNAVAILABLE", target=target)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `vmctl maps 1 | head` ends quietly
    parser = build_parser()
    args = parser.parse_args(argv)
    output = getattr(args, "output", "table")
    if args.command == "maps" and args.attrs:
        try:
            attr_mask(args.attrs)
        except ValueError as exc:
            parser.error(str(exc))
    tls = TlsOptions(ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name)
    targets = _targets(args)
    _, to_json, to_table = COMMANDS[args.command]
    if len(targets) == 1:
        result, error = _run_one(targets[0], args, tls)
        if error is not None:
            if output == "json":
                print(json.dumps({"error": error.to_json()}, indent=2))
            else:
                print(
                    f"vmctl: {error.code}{' ' + error.reason if error.reason else ''}: {error.message}", file=sys.stderr
                )
            return _exit_code(error)
        print(json.dumps(to_json(result), indent=2) if output == "json" else to_table(result, args))
        return EXIT_OK

    with ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
        outcomes = list(pool.map(lambda t: _run_one(t, args, tls), targets))
    worst = EXIT_OK
    entries = []
    for target, (result, error) in zip(targets, outcomes, strict=True):
        if error is not None:
            worst = max(worst, _exit_code(error), key=_SEVERITY.__getitem__)
            entries.append({"target": target, "error": error.to_json()})
        else:
            entries.append({"target": target, "result": to_json(result)})
    if output == "json":
        print(json.dumps({"results": entries}, indent=2))
    else:
        for target, (result, error) in zip(targets, outcomes, strict=True):
            print(f"== {target}: " + (f"FAILED {error.code} {error.reason}: {error.message}" if error else "ok"))
            if error is None:
                print(to_table(result, args))
    return worst


if __name__ == "__main__":
    sys.exit(main())

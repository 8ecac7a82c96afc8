"""vmctl: the command line for vmctl agents.

    vmctl [--target ADDR]... [--targets-file PATH] COMMAND [-o table|json]

Exit status: 0 done, 1 error, 2 usage, 3 stale cookie or changed process;
with several targets, the worst across them.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from vmctl_client import render
from vmctl_client.channel import DEFAULT_TARGET, DEFAULT_TIMEOUT, TARGET_ENV, TlsOptions, default_target
from vmctl_client.client import Client
from vmctl_client.errors import StaleCookieError, VmctlError
from vmctl_client.fleet import DEFAULT_CONCURRENCY, DEFAULT_HOST_DEADLINE, Fleet, HostResult
from vmctl_client.reclaim import DEFAULT_RETRIES, ERROR, KINDS_BY_FILTER, STALE, ProcessReclaim, ReclaimReport, reclaim
from vmctl_client.targets import parse_dns_target, read_targets_file, split_targets
from vmctl_client.types import ADVICE_NAMES, ATTR_WORDS, FILTER_NAMES, AdviceResult, VmaInfo, attr_mask

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_STALE = 0, 1, 2, 3
# For several targets the exit status is the worst one: an error outranks a
# stale cookie, which a retry may cure.
_SEVERITY = {EXIT_OK: 0, EXIT_STALE: 1, EXIT_ERROR: 2}
_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


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


def parse_size(text: str) -> int:
    """Bytes, with an optional binary unit: 4096, 64K, 1.5M, 2G."""
    number, unit = text.strip().upper().removesuffix("IB"), ""
    if number and number[-1] in _SIZE_UNITS:
        number, unit = number[:-1], number[-1]
    try:
        value = float(number) * _SIZE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or with K, M, G, T)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size cannot be negative")
    return int(value)


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
        return value

    return parse


# ---- progress: a rich bar on a terminal, nothing when piped ------------------


class ProgressBar:
    """A bar on stderr, only when stderr is a terminal (so output that is
    piped or captured stays clean); transient, so the result stays alone."""

    def __init__(self, progress: Progress | None, description: str) -> None:
        self._progress = progress
        self._description = description
        self._task: TaskID | None = None

    def start(self, total: int) -> None:
        if self._progress is not None:
            self._task = self._progress.add_task(self._description, total=total)

    def advance(self, note: str | None = None) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=1, description=note)  # None keeps the description


@contextmanager
def progress_bar(description: str) -> Iterator[ProgressBar]:
    console = Console(stderr=True)
    if not console.is_terminal:
        yield ProgressBar(None, description)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield ProgressBar(progress, description)


# ---- commands: each runs on one client, renders JSON and a table --------------


@dataclass(frozen=True)
class Command:
    run: Callable[[Client, argparse.Namespace, ProgressBar | None], Any]
    to_json: Callable[[Any], dict[str, Any]]
    to_table: Callable[[Any, argparse.Namespace], str]
    exit_code: Callable[[Any], int] = lambda result: EXIT_OK


def run_advise(client: Client, args: argparse.Namespace, _: ProgressBar | None) -> AdviceResult:
    cookie = args.cookie
    if args.all:
        info = client.get_vma_info(args.pid)
        ranges: list[tuple[int, int]] = [(v.start, v.end) for v in info.vmas if v.kind != "special"]
        cookie = cookie or info.cookie
    else:
        ranges = args.range
        if cookie is None:
            cookie = client.get_vma_info(args.pid).cookie
    return client.advise_ranges(args.pid, ranges, args.advice, cookie=cookie, filter=args.filter, dry_run=args.dry_run)


def run_reclaim(client: Client, args: argparse.Namespace, bar: ProgressBar | None) -> ReclaimReport:
    def on_process(outcome: ProcessReclaim) -> None:
        if bar is not None:
            bar.advance(f"reclaim: pid {outcome.pid} {outcome.status}")

    return reclaim(
        client,
        pid=args.pid,
        cgroup=args.cgroup,
        advice=args.advice,
        filter=args.filter,
        min_rss=args.min_rss,
        retries=args.retries,
        dry_run=args.dry_run,
        on_start=bar.start if bar is not None else None,
        on_process=on_process,
    )


def reclaim_exit_code(report: ReclaimReport) -> int:
    """A process that exited or was replaced meanwhile is normal in a cgroup;
    one that kept changing its layout through every retry is a stale cookie."""
    worst = report.worst_status
    return EXIT_ERROR if worst == ERROR else EXIT_STALE if worst == STALE else EXIT_OK


COMMANDS: dict[str, Command] = {
    "maps": Command(
        lambda client, args, _: client.get_vma_info(args.pid, args.attrs),
        VmaInfo.to_json,
        lambda info, args: render.maps_table(info, args.attrs),
    ),
    "advise": Command(run_advise, AdviceResult.to_json, lambda result, _: render.advise_table(result)),
    "reclaim": Command(
        run_reclaim, ReclaimReport.to_json, lambda report, _: render.reclaim_table(report), reclaim_exit_code
    ),
    "ps": Command(
        lambda client, args, _: client.list_processes(args.cgroup),
        lambda processes: {"processes": [p.to_json() for p in processes]},
        lambda processes, _: render.ps_table(processes),
    ),
    "node": Command(
        lambda client, args, _: client.node_info(), lambda info: info.to_json(), lambda info, _: render.node_table(info)
    ),
}


def _distribution_version() -> str:
    try:
        return metadata.version("vmctl")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "-o", "--output", choices=["table", "json"], default=argparse.SUPPRESS, help="output format (default table)"
    )
    parser = argparse.ArgumentParser(
        prog="vmctl",
        description="Read process address spaces and apply memory advice through vmctl agents.",
        epilog="Exit status: 0 done, 1 error, 2 usage, 3 stale cookie or changed process (with several targets, the"
        f" worst). Target: --target / --targets-file, else ${TARGET_ENV}, else {DEFAULT_TARGET}.",
        parents=[output],
    )
    parser.add_argument("--version", action="version", version=f"vmctl {_distribution_version()}")
    where = parser.add_argument_group("targets")
    where.add_argument(
        "--target",
        action="append",
        metavar="ADDR",
        help="agent address: unix:///PATH, HOST:PORT, tcp://HOST:PORT, or dns:///NAME:PORT for every address of"
        " NAME; repeat or comma-separate for several",
    )
    where.add_argument("--targets-file", metavar="PATH", help="more targets, one per line (commas allowed, # comments)")
    where.add_argument(
        "--timeout",
        type=_positive(float),
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="seconds per call (default %(default)g)",
    )
    where.add_argument(
        "--deadline",
        type=_positive(float),
        metavar="S",
        default=DEFAULT_HOST_DEADLINE,
        help="seconds per host for the whole command (default %(default)g)",
    )
    where.add_argument(
        "--concurrency",
        type=_positive(int),
        metavar="N",
        default=DEFAULT_CONCURRENCY,
        help="hosts worked on at once (default %(default)d)",
    )
    tls = parser.add_argument_group("TLS (tcp targets)")
    tls.add_argument("--ca", metavar="PEM", help="CA certificate that signs the agents' certificates")
    tls.add_argument("--cert", metavar="PEM", help="client certificate for mutual TLS")
    tls.add_argument("--key", metavar="PEM", help="client private key for mutual TLS")
    tls.add_argument("--server-name", metavar="NAME", help="name to expect in the agents' certificates")
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
    ranges = advise.add_mutually_exclusive_group(required=True)
    ranges.add_argument(
        "--range",
        action="append",
        type=parse_range,
        metavar="START-END",
        help="page-aligned range, end exclusive, hex (0x...) or decimal; repeatable",
    )
    ranges.add_argument("--all", action="store_true", help="every VMA of the process")
    advise.add_argument("--filter", choices=sorted(FILTER_NAMES), default="none")
    advise.add_argument("--cookie", help="cookie (base64) from `vmctl maps`; refused if the layout changed since")
    advise.add_argument("--dry-run", action="store_true", help="report what would be advised, change nothing")

    reclaim_parser = sub.add_parser(
        "reclaim",
        parents=[output],
        help="read, choose and advise with the cookie; retry when the layout moves",
        description="Snapshot with residency, choose the VMAs the filter admits with at least --min-rss resident,"
        " advise them with the snapshot's cookie, and when the layout changed meanwhile read again and retry"
        " (--retries times, with jitter). Reports rss and swap before and after, per process and in total.",
    )
    who = reclaim_parser.add_mutually_exclusive_group(required=True)
    who.add_argument("pid", type=int, nargs="?", help="one process")
    who.add_argument(
        "--cgroup", metavar="PREFIX", help="every process in cgroup v2 PREFIX or below it (/app: not /app-evil)"
    )
    reclaim_parser.add_argument("--advice", choices=("cold", "pageout"), default="pageout", help="(default pageout)")
    reclaim_parser.add_argument(
        "--filter",
        choices=sorted(KINDS_BY_FILTER),
        default="anonymous",
        help="which VMAs: anonymous (heap, stack, private anonymous; the default), file, or none (both)",
    )
    reclaim_parser.add_argument(
        "--min-rss",
        type=parse_size,
        default=0,
        metavar="BYTES",
        help="only VMAs with at least this much resident (64K, 1M, ...; default: any)",
    )
    reclaim_parser.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        metavar="N",
        help="re-reads after LAYOUT_CHANGED (default %(default)d)",
    )
    reclaim_parser.add_argument("--dry-run", action="store_true", help="report what would be advised, change nothing")

    ps = sub.add_parser("ps", parents=[output], help="processes on the node with a memory rollup")
    ps.add_argument(
        "--cgroup", metavar="PREFIX", help="only processes in cgroup v2 PREFIX or below it (/app: not /app-evil)"
    )

    sub.add_parser("node", parents=[output], help="node info and kernel capabilities")
    return parser


def _targets(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[list[str], bool]:
    """The targets as given, and whether they name a fleet (several, a file, or
    a DNS name): a fleet's output is per host even when it has one host."""
    given = split_targets(args.target or [])
    if args.targets_file:
        try:
            given += read_targets_file(args.targets_file)
        except OSError as exc:
            parser.error(f"--targets-file: {exc.strerror}: {args.targets_file}")
    for target in given:
        if target.startswith("dns:"):
            try:
                parse_dns_target(target)
            except ValueError as exc:
                parser.error(str(exc))
    fleet = len(given) > 1 or bool(args.targets_file) or any(t.startswith("dns:") for t in given)
    return (given or [default_target()]), fleet


def _exit_code(error: VmctlError) -> int:
    return EXIT_STALE if isinstance(error, StaleCookieError) else EXIT_ERROR


def _worst(codes: list[int]) -> int:
    return max(codes, key=_SEVERITY.__getitem__, default=EXIT_OK)


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.command == "maps" and args.attrs:
        try:
            attr_mask(args.attrs)
        except ValueError as exc:
            parser.error(str(exc))
    if args.command == "reclaim" and args.retries < 0:
        parser.error("--retries cannot be negative")


def _print_error(error: VmctlError, output: str) -> None:
    if output == "json":
        print(json.dumps({"error": error.to_json()}, indent=2))
    else:
        print(f"vmctl: {error.code}{' ' + error.reason if error.reason else ''}: {error.message}", file=sys.stderr)


def _run_single(target: str, args: argparse.Namespace, tls: TlsOptions, output: str) -> int:
    command = COMMANDS[args.command]
    fleet = Fleet([target], tls=tls, timeout=args.timeout, host_deadline=args.deadline)
    with progress_bar(args.command) if args.command == "reclaim" else nullcontext(None) as bar:
        (outcome,) = fleet.run(lambda client: command.run(client, args, bar))
    if outcome.error is not None:
        _print_error(outcome.error, output)
        return _exit_code(outcome.error)
    print(
        json.dumps(command.to_json(outcome.value), indent=2)
        if output == "json"
        else command.to_table(outcome.value, args)
    )
    return command.exit_code(outcome.value)


def _run_fleet(targets: list[str], args: argparse.Namespace, tls: TlsOptions, output: str) -> int:
    command = COMMANDS[args.command]
    fleet = Fleet(targets, tls=tls, timeout=args.timeout, host_deadline=args.deadline, concurrency=args.concurrency)
    failed = 0

    with progress_bar(f"{args.command}: {len(fleet.targets)} hosts") as bar:
        bar.start(len(fleet.targets))

        def on_done(result: HostResult[Any]) -> None:
            nonlocal failed
            failed += not result.ok
            bar.advance(f"{args.command}: {failed} failed" if failed else None)

        outcomes = fleet.run(lambda client: command.run(client, args, None), on_done=on_done)
    codes, entries = [], []
    for outcome in outcomes:
        if outcome.error is not None:
            codes.append(_exit_code(outcome.error))
            entries.append({"target": outcome.target, "error": outcome.error.to_json()})
        else:
            codes.append(command.exit_code(outcome.value))
            entries.append({"target": outcome.target, "result": command.to_json(outcome.value)})
    if output == "json":
        print(json.dumps({"results": entries}, indent=2))
    else:
        for outcome in outcomes:
            error = outcome.error
            print(
                f"== {outcome.target}: " + (f"FAILED {error.code} {error.reason}: {error.message}" if error else "ok")
            )
            if error is None:
                print(command.to_table(outcome.value, args))
        print(f"== {len(outcomes) - failed} of {len(outcomes)} hosts ok")
    return _worst(codes)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `vmctl maps 1 | head` ends quietly
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(args, parser)
    output = getattr(args, "output", "table")
    targets, is_fleet = _targets(args, parser)
    tls = TlsOptions(ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name)
    if is_fleet:
        return _run_fleet(targets, args, tls, output)
    return _run_single(targets[0], args, tls, output)


if __name__ == "__main__":
    sys.exit(main())

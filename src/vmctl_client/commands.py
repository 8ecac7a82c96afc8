"""What each vmctl command does once its arguments are read: the calls, the
output, the exit status. Imported only after parsing, so ``--help``,
``--version`` and usage errors never load gRPC or rich.

Exit status: 0 done, 1 error (advice the kernel refused for some range
included), 3 stale cookie, changed process, or ranges advise left out as
changed (RANGE_CHANGED); with several targets, the worst across them (2,
usage, is argparse's, before anything here runs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from vmctl_api.words import Attr
from vmctl_client import render
from vmctl_client.channel import TlsOptions
from vmctl_client.client import Client
from vmctl_client.errors import StaleCookieError, VmctlError
from vmctl_client.fleet import Fleet, HostResult
from vmctl_client.reclaim import ERROR, STALE, ProcessReclaim, ReclaimReport, reclaim
from vmctl_client.types import VmaInfo

EXIT_OK, EXIT_ERROR, EXIT_STALE = 0, 1, 3
# For several targets the exit status is the worst one: an error outranks a
# stale cookie, which a retry may cure.
_SEVERITY = {EXIT_OK: 0, EXIT_STALE: 1, EXIT_ERROR: 2}


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


# ---- commands: each runs on one client, renders a document and a table --------


@dataclass(frozen=True)
class Command:
    run: Callable[[Client, argparse.Namespace, ProgressBar | None], Any]
    to_json: Callable[[Any], dict[str, Any]]
    to_table: Callable[[Any, argparse.Namespace, bool], str]  # (result, args, wide)
    exit_code: Callable[[Any], int] = lambda result: EXIT_OK


RESIDENCY: tuple[Attr, ...] = ("rss", "swap")


def run_advise(client: Client, args: argparse.Namespace, _: ProgressBar | None) -> render.AdviseReport:
    """Read (rss and swap before, and the cookie or the ranges when not given), advise, read rss and swap
    again: advised_bytes counts what the ranges name, the residency what moved."""
    cookie = args.cookie
    before = client.get_vma_info(args.pid, RESIDENCY)
    if args.all:
        if cookie is not None and cookie != before.cookie:
            # The ranges come from this snapshot, which is not the layout the cookie names: advising them
            # against it would be refused range by range (RANGE_UNMAPPED) or advise what the caller never saw.
            raise StaleCookieError(
                "--all read the process's VMAs afresh and its layout is no longer the one the cookie names:"
                " read again (or name the cookie's ranges with --range)",
                code="FAILED_PRECONDITION",
                reason="LAYOUT_CHANGED",
            )
        ranges: list[tuple[int, int]] = [(v.start, v.end) for v in before.vmas if v.kind != "special"]
    else:
        ranges = args.range
    result = client.advise_ranges(
        args.pid,
        ranges,
        args.advice,
        cookie=before.cookie if cookie is None else cookie,
        filter=args.filter,
        dry_run=args.dry_run,
        scope=args.scope,
    )
    after = before if args.dry_run else client.get_vma_info(args.pid, RESIDENCY)
    return render.AdviseReport(result, *_residency(before), *_residency(after))


def _residency(info: VmaInfo) -> tuple[int, int]:
    return sum(v.rss for v in info.vmas), sum(v.swap for v in info.vmas)


def advise_json(report: render.AdviseReport) -> dict[str, Any]:
    return {
        **report.result.to_json(),
        "failed_ranges": render.failed_ranges(report.result),
        "rss_before": report.rss_before,
        "swap_before": report.swap_before,
        "rss_after": report.rss_after,
        "swap_after": report.swap_after,
    }


def advise_exit_code(report: render.AdviseReport) -> int:
    """A range the kernel refused was named by the caller and not advised: an error. One left out as
    changed since the cookie (scope ranges) was not advised either, and reading again may cure it: 3."""
    if render.failed_ranges(report.result):
        return EXIT_ERROR
    return EXIT_STALE if report.result.changed_ranges else EXIT_OK


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
        scope=args.scope,
    )


def reclaim_exit_code(report: ReclaimReport) -> int:
    """A process that exited or was replaced meanwhile is normal in a cgroup,
    and so is a cgroup with no process on this node (it says so); one that kept
    changing its layout through every retry is a stale cookie. Ranges the
    kernel refused are counted, not an error: reclaim chose them itself."""
    worst = report.worst_status
    return EXIT_ERROR if worst == ERROR else EXIT_STALE if worst == STALE else EXIT_OK


COMMANDS: dict[str, Command] = {
    "maps": Command(
        lambda client, args, _: client.get_vma_info(args.pid, args.attrs, window=args.window),
        VmaInfo.to_json,
        lambda info, args, wide: render.maps_table(info, args.attrs, wide),
    ),
    "advise": Command(run_advise, advise_json, lambda report, _, wide: render.advise_table(report), advise_exit_code),
    "reclaim": Command(
        run_reclaim,
        ReclaimReport.to_json,
        lambda report, _, wide: render.reclaim_table(report, wide),
        reclaim_exit_code,
    ),
    "ps": Command(
        lambda client, args, _: client.list_processes(
            args.cgroup, vma_count=getattr(args, "vma_count", False) or getattr(args, "output", "table") == "wide"
        ),
        lambda processes: {"processes": [p.to_json() for p in processes]},
        lambda processes, _, wide: render.ps_table(processes, wide),
    ),
    "node": Command(
        lambda client, args, _: client.node_info(),
        lambda info: info.to_json(),
        lambda info, _, wide: render.node_table(info),
    ),
}


# ---- running a command on one target or a fleet ------------------------------


def _exit_code(error: VmctlError) -> int:
    return EXIT_STALE if isinstance(error, StaleCookieError) else EXIT_ERROR


def _worst(codes: list[int]) -> int:
    return max(codes, key=_SEVERITY.__getitem__, default=EXIT_OK)


def _is_document(output: str) -> bool:
    return output in ("json", "yaml")


def _print_error(error: VmctlError, output: str) -> None:
    if _is_document(output):
        print(render.document({"error": error.to_json()}, output))
    else:
        print(f"vmctl: {error.code}{' ' + error.reason if error.reason else ''}: {error.message}", file=sys.stderr)


def run(args: argparse.Namespace, targets: list[str], is_fleet: bool, tls: TlsOptions, output: str) -> int:
    if is_fleet:
        return _run_fleet(targets, args, tls, output)
    return _run_single(targets[0], args, tls, output)


def _run_single(target: str, args: argparse.Namespace, tls: TlsOptions, output: str) -> int:
    command = COMMANDS[args.command]
    fleet = Fleet([target], tls=tls, timeout=args.timeout, host_deadline=args.deadline)
    with progress_bar(args.command) if args.command == "reclaim" else nullcontext(None) as bar:
        (outcome,) = fleet.run(lambda client: command.run(client, args, bar))
    if outcome.error is not None:
        _print_error(outcome.error, output)
        return _exit_code(outcome.error)
    if _is_document(output):
        print(render.document(command.to_json(outcome.value), output))
    else:
        print(command.to_table(outcome.value, args, output == "wide"))
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
    if _is_document(output):
        print(render.document({"results": entries}, output))
    else:
        for outcome in outcomes:
            error = outcome.error
            print(
                f"== {outcome.target}: " + (f"FAILED {error.code} {error.reason}: {error.message}" if error else "ok")
            )
            if error is None:
                print(command.to_table(outcome.value, args, output == "wide"))
        print(f"== {len(outcomes) - failed} of {len(outcomes)} hosts ok")
    return _worst(codes)

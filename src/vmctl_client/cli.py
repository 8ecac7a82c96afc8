"""vmctl: the command line for vmctl agents.

    vmctl [--target ADDR]... [--targets-file PATH] COMMAND [-o table|wide|json|yaml]

This module reads and checks the arguments, and nothing it imports loads
gRPC: ``--help``, ``--version``, ``completion`` and usage errors (exit 2, one
line saying why) are done before :mod:`vmctl_client.commands` is imported to
do the work. Exit status: 0 done, 1 error, 2 usage, 3 stale cookie, changed
process or (advise) changed ranges; with several targets, the worst across them.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from vmctl_api.words import (
    ACCESS_WINDOW_MAX_MS,
    ACCESS_WINDOW_MIN_MS,
    ADVICES,
    ATTR_ACCESS,
    FILTERS,
    GROUPS,
    SCOPES,
    WORD_GROUP,
)
from vmctl_client import arguments
from vmctl_client.channel import TlsOptions, default_target
from vmctl_client.defaults import (
    DEFAULT_CONCURRENCY,
    DEFAULT_HOST_DEADLINE,
    DEFAULT_RECLAIM_SCOPE,
    DEFAULT_RETRIES,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    TARGET_ENV,
)
from vmctl_client.targets import (
    TARGET_FORMS,
    TargetError,
    canonical,
    grpc_address,
    is_tcp,
    read_targets_file,
    split_targets,
)

ATTR_WORDS = sorted({*WORD_GROUP, *GROUPS})  # what --attrs takes: words and groups
# The words that sample over --window.
SAMPLING_WORDS = {name for table in (WORD_GROUP, GROUPS) for name, bits in table.items() if bits == ATTR_ACCESS}

OUTPUTS = ("table", "wide", "json", "yaml")
SHELLS = ("bash", "zsh")
# shtab's completion of file names, spelled out so that building the parser
# needs no shtab (it is imported only by `vmctl completion`).
_COMPLETE_FILES = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}


class _LazyVersion(argparse.Action):
    """--version, reading the installed distribution's metadata only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, nargs=0, help="print vmctl's version")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from importlib import metadata

        try:
            version = metadata.version("vmctl")
        except metadata.PackageNotFoundError:  # run from a source tree that was never installed
            version = "unknown"
        sys.stdout.write(f"vmctl {version}\n")
        parser.exit()


def _file_argument(group: argparse._ActionsContainer, *flags: str, **kwargs: object) -> None:
    action = group.add_argument(*flags, type=arguments.readable_file, **kwargs)  # type: ignore[arg-type]
    action.complete = _COMPLETE_FILES  # type: ignore[attr-defined]  # read by shtab


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("targets")
    where.add_argument(
        "--target",
        action="append",
        metavar="ADDR",
        help=f"agent address: {TARGET_FORMS} (every address NAME resolves to); repeat or comma-separate for several."
        f" Default: ${TARGET_ENV}, else {DEFAULT_TARGET}",
    )
    _file_argument(
        where, "--targets-file", metavar="PATH", help="more targets, one per line (commas allowed, # comments)"
    )
    where.add_argument(
        "--timeout",
        type=arguments.positive(float, arguments.SECONDS_LIMIT),
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="seconds per call (default %(default)g)",
    )
    where.add_argument(
        "--deadline",
        type=arguments.positive(float, arguments.SECONDS_LIMIT),
        default=DEFAULT_HOST_DEADLINE,
        metavar="S",
        help="seconds per host for the whole command (default %(default)g)",
    )
    where.add_argument(
        "--concurrency",
        type=arguments.positive(int),
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help="hosts worked on at once (default %(default)d)",
    )


def _add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """The names vmctl-agent uses too; the second name of each is its old one, kept."""
    tls = parser.add_argument_group("TLS, for tcp and dns targets (or --insecure)")
    _file_argument(tls, "--tls-ca", "--ca", metavar="PEM", help="CA certificate that signs the agents' certificates")
    _file_argument(tls, "--tls-cert", "--cert", metavar="PEM", help="this client's certificate, for mutual TLS")
    _file_argument(tls, "--tls-key", "--key", metavar="PEM", help="this client's private key, for mutual TLS")
    tls.add_argument(
        "--tls-server-name",
        "--server-name",
        metavar="NAME",
        help="name to expect in the agents' certificates (default: the address dialled)",
    )
    tls.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext to tcp and dns targets: nothing is encrypted or authenticated, and an agent answers such"
        " callers UNAUTHENTICATED unless its policy names 'anonymous'",
    )


def _add_maps(sub: argparse._SubParsersAction[argparse.ArgumentParser], output: argparse.ArgumentParser) -> None:
    maps = sub.add_parser(
        "maps",
        parents=[output],
        help="snapshot of a process's VMAs, with its cookie",
        description="Read PID's address space in one call: every VMA's range, permissions, offset, device, inode"
        " and path, the attributes --attrs names, and the cookie that names this exact layout (pass it to"
        " `vmctl advise --cookie`). Ranges print as 0xSTART-0xEND, as `advise --range` takes them.",
    )
    maps.add_argument("pid", type=arguments.parse_pid, help="the process")
    maps.add_argument(
        "--attrs",
        type=arguments.parse_attrs(ATTR_WORDS),
        metavar="LIST",
        help=f"comma-separated attributes to read besides the layout (default: none): {', '.join(ATTR_WORDS)}."
        " The table shows sizes; -o wide shows every attribute asked for, -o json all that was read."
        " accessed (or access) samples over --window and is not part of all",
    )
    maps.add_argument(
        "--window",
        type=arguments.positive(float, ACCESS_WINDOW_MAX_MS / 1000),
        metavar="SECONDS",
        help=f"with --attrs accessed: sample for SECONDS ({ACCESS_WINDOW_MIN_MS / 1000:g} to"
        f" {ACCESS_WINDOW_MAX_MS / 1000:g}): the agent clears the process's referenced bits, waits, and reports"
        " the bytes each VMA touched meanwhile (which also makes the pages look unused to reclaim, as cold"
        " advice does). Added to --timeout",
    )


def _add_advise(sub: argparse._SubParsersAction[argparse.ArgumentParser], output: argparse.ArgumentParser) -> None:
    advise = sub.add_parser(
        "advise",
        parents=[output],
        help="apply memory advice to address ranges",
        description="Apply process_madvise advice to ranges of PID. Without --cookie, a fresh cookie is read first."
        f" Ranges are START-END, end exclusive, page aligned; addresses are {arguments.ADDRESS_RULE}. A range the"
        " kernel"
        " refuses is reported in the result and makes the exit status 1; a range --scope ranges left out as"
        " changed (RANGE_CHANGED) makes it 3, like a stale cookie. --all takes its ranges from a fresh snapshot:"
        " with --cookie, that snapshot must be the layout the cookie names, else the cookie is stale (exit 3,"
        " nothing advised). Reports the process's rss and swap before and after.",
    )
    advise.add_argument("pid", type=arguments.parse_pid, help="the process")
    advise.add_argument("--advice", required=True, choices=sorted(ADVICES), help="the advice to apply (required)")
    ranges = advise.add_mutually_exclusive_group(required=True)
    ranges.add_argument(
        "--range",
        action="append",
        type=arguments.parse_range,
        metavar="START-END",
        help="e.g. 0x7f12a000-0x7f12c000 (copied from `vmctl maps`) or 4096-8192; repeatable",
    )
    ranges.add_argument("--all", action="store_true", help="every VMA of the process (never [vdso] and the like)")
    advise.add_argument(
        "--filter",
        choices=sorted(FILTERS),
        default="none",
        help="advise only VMAs of this kind: anonymous (no file) or file (default %(default)s: both)",
    )
    advise.add_argument(
        "--cookie",
        type=arguments.parse_cookie,
        help="cookie (base64) from `vmctl maps`; refused if the layout changed since (default: read a fresh one)",
    )
    advise.add_argument(
        "--scope",
        choices=sorted(SCOPES),
        default="whole",
        help="whole: refused if anything in the layout changed since the cookie; ranges: each range must still lie"
        " in memory of the kind (and file) the cookie saw there, one that does not is left out (RANGE_CHANGED)"
        " and the others advised (default %(default)s)",
    )
    advise.add_argument("--dry-run", action="store_true", help="report what would be advised, change nothing")


def _add_reclaim(sub: argparse._SubParsersAction[argparse.ArgumentParser], output: argparse.ArgumentParser) -> None:
    reclaim = sub.add_parser(
        "reclaim",
        parents=[output],
        help="read, choose and advise with the cookie; retry when the layout moves",
        description="Snapshot with residency, choose the VMAs the filter admits with at least --min-rss resident,"
        " advise them with the snapshot's cookie, and when the layout changed meanwhile read again and retry"
        " (--retries times, with jitter). Reports rss and swap before and after, per process and in total."
        " A cgroup with no process on the node is reported as such, exit status 0.",
    )
    who = reclaim.add_mutually_exclusive_group(required=True)
    who.add_argument("pid", type=arguments.parse_pid, nargs="?", help="one process")
    who.add_argument(
        "--cgroup",
        type=arguments.parse_cgroup,
        metavar="PREFIX",
        help="every process in cgroup v2 PREFIX or below it (/app: not /app-evil)",
    )
    reclaim.add_argument("--advice", choices=("cold", "pageout"), default="pageout", help="(default %(default)s)")
    reclaim.add_argument(
        "--filter",
        choices=sorted(FILTERS),
        default="anonymous",
        help="which VMAs: anonymous (heap, stack, private anonymous), file, or none (both) (default %(default)s)",
    )
    reclaim.add_argument(
        "--min-rss",
        type=arguments.parse_size,
        default=0,
        metavar="BYTES",
        help="only VMAs with at least this much resident (64K, 1M, ...; default: any)",
    )
    reclaim.add_argument(
        "--retries",
        type=arguments.count,
        default=DEFAULT_RETRIES,
        metavar="N",
        help="re-reads after LAYOUT_CHANGED (default %(default)d)",
    )
    reclaim.add_argument(
        "--scope",
        choices=sorted(SCOPES),
        default=DEFAULT_RECLAIM_SCOPE,
        help="ranges: a chosen VMA replaced since the snapshot is left out and the rest advised; whole: any"
        " change in the layout refuses the advice and reclaim reads again (default %(default)s)",
    )
    reclaim.add_argument("--dry-run", action="store_true", help="report what would be advised, change nothing")


def _add_autoreclaim(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    loop = sub.add_parser(
        "autoreclaim",
        help="the reclaim loop: page out idle processes, back off under pressure (runs until stopped)",
        description="Every --interval seconds, list the processes of the --cgroup prefixes. One whose CPU time grew"
        " by less than --idle-cpu percent over the last --idle-seconds is idle: its anonymous memory is paged out,"
        " once per idle period. One that is busy keeps its memory; with --cold-unaccessed, what it did not touch in"
        " a --window sample is advised cold. No pageout starts while the host's memory PSI (some, avg10) is above"
        " --max-pressure; a process that faults back more than --refault-percent of what was paged out within"
        " --backoff seconds is left alone for --backoff seconds. Stops after --duration seconds, or on SIGTERM or"
        " SIGINT (0, the default), then prints a summary. -o json: one JSON object per line, per action, then the"
        " summary. With several targets, one loop per agent, each line naming its target.",
    )
    loop.add_argument(
        "--cgroup",
        type=arguments.parse_cgroup,
        action="append",
        required=True,
        metavar="PREFIX",
        help="processes in cgroup v2 PREFIX or below it (/app: not /app-evil); repeat for several",
    )
    loop.add_argument(
        "--idle-seconds",
        type=arguments.positive(float, arguments.SECONDS_LIMIT),
        default=30.0,
        metavar="S",
        help="how long a process must stay idle before its memory is paged out (default %(default)g)",
    )
    loop.add_argument(
        "--idle-cpu",
        type=arguments.percent,
        default=1.0,
        metavar="PCT",
        help="idle means below this much CPU over --idle-seconds: Redis's timer alone uses some (default %(default)g)",
    )
    loop.add_argument(
        "--interval",
        type=arguments.positive(float, arguments.SECONDS_LIMIT),
        default=5.0,
        metavar="S",
        help="seconds between steps (default %(default)g)",
    )
    loop.add_argument(
        "--duration",
        type=arguments.seconds_or_zero,
        default=0.0,
        metavar="S",
        help="stop after this many seconds (default 0: run until SIGTERM or SIGINT)",
    )
    loop.add_argument(
        "--max-pressure",
        type=arguments.percent,
        default=10.0,
        metavar="PCT",
        help="no new pageout while host memory PSI some avg10 is above this (default %(default)g)",
    )
    loop.add_argument(
        "--cold-unaccessed",
        action="store_true",
        help="advise cold the anonymous VMAs a busy process did not touch in a --window sample (at most once per"
        " --idle-seconds per process; sampling clears its referenced bits)",
    )
    loop.add_argument(
        "--window",
        type=arguments.positive(float, ACCESS_WINDOW_MAX_MS / 1000),
        default=1.0,
        metavar="S",
        help="the sampling window of --cold-unaccessed (default %(default)g)",
    )
    loop.add_argument(
        "--refault-percent",
        type=arguments.percent,
        default=10.0,
        metavar="PCT",
        help="back off from a process that faults back more than this share of what was paged out"
        " (default %(default)g)",
    )
    loop.add_argument(
        "--backoff",
        type=arguments.seconds_or_zero,
        default=300.0,
        metavar="S",
        help="how long refaults count after a pageout, and how long a process is then left alone; also after an"
        " error (default %(default)g)",
    )
    loop.add_argument(
        "--min-rss",
        type=arguments.parse_size,
        default="1M",  # argparse reads a string default through the type
        metavar="BYTES",
        help="only VMAs with at least this much resident (default %(default)s)",
    )
    loop.add_argument("--dry-run", action="store_true", help="decide and report, advise nothing")
    loop.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default=argparse.SUPPRESS,
        help="table: a line per action for people (the default); json: a JSON object per line",
    )
    loop.add_argument(
        "--metrics-listen",
        type=arguments.listen_address,
        metavar="HOST:PORT",
        help="serve the loop's Prometheus metrics at http://HOST:PORT/metrics (needs prometheus-client)",
    )


def _add_completion(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    completion = sub.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print a completion script for SHELL, generated from vmctl's own arguments. bash: "
        "`source <(vmctl completion bash)`, or save it as /etc/bash_completion.d/vmctl. zsh: save it as _vmctl in"
        ' a directory of your $fpath (e.g. `vmctl completion zsh > "${fpath[1]}/_vmctl"`), then run compinit.',
    )
    completion.add_argument("shell", choices=SHELLS, help="the shell")


def build_parser() -> argparse.ArgumentParser:
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "-o",
        "--output",
        choices=OUTPUTS,
        default=argparse.SUPPRESS,
        help="table (the default), wide (a table with every column), json or yaml (the same keys and values)",
    )
    parser = argparse.ArgumentParser(
        prog="vmctl",
        description="Read process address spaces and apply memory advice through vmctl agents.",
        epilog="Exit status: 0 done, 1 error, 2 usage, 3 stale cookie, changed process or (advise) changed ranges"
        f" (with several targets, the worst). Target: --target / --targets-file, else ${TARGET_ENV}, else"
        f" {DEFAULT_TARGET}."
        f" Addresses are {arguments.ADDRESS_RULE}.",
        parents=[output],
    )
    parser.add_argument("--version", action=_LazyVersion)
    _add_target_arguments(parser)
    _add_tls_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_maps(sub, output)
    _add_advise(sub, output)
    _add_reclaim(sub, output)
    ps = sub.add_parser(
        "ps",
        parents=[output],
        help="processes on the node with a memory rollup",
        description="List the node's processes the agent lets you read: pid, comm, rss, swap and cgroup"
        " (-o wide: uid, parent, start time, container, VMA count, CPU time, major faults and the cgroup's memory"
        " pressure too: PSI some avg10, in percent, - where the agent has none).",
    )
    ps.add_argument(
        "--vma-count",
        action="store_true",
        help="count every process's VMAs (-o wide does): the agent reads each one's whole /proc/PID/maps,"
        " about 0.7 us per VMA; without it, JSON and YAML give vma_count null",
    )
    ps.add_argument(
        "--cgroup",
        type=arguments.parse_cgroup,
        metavar="PREFIX",
        help="only processes in cgroup v2 PREFIX or below it (/app: not /app-evil; default: all)",
    )
    sub.add_parser(
        "node",
        parents=[output],
        help="node info and kernel capabilities",
        description="The node's kernel, memory, swap and memory pressure, and which system calls, ioctls and advices"
        " its kernel supports.",
    )
    _add_autoreclaim(sub)
    _add_completion(sub)
    return parser


# ---- checks across arguments (each one a usage error) ---------------------------


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The sub-parser of ``command``, whose usage a usage error of its arguments shows."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[command]  # type: ignore[no-any-return]


def _check_autoreclaim(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """`autoreclaim` prints a line per action: a table or JSON lines, and its window must be one the agent takes."""
    loop = _command_parser(parser, "autoreclaim")
    if getattr(args, "output", "table") not in ("table", "json"):
        loop.error(f"-o {args.output}: autoreclaim prints a line per action, as a table or as JSON (-o json)")
    if args.window * 1000 < ACCESS_WINDOW_MIN_MS:
        loop.error(f"--window {args.window:g}: the shortest window is {ACCESS_WINDOW_MIN_MS / 1000:g} s")


def _check_window(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """`maps`: a window goes with the accessed attribute, and it with a window."""
    if args.command == "autoreclaim":
        _check_autoreclaim(args, parser)
    if args.command != "maps":
        return
    maps = _command_parser(parser, "maps")
    sampling = not SAMPLING_WORDS.isdisjoint((args.attrs or "").split(","))
    if sampling and args.window is None:
        maps.error("--attrs accessed samples over a window: give --window SECONDS")
    if args.window is not None and not sampling:
        maps.error("--window is the sampling window of --attrs accessed: add accessed to --attrs")
    if args.window is not None and args.window * 1000 < ACCESS_WINDOW_MIN_MS:
        maps.error(f"--window {args.window:g}: the shortest window is {ACCESS_WINDOW_MIN_MS / 1000:g} s")


def _check_target(text: str, where: str, parser: argparse.ArgumentParser) -> str:
    try:
        grpc_address(text)
    except TargetError as exc:
        parser.error(f"{where}: {exc}")
    return canonical(text)


def _targets(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[list[str], bool]:
    """The targets as given, checked, and whether they name a fleet (several,
    a file, or a DNS name): a fleet's output is per host even for one host."""
    if any(not item.strip() for item in args.target or []):
        parser.error("--target: empty; leave it out to use the default")
    given = [_check_target(t, "--target", parser) for t in split_targets(args.target or [])]
    if args.targets_file:
        try:
            listed = read_targets_file(args.targets_file)
        except (OSError, UnicodeDecodeError) as exc:
            parser.error(f"--targets-file {args.targets_file}: cannot read it: {exc}")
        given += [_check_target(t, f"--targets-file {args.targets_file}", parser) for t in listed]
        if not listed:
            parser.error(f"--targets-file {args.targets_file}: lists no target")
    if not given:
        return [_check_target(default_target(), f"${TARGET_ENV}", parser)], False
    fleet = len(given) > 1 or bool(args.targets_file) or any(t.startswith("dns:") for t in given)
    return given, fleet


def _tls(args: argparse.Namespace, parser: argparse.ArgumentParser, targets: list[str]) -> TlsOptions:
    tls = TlsOptions(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)
    if bool(tls.cert) != bool(tls.key):
        parser.error("--tls-cert and --tls-key go together (mutual TLS needs both)")
    if args.insecure and (tls.enabled or tls.server_name):
        parser.error("--insecure is plaintext: it cannot go with --tls-ca, --tls-cert, --tls-key or --tls-server-name")
    plain = [t for t in targets if is_tcp(t)] if not (tls.enabled or args.insecure) else []
    if plain:
        parser.error(
            f"{plain[0]} is a TCP target: give --tls-ca (and --tls-cert/--tls-key for mutual TLS), or --insecure"
            " for plaintext"
        )
    return tls


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `vmctl maps 1 | head` ends quietly
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_window(args, parser)
    if args.command == "completion":
        from vmctl_client.completion import completion_script

        print(completion_script(parser, args.shell))
        return 0
    targets, is_fleet = _targets(args, parser)
    tls = _tls(args, parser, targets)

    if args.command == "autoreclaim":
        from vmctl_client import loop_command

        return loop_command.run(args, targets, tls, getattr(args, "output", "table"))
    from vmctl_client import commands  # gRPC and rich, only now that there is work to do

    return commands.run(args, targets, is_fleet, tls, getattr(args, "output", "table"))


if __name__ == "__main__":
    sys.exit(main())

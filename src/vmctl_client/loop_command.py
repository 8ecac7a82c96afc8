"""`vmctl autoreclaim`: the reclaim loop (:mod:`vmctl_client.autoreclaim`)
run against each target, one thread per agent, until ``--duration`` ends or
SIGTERM/SIGINT arrives; then a summary per target.

Output is written as things happen: ``-o json`` one object per line (the
action's keys, plus ``target`` and ``time``), the default a line per action
for people. Exit status: 0 when stopped, 1 when some target's every step
failed (an agent never reached, say).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from vmctl_client import autoreclaim as events
from vmctl_client.autoreclaim import Action, AutoReclaimer, LoopSettings
from vmctl_client.channel import TlsOptions
from vmctl_client.client import Client
from vmctl_client.render import human_bytes as size
from vmctl_client.targets import expand_targets

if TYPE_CHECKING:
    from vmctl_client.autoreclaim import Summary

EXIT_OK, EXIT_ERROR = 0, 1


def settings_of(args: argparse.Namespace) -> LoopSettings:
    return LoopSettings(
        cgroups=tuple(args.cgroup),
        idle_seconds=args.idle_seconds,
        idle_cpu_percent=args.idle_cpu,
        interval=args.interval,
        max_pressure=args.max_pressure,
        cold_unaccessed=args.cold_unaccessed,
        window=args.window,
        refault_percent=args.refault_percent,
        backoff_seconds=args.backoff,
        min_rss=args.min_rss,
        dry_run=args.dry_run,
    )


class Printer:
    """Lines from several loops, one at a time, flushed at once (a pipe sees each action as it happens)."""

    def __init__(self, output: str) -> None:
        self.json = output == "json"
        self._lock = threading.Lock()

    def action(self, target: str, action: Action) -> None:
        self._write(target, action.to_json(), describe(action))

    def summary(self, target: str, summary: Summary) -> None:
        data = summary.to_json()
        self._write(target, data, describe_summary(data))

    def _write(self, target: str, data: dict[str, Any], text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        line = json.dumps({"time": stamp, "target": target, **data}) if self.json else f"{stamp} {target} {text}"
        with self._lock:
            print(line, flush=True)


def describe(action: Action) -> str:
    d = action.details
    who = f"pid {action.pid} ({action.comm}) in {action.cgroup or '/'}"
    dry = " (dry run)" if d.get("dry_run") else ""
    if action.event == events.START:
        s = d["settings"]
        return (
            f"start{' (dry run)' if s['dry_run'] else ''}: {', '.join(s['cgroups'])} every {s['interval']:g} s; idle"
            f" after {s['idle_seconds']:g} s under {s['idle_cpu_percent']:g}% CPU; no pageout above"
            f" {s['max_pressure']:g}% memory pressure"
            + ("; cold advice for what busy ones leave untouched" if s["cold_unaccessed"] else "")
        )
    if action.event == events.PAGEOUT:
        return (
            f"pageout{dry} {who}, idle {d['idle_seconds']:g} s: {d['vmas']} VMAs, rss {size(d['rss_before'])}"
            f" -> {size(d['rss_after'])}, swap {size(d['swap_before'])} -> {size(d['swap_after'])}"
        )
    if action.event == events.COLD:
        return f"cold{dry} {who}: {d['vmas']} VMAs untouched in {d['window_seconds']:g} s, {size(d['cold_bytes'])}"
    if action.event == events.BACKOFF:
        return (
            f"backoff {who}: {size(d['refaulted_bytes'])} of {size(d['paged_bytes'])} paged out came"
            f" back; left alone {d['seconds']:g} s"
        )
    if action.event == events.HOLD:
        return f"hold: memory pressure {d['pressure_some_avg10']:.2f}% > {d['max_pressure']:g}%, no new pageout"
    if action.event == events.RESUME:
        return f"resume: memory pressure {d['pressure_some_avg10']:.2f}% <= {d['max_pressure']:g}%"
    if action.event == events.ERROR:
        error = d["error"]
        where = f" {who}" if action.pid else ""
        reason = f" {error['reason']}" if error.get("reason") else ""
        return f"error{where}: {error['code']}{reason}: {error['message']}"
    return f"{action.event} {who}: {d}"


def describe_summary(data: dict[str, Any]) -> str:
    return (
        f"summary: {data['steps']} steps in {data['seconds']:.0f} s, {data['processes']} processes;"
        f" {data['pageouts']} pageouts freed {size(data['paged_out_bytes'])} of rss"
        f" ({size(data['swapped_bytes'])} more in swap); {data['cold_advices']} cold advices over"
        f" {size(data['cold_bytes'])}; {data['holds']} steps held for pressure, {data['backoffs']} backoffs,"
        f" {data['errors']} errors"
    )


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run(args: argparse.Namespace, targets: list[str], tls: TlsOptions, output: str) -> int:
    settings = settings_of(args)
    printer = Printer(output)
    stop = threading.Event()
    _stop_on_signals(stop)
    hosts = expand_targets(targets)
    exporter = _metrics(args.metrics_listen) if args.metrics_listen else None
    summaries: dict[str, Summary] = {}

    def loop(target: str) -> None:
        def on_action(action: Action) -> None:
            printer.action(target, action)
            if exporter is not None:
                exporter(target, action)

        with Client(target, tls=tls, timeout=args.timeout) as client:
            summaries[target] = AutoReclaimer(client, settings, on_action=on_action).run(args.duration, stop)

    threads = [threading.Thread(target=loop, args=(host,), name=f"autoreclaim {host}") for host in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # short naps: the main thread must be free to run the signal handler
            thread.join(0.2)
    for host in hosts:
        printer.summary(host, summaries[host])
    never_reached = [host for host in hosts if summaries[host].errors and not summaries[host].steps]
    return EXIT_ERROR if never_reached else EXIT_OK


def _metrics(listen: tuple[str, int]) -> Callable[[str, Action], None]:
    """Counters by target and event, served over HTTP; returns what counts an action."""
    try:
        from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, start_http_server
    except ImportError:
        sys.exit("vmctl: --metrics-listen needs prometheus-client: pip install prometheus-client")
    disable_created_metrics()
    registry = CollectorRegistry()
    actions = Counter("vmctl_autoreclaim_actions", "loop actions, by event", ["target", "event"], registry=registry)
    paged = Counter("vmctl_autoreclaim_paged_out_bytes", "rss freed by pageout", ["target"], registry=registry)
    cold = Counter("vmctl_autoreclaim_cold_bytes", "resident bytes advised cold", ["target"], registry=registry)
    start_http_server(listen[1], addr=listen[0], registry=registry)

    def count(target: str, action: Action) -> None:
        actions.labels(target, action.event).inc()
        if action.event == events.PAGEOUT:
            paged.labels(target).inc(max(action.details["rss_before"] - action.details["rss_after"], 0))
        elif action.event == events.COLD:
            cold.labels(target).inc(action.details["cold_bytes"])

    return count

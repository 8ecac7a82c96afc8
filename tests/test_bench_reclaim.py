"""make bench-reclaim (bench/reclaim.py) is not part of the suite: it takes minutes. Here, cheaply:
its command line, its judging and parsing, and that its cgroup helper leaves nothing behind."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from support.cgroup2 import CGROUP2
from support.deploy_files import ROOT
from support.waiting import wait_for

SCRIPT = ROOT / "bench" / "reclaim.py"


def _load():
    sys.path.insert(0, str(SCRIPT.parent))  # it imports bench/harness.py as the bench does
    try:
        spec = importlib.util.spec_from_file_location("bench_reclaim", SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPT.parent))


reclaim = _load()


@pytest.mark.unprivileged
def test_help_names_every_option():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--rounds", "--quick", "--controllers", "--idle-seconds", "--interval", "--duration", "--json"):
        assert option in result.stdout


@pytest.mark.unprivileged
def test_arguments():
    args = reclaim.parse_args([])
    assert args.rounds == 3 and args.controllers == ("none", "blunt", "autoreclaim")
    assert args.duration == 2 * args.idle_seconds + args.interval + 8
    assert reclaim.deadline_seconds(args) == 22
    quick = reclaim.parse_args(["--quick", "--controllers", "autoreclaim,none"])
    assert quick.rounds == 1 and quick.controllers == ("none", "autoreclaim")  # the canonical order
    for bad in (["--controllers", "cron"], ["--controllers", ""], ["--rounds", "0"], ["--interval", "0"]):
        with pytest.raises(SystemExit) as exited:
            reclaim.parse_args(bad)
        assert exited.value.code == 2, bad


@pytest.mark.unprivileged
def test_rounds_rotate_the_order():
    assert reclaim.schedule(("none", "blunt", "autoreclaim"), 3) == [
        (0, "none"), (0, "blunt"), (0, "autoreclaim"),
        (1, "blunt"), (1, "autoreclaim"), (1, "none"),
        (2, "autoreclaim"), (2, "none"), (2, "blunt"),
    ]  # fmt: skip


@pytest.mark.unprivileged
def test_a_spread_wider_than_the_margin_is_unresolved_not_passed():
    assert reclaim.judge([0.99, 0.985, 0.995], 0.97, higher_is_better=True)["verdict"] == "met"
    assert reclaim.judge([0.99, 0.94, 1.0], 0.97, higher_is_better=True)["verdict"] == "unresolved"
    # Every round past the goal settles it, however far apart the rounds are.
    assert reclaim.judge([1.102, 0.986, 0.991, 1.041, 0.986], 0.97, higher_is_better=True)["verdict"] == "met"
    assert reclaim.judge([0.90, 0.80, 0.95], 0.97, higher_is_better=True)["verdict"] == "NOT met"
    assert reclaim.judge([0.90, 0.91, 0.92], 0.97, higher_is_better=True)["verdict"] == "NOT met"
    assert reclaim.judge([12.0, 13.0, 12.5], 22, higher_is_better=False)["verdict"] == "met"
    assert reclaim.judge([12.0, math.inf, 12.5], 22, higher_is_better=False)["verdict"] == "unresolved"
    assert reclaim.judge([math.inf] * 3, 22, higher_is_better=False)["verdict"] == "NOT met"
    assert reclaim.judge([12.0], 22, higher_is_better=False)["verdict"] == "met"


@pytest.mark.unprivileged
def test_redis_benchmark_csv():
    text = (
        '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms",'
        '"max_latency_ms"\n"SET","75642.96","0.122","0.016","0.119","0.183","0.295","2.575"\n'
        '"GET","93109.87","0.100","0.032","0.095","0.135","0.239","1.519"\n'
    )
    parsed = reclaim.parse_benchmark_csv(text)
    assert parsed["SET"]["rps"] == 75642.96 and parsed["GET"]["p99_latency_ms"] == 0.239
    with pytest.raises(ValueError):
        reclaim.parse_benchmark_csv("SET: 75642.96 requests per second\n")


@pytest.mark.skipif(CGROUP2 is None, reason="no cgroup v2 hierarchy")
def test_the_cgroup_tree_is_removed_with_a_member_still_alive():
    name = f"vmctl-test-bench-{os.getpid()}"
    with reclaim.cgroup_tree(name, ("busy", "idle")) as groups:
        assert reclaim.cgroup_name(groups["idle"]) == f"/{name}/idle"
        member = subprocess.Popen(reclaim.in_cgroup(groups["idle"], ["sleep", "60"]))
        try:
            wait_for(lambda: str(member.pid) in (groups["idle"] / "cgroup.procs").read_text().split(), "sleep to join")
            with open(f"/proc/{member.pid}/cgroup") as f:
                assert f.read().strip().endswith(f"/{name}/idle")  # exec'd in place: the shell's pid is sleep's
        except BaseException:
            member.kill()
            raise
    try:
        assert not (CGROUP2 / name).exists()
        assert member.poll() is None, "moved out, not killed"
    finally:
        member.kill()
        member.wait()


@pytest.mark.unprivileged
def test_the_results_file_is_json_with_chunks_as_rows():
    tests = {"SET": {"rps": 1.5, "p99_latency_ms": 0.3}, "GET": {"rps": 2.5, "p99_latency_ms": 0.2}}
    results = {
        "settings": {"note": "a [bracketed], {braced}\nline"},
        "runs": [{"busy": {"chunk_detail": [{"t": 0.0, "seconds": 1.0, "requests": 2, "tests": tests}]},
                  "idle": {"seconds_to_90": math.inf, "curve": [[0.5, 0.0], [1.0, 0.95]]}}],
    }  # fmt: skip
    text = reclaim.dumps(results)
    parsed = json.loads(text)
    assert parsed["settings"]["note"] == "a [bracketed], {braced}\nline"
    assert parsed["runs"][0]["busy"]["chunk_detail"] == [[0.0, 1.0, 2, 1.5, 2.5, 0.3, 0.2]]
    assert parsed["runs"][0]["idle"] == {"seconds_to_90": None, "curve": [[0.5, 0.0], [1.0, 0.95]]}
    assert "[0.0, 1.0, 2, 1.5, 2.5, 0.3, 0.2]" in text

"""The vmctl command before it calls anyone: usage errors, help, completion, startup.

Every bad argument is a usage error: exit 2, argparse's usage of the command
it was given to, and one line saying why; never a traceback, never a call.
None of these need an agent (they all stop before connecting), so they run
without root.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.vmctl_cli import usage_error, vmctl

from vmctl_client import arguments, cli
from vmctl_client.render import address_range

pytestmark = pytest.mark.unprivileged

ADVISE = ("advise", "1", "--advice", "cold")


# ---- one line saying why, for everything the issue found and more ---------------------------


@pytest.mark.parametrize(
    ("args", "env", "command", "why"),
    [
        # the issue's own list
        ((*ADVISE, "--all", "--cookie", "garbage"), {}, "advise", "argument --cookie: not a cookie"),
        (("maps", "99999999999"), {}, "maps", "Linux pids run from 1 to 4194303"),
        (("maps", "1", "--attrs", "rss,bogus"), {}, "maps", "argument --attrs: unknown attribute 'bogus'"),
        (("--target", "localhost", "node"), {}, "", "'localhost' has no port"),
        (("--target", "http://agent:50051", "node"), {}, "", "unsupported scheme http://"),
        (("--target", "unix://tmp/x", "node"), {}, "", "absolute path, unix:///tmp/x"),
        (("node",), {"VMCTL_TARGET": "???"}, "", "$VMCTL_TARGET: '???'"),
        # addresses: bare hex is refused with the spelling that works, never read as decimal
        ((*ADVISE, "--range", "7f12a000-7f12c000"), {}, "advise", "hex needs 0x (0x7f12a000)"),
        ((*ADVISE, "--range", "1000-2000x"), {}, "advise", "'2000x' is not an address"),
        ((*ADVISE, "--range", "0x2000-0x1000"), {}, "advise", "END must be above START"),
        ((*ADVISE, "--range", "0x0-0x10000000000000000"), {}, "advise", "beyond a 64-bit address space"),
        ((*ADVISE, "--range", "0x1000"), {}, "advise", "expected START-END"),
        # targets and TLS
        (("--target", "", "node"), {}, "", "--target: empty"),
        (("--target", "[::1]", "node"), {}, "", "has no port"),
        (("--target", "::1:50051", "node"), {}, "", "goes in brackets"),
        (("--target", "host:0", "node"), {}, "", "from 1 to 65535"),
        (("--target", "dns:///no-port-here", "ps"), {}, "", "expected dns:///NAME:PORT"),
        (("--target", "127.0.0.1:50051", "node"), {}, "", "give --tls-ca"),
        (("--target", "dns:///localhost:50051", "node"), {}, "", "or --insecure for plaintext"),
        (("--insecure", "--tls-ca", "/etc/hostname", "node"), {}, "", "--insecure is plaintext"),
        (("--tls-cert", "/etc/hostname", "node"), {}, "", "--tls-cert and --tls-key go together"),
        (("--tls-ca", "/nonexistent/ca.pem", "node"), {}, "", "'/nonexistent/ca.pem': no such file"),
        (("--targets-file", "/nonexistent", "ps"), {}, "", "no such file"),
        # numbers
        (("--timeout", "nan", "node"), {}, "", "must be a positive number"),
        (("--timeout", "inf", "node"), {}, "", "must be a positive number"),
        (("--concurrency", "0", "node"), {}, "", "must be a positive number"),
        (("--deadline", "99999999999", "node"), {}, "", "must be a positive number up to 604800"),
        (("--targets-file", "/", "node"), {}, "", "'/': not a regular file"),
        (("reclaim", "1", "--retries", "-1"), {}, "reclaim", "not a whole number"),
        (("reclaim", "1", "--min-rss", "1e400"), {}, "reclaim", "is not a size"),
        (("reclaim", "--cgroup", "kubepods"), {}, "reclaim", "must start with /"),
        (("ps", "--cgroup", "/a//b"), {}, "ps", "empty component"),
        (("maps", "1", "-o", "xml"), {}, "maps", "invalid choice: 'xml'"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_input_is_a_usage_error_with_a_one_line_reason(args, env, command, why):
    run = vmctl(*args, env={"VMCTL_TARGET": "", **env})
    line = usage_error(run)
    assert line.startswith(f"vmctl{' ' + command if command else ''}: error: "), line
    assert why in line, line
    assert run.stderr.startswith(f"usage: vmctl {command}".rstrip()), run.stderr


@pytest.mark.parametrize(
    "pid", ["", "-1", "0", "1.5", "0x10", "\u0663", "\uff15", "1e3", " 7", "4194304", "9" * 40, "pid"]
)
def test_a_pid_that_is_not_one_is_refused(pid):
    line = usage_error(vmctl("maps", pid))
    assert line.startswith("vmctl maps: error: argument pid: "), line


@pytest.mark.parametrize(
    "text",
    [
        "",
        "-",
        "0x-0x1000",
        "0x1000-",
        "\uff11\uff10\uff10\uff10-\uff12\uff10\uff10\uff10",
        "0x1000--0x2000",
        "0x1000-0x2000-0x3000",
        "\u22121000-2000",
        "0x1_000-0x2000",
        "+4096-8192",
        "0x 1000-0x2000",
        "é",
    ],
)
def test_a_range_that_is_not_one_is_refused(text):
    line = usage_error(vmctl(*ADVISE, "--range", text))
    assert line.startswith("vmctl advise: error: argument --range: "), line


@pytest.mark.parametrize(
    "args", [("--cookie", ""), ("--cookie", "\u00e9t\u00e9"), ("--filter", "anon"), ("--advice", "COLD")]
)
def test_advise_flags_refuse_what_they_cannot_read(args):
    run = vmctl(*ADVISE, "--all", *args)
    assert usage_error(run).startswith("vmctl advise: error: argument "), run.stderr


def test_a_cookie_is_only_checked_for_base64_here():
    """Its content is the agent's to judge (COOKIE_INVALID, exit 1, tested against agents)."""
    assert arguments.parse_cookie("QUJD") == b"ABC"
    assert arguments.parse_cookie(" QUJD\n") == b"ABC"  # pasted with a newline


@given(st.text(max_size=40) | st.sampled_from(["0\x1f", "5\x1f%", "1.5\x1c"]))
def test_every_value_parser_answers_a_usage_error_or_a_value(text):
    """Whatever the text, a parser returns a value or raises argparse's usage error, nothing else."""
    parsers = [
        arguments.parse_address,
        arguments.parse_range,
        arguments.parse_pid,
        arguments.parse_size,
        arguments.parse_cookie,
        arguments.parse_cgroup,
        arguments.parse_attrs(["rss", "swap"]),
        arguments.positive(int),
        arguments.positive(float),
        arguments.count,
        arguments.seconds_or_zero,
        arguments.percent,
        arguments.listen_address,
    ]
    for parse in parsers:
        try:
            parse(text)
        except argparse.ArgumentTypeError as error:
            assert str(error) and "\n" not in str(error)


@given(
    st.integers(0, (1 << 64) - 2).flatmap(
        lambda start: st.tuples(st.just(start), st.integers(start + 1, (1 << 64) - 1))
    )
)
def test_a_printed_range_reads_back_as_itself(bounds):
    start, end = bounds
    assert arguments.parse_range(address_range(start, end)) == (start, end)
    assert arguments.parse_range(f"{start}-{end}") == (start, end)  # decimal, as DESIGN.md fixes


# ---- help: every command described, every default shown -----------------------------------------


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"": parser, **sub.choices}


def test_every_command_has_a_description_and_shows_its_defaults():
    for name, parser in _subcommands().items():
        assert parser.description and len(parser.description) > 40, name
        for action in parser._actions:
            default = action.default
            if not action.option_strings or default in (None, False, argparse.SUPPRESS) or action.help is None:
                continue
            assert "default" in action.help, f"vmctl {name} {action.option_strings[0]}: no default in its help"
            shown = action.help % {"default": default, "prog": "vmctl"}
            assert str(default).rstrip("0").rstrip(".") in shown, (name, action.option_strings, shown)


def test_subcommand_help_prints_its_description_and_address_rule():
    run = vmctl("advise", "--help")
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stdout.split())
    assert "Apply process_madvise advice to ranges of PID" in text
    assert "addresses are hex with 0x (0x7f12a000, as `vmctl maps` prints them) or decimal digits" in text
    assert "(default none: both)" in text


# ---- completion: generated from the parser, and bash really completes with it -----------------


def _bash_completes(script: str, *words: str) -> list[str]:
    """What bash offers for ``words`` (the last one being completed), with ``script`` sourced."""
    line = " ".join(words)
    program = (
        f"{script}\n"
        f"COMP_WORDS=({' '.join(_bash_quote(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        f"COMP_LINE={_bash_quote(line)}; COMP_POINT=${{#COMP_LINE}}; COMPREPLY=()\n"
        f"_shtab_vmctl vmctl {_bash_quote(words[-1])} {_bash_quote(words[-2])}\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    run = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def _bash_quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
def test_bash_completes_commands_flags_and_choices():
    run = vmctl("completion", "bash")
    assert run.returncode == 0, run.stderr
    script = run.stdout
    assert "complete " in script and "_shtab_vmctl" in script
    assert _bash_completes(script, "vmctl", "ma") == ["maps"]
    assert _bash_completes(script, "vmctl", "maps", "1", "--at") == ["--attrs"]
    assert _bash_completes(script, "vmctl", "advise", "1", "--advice", "c") == ["cold", "collapse"]
    assert _bash_completes(script, "vmctl", "reclaim", "1", "--filter", "") == ["anonymous", "file", "none"]
    assert _bash_completes(script, "vmctl", "-o", "y") == ["yaml"]
    assert _bash_completes(script, "vmctl", "--tls-c") == ["--tls-ca", "--tls-cert"]
    assert _bash_completes(script, "vmctl", "completion", "") == ["bash", "zsh"]
    assert _bash_completes(script, "vmctl", "--tls-ca", "/etc/hostn") == ["/etc/hostname"]  # a file name


def test_zsh_completion_is_generated_from_the_same_parser():
    run = vmctl("completion", "zsh")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("#compdef vmctl")
    for word in ("maps", "advise", "reclaim", "--attrs", "--tls-ca", "--insecure", "wide", "yaml"):
        assert word in run.stdout, word
    if shutil.which("zsh"):
        check = subprocess.run(["zsh", "-n"], input=run.stdout, capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
    assert usage_error(vmctl("completion", "fish")).startswith("vmctl completion: error: argument shell:")


# ---- startup: nothing heavy before there is work -------------------------------------------------


def _imported(*args: str) -> set[str]:
    """The modules ``vmctl ARGS`` imports, from Python's own -X importtime report."""
    # As the installed console script runs it: import the module, call main().
    script = "import sys; from vmctl_client.cli import main; sys.exit(main())"
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", script, *args], capture_output=True, text=True, timeout=120
    )
    names = {m.group(1) for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", run.stderr, re.M)}
    assert "vmctl_client.cli" in names, run.stderr  # the report is read right
    return names


@pytest.mark.parametrize("args", [("--version",), ("--help",), ("maps", "--help"), ("maps", "0")])
def test_help_version_and_usage_errors_load_no_grpc(args):
    heavy = {name for name in _imported(*args) if name.split(".")[0] in ("grpc", "rich", "yaml", "shtab")}
    assert heavy == set()


def test_a_command_that_works_does_load_grpc():
    """The check above is not vacuous: a command sent to an agent imports gRPC."""
    names = _imported("--target", "/nonexistent/agent.sock", "--timeout", "1", "node")
    assert "grpc" in names


def test_the_package_exports_every_name_it_lists():
    probe = "import json, vmctl_client as v; print(json.dumps([n for n in v.__all__ if getattr(v, n, None) is None]))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(run.stdout) == []

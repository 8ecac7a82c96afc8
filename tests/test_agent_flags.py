"""vmctl-agent's address and TLS flags: one address syntax for its three
listeners, checked before anything starts, and the TLS names vmctl shares."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.scrape import Scrape, logged_port

from vmctl_server import __version__, config

AGENT = [sys.executable, "-m", "vmctl_server.agent"]


@pytest.mark.unprivileged
@pytest.mark.parametrize("flag", ["--listen", "--health-listen", "--metrics-listen"])
@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("localhost", "has no port"),
        ("tcp://localhost", "has no port"),
        (":9464", "has no host (every address: 0.0.0.0:9464 or [::]:9464)"),
        ("127.0.0.1:65536", "the port must be a number from 0 to 65535"),
        ("::1:9464", "an IPv6 address goes in brackets"),
        ("[::g]:9464", "is not an IPv6 address"),
        ("http://127.0.0.1:9464", "expected "),
        ("b\u00fccher.example:9464", "is not a host name or address"),
        ("", "expected "),
    ],
)
def test_a_bad_listen_address_stops_the_agent_before_it_starts(flag, value, why):
    run = subprocess.run([*AGENT, flag, value], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    (line,) = [line for line in run.stderr.splitlines() if "error:" in line]
    assert line.startswith(f"vmctl-agent: error: argument {flag}: ") and why in line, line


@pytest.mark.unprivileged
@pytest.mark.parametrize("flag", ["--health-listen", "--metrics-listen"])
def test_the_operations_listeners_are_tcp_only(flag):
    run = subprocess.run([*AGENT, flag, "unix:///run/vmctl/health.sock"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "this listener is TCP only" in run.stderr, run.stderr


@pytest.mark.unprivileged
def test_every_listener_takes_host_port_with_or_without_tcp():
    for spelling in ("127.0.0.1:0", "tcp://127.0.0.1:0"):
        args = config.parse(
            ["--listen", spelling, "--insecure", "--health-listen", spelling, "--metrics-listen", spelling]
        )
        assert [a.grpc_target for a in args.listen] == ["127.0.0.1:0"]
        assert args.health_listen == args.metrics_listen == ("127.0.0.1", 0)
    ipv6 = config.parse(["--listen", "[::]:7443", "--insecure", "--metrics-listen", "tcp://[::]:9464"])
    assert [a.grpc_target for a in ipv6.listen] == ["[::]:7443"] and ipv6.metrics_listen == ("::", 9464)
    assert [a.unix_path for a in config.parse(["--listen", "/run/vmctl/x.sock"]).listen] == ["/run/vmctl/x.sock"]


@pytest.mark.unprivileged
def test_tls_ca_is_the_client_ca_under_the_name_vmctl_uses_too():
    base = ["--listen", "tcp://127.0.0.1:7443", "--tls-cert", "a.pem", "--tls-key", "a.key"]
    assert config.parse([*base, "--tls-ca", "ca.pem"]).client_ca == "ca.pem"
    assert config.parse([*base, "--client-ca", "ca.pem"]).client_ca == "ca.pem"  # the old name, kept
    help_text = " ".join(config.build_parser().format_help().split())
    assert "--tls-ca PEM, --client-ca PEM" in help_text and "(--client-ca: its old name)" in help_text
    missing = subprocess.run([*AGENT, *base], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--tls-ca (or its old name --client-ca)" in missing.stderr


def test_tcp_spelled_listeners_serve(start_agent):
    agent = start_agent(
        *("--health-listen", "tcp://127.0.0.1:0", "--metrics-listen", "tcp://127.0.0.1:0"),
        *("--log-format", "json"),
    )  # --health-listen tcp://... failed inside gRPC before
    with grpc.insecure_channel(f"127.0.0.1:{logged_port(agent, 'health_port')}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert Scrape(logged_port(agent, "metrics_port")).value("vmctl_agent_info", version=__version__) == 1

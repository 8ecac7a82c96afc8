"""Operations: the Prometheus endpoint read back over HTTP after real calls,
and the plaintext health-only listener the kubelet's grpc probes use."""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from support.expect import expect_error
from support.scrape import Scrape, logged_port
from support.waiting import wait_for

from vmctl_api import vmctl_pb2 as pb
from vmctl_api import vmctl_pb2_grpc

MiB = 1 << 20


@pytest.fixture
def metered_agent(start_agent):
    agent = start_agent("--metrics-listen", "127.0.0.1:0", "--log-format", "json")
    return agent, logged_port(agent, "metrics_port")


def test_metrics_count_real_calls_by_method_code_reason_and_cookie_outcome(metered_agent, target):
    agent, port = metered_agent
    start, end = target.map_anon(4 * MiB)
    with agent.client() as client:
        info = client.get_vma_info(target.pid, attrs=("rss",))
        applied = client.advise_ranges(target.pid, [(start, end)], advice="cold", cookie=info.cookie)
        dry = client.advise_ranges(target.pid, [(start, end)], advice="pageout", cookie=info.cookie, dry_run=True)
        garbled = bytes(b ^ 0xFF for b in info.cookie)
        expect_error(
            lambda: client.advise_ranges(target.pid, [(start, end)], advice="cold", cookie=garbled),
            "INVALID_ARGUMENT",
            "COOKIE_INVALID",
        )
        expect_error(
            lambda: client.advise_ranges(target.pid, [(start + 1, end)], advice="cold", cookie=info.cookie),
            "INVALID_ARGUMENT",
            "RANGE_UNALIGNED",
        )
        target.map_anon(MiB)  # the layout moves: the cookie is stale
        expect_error(
            lambda: client.advise_ranges(target.pid, [(start, end)], advice="cold", cookie=info.cookie),
            "FAILED_PRECONDITION",
            "LAYOUT_CHANGED",
        )
        expect_error(lambda: client.advise_ranges(target.pid, [(start, end)], advice="cold"), "INVALID_ARGUMENT")
    target.verify()
    assert applied.advised_bytes == end - start and applied.syscalls >= 1
    assert dry.advised_bytes == end - start

    m = Scrape(port)
    assert m.calls("GetVmaInfo", "OK") == 1
    assert m.calls("AdviseRanges", "OK") == 2
    assert m.calls("AdviseRanges", "INVALID_ARGUMENT") == 3
    assert m.calls("AdviseRanges", "FAILED_PRECONDITION") == 1
    for reason, count in (("COOKIE_INVALID", 1), ("RANGE_UNALIGNED", 1), ("LAYOUT_CHANGED", 1), ("COOKIE_REQUIRED", 1)):
        assert m.total("vmctl_grpc_refusals_total", grpc_method="AdviseRanges", reason=reason) == count, reason
    # The audit log's words: every AdviseRanges read past its headers, by what became of its cookie.
    outcomes = ("valid", "invalid", "layout_changed", "missing", "unchecked", "process_changed", "absent")
    cookie = {o: m.value("vmctl_cookie_checks_total", outcome=o) for o in outcomes}
    assert cookie == {
        "valid": 2, "invalid": 1, "layout_changed": 1, "missing": 1, "unchecked": 1, "process_changed": 0, "absent": 0,
    }  # fmt: skip
    # Bytes count only advice that ran: the dry run advised nothing.
    assert m.value("vmctl_advised_bytes_total", advice="cold") == applied.advised_bytes
    assert m.value("vmctl_advice_requested_bytes_total", advice="cold") == applied.requested_bytes
    assert m.value("vmctl_process_madvise_calls_total", advice="cold") == applied.syscalls
    assert m.value("vmctl_advised_bytes_total", advice="pageout") == 0
    vmcontrol = {"grpc_service": "vmctl.v1.VmControl", "grpc_type": "unary"}
    latency = "grpc_server_handling_seconds_count"
    assert m.value(latency, **vmcontrol, grpc_method="AdviseRanges", grpc_code="INVALID_ARGUMENT") == 3
    assert m.value(latency, **vmcontrol, grpc_method="GetVmaInfo", grpc_code="OK") == 1
    assert m.value("grpc_server_started_total", **vmcontrol, grpc_method="AdviseRanges") == 6
    assert m.value("vmctl_grpc_calls_in_flight", **vmcontrol, grpc_method="AdviseRanges") == 0
    assert m.value("vmctl_agent_path", component="tables", path="native") == 1
    assert m.value("vmctl_agent_path", component="advise_loop", path="native") == 1
    assert m.value("vmctl_agent_path", component="access_sampling", path="clear_refs") == 1
    assert m.value("process_resident_memory_bytes") > 0


def test_series_carry_the_grpc_ecosystems_names_for_every_service(metered_agent, target):
    """go-grpc-prometheus's names and labels, grpc_type as each proto declares
    it; health and reflection are counted beside VmControl; no _created series."""
    agent, port = metered_agent

    def quiet() -> Scrape | None:  # the fixture's own health checks, while it waited for the agent, all counted
        m = Scrape(port)
        return m if m.total("grpc_server_started_total") == m.total("grpc_server_handled_total") else None

    before = wait_for(quiet, what="the fixture's calls counted as handled")
    with grpc.insecure_channel(agent.address) as channel:
        stub = vmctl_pb2_grpc.VmControlStub(channel)
        stub.GetVmaInfo(pb.GetVmaInfoRequest(pid=target.pid))
        assert len(list(stub.StreamVmaInfo(pb.StreamVmaInfoRequest(pid=target.pid)))) >= 2
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest())
        watch = health.Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "vmctl.v1.VmControl" in services
    expected = [
        ("vmctl.v1.VmControl", "GetVmaInfo", "unary", "OK"),
        ("vmctl.v1.VmControl", "StreamVmaInfo", "server_stream", "OK"),
        ("grpc.health.v1.Health", "Check", "unary", "OK"),
        ("grpc.health.v1.Health", "Watch", "server_stream", "CANCELLED"),
        ("grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo", "bidi_stream", "OK"),
    ]

    def handled(m: Scrape, method: str) -> float:
        return m.total("grpc_server_handled_total", grpc_method=method)

    def all_handled() -> Scrape | None:
        m = Scrape(port)  # the Watch and the reflection stream end as their callers go
        return m if all(handled(m, method) > handled(before, method) for _, method, _, _ in expected) else None

    after = wait_for(all_handled, what="every call handled")
    for service, method, grpc_type, code in expected:
        labels = {"grpc_service": service, "grpc_method": method, "grpc_type": grpc_type}
        for name, extra in (
            ("grpc_server_started_total", {}),
            ("grpc_server_handled_total", {"grpc_code": code}),
            ("grpc_server_handling_seconds_count", {"grpc_code": code}),
        ):
            assert after.value(name, **labels, **extra) - before.value(name, **labels, **extra) == 1, (name, method)
    for accept in ("text/plain", "application/openmetrics-text; version=1.0.0"):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
        with urllib.request.urlopen(request, timeout=10) as reply:
            text = reply.read().decode()
        assert "grpc_server_handled_total{" in text, accept
        assert "_created" not in text, accept
        assert "vmctl_grpc_calls_total" not in text and "vmctl_grpc_call_duration" not in text  # the old names


def test_in_flight_calls_and_the_fallback_path_are_visible(start_agent, target):
    agent = start_agent("--no-native", "--metrics-listen", "127.0.0.1:0", "--log-format", "json")
    port = logged_port(agent, "metrics_port")
    limit = int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())
    target.call("many_vmas", limit=limit)  # the pure-Python smaps parse of these takes a second or more
    done = threading.Event()

    def slow_read() -> None:
        try:
            with agent.client() as client:
                client.get_vma_info(target.pid, attrs=("accounting",))
        finally:
            done.set()

    reader = threading.Thread(target=slow_read)
    reader.start()
    scraped: list[float] = []

    def in_flight_or_done() -> bool:
        scraped.append(Scrape(port).in_flight("GetVmaInfo"))
        return bool(scraped[-1]) or done.is_set()

    try:
        wait_for(in_flight_or_done, "the slow read to be in flight (or over)")
    finally:
        reader.join(120)
    assert scraped[-1] == 1, "the slow read was never seen in flight"
    after = Scrape(port)
    assert after.in_flight("GetVmaInfo") == 0
    assert after.calls("GetVmaInfo", "OK") == 1
    assert after.value("vmctl_agent_path", component="tables", path="python") == 1
    assert after.value("vmctl_agent_path", component="tables", path="native") == 0
    assert after.value("vmctl_agent_path", component="advise_loop", path="python") == 1


def test_health_listener_serves_only_health_and_reports_draining(start_agent, target):
    agent = start_agent("--health-listen", "127.0.0.1:0", "--log-format", "json")
    port = logged_port(agent, "health_port")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "vmctl.v1.VmControl"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as refused:
            vmctl_pb2_grpc.VmControlStub(channel).GetVmaInfo(pb.GetVmaInfoRequest(pid=target.pid), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED

        # While the agent drains, the probe port says NOT_SERVING before it goes away.
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        agent.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    assert agent.proc.wait(30) == 0, agent.log()


@pytest.mark.unprivileged
def test_operations_listeners_reject_bad_addresses():
    for flag, value in (("--metrics-listen", "nowhere"), ("--health-listen", "127.0.0.1:99999")):
        result = subprocess.run(
            [sys.executable, "-m", "vmctl_server.agent", flag, value], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 2, result.stderr
        assert "expected HOST:PORT" in result.stderr

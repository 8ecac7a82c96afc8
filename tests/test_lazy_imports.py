"""The idle agent loads only what its flags need: prometheus-client only when it
serves metrics, PyYAML only with a policy file (see runtime/meters.py).

Each case wires a real agent (config.parse and agent.build_parts: the kernel
probe, the back-end, the gateway's sockets) in a fresh interpreter and lists
what it imported; one more runs a call through the interceptor without metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.agents import write_policy

WIRE = r"""
import json, sys
from vmctl_server import agent, config

args = config.parse(sys.argv[1:])
agent.build_parts(args)
from vmctl_server.runtime import meters
meters.STARTED.labels("s", "m", "unary").inc()  # what the interceptor does on every call
print(json.dumps({name: name in sys.modules for name in ("prometheus_client", "yaml", "vmctl_server.runtime.metrics")}))
"""


def loaded(tmp_path: Path, *flags: str) -> dict[str, bool]:
    socket, audit = tmp_path / "agent.sock", tmp_path / "audit.log"
    run = subprocess.run(
        [sys.executable, "-c", WIRE, "--listen", f"unix://{socket}", "--audit-log", str(audit), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    result: dict[str, bool] = json.loads(run.stdout.splitlines()[-1])
    return result


@pytest.mark.skipif(sys.platform != "linux", reason="the agent runs on Linux")
def test_an_agent_without_metrics_or_policy_loads_neither(tmp_path: Path) -> None:
    assert loaded(tmp_path) == {"prometheus_client": False, "yaml": False, "vmctl_server.runtime.metrics": False}


def test_metrics_and_a_policy_load_what_they_need(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, 'rules: [{identities: ["uid:0"], verbs: [read]}]')
    assert loaded(tmp_path, "--policy", policy) == {
        "prometheus_client": False,
        "yaml": True,
        "vmctl_server.runtime.metrics": False,
    }
    assert loaded(tmp_path, "--metrics-listen", "127.0.0.1:0") == {
        "prometheus_client": True,
        "yaml": False,
        "vmctl_server.runtime.metrics": True,
    }


@pytest.mark.unprivileged
def test_the_meters_stand_in_takes_every_use() -> None:
    code = r"""
import sys
from vmctl_server.runtime import meters
meters.GATEWAY_CONNECTIONS.inc(); meters.GATEWAY_CONNECTIONS.dec()
meters.HANDLING.labels("s", "m", "unary", "OK").observe(0.1)
meters.record_advice("fresh", "cold", 1, 1, 1, applied=True)
with meters.IN_FLIGHT.labels("s", "m", "unary").track_inprogress():
    pass
assert not meters.REGISTRY
assert "prometheus_client" not in sys.modules
from vmctl_server.runtime import metrics
meters.COOKIE_CHECKS.labels("fresh").inc()  # once metrics is imported, recorded into it
assert metrics.REGISTRY.get_sample_value("vmctl_cookie_checks_total", {"outcome": "fresh"}) == 1.0
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

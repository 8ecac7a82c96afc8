"""Reading an agent's state back: the port it logged, and one scrape of its /metrics parsed."""

from __future__ import annotations

import json
import re
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def logged_port(agent, field: str) -> int:
    """The port the agent reports binding (it was started with port 0), from a text or JSON log."""
    for line in agent.log().splitlines():
        if line.startswith("{"):
            value = json.loads(line).get(field)
            if value is not None:
                return int(value)
        elif match := re.search(rf"\b{field}=(\d+)", line):
            return int(match.group(1))
    raise AssertionError(f"the agent logged no {field}:\n{agent.log()}")


class Scrape:
    """One GET of /metrics, parsed with prometheus-client's own parser."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        with urllib.request.urlopen(f"http://{netloc}/metrics", timeout=10) as reply:
            assert reply.status == 200
            text = reply.read().decode()
        self.samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def calls(self, method: str, code: str) -> float:
        return self.value("vmctl_grpc_calls_total", service="vmctl.v1.VmControl", method=method, code=code)

    def in_flight(self, method: str) -> float:
        return self.value("vmctl_grpc_calls_in_flight", service="vmctl.v1.VmControl", method=method)

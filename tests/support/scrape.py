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

    def total(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(value for (sample, found), value in self.samples.items() if sample == name and wanted <= set(found))

    def calls(self, method: str, code: str) -> float:
        service = "vmctl.v1.VmControl"
        return self.total("grpc_server_handled_total", grpc_service=service, grpc_method=method, grpc_code=code)

    def in_flight(self, method: str) -> float:
        return self.total("vmctl_grpc_calls_in_flight", grpc_service="vmctl.v1.VmControl", grpc_method=method)

"""Reading the agent's audit records back (JSON lines with logger "vmctl.audit").

Agents started by the ``start_agent`` fixture write their audit log to
standard output, which lands in the agent's log file with its other output.
"""

from __future__ import annotations

import json
import pathlib


def audit_records(source: str | pathlib.Path, event: str | None = "advise") -> list[dict]:
    """Every audit record in ``source`` (a path, or an agent log's text), in order."""
    text = source.read_text() if isinstance(source, pathlib.Path) else source
    records = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("logger") == "vmctl.audit" and (event is None or record.get("event") == event):
            records.append(record)
    return records

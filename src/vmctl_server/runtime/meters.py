"""The agent's metrics as its recording sites see them: the real series of
:mod:`vmctl_server.runtime.metrics` once :func:`enable` has run, and a
do-nothing stand-in before that.

prometheus-client costs the agent about 8 MB of anonymous memory and a
fifth of its start-up imports, and a few microseconds of locked label
lookups on every call, all for nobody when ``--metrics-listen`` is off (the
default). So the transport records through this module (``meters.STARTED
.labels(...).inc()``, exactly as it would through ``metrics``), and the agent
calls :func:`enable` at start only when it serves metrics; until then every
series, label and method is the stand-in, and ``metrics`` (with
prometheus-client) is never imported; once anything has imported
``metrics``, its series are recorded into. Series are defined in ``metrics``
alone; nothing needs adding here when one is added there.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

_metrics: ModuleType | None = None


class _Off:
    """Any series, any label, any method, any context: nothing recorded."""

    def __getattr__(self, name: str) -> _Off:
        return self

    def __call__(self, *args: object, **kwargs: object) -> _Off:
        return self

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __bool__(self) -> bool:
        return False


_OFF = _Off()


def enable() -> ModuleType:
    """Record into the real series from now on (imports prometheus-client); idempotent."""
    global _metrics
    if _metrics is None:
        from vmctl_server.runtime import metrics

        _metrics = metrics
    return _metrics


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    if _metrics is None:
        # Whoever imported metrics (a test reading its registry) gets its series recorded into.
        if "vmctl_server.runtime.metrics" not in sys.modules:
            return _OFF
        enable()
    return getattr(_metrics, name)

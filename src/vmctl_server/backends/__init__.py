"""The VMA tables and the per-range advice work, each in C (native) and in pure Python
(reference, the twin the C must equal). The wiring picks one with :func:`select_native` or
:func:`select_reference`; the core sees only the protocols in core.snapshot and core.advice.

The functions are not named ``native`` and ``reference``: importing the subpackages of those
names sets them as attributes of this package, which would replace such functions with modules."""

from __future__ import annotations

from dataclasses import dataclass

from vmctl_server.core.advice import RangeBackend
from vmctl_server.core.snapshot import TableBackend


@dataclass(frozen=True)
class Backend:
    tables: TableBackend
    ranges: RangeBackend
    native: bool


def select_reference() -> Backend:
    from vmctl_server.backends.reference.ranges import PyRanges
    from vmctl_server.backends.reference.tables import PyVmaTable

    return Backend(PyVmaTable, PyRanges, native=False)


def select_native() -> Backend:
    """The C back-end; ImportError when the extension was not built."""
    from vmctl_server.backends.native.ranges import NativeRanges
    from vmctl_server.backends.native.tables import NativeVmaTable

    return Backend(NativeVmaTable, NativeRanges, native=True)

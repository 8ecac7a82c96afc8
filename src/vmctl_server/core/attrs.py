"""Attribute groups of the statx-like mask (values of ``vmctl.v1.VmaAttr``).

The core keeps its own copy of the numbers so it stays free of gRPC; a test
checks they equal the proto's.
"""

ATTR_LAYOUT = 1
ATTR_BUILD_ID = 2
ATTR_RESIDENCY = 4
ATTR_ACCOUNTING = 8
ATTR_ALL = ATTR_LAYOUT | ATTR_BUILD_ID | ATTR_RESIDENCY | ATTR_ACCOUNTING

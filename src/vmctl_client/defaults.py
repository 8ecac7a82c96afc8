"""The defaults a caller may override, in a module that imports nothing, so
the command line can show them in ``--help`` without loading gRPC."""

DEFAULT_TARGET = "unix:///run/vmctl/agent.sock"
TARGET_ENV = "VMCTL_TARGET"
DEFAULT_TIMEOUT = 30.0  # seconds per call
DEFAULT_HOST_DEADLINE = 120.0  # seconds per host for a whole operation (Fleet)
DEFAULT_CONCURRENCY = 16  # hosts worked on at once (Fleet)
# reclaim's re-reads after LAYOUT_CHANGED. A retry re-reads the whole layout, which costs little next to
# failing: under scope "ranges" a retry is rare (only a fallback to the whole layout is refused so), and a
# process mapping thousands of times a second failed 4 runs in 10 with 3 retries.
DEFAULT_RETRIES = 8
DEFAULT_RECLAIM_SCOPE = "ranges"  # reclaim's scope: each chosen VMA checked alone (see Client.advise_ranges)

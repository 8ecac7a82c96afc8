"""The defaults a caller may override, in a module that imports nothing, so
the command line can show them in ``--help`` without loading gRPC."""

DEFAULT_TARGET = "unix:///run/vmctl/agent.sock"
TARGET_ENV = "VMCTL_TARGET"
DEFAULT_TIMEOUT = 30.0  # seconds per call
DEFAULT_HOST_DEADLINE = 120.0  # seconds per host for a whole operation (Fleet)
DEFAULT_CONCURRENCY = 16  # hosts worked on at once (Fleet)
DEFAULT_RETRIES = 3  # reclaim's re-reads after LAYOUT_CHANGED

"""vmctl-agent: the node agent that reads and advises process memory."""

__version__ = "0.1.0"

"""The agent as a process: logs, metrics, the allocator, kernel probes, files it owns."""

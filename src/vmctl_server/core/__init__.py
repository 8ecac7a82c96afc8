"""What the agent knows without any transport: /proc, the kernel's calls, cgroups, layouts and
cookies, snapshots, advice. Plain values in, plain values and faults out; imports neither grpc nor
protobuf nor the client (tests/test_layers.py checks every module of it)."""

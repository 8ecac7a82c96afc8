"""The contract's Python face: the stubs generated from proto/vmctl/v1/vmctl.proto (scripts/gen_proto.py)
and the words both ends share. Imports nothing of the client or the agent."""

"""Generated from proto/vmctl/v1/vmctl.proto by scripts/gen_proto.py. Do not edit."""

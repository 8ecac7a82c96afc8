#!/usr/bin/env python3
"""Generate the Python stubs from proto/ into src/vmctl_api/.

    python scripts/gen_proto.py            # regenerate in place
    python scripts/gen_proto.py --out DIR  # generate elsewhere (the drift test)

grpc_tools emits absolute imports named after the proto package
(``from vmctl.v1 import vmctl_pb2``); they are rewritten to the module's
real home, the leaf package vmctl_api that client and agent both import.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO = "vmctl/v1/vmctl.proto"
DEFAULT_OUT = ROOT / "src" / "vmctl_api"
GENERATED = ("vmctl_pb2.py", "vmctl_pb2.pyi", "vmctl_pb2_grpc.py")


def generate(out: pathlib.Path) -> None:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            text = (pathlib.Path(tmp) / "vmctl" / "v1" / name).read_text()
            text = text.replace("from vmctl.v1 import vmctl_pb2", "from vmctl_api import vmctl_pb2")
            (out / name).write_text(text)
    init = out / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated from proto/vmctl/v1/vmctl.proto by scripts/gen_proto.py. Do not edit."""\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    generate(args.out)
    print(f"generated {', '.join(GENERATED)} in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

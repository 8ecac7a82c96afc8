"""A process whose GetVmaInfo reply is larger than gRPC's default 4 MiB receive limit.

The shape behind issue 11's report (30,119 VMAs with long paths gave a 4.2 MB
reply that grpcurl and grpc-js refused), reached cheaply: one page of a file
whose path is nearly PATH_MAX long, mapped over and over. Each mapping is its
own VMA (their file offsets do not continue one another, so the kernel never
merges them) and each costs about 3.9 KB of reply, so a thousand or so pass 4 MiB.
"""

from __future__ import annotations

import os
import pathlib

GRPC_DEFAULT_RECEIVE_LIMIT = 4 << 20
PATH_MAX = os.pathconf("/", "PC_PATH_MAX")
PAGE = os.sysconf("SC_PAGE_SIZE")


def long_path_file(base: pathlib.Path) -> pathlib.Path:
    """A one-page file under ``base`` whose absolute path is a little under PATH_MAX."""
    directory = base.resolve()
    depth = 0
    while len(str(directory)) < PATH_MAX - 300:
        directory /= f"{depth:02d}-" + "a-directory-with-a-long-name-" * 8
        depth += 1
    directory.mkdir(parents=True)
    path = directory / "one-mapped-page"
    path.write_bytes(bytes(range(256)) * (PAGE // 256))
    return path


def map_long_paths(target, base: pathlib.Path, count: int) -> pathlib.Path:
    """Give ``target`` (a tests/target.py process) ``count`` VMAs of one long-path file."""
    path = long_path_file(base)
    for _ in range(count):
        target.map_file(str(path), PAGE)
    return path


# Over 4 MiB with room to spare: each VMA is its path plus about 40 bytes on the wire.
OVER_THE_DEFAULT_LIMIT = GRPC_DEFAULT_RECEIVE_LIMIT // (PATH_MAX - 300) + 200

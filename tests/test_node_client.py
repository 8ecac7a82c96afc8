"""The contract from another language: tests/node_client.mjs (Node.js,
@grpc/grpc-js and @grpc/proto-loader as package-lock.json pins them, the
channel's default options) against a real agent over its unix socket."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest
from google.rpc import status_pb2
from support.long_paths import GRPC_DEFAULT_RECEIVE_LIMIT, OVER_THE_DEFAULT_LIMIT, map_long_paths
from support.node_tools import node_modules

TESTS = pathlib.Path(__file__).resolve().parent
CLIENT = TESTS / "node_client.mjs"
# Where googleapis-common-protos (a dependency of grpcio-status) keeps google/rpc/*.proto.
GOOGLEAPIS = pathlib.Path(status_pb2.__file__).resolve().parent.parent.parent
MiB = 1 << 20


@pytest.fixture(scope="module")
def node() -> None:
    node_modules()


def run_node(agent, command: str, *args: object) -> dict:
    result = subprocess.run(
        ["node", str(CLIENT), agent.address, str(GOOGLEAPIS), command, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_node_client_reads_advises_with_the_cookie_and_decodes_refusals(node, agent, target, zram_swap):
    start, end = target.map_anon(8 * MiB, seed=21)
    snapshot = run_node(agent, "maps", target.pid)
    assert snapshot["process"]["pid"] == target.pid
    region = next(v for v in snapshot["vmas"] if int(v["start"]) == start)
    assert (int(region["end"]), region["kind"], int(region["rss"])) == (end, "VMA_KIND_ANONYMOUS", end - start)

    advised = run_node(agent, "advise", target.pid, start, end, "ADVICE_PAGEOUT", snapshot["cookie"])
    assert (int(advised["advised_bytes"]), advised["ranges"][0]["error"]) == (end - start, "")
    assert target.smaps_region(start)["Swap"] > 0
    target.verify()  # paged out, and every byte comes back

    refused = run_node(agent, "advise", target.pid, start + 1, end, "ADVICE_COLD", snapshot["cookie"])["error"]
    assert (refused["code"], refused["reason"]) == ("INVALID_ARGUMENT", "RANGE_UNALIGNED")
    assert refused["domain"] == "vmctl.dev"
    assert refused["metadata"] == {"field": "ranges[0]", "range": f"0x{start + 1:x}-0x{end:x}"}

    target.map_anon(MiB)  # the layout moves on: the cookie is stale
    stale = run_node(agent, "advise", target.pid, start, end, "ADVICE_COLD", snapshot["cookie"])["error"]
    assert (stale["code"], stale["reason"], stale["metadata"]) == (
        "FAILED_PRECONDITION",
        "LAYOUT_CHANGED",
        {"pid": str(target.pid)},
    )
    target.verify()


def test_a_node_client_reads_a_process_over_its_receive_limit_through_the_stream(node, agent, target, tmp_path):
    map_long_paths(target, tmp_path, OVER_THE_DEFAULT_LIMIT)
    start, end = target.map_anon(MiB, seed=22)
    with target.stopped(), agent.client() as client:
        python = client.get_vma_info(target.pid, attrs=("rss",))
        unary = run_node(agent, "maps", target.pid)
        streamed = run_node(agent, "stream", target.pid)
    assert python.reply.ByteSize() > GRPC_DEFAULT_RECEIVE_LIMIT
    assert unary["error"]["code"] == "RESOURCE_EXHAUSTED"  # grpc-js's own limit: the reason for the stream
    assert "larger than max" in unary["error"]["details"]

    assert streamed["first_message_vmas"] == 0
    assert len(streamed["message_sizes"]) >= 6
    assert max(streamed["message_sizes"]) < MiB
    assert sum(streamed["message_sizes"]) > GRPC_DEFAULT_RECEIVE_LIMIT
    assert streamed["cookie"] == python.cookie_b64
    assert [(int(v["start"]), int(v["end"]), v["path"]) for v in streamed["vmas"]] == [
        (v.start, v.end, v.path) for v in python.vmas
    ]

    advised = run_node(agent, "advise", target.pid, start, end, "ADVICE_COLD", streamed["cookie"])
    assert int(advised["advised_bytes"]) == end - start
    target.verify()

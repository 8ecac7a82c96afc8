"""StreamVmaInfo: GetVmaInfo's snapshot in messages under 1 MiB, so that a
client with gRPC's default 4 MiB receive limit reads a process of any size.
Real agents, real targets, real gRPC channels with their default options."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
from support.agents import write_policy
from support.audit_lines import audit_records
from support.expect import expect_error
from support.long_paths import GRPC_DEFAULT_RECEIVE_LIMIT, OVER_THE_DEFAULT_LIMIT, map_long_paths
from support.peers import NOBODY, ConnectAs
from support.scrape import Scrape, logged_port
from support.waiting import wait_for

from vmctl_api import vmctl_pb2 as pb
from vmctl_api import vmctl_pb2_grpc
from vmctl_client import AsyncClient, Client
from vmctl_client.calls import RetryPolicy

MESSAGE_LIMIT = 1 << 20  # every StreamVmaInfo message is smaller
ALL_ATTRS = pb.VMA_ATTR_BUILD_ID | pb.VMA_ATTR_RESIDENCY | pb.VMA_ATTR_ACCOUNTING


def read_both(address: str, pid: int, attr_mask: int) -> tuple[pb.GetVmaInfoResponse, list[bytes]]:
    """GetVmaInfo on a channel without a receive limit, and StreamVmaInfo's
    messages, as bytes, on a channel with gRPC's defaults."""
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)]) as channel:
        whole = vmctl_pb2_grpc.VmControlStub(channel).GetVmaInfo(pb.GetVmaInfoRequest(pid=pid, attr_mask=attr_mask))
    with grpc.insecure_channel(address) as channel:
        stream = channel.unary_stream(
            "/vmctl.v1.VmControl/StreamVmaInfo",
            request_serializer=pb.StreamVmaInfoRequest.SerializeToString,
            response_deserializer=None,  # the bytes as sent
        )
        messages = list(stream(pb.StreamVmaInfoRequest(pid=pid, attr_mask=attr_mask), timeout=60))
    return whole, messages


def assert_stream_is_the_snapshot(whole: pb.GetVmaInfoResponse, messages: list[bytes]) -> None:
    """The first message is the header alone, the rest VMAs alone, each under
    1 MiB and as full as the next VMA allows; together, exactly GetVmaInfo's reply."""
    header, *chunks = (pb.StreamVmaInfoResponse.FromString(m) for m in messages)
    assert (header.process, header.cookie, header.result_mask) == (whole.process, whole.cookie, whole.result_mask)
    assert not header.vmas
    assert all(not c.HasField("process") and not c.cookie and not c.result_mask and c.vmas for c in chunks)
    assert all(len(m) < MESSAGE_LIMIT for m in messages)
    for chunk, following in zip(messages[1:], chunks[1:], strict=False):
        first_of_next = pb.StreamVmaInfoResponse(vmas=following.vmas[:1]).ByteSize()
        assert len(chunk) + first_of_next >= MESSAGE_LIMIT
    assert stable(pb.GetVmaInfoResponse.FromString(b"".join(messages))) == stable(whole)


# What other processes change in a stopped process's smaps: how many map each of its shared pages.
SHARING_FIELDS = (
    "pss_bytes", "pss_dirty_bytes", "swap_pss_bytes", "referenced_bytes",
    "shared_clean_bytes", "shared_dirty_bytes", "private_clean_bytes", "private_dirty_bytes",
)  # fmt: skip


def stable(reply: pb.GetVmaInfoResponse) -> pb.GetVmaInfoResponse:
    """``reply`` without the counts that two reads of one stopped process may differ in."""
    copy = pb.GetVmaInfoResponse()
    copy.CopyFrom(reply)
    for vma in copy.vmas:
        for field in SHARING_FIELDS:
            vma.ClearField(field)
    return copy


def test_a_process_over_the_default_limit_is_read_whole_through_the_stream(agent, target, tmp_path):
    map_long_paths(target, tmp_path, OVER_THE_DEFAULT_LIMIT)
    with target.stopped():  # one layout for both reads
        whole, messages = read_both(agent.address, target.pid, pb.VMA_ATTR_RESIDENCY)
    assert whole.ByteSize() > GRPC_DEFAULT_RECEIVE_LIMIT
    assert len(messages) >= 6
    assert_stream_is_the_snapshot(whole, messages)
    # What a client with gRPC's defaults gets from GetVmaInfo for the same process:
    with grpc.insecure_channel(agent.address) as channel, pytest.raises(grpc.RpcError) as refused:
        vmctl_pb2_grpc.VmControlStub(channel).GetVmaInfo(pb.GetVmaInfoRequest(pid=target.pid), timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in refused.value.details()


@pytest.mark.parametrize("attr_mask", [0, ALL_ATTRS], ids=["layout", "all"])
def test_both_agents_stream_every_attribute_of_tens_of_thousands_of_vmas(any_agent, target, attr_mask):
    target.call("many_vmas", limit=30_000)
    with target.stopped():
        whole, messages = read_both(any_agent.address, target.pid, attr_mask)
    assert len(whole.vmas) >= 30_000
    assert_stream_is_the_snapshot(whole, messages)


def test_the_streams_cookie_advises_and_the_memory_survives(agent, target, tmp_path, zram_swap):
    map_long_paths(target, tmp_path, 64)
    start, end = target.map_anon(8 << 20, seed=11)
    with agent.client() as client:
        info = client.get_vma_info(target.pid, attrs=("rss",), stream=True)
        region = next(v for v in info.vmas if v.start == start)
        assert region.rss == end - start  # the lazy views read the joined reply
        result = client.advise_ranges(target.pid, [(start, end)], "pageout", cookie=info.cookie)
    assert result.advised_bytes == end - start
    assert target.smaps_region(start)["Swap"] > 0
    target.verify()


def test_the_clients_read_the_same_snapshot_either_way(agent, target, tmp_path):
    map_long_paths(target, tmp_path, 200)

    async def read_async() -> tuple:
        async with AsyncClient(agent.address) as client:
            streamed = await client.get_vma_info(target.pid, attrs="all", stream=True)
            whole = await client.get_vma_info(target.pid, attrs="all")
            return streamed.reply, whole.reply

    with target.stopped(), agent.client() as client:
        streamed = client.get_vma_info(target.pid, attrs="all", stream=True)
        whole = client.get_vma_info(target.pid, attrs="all")
        assert stable(streamed.reply) == stable(whole.reply) and streamed.cookie == whole.cookie
        assert [v.path for v in streamed.vmas] == [v.path for v in whole.vmas]
        assert streamed.result_attrs == whole.result_attrs
        assert [stable(reply) for reply in asyncio.run(read_async())] == [stable(whole.reply)] * 2


def test_refusals_are_getvmainfo_refusals(agent, spawn_target):
    gone = spawn_target()
    gone.kill()
    with agent.client(retry=RetryPolicy(attempts=1)) as client:
        for stream in (False, True):
            expect_error(lambda s=stream: client.get_vma_info(0, stream=s), "INVALID_ARGUMENT", "INVALID_PID")
            expect_error(lambda s=stream: client.get_vma_info(gone.pid, stream=s), "NOT_FOUND", "PROCESS_GONE")
            expect_error(lambda s=stream: client.get_vma_info(2, stream=s), "FAILED_PRECONDITION", "NO_ADDRESS_SPACE")
    unknown_bit = pb.StreamVmaInfoRequest(pid=os.getpid(), attr_mask=64)
    with grpc.insecure_channel(agent.address) as channel, pytest.raises(grpc.RpcError) as refused:
        list(vmctl_pb2_grpc.VmControlStub(channel).StreamVmaInfo(unknown_bit))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown bits 0x40" in refused.value.details()


def test_the_policy_judges_a_stream_as_a_read(start_agent, target, public_dir):
    policy = write_policy(
        public_dir,
        f"""
rules:
  - name: root
    identities: ["uid:0"]
    verbs: [read, advise]
  - name: nobody-reads-nothing-but-the-node
    identities: ["uid:{NOBODY}"]
    verbs: [read]
    targets: {{comm: ["no-such-command"]}}
""",
    )
    agent = start_agent("--socket-mode", "0666", "--policy", policy, socket_dir=public_dir)
    with ConnectAs(agent.socket_path, NOBODY) as nobody, Client(nobody.address, retry=RetryPolicy(attempts=1)) as c:
        error = expect_error(lambda: c.get_vma_info(target.pid, stream=True), "PERMISSION_DENIED", "POLICY_DENIED")
        assert error.metadata["identity"] == f"uid:{NOBODY}"
    (record,) = audit_records(agent.log(), event="read")
    assert (record["method"], record["identity"]) == ("StreamVmaInfo", f"uid:{NOBODY}")
    assert record["reason"] == "POLICY_DENIED"


@pytest.fixture
def one_slot_agent(start_agent):
    agent = start_agent("--max-calls", "1", "--metrics-listen", "127.0.0.1:0")
    return agent, logged_port(agent, "metrics_port")


def open_stream(agent, pid: int) -> tuple[grpc.Channel, grpc.Call]:
    """A StreamVmaInfo on a channel of its own, its first message read, the rest left unread."""
    channel = grpc.insecure_channel(agent.address)
    call = vmctl_pb2_grpc.VmControlStub(channel).StreamVmaInfo(pb.StreamVmaInfoRequest(pid=pid), timeout=120)
    assert next(call).cookie
    return channel, call


def the_slot_is_taken(agent) -> bool:
    with agent.client(retry=RetryPolicy(attempts=1)) as client:
        error = expect_error(client.node_info, "RESOURCE_EXHAUSTED", "CONCURRENCY_LIMIT")
    return error.metadata.get("scope") == "agent"


def the_slot_is_free(agent) -> bool:
    with agent.client(retry=RetryPolicy(attempts=1)) as client:
        return bool(client.node_info().hostname)


# About 20 MB of messages: more than gRPC's flow-control windows and the
# sockets between client and agent hold, so the agent cannot have written the
# last message while the client reads none.
UNREAD_VMAS = 4 * OVER_THE_DEFAULT_LIMIT


def test_a_stream_holds_its_slot_until_its_last_message_is_written(one_slot_agent, target, tmp_path):
    agent, port = one_slot_agent
    map_long_paths(target, tmp_path, UNREAD_VMAS)
    channel, call = open_stream(agent, target.pid)
    try:
        assert Scrape(port).in_flight("StreamVmaInfo") == 1
        assert the_slot_is_taken(agent)
        rest = list(call)  # now read: the agent writes the last message and lets go
        assert sum(len(m.vmas) for m in rest) >= UNREAD_VMAS
    finally:
        channel.close()
    wait_for(lambda: the_slot_is_free(agent), what="the slot given back after the last message")
    assert Scrape(port).calls("StreamVmaInfo", "OK") == 1


def test_a_stream_the_caller_abandons_gives_its_slot_back(one_slot_agent, target, tmp_path):
    agent, port = one_slot_agent
    map_long_paths(target, tmp_path, UNREAD_VMAS)
    channel, call = open_stream(agent, target.pid)
    try:
        assert the_slot_is_taken(agent)
        call.cancel()
    finally:
        channel.close()
    wait_for(lambda: the_slot_is_free(agent), what="the slot given back after the caller left")
    wait_for(lambda: Scrape(port).in_flight("StreamVmaInfo") == 0, what="the stream no longer in flight")
    assert Scrape(port).calls("StreamVmaInfo", "CANCELLED") == 1
    assert " ERROR " not in agent.log()  # a caller leaving is no fault of the agent's

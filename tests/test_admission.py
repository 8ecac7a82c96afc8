"""Admission before anything is held: callers that send headers and never a
request, floods from users with no rights, and the health service under
both, end to end against real agents (issue 9, item 2).

grpc-python's thread-pool server reads a unary request on the worker that
will run the handler, so such calls used to hold every worker: 8 of them
from a user with no rights stalled every call, root's included, and 4
stalled health. The agent now admits on the headers (identity, limits, the
policy's verb), reads the request only for admitted calls and within
``--request-timeout``, and runs health on its event loop.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.agents import write_policy
from support.expect import expect_error
from support.peers import NOBODY, ConnectAs
from support.processes import status_kb
from support.scrape import logged_port
from support.stalls import HeaderOnlyCalls
from support.waiting import wait_for

from vmctl_client import Client
from vmctl_client.calls import RetryPolicy

NO_RETRY = RetryPolicy(attempts=1)
GET_VMA_INFO = "/vmctl.v1.VmControl/GetVmaInfo"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def _health(address: str) -> int:
    """One health check on a connection of its own."""
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_header_only_calls_from_a_user_with_no_rights_are_refused_on_their_headers(start_agent, target, public_dir):
    agent = start_agent("--socket-mode", "0666", "--workers", "2", socket_dir=public_dir)
    with ConnectAs(agent.socket_path, NOBODY) as nobody, HeaderOnlyCalls(nobody.address, GET_VMA_INFO, 16) as stalls:
        # Refused without waiting for a request that never comes.
        assert stalls.codes(timeout=30) == [grpc.StatusCode.PERMISSION_DENIED] * 16
    with agent.client(retry=NO_RETRY, timeout=10) as root:
        assert root.get_vma_info(target.pid).process.pid == target.pid


def test_header_only_calls_of_an_admitted_caller_hold_no_worker_and_time_out(start_agent, target):
    agent = start_agent("--workers", "2", "--request-timeout", "3", "--health-listen", "127.0.0.1:0")
    health_port = logged_port(agent, "health_port")
    with (
        HeaderOnlyCalls(agent.address, GET_VMA_INFO, 12) as stalls,
        HeaderOnlyCalls(f"127.0.0.1:{health_port}", HEALTH_CHECK, 12) as health_stalls,
    ):
        # Every call above is admitted and waiting for its request; meanwhile
        # the workers, health on both listeners and other callers are free.
        assert _health(agent.address) == health_pb2.HealthCheckResponse.SERVING
        assert _health(f"127.0.0.1:{health_port}") == health_pb2.HealthCheckResponse.SERVING
        with agent.client(retry=NO_RETRY, timeout=10) as root:
            assert root.get_vma_info(target.pid).process.pid == target.pid
        # Then the agent cuts them off: the request did not arrive in time.
        assert stalls.codes() == [grpc.StatusCode.DEADLINE_EXCEEDED] * 12
        assert health_stalls.codes() == [grpc.StatusCode.DEADLINE_EXCEEDED] * 12
    assert "reason=REQUEST_TIMEOUT" in agent.log()


def test_a_flood_of_header_only_calls_leaves_memory_bounded(start_agent, public_dir):
    agent = start_agent("--socket-mode", "0666", socket_dir=public_dir)
    with agent.client() as root:
        root.node_info()
    before = status_kb(agent.proc.pid, "VmRSS")
    with ConnectAs(agent.socket_path, NOBODY) as nobody:
        for _round in range(10):
            with HeaderOnlyCalls(nobody.address, GET_VMA_INFO, 500, connections=10) as stalls:
                assert set(stalls.codes()) == {grpc.StatusCode.PERMISSION_DENIED}
    grown_kb = status_kb(agent.proc.pid, "VmRSS") - before
    # 5,000 refused calls hold nothing: what grew is allocator noise, not a per-call cost
    # (the thread-pool server kept ~106 MB, 21 KB a call, and never gave it back).
    assert grown_kb < 16 * 1024, f"the agent grew {grown_kb} kB over 5,000 refused calls"
    with agent.client(retry=NO_RETRY, timeout=10) as root:
        assert root.node_info().hostname


def test_limits_come_before_the_policy(start_agent, public_dir):
    """A caller with no rights is rate limited before the policy looks at it."""
    agent = start_agent(
        "--socket-mode", "0666", "--rate-per-identity", "1", "--burst-per-identity", "2", socket_dir=public_dir
    )  # fmt: skip
    with ConnectAs(agent.socket_path, NOBODY) as nobody, Client(nobody.address, retry=NO_RETRY) as client:
        for _ in range(2):
            expect_error(client.node_info, "PERMISSION_DENIED", "POLICY_DENIED")
        expect_error(client.node_info, "RESOURCE_EXHAUSTED", "RATE_LIMITED")


def test_an_identity_over_its_limit_holds_no_slot_and_others_go_on(start_agent, target, public_dir):
    policy = write_policy(public_dir, f'rules: [{{identities: ["uid:0", "uid:{NOBODY}"], verbs: [read]}}]')
    agent = start_agent(
        "--socket-mode", "0666", "--policy", policy, "--max-calls-per-identity", "4", "--request-timeout", "30",
        socket_dir=public_dir,
    )  # fmt: skip
    with ConnectAs(agent.socket_path, NOBODY) as nobody, HeaderOnlyCalls(nobody.address, GET_VMA_INFO, 8) as stalls:
        # Four are admitted and wait for their requests; the other four are refused on their headers.
        wait_for(lambda: sum(f.done() for f in stalls.futures) == 4, what="four refusals")
        refused = [f.exception().code() for f in stalls.futures if f.done()]
        assert refused == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4
        with agent.client(retry=NO_RETRY, timeout=10) as root:
            assert root.get_vma_info(target.pid).process.pid == target.pid


def test_health_and_reflection_calls_held_open_are_capped_per_caller(start_agent, public_dir):
    """Health is never rate limited, but no caller may hold more than a few calls open:
    a Watch, or a header-only Check, lives as long as its caller likes."""
    agent = start_agent("--socket-mode", "0666", "--request-timeout", "30", "--health-listen", "[::]:0",
                        socket_dir=public_dir)  # fmt: skip
    health_port = logged_port(agent, "health_port")
    with (
        ConnectAs(agent.socket_path, NOBODY) as nobody,
        HeaderOnlyCalls(nobody.address, HEALTH_CHECK, 40, connections=4) as stalls,
    ):
        wait_for(lambda: sum(f.done() for f in stalls.futures) == 40 - 16, what="the calls over the cap refused")
        refused = [f.exception() for f in stalls.futures if f.done()]
        assert {error.code() for error in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all("at most 16" in error.details() for error in refused)
        # Another identity has room of its own.
        assert _health(agent.address) == health_pb2.HealthCheckResponse.SERVING
    # On the health port, callers are told apart by their address.
    with HeaderOnlyCalls(f"127.0.0.1:{health_port}", HEALTH_CHECK, 40) as stalls:
        wait_for(lambda: sum(f.done() for f in stalls.futures) == 40 - 16, what="the calls over the cap refused")
        assert _health(f"[::1]:{health_port}") == health_pb2.HealthCheckResponse.SERVING

"""Client channel behaviour on a real loopback server: retries on UNAVAILABLE, deadlines, ids."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from rlhfpb.v1 import common_pb2, policy_pb2_grpc

from rlhf_client import PolicyClient, RpcError


class FlakyPolicy(policy_pb2_grpc.PolicyServiceServicer):
    """GetModel fails `failures` times with UNAVAILABLE, then answers; records metadata."""

    def __init__(self, failures: int, delay_s: float = 0.0):
        self.failures = failures
        self.delay_s = delay_s
        self.calls = 0
        self.metadata: list[dict] = []
        self.lock = threading.Lock()

    def GetModel(self, request, context):
        with self.lock:
            self.calls += 1
            self.metadata.append(dict(context.invocation_metadata()))
            fail = self.calls <= self.failures
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        if self.delay_s:
            time.sleep(self.delay_s)  # a slow handler, to trip the client's deadline
        return common_pb2.GetModelResponse(model=common_pb2.ModelRef(name="m", version="v1"), kind="policy")


@pytest.fixture
def flaky_server():
    servers = []

    def start(servicer):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(0)


def test_retries_unavailable_through_the_service_config(flaky_server):
    servicer = FlakyPolicy(failures=2)
    with PolicyClient(flaky_server(servicer)) as client:
        info = client.get_model()
    assert info.model.version == "v1"
    assert servicer.calls == 3  # two UNAVAILABLE answers retried by the channel, not by our code


def test_gives_up_after_max_attempts(flaky_server):
    servicer = FlakyPolicy(failures=100)
    with PolicyClient(flaky_server(servicer)) as client:
        with pytest.raises(RpcError) as err:
            client.get_model()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls == 4


def test_every_call_carries_a_deadline_request_id_and_token(flaky_server):
    servicer = FlakyPolicy(failures=0, delay_s=1.0)
    with PolicyClient(flaky_server(servicer), token="tok", timeout=0.2) as client:
        with pytest.raises(RpcError) as err:
            client.get_model()
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    md = servicer.metadata[0]
    assert md["authorization"] == "Bearer tok"
    assert len(md["x-request-id"]) == 32 and err.value.request_id == md["x-request-id"]

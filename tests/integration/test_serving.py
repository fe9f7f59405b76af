"""Serving plumbing on a real server: health transitions, drain, SIGTERM, limits."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import make_settings, running

from rlhf_client import AsyncPolicyClient, RpcError, SamplingParams

POLL_S = 0.2
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _health(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return resp.status


async def test_health_not_serving_until_model_is_loaded(tiny_policy_dir):
    from rlhf.policy.app import make_policy_app

    app = make_policy_app(make_settings(model_dir=tiny_policy_dir))
    port = await app.server.start()  # bound, model not loaded yet
    try:
        assert await _health(port) == NOT_SERVING
        assert await _health(port, "rlhfpb.v1.PolicyService") == NOT_SERVING
        await app.model.start()
        await app.server.set_serving(True)
        assert await _health(port) == SERVING
        assert await _health(port, "rlhfpb.v1.PolicyService") == SERVING
    finally:
        await app.stop(grace=0.5)


async def test_drain_lets_in_flight_requests_finish(tiny_policy_dir):
    from rlhf.policy.app import make_policy_app

    app = make_policy_app(make_settings(model_dir=tiny_policy_dir))
    await app.start()
    async with AsyncPolicyClient(f"127.0.0.1:{app.port}") as c:
        params = SamplingParams(temperature=0.0, max_new_tokens=200, min_new_tokens=200)
        inflight = asyncio.ensure_future(c.generate(["the cat"], params))
        deadline = time.monotonic() + 30
        while app.model.active_sequences() == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # poll: the request reached the engine
        assert app.model.active_sequences() > 0
        await app.stop(grace=30)
        result = await inflight
        assert len(result.completions[0].token_ids) == 200


async def test_max_concurrent_rpcs_is_resource_exhausted(tiny_policy_dir):
    from rlhf.policy.app import make_policy_app

    app = make_policy_app(make_settings(model_dir=tiny_policy_dir, max_concurrent_rpcs=1))
    async with running(app):
        async with AsyncPolicyClient(f"127.0.0.1:{app.port}") as c:
            long = SamplingParams(temperature=0.0, max_new_tokens=150, min_new_tokens=150)
            results = await asyncio.gather(
                *(c.generate(["a b c"], long) for _ in range(3)), return_exceptions=True
            )
    codes = [r.code for r in results if isinstance(r, RpcError)]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert any(not isinstance(r, Exception) for r in results)


async def test_message_over_size_limit_is_resource_exhausted(tiny_policy_dir):
    from rlhf.policy.app import make_policy_app

    app = make_policy_app(make_settings(model_dir=tiny_policy_dir, max_message_bytes=2048))
    async with running(app):
        async with AsyncPolicyClient(f"127.0.0.1:{app.port}") as c:
            with pytest.raises(RpcError) as err:
                await c.generate(["word " * 1000])
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            ok = await c.generate(["word"], SamplingParams(max_new_tokens=2))
            assert ok.completions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_and_exits_zero(tiny_policy_dir):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf", "serve", "policy", "--model", str(tiny_policy_dir),
         "--port", str(port), "--metrics-port", "0", "--drain-grace", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = asyncio.run(_health(port))
                if status == SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(POLL_S)
        assert status == SERVING, proc.stdout.read() if proc.poll() is not None else "never SERVING"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read()
        assert "draining" in out
    finally:
        if proc.poll() is None:
            proc.kill()

"""Starting the services from the command line, as a user does: defaults that work, and
failures that say in one line what is wrong and which setting to change.

Every case runs `python -m rlhf ...` as a subprocess with no RLHF_* variables of its own
environment. A start-up failure must exit non-zero with the cause as the last line of stderr,
no traceback (unless --debug) and none of asyncio's noise from a server left running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

NOISE = ("Traceback", "Event loop is closed", "never awaited")
POLL_S = 0.2


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RLHF_") and k != "VLLM_CPU_KVCACHE_SPACE"}
    env.update(extra)
    return env


def _rlhf(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf", *args], env=env or _env(), capture_output=True,
                          text=True, timeout=timeout)


def _last_line(text: str) -> str:
    return [ln for ln in text.splitlines() if ln.strip()][-1]


def _assert_one_line_failure(r: subprocess.CompletedProcess, expected: str, *, code: int | None = None) -> None:
    assert r.returncode != 0, r.stderr
    if code is not None:
        assert r.returncode == code, r.stderr
    assert _last_line(r.stderr) == expected, r.stderr
    for noise in NOISE:
        assert noise not in r.stderr, r.stderr


@pytest.fixture
def busy_port():
    """A port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# failures as one line (transformers backend: cheap)
# ------------------------------------------------------------------------------------------------


def test_missing_model_directory(tmp_path):
    missing = tmp_path / "nope"
    r = _rlhf("serve", "policy", "--model", str(missing), "--port", "0", "--metrics-port", "0")
    _assert_one_line_failure(r, f"rlhf serve policy: cannot start: model directory {missing} does not exist "
                                "(set --model / RLHF_MODEL_DIR)", code=1)


def test_model_directory_without_config(tmp_path):
    r = _rlhf("serve", "reward", "--model", str(tmp_path), "--port", "0", "--metrics-port", "0")
    _assert_one_line_failure(r, f"rlhf serve reward: cannot start: model directory {tmp_path} has no "
                                "config.json (not a Hugging Face model directory) (set --model / RLHF_MODEL_DIR)")


def test_model_without_weights_is_reported_after_the_server_bound(tmp_path, tiny_policy_dir):
    """The failure comes after the gRPC server started: it is shut down, no asyncio noise."""
    (tmp_path / "config.json").write_bytes((tiny_policy_dir / "config.json").read_bytes())
    r = _rlhf("serve", "reference", "--model", str(tmp_path), "--port", "0", "--metrics-port", "0")
    _assert_one_line_failure(r, f"rlhf serve reference: cannot start: cannot load the model: {tmp_path} holds "
                                "no *.safetensors weights (set --model / RLHF_MODEL_DIR)")
    assert "listening on" in r.stderr  # it did get as far as binding


def test_port_in_use(busy_port, tiny_policy_dir):
    r = _rlhf("serve", "policy", "--model", str(tiny_policy_dir), "--port", str(busy_port), "--metrics-port", "0")
    _assert_one_line_failure(r, f"rlhf serve policy: cannot start: port {busy_port} is in use "
                                "(set --port / RLHF_PORT)")


def test_port_in_use_by_another_grpc_server(tiny_policy_dir):
    """gRPC binds with SO_REUSEPORT unless told not to: a second server must still be refused."""
    async def main():
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return port, await asyncio.to_thread(
                _rlhf, "serve", "policy", "--model", str(tiny_policy_dir), "--port", str(port),
                "--metrics-port", "0")
        finally:
            await server.stop(0)

    port, r = asyncio.run(main())
    _assert_one_line_failure(r, f"rlhf serve policy: cannot start: port {port} is in use (set --port / RLHF_PORT)")


def test_metrics_port_in_use(busy_port, tiny_policy_dir):
    r = _rlhf("serve", "policy", "--model", str(tiny_policy_dir), "--port", "0", "--metrics-port", str(busy_port))
    _assert_one_line_failure(r, f"rlhf serve policy: cannot start: metrics: port {busy_port} is in use "
                                "(set --metrics-port / RLHF_METRICS_PORT)")


def test_host_not_on_this_machine(tiny_policy_dir):
    r = _rlhf("serve", "policy", "--model", str(tiny_policy_dir), "--host", "192.0.2.1", "--port", "0")
    _assert_one_line_failure(r, "rlhf serve policy: cannot start: 192.0.2.1 is not an address of this machine "
                                "(set --host / RLHF_HOST)")


def test_invalid_setting_value_from_flag_and_env(tiny_policy_dir):
    r = _rlhf("serve", "policy", "--model", str(tiny_policy_dir), "--port", "70000")
    _assert_one_line_failure(r, "rlhf serve policy: invalid setting: port=70000: Input should be less than or "
                                "equal to 65535 (set --port / RLHF_PORT)", code=2)
    r = _rlhf("serve", "reward", "--model", str(tiny_policy_dir), env=_env(RLHF_BATCH_MAX_SIZE="0"))
    _assert_one_line_failure(r, "rlhf serve reward: invalid setting: batch_max_size='0': Input should be "
                                "greater than 0 (set --max-batch-size / RLHF_BATCH_MAX_SIZE)", code=2)


def test_unreachable_redis_for_model_name():
    port = _free_port()  # nothing listens there
    r = _rlhf("serve", "policy", "--model-name", "some-model", "--redis-url", f"redis://127.0.0.1:{port}/0",
              "--port", "0", "--metrics-port", "0")
    _assert_one_line_failure(r, f"rlhf serve policy: cannot start: Redis at redis://127.0.0.1:{port}/0 is "
                                f"unreachable (Error 111 connecting to 127.0.0.1:{port}. Connection refused.) "
                                "(set --redis-url / RLHF_REDIS_URL)")


def test_debug_prints_the_traceback(busy_port, tiny_policy_dir):
    r = _rlhf("serve", "policy", "--model", str(tiny_policy_dir), "--port", str(busy_port), "--metrics-port", "0",
              "--debug")
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "StartupError" in r.stderr
    assert _last_line(r.stderr) == (f"rlhf serve policy: cannot start: port {busy_port} is in use "
                                    "(set --port / RLHF_PORT)")
    for noise in NOISE[1:]:
        assert noise not in r.stderr


def test_worker_metrics_port_in_use(busy_port):
    r = _rlhf("worker", "--metrics-port", str(busy_port), "--pool", "solo")
    _assert_one_line_failure(r, f"rlhf worker: cannot start: metrics: port {busy_port} is in use "
                                "(set --metrics-port / RLHF_METRICS_PORT)", code=1)


# ------------------------------------------------------------------------------------------------
# vLLM (the CPU build here)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory) -> Path:
    """Untied embeddings, as tests/integration/test_vllm_backend.py (head_dim 32: CPU attention)."""
    from rlhf.models.tiny import make_tiny_model

    return make_tiny_model("policy", tmp_path_factory.mktemp("vllm-startup") / "tiny-untied", size="tiny",
                           seed=0, tie_embeddings=False)


@pytest.mark.vllm
def test_vllm_kv_cache_too_big_for_memory_is_one_line(vllm_model_dir):
    """Refused before vLLM starts its engine processes: seconds, and the setting is named."""
    pytest.importorskip("vllm")
    t0 = time.monotonic()
    r = _rlhf("serve", "policy", "--model", str(vllm_model_dir), "--backend", "vllm", "--port", "0",
              "--metrics-port", "0", "--kv-cache-space-gb", "100000")
    _assert_one_line_failure(r, _last_line(r.stderr), code=1)
    last = _last_line(r.stderr)
    assert last.startswith("rlhf serve policy: cannot start: vLLM: not enough memory for the KV cache: "
                           "100000.00 GiB asked, "), last
    assert last.endswith("(set --kv-cache-space-gb / RLHF_VLLM_KV_CACHE_SPACE_GB)"), last
    assert time.monotonic() - t0 < 60


async def _health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return resp.status


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_with_default_settings(vllm_model_dir):
    """`rlhf serve policy --model DIR --backend vllm --port P`: no memory or cache settings.

    (`--metrics-port 0` only because 9090, the default, may be taken on a shared test machine.)
    """
    pytest.importorskip("vllm")
    from rlhf_client import PolicyClient, SamplingParams

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf", "serve", "policy", "--model", str(vllm_model_dir), "--backend", "vllm",
         "--port", str(port), "--metrics-port", "0"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = asyncio.run(_health(port))
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(POLL_S)
        assert status == health_pb2.HealthCheckResponse.SERVING, (
            proc.stdout.read() if proc.poll() is not None else "never SERVING")
        with PolicyClient(f"127.0.0.1:{port}", timeout=60) as c:
            res = c.generate(["the cat sat on the"], SamplingParams(temperature=0.0, max_new_tokens=8))
        assert len(res.completions) == 1 and len(res.completions[0].token_ids) > 0
        assert res.model.name == vllm_model_dir.name
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
        assert "vllm KV cache for" in out and "32 sequences of 512 tokens" in out, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

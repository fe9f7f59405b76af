"""Start `rlhf serve ...` as a child process and wait until its health says SERVING.

Used by the demo and the benchmarks: the service runs in its own process, as in production.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

POLL_S = 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_status(target: str, timeout: float = 2.0, *, tls=None) -> int | None:
    """The health status of service "" at target, or None when it does not answer.
    `tls`: as the clients' (default: the RLHF_TLS_* environment; rlhf_client.channel)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from rlhf_client.channel import sync_channel

    try:
        with sync_channel(target, tls=tls) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return resp.status
    except grpc.RpcError:
        return None


@dataclass
class ServiceProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 30) -> int:
        return stop_process(self.proc, timeout)


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM, up to `timeout` seconds to exit, then SIGKILL; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def start_service(service: str, args: list[str], log_path: Path, *, env: dict[str, str] | None = None,
                  ready_timeout: float = 300) -> ServiceProcess:
    """`rlhf serve <service> <args> --port <free>`; returns once health says SERVING."""
    from grpc_health.v1 import health_pb2

    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("w")
    child_env = dict(os.environ if env is None else env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf", "serve", service, *args, "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=child_env,
    )
    sp = ServiceProcess(proc, port, log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log_path.read_text()
            last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "")
            raise RuntimeError(f"{service} exited with {proc.returncode}: {last} (log: {log_path})\n{text[-3000:]}")
        if health_status(sp.target) == health_pb2.HealthCheckResponse.SERVING:
            return sp
        time.sleep(POLL_S)
    sp.stop()
    raise TimeoutError(f"{service} not SERVING after {ready_timeout}s; log: {log_path}")

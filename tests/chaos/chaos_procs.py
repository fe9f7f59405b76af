"""Helpers of the fault tests (tests/chaos): worker settings under fault, process states, and
`rlhf serve` as a subprocess on a chosen host and port."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from trainer_helpers import REPO, Worker, wait_for

from rlhf.procs import free_port, health_status

#: Workers under fault: short lease and visibility timeout (a dead attempt's job is redelivered
#: within seconds), no reaper (recovery must come from the mechanisms under test).
CHAOS_WORKER_ENV = {
    "RLHF_CELERY_VISIBILITY_TIMEOUT_S": "4",
    "RLHF_JOB_LEASE_S": "2",
    "RLHF_QUEUE_CLAIM_IDLE_MS": "2000",
    "RLHF_WORKER_SOFT_SHUTDOWN_S": "1",
    "RLHF_JOB_REAP_INTERVAL_S": "0",
    "RLHF_JOB_REDIS_WAIT_S": "120",
}
SERVING = 1  # grpc.health.v1 HealthCheckResponse.SERVING


def proc_state(pid: int) -> str:
    """The one-letter state of a process (`T`: stopped), '' when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


class Served(Worker):
    """`rlhf serve <service> ...` as a subprocess on a given host and port, in its own process
    group, output to a log file: `log()`, `kill()` (SIGKILL) and `stop()` as a Worker's."""

    def __init__(self, service: str, args: list[str], log_path: Path, *, host: str = "127.0.0.1",
                 port: int | None = None, env: dict[str, str] | None = None):
        self.host, self.port = host, port or free_port()
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf", "serve", service, *args, "--host", host,
             "--port", str(self.port), "--metrics-port", "0"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
            env={**os.environ, "RLHF_TORCH_THREADS": "1", **(env or {})})

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_serving(self, timeout: float = 180) -> "Served":
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.target} exited {self.proc.returncode}:\n"
                                     f"{self.log()[-3000:]}")
            return health_status(self.target) == SERVING

        wait_for(up, timeout=timeout, what=f"{self.target} to be SERVING", interval=0.2)
        return self


class Load:
    """Client threads generating on `target` without pause until `stop()`: thread k's i-th
    request is `request(k, i)` -> (prompt, SamplingParams); `on_reply(k, i, prompt, params,
    result)` runs under `lock`. Every request is counted in `sent`, every failure kept in
    `failures` ("Type: message")."""

    def __init__(self, target: str, request, on_reply, *, threads: int = 1):
        self.target, self.request, self.on_reply = target, request, on_reply
        self.lock = threading.Lock()
        self.sent = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                         for k in range(threads)]

    def _run(self, k: int) -> None:
        from rlhf_client import PolicyClient

        with PolicyClient(self.target, timeout=60) as client:
            i = 0
            while not self._stop.is_set():
                prompt, params = self.request(k, i)
                with self.lock:
                    self.sent += 1
                try:
                    res = client.generate([prompt], params)
                except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                    with self.lock:
                        self.failures.append(f"{type(exc).__name__}: {exc}")
                else:
                    with self.lock:
                        self.on_reply(k, i, prompt, params, res)
                i += 1

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t.ident is not None:
                t.join(timeout=90)

"""Helpers for the trainer's tests (queues, registry, jobs, worker): Redis DBs, cleanup, waiting.

The trainer's tests use their own Redis databases (other suites share the server) and unique
names inside them, and delete every key they made.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis
from rlhf_client.redis_conn import connect

from helpers import TEST_REDIS

REDIS_URL = f"{TEST_REDIS}/11"  # queues, registry, in-process jobs
WORKER_REDIS_URL = f"{TEST_REDIS}/12"  # Celery broker + everything a worker test makes
REPO = Path(__file__).resolve().parents[1]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def delete_matching(client: redis.Redis, *patterns: str) -> int:
    n = 0
    for pattern in patterns:
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            n += client.delete(*keys)
    return n


def fake_hf_dir(d: Path, weights: bytes = b"weights-1") -> Path:
    """A directory shaped like a Hugging Face checkpoint (the store never parses the weights)."""
    import json

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "num_labels": 1}))
    (d / "model.safetensors").write_bytes(weights)
    (d / "tokenizer.json").write_text("{}")
    return d


def forget_model(client: redis.Redis, name: str) -> None:
    """Remove a model's registry keys (the registry's prefix is fixed: `rlhf:`)."""
    delete_matching(client, f"rlhf:model:{name}:*")
    client.srem("rlhf:models", name)


def forget_job(client: redis.Redis, job_id: str) -> None:
    delete_matching(client, f"rlhf:job:{job_id}*")
    client.zrem("rlhf:jobs", job_id)


def wait_for(cond: Callable[[], object], *, timeout: float, what: str, interval: float = 0.05):
    """Poll `cond` until it returns something truthy (returned); AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


async def until(cond: Callable[[], object], *, timeout: float, what: str,
                interval: float = 0.05):
    """`wait_for` on an event loop: the pause between polls lets the loop run."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)



def swap_under_clients(served, registry, name: str, versions, answer, right, *,
                       on_swapped: Callable[[str], None] | None = None,
                       timeout: float = 60.0) -> None:
    """Activate each of `versions` of `name` in turn while two clients call `answer(served)` ->
    (version, values) back to back: no call fails, every answer is right for the version it
    names (`right(version, values)`), each version answers after its swap. `on_swapped(version)`
    runs once the service serves it (more checks of the caller's)."""
    import threading

    stop = threading.Event()
    failures: list[BaseException] = []
    wrong: list[tuple] = []
    seen: set[str] = set()

    def client():
        while not stop.is_set():
            try:
                version, values = answer(served)
            except BaseException as exc:  # noqa: BLE001 - every failure is reported
                failures.append(exc)
                return
            seen.add(version)
            if not right(version, values):
                wrong.append((version, values))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for version in versions:
            registry.activate(name, version)
            wait_for(lambda: served.app.model.info.ref.version == version, timeout=timeout,
                     what=f"swap to {version}")
            if on_swapped is not None:
                on_swapped(version)
            seen.discard(version)
            wait_for(lambda: version in seen or failures, timeout=timeout,
                     what=f"answers of {version}")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=timeout)
    assert not failures, failures[:3]
    assert not wrong, wrong[:3]

def write_jsonl(path: Path, rows) -> Path:
    """`rows` (dicts) as a JSONL file at `path`."""
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return path


def publish_active(client: redis.Redis, store_dir, name: str, src_dir, *, kind: str = "policy",
                   probes=None):
    """`src_dir` published as `name`'s next version in the store, registered and made the
    active version; its manifest."""
    from rlhf_client.registry import Registry

    from rlhf.models.store import ModelStore

    m = ModelStore(store_dir).publish(name, src_dir, kind=kind, probes=probes)
    reg = Registry(client)
    reg.register(name, m.version, m.created)
    reg.activate(name, m.version)
    return m


def synthetic_messages(n: int, *, seed: int, prefix: str):
    """`n` PreferencePair messages of the synthetic task (chosen praises, rejected criticises)."""
    from rlhfpb.v1 import samples_pb2

    from rlhf.trainer.data import synthetic_pairs

    return [samples_pb2.PreferencePair(id=p.source_id, prompt=p.prompt, chosen=p.chosen,
                                       rejected=p.rejected, source="synthetic")
            for p in synthetic_pairs(n, seed=seed, prefix=prefix)]


def push_at_once(client: redis.Redis, messages, *, stream: str) -> list[str]:
    """Push payloads in one MULTI: a job blocked in its read of `stream` gets all of them in
    that read (pipelined pushes may wake it after the first few)."""
    from rlhf_client.queues import encode_entry

    pipe = client.pipeline(transaction=True)
    for m in messages:
        pipe.xadd(stream, encode_entry(m))
    pipe.execute()
    return [m.id for m in messages]


def pause_mid_training(tc, worker: "Worker", job_id: str, *, below: float = 0.9) -> int:
    """SIGSTOP the job's process (the worker's one pool child) once it trains (step 1 reported)
    and is less than `below` through: whatever the machine's speed, a fault injected next
    lands before its next step. `tc`: a TrainingClient. Returns the paused pid (SIGCONT it)."""
    (child,) = worker.pool_children()

    def training():
        rec = tc.status(job_id)
        assert rec.status in ("queued", "running"), f"finished before the test caught it: {rec}"
        return rec.metrics.get("step", 0) >= 1 and rec.progress < below

    wait_for(training, timeout=180, what="the job to be training", interval=0.01)
    os.kill(child, signal.SIGSTOP)
    return child


#: Workers in tests: a short visibility timeout and job lease (recovery within seconds), fast
#: queue metrics, a one-second soft shutdown, no reaper (a test triggers recovery itself).
FAST_WORKER_ENV = {
    "RLHF_CELERY_VISIBILITY_TIMEOUT_S": "4",
    "RLHF_JOB_LEASE_S": "2",
    "RLHF_QUEUE_CLAIM_IDLE_MS": "2000",
    "RLHF_WORKER_SOFT_SHUTDOWN_S": "1",
    "RLHF_QUEUE_METRICS_INTERVAL_S": "0.5",
    "RLHF_JOB_REAP_INTERVAL_S": "0",
}


def celery_keys(client: redis.Redis) -> None:
    """Delete Celery's and kombu's keys (queues, unacked messages, bindings, pidboxes)."""
    delete_matching(client, "train.*", "unacked*", "_kombu.*", "*pidbox*")


def worker_starter(workers: list, tmp_path: Path, *, store: Path, redis_url: str | None = None,
                   env: dict[str, str] | None = None) -> Callable[..., "Worker"]:
    """`start(name, **env_overrides)`: a ready `rlhf worker` named `<name>@test` (log
    `<tmp_path>/<name>.log`, job temp dirs under `<tmp_path>/jobs-tmp`, `env` or FAST_WORKER_ENV),
    appended to `workers` for the caller to stop."""
    base_env = FAST_WORKER_ENV if env is None else env

    def start(name: str, **env_overrides: str) -> "Worker":
        w = Worker(tmp_path / f"{name}.log", redis_url=redis_url or WORKER_REDIS_URL, store=store,
                   name=f"{name}@test", env={**base_env, "RLHF_JOB_TMP_DIR":
                                             str(tmp_path / "jobs-tmp"), **env_overrides})
        workers.append(w)
        return w.wait_ready()

    return start


class Worker:
    """`rlhf worker` (prefork, one child) in its own process group, output to a log file."""

    def __init__(self, log_path: Path, *, redis_url: str, store: Path, name: str, env: dict[str, str]):
        self.log_path = log_path
        self.name = name
        child_env = {**os.environ, "RLHF_TORCH_THREADS": "1", **env}
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf", "worker", "--pool", "prefork", "--concurrency", "1",
             "--redis-url", redis_url, "--store", str(store), "--metrics-port", "0",
             "--hostname", name],
            stdout=self._log, stderr=subprocess.STDOUT, env=child_env, cwd=REPO,
            start_new_session=True,  # its own process group: killpg takes main + pool child
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> "Worker":
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            return " ready." in self.log()

        wait_for(ready, timeout=timeout, what=f"{self.name} to be ready", interval=0.2)
        return self

    def metrics_port(self) -> int:
        import re

        m = re.search(r"metrics listening on \S+?:(\d+)", self.log())
        assert m, self.log()[-2000:]
        return int(m.group(1))

    def pool_children(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True).stdout
        return [int(x) for x in out.split()]

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool child), like an OOM kill or eviction."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


# ------------------------------------------------------------------------------------------------
# fixtures shared by the in-process job tests (imported by test_dpo.py, test_reward_training.py)
# ------------------------------------------------------------------------------------------------

import pytest  # noqa: E402


@pytest.fixture
def r():
    client = connect(REDIS_URL, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def settings(tmp_path):
    from rlhf.config import Settings

    return Settings(redis_url=REDIS_URL, store_dir=tmp_path / "store", metrics_port=None,
                    torch_threads=1)


def names_fixture(model_prefix: str, stream_prefix: str):
    """A fixture of unique model / stream names; every key they made is deleted afterwards."""

    @pytest.fixture
    def names(r):
        made = {"model": unique(model_prefix), "stream": unique(stream_prefix), "jobs": []}
        yield made
        forget_model(r, made["model"])
        delete_matching(r, f"{made['stream']}*")
        for job_id in made["jobs"]:
            forget_job(r, job_id)

    return names


def stream_fixtures(url: str, prefix: str):
    """Fixtures `(r, stream)`: a bytes client on `url` (the one StreamConsumer wants) and a
    unique stream name; every key under that name is deleted afterwards. In a test module:
    `r, stream = stream_fixtures(REDIS_URL, "test:queue")`."""

    @pytest.fixture
    def r():
        client = connect(url)
        yield client
        client.close()

    @pytest.fixture
    def stream(r):
        name = unique(prefix)
        yield name
        delete_matching(r, f"{name}*")

    return r, stream

"""A Redis restart (the broker, the queues, the job records) loses no job and applies nothing twice.

Each test runs its own `redis-server` (append-only file, fsync always, in a temp dir) and a real
`rlhf worker` against it, stops Redis with SIGKILL at a chosen point of a training job (reward
model or DPO) that reads its pairs from a stream, and starts it again on the same port and
directory. With `--appendfsync always` everything Redis acknowledged is on disk when it dies,
as after a crash or a pod restart of a durable Redis.

Every chosen point is reached by waiting for something observable (the job's consumer in its
stream group, its training progress, the version in the store, a line in the worker's log) and,
where the job could otherwise run past it on a fast machine, by pausing the job's process
(SIGSTOP) while Redis is killed; never by sleeping. The only sleeps are "keep Redis down longer
than the job lease", so the lease really lapses during the outage. The
outcome is the same everywhere: the job `succeeded` at attempt 1 (it survived in-process: the
reaper is off in these tests), exactly one version in the store, every stream entry applied once
(the manifest names each pushed pair once, the group's applied set is exactly the pushed ids,
nothing pending, nothing dead-lettered), its Celery message acked, its temp dir gone.

The reaper (the net under everything else) has its own tests: a `running` job whose message is
gone is re-queued and finished; a job whose message exists, or whose lease is held, is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from rlhf_client import TrainingClient
from trainer_helpers import (REPO, Worker, pause_mid_training, push_at_once, synthetic_messages,
                             unique, wait_for)

from rlhf.models.store import ModelStore
from rlhf.trainer.celery_app import QUEUE_FOR_TASK
from rlhf.trainer.queues import applied_ids

QUEUES = tuple(QUEUE_FOR_TASK.values())
QUEUE = QUEUE_FOR_TASK["rlhf.train_reward_model"]
GROUP = "reward-model"
LEASE_S = 2.0
WORKER_ENV = {
    "RLHF_JOB_LEASE_S": str(LEASE_S),
    "RLHF_QUEUE_CLAIM_IDLE_MS": "2000",
    # Recovery must not come from kombu restoring an unacked message after its visibility
    # timeout, nor from the reaper: the job survives in-process.
    "RLHF_CELERY_VISIBILITY_TIMEOUT_S": "600",
    "RLHF_JOB_REAP_INTERVAL_S": "0",
    "RLHF_JOB_REDIS_WAIT_S": "120",
    "RLHF_WORKER_HEARTBEAT_S": "1",
}
TRAIN = dict(learning_rate=1e-3, batch_size=8, max_length=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server: append-only file, fsync on every write, restartable in place."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not on PATH: these tests start their own (as `make "
                        "redis` does); install Redis (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--protected-mode", "no", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited {self.proc.returncode}: "
                                     f"{(self.dir / 'redis.log').read_text()[-2000:]}")
            try:
                with redis.Redis(port=self.port, socket_timeout=1) as c:
                    return c.ping()
            except redis.RedisError:  # not listening yet, or still loading the AOF
                return False

        wait_for(up, timeout=30, what="redis-server to answer")
        return self

    def kill(self) -> None:
        """SIGKILL: nothing is flushed at exit; fsync-always already has every write on disk."""
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@pytest.fixture
def rig(tmp_path, tiny_reward_dir, tiny_policy_dir):
    """A private Redis, a store, unique names, clients; `start()` starts an `rlhf worker`."""
    server = RedisServer(tmp_path / "redis").start()
    r = redis.Redis(port=server.port)
    ctx = {
        "server": server,
        "url": server.url,
        "r": r,
        "store": tmp_path / "store",
        "jobs_tmp": tmp_path / "jobs-tmp",
        "model": unique("rm"),
        "stream": unique("prefs"),
        "base": str(tiny_reward_dir),
        "policy": str(tiny_policy_dir),
        "tc": TrainingClient(server.url),
        "workers": [],
        "tmp": tmp_path,
    }

    def start(name: str, **env: str) -> Worker:
        w = Worker(tmp_path / f"{name}.log", redis_url=server.url, store=ctx["store"],
                   name=f"{name}@outage",
                   env={**WORKER_ENV, "RLHF_JOB_TMP_DIR": str(ctx["jobs_tmp"]),
                        "RLHF_WORKER_HEARTBEAT_FILE": str(tmp_path / f"{name}.heartbeat"), **env})
        ctx["workers"].append(w)
        return w.wait_ready()

    ctx["start"] = start
    yield ctx
    for w in ctx["workers"]:
        w.stop()
    ctx["tc"].close()
    r.close()
    server.stop()


def submit(rig, *, source: dict | None = None, **spec) -> str:
    source = {"type": "stream", "stream": rig["stream"], **(source or {})}
    return rig["tc"].submit_reward_model(model_name=rig["model"], base_dir=rig["base"],
                                         source=source, **TRAIN, **spec)


def push(rig, n: int, seed: int) -> list[str]:
    """In one MULTI: a job waiting in its read gets them all in that read."""
    return push_at_once(rig["r"], synthetic_messages(n, seed=seed, prefix=unique("p")),
                        stream=rig["stream"])


def freeze_mid_training(rig, worker: Worker, job_id: str) -> int:
    """Pause the job's process (SIGSTOP) while it is training, at most 90 % through: whatever
    the machine's speed, Redis then dies before the job's next step. Returns its pid."""
    return pause_mid_training(rig["tc"], worker, job_id)


def outage(rig, *, until_log: tuple[str, ...] | str, worker: Worker, frozen: int | None = None,
           down_at_least_s: float = LEASE_S + 1.0) -> None:
    """Kill Redis (and let a `frozen` job process go on); once the worker's log shows
    `until_log` (one of them: the job met the outage where the test wants it) and the lease has
    surely lapsed, start Redis again."""
    marks = (until_log,) if isinstance(until_log, str) else until_log
    try:
        rig["server"].kill()
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
    killed = time.monotonic()
    wait_for(lambda: any(m in worker.log() for m in marks), timeout=120,
             what=f"the worker to log one of {marks}", interval=0.1)
    time.sleep(max(0.0, down_at_least_s - (time.monotonic() - killed)))
    rig["server"].start()


def assert_done_once(rig, job_id: str, pushed: list[str], worker: Worker,
                     group: str = GROUP) -> None:
    r, stream = rig["r"], rig["stream"]
    rec = rig["tc"].wait(job_id, timeout=240, poll_s=0.2)
    assert (rec.status, rec.version, rec.attempts) == ("succeeded", "v0001", 1), \
        (rec, worker.log()[-3000:])
    store = ModelStore(rig["store"])
    assert store.versions(rig["model"]) == ["v0001"]  # exactly one version
    manifest = store.verify(rig["model"], "v0001")
    used = manifest.extra["applied_ids"] + manifest.extra["eval_ids"]
    assert len(used) == len(set(used)) == len(pushed) and set(used) == set(pushed)
    assert applied_ids(r, stream, group) == set(pushed)
    assert r.xpending(stream, group)["pending"] == 0
    assert r.xlen(f"{stream}:dead") == 0
    assert r.zrange(f"rlhf:model:{rig['model']}:versions", 0, -1) == [b"v0001"]
    # Its message was acked: nothing left for a redelivery.
    wait_for(lambda: not any(r.llen(q) for q in QUEUES) and r.hlen("unacked") == 0, timeout=30,
             what="the job's message to be acked")
    assert not list(rig["jobs_tmp"].glob(f"{job_id}/*")), "the attempt's temp dir is removed"


def probe(heartbeat: Path, *ready: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf", "worker-probe", "--heartbeat-file",
                           str(heartbeat), *ready], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ,
                               "RLHF_WORKER_HEARTBEAT_S": WORKER_ENV["RLHF_WORKER_HEARTBEAT_S"]},
                          timeout=60)


def test_redis_restart_while_the_job_waits_for_its_pairs(rig):
    """The job is blocked in its stream read (XREADGROUP BLOCK on an empty stream) when Redis
    dies: it reads again once Redis is back and trains on what arrives then. Meanwhile the
    worker stays live and is not ready, and is ready again after."""
    w = rig["start"]("read")
    heartbeat = rig["tmp"] / "read.heartbeat"
    wait_for(lambda: probe(heartbeat, "--ready").returncode == 0, timeout=60,
             what="the readiness probe to pass", interval=0.2)
    job_id = submit(rig, source={"block_ms": 120_000})
    consumer = f"job-{job_id}"

    def reading():
        try:
            return any(c["name"].decode() == consumer
                       for c in rig["r"].xinfo_consumers(rig["stream"], GROUP))
        except redis.ResponseError:  # no stream / group yet
            return False

    wait_for(reading, timeout=120, what="the job to be waiting in its stream read")
    rig["server"].kill()
    killed = time.monotonic()
    wait_for(lambda: f"job {job_id}: Redis went away mid-step" in w.log(), timeout=60,
             what="the job to notice the outage")
    # Alive but not consuming while the broker is away (the probes' view of an outage).
    wait_for(lambda: probe(heartbeat, "--ready").returncode == 1, timeout=30,
             what="the readiness probe to fail", interval=0.2)
    assert probe(heartbeat).returncode == 0, "liveness holds through a Redis outage"
    time.sleep(max(0.0, LEASE_S + 1.0 - (time.monotonic() - killed)))
    rig["server"].start()
    pushed = push(rig, 60, seed=21)
    assert_done_once(rig, job_id, pushed, w)
    wait_for(lambda: probe(heartbeat, "--ready").returncode == 0, timeout=60,
             what="the readiness probe to pass again", interval=0.2)
    log = w.log()
    assert f"job {job_id}: Redis unreachable" in log and f"job {job_id}: Redis is back" in log


def test_redis_restart_mid_training_keeps_the_dpo_job_training(rig):
    """The failure as it was seen: a DPO job, Redis killed mid-training and kept down past the
    lease. The next progress write fails and training goes on (how far it gets before Redis is
    back depends on the machine: the outcome does not); the lapsed lease is retaken and the job
    publishes once."""
    w = rig["start"]("train")
    pushed = push(rig, 120, seed=22)
    job_id = rig["tc"].submit_dpo(model_name=rig["model"], base_dir=rig["policy"], epochs=8,
                                  batch_size=8, max_length=64, learning_rate=1e-4,
                                  source={"type": "stream", "stream": rig["stream"]})
    child = freeze_mid_training(rig, w, job_id)
    outage(rig, worker=w, frozen=child, until_log=f"job {job_id}: progress not recorded")
    assert_done_once(rig, job_id, pushed, w, group="dpo")


def test_redis_down_when_the_job_publishes(rig):
    """Redis dies mid-training and is started again only once the trained job waits for it to
    confirm its lease before publishing: it publishes, commits and finishes then."""
    w = rig["start"]("publish")
    pushed = push(rig, 120, seed=23)
    job_id = submit(rig, epochs=8)
    child = freeze_mid_training(rig, w, job_id)
    outage(rig, worker=w, frozen=child,
           until_log="; waiting up to 120s to confirm the lease before publishing")
    assert_done_once(rig, job_id, pushed, w)


def test_redis_dies_right_after_the_version_is_in_the_store(rig):
    """The riskiest moment: the version is committed to the store, its stream entries not yet
    acked. The job process is paused (SIGSTOP) the moment the version appears, Redis is killed,
    the job resumes: it waits for Redis, then registers, acks and finishes — no second version."""
    w = rig["start"]("commit")
    pushed = push(rig, 60, seed=24)
    job_id = submit(rig, epochs=2)
    (child,) = w.pool_children()
    model_dir = rig["store"] / rig["model"]
    wait_for(lambda: (model_dir / "v0001").exists(), timeout=180,
             what="the version to be in the store", interval=0.002)
    os.kill(child, signal.SIGSTOP)
    try:
        rig["server"].kill()
    finally:
        os.kill(child, signal.SIGCONT)
    # the outage itself, not a wait for an event: Redis stays down past the job's lease (nothing
    # can be polled meanwhile: the lease lives in the Redis that is down)
    time.sleep(LEASE_S + 1.0)
    rig["server"].start()
    assert_done_once(rig, job_id, pushed, w)


# --- the reaper ---------------------------------------------------------------------------------


def lose_message(rig, job_id: str) -> None:
    """What the lost-job bug left behind: a `running` record at attempt 1, no lease, no message."""
    r = rig["r"]
    assert r.lrem(QUEUE, 0, next(m for m in r.lrange(QUEUE, 0, -1)
                                 if json.loads(m)["headers"]["id"] == job_id)) == 1
    r.hset(f"rlhf:job:{job_id}", mapping={"status": "running", "attempts": "1",
                                           "updated": f"{time.time() - 3600:.6f}"})


def test_the_reaper_requeues_a_job_whose_message_was_lost(rig):
    pushed = push(rig, 40, seed=25)
    job_id = submit(rig)
    lose_message(rig, job_id)
    w = rig["start"]("reaper", RLHF_JOB_REAP_INTERVAL_S="0.5", RLHF_JOB_REAP_GRACE_S="5")
    rec = rig["tc"].wait(job_id, timeout=240, poll_s=0.2)
    assert (rec.status, rec.version, rec.attempts) == ("succeeded", "v0001", 2), w.log()[-3000:]
    assert f"job {job_id}: re-queued by the reaper: running at attempt 1" in w.log()
    r = rig["r"]
    assert ModelStore(rig["store"]).versions(rig["model"]) == ["v0001"]
    assert applied_ids(r, rig["stream"], GROUP) == set(pushed)
    assert r.xpending(rig["stream"], GROUP)["pending"] == 0
    assert w.log().count("re-queued by the reaper") == 1


def test_the_reaper_leaves_jobs_with_a_message_or_a_lease_alone(rig, capsys):
    """No double run: a job whose message is queued or unacked, or whose lease is held, or that
    changed recently, is not re-queued; `rlhf jobs reap` re-queues the orphan only, once."""
    from rlhf.cli import main as rlhf_main

    r = rig["r"]
    old = f"{time.time() - 3600:.6f}"
    queued = submit(rig)  # message in its queue
    unacked = submit(rig)  # message delivered to a worker, not acked
    raw = next(m for m in r.lrange(QUEUE, 0, -1) if json.loads(m)["headers"]["id"] == unacked)
    r.lrem(QUEUE, 0, raw)
    r.hset("unacked", "tag-1", json.dumps([json.loads(raw), "rlhf.train", QUEUE]))
    leased = submit(rig)  # an attempt runs it (its message is gone: only the lease protects it)
    lose_message(rig, leased)
    r.set(f"rlhf:job:{leased}:lease", "someone", px=60_000)
    fresh = submit(rig)  # just changed: its message may be on its way
    lose_message(rig, fresh)
    r.hset(f"rlhf:job:{fresh}", "updated", f"{time.time():.6f}")
    orphan = submit(rig)
    lose_message(rig, orphan)
    for job in (queued, unacked):
        r.hset(f"rlhf:job:{job}", mapping={"status": "running", "updated": old})

    args = ["jobs", "reap", "--redis-url", rig["url"], "--grace", "60", "--json"]
    assert rlhf_main([*args, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out) == {"orphaned": [orphan]}
    assert rig["tc"].status(orphan).status == "running"  # a dry run changes nothing
    assert rlhf_main(args) == 0
    assert json.loads(capsys.readouterr().out) == {"re-queued": [orphan]}
    rec = rig["tc"].status(orphan)
    assert rec.status == "queued" and rec.error.startswith("re-queued by the reaper")
    ids = [json.loads(m)["headers"]["id"] for m in r.lrange(QUEUE, 0, -1)]
    assert sorted(ids) == sorted([queued, orphan])  # one new message, for the orphan only
    assert rlhf_main(args) == 0  # its message exists now: nothing more to do
    assert json.loads(capsys.readouterr().out) == {"re-queued": []}
    for job in (unacked, leased, fresh):
        assert rig["tc"].status(job).status == "running"

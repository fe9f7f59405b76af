"""The trainer as deployed: `rlhf worker` processes (Celery, prefork pool, one child) on real Redis.

Prefork with one child is the deployment's pool: the main process keeps answering the probes'
pings while a job trains in the child, and a child that dies is noticed by the main process
(`task_reject_on_worker_lost` puts its job back at once). The whole worker SIGKILLed is the
other failure: its job waits out the visibility timeout in kombu's unacked hash, so these tests
run with a 4-second timeout and a 2-second job lease. SIGTERM (a pod stopping) requeues the job
after the soft shutdown, at once.

Each test starts its own workers (about two seconds: torch loads in the pool child on the
first job) and deletes every key it made in the worker database.
"""

from __future__ import annotations

import os
import re
import signal
import urllib.request

import pytest
import redis
from rlhf_client import QueueProducer, Registry, TrainingClient
from trainer_helpers import (
    WORKER_REDIS_URL,
    Worker,
    delete_matching,
    forget_job,
    forget_model,
    synthetic_messages,
    unique,
    wait_for,
)

from rlhf.models.store import ModelStore
from rlhf.trainer.celery_app import EXCHANGE, QUEUE_FOR_TASK, task_queue
from rlhf.trainer.queues import applied_key

TASK = "rlhf.train_reward_model"
QUEUE = QUEUE_FOR_TASK[TASK]
WORKER_ENV = {
    "RLHF_CELERY_VISIBILITY_TIMEOUT_S": "4",
    "RLHF_JOB_LEASE_S": "2",
    "RLHF_QUEUE_CLAIM_IDLE_MS": "2000",
    "RLHF_WORKER_SOFT_SHUTDOWN_S": "1",
    "RLHF_QUEUE_METRICS_INTERVAL_S": "0.5",
}
TRAIN = dict(learning_rate=1e-3, batch_size=8, max_length=64)


def celery_keys(r: redis.Redis) -> None:
    delete_matching(r, "train.*", "unacked*", "_kombu.*", "*pidbox*")


@pytest.fixture
def env(tmp_path, tiny_reward_dir):
    """A store, unique names, clients; afterwards every worker is stopped and every key deleted."""
    r = redis.Redis.from_url(WORKER_REDIS_URL)
    celery_keys(r)
    ctx = {
        "r": r,
        "store": tmp_path / "store",
        "model": unique("rm"),
        "stream": unique("test:prefs"),
        "base": str(tiny_reward_dir),
        "tc": TrainingClient(WORKER_REDIS_URL),
        "producer": QueueProducer(r),
        "workers": [],
        "tmp": tmp_path,
    }

    def start(name: str, **env_overrides: str) -> Worker:
        w = Worker(tmp_path / f"{name}.log", redis_url=WORKER_REDIS_URL, store=ctx["store"],
                   name=f"{name}@test", env={**WORKER_ENV, **env_overrides})
        ctx["workers"].append(w)
        return w.wait_ready()

    ctx["start"] = start
    yield ctx
    for w in ctx["workers"]:
        w.stop()
    for job in ctx["tc"].jobs(limit=1000):
        if job.spec.get("model_name") == ctx["model"]:
            forget_job(r, job.id)
    forget_model(r, ctx["model"])
    delete_matching(r, f"{ctx['stream']}*")
    celery_keys(r)
    ctx["tc"].close()
    r.close()


def submit(env, **spec) -> str:
    return env["tc"].submit_reward_model(model_name=env["model"], base_dir=env["base"], **TRAIN, **spec)


def test_a_job_runs_on_the_worker_and_is_visible_everywhere(env, capsys):
    from rlhf.cli import main as rlhf_main

    worker = env["start"]("w1")
    pushed = env["producer"].push_many(synthetic_messages(40, seed=10, prefix=unique("p")),
                                       stream=env["stream"])
    job_id = submit(env, source={"type": "stream", "stream": env["stream"]}, activate=True)
    rec = env["tc"].wait(job_id, timeout=180, poll_s=0.2)
    assert (rec.status, rec.version, rec.attempts, rec.worker) == ("succeeded", "v0001", 1, "w1@test")
    assert rec.spec["model_name"] == env["model"] and rec.metrics["train_pairs"] > 0
    assert Registry(env["tc"].r).active(env["model"]) == "v0001"
    manifest = ModelStore(env["store"]).verify(env["model"], "v0001")
    assert sorted(manifest.extra["applied_ids"] + manifest.extra["eval_ids"]) == sorted(pushed)

    assert rlhf_main(["jobs", "show", job_id, "--redis-url", WORKER_REDIS_URL]) == 0
    shown = capsys.readouterr().out
    assert '"status": "succeeded"' in shown and '"version": "v0001"' in shown
    assert rlhf_main(["jobs", "list", "--redis-url", WORKER_REDIS_URL]) == 0
    assert re.search(rf"{job_id}\s+reward_model\s+succeeded", capsys.readouterr().out)

    # /metrics of the worker's main process: queue depths refreshed from Redis.
    env["producer"].push_many(synthetic_messages(3, seed=11, prefix=unique("q")), stream=env["stream"])
    url = f"http://127.0.0.1:{worker.metrics_port()}/metrics"

    def depth_shows_three():
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        return f'rlhf_queue_depth{{stream="{env["stream"]}"}} 3.0' in body and body

    body = wait_for(depth_shows_three, timeout=20, what="the queue depth on /metrics")
    assert f'rlhf_dead_letter_depth{{stream="{env["stream"]}"}} 0.0' in body


def test_a_worker_sigkilled_mid_job_loses_nothing_and_applies_nothing_twice(env):
    r, stream = env["r"], env["stream"]
    pushed = env["producer"].push_many(synthetic_messages(200, seed=12, prefix=unique("p")), stream=stream)
    a = env["start"]("a")
    job_id = submit(env, source={"type": "stream", "stream": stream}, epochs=3, activate=True)

    def mid_training():
        rec = env["tc"].status(job_id)
        assert rec.status not in ("succeeded", "failed"), rec
        return rec.status == "running" and rec.progress >= 0.15

    wait_for(mid_training, timeout=180, what="the job to be well into training", interval=0.1)
    a.kill()  # main process and pool child: an OOM kill or an eviction
    rec = env["tc"].status(job_id)
    assert rec.status == "running" and rec.version is None
    assert ModelStore(env["store"]).versions(env["model"]) == []
    assert r.xpending(stream, "reward-model")["pending"] == 200  # read, never acked

    b = env["start"]("b")  # picks the job up once the visibility timeout has passed
    rec = env["tc"].wait(job_id, timeout=240, poll_s=0.2)
    assert rec.status == "succeeded" and rec.attempts == 2 and rec.worker == "b@test"
    assert ModelStore(env["store"]).versions(env["model"]) == ["v0001"]  # exactly one version
    manifest = ModelStore(env["store"]).verify(env["model"], "v0001")
    used = manifest.extra["applied_ids"] + manifest.extra["eval_ids"]
    assert len(used) == len(set(used)) == 200 and set(used) == set(pushed)  # none lost, none twice
    assert manifest.metrics["train_pairs"] + manifest.metrics["eval_pairs"] == 200
    assert r.xpending(stream, "reward-model")["pending"] == 0
    assert {m.decode() for m in r.smembers(applied_key(stream, "reward-model"))} == set(pushed)
    assert Registry(env["tc"].r).active(env["model"]) == "v0001"
    assert f"job {job_id} (reward_model): attempt 2 on b@test" in b.log()
    # Any further copy of the job's message (kombu restores a long job's message once the
    # visibility timeout passes) is recognised and not run: still one version.
    wait_for(lambda: r.llen(QUEUE) == 0, timeout=30, what="the queue to drain")
    assert ModelStore(env["store"]).versions(env["model"]) == ["v0001"]


def test_a_pool_child_killed_mid_job_is_requeued_at_once(env):
    """task_reject_on_worker_lost: the main process puts the job back when its child dies."""
    w = env["start"]("w2")
    env["producer"].push_many(synthetic_messages(120, seed=13, prefix=unique("p")), stream=env["stream"])
    job_id = submit(env, source={"type": "stream", "stream": env["stream"]}, epochs=3)
    wait_for(lambda: env["tc"].status(job_id).progress >= 0.1, timeout=180,
             what="the job to be training", interval=0.1)
    (child,) = w.pool_children()
    os.kill(child, signal.SIGKILL)
    rec = env["tc"].wait(job_id, timeout=240, poll_s=0.2)
    assert rec.status == "succeeded" and rec.attempts == 2
    assert ModelStore(env["store"]).versions(env["model"]) == ["v0001"]
    log = w.log()
    assert "WorkerLostError" in log and w.proc.poll() is None  # the main process lived on
    assert env["r"].xpending(env["stream"], "reward-model")["pending"] == 0


def test_sigterm_gives_the_job_its_soft_shutdown_then_requeues_it(env):
    """SIGTERM (a pod stopping): the running job gets worker_soft_shutdown_s, then is cancelled
    and put back on its queue at once, without waiting out the visibility timeout (set to ten
    minutes here); the next worker runs it to completion."""
    slow = {"RLHF_CELERY_VISIBILITY_TIMEOUT_S": "600"}
    w = env["start"]("t1", **slow)
    env["producer"].push_many(synthetic_messages(160, seed=15, prefix=unique("p")), stream=env["stream"])
    job_id = submit(env, source={"type": "stream", "stream": env["stream"]}, epochs=6)
    wait_for(lambda: env["tc"].status(job_id).progress >= 0.1, timeout=180,
             what="the job to be training", interval=0.1)
    os.kill(w.proc.pid, signal.SIGTERM)  # the main process, as the kubelet does
    assert w.proc.wait(timeout=60) == 0
    assert "Initiating Soft Shutdown, terminating in 1.0 seconds" in w.log()
    assert env["r"].llen(QUEUE) == 1 and env["r"].hlen("unacked") == 0  # back on the queue
    assert env["tc"].status(job_id).status == "running"  # not failed: it will be resumed
    env["start"]("t2", **slow)
    rec = env["tc"].wait(job_id, timeout=240, poll_s=0.2)
    assert rec.status == "succeeded" and rec.attempts == 2 and rec.worker == "t2@test"
    assert ModelStore(env["store"]).versions(env["model"]) == ["v0001"]


def test_a_message_in_pickle_format_is_refused_and_nothing_from_it_runs(env):
    import pickle

    import kombu

    w = env["start"]("w3")
    canary = env["tmp"] / "canary"

    class Canary:  # unpickling this creates the canary directory
        def __reduce__(self):
            return (os.mkdir, (str(canary),))

    job_id = unique("pickled")
    spec = {"type": "reward_model", "job_id": job_id, "model_name": env["model"],
            "base_dir": env["base"], "source": {"type": "stream", "stream": env["stream"]}}
    body = pickle.dumps(((spec, Canary()), {}, {"callbacks": None, "errbacks": None, "chain": None,
                                                "chord": None}))
    headers = {"lang": "py", "task": TASK, "id": job_id, "root_id": job_id, "parent_id": None,
               "group": None, "retries": 0, "eta": None, "expires": None, "timelimit": [None, None],
               "argsrepr": "", "kwargsrepr": "", "origin": "test"}
    with kombu.Connection(WORKER_REDIS_URL) as conn:
        conn.Producer().publish(body, exchange=EXCHANGE, routing_key=QUEUE, declare=[task_queue(QUEUE)],
                                content_type="application/x-python-serialize",
                                content_encoding="binary", headers=headers)
    refused = "Refusing to deserialize untrusted content of type pickle"
    wait_for(lambda: refused in w.log(), timeout=60, what="the worker to refuse the message")

    # The worker is still consuming: a JSON job sent after it runs to completion.
    env["producer"].push_many(synthetic_messages(16, seed=14, prefix=unique("p")), stream=env["stream"])
    ok = submit(env, source={"type": "stream", "stream": env["stream"]})
    assert env["tc"].wait(ok, timeout=180, poll_s=0.2).version == "v0001"

    assert not canary.exists()  # never unpickled
    assert env["tc"].r.exists(f"rlhf:job:{job_id}") == 0  # the task never started
    assert f"{TASK}[{job_id}] received" not in w.log()
    assert ModelStore(env["store"]).versions(env["model"]) == ["v0001"]  # only the JSON job's
    r = env["r"]
    # discarded, not parked for redelivery (the JSON job's own late ack lands just after its
    # record says succeeded, so poll for it)
    wait_for(lambda: r.llen(QUEUE) == 0 and r.hlen("unacked") == 0, timeout=30,
             what="an empty queue and no unacked message")

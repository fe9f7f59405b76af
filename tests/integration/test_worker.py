"""The trainer as deployed: `rlhf worker` processes (Celery, prefork pool, one child) on real Redis.

Prefork with one child is the deployment's pool: the main process keeps answering the probes'
pings while a job trains in the child, and a child that dies is noticed by the main process
(`task_reject_on_worker_lost` puts its job back at once). The whole worker SIGKILLed is the
other failure: its job waits out the visibility timeout in kombu's unacked hash, so these tests
run with a 4-second timeout and a 2-second job lease. SIGTERM (a pod stopping) requeues the job
after the soft shutdown, at once.

Each test starts its own workers (about two seconds: torch loads in the pool child on the
first job) and deletes every key it made in the worker database. Job attempts keep their temp
dirs under the test's own root, so the tests can see a killed attempt's leftovers go away. The
reaper is off here (its tests are in test_broker_outage.py, on a private Redis): other tests'
records in this shared database are none of these workers' business.

Where a test needs a job that is surely still running when something happens to its worker, the
job reads a stream that is empty with `block_ms`: it waits in its read (its consumer shows in
the stream's group) until the test pushes the pairs. To kill it after it has read its pairs, the
test pauses the pool child (SIGSTOP) before pushing: Redis hands the pairs to the blocked read,
and the job can do nothing with them. Nothing depends on how fast the machine is (a tiny job
here trains in well under a second, faster than its progress is even written).
"""

from __future__ import annotations

import os
import re
import signal
import urllib.request

import pytest
import redis
from rlhf_client.redis_conn import connect
from rlhf_client import QueueProducer, Registry, TrainingClient
from trainer_helpers import (
    WORKER_REDIS_URL,
    Worker,
    celery_keys,
    delete_matching,
    forget_job,
    forget_model,
    push_at_once,
    synthetic_messages,
    unique,
    wait_for,
    worker_starter,
)

from rlhf.models.store import ModelStore
from rlhf.trainer.celery_app import EXCHANGE, QUEUE_FOR_TASK, task_queue
from rlhf.trainer.queues import applied_ids

TASK = "rlhf.train_reward_model"
QUEUE = QUEUE_FOR_TASK[TASK]
TRAIN = dict(learning_rate=1e-3, batch_size=8, max_length=64)


@pytest.fixture
def env(tmp_path, tiny_reward_dir):
    """A store, unique names, clients; afterwards every worker is stopped and every key deleted."""
    r = connect(WORKER_REDIS_URL)
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
        "jobs_tmp": tmp_path / "jobs-tmp",
    }

    ctx["start"] = worker_starter(ctx["workers"], tmp_path, store=ctx["store"])
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


def attempt_dirs(env, job_id: str) -> list:
    """The temp dirs job attempts left under the test's root (a live or killed attempt's)."""
    return sorted((env["jobs_tmp"] / job_id).glob("a*"))


def wait_until_reading(env, job_id: str, group: str = "reward-model") -> None:
    """Until the job waits in its (blocking) read of the test's stream."""
    def reading():
        try:
            consumers = env["r"].xinfo_consumers(env["stream"], group)
        except redis.ResponseError:  # no stream or group yet
            return False
        return any(c["name"].decode() == f"job-{job_id}" for c in consumers)

    wait_for(reading, timeout=180, what="the job to wait in its stream read", interval=0.1)


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


def paused_with_its_pairs(env, worker: Worker, job_id: str, n: int,
                          seed: int) -> tuple[int, list[str]]:
    """Catch the job mid-job, whatever the machine's speed: once it waits in its read, pause its
    pool child (SIGSTOP) and push `n` pairs; Redis hands them to the blocked read, so they are
    pending with the job's consumer while the job can do nothing with them. (pid, pushed ids)"""
    wait_until_reading(env, job_id)
    (child,) = worker.pool_children()
    os.kill(child, signal.SIGSTOP)
    pushed = push_at_once(env["r"], synthetic_messages(n, seed=seed, prefix=unique("p")),
                          stream=env["stream"])
    wait_for(lambda: env["r"].xpending(env["stream"], "reward-model")["pending"] == n, timeout=30,
             what="the pairs to be delivered to the job's read")
    return child, pushed


def test_a_worker_sigkilled_mid_job_loses_nothing_and_applies_nothing_twice(env):
    r, stream = env["r"], env["stream"]
    a = env["start"]("a")
    job_id = submit(env, source={"type": "stream", "stream": stream, "block_ms": 180_000},
                    epochs=3, activate=True)
    _, pushed = paused_with_its_pairs(env, a, job_id, 200, seed=12)
    a.kill()  # main process and pool child: an OOM kill or an eviction
    assert len(attempt_dirs(env, job_id)) == 1  # the killed attempt's checkpoint dir stays ...
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
    assert applied_ids(r, stream, "reward-model") == set(pushed)
    assert Registry(env["tc"].r).active(env["model"]) == "v0001"
    assert f"job {job_id} (reward_model): attempt 2 on b@test" in b.log()
    assert attempt_dirs(env, job_id) == []  # ... until the next worker removes it
    # Any further copy of the job's message (kombu restores a long job's message once the
    # visibility timeout passes) is recognised and not run: still one version.
    wait_for(lambda: r.llen(QUEUE) == 0, timeout=30, what="the queue to drain")
    assert ModelStore(env["store"]).versions(env["model"]) == ["v0001"]


def test_a_pool_child_killed_mid_job_is_requeued_at_once(env):
    """task_reject_on_worker_lost: the main process puts the job back when its child dies."""
    w = env["start"]("w2")
    job_id = submit(env, source={"type": "stream", "stream": env["stream"], "block_ms": 180_000},
                    epochs=3)
    child, pushed = paused_with_its_pairs(env, w, job_id, 120, seed=13)
    os.kill(child, signal.SIGKILL)
    rec = env["tc"].wait(job_id, timeout=240, poll_s=0.2)
    assert rec.status == "succeeded" and rec.attempts == 2
    assert ModelStore(env["store"]).versions(env["model"]) == ["v0001"]
    manifest = ModelStore(env["store"]).verify(env["model"], "v0001")
    used = manifest.extra["applied_ids"] + manifest.extra["eval_ids"]
    assert len(used) == len(set(used)) == 120 and set(used) == set(pushed)
    log = w.log()
    assert "WorkerLostError" in log and w.proc.poll() is None  # the main process lived on
    assert env["r"].xpending(env["stream"], "reward-model")["pending"] == 0
    assert attempt_dirs(env, job_id) == []  # attempt 2 removed the killed attempt's dir
    assert f"job {job_id}: removed 1 temp dir(s) of dead attempts" in log


def test_sigterm_gives_the_job_its_soft_shutdown_then_requeues_it(env):
    """SIGTERM (a pod stopping): the running job gets worker_soft_shutdown_s, then is cancelled
    and put back on its queue at once, without waiting out the visibility timeout (set to ten
    minutes here); the next worker runs it to completion.

    The job is still running when SIGTERM comes, whatever the machine's speed: it waits in its
    read of an empty stream, and its pairs are pushed only once the second worker runs."""
    slow = {"RLHF_CELERY_VISIBILITY_TIMEOUT_S": "600"}
    r = env["r"]
    w = env["start"]("t1", **slow)
    job_id = submit(env, source={"type": "stream", "stream": env["stream"], "block_ms": 180_000})
    wait_until_reading(env, job_id)
    os.kill(w.proc.pid, signal.SIGTERM)  # the main process, as the kubelet does
    assert w.proc.wait(timeout=60) == 0
    log = w.log()
    assert "Initiating Soft Shutdown, terminating in 1.0 seconds" in log
    assert "Restoring 1 unacknowledged message(s)" in log  # cancelled, requeued
    assert f"{TASK}[{job_id}] succeeded" not in log and f"job {job_id} succeeded" not in log
    assert r.llen(QUEUE) == 1 and r.hlen("unacked") == 0  # back on the queue
    rec = env["tc"].status(job_id)
    assert (rec.status, rec.attempts) == ("running", 1)  # not failed: it will be resumed
    w2 = env["start"]("t2", **slow)
    wait_for(lambda: f"job {job_id} (reward_model): attempt 2 on t2@test" in w2.log(), timeout=120,
             what="the second worker to run the job", interval=0.1)
    pushed = push_at_once(env["r"], synthetic_messages(24, seed=15, prefix=unique("p")),
                          stream=env["stream"])
    rec = env["tc"].wait(job_id, timeout=240, poll_s=0.2)
    assert rec.status == "succeeded" and rec.attempts == 2 and rec.worker == "t2@test"
    manifest = ModelStore(env["store"]).verify(env["model"], "v0001")
    assert ModelStore(env["store"]).versions(env["model"]) == ["v0001"]
    assert sorted(manifest.extra["applied_ids"] + manifest.extra["eval_ids"]) == sorted(pushed)
    assert attempt_dirs(env, job_id) == []


def test_a_job_that_finishes_inside_the_soft_shutdown_is_acked_once_and_not_redelivered(env):
    """The other branch of SIGTERM: the job finishes inside worker_soft_shutdown_s. It is
    acked once, succeeded at attempt 1, and nothing is left to deliver it again.

    The job waits in its read when SIGTERM comes and gets its (few) pairs only after it. Celery
    sleeps out the whole soft-shutdown window whenever a job was running at SIGTERM (the main
    process handles the job's result only after it), so the window here is what this test
    lasts: 30 s, several times what the job needs after its pairs arrive."""
    r = env["r"]
    w = env["start"]("t3", RLHF_WORKER_SOFT_SHUTDOWN_S="30", RLHF_CELERY_VISIBILITY_TIMEOUT_S="600")
    job_id = submit(env, source={"type": "stream", "stream": env["stream"], "block_ms": 180_000},
                    eval_fraction=0)
    wait_until_reading(env, job_id)
    os.kill(w.proc.pid, signal.SIGTERM)
    wait_for(lambda: "Initiating Soft Shutdown, terminating in 30.0 seconds" in w.log(), timeout=60,
             what="the soft shutdown to start")
    pushed = push_at_once(env["r"], synthetic_messages(8, seed=16, prefix=unique("p")),
                          stream=env["stream"])
    assert w.proc.wait(timeout=120) == 0
    log = w.log()
    rec = env["tc"].status(job_id)
    assert (rec.status, rec.attempts, rec.version) == ("succeeded", 1, "v0001"), log[-3000:]
    assert log.count(f"{TASK}[{job_id}] received") == 1
    assert log.count(f"{TASK}[{job_id}] succeeded in") == 1
    assert "Restoring" not in log  # nothing unacked at exit: nothing went back to the queue
    assert r.llen(QUEUE) == 0 and r.hlen("unacked") == 0  # acked once: nothing to redeliver
    manifest = ModelStore(env["store"]).verify(env["model"], "v0001")
    assert sorted(manifest.extra["applied_ids"]) == sorted(pushed)
    assert r.xpending(env["stream"], "reward-model")["pending"] == 0
    assert attempt_dirs(env, job_id) == []


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

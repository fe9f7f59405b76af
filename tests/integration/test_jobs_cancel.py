"""Cancelling jobs (`TrainingClient.cancel`): a queued job never runs, a running one stops at its
next step check and publishes nothing, and what it read stays for the next job.

The first tests run the job frame in-process (`jobs.execute` with a job function standing in for
training) to pin the lease rules down; the others run a real `rlhf worker` (prefork, one child)
on reward-model jobs of the tiny model. Redis database 2, every key deleted afterwards. Jobs are
submitted as applications do (`TrainingClient.submit`: the hand-written Celery message of
`rlhf_client.celery_message`), so these tests also show a worker running such messages.
"""

from __future__ import annotations

import re
import uuid

import pytest
from rlhf_client import (
    JobCancelled,
    JobNotCancellable,
    JobNotFound,
    QueueProducer,
    TrainingClient,
)
from rlhf_client.jobspecs import parse_spec
from rlhf_client.redis_conn import connect
from rlhf_client.training import create_record
from trainer_helpers import (
    celery_keys,
    delete_matching,
    fake_hf_dir,
    forget_job,
    forget_model,
    push_at_once,
    synthetic_messages,
    unique,
    wait_for,
    worker_starter,
)

from helpers import TEST_REDIS
from rlhf.models.store import ModelStore
from rlhf.trainer.celery_app import QUEUE_FOR_TASK
from rlhf.trainer.jobs import Done, JobResult, JobStore, Run, execute
from rlhf.trainer.queues import applied_key

URL = f"{TEST_REDIS}/2"
QUEUE = QUEUE_FOR_TASK["rlhf.train_reward_model"]
GROUP = "reward-model"
TRAIN = dict(learning_rate=1e-3, batch_size=8, max_length=64)


# ------------------------------------------------------------------------------------------------
# The lease rules, in-process
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def r():
    client = connect(URL, decode_responses=True)
    made: list[str] = []
    client.made = made  # job ids to forget
    yield client
    for job_id in made:
        forget_job(client, job_id)
    client.close()


@pytest.fixture
def settings(tmp_path):
    from rlhf.config import Settings

    return Settings(redis_url=URL, store_dir=tmp_path / "store", metrics_port=None,
                    torch_threads=1, job_tmp_dir=tmp_path / "jobs-tmp")


def _recorded(r, tmp_path) -> object:
    """A reward-model job's record, as `submit` writes it (no message: these tests run it)."""
    (tmp_path / "pairs.jsonl").write_text("")
    spec = parse_spec({"type": "reward_model", "job_id": unique("job"), "model_name": "m",
                       "base_dir": str(tmp_path), "source": {"type": "jsonl",
                                                            "path": str(tmp_path / "pairs.jsonl")}})
    r.made.append(spec.job_id)
    create_record(r, spec)
    return spec


def test_a_cancel_before_the_commit_point_stops_the_attempt(r, settings, tmp_path):
    tc = TrainingClient(URL, client=r)
    spec = _recorded(r, tmp_path)

    def work(spec, ctx):
        rec = tc.cancel(spec.job_id)  # meanwhile, someone cancels: the attempt holds the lease
        assert rec.status == "running" and rec.cancel_requested is not None
        ctx.confirm_lease()  # the commit point sees it
        raise AssertionError("went on to publish after a cancel")

    out = execute(spec, work, settings=settings, worker="t@test")
    assert out.status == "cancelled"
    rec = tc.status(spec.job_id)
    assert (rec.status, rec.attempts, rec.version) == ("cancelled", 1, None)
    assert "stopped before publishing" in rec.error and rec.finished is not None
    assert 0 < r.ttl(f"rlhf:job:{spec.job_id}") <= settings.job_record_ttl_s
    assert not r.exists(JobStore.lease_key(spec.job_id))
    # a redelivered message is not run again; a finished job cannot be cancelled
    assert execute(spec, work, settings=settings, worker="t@test").status == "skipped"
    with pytest.raises(JobNotCancellable, match=rf"job {spec.job_id} already cancelled"):
        tc.cancel(spec.job_id)
    with pytest.raises(JobCancelled, match="stopped before publishing"):
        tc.wait(spec.job_id, timeout=5)
    assert tc.wait(spec.job_id, timeout=5, raise_on_failure=False).status == "cancelled"
    with pytest.raises(JobNotFound):
        tc.cancel(unique("no-such-job"))


def test_a_cancel_after_the_commit_point_lets_the_job_succeed(r, settings, tmp_path):
    tc = TrainingClient(URL, client=r)
    spec = _recorded(r, tmp_path)

    def work(spec, ctx):
        ctx.confirm_lease()  # past this point the version is as good as published
        tc.cancel(spec.job_id)  # too late: the job publishes and finishes
        return JobResult("v0001", {"train_loss": 0.5})

    assert execute(spec, work, settings=settings, worker="t@test").status == "succeeded"
    seen = []
    rec = tc.wait(spec.job_id, timeout=5, on_update=seen.append)
    assert (rec.status, rec.version) == ("succeeded", "v0001") and rec.cancel_requested
    assert seen == [rec]
    with pytest.raises(JobNotCancellable, match="already succeeded"):
        tc.cancel(spec.job_id)


def test_nobody_holding_the_lease_means_cancelled_at_once_and_for_good(r, tmp_path):
    tc = TrainingClient(URL, client=r)
    jobs = JobStore(r, lease_s=60)
    # queued: cancelled now, and a delivery that starts later finds it done
    queued = _recorded(r, tmp_path)
    rec = tc.cancel(queued.job_id)
    assert rec.status == "cancelled" and rec.error == "cancelled by request while queued"
    assert isinstance(jobs.begin(queued, "w@test"), Done)
    # starting: the lease is taken first, so a cancel then is a request the attempt sees
    starting = _recorded(r, tmp_path)
    r.set(JobStore.lease_key(starting.job_id), "t0", px=60_000)
    assert tc.cancel(starting.job_id).status == "queued"
    r.delete(JobStore.lease_key(starting.job_id))
    run = jobs.begin(starting, "w@test", token="t0")
    assert isinstance(run, Run) and run.record.cancel_requested is not None
    # running, its lease lapsed (a starved heartbeat, a dead worker): cancelled now; the attempt,
    # if alive, can neither retake the lease nor overwrite the status
    running = _recorded(r, tmp_path)
    assert isinstance(jobs.begin(running, "w@test", token="t1"), Run)
    r.delete(JobStore.lease_key(running.job_id))
    rec = tc.cancel(running.job_id)
    assert rec.status == "cancelled" and rec.error == "cancelled by request while running"
    assert not jobs.renew(running.job_id, "t1")
    assert not jobs.succeed(running.job_id, "t1", version="v0009", metrics={})
    assert not jobs.fail(running.job_id, None, "late")
    assert tc.status(running.job_id).status == "cancelled"


def test_a_job_whose_message_cannot_be_sent_fails_at_submit(r, tmp_path):
    """The record is written before the message: a send Redis refuses (here the queue's key
    holds a string) leaves the job `failed` with the reason, not `queued` for ever."""
    tc = TrainingClient(URL, client=r)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' * 2)
    base = fake_hf_dir(tmp_path / "base")  # submit checks it is a safetensors checkpoint
    r.set(QUEUE, "not a list")
    job_id = unique("job")
    r.made.append(job_id)
    try:
        with pytest.raises(Exception, match="WRONGTYPE"):
            tc.submit({"type": "reward_model", "job_id": job_id, "model_name": "m",
                       "base_dir": str(base), "source": {"type": "jsonl", "path": str(pairs)}})
    finally:
        r.delete(QUEUE)
    rec = tc.status(job_id)
    assert rec.status == "failed" and rec.error.startswith("could not queue the job: WRONGTYPE")


# ------------------------------------------------------------------------------------------------
# A real worker
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory, tiny_reward_dir):
    """One worker for this module's tests (its start costs seconds); a store, a model name."""
    tmp = tmp_path_factory.mktemp("cancel")
    r = connect(URL)
    celery_keys(r)
    workers: list = []
    start = worker_starter(workers, tmp, store=tmp / "store", redis_url=URL)
    env = {"r": r, "tc": TrainingClient(URL), "store": tmp / "store", "base": str(tiny_reward_dir),
           "model": unique("rm"), "producer": QueueProducer(r), "streams": [],
           "worker": start("cw")}
    yield env
    for w in workers:
        w.stop()
    for job in env["tc"].jobs(limit=1000):
        if job.spec.get("model_name") == env["model"]:
            forget_job(r, job.id)
    forget_model(r, env["model"])
    for stream in env["streams"]:
        delete_matching(r, f"{stream}*")
    celery_keys(r)
    env["tc"].close()
    r.close()


def _stream(env) -> str:
    stream = unique("test:cancel")
    env["streams"].append(stream)
    return stream


def _submit(env, stream: str, **spec) -> str:
    return env["tc"].submit_reward_model(model_name=env["model"], base_dir=env["base"],
                                         source={"type": "stream", "stream": stream,
                                                 **spec.pop("source", {})}, **TRAIN, **spec)


def _reading(env, stream: str, job_id: str) -> bool:
    import redis

    try:
        consumers = env["r"].xinfo_consumers(stream, GROUP)
    except redis.ResponseError:  # no stream or group yet
        return False
    return any(c["name"].decode() == f"job-{job_id}" for c in consumers)


def test_a_queued_job_never_runs_and_a_waiting_one_stops(worker_env):
    env, tc, r = worker_env, worker_env["tc"], worker_env["r"]
    # A: running, waiting in its stream read for pairs that never come
    waiting_stream = _stream(env)
    a = _submit(env, waiting_stream, source={"block_ms": 180_000})
    wait_for(lambda: _reading(env, waiting_stream, a), timeout=180, what="job A's stream read")
    # B: queued behind A (one pool child, prefetch 1): cancelled at once
    b = _submit(env, _stream(env))
    assert r.llen(QUEUE) == 1 and tc.status(b).status == "queued"
    rec = tc.cancel(b)
    assert (rec.status, rec.attempts) == ("cancelled", 0) and rec.finished is not None
    # A: flagged; its attempt stops within a read slice and records the cancel
    rec = tc.cancel(a)
    assert rec.status == "running" and rec.cancel_requested is not None
    rec = tc.wait(a, timeout=30, poll_s=0.1, raise_on_failure=False)
    assert (rec.status, rec.attempts, rec.version) == ("cancelled", 1, None)
    assert "stopped before publishing" in rec.error
    # then the worker takes B's message, finds it cancelled and skips it
    wait_for(lambda: f"job {b} is already cancelled: not run again" in env["worker"].log(),
             timeout=60, what="the worker to skip job B")
    assert tc.status(b).attempts == 0
    wait_for(lambda: r.llen(QUEUE) == 0 and r.hlen("unacked") == 0, timeout=30,
             what="both messages to be acked")
    assert ModelStore(env["store"]).versions(env["model"]) == []


def test_a_job_cancelled_mid_training_publishes_nothing_and_leaves_its_pairs(worker_env):
    env, tc, r = worker_env, worker_env["tc"], worker_env["r"]
    stream = _stream(env)
    pushed = push_at_once(r, synthetic_messages(40, seed=21, prefix=unique("p")), stream=stream)
    c = _submit(env, stream, epochs=1000)  # ~5000 optimizer steps: minutes, were it not cancelled
    seen = []

    def on_update(rec):  # what a progress bar gets; cancel once it trains
        seen.append(rec)
        if rec.metrics.get("stage") == "training" and rec.metrics.get("step", 0) >= 1 \
                and rec.cancel_requested is None:
            tc.cancel(c)

    with pytest.raises(JobCancelled) as caught:
        tc.wait(c, timeout=240, poll_s=0.1, on_update=on_update)
    rec = caught.value.record
    assert rec.status == "cancelled" and rec.version is None and rec.attempts == 1
    trained = [s.metrics["step"] for s in seen if s.metrics.get("stage") == "training"]
    assert trained and max(trained) < 5000  # stopped mid-training
    assert seen[0].status in ("queued", "running") and seen[-1] == rec
    assert ModelStore(env["store"]).versions(env["model"]) == []
    # what it read is still pending (never acked) and not recorded as applied
    assert r.xpending(stream, GROUP)["pending"] == 40
    assert not r.exists(applied_key(stream, GROUP))
    assert re.search(rf"job {c} cancelled: nothing published", env["worker"].log())

    # the next job of the group claims them (idle past queue_claim_idle_ms) and trains on all
    d = _submit(env, stream, epochs=1, min_pairs=40, source={"block_ms": 120_000})
    rec = tc.wait(d, timeout=240, poll_s=0.2)
    assert (rec.status, rec.version) == ("succeeded", "v0001")
    manifest = ModelStore(env["store"]).verify(env["model"], "v0001")
    used = manifest.extra["applied_ids"] + manifest.extra["eval_ids"]
    assert len(used) == len(set(used)) == 40 and set(used) == set(pushed)
    assert r.xpending(stream, GROUP)["pending"] == 0
    with pytest.raises(JobNotCancellable, match=rf"job {d} already succeeded"):
        tc.cancel(d)
    with pytest.raises(JobNotFound):
        tc.cancel(uuid.uuid4().hex)

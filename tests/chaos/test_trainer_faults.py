"""Trainer faults on real processes: Redis restarted mid-job, the worker SIGKILLed between the
store and the registry, the store's disk full while publishing.

Each test runs its own `redis-server` (append-only file, fsync always: what Redis acknowledged
is on disk when it dies) and real `rlhf worker` processes, and trains a tiny reward model on
pairs it reads from a stream. The points where the faults hit are reached by waiting for
something observable (the job's progress, a paused process, a version directory), never by
sleeping.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import redis
from chaos_procs import CHAOS_WORKER_ENV, proc_state
from redis_procs import RedisProc
from rlhf_client import TrainingClient
from rlhf_client.registry import Registry
from trainer_helpers import (Worker, publish_active, push_at_once,
                             synthetic_messages, unique, wait_for)

from rlhf.models.store import ModelStore
from rlhf.trainer.publish import FAULT_PAUSE_ENV
from rlhf.trainer.queues import applied_ids

GROUP = "reward-model"  # the reward-model job's default consumer group
TRAIN = dict(learning_rate=1e-3, batch_size=8, max_length=64)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """One own Redis, one store and one `rlhf worker` for the module (a worker start is the
    slow part). The store is on its own 64 MiB tmpfs where this process may mount one (the
    disk-full test fills it; without it that test is skipped). The worker carries the fault
    hooks for three model names only (RLHF_FAULT_PAUSE_AT=after_store_publish:<name>,
    after_register:<name2>,training:<name3>; rlhf.trainer.faults), which only the kill and
    Redis-restart tests use; `rig["worker"]` is replaced when a test kills it (the replacement
    carries no hook)."""
    base = tmp_path_factory.mktemp("trainer-faults")
    mnt = base / "small-fs"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    server = RedisProc(base / "redis", appendonly=True, appendfsync="always").start()
    ctx = {"base": base, "server": server, "store": mnt / "store", "fs": mnt,
           "mounted": mounted.returncode == 0, "mount_error": mounted.stderr.strip(),
           "paused_model": unique("rm-paused"), "registered_model": unique("rm-registered"),
           "training_model": unique("rm-training"), "workers": []}

    def start(name: str, **env: str) -> Worker:
        w = Worker(base / f"{name}.log", redis_url=server.url, store=ctx["store"],
                   name=f"{name}@chaos", env={**CHAOS_WORKER_ENV, **env,
                                              "RLHF_JOB_TMP_DIR": str(base / "jobs-tmp")})
        ctx["workers"].append(w)
        ctx["worker"] = w.wait_ready()
        return w

    ctx["start"] = start
    try:
        start("w1", **{FAULT_PAUSE_ENV: f"after_store_publish:{ctx['paused_model']},"
                                        f"after_register:{ctx['registered_model']},"
                                        f"training:{ctx['training_model']}"})
        yield ctx
    finally:
        for w in ctx["workers"]:
            w.stop()
        server.stop()
        if ctx["mounted"]:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def job(rig, tiny_reward_dir):
    """Unique model / stream names, clients on the module's Redis, `push(n, seed)` and
    `submit(**spec)` (a reward-model job reading the stream)."""
    server = rig["server"]
    tc = TrainingClient(server.url)
    r = redis.Redis(host=server.host, port=server.port)
    text = server.client()
    ctx = {"model": unique("rm"), "stream": unique("prefs"), "tc": tc, "r": r, "text": text}

    def push(n: int, seed: int) -> list[str]:
        return push_at_once(r, synthetic_messages(n, seed=seed, prefix=unique("p")),
                            stream=ctx["stream"])

    def submit(**spec) -> str:
        return tc.submit_reward_model(model_name=ctx["model"], base_dir=str(tiny_reward_dir),
                                      source={"type": "stream", "stream": ctx["stream"]},
                                      **{**TRAIN, **spec})

    ctx["push"], ctx["submit"] = push, submit
    yield ctx
    tc.close()
    r.close()
    text.close()


def assert_applied_once(job, pushed: list[str], manifest) -> None:
    """Every pushed pair in the version exactly once, acked, nothing pending or dead."""
    r, stream = job["r"], job["stream"]
    used = manifest.extra["applied_ids"] + manifest.extra["eval_ids"]
    assert len(used) == len(set(used)) == len(pushed) and set(used) == set(pushed)
    assert applied_ids(r, stream, GROUP) == set(pushed)
    assert r.xpending(stream, GROUP)["pending"] == 0
    assert r.xlen(f"{stream}:dead") == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_store_disk_full_fails_the_job_and_keeps_the_old_version(rig, job, tiny_reward_dir):
    """The store's filesystem has less room than a version needs when the job publishes: the
    job fails naming ENOSPC, nothing partial is left in the store, v0001 stays active and
    intact, the pairs stay pending for a later job, and the failed record does not claim it is
    still training."""
    if not rig["mounted"]:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {rig['mount_error']}")
    store_dir, text, model = rig["store"], job["text"], job["model"]
    publish_active(text, store_dir, model, tiny_reward_dir, kind="reward")  # v0001
    st = os.statvfs(rig["fs"])
    filler = rig["fs"] / "filler"
    with filler.open("wb") as f:  # leave 256 KiB: a version needs ~1.9 MB
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 256 * 1024))
    try:
        pushed = job["push"](32, seed=33)
        job_id = job["submit"](epochs=1, activate=True)
        rec = job["tc"].wait(job_id, timeout=240, poll_s=0.2, raise_on_failure=False)
    finally:
        filler.unlink()
    assert rec.status == "failed", (rec, rig["worker"].log()[-3000:])
    assert "StoreFull" in rec.error and "ENOSPC" in rec.error, rec.error
    assert rec.attempts == 1  # not retried: a full disk is for an operator to fix
    assert rec.progress == 0 and "stage" not in rec.metrics, (rec.progress, rec.metrics)
    store = ModelStore(store_dir)
    assert store.versions(model) == ["v0001"]
    assert not [p.name for p in (store_dir / model).iterdir() if p.name.startswith(".")], \
        "a partial version is left in the store"
    store.verify(model, "v0001")  # the old version intact
    assert Registry(text).active(model) == "v0001"
    assert text.zrange(f"rlhf:model:{model}:versions", 0, -1) == ["v0001"]
    r, stream = job["r"], job["stream"]
    assert applied_ids(r, stream, GROUP) == set()  # nothing applied ...
    assert r.xpending(stream, GROUP)["pending"] == len(pushed)  # ... nothing lost
    assert r.xlen(f"{stream}:dead") == 0
    print(f"\nchaos disk-full: error {rec.error[:200]!r}, versions {store.versions(model)}, "
          f"pairs left pending {len(pushed)}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_redis_restart_mid_training_loses_and_repeats_no_pair(rig, job):
    """Redis SIGKILLed while the job trains (its process stops itself at its first step, the
    `training` fault point, so the kill lands mid-training however fast the machine trains),
    started again once the job has met the outage: the job finishes in the same attempt, one
    version, every pair applied once."""
    job["model"] = rig["training_model"]  # the model the first worker's `training` hook names
    w, server = rig["worker"], rig["server"]
    if "w1" not in w.name:  # a kill test replaced the hooked worker: a hooked one again, alone
        w.stop()
        w = rig["start"]("w5", **{FAULT_PAUSE_ENV: f"training:{job['model']}"})
    pushed = job["push"](48, seed=31)
    job_id = job["submit"](epochs=4)
    (child,) = w.pool_children()
    wait_for(lambda: proc_state(child) == "T", timeout=180,
             what="the job to pause at its first training step", interval=0.02)
    assert job["tc"].status(job_id).status == "running"
    try:
        server.kill()
    finally:
        os.kill(child, signal.SIGCONT)
    marks = (f"job {job_id}: progress not recorded", f"job {job_id}: Redis unreachable",
             f"job {job_id}: heartbeat failed")
    wait_for(lambda: any(m in w.log() for m in marks), timeout=120,
             what="the job to meet the outage", interval=0.1)
    server.start()  # same port, same directory: the AOF is replayed

    rec = job["tc"].wait(job_id, timeout=240, poll_s=0.2)
    assert (rec.status, rec.version, rec.attempts) == ("succeeded", "v0001", 1), \
        (rec, w.log()[-3000:])
    store = ModelStore(rig["store"])
    assert store.versions(job["model"]) == ["v0001"]
    assert_applied_once(job, pushed, store.verify(job["model"], "v0001"))
    print(f"\nchaos redis-restart: pairs pushed {len(pushed)}, applied "
          f"{len(applied_ids(job['r'], job['stream'], GROUP))}, attempts {rec.attempts}, "
          f"versions {store.versions(job['model'])}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_worker_killed_between_store_and_registry_leaves_one_version(rig, job, tiny_reward_dir):
    """The job's process stops itself right after its version is in the store (the
    RLHF_FAULT_PAUSE_AT hook in trainer/publish.py), and the whole worker is SIGKILLed there:
    the version is not registered, the old one stays active (nothing serves the orphan). A
    second worker gets the redelivered job, finds the version by job id and finishes it: one
    new version, registered and activated once, every pair applied once."""
    job["model"] = model = rig["paused_model"]  # the model the worker's fault hook names
    store_dir, text = rig["store"], job["text"]
    registry = Registry(text)
    publish_active(text, store_dir, model, tiny_reward_dir, kind="reward")  # v0001
    w1 = rig["worker"]
    pushed = job["push"](32, seed=32)
    job_id = job["submit"](epochs=1, activate=True)
    (child,) = w1.pool_children()
    version_dir = store_dir / model / "v0002"
    wait_for(lambda: proc_state(child) == "T" and version_dir.exists(), timeout=240,
             what="the job to pause between the store and the registry", interval=0.05)
    # the fault point: in the store, not in the registry; v0001 still the one served
    assert registry.versions(model) == ["v0001"]
    assert registry.active(model) == "v0001"
    w1.kill()

    w2 = rig["start"]("w2")
    rec = job["tc"].wait(job_id, timeout=240, poll_s=0.2)
    assert (rec.status, rec.version) == ("succeeded", "v0002"), (rec, w2.log()[-3000:])
    assert rec.attempts == 2  # the killed attempt and the one that finished it
    assert f"job {job_id}: version v0002 already published; finishing it" in w2.log()
    store = ModelStore(store_dir)
    assert store.versions(model) == ["v0001", "v0002"]  # exactly one new version
    assert registry.versions(model) == ["v0001", "v0002"]
    assert registry.active(model) == "v0002"
    assert registry.history(model) == ["v0001"]
    assert_applied_once(job, pushed, store.verify(model, "v0002"))
    print(f"\nchaos kill-before-register: pairs {len(pushed)}, attempts {rec.attempts}, "
          f"versions {store.versions(model)}, active {registry.active(model)}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_worker_killed_right_after_registering_leaves_one_version(rig, job, tiny_reward_dir):
    """The worker SIGKILLed just after publishing: the version is in the store and registered,
    not yet active. The redelivered job finds it by job id and finishes it: one new version,
    activated once, every pair applied once. Runs on the module's first worker (which carries
    the hook for this model) when it is still alive, else on a new one with the hook."""
    job["model"] = model = rig["registered_model"]
    store_dir, text = rig["store"], job["text"]
    registry = Registry(text)
    publish_active(text, store_dir, model, tiny_reward_dir, kind="reward")  # v0001
    w1 = rig["worker"]
    if "w1" not in w1.name:  # the kill test replaced it: a hooked worker again, alone
        w1.stop()
        w1 = rig["start"]("w3", **{FAULT_PAUSE_ENV: f"after_register:{model}"})
    pushed = job["push"](32, seed=33)
    job_id = job["submit"](epochs=1, activate=True)
    (child,) = w1.pool_children()
    wait_for(lambda: proc_state(child) == "T" and registry.versions(model) == ["v0001", "v0002"],
             timeout=240, what="the job to pause right after registering", interval=0.05)
    assert registry.active(model) == "v0001"  # registered, not yet activated
    w1.kill()

    w2 = rig["start"]("w4")
    rec = job["tc"].wait(job_id, timeout=240, poll_s=0.2)
    assert (rec.status, rec.version) == ("succeeded", "v0002"), (rec, w2.log()[-3000:])
    assert rec.attempts == 2
    store = ModelStore(store_dir)
    assert store.versions(model) == ["v0001", "v0002"]  # exactly one new version
    assert registry.versions(model) == ["v0001", "v0002"]
    assert registry.active(model) == "v0002"
    assert_applied_once(job, pushed, store.verify(model, "v0002"))
    print(f"\nchaos kill-after-register: pairs {len(pushed)}, attempts {rec.attempts}, "
          f"versions {store.versions(model)}, active {registry.active(model)}")

"""Celery tasks: thin. Validate the spec, run the job under its id's guard, nothing else.

The work is in plain functions (reward_model.run_reward_model_job, dpo.run_dpo_job,
ppo.run_ppo_job, sft.run_sft_job, loop.run_loop_job) run by jobs.execute, which decides whether
this delivery runs (a completed job never runs again; a job another worker holds is retried
later) and records the outcome on the job record.

A task never lets Celery drop its message. Celery's own answers to a broker outage do: a task
that calls `retry()` while the broker is down gets its message rejected without requeue (the
retry could not be published), and `autoretry_for` does that on any Redis error. So there is no
`autoretry_for` here: `execute` waits Redis out itself, a retry whose publish fails waits for the
broker and publishes again (`_retry`), and a delivery that cannot go on hands its message back
(`Reject(requeue=True)`; with Redis still down the message simply stays in kombu's unacked hash
until the visibility timeout). The reaper (reaper.py) re-queues a job whose message was lost
anyway.
"""

from __future__ import annotations

import logging
import time

from celery.exceptions import Reject

from rlhf.tracing import job_span
from rlhf.trainer.celery_app import app, get_settings

log = logging.getLogger(__name__)

_TASK_OPTIONS = dict(bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)


def _run(task, spec: dict, job_type: str, work) -> dict:
    """One delivery of a job, inside its span while tracing is on (rlhf.tracing.job_span)."""
    with job_span(task, job_type):
        return _deliver(task, spec, job_type, work)


def _deliver(task, spec: dict, job_type: str, work) -> dict:
    from rlhf.trainer.jobs import REDIS_ERRORS, JobRejected, execute, parse_spec

    try:
        job = parse_spec(spec)
        if job.type != job_type:
            raise JobRejected(f"a {job.type!r} spec sent to the {job_type!r} task")
    except JobRejected as exc:  # a message that did not come through submit_job
        log.error("task %s: %s", task.request.id, exc)
        return {"status": "rejected", "error": str(exc)}
    settings = get_settings()
    try:
        outcome = execute(job, work, settings=settings, worker=task.request.hostname or "unknown")
    except REDIS_ERRORS as exc:  # not expected (execute waits Redis out): keep the message
        raise Reject(f"Redis unreachable: {exc}", requeue=True) from exc
    if outcome.status == "interrupted":
        raise Reject(outcome.error, requeue=True)
    if outcome.retry_in_s is not None:
        _retry(task, outcome.retry_in_s, patience_s=settings.job_redis_wait_s)
    return outcome.as_dict()


def _retry(task, countdown: float, *, patience_s: float) -> None:
    """`task.retry(countdown)`: publish the job's next message, then this one is acked — but
    a publish that fails (broker down) is tried again, backoff capped at 10 s, for up to
    `patience_s`; past that this message is handed back instead of dropped."""
    start, delay = time.monotonic(), 0.5
    while True:
        try:
            task.retry(countdown=countdown)  # raises Retry once the new message is published
        except Reject as exc:  # Celery's answer to a failed publish: it would drop the message
            waited = time.monotonic() - start
            if waited >= patience_s:
                raise Reject(f"could not publish the retry for {waited:.0f}s: {exc.reason}",
                             requeue=True) from None
            log.warning("task %s: the retry could not be published (%s); trying again in %.1fs",
                        task.request.id, exc.reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


@app.task(name="rlhf.train_reward_model", **_TASK_OPTIONS)
def train_reward_model(self, spec: dict) -> dict:
    from rlhf.trainer.reward_model import run_reward_model_job

    return _run(self, spec, "reward_model", run_reward_model_job)


@app.task(name="rlhf.train_dpo", **_TASK_OPTIONS)
def train_dpo(self, spec: dict) -> dict:
    from rlhf.trainer.dpo import run_dpo_job

    return _run(self, spec, "dpo", run_dpo_job)


@app.task(name="rlhf.train_ppo", **_TASK_OPTIONS)
def train_ppo(self, spec: dict) -> dict:
    from rlhf.trainer.ppo import run_ppo_job

    return _run(self, spec, "ppo", run_ppo_job)


@app.task(name="rlhf.train_sft", **_TASK_OPTIONS)
def train_sft(self, spec: dict) -> dict:
    from rlhf.trainer.sft import run_sft_job

    return _run(self, spec, "sft", run_sft_job)


@app.task(name="rlhf.iterate", **_TASK_OPTIONS)
def iterate(self, spec: dict) -> dict:
    from rlhf.trainer.loop import run_loop_job

    return _run(self, spec, "iterate", run_loop_job)

"""Celery tasks: thin. Validate the spec, run the job under its id's guard, nothing else.

The work is in plain functions (reward_model.run_reward_model_job, dpo.run_dpo_job) run by
jobs.execute, which decides whether this delivery runs (a completed job never runs again; a job
another worker holds is retried later) and records the outcome on the job record.
"""

from __future__ import annotations

import logging

import redis

from rlhf.trainer.celery_app import app, get_settings

log = logging.getLogger(__name__)

_TASK_OPTIONS = dict(
    bind=True, acks_late=True, reject_on_worker_lost=True,
    autoretry_for=(redis.ConnectionError, redis.TimeoutError), retry_backoff=True, max_retries=None,
)


def _run(task, spec: dict, job_type: str, work) -> dict:
    from rlhf.trainer.jobs import JobRejected, execute, parse_spec

    try:
        job = parse_spec(spec)
        if job.type != job_type:
            raise JobRejected(f"a {job.type!r} spec sent to the {job_type!r} task")
    except JobRejected as exc:  # a message that did not come through submit_job
        log.error("task %s: %s", task.request.id, exc)
        return {"status": "rejected", "error": str(exc)}
    outcome = execute(job, work, settings=get_settings(), worker=task.request.hostname or "unknown")
    if outcome.retry_in_s is not None:
        raise task.retry(countdown=outcome.retry_in_s)
    return outcome.as_dict()


@app.task(name="rlhf.train_reward_model", **_TASK_OPTIONS)
def train_reward_model(self, spec: dict) -> dict:
    from rlhf.trainer.reward_model import run_reward_model_job

    return _run(self, spec, "reward_model", run_reward_model_job)


@app.task(name="rlhf.train_dpo", **_TASK_OPTIONS)
def train_dpo(self, spec: dict) -> dict:
    from rlhf.trainer.dpo import run_dpo_job

    return _run(self, spec, "dpo", run_dpo_job)

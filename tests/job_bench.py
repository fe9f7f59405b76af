"""A real `rlhf worker` on a Redis database of its own, running small reward-model jobs: what the
observability tests (task events, tracing) watch from outside. Everything it made is deleted."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import redis
from rlhf_client import QueueProducer, TrainingClient
from rlhf_client.redis_conn import connect
from trainer_helpers import (
    FAST_WORKER_ENV,
    celery_keys,
    delete_matching,
    forget_job,
    forget_model,
    synthetic_messages,
    unique,
    worker_starter,
)


@dataclass
class JobBench:
    r: redis.Redis
    tc: TrainingClient
    start: Callable  # start(name) -> a ready trainer_helpers.Worker
    base_dir: str
    model: str = field(default_factory=lambda: unique("rm-bench"))
    stream: str = field(default_factory=lambda: unique("test:bench"))
    jobs: list[str] = field(default_factory=list)

    def submit_small_job(self, *, seed: int) -> str:
        """Push 16 preference pairs and submit a reward-model job that reads them; the job id."""
        QueueProducer(self.r).push_many(synthetic_messages(16, seed=seed, prefix=unique("p")),
                                        stream=self.stream)
        job_id = self.tc.submit_reward_model(
            model_name=self.model, base_dir=self.base_dir, learning_rate=1e-3, batch_size=8,
            max_length=64, source={"type": "stream", "stream": self.stream})
        self.jobs.append(job_id)
        return job_id


@contextlib.contextmanager
def job_bench(tmp_path: Path, base_dir: Path, redis_url: str, **worker_env: str):
    """A JobBench on `redis_url`; its workers get FAST_WORKER_ENV, a visibility timeout longer
    than any job (each message is delivered once) and `worker_env`."""
    r = connect(redis_url)
    celery_keys(r)
    workers: list = []
    env = {**FAST_WORKER_ENV, "RLHF_CELERY_VISIBILITY_TIMEOUT_S": "600", **worker_env}
    bench = JobBench(r, TrainingClient(redis_url), worker_starter(
        workers, tmp_path, store=tmp_path / "store", redis_url=redis_url, env=env), str(base_dir))
    try:
        yield bench
    finally:
        for w in workers:
            w.stop()
        for job_id in bench.jobs:
            forget_job(r, job_id)
        forget_model(r, bench.model)
        delete_matching(r, f"{bench.stream}*")
        celery_keys(r)
        bench.tc.close()
        r.close()

"""Training jobs and model versions from Python: submit, follow, list, activate, roll back.

`TrainingClient` submits jobs to the Celery trainer and reads their records; `ModelsClient`
lists model versions and moves the active one (the registry in Redis, plus the manifests in the
store when it is mounted here).

Reading job records and managing versions needs only `redis` (the base install). Submitting a
job validates its spec with the trainer's own pydantic models and sends a Celery message, so it
needs the `train` extra (`pip install 'rlhf[train]'`).

Job records (Redis hash `rlhf:job:<id>`, index `rlhf:jobs` scored by submit time):

    id, type, status (queued | running | succeeded | failed), progress (0..1), metrics (JSON),
    error, version (the model version produced), attempts, worker, spec (JSON snapshot),
    created, started, updated, finished (unix seconds)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from rlhf_client.redis_conn import connect

from rlhf_client.registry import Activation, Registry, RegistryError

JOB_KEY_PREFIX = "rlhf:job:"
JOBS_INDEX = "rlhf:jobs"
TERMINAL_STATUSES = frozenset({"succeeded", "failed"})


def job_key(job_id: str) -> str:
    return JOB_KEY_PREFIX + job_id


class JobNotFound(KeyError):
    """No record for this job id."""


class JobFailed(RuntimeError):
    """`wait` saw the job fail; `record` holds its error."""

    def __init__(self, record: "JobRecord"):
        super().__init__(f"job {record.id} failed: {record.error}")
        self.record = record


@dataclass(frozen=True)
class JobRecord:
    id: str
    type: str
    status: str
    progress: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    version: str | None = None
    attempts: int = 0
    worker: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    created: float | None = None
    started: float | None = None
    updated: float | None = None
    finished: float | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> "JobRecord":
        def num(key):
            v = h.get(key)
            return float(v) if v not in (None, "") else None

        return cls(
            id=h["id"],
            type=h.get("type", ""),
            status=h.get("status", ""),
            progress=float(h.get("progress") or 0.0),
            metrics=json.loads(h.get("metrics") or "{}"),
            error=h.get("error") or None,
            version=h.get("version") or None,
            attempts=int(h.get("attempts") or 0),
            worker=h.get("worker") or None,
            spec=json.loads(h.get("spec") or "{}"),
            created=num("created"),
            started=num("started"),
            updated=num("updated"),
            finished=num("finished"),
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def read_job(client: redis.Redis, job_id: str) -> JobRecord | None:
    h = client.hgetall(job_key(job_id))
    if not h:
        return None
    return JobRecord.from_hash({_s(k): _s(v) for k, v in h.items()})


def list_jobs(client: redis.Redis, limit: int = 50, status: str | None = None) -> list[JobRecord]:
    """The newest jobs first (records that expired are dropped from the index on the way)."""
    out: list[JobRecord] = []
    start = 0
    while len(out) < limit:
        ids = client.zrevrange(JOBS_INDEX, start, start + 4 * limit - 1)
        if not ids:
            break
        start += len(ids)
        for jid in ids:
            rec = read_job(client, _s(jid))
            if rec is None:
                client.zrem(JOBS_INDEX, jid)
                continue
            if status is None or rec.status == status:
                out.append(rec)
                if len(out) == limit:
                    break
    return out


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


class TrainingClient:
    """Submit training jobs and follow them.

        tc = TrainingClient.from_url("redis://127.0.0.1:6379/0")
        job_id = tc.submit_reward_model(model_name="rm", base_dir="models/reward",
                                        source={"type": "stream"}, epochs=2, activate=True)
        record = tc.wait(job_id, timeout=3600)      # raises JobFailed if it failed
        print(record.version, record.metrics["eval_accuracy"])

    A spec that fails validation raises `JobRejected` (a ValueError naming each bad field)
    before anything is queued.
    """

    def __init__(self, redis_url: str, *, client: redis.Redis | None = None):
        self.redis_url = redis_url  # also the Celery broker the trainer listens on
        self.r = client or connect(redis_url, decode_responses=True)

    @classmethod
    def from_url(cls, url: str) -> "TrainingClient":
        return cls(url)

    # ------------------------------------------------------------------ submit
    def submit(self, spec: dict[str, Any]) -> str:
        """Validate and queue a job spec (its "type" picks the job); returns the job id."""
        try:
            from rlhf.trainer.jobs import submit_job
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError(
                "submitting training jobs needs the trainer extra: pip install 'rlhf[train]'"
            ) from exc
        return submit_job(spec, redis_url=self.redis_url, client=self.r)

    def submit_reward_model(self, **spec: Any) -> str:
        """Queue a Bradley–Terry reward-model job (fields: `rlhf.trainer.jobs.RewardModelJob`)."""
        return self.submit({**spec, "type": "reward_model"})

    def submit_dpo(self, **spec: Any) -> str:
        """Queue a DPO job on a policy (fields: `rlhf.trainer.jobs.DPOJob`)."""
        return self.submit({**spec, "type": "dpo"})

    def submit_ppo(self, **spec: Any) -> str:
        """Queue a PPO / GRPO / RLOO / REINFORCE++ job on a policy, trained on scored samples
        (fields: `rlhf.trainer.jobs.PPOJob`; `advantage_estimator` picks the algorithm)."""
        return self.submit({**spec, "type": "ppo"})

    def submit_sft(self, **spec: Any) -> str:
        """Queue a supervised fine-tuning job on a policy: completion-only NLL on (prompt,
        completion) records from a JSONL file or a stream's SFTExample payloads (fields:
        `rlhf.trainer.jobs.SFTJob`; `reset_token` trains backtracking examples from the reset)."""
        return self.submit({**spec, "type": "sft"})

    def submit_loop(self, **spec: Any) -> str:
        """Queue an online / iterative alignment loop (fields: `rlhf.trainer.jobs.LoopJob`):
        rounds of sample → label (reward model or AI judge) → pairs → DPO (or PPO / GRPO) →
        activate → evaluate. Follow it with `status` (the loop's own record) and
        `rlhf loop status|follow ID`."""
        return self.submit({**spec, "type": "iterate"})

    # ------------------------------------------------------------------ follow
    def status(self, job_id: str) -> JobRecord:
        rec = read_job(self.r, job_id)
        if rec is None:
            raise JobNotFound(job_id)
        return rec

    def wait(self, job_id: str, *, timeout: float = 3600.0, poll_s: float = 0.5,
             raise_on_failure: bool = True) -> JobRecord:
        """Poll until the job succeeded or failed; `TimeoutError` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            rec = self.status(job_id)
            if rec.done:
                if rec.status == "failed" and raise_on_failure:
                    raise JobFailed(rec)
                return rec
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {rec.status} after {timeout:g}s "
                                   f"(progress {rec.progress:.0%})")
            time.sleep(poll_s)

    def jobs(self, limit: int = 50, status: str | None = None) -> list[JobRecord]:
        return list_jobs(self.r, limit, status)

    def close(self) -> None:
        self.r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ModelsClient:
    """Model versions: the registry (Redis) and, when `store_dir` is given, their manifests.

        mc = ModelsClient.from_url("redis://...", store_dir="/models")
        mc.models(); mc.versions("rm"); mc.show("rm"); mc.activate("rm", "v0002"); mc.rollback("rm")
    """

    def __init__(self, client: redis.Redis, *, store_dir: str | Path | None = None):
        self.r = client
        self.registry = Registry(client)
        self.store_dir = Path(store_dir) if store_dir is not None else None

    @classmethod
    def from_url(cls, url: str, *, store_dir: str | Path | None = None) -> "ModelsClient":
        return cls(connect(url, decode_responses=True), store_dir=store_dir)

    def models(self) -> list[str]:
        return self.registry.models()

    def versions(self, name: str) -> list[str]:
        return self.registry.versions(name)

    def active(self, name: str) -> str | None:
        return self.registry.active(name)

    def manifest(self, name: str, version: str) -> dict[str, Any] | None:
        """The version's manifest.json as a dict (None without a store or when absent)."""
        if self.store_dir is None:
            return None
        path = self.store_dir / name / version / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def show(self, name: str, version: str | None = None) -> dict[str, Any]:
        """A model (versions, active, rollback history) or, with `version`, one version."""
        versions = self.versions(name)
        if not versions:
            raise RegistryError(f"model {name!r} has no registered versions")
        active = self.active(name)
        if version is None:
            return {"name": name, "active": active, "versions": versions,
                    "history": self.registry.history(name)}
        if version not in versions:
            raise RegistryError(f"model {name!r} has no registered version {version!r}")
        return {"name": name, "version": version, "active": version == active,
                "manifest": self.manifest(name, version)}

    def activate(self, name: str, version: str) -> Activation:
        return self.registry.activate(name, version)

    def rollback(self, name: str) -> Activation:
        return self.registry.rollback(name)

    def close(self) -> None:
        self.r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

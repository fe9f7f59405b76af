"""Training jobs and model versions from Python: submit, follow, cancel, list, activate, roll back.

`TrainingClient` submits jobs to the Celery trainer, reads their records and cancels them;
`ModelsClient` lists model versions and moves the active one (the registry in Redis, plus the
manifests in the store when it is mounted here).

All of it runs on the base install (no torch, no Celery): a spec is validated with the job
models of `rlhf_client.jobspecs` (pydantic), checked against the registry and the files it names
(submit where the worker's files are visible), recorded, and its Celery message written onto the
broker's queue by `rlhf_client.celery_message`.

Job records (Redis hash `rlhf:job:<id>`, index `rlhf:jobs` scored by submit time):

    id, type, status (queued | running | succeeded | failed | cancelled), progress (0..1),
    metrics (JSON), error, version (the model version produced), attempts, worker,
    spec (JSON snapshot), created, started, updated, finished, cancel_requested (unix seconds)

Cancelling (`TrainingClient.cancel`): a job nobody runs (queued, or an attempt's lease gone) is
`cancelled` at once, and its message, when delivered, is skipped; a running job gets the
`cancel_requested` flag, which its attempt turns into `cancelled` at its next step check (a
heartbeat sees it within a third of the lease), publishing nothing. A job that has already
published its version when it sees the flag finishes `succeeded`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from rlhf_client import tracing
from rlhf_client.redis_conn import connect
from rlhf_client.registry import Activation, Registry, RegistryError

if TYPE_CHECKING:
    from rlhf_client.jobspecs import JobSpec

JOB_KEY_PREFIX = "rlhf:job:"
JOBS_INDEX = "rlhf:jobs"
#: Every status a job record can have, in the order a job goes through them.
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
#: How long a finished job's record is kept (the trainer's `job_record_ttl_s` default).
DEFAULT_RECORD_TTL_S = 30 * 86400


def job_key(job_id: str) -> str:
    return JOB_KEY_PREFIX + job_id


def lease_key(job_id: str) -> str:
    """The job's lease: held (a token with a TTL) by the attempt that runs it."""
    return job_key(job_id) + ":lease"


class JobNotFound(KeyError):
    """No record for this job id."""


class JobFailed(RuntimeError):
    """`wait` saw the job fail; `record` holds its error."""

    def __init__(self, record: "JobRecord"):
        super().__init__(f"job {record.id} failed: {record.error}")
        self.record = record


class JobCancelled(JobFailed):
    """`wait` saw the job cancelled (a `JobFailed`: it did not succeed)."""

    def __init__(self, record: "JobRecord"):
        RuntimeError.__init__(self, f"job {record.id} was cancelled"
                              + (f": {record.error}" if record.error else ""))
        self.record = record


class JobNotCancellable(ValueError):
    """`cancel` of a job that has already finished; `record` holds it (its status named)."""

    def __init__(self, record: "JobRecord"):
        super().__init__(f"job {record.id} already {record.status}: nothing to cancel")
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
    cancel_requested: float | None = None

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
            cancel_requested=num("cancel_requested"),
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


def create_record(client: redis.Redis, spec: "JobSpec", *, status: str = "queued") -> JobRecord:
    """Write a new job's record (the spec snapshotted into it) and index it; `JobRejected` when
    the id is taken. What `submit` writes and what the trainer writes for a message that came
    without a record (`JobStore.create`)."""
    from rlhf_client.jobspecs import JobRejected

    now = time.time()
    fields = {
        "id": spec.job_id, "type": spec.type, "status": status, "progress": "0",
        "metrics": "{}", "error": "", "version": "", "attempts": "0", "worker": "",
        "spec": spec.model_dump_json(), "created": f"{now:.6f}", "updated": f"{now:.6f}",
    }
    key = job_key(spec.job_id)
    if not client.hsetnx(key, "id", spec.job_id):
        raise JobRejected(f"job id {spec.job_id!r} already exists")
    pipe = client.pipeline(transaction=True)
    pipe.hset(key, mapping=fields)
    pipe.zadd(JOBS_INDEX, {spec.job_id: now})
    pipe.execute()
    return read_job(client, spec.job_id)


# Cancel, atomically against an attempt starting (which takes the lease, then re-reads the
# status): nobody holds the lease → `cancelled` now (a later delivery finds it terminal and
# skips it); an attempt holds it → only the flag, which that attempt turns into `cancelled`.
# KEYS: record, lease. ARGV: now, record TTL in s, note. Returns {outcome, status before}.
_CANCEL = """
local status = redis.call('hget', KEYS[1], 'status')
if not status then
  return {'missing', ''}
end
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
  return {'finished', status}
end
if not redis.call('hget', KEYS[1], 'cancel_requested') then
  redis.call('hset', KEYS[1], 'cancel_requested', ARGV[1])
end
if redis.call('exists', KEYS[2]) == 1 then
  return {'requested', status}
end
redis.call('hset', KEYS[1], 'status', 'cancelled', 'error', ARGV[3] .. status, 'updated', ARGV[1],
           'finished', ARGV[1])
redis.call('expire', KEYS[1], ARGV[2])
return {'cancelled', status}
"""


def cancel_job(client: redis.Redis, job_id: str, *,
               record_ttl_s: int = DEFAULT_RECORD_TTL_S) -> tuple[str, str]:
    """Cancel a job (see the module docstring): (outcome, status it had) with outcome
    `cancelled` (nobody ran it: cancelled now), `requested` (an attempt runs it: flagged),
    `finished` (already terminal: nothing done) or `missing` (no record)."""
    outcome, status = client.eval(_CANCEL, 2, job_key(job_id), lease_key(job_id),
                                  f"{time.time():.6f}", str(int(record_ttl_s)),
                                  "cancelled by request while ")
    return _s(outcome), _s(status)


def submit_job(client: redis.Redis, data: "dict[str, Any] | JobSpec") -> str:
    """Validate a spec, check it against the registry and the files it names, record the job and
    queue its Celery message (`send_job_message`); returns the job id. `client` (decoding
    responses) is the broker's database.

    Raises `JobRejected` (nothing is queued) when the spec is invalid, names a base version that
    does not exist, or reuses a job id (a job also when a file it names is missing or
    unusable, or its data source is empty: see `rlhf_client.jobspecs.check_submit`)."""
    from rlhf_client.jobspecs import check_submit, parse_spec

    spec = parse_spec(data)
    with tracing.producer_span("rlhf.job", operation="submit", attributes={
            "rlhf.job_id": spec.job_id, "rlhf.job_type": spec.type}):
        check_submit(spec, client)
        create_record(client, spec)
        try:
            send_job_message(client, spec.type, spec.model_dump(mode="json"), spec.job_id,
                             tracing.message_headers())
        except Exception as exc:
            _fail_unsent(client, spec.job_id, f"could not queue the job: {exc}")
            raise
    return spec.job_id


def send_job_message(client: redis.Redis, job_type: str, spec: dict[str, Any], job_id: str,
                     headers: dict[str, str] | None = None) -> None:
    """Queue a job's Celery message (task id = job id) on its queue of the broker `client`:
    the one way jobs are sent (`submit_job`; the trainer's `send_job`, the reaper's)."""
    from rlhf_client.celery_message import send_task_message
    from rlhf_client.jobspecs import QUEUE_FOR_TASK, TASK_FOR_JOB, TRAIN_EXCHANGE

    task = TASK_FOR_JOB[job_type]
    send_task_message(client, task=task, queue=QUEUE_FOR_TASK[task], args=[spec], task_id=job_id,
                      headers=headers or None, exchange=TRAIN_EXCHANGE)


def _fail_unsent(client: redis.Redis, job_id: str, error: str) -> None:
    """A job whose message could not be sent: `failed`, while it is still `queued` with no
    lease (a send whose reply was lost may have reached a worker: then it is left alone)."""
    try:
        client.eval(_FAIL_UNSENT, 2, job_key(job_id), lease_key(job_id), error[:4000],
                    f"{time.time():.6f}", str(DEFAULT_RECORD_TTL_S))
    except redis.RedisError:  # the reaper re-sends a queued job whose message is missing
        pass


_FAIL_UNSENT = """
if redis.call('hget', KEYS[1], 'status') ~= 'queued' or redis.call('exists', KEYS[2]) == 1 then
  return 0
end
redis.call('hset', KEYS[1], 'status', 'failed', 'error', ARGV[1], 'updated', ARGV[2],
           'finished', ARGV[2])
redis.call('expire', KEYS[1], ARGV[3])
return 1
"""


class TrainingClient:
    """Submit training jobs and follow them.

        tc = TrainingClient.from_url("redis://127.0.0.1:6379/0")
        job_id = tc.submit_reward_model(model_name="rm", base_dir="models/reward",
                                        source={"type": "stream"}, epochs=2, activate=True)
        record = tc.wait(job_id, timeout=3600)      # raises JobFailed if it failed
        print(record.version, record.metrics["eval_accuracy"])

    A spec that fails validation raises `JobRejected` (a ValueError naming each bad field)
    before anything is queued. `cancel(job_id)` stops a job (see the module docstring).
    """

    def __init__(self, redis_url: str, *, client: redis.Redis | None = None,
                 record_ttl_s: int = DEFAULT_RECORD_TTL_S):
        self.redis_url = redis_url  # also the Celery broker the trainer listens on
        self.r = client or connect(redis_url, decode_responses=True)
        self.record_ttl_s = record_ttl_s  # a record cancelled here expires like a finished one

    @classmethod
    def from_url(cls, url: str) -> "TrainingClient":
        return cls(url)

    # ------------------------------------------------------------------ submit
    def submit(self, spec: dict[str, Any]) -> str:
        """Validate and queue a job spec (its "type" picks the job; fields:
        `rlhf_client.jobspecs`); returns the job id. `JobRejected` names every problem."""
        return submit_job(self.r, spec)

    def submit_reward_model(self, **spec: Any) -> str:
        """Queue a Bradley–Terry reward-model job (fields:
        `rlhf_client.jobspecs.RewardModelJob`)."""
        return self.submit({**spec, "type": "reward_model"})

    def submit_dpo(self, **spec: Any) -> str:
        """Queue a DPO job on a policy (fields: `rlhf_client.jobspecs.DPOJob`)."""
        return self.submit({**spec, "type": "dpo"})

    def submit_ppo(self, **spec: Any) -> str:
        """Queue a PPO / GRPO / RLOO / REINFORCE++ job on a policy, trained on scored samples
        (fields: `rlhf_client.jobspecs.PPOJob`; `advantage_estimator` picks the algorithm)."""
        return self.submit({**spec, "type": "ppo"})

    def submit_sft(self, **spec: Any) -> str:
        """Queue a supervised fine-tuning job on a policy: completion-only NLL on (prompt,
        completion) records from a JSONL file or a stream's SFTExample payloads (fields:
        `rlhf_client.jobspecs.SFTJob`; `reset_token` trains backtracking examples from the
        reset)."""
        return self.submit({**spec, "type": "sft"})

    def submit_loop(self, **spec: Any) -> str:
        """Queue an online / iterative alignment loop (fields: `rlhf_client.jobspecs.LoopJob`):
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

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job; its record afterwards. A queued job (or one whose attempt died) is
        `cancelled` at once and never runs; a running one is flagged (`cancel_requested`) and
        stops at its next step check, publishing nothing — unless it has already published its
        version, when it finishes `succeeded`: `wait` tells which. `JobNotFound` for an unknown
        id; `JobNotCancellable` (naming its status) for a job already finished."""
        outcome, _ = cancel_job(self.r, job_id, record_ttl_s=self.record_ttl_s)
        if outcome == "missing":
            raise JobNotFound(job_id)
        rec = self.status(job_id)
        if outcome == "finished":
            raise JobNotCancellable(rec)
        return rec

    def wait(self, job_id: str, *, timeout: float = 3600.0, poll_s: float = 0.5,
             raise_on_failure: bool = True,
             on_update: Callable[[JobRecord], None] | None = None) -> JobRecord:
        """Poll until the job is done (succeeded, failed or cancelled); `TimeoutError` after
        `timeout` seconds. `on_update(record)` is called with every record polled (the last one
        included), e.g. to draw progress. With `raise_on_failure`, a failed job raises
        `JobFailed` and a cancelled one `JobCancelled` (a `JobFailed`)."""
        deadline = time.monotonic() + timeout
        while True:
            rec = self.status(job_id)
            if on_update is not None:
                on_update(rec)
            if rec.done:
                if raise_on_failure and rec.status == "failed":
                    raise JobFailed(rec)
                if raise_on_failure and rec.status == "cancelled":
                    raise JobCancelled(rec)
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

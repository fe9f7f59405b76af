"""Job specs (typed, validated at submit and again in the task), job records and leases in Redis.

A job's life: `submit_job` validates the spec, writes the record (status `queued`, the spec
snapshotted into it) and sends the Celery message (task id = job id). The task calls
`JobStore.begin`, which decides whether this delivery runs:

- the record is terminal (`succeeded` / `failed`)  → `Done`: a completed job never runs again;
- another live worker holds the job's lease         → `Busy`: this copy retries later;
- otherwise                                         → `Run`: lease taken, status `running`,
  `attempts` + 1. A job whose earlier attempt died mid-run restarts cleanly from its own
  pending stream entries (see queues.py); a version that attempt already published is found
  in the store by job id and finished off, not trained again (see reward_model.py).

The lease (`rlhf:job:<id>:lease`, a random token with a TTL of `job_lease_s`) is renewed by the
running attempt's heartbeat. The order "write terminal status, then release the lease" and
"take the lease, then re-read the status" means two deliveries can never both run a job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rlhf_client.queues import PREFERENCES_STREAM
from rlhf_client.redis_conn import connect
from rlhf_client.registry import Registry
from rlhf_client.training import JOBS_INDEX, TERMINAL_STATUSES, JobRecord, job_key, read_job

if TYPE_CHECKING:
    from rlhf.config import Settings

log = logging.getLogger(__name__)

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


class JobRejected(ValueError):
    """A job spec that cannot run; the message names every offending field."""


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StreamSource(_Spec):
    """Preference payloads (pairs and rankings) read from a Redis stream via a consumer group."""

    type: Literal["stream"] = "stream"
    stream: str = Field(PREFERENCES_STREAM, min_length=1, description="Stream to read.")
    group: str = Field("reward-model", pattern=_NAME, description="Consumer group (its own "
                       "read position and applied-id set: one per model lineage).")
    max_entries: int = Field(100_000, gt=0, description="Most payloads one job reads.")
    block_ms: int = Field(0, ge=0, le=600_000, description="Wait this long for a first entry.")


class JsonlSource(_Spec):
    """Pairs and rankings from a JSONL file on the worker's file system."""

    type: Literal["jsonl"] = "jsonl"
    path: str = Field(min_length=1)


class RewardModelJob(_Spec):
    """Train a Bradley–Terry reward model: loss −log σ(r_w − r_l) over preference pairs."""

    type: Literal["reward_model"] = "reward_model"
    job_id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=_NAME)
    model_name: str = Field(pattern=_NAME, description="Model (store + registry) to publish to.")
    base_dir: str | None = Field(None, description="Start from this HF directory (a first "
                                 "version); unset: from base_version of model_name.")
    base_version: str | None = Field(None, pattern=_NAME, description="Start from this version "
                                     "of model_name; unset (and no base_dir): its active version.")
    source: Annotated[Union[StreamSource, JsonlSource], Field(discriminator="type")]
    min_pairs: int = Field(2, ge=1, description="Fewer usable pairs than this: the job fails.")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Held-out share of payloads.")
    epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(8, ge=1, le=4096, description="Pairs per micro-batch.")
    grad_accum_steps: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(1e-5, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    max_length: int = Field(512, ge=2, description="Tokens per sequence (prompt + response; "
                            "longer ones keep their last max_length tokens).")
    seed: int = 0
    activate: bool = Field(False, description="Make the new version the active one.")
    min_eval_accuracy: float | None = Field(None, ge=0, le=1, description="Activate only when "
                                            "held-out accuracy reaches this.")

    @model_validator(mode="after")
    def _check(self) -> "RewardModelJob":
        if self.base_dir is not None and self.base_version is not None:
            raise ValueError("set base_dir or base_version, not both")
        if self.min_eval_accuracy is not None and self.eval_fraction == 0:
            raise ValueError("min_eval_accuracy needs a held-out split (eval_fraction > 0)")
        return self


# --- DPO (the job function is rlhf.trainer.dpo.run_dpo_job) ------------------------------------

#: DPO loss types; each is a function in rlhf.trainer.losses.LOSSES (a unit test keeps them equal).
DPOLossType = Literal["sigmoid", "hinge", "ipo", "reference_free", "simpo"]
#: Loss types that never read reference log-probs.
REFERENCE_FREE_LOSSES: frozenset[str] = frozenset({"reference_free", "simpo"})


class DPOStreamSource(StreamSource):
    """Preference payloads from a Redis stream, in DPO's own consumer group by default."""

    group: str = Field("dpo", pattern=_NAME, description="Consumer group (its own read position "
                       "and applied-id set: one per model lineage).")


class ReferenceSpec(_Spec):
    """Where log π_ref comes from: computed once per pair before training, cached with it.

    `local`: a checkpoint loaded in the worker — `model_dir`, else `version` of the job's model,
    else the version the job starts from (standard DPO: the reference is the policy before
    training). `service`: the ReferenceService at `target` (it must serve the intended reference;
    the version it reports is recorded in the new version's manifest).
    """

    source: Literal["local", "service"] = "local"
    model_dir: str | None = Field(None, description="local: a reference checkpoint directory.")
    version: str | None = Field(None, pattern=_NAME, description="local: a version of model_name.")
    target: str | None = Field(None, description="service: host:port or dns:/// target.")
    timeout_s: float = Field(60.0, gt=0, description="service: deadline of one LogProbs call.")
    batch_items: int = Field(64, ge=1, le=4096, description="Sequences per call / forward pass.")

    @model_validator(mode="after")
    def _check(self) -> "ReferenceSpec":
        if self.source == "service":
            if not self.target:
                raise ValueError("target is required when source is 'service'")
            if self.model_dir is not None or self.version is not None:
                raise ValueError("model_dir / version are for source 'local' only")
        elif self.target is not None:
            raise ValueError("target is for source 'service' only")
        elif self.model_dir is not None and self.version is not None:
            raise ValueError("set model_dir or version, not both")
        return self


class DPOJob(_Spec):
    """Direct preference optimisation of a policy on preference pairs (no reward model, no RL
    loop). With h = (log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l)) the loss is
    −log σ(βh) for `sigmoid` (see rlhf.trainer.losses for the others)."""

    type: Literal["dpo"] = "dpo"
    job_id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=_NAME)
    model_name: str = Field(pattern=_NAME, description="Policy model (store + registry) to "
                            "publish to.")
    base_dir: str | None = Field(None, description="Start from this HF directory (a first "
                                 "version); unset: from base_version of model_name.")
    base_version: str | None = Field(None, pattern=_NAME, description="Start from this version "
                                     "of model_name; unset (and no base_dir): its active version.")
    source: Annotated[Union[DPOStreamSource, JsonlSource], Field(discriminator="type")]
    min_pairs: int = Field(1, ge=1, description="Fewer usable pairs than this: the job fails.")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Held-out share of payloads.")
    # loss
    loss_type: DPOLossType = "sigmoid"
    beta: float = Field(0.1, gt=0, description="β: strength of the implicit KL constraint.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε: conservative DPO.")
    simpo_gamma: float = Field(0.5, ge=0, description="γ: SimPO's target reward margin.")
    rpo_alpha: float = Field(0.0, ge=0, description="Weight of RPO's NLL term on y_w.")
    reference: ReferenceSpec = Field(default_factory=ReferenceSpec)
    # optimisation
    epochs: int = Field(1, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps (overrides epochs).")
    batch_size: int = Field(8, ge=1, le=4096, description="Pairs per micro-batch.")
    grad_accum_steps: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(1e-6, gt=0, le=1)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    lr_schedule: Literal["constant", "linear"] = Field("constant", description="After warm-up.")
    max_length: int = Field(512, ge=2, description="Tokens per row (prompt + response; longer "
                            "rows keep their first max_length tokens; a prompt that fills it "
                            "drops the pair).")
    append_eos: bool = Field(True, description="End plain-text responses with the eos token.")
    seed: int = 0
    activate: bool = Field(False, description="Make the new version the active one.")
    min_eval_accuracy: float | None = Field(None, ge=0, le=1, description="Activate only when "
                                            "held-out implicit-reward accuracy reaches this.")

    @model_validator(mode="after")
    def _check(self) -> "DPOJob":
        if self.base_dir is not None and self.base_version is not None:
            raise ValueError("set base_dir or base_version, not both")
        if self.min_eval_accuracy is not None and self.eval_fraction == 0:
            raise ValueError("min_eval_accuracy needs a held-out split (eval_fraction > 0)")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "reference_free"):
            raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' or "
                             f"'reference_free', not {self.loss_type!r}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError("adam_betas must both lie in [0, 1)")
        return self

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE_LOSSES


def check_dpo_submit(spec: "DPOJob", client: redis.Redis) -> None:
    """Submit-time checks beyond the spec and the registry (submit where the worker's files are
    visible: a shared volume): a `base_dir` must be a safe checkpoint directory; a JSONL file
    must exist and hold at least `min_pairs` usable pairs; a stream must not be empty unless the
    job waits for entries (`block_ms` > 0)."""
    if spec.base_dir is not None:
        from rlhf.models.loading import check_safe_dir

        try:
            check_safe_dir(spec.base_dir)
        except ValueError as exc:
            raise JobRejected(f"job spec rejected:\n  base_dir: {exc}") from None
    if spec.source.type == "jsonl":
        from rlhf.trainer.data import DataError, read_jsonl

        try:
            n = len(read_jsonl(spec.source.path))
        except DataError as exc:
            raise JobRejected(f"job spec rejected:\n  source.path: {exc}") from None
        if n < spec.min_pairs:
            raise JobRejected(f"job spec rejected:\n  source.path: {spec.source.path} holds {n} "
                              f"preference pairs; the job needs at least {spec.min_pairs}")
    elif not spec.source.block_ms and not client.xlen(spec.source.stream):
        raise JobRejected(f"job spec rejected:\n  source.stream: {spec.source.stream!r} is empty "
                          "(push pairs first, or set source.block_ms to wait for them)")


# -------------------------------------------------------------------------------------------------

JOB_TYPES: dict[str, type[_Spec]] = {"reward_model": RewardModelJob, "dpo": DPOJob}
JobSpec = Union[RewardModelJob, DPOJob]  # the union of JOB_TYPES' values


def parse_spec(data: dict[str, Any] | _Spec) -> JobSpec:
    """A validated spec, or `JobRejected` with one line per problem."""
    if isinstance(data, _Spec):
        return data
    if not isinstance(data, dict):
        raise JobRejected(f"a job spec is a JSON object, got {type(data).__name__}")
    kind = data.get("type")
    cls = JOB_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise JobRejected(f"job spec rejected: type: must be one of {sorted(JOB_TYPES)}, got {kind!r}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "spec"
            lines.append(f"  {where}: {err['msg']}")
        raise JobRejected(f"{kind} job spec rejected:\n" + "\n".join(lines)) from None


def check_against_registry(spec: JobSpec, registry: Registry) -> None:
    """Checks that need Redis: the base version a job starts from exists."""
    if spec.base_dir is not None:
        return
    versions = registry.versions(spec.model_name)
    if spec.base_version is not None:
        if spec.base_version not in versions:
            raise JobRejected(f"job spec rejected:\n  base_version: model {spec.model_name!r} has "
                              f"no version {spec.base_version!r} (it has {versions or 'none'})")
    elif registry.active(spec.model_name) is None:
        raise JobRejected(f"job spec rejected:\n  base_dir: model {spec.model_name!r} has no active "
                          "version to start from; pass base_dir (a first version) or base_version")


# ---------------------------------------------------------------------------------------------
# Records and leases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    token: str
    record: JobRecord


@dataclass(frozen=True)
class Done:
    record: JobRecord


@dataclass(frozen=True)
class Busy:
    retry_in_s: float


# Renew: extend our lease; if it lapsed (a heartbeat starved on a loaded node) and nobody took
# it, take it back — only another holder's token means another attempt runs the job.
_RENEW = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
if not holder then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class JobStore:
    """Job records (`rlhf:job:<id>` hashes) and their leases. `client` decodes responses."""

    def __init__(self, client: redis.Redis, *, lease_s: float = 60.0, record_ttl_s: int = 30 * 86400):
        self.r = client
        self.lease_ms = max(1, int(lease_s * 1000))
        self.record_ttl_s = record_ttl_s
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @staticmethod
    def lease_key(job_id: str) -> str:
        return job_key(job_id) + ":lease"

    def get(self, job_id: str) -> JobRecord | None:
        return read_job(self.r, job_id)

    def create(self, spec: JobSpec, *, status: str = "queued") -> JobRecord:
        """Write a new record; `JobRejected` when the id is taken."""
        now = time.time()
        fields = {
            "id": spec.job_id, "type": spec.type, "status": status, "progress": "0",
            "metrics": "{}", "error": "", "version": "", "attempts": "0", "worker": "",
            "spec": spec.model_dump_json(), "created": f"{now:.6f}", "updated": f"{now:.6f}",
        }
        key = job_key(spec.job_id)
        if not self.r.hsetnx(key, "id", spec.job_id):
            raise JobRejected(f"job id {spec.job_id!r} already exists")
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key, mapping=fields)
        pipe.zadd(JOBS_INDEX, {spec.job_id: now})
        pipe.execute()
        return read_job(self.r, spec.job_id)

    def begin(self, spec: JobSpec, worker: str) -> Run | Done | Busy:
        """Decide whether this delivery runs the job (see the module docstring)."""
        rec = self.get(spec.job_id)
        if rec is None:  # sent without submit_job (e.g. `celery call`): record it now
            try:
                rec = self.create(spec)
            except JobRejected:
                rec = self.get(spec.job_id)
        if rec.status in TERMINAL_STATUSES:
            return Done(rec)
        token = uuid.uuid4().hex
        if not self.r.set(self.lease_key(spec.job_id), token, nx=True, px=self.lease_ms):
            ttl_ms = self.r.pttl(self.lease_key(spec.job_id))
            return Busy(max(ttl_ms, 100) / 1000.0)
        rec = self.get(spec.job_id)  # re-read under the lease: it may have finished meanwhile
        if rec.status in TERMINAL_STATUSES:
            self._release(keys=[self.lease_key(spec.job_id)], args=[token])
            return Done(rec)
        now = f"{time.time():.6f}"
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(job_key(spec.job_id), mapping={
            "status": "running", "worker": worker, "updated": now, "error": "",
            **({} if rec.started else {"started": now}),
        })
        pipe.hincrby(job_key(spec.job_id), "attempts", 1)
        pipe.execute()
        return Run(token, self.get(spec.job_id))

    def renew(self, job_id: str, token: str) -> bool:
        """Extend the lease (or retake it if it lapsed untaken); False when another holds it."""
        return bool(self._renew(keys=[self.lease_key(job_id)], args=[token, self.lease_ms]))

    def release(self, job_id: str, token: str) -> None:
        self._release(keys=[self.lease_key(job_id)], args=[token])

    def progress(self, job_id: str, progress: float, metrics: dict[str, Any] | None = None) -> None:
        fields = {"progress": f"{min(max(progress, 0.0), 1.0):.4f}", "updated": f"{time.time():.6f}"}
        if metrics is not None:
            fields["metrics"] = json.dumps(metrics, default=float)
        self.r.hset(job_key(job_id), mapping=fields)

    def _finish(self, job_id: str, token: str | None, fields: dict[str, str]) -> None:
        now = f"{time.time():.6f}"
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(job_key(job_id), mapping={**fields, "updated": now, "finished": now})
        pipe.expire(job_key(job_id), self.record_ttl_s)
        pipe.execute()
        if token is not None:  # terminal status first, then the lease (see begin)
            self.release(job_id, token)

    def succeed(self, job_id: str, token: str | None, *, version: str | None,
                metrics: dict[str, Any]) -> None:
        self._finish(job_id, token, {"status": "succeeded", "progress": "1", "error": "",
                                     "version": version or "",
                                     "metrics": json.dumps(metrics, default=float)})

    def fail(self, job_id: str, token: str | None, error: str) -> None:
        self._finish(job_id, token, {"status": "failed", "error": error[:4000]})

    def requeue(self, job_id: str, token: str | None, note: str) -> None:
        """Back to `queued` before a retry (the lease is released for the next attempt)."""
        self.r.hset(job_key(job_id), mapping={"status": "queued", "error": note[:4000],
                                             "updated": f"{time.time():.6f}"})
        if token is not None:
            self.release(job_id, token)


# ---------------------------------------------------------------------------------------------
# Submit
# ---------------------------------------------------------------------------------------------


def submit_job(data: dict[str, Any] | JobSpec, *, redis_url: str, client: redis.Redis | None = None) -> str:
    """Validate a spec, record the job and queue its Celery task; returns the job id.

    Raises `JobRejected` (nothing is queued) when the spec is invalid, names a base version
    that does not exist, or reuses a job id (a DPO job also when its data source is empty).
    """
    from rlhf.trainer.celery_app import TASK_FOR_JOB, sender

    spec = parse_spec(data)
    r = client or connect(redis_url, decode_responses=True)
    check_against_registry(spec, Registry(r))
    if isinstance(spec, DPOJob):  # DPO: an empty dataset is rejected here, not in the worker
        check_dpo_submit(spec, r)
    jobs = JobStore(r)
    jobs.create(spec)
    try:
        sender(redis_url).send_task(TASK_FOR_JOB[spec.type], args=[spec.model_dump(mode="json")],
                                    task_id=spec.job_id)
    except Exception as exc:
        jobs.fail(spec.job_id, None, f"could not queue the job: {exc}")
        raise
    return spec.job_id


# ---------------------------------------------------------------------------------------------
# Running a job (what a task calls; testable without Celery)
# ---------------------------------------------------------------------------------------------


class LeaseLost(RuntimeError):
    """This attempt no longer holds the job's lease: another attempt runs the job now."""


class TransientError(RuntimeError):
    """A failure worth retrying (the job is requeued while attempts remain)."""


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError, redis.TimeoutError, TransientError,
)


@dataclass(frozen=True)
class JobResult:
    """What a job function returns: the version it produced and its metrics."""

    version: str | None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What one delivery of a job did. `retry_in_s` set: the task must retry after that long."""

    status: Literal["succeeded", "failed", "skipped", "busy", "retry", "abandoned"]
    job_id: str
    version: str | None = None
    error: str | None = None
    retry_in_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class JobContext:
    """Handed to a job function: settings, Redis, progress reporting and the lease heartbeat."""

    def __init__(self, settings: "Settings", jobs: JobStore, job_id: str, token: str):
        self.settings = settings
        self.jobs = jobs
        self.job_id = job_id
        self.token = token
        self.redis_text = jobs.r
        self._redis_bytes: redis.Redis | None = None
        self.lost = threading.Event()
        self._beats: list[Callable[[], object]] = []
        self._last_progress = 0.0

    @property
    def redis_bytes(self) -> redis.Redis:
        """A client that returns bytes (stream payloads are binary)."""
        if self._redis_bytes is None:
            self._redis_bytes = connect(self.settings.redis_url.get_secret_value())
        return self._redis_bytes

    def on_heartbeat(self, fn: Callable[[], object]) -> None:
        """Also run `fn` on every heartbeat (e.g. touch the stream entries being trained on)."""
        self._beats.append(fn)

    def check(self) -> None:
        """Raise `LeaseLost` when the heartbeat found the lease gone (call between steps)."""
        if self.lost.is_set():
            raise LeaseLost(f"job {self.job_id}: lease lost; another attempt owns the job")

    def confirm_lease(self) -> None:
        """Renew the lease now and raise `LeaseLost` if another attempt holds it: call right
        before a commit (publishing a version), not trusting the last heartbeat."""
        if not self.jobs.renew(self.job_id, self.token):
            self.lost.set()
        self.check()

    def progress(self, fraction: float, metrics: dict[str, Any] | None = None, *,
                 force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_progress >= 0.5:
            self._last_progress = now
            self.jobs.progress(self.job_id, fraction, metrics)

    def beat(self) -> None:
        if not self.jobs.renew(self.job_id, self.token):
            self.lost.set()
            return
        for fn in self._beats:
            fn()

    @contextlib.contextmanager
    def heartbeat(self) -> Iterator[None]:
        stop = threading.Event()
        period = self.jobs.lease_ms / 3000.0

        def loop() -> None:
            while not stop.wait(period):
                try:
                    self.beat()
                except Exception:  # noqa: BLE001 - a missed beat is retried next period
                    log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)

        thread = threading.Thread(target=loop, name=f"heartbeat-{self.job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
            if self._redis_bytes is not None:
                self._redis_bytes.close()


def execute(spec: JobSpec, work: Callable[[JobSpec, JobContext], JobResult], *,
            settings: "Settings", worker: str) -> Outcome:
    """Run one delivery of a job: guard by job id, run `work` under a lease, record the result."""
    r = connect(settings.redis_url.get_secret_value(), decode_responses=True)
    try:
        jobs = JobStore(r, lease_s=settings.job_lease_s, record_ttl_s=settings.job_record_ttl_s)
        decision = jobs.begin(spec, worker)
        if isinstance(decision, Done):
            log.info("job %s is already %s: not run again", spec.job_id, decision.record.status)
            return Outcome("skipped", spec.job_id, version=decision.record.version)
        if isinstance(decision, Busy):
            log.info("job %s runs elsewhere (lease held): retry in %.1fs", spec.job_id,
                     decision.retry_in_s)
            return Outcome("busy", spec.job_id, retry_in_s=decision.retry_in_s)
        token, attempt = decision.token, decision.record.attempts
        if attempt > settings.job_max_retries + 1:
            error = f"gave up: {attempt - 1} attempts did not finish (job_max_retries " \
                    f"{settings.job_max_retries})"
            jobs.fail(spec.job_id, token, error)
            return Outcome("failed", spec.job_id, error=error)
        log.info("job %s (%s): attempt %d on %s", spec.job_id, spec.type, attempt, worker)
        ctx = JobContext(settings, jobs, spec.job_id, token)
        try:
            with ctx.heartbeat():
                result = work(spec, ctx)
        except LeaseLost as exc:
            log.warning("%s", exc)
            return Outcome("abandoned", spec.job_id, error=str(exc))
        except TRANSIENT_ERRORS as exc:
            error = f"{type(exc).__name__}: {exc}"
            if attempt <= settings.job_max_retries:
                delay = float(min(60, 2 ** attempt))
                jobs.requeue(spec.job_id, token, f"attempt {attempt} failed ({error}); retrying")
                log.warning("job %s: attempt %d failed (%s); retry in %.0fs", spec.job_id,
                            attempt, error, delay)
                return Outcome("retry", spec.job_id, error=error, retry_in_s=delay)
            jobs.fail(spec.job_id, token, error)
            return Outcome("failed", spec.job_id, error=error)
        except Exception as exc:  # noqa: BLE001 - recorded on the job; the worker lives on
            error = f"{type(exc).__name__}: {exc}"
            log.exception("job %s failed", spec.job_id)
            jobs.fail(spec.job_id, token, error)
            return Outcome("failed", spec.job_id, error=error)
        jobs.succeed(spec.job_id, token, version=result.version, metrics=result.metrics)
        log.info("job %s succeeded: version %s", spec.job_id, result.version)
        return Outcome("succeeded", spec.job_id, version=result.version)
    finally:
        r.close()

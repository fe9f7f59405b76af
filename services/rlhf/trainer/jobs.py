"""Job records and leases in Redis, and running a job (the specs, typed and validated at submit
and again in the task, live in `rlhf_client.jobspecs` and are re-exported here).

A job's life: `submit_job` (`rlhf_client.training`, what `TrainingClient.submit` runs: the
base install submits) validates the spec, writes the record (status `queued`, the spec
snapshotted into it) and sends the Celery message (task id = job id). The task calls
`JobStore.begin`, which decides whether this delivery runs:

- the record is terminal (`succeeded` / `failed` / `cancelled`) → `Done`: a completed job
  never runs again;
- another live worker holds the job's lease         → `Busy`: this copy retries later;
- otherwise                                         → `Run`: lease taken, status `running`,
  `attempts` + 1. A job whose earlier attempt died mid-run restarts cleanly from its own
  pending stream entries (see queues.py); a version that attempt already published is found
  in the store by job id and finished off, not trained again (see reward_model.py).

The lease (`rlhf:job:<id>:lease`, a random token with a TTL of `job_lease_s`) is renewed by the
running attempt's heartbeat. The order "write terminal status, then release the lease" and
"take the lease, then re-read the status" means two deliveries can never both run a job. A
terminal status (or `queued` before a retry) is written only by the lease's holder, or while
nobody holds it: an attempt that lost its lease never overwrites the attempt that took it;
and a terminal status is final.

Cancel (`rlhf_client.training.cancel_job`): a job nobody holds the lease of is `cancelled` at
once (its message, when delivered, is `Done`); a running one gets `cancel_requested`, which its
attempt sees at its next heartbeat (a third of the lease) or in `confirm_lease` before
publishing: `check()` then raises `CancelRequested` and the attempt records `cancelled`, its
stream entries left pending (unacked) for another job. Once `confirm_lease` passed, the version
is published and the job finishes `succeeded`, flag or not.

Redis going away (a restart, a failover) loses nothing: a running job keeps training through it
(progress writes are skipped, the heartbeat retakes a lapsed lease when Redis is back unless
another attempt took it meanwhile), and every step that needs Redis waits for it with a capped
backoff for up to `job_redis_wait_s` (`until_redis`). A read or commit step cut by an outage is
run again from the job's last commit (its own pending stream entries, its published version).
No path ends a delivery with its Celery message dropped: past the wait, the task hands the
message back (reject with requeue; if even that cannot reach Redis, the message stays in
kombu's unacked hash). The reaper (reaper.py) re-queues a job whose message was lost anyway.
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
from typing import TYPE_CHECKING, Any, Literal

import redis

# The job specs and their validation live with the client (the base install submits jobs);
# re-exported here for the trainer.
from rlhf_client.jobspecs import (  # noqa: F401 - re-exported
    GROUP_ESTIMATORS,
    JOB_TYPES,
    LOOP_OWNED_BY_TRAINER,
    LOOP_OWNED_FIELDS,
    MAX_LOOP_ID_CHARS,
    QUEUE_FOR_TASK,
    REFERENCE_FREE_LOSSES,
    TASK_FOR_JOB,
    AdvantageEstimator,
    CriticSpec,
    DPOJob,
    DPOLossType,
    DPOStreamSource,
    JobRejected,
    JobSpec,
    JsonlSource,
    KLEstimator,
    LabellerSpec,
    LoopHeldOut,
    LoopHuman,
    LoopJob,
    LoopPairs,
    LoopSampling,
    LoopStop,
    LoopTrainer,
    LossAggregation,
    PPOJob,
    PromptsSpec,
    ReferenceSpec,
    RewardModelJob,
    SamplesStreamSource,
    SFTJob,
    SFTStreamSource,
    SpecProblems,
    StreamSource,
    check_against_registry,
    check_dpo_submit,
    check_loop_submit,
    check_ppo_submit,
    check_reward_model_submit,
    check_sft_submit,
    check_submit,
    example_spec,
    job_schema,
    loop_child_id,
    loop_stream,
    parse_spec,
    validation_problems,
)
from rlhf_client.redis_conn import connect
from rlhf_client.training import (
    TERMINAL_STATUSES,
    JobRecord,
    cancel_job,
    create_record,
    job_key,
    lease_key,
    read_job,
)

from rlhf.trainer.faults import fault_point

if TYPE_CHECKING:
    from rlhf.config import Settings

log = logging.getLogger(__name__)


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
# it, take it back — only another holder's token means another attempt runs the job, and a
# record finished meanwhile (cancelled while the lease was free) is not taken back.
# KEYS: lease, record.
_RENEW = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
if not holder then
  local status = redis.call('hget', KEYS[2], 'status')
  if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
    return 0
  end
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
# Mark an attempt running: attempts + 1 once per attempt token (a begin retried after its reply
# was lost counts once).
_MARK_RUNNING = """
if redis.call('hget', KEYS[1], 'attempt_token') ~= ARGV[1] then
  redis.call('hincrby', KEYS[1], 'attempts', 1)
  redis.call('hset', KEYS[1], 'attempt_token', ARGV[1])
end
if not redis.call('hget', KEYS[1], 'started') then
  redis.call('hset', KEYS[1], 'started', ARGV[3])
end
redis.call('hset', KEYS[1], 'status', 'running', 'worker', ARGV[2], 'updated', ARGV[3], 'error', '')
return 1
"""
# Write fields (a terminal status, or `queued` before a retry) only while this attempt holds the
# lease or nobody does; then release it (terminal status first, then the lease: see begin).
# A terminal status is final: a record already finished (e.g. cancelled while nobody held the
# lease) is left alone — unless it already has the status written (a retried write).
# ARGV: token ('' = none), record TTL in s ('' = keep), release (1/0), new status, then
# field/value pairs.
_SETTLE = """
local holder = redis.call('get', KEYS[2])
if holder and holder ~= ARGV[1] then
  return 0
end
local status = redis.call('hget', KEYS[1], 'status')
if (status == 'succeeded' or status == 'failed' or status == 'cancelled') and status ~= ARGV[4] then
  if holder then
    redis.call('del', KEYS[2])
  end
  return 0
end
redis.call('hset', KEYS[1], unpack(ARGV, 5))
if ARGV[2] ~= '' then
  redis.call('expire', KEYS[1], ARGV[2])
end
if holder and ARGV[3] == '1' then
  redis.call('del', KEYS[2])
end
return 1
"""


class JobStore:
    """Job records (`rlhf:job:<id>` hashes) and their leases. `client` decodes responses."""

    def __init__(self, client: redis.Redis, *, lease_s: float = 60.0, record_ttl_s: int = 30 * 86400):
        self.r = client
        self.lease_ms = max(1, int(lease_s * 1000))
        self.record_ttl_s = record_ttl_s
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._mark_running = client.register_script(_MARK_RUNNING)
        self._settle = client.register_script(_SETTLE)

    @staticmethod
    def lease_key(job_id: str) -> str:
        return lease_key(job_id)

    def get(self, job_id: str) -> JobRecord | None:
        return read_job(self.r, job_id)

    def create(self, spec: JobSpec, *, status: str = "queued") -> JobRecord:
        """Write a new record; `JobRejected` when the id is taken (`rlhf_client.training`'s
        `create_record`, what submit writes)."""
        return create_record(self.r, spec, status=status)

    def begin(self, spec: JobSpec, worker: str, *, token: str | None = None) -> Run | Done | Busy:
        """Decide whether this delivery runs the job (see the module docstring).

        Safe to call again with the same `token` when a reply was lost (Redis went away): a
        lease already held by `token` is this delivery's, and the attempt is counted once.
        """
        rec = self.get(spec.job_id)
        if rec is None:  # sent without submit_job (e.g. `celery call`): record it now
            try:
                rec = self.create(spec)
            except JobRejected:
                rec = self.get(spec.job_id)
        if rec.status in TERMINAL_STATUSES:
            return Done(rec)
        token = token or uuid.uuid4().hex
        lease = self.lease_key(spec.job_id)
        if not self.r.set(lease, token, nx=True, px=self.lease_ms) and self.r.get(lease) != token:
            ttl_ms = self.r.pttl(lease)
            return Busy(max(ttl_ms, 100) / 1000.0)
        rec = self.get(spec.job_id)  # re-read under the lease: it may have finished meanwhile
        if rec.status in TERMINAL_STATUSES:
            self._release(keys=[lease], args=[token])
            return Done(rec)
        self._mark_running(keys=[job_key(spec.job_id)], args=[token, worker, f"{time.time():.6f}"])
        return Run(token, self.get(spec.job_id))

    def renew(self, job_id: str, token: str) -> bool:
        """Extend the lease (or retake it if it lapsed untaken and the job is not finished);
        False when another holds it, or the job was finished (cancelled) while it was free."""
        return bool(self._renew(keys=[self.lease_key(job_id), job_key(job_id)],
                                args=[token, self.lease_ms]))

    def cancel_requested(self, job_id: str) -> bool:
        """Whether someone asked to cancel the job (`TrainingClient.cancel` of a running job)."""
        return bool(self.r.hexists(job_key(job_id), "cancel_requested"))

    def request_cancel(self, job_id: str) -> str:
        """Cancel a job as `TrainingClient.cancel` does; the outcome (`cancelled`, `requested`,
        `finished`, `missing`: see `rlhf_client.training.cancel_job`)."""
        return cancel_job(self.r, job_id, record_ttl_s=self.record_ttl_s)[0]

    def release(self, job_id: str, token: str) -> None:
        self._release(keys=[self.lease_key(job_id)], args=[token])

    def progress(self, job_id: str, progress: float, metrics: dict[str, Any] | None = None) -> None:
        fields = {"progress": f"{min(max(progress, 0.0), 1.0):.4f}", "updated": f"{time.time():.6f}"}
        if metrics is not None:
            fields["metrics"] = json.dumps(metrics, default=float)
        self.r.hset(job_key(job_id), mapping=fields)

    def _finish(self, job_id: str, token: str | None, fields: dict[str, str]) -> bool:
        now = f"{time.time():.6f}"
        return self._write(job_id, token, {**fields, "updated": now, "finished": now},
                           ttl_s=self.record_ttl_s)

    def _write(self, job_id: str, token: str | None, fields: dict[str, str], *,
               ttl_s: int | None) -> bool:
        """Write `fields` and release the lease, unless another attempt holds it (False)."""
        args = [token or "", "" if ttl_s is None else str(ttl_s), "1", fields.get("status", "")]
        for k, v in fields.items():
            args += [k, v]
        return bool(self._settle(keys=[job_key(job_id), self.lease_key(job_id)], args=args))

    def succeed(self, job_id: str, token: str | None, *, version: str | None,
                metrics: dict[str, Any]) -> bool:
        """Record success; False (nothing written) when another attempt holds the lease."""
        return self._finish(job_id, token, {"status": "succeeded", "progress": "1", "error": "",
                                            "version": version or "",
                                            "metrics": json.dumps(metrics, default=float)})

    def fail(self, job_id: str, token: str | None, error: str) -> bool:
        """Record failure; False (nothing written) when another attempt holds the lease. The
        running attempt's progress and metrics (stage "training", a step) are cleared: the
        record must not claim a job still training; its history rows keep what it reached."""
        return self._finish(job_id, token, {"status": "failed", "error": error[:4000],
                                            "progress": "0", "metrics": "{}"})

    def cancelled(self, job_id: str, token: str | None, note: str) -> bool:
        """Record that the job stopped on a cancel request (nothing published); False (nothing
        written) when another attempt holds the lease."""
        return self._finish(job_id, token, {"status": "cancelled", "error": note[:4000]})

    def requeue(self, job_id: str, token: str | None, note: str) -> bool:
        """Back to `queued` before a retry (the lease is released for the next attempt);
        False (nothing written) when another attempt holds the lease."""
        return self._write(job_id, token, {"status": "queued", "error": note[:4000],
                                           "updated": f"{time.time():.6f}"}, ttl_s=None)


# ---------------------------------------------------------------------------------------------
# Running a job (what a task calls; testable without Celery)
# ---------------------------------------------------------------------------------------------


class LeaseLost(RuntimeError):
    """This attempt no longer holds the job's lease: another attempt runs the job now."""


class CancelRequested(RuntimeError):
    """Someone cancelled the job (`TrainingClient.cancel`): the attempt stops before publishing
    and the job ends `cancelled`."""


class TransientError(RuntimeError):
    """A failure worth retrying (the job is requeued while attempts remain)."""


#: Redis unreachable or not answering: what a running job waits out (a Redis still loading its
#: append-only file answers LOADING, `BusyLoadingError`, a `ConnectionError`).
REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (*REDIS_ERRORS, TransientError)


class RedisGone(RuntimeError):
    """Redis stayed unreachable longer than a job waits for it (`job_redis_wait_s`)."""


def until_redis(fn: Callable[[], Any], *, patience_s: float, what: str, job_id: str,
                cap_s: float = 10.0) -> Any:
    """`fn()`, run again while Redis is unreachable: waits 0.2 s doubling up to `cap_s` between
    tries, `patience_s` in all, then raises `RedisGone`. `fn` must be safe to run twice (its
    reply may be what was lost)."""
    start = time.monotonic()
    delay, failures = 0.2, 0
    while True:
        try:
            value = fn()
        except REDIS_ERRORS as exc:
            waited = time.monotonic() - start
            if waited >= patience_s:
                raise RedisGone(f"Redis unreachable for {waited:.0f}s (to {what}): "
                                f"{type(exc).__name__}: {exc}") from exc
            if failures == 0:
                log.warning("job %s: Redis unreachable (%s: %s); waiting up to %.0fs to %s",
                            job_id, type(exc).__name__, exc, patience_s, what)
            failures += 1
            time.sleep(min(delay, patience_s - waited))
            delay = min(delay * 2, cap_s)
            continue
        if failures:
            log.warning("job %s: Redis is back after %.1fs; going on to %s", job_id,
                        time.monotonic() - start, what)
        return value


@dataclass(frozen=True)
class JobResult:
    """What a job function returns: the version it produced and its metrics."""

    version: str | None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What one delivery of a job did. `retry_in_s` set: the task must retry after that long.
    `interrupted`: Redis stayed away past `job_redis_wait_s`; the task gives its message back.
    `cancelled`: the job stopped on a cancel request, nothing published."""

    status: Literal["succeeded", "failed", "cancelled", "skipped", "busy", "retry", "abandoned",
                    "interrupted"]
    job_id: str
    version: str | None = None
    error: str | None = None
    retry_in_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


#: Progress writes that fail (Redis away) pause this long before the next try: training is not
#: slowed down by connect timeouts.
_PROGRESS_PAUSE_S = 5.0


class JobContext:
    """Handed to a job function: settings, Redis, progress reporting and the lease heartbeat.

    A job function runs inside its attempt's own temp directory (workdirs.attempt_dir makes it
    the process's temp dir): its temp files and checkpoints go there, and the directory is removed
    when the attempt ends or, if its process died, by whoever cleans up next.
    """

    def __init__(self, settings: "Settings", jobs: JobStore, job_id: str, token: str, *,
                 spec: "JobSpec | None" = None, attempt: int = 1):
        from rlhf.trainer.tracking import JobTracker

        self.settings = settings
        self.jobs = jobs
        self.job_id = job_id
        self.token = token
        self.spec = spec
        self.attempt = attempt
        self.redis_text = jobs.r
        #: The job's history rows and report_to (rlhf.trainer.tracking).
        self.tracker = JobTracker(settings, jobs.r, job_id, spec=spec, attempt=attempt)
        self._redis_bytes: redis.Redis | None = None
        self.lost = threading.Event()
        self.cancel_seen = threading.Event()  # a cancel request: `check` raises CancelRequested
        self._beats: list[Callable[[], object]] = []
        self._last_progress = 0.0
        self._progress_paused_until = 0.0
        self._beat_failing = False

    @property
    def redis_bytes(self) -> redis.Redis:
        """A client that returns bytes (stream payloads are binary)."""
        if self._redis_bytes is None:
            self._redis_bytes = connect(self.settings.redis_url.get_secret_value())
        return self._redis_bytes

    def redis(self, fn: Callable[[], Any], what: str) -> Any:
        """`fn()` (idempotent Redis work), waiting for Redis through an outage (`until_redis`)."""
        return until_redis(fn, patience_s=self.settings.job_redis_wait_s, what=what,
                           job_id=self.job_id)

    def on_heartbeat(self, fn: Callable[[], object]) -> None:
        """Also run `fn` on every heartbeat (e.g. touch the stream entries being trained on)."""
        self._beats.append(fn)

    def check(self) -> None:
        """Raise `LeaseLost` when the heartbeat found the lease gone, `CancelRequested` when it
        found the job cancelled (call between steps)."""
        if self.lost.is_set():
            raise LeaseLost(f"job {self.job_id}: lease lost; another attempt owns the job")
        if self.cancel_seen.is_set():
            raise CancelRequested(f"job {self.job_id}: cancelled by request")

    def confirm_lease(self) -> None:
        """Renew the lease now and raise `LeaseLost` if another attempt holds it, or
        `CancelRequested` if the job was cancelled: call right before a commit (publishing a
        version), not trusting the last heartbeat. Past this point a cancel request no longer
        stops the job (it finishes `succeeded`). Waits for Redis through an outage."""
        if not self.redis(lambda: self.jobs.renew(self.job_id, self.token),
                          "confirm the lease before publishing"):
            self.lost.set()
        elif self.redis(lambda: self.jobs.cancel_requested(self.job_id),
                        "look for a cancel request before publishing"):
            self.cancel_seen.set()
        self.check()

    def progress(self, fraction: float, metrics: dict[str, Any] | None = None, *,
                 force: bool = False) -> None:
        """Record progress: every call's metrics are a row of the job's history (tracking.py);
        the record and the buffered rows are written at most every 0.5 s unless `force`. Best
        effort: with Redis away the write is skipped (the rows stay buffered) and training goes
        on."""
        self.tracker.record(metrics)
        if metrics and metrics.get("step") == 1:  # tests/chaos: inert unless asked
            fault_point("training", str(getattr(self.spec, "model_name", "")))
        now = time.monotonic()
        if not (force or now - self._last_progress >= 0.5) or now < self._progress_paused_until:
            return
        self._last_progress = now
        try:
            self.tracker.flush()
            self.jobs.progress(self.job_id, fraction, metrics)
        except REDIS_ERRORS as exc:
            self._progress_paused_until = time.monotonic() + _PROGRESS_PAUSE_S
            log.warning("job %s: progress not recorded (Redis unreachable: %s); training goes on",
                        self.job_id, exc)

    def beat(self) -> None:
        if not self.jobs.renew(self.job_id, self.token):
            self.lost.set()
            return
        if not self.cancel_seen.is_set() and self.jobs.cancel_requested(self.job_id):
            log.info("job %s: cancel requested; stopping at the next step", self.job_id)
            self.cancel_seen.set()
        for fn in self._beats:
            fn()

    def reset(self) -> None:
        """Before running the job function again in this attempt: forget its heartbeat hooks."""
        self._beats.clear()
        self._progress_paused_until = 0.0

    @contextlib.contextmanager
    def heartbeat(self) -> Iterator[None]:
        stop = threading.Event()
        period = self.jobs.lease_ms / 3000.0

        def loop() -> None:
            while not stop.wait(period):
                try:
                    self.beat()
                except REDIS_ERRORS as exc:  # an outage: the lease is retaken once Redis is back
                    if not self._beat_failing:
                        log.warning("job %s: heartbeat failed (Redis unreachable: %s); training "
                                    "goes on", self.job_id, exc)
                    self._beat_failing = True
                    continue
                except Exception:  # noqa: BLE001 - a missed beat is retried next period
                    log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)
                    continue
                if self._beat_failing:
                    self._beat_failing = False
                    log.warning("job %s: heartbeat: Redis is back; lease %s", self.job_id,
                                "lost to another attempt" if self.lost.is_set() else "held")

        self.tracker.start()  # report_to: a reporter this worker lacks fails the job here
        thread = threading.Thread(target=loop, name=f"heartbeat-{self.job_id}", daemon=True)
        thread.start()
        ended: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            ended = exc
            raise
        finally:
            stop.set()
            thread.join(timeout=5)
            self.tracker.stop(ended)  # the last history rows; reporters' runs ended
            if self._redis_bytes is not None:
                self._redis_bytes.close()
                self._redis_bytes = None


#: How often one attempt runs its job function again after Redis went away mid-step.
_MAX_RERUNS = 10


def execute(spec: JobSpec, work: Callable[[JobSpec, JobContext], JobResult], *,
            settings: "Settings", worker: str) -> Outcome:
    """Run one delivery of a job: guard by job id, run `work` under a lease, record the result.

    Every Redis step waits for Redis through an outage (`until_redis`); an outage longer than
    `job_redis_wait_s` ends the delivery `interrupted` (the task gives its message back).
    """
    from rlhf.trainer.workdirs import attempt_dir

    r = connect(settings.redis_url.get_secret_value(), decode_responses=True)

    def wait(fn: Callable[[], Any], what: str) -> Any:
        return until_redis(fn, patience_s=settings.job_redis_wait_s, what=what, job_id=spec.job_id)

    try:
        jobs = JobStore(r, lease_s=settings.job_lease_s, record_ttl_s=settings.job_record_ttl_s)
        token = uuid.uuid4().hex  # one per delivery: begin may run twice (a lost reply)
        decision = wait(lambda: jobs.begin(spec, worker, token=token), "start the job")
        if isinstance(decision, Done):
            log.info("job %s is already %s: not run again", spec.job_id, decision.record.status)
            return Outcome("skipped", spec.job_id, version=decision.record.version)
        if isinstance(decision, Busy):
            log.info("job %s runs elsewhere (lease held): retry in %.1fs", spec.job_id,
                     decision.retry_in_s)
            return Outcome("busy", spec.job_id, retry_in_s=decision.retry_in_s)
        attempt = decision.record.attempts
        if attempt > settings.job_max_retries + 1:
            error = f"gave up: {attempt - 1} attempts did not finish (job_max_retries " \
                    f"{settings.job_max_retries})"
            wait(lambda: jobs.fail(spec.job_id, token, error), "record the job as failed")
            return Outcome("failed", spec.job_id, error=error)
        log.info("job %s (%s): attempt %d on %s", spec.job_id, spec.type, attempt, worker)
        with attempt_dir(settings, spec.job_id, attempt):
            ctx = JobContext(settings, jobs, spec.job_id, token, spec=spec, attempt=attempt)
            if decision.record.cancel_requested is not None:  # asked while it was starting
                ctx.cancel_seen.set()  # its first check stops it (unless it already published)
            return _run_attempt(spec, work, ctx, attempt)
    except RedisGone as exc:
        log.error("job %s: %s; giving its message back for redelivery", spec.job_id, exc)
        return Outcome("interrupted", spec.job_id, error=str(exc))
    finally:
        r.close()


def _run_attempt(spec: JobSpec, work: Callable[[JobSpec, JobContext], JobResult],
                 ctx: JobContext, attempt: int) -> Outcome:
    settings, jobs, job_id, token, wait = ctx.settings, ctx.jobs, ctx.job_id, ctx.token, ctx.redis

    def abandoned(why: str) -> Outcome:
        log.warning("job %s: %s", job_id, why)
        return Outcome("abandoned", job_id, error=why)

    def failed(error: str) -> Outcome:
        if not wait(lambda: jobs.fail(job_id, token, error), "record the job as failed"):
            return abandoned("lease lost to another attempt; its failure is not recorded")
        return Outcome("failed", job_id, error=error)

    reruns = 0
    while True:
        ctx.reset()
        try:
            with ctx.heartbeat():
                result = work(spec, ctx)
            break
        except LeaseLost as exc:
            return abandoned(str(exc))
        except CancelRequested:
            note = "cancelled by request while running: stopped before publishing"
            if not wait(lambda: jobs.cancelled(job_id, token, note), "record the cancel"):
                return abandoned("lease lost to another attempt; its cancel is not recorded")
            log.info("job %s cancelled: nothing published", job_id)
            return Outcome("cancelled", job_id, error=note)
        except REDIS_ERRORS as exc:  # Redis went away mid-step (a read, a commit)
            error = f"{type(exc).__name__}: {exc}"
            reruns += 1
            if reruns <= _MAX_RERUNS:
                log.warning("job %s: Redis went away mid-step (%s); running the job again from its "
                            "last commit once Redis is back", job_id, error)
                if not wait(lambda: jobs.renew(job_id, token), "retake the job's lease"):
                    return abandoned("lease lost to another attempt during a Redis outage")
                continue
        except RedisGone:
            raise
        except TransientError as exc:
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - recorded on the job; the worker lives on
            log.exception("job %s failed", job_id)
            return failed(f"{type(exc).__name__}: {exc}")
        # A transient failure: retried as a new attempt while attempts remain.
        if attempt > settings.job_max_retries:
            return failed(error)
        delay = float(min(60, 2 ** attempt))
        note = f"attempt {attempt} failed ({error}); retrying"
        if not wait(lambda: jobs.requeue(job_id, token, note), "requeue the job"):
            return abandoned("lease lost to another attempt; not requeued")
        log.warning("job %s: attempt %d failed (%s); retry in %.0fs", job_id, attempt, error, delay)
        return Outcome("retry", job_id, error=error, retry_in_s=delay)
    if not wait(lambda: jobs.succeed(job_id, token, version=result.version, metrics=result.metrics),
                "record the job's success"):
        return abandoned("lease lost to another attempt after publishing; it finishes the job")
    log.info("job %s succeeded: version %s", job_id, result.version)
    return Outcome("succeeded", job_id, version=result.version)

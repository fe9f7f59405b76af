"""The trainer's Celery app: job control over a Redis broker, JSON only.

    rlhf worker                                          # the pod's command (see trainer/cli.py)
    rlhf worker-probe [--ready]                          # the pod's probes (see health.py)

Configuration (from `Settings`, see `celery_config`):
- Redis broker = `redis_url` (TLS `rediss://` and Sentinel `redis+sentinel://` forms mapped to
  Celery's options by `broker_config`); JSON is the only serializer accepted for tasks, results and
  events (`accept_content=['json']`): a message in any other format is refused unread.
- `task_acks_late` + `task_reject_on_worker_lost`: a job is acked when it returns; a pool child
  killed mid-job puts its job back. `worker_prefetch_multiplier=1`: a worker holds only the job
  it runs. Redis has no real acks: a delivered job sits in kombu's `unacked` hash and goes back
  to its queue after `celery_visibility_timeout_s` (a whole worker SIGKILLed), so that timeout
  must exceed the longest job; the job lease (jobs.py) stops a copy redelivered while the first
  still runs.
- Queues are named for their work (`QUEUE_FOR_TASK`); tasks route by name. A loop
  (`rlhf.iterate`, queue `train.loop`) runs its rounds' training jobs in its own process, so it
  needs no second worker; it runs for hours: the visibility timeout must exceed the whole loop.
- Soft shutdown: `worker_soft_shutdown_timeout = worker_soft_shutdown_s`; `rlhf worker` maps
  SIGTERM to Celery's cold shutdown, so on SIGTERM a running job gets that long, then is
  cancelled and requeued (acks late), all within the pod's grace period.
- No result backend: the job record in Redis (jobs.py) is the result.
- A broker outage: the worker reconnects (forever on startup, `broker_connection_max_retries`
  after) and a running job trains on: `worker_cancel_long_running_tasks_on_connection_loss` is
  off (stated, since Celery means to turn it on by default), and the job waits Redis out itself
  (jobs.py). Its message stays in the unacked hash (or goes back to the queue when the worker
  can restore it) until the job's ack; the job's id guards against a second run.
- Probes: `ConsumerHeartbeat` marks the worker ready from Celery's event loop (health.py).
- Task events are on (JSON): Flower and `celery events` see every job's received / started /
  succeeded / failed events from the worker (docs/operations.md: events and Flower).

Settings are read once per process: `rlhf worker` passes its own (CLI flags included) through
`configure`; under the plain `celery` command they come from the environment on first use.
"""

from __future__ import annotations

import functools

from celery import Celery, bootsteps
from kombu import Exchange, Queue
from rlhf_client.jobspecs import (  # noqa: F401 - TASK_FOR_JOB re-exported
    QUEUE_FOR_TASK,
    TASK_FOR_JOB,
    TRAIN_EXCHANGE,
)
from rlhf_client.redis_conn import celery_broker, connect
from rlhf_client.training import send_job_message

from rlhf.config import Settings

QUEUES: tuple[str, ...] = tuple(sorted(set(QUEUE_FOR_TASK.values())))
# One direct exchange, each queue bound by its own name: a job reaches exactly its queue (queues
# declared without a key would all share the default key and every job would reach all of them).
EXCHANGE = Exchange(TRAIN_EXCHANGE, type="direct")


def task_queue(name: str) -> Queue:
    return Queue(name, EXCHANGE, routing_key=name)

_settings: Settings | None = None


def get_settings() -> Settings:
    """This process's settings (built from the environment if no entry point configured them)."""
    global _settings
    if _settings is None:
        _settings = Settings()
    return _settings


def _static_config() -> dict:
    """The parts of the configuration that never depend on settings."""
    return dict(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=[task_queue(q) for q in QUEUES],
        task_routes={task: {"queue": q, "exchange": EXCHANGE.name, "routing_key": q}
                     for task, q in QUEUE_FOR_TASK.items()},
        task_create_missing_queues=False,
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        # Task events (JSON, like everything else) for Flower and `celery events`: the worker
        # sends task-received / -started / -succeeded / -failed / -retried; a sender that goes
        # through Celery sends task-sent (rlhf_client's hand-written job message sends none).
        worker_send_task_events=True,
        task_send_sent_event=True,
    )


def _transport_options(visibility_timeout_s: float) -> dict:
    # kombu sweeps the unacked hash every interval × throttle seconds (default 10 × 10): keep the
    # sweep well inside the visibility timeout, so a dead worker's job comes back on time.
    return {
        "visibility_timeout": visibility_timeout_s,
        "unacked_restore_interval": max(1, min(10, int(visibility_timeout_s // 4))),
        "unacked_restore_throttle": 1,
    }


def broker_config(redis_url: str, visibility_timeout_s: float | None = None) -> dict:
    """broker_url, broker_transport_options and broker_use_ssl for a `redis_url` of any form
    `rlhf_client.redis_conn` takes: `rediss://…?ssl_ca_certs=…&ssl_cert_reqs=required` gives
    `broker_use_ssl` with those options (kombu alone would not verify the certificate), and
    `redis+sentinel://H1:P1,H2:P2/MASTER/DB` kombu's `sentinel://…;sentinel://…` broker with
    `master_name` in the transport options (`redis_conn.celery_broker`)."""
    url, options, use_ssl = celery_broker(redis_url)
    if visibility_timeout_s is not None:
        options = dict(_transport_options(visibility_timeout_s), **options)
    out = dict(broker_url=url, broker_transport_options=options)
    if use_ssl is not None:
        out["broker_use_ssl"] = use_ssl
    return out


def celery_config(settings: Settings) -> dict:
    """The full Celery configuration for `settings`."""
    return dict(
        _static_config(),
        **broker_config(settings.redis_url.get_secret_value(), settings.celery_visibility_timeout_s),
        worker_pool=settings.worker_pool,
        worker_concurrency=settings.worker_concurrency,
        worker_soft_shutdown_timeout=settings.worker_soft_shutdown_s,
        worker_enable_soft_shutdown_on_idle=False,
    )


class ConsumerHeartbeat(bootsteps.StartStopStep):
    """Readiness from Celery's event loop: while the consumer is started (connected, consuming)
    a timer on its loop beats the worker's heartbeat (health.py); stopped (a reconnect, a
    shutdown) it marks the worker not ready. Does nothing without a heartbeat file."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **kwargs)
        self.tref = None

    def start(self, parent) -> None:
        from rlhf.trainer.health import current

        beat = current()
        if beat is None:
            return
        beat.loop_beat()
        self.tref = parent.timer.call_repeatedly(beat.interval_s, beat.loop_beat)

    def stop(self, parent) -> None:
        from rlhf.trainer.health import current

        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        beat = current()
        if beat is not None:
            beat.not_ready()

    shutdown = stop


app = Celery("rlhf", include=["rlhf.trainer.tasks"], set_as_current=False)
app.add_defaults(lambda: celery_config(get_settings()))  # a promise: read on first use
app.steps["consumer"].add(ConsumerHeartbeat)


def configure(settings: Settings) -> Celery:
    """Use `settings` for this process's app (call before the app is used)."""
    global _settings
    _settings = settings
    if app.configured:
        app.conf.update(celery_config(settings))
    return app


@functools.lru_cache(maxsize=8)
def sender(redis_url: str) -> Celery:
    """An app that only sends messages to the broker at `redis_url` through Celery (tests compare
    `rlhf_client.celery_message` with it; jobs are sent by `send_job`)."""
    s = Celery("rlhf-sender", set_as_current=False)
    s.conf.update(_static_config(), **broker_config(redis_url))
    return s


def send_job(redis_url: str, job_type: str, spec: dict, job_id: str,
             headers: dict | None = None) -> None:
    """Queue a job's Celery message (task id = job id) on the broker at `redis_url`: the one way
    jobs are sent, with or without Celery installed (`rlhf_client.celery_message`)."""
    r = connect(redis_url)
    try:
        send_job_message(r, job_type, spec, job_id, headers)
    finally:
        r.close()

"""Prometheus metrics of every rlhf process (one registry per process, labelled by service)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

RPC_COUNT = Counter(
    "rlhf_rpc_total", "RPCs handled, by final status code.", ["service", "method", "code"]
)
RPC_LATENCY = Histogram(
    "rlhf_rpc_latency_seconds", "RPC latency, by final status code.", ["service", "method", "code"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "rlhf_batch_size", "Sequences per forward batch.", ["service"], buckets=_SIZE_BUCKETS
)
BATCH_QUEUE_WAIT = Histogram(
    "rlhf_batch_queue_wait_seconds", "Time a request waited before its batch started.", ["service"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SETTINGS = Gauge(
    "rlhf_batch_setting", "Micro-batcher settings in force.", ["service", "setting"]
)
GENERATED_TOKENS = Counter(
    "rlhf_generated_tokens_total", "Tokens generated (rate() gives tokens/s).", ["service"]
)
ACTIVE_MODEL = Gauge(
    "rlhf_active_model", "1 for the model version a service serves now.", ["service", "name", "version"]
)
MODEL_SWAPS = Counter(
    "rlhf_model_swaps_total", "Model version swaps, by result.", ["service", "result"]
)
MODEL_SWAP_PHASE = Histogram(
    "rlhf_model_swap_phase_seconds",
    "Time a successful swap spent per phase (event, verify, load, warm-up, probes, switch).",
    ["service", "phase"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
QUEUE_DEPTH = Gauge("rlhf_queue_depth", "Entries in a Redis stream.", ["stream"])
DEAD_LETTER_DEPTH = Gauge("rlhf_dead_letter_depth", "Entries in a dead-letter stream.", ["stream"])
REDIS_MEMORY_USED = Gauge(
    "rlhf_redis_memory_used_bytes",
    "Memory Redis uses (INFO memory: used_memory), as a trainer reads it.",
)
REDIS_MEMORY_MAX = Gauge(
    "rlhf_redis_maxmemory_bytes",
    "Redis' maxmemory (0: no limit). At the limit, with noeviction, every write fails.",
)
TRAIN_METRIC = Gauge(
    "rlhf_train_metric",
    "Latest training metric of a job (series of the most recent jobs only: TRAIN_METRIC_JOBS).",
    ["job_type", "job_id", "model", "metric"],
)
#: Jobs whose `rlhf_train_metric` series a process keeps. A job's series stay after it ends
#: (its last values: final loss, held-out accuracy) until newer jobs push it out: setting the
#: gauges of a job beyond this many removes every series of the least recently updated one, so
#: the gauge's cardinality stays bounded (jobs × their metrics) however many jobs a worker runs.
TRAIN_METRIC_JOBS = 10
_train_jobs: OrderedDict[str, None] = OrderedDict()  # job ids, least recently updated first
_train_lock = threading.Lock()


def set_active_model(service: str, name: str, version: str) -> None:
    """Mark (name, version) as the one active version of `service`."""
    for labels in list(ACTIVE_MODEL._metrics):  # noqa: SLF001 - clear the previous version
        if labels[0] == service:
            ACTIVE_MODEL.remove(*labels)
    ACTIVE_MODEL.labels(service, name, version).set(1)


def set_train_metrics(job_type: str, job_id: str, model: str, metrics: Mapping[str, Any]) -> None:
    """Set job `job_id`'s `rlhf_train_metric` series from the numeric values of `metrics`
    (booleans and everything else skipped); beyond `TRAIN_METRIC_JOBS` jobs, the least recently
    updated job's series are removed."""
    values = {k: v for k, v in metrics.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not values:
        return
    with _train_lock:
        _train_jobs[job_id] = None
        _train_jobs.move_to_end(job_id)
        for k, v in values.items():
            TRAIN_METRIC.labels(job_type, job_id, model or "", k).set(v)
        while len(_train_jobs) > TRAIN_METRIC_JOBS:
            _drop_train_job(_train_jobs.popitem(last=False)[0])


def keep_train_jobs(job_ids: Iterable[str]) -> None:
    """Remove the `rlhf_train_metric` series of every job not in `job_ids`."""
    keep = set(job_ids)
    with _train_lock:
        for job_id in [j for j in _train_jobs if j not in keep]:
            del _train_jobs[job_id]
            _drop_train_job(job_id)


def _drop_train_job(job_id: str) -> None:
    for labels in list(TRAIN_METRIC._metrics):  # noqa: SLF001 - the job's series, whatever metrics
        if labels[1] == job_id:
            TRAIN_METRIC.remove(*labels)


HTTP_COUNT = Counter(
    "rlhf_http_requests_total", "HTTP requests handled (the OpenAI-compatible front), by status.",
    ["service", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "rlhf_http_latency_seconds", "HTTP request latency (streams: until the last byte), by status.",
    ["service", "route", "status"], buckets=_LATENCY_BUCKETS,
)

# Rollout workers (rlhf.trainer.rollout)
ROLLOUT_PROMPTS = Counter(
    "rlhf_rollout_prompts_total",
    "Prompts rollout workers handled, by result: done (group pushed), failed (an attempt; "
    "retried), duplicate (answered before), dead_lettered.",
    ["result"],
)
ROLLOUT_SAMPLES = Counter("rlhf_rollout_samples_total", "ScoredSamples rollout workers pushed.")
ROLLOUT_STALE = Counter(
    "rlhf_rollout_stale_samples_total",
    "Samples rollout workers discarded: made by a policy version that was no longer active.",
)
ROLLOUT_IN_FLIGHT = Gauge("rlhf_rollout_in_flight_batches", "Batches a rollout worker is working on.")
ROLLOUT_BATCH_SECONDS = Histogram(
    "rlhf_rollout_batch_seconds", "Time from reading a batch of prompts to pushing its samples.",
    buckets=_LATENCY_BUCKETS,
)

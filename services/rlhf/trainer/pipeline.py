"""The frame every training job shares, around its own training step:

    read items (stream or JSONL) → [train] → publish the version → commit the stream entries →
    activate when asked

What a job reads is described by a `Reader`: which payloads its stream consumer accepts (the
rest are dead-lettered), how a payload becomes items (a ranking → its pairs; a ScoredSample →
one sample), how a JSONL file is read, the spec's minimum count and the train / held-out split.
`PREFERENCES` is the reward-model and DPO jobs' reader; the PPO job's is `ppo.SAMPLES`.

Safe to run again after a crash: a version the job already published is finished, not trained
again (`read_inputs` returns its result), and stream entries are acked only after the publish.

Redis may go away at any point (jobs.py): the read is simply run again by `execute` (the job's
own pending entries come back first), and every Redis step of publish and finish waits for
Redis (`ctx.redis`) and is idempotent, so a published version is never trained again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_client.registry import Registry

from rlhf.models.adapters import is_adapter_dir, publish_adapter
from rlhf.models.probes import compute_probes
from rlhf.models.store import Manifest, ModelStore
from rlhf.serving.metrics import set_train_metrics
from rlhf.trainer.data import DataError, check_preference_payload, pairs_from_payload, read_jsonl, split_by_source
from rlhf.trainer.jobs import REDIS_ERRORS, JobContext, JobResult, TransientError
from rlhf.trainer.publish import Base, find_job_version, maybe_activate, publish_version, register, resolve_base
from rlhf.trainer.queues import Retention, StreamConsumer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reader:
    """What a job reads, and how.

    `noun`: what the items are called in messages and progress keys ("pairs" → `pairs`,
    `train_pairs`, `eval_pairs`); `validate(payload)`: raises `ValueError` for a payload this
    job cannot use (the consumer dead-letters it); `items(payload)`: its items; `read_jsonl(path)`:
    the items of a JSONL file (raises `DataError`); `min_count(spec)`: fewer items fail the job;
    `split(items, spec)`: (train, held-out)."""

    noun: str
    validate: Callable[[Any], object]
    items: Callable[[Any], list]
    read_jsonl: Callable[[str], list]
    min_count: Callable[[Any], int]
    split: Callable[[Sequence[Any], Any], tuple[list, list]]


#: Preference pairs and rankings (reward-model and DPO jobs): split by payload id.
PREFERENCES = Reader(
    noun="pairs",
    validate=check_preference_payload,
    items=pairs_from_payload,
    read_jsonl=read_jsonl,
    min_count=lambda spec: spec.min_pairs,
    split=lambda pairs, spec: split_by_source(pairs, spec.eval_fraction, seed=spec.seed),
)


@dataclass
class JobInputs:
    """What a job trains on, and the handles it publishes and commits through."""

    store: ModelStore
    registry: Registry
    consumer: StreamConsumer | None
    base: Base
    entries: list = field(default_factory=list)
    items: list = field(default_factory=list)
    train: list = field(default_factory=list)
    evals: list = field(default_factory=list)


def read_inputs(spec, ctx: JobContext, *, reader: Reader, job_type: str,
                metric_keys: tuple[str, ...],
                stage: dict[str, Any] | None = None) -> JobInputs | JobResult:
    """The job's items, split into train / held-out — or, when an earlier attempt of this job
    already published its version, that version finished (registered, committed, activated)."""
    settings = ctx.settings
    store = ModelStore(settings.store_dir)
    registry = Registry(ctx.redis_text)
    consumer = None
    if spec.source.type == "stream":
        consumer = StreamConsumer(
            ctx.redis_bytes, spec.source.stream, spec.source.group, f"job-{spec.job_id}",
            max_deliveries=settings.queue_max_deliveries,
            claim_idle_ms=settings.queue_claim_idle_ms,
            validate=reader.validate,
            retention=Retention.from_settings(settings),  # trims the stream after the commit
            min_replicas_ack=settings.redis_min_replicas_ack,
            replicas_ack_timeout_ms=settings.redis_replicas_ack_timeout_ms,
        )
    manifest = find_job_version(store, spec.model_name, spec.job_id)
    if manifest is not None:  # an earlier attempt published and died before finishing
        log.info("job %s: version %s already published; finishing it", spec.job_id, manifest.version)
        return finish(spec, ctx, registry, manifest, consumer, job_type=job_type, metric_keys=metric_keys)

    base = resolve_base(store, registry, spec.model_name, base_dir=spec.base_dir,
                        base_version=spec.base_version)
    _check_adapter_start(spec, store, base)
    entries: list = []
    noun, minimum = reader.noun, reader.min_count(spec)
    if consumer is not None:
        entries, items = _read_stream(consumer, reader, spec.source, minimum, ctx)
        where = f"stream {spec.source.stream!r} (group {spec.source.group!r})"
    else:
        items = reader.read_jsonl(spec.source.path)
        where = spec.source.path
    if len(items) < minimum:
        raise DataError(f"{where} gave {len(items)} usable {noun}; the job needs at least "
                        f"{minimum}")
    train, evals = reader.split(items, spec)
    ctx.progress(0.0, {**(stage or {}), noun: len(items), f"train_{noun}": len(train),
                       f"eval_{noun}": len(evals)}, force=True)
    return JobInputs(store, registry, consumer, base, entries, items, train, evals)


def _check_adapter_start(spec, store: ModelStore, base: Base) -> None:
    """A job never starts from an adapter version (merge it first); a LoRA job starts from a
    store version, the base its adapter version names (`rlhf.models.adapters`)."""
    from rlhf.models.adapters import refuse_adapter_base

    if base.version is not None:
        refuse_adapter_base(store, spec.model_name, base.version)
    elif getattr(spec, "lora", None) is not None:
        raise ValueError(f"lora: an adapter job starts from a store version of "
                         f"{spec.model_name!r} (base_version, or its active version), not "
                         f"base_dir: its adapter version names that base")


def _read_stream(consumer: StreamConsumer, reader: Reader, source, minimum: int,
                 ctx: JobContext) -> tuple[list, list]:
    """Up to `source.max_entries` entries and their items. With `source.block_ms` the job waits
    up to that long in all for its `minimum` items (producers such as rollout workers push in
    batches), not just for a first entry; what arrived by then is what it gets. The wait is
    read in slices of at most `_READ_SLICE_MS`, with `ctx.check()` between them (a cancel or a
    lost lease ends it); each slice also takes entries another consumer let go meanwhile (idle
    past `claim_idle_ms`: a cancelled or dead job's)."""
    deadline = time.monotonic() + source.block_ms / 1000.0
    entries: list = []
    items: list = []
    ctx.on_heartbeat(lambda: consumer.touch(entries))  # entries grows in place
    while len(entries) < source.max_entries:
        wait_ms = int((deadline - time.monotonic()) * 1000)
        block = min(wait_ms, _READ_SLICE_MS) if source.block_ms and wait_ms > 0 else None
        got = consumer.read(source.max_entries - len(entries), block_ms=block)
        entries.extend(got)
        items.extend(x for e in got for x in reader.items(e.payload))
        if len(items) >= minimum or time.monotonic() >= deadline:
            break
        ctx.check()
        consumer.rescan()
    consumer.update_metrics()
    return entries, items


#: The longest single blocking stream read of a job waiting for its items.
_READ_SLICE_MS = 1000


def step_reporter(ctx: JobContext, job_type: str,
                  **fixed: Any) -> Callable[[int, int, dict[str, Any]], None]:
    """`on_step(step, total, metrics)` for a job's training function: the job's progress and
    history row (stage "training", step, steps, the metrics and `fixed`) and the trainer's
    gauges (labelled with the job and its model)."""

    model = getattr(ctx.spec, "model_name", "")

    def on_step(step: int, total: int, m: dict[str, Any]) -> None:
        ctx.progress(step / total, {"stage": "training", "step": step, "steps": total, **m, **fixed})
        set_train_metrics(job_type, ctx.job_id, model, m)

    return on_step


def version_extra(spec, inputs: JobInputs, *, job_type: str, applied_ids: list[str],
                  eval_ids: list[str], stream_entries: list[str], **more: Any) -> dict[str, Any]:
    """The manifest's `extra` every job writes: what it was, what it started from, the payload
    ids it applied / held out, the stream entries to ack (`finish`), the spec; plus `more`."""
    return {
        "job_type": job_type,
        "source": spec.source.model_dump(),
        "base": {"dir": str(inputs.base.model_dir), "version": inputs.base.version},
        "applied_ids": applied_ids,
        "eval_ids": eval_ids,
        "stream_entries": stream_entries,
        **more,
        "spec": spec.model_dump(mode="json"),
    }


def publish_and_finish(spec, ctx: JobContext, inputs: JobInputs, out_dir: str | Path, *, kind: str,
                       metrics: dict[str, Any], extra: dict[str, Any], job_type: str,
                       metric_keys: tuple[str, ...]) -> JobResult:
    """Commit a trained checkpoint: confirm the job still holds its lease and its stream
    entries, record golden probes, publish (the commit point), then `finish`."""
    ctx.confirm_lease()
    consumer = inputs.consumer
    if consumer is not None and not ctx.redis(lambda: consumer.owns(inputs.entries),
                                              "check the job still holds its stream entries"):
        raise TransientError("some stream entries were reclaimed by another consumer while "
                             "training (heartbeat missed); retrying on fresh reads")
    if is_adapter_dir(out_dir):  # a LoRA job: an adapter version naming its base
        manifest = ctx.redis(lambda: publish_adapter(
            inputs.store, spec.model_name, out_dir, base_version=inputs.base.version,
            registry=inputs.registry, parent=inputs.base.version, job_id=spec.job_id,
            metrics=metrics, extra={**extra, "adapter_of_kind": kind}),
            "register the published version")
        return finish(spec, ctx, inputs.registry, manifest, inputs.consumer, job_type=job_type,
                      metric_keys=metric_keys)
    probes = compute_probes(kind, out_dir)  # what a service checks before swapping to it
    # The store's rename is the commit point; run again (Redis away while registering), the
    # job's version is found in the store and only registered.
    manifest = ctx.redis(lambda: publish_version(
        inputs.store, inputs.registry, spec.model_name, out_dir, parent=inputs.base.version,
        job_id=spec.job_id, kind=kind, metrics=metrics, extra=extra, probes=probes),
        "register the published version")
    return finish(spec, ctx, inputs.registry, manifest, inputs.consumer, job_type=job_type,
                  metric_keys=metric_keys)


def finish(spec, ctx: JobContext, registry: Registry, manifest: Manifest, consumer: StreamConsumer | None,
           *, job_type: str, metric_keys: tuple[str, ...]) -> JobResult:
    """After the version is committed: register it, ack its entries, activate if asked.

    Acked: the manifest's `stream_entries` (payloads trained on, held out, without a usable
    item, or dropped as stale); recorded as applied (never read again): its `applied_ids` and
    `eval_ids`. Entries whose payloads no step reached (left out of `stream_entries`) stay
    pending for a later job."""
    ctx.redis(lambda: register(registry, manifest), "register the published version")
    if consumer is not None:
        ctx.redis(lambda: consumer.commit(
            payload_ids=manifest.extra.get("applied_ids", []) + manifest.extra.get("eval_ids", []),
            entry_ids=manifest.extra.get("stream_entries", [])), "commit the stream entries")
        try:
            consumer.update_metrics()
        except REDIS_ERRORS:  # gauges only: the worker's metrics loop refreshes them
            log.debug("queue metrics not refreshed", exc_info=True)
        consumer.close()
    gate = getattr(spec, "min_eval_accuracy", None)  # jobs without a held-out split have none
    activated, why = ctx.redis(lambda: maybe_activate(registry, manifest, activate=spec.activate,
                                                      min_eval_accuracy=gate),
                               "activate the version")
    set_train_metrics(job_type, ctx.job_id, spec.model_name,
                      {k: manifest.metrics[k] for k in metric_keys if k in manifest.metrics})
    metrics = {**manifest.metrics, "activated": activated, "activation": why}
    ctx.progress(1.0, metrics, force=True)
    return JobResult(manifest.version, metrics)

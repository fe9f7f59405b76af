"""Bradley–Terry reward-model training: the plain function and the job around it.

    p(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l))        loss = −log σ(r_w − r_l)

`train_reward_model` is plain (directories and pairs in, a directory and metrics out) and is
what the tests and the benchmark call. `run_reward_model_job` is the job: read pairs (stream or
JSONL), split, train, publish a version with its metrics and the ids it used, commit the stream
entries, activate if asked. The Celery task only calls it.

Text is tokenized exactly as the reward service scores it (rlhf.reward.scorer): prompt and
response encoded separately without special tokens and concatenated; the reward is the
classifier's output at the last token. A sequence longer than `max_length` keeps its last
`max_length` tokens (the reward is read at the end).
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_client.registry import Registry

from rlhf.models.probes import compute_probes
from rlhf.models.store import Manifest, ModelStore
from rlhf.serving.metrics import TRAIN_METRIC
from rlhf.trainer.data import (
    DataError,
    Pair,
    check_preference_payload,
    pairs_from_payload,
    read_jsonl,
    split_by_source,
    unique_source_ids,
)
from rlhf.trainer.jobs import JobContext, JobResult, RewardModelJob, TransientError
from rlhf.trainer.publish import find_job_version, maybe_activate, publish_version, register, resolve_base
from rlhf.trainer.queues import StreamConsumer

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

JOB_TYPE = "reward_model"


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def bradley_terry_loss(chosen_rewards: "torch.Tensor", rejected_rewards: "torch.Tensor"):
    """(loss, accuracy) of rewards `(B,)` and `(B,)`: mean −log σ(r_w − r_l), share r_w > r_l.

    A tie (r_w == r_l) counts as half right.
    """
    import torch.nn.functional as F

    margin = chosen_rewards - rejected_rewards  # (B,)
    loss = -F.logsigmoid(margin).mean()  # ()
    accuracy = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()  # ()
    return loss, accuracy


# ---------------------------------------------------------------------------------------------
# The plain training function
# ---------------------------------------------------------------------------------------------


def _encode(tokenizer, pairs: Sequence[Pair], max_length: int) -> list[tuple[list[int], list[int]]]:
    cache: dict[str, list[int]] = {}

    def ids(text: str) -> list[int]:
        if text not in cache:
            cache[text] = tokenizer.encode(text, add_special_tokens=False)
        return cache[text]

    out = []
    for p in pairs:
        prompt = ids(p.prompt)
        out.append(((prompt + ids(p.chosen))[-max_length:], (prompt + ids(p.rejected))[-max_length:]))
    return out


def _rewards(model, seqs: Sequence[Sequence[int]], pad_id: int, device) -> "torch.Tensor":
    """Rewards `(N,)` of N token sequences in one right-padded forward pass."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
    scores = out.logits[:, 0]  # (N,)
    return scores.to(torch.promote_types(scores.dtype, torch.float32))  # loss in ≥ fp32


def accumulate_gradients(model, micro_batches: Sequence[Sequence[tuple[list[int], list[int]]]],
                         pad_id: int, device) -> tuple[float, float]:
    """Backpropagate the mean loss over every pair of `micro_batches`, one micro-batch per pass.

    Each micro-batch's mean loss is weighted by its share of the pairs, so the gradients equal
    those of one pass over all of them. Returns that (loss, accuracy).
    """
    total = sum(len(b) for b in micro_batches)
    loss_sum = acc_sum = 0.0
    for batch in micro_batches:
        r = _rewards(model, [c for c, _ in batch] + [rj for _, rj in batch], pad_id, device)  # (2B,)
        loss, acc = bradley_terry_loss(r[: len(batch)], r[len(batch):])
        (loss * (len(batch) / total)).backward()
        loss_sum += float(loss.detach()) * len(batch)
        acc_sum += float(acc) * len(batch)
    return loss_sum / total, acc_sum / total


def evaluate(model, encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, device,
             batch_size: int = 32) -> dict[str, float]:
    """Pairwise accuracy and mean Bradley–Terry loss over encoded pairs."""
    import torch

    if not encoded:
        return {}
    was_training = model.training
    model.eval()
    loss_sum = acc_sum = 0.0
    with torch.inference_mode():
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i:i + batch_size]
            r = _rewards(model, [c for c, _ in chunk] + [rj for _, rj in chunk], pad_id, device)
            loss, acc = bradley_terry_loss(r[: len(chunk)], r[len(chunk):])
            loss_sum += float(loss) * len(chunk)
            acc_sum += float(acc) * len(chunk)
    model.train(was_training)
    return {"accuracy": acc_sum / len(encoded), "loss": loss_sum / len(encoded)}


def train_reward_model(
    base_dir: str | Path,
    train_pairs: Sequence[Pair],
    eval_pairs: Sequence[Pair],
    spec: RewardModelJob,
    *,
    out_dir: str | Path,
    device: str = "cpu",
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    check: Callable[[], None] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train the reward model in `base_dir` on `train_pairs`; save it to `out_dir`; metrics.

    AdamW, micro-batches of `spec.batch_size` pairs, `spec.grad_accum_steps` micro-batches per
    optimizer step (each pair weighs the same in a step), gradient clipping to
    `spec.max_grad_norm`, linear warm-up over `spec.warmup_steps`. `on_step(step, total,
    metrics)` after every optimizer step; `check()` too (it may raise to stop). `threads` sets
    torch's intra-op threads for the call. Deterministic for a given seed and thread count.
    """
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(base_dir, train_pairs, eval_pairs, spec, out_dir=out_dir, device=device,
                      on_step=on_step, check=check)
    finally:
        torch.set_num_threads(previous)


def _train(base_dir, train_pairs, eval_pairs, spec, *, out_dir, device, on_step, check):
    import torch

    from rlhf.models.loading import load_reward_model, load_tokenizer, max_context
    from rlhf.models.tiny import quiet_progress_bars

    if not train_pairs:
        raise DataError("no training pairs")
    torch.manual_seed(spec.seed)
    model = load_reward_model(base_dir, device=device)
    tokenizer = load_tokenizer(base_dir, padding_side="right")
    pad_id = int(model.config.pad_token_id)
    max_length = min(spec.max_length, max_context(model.config))
    train_enc = _encode(tokenizer, train_pairs, max_length)
    eval_enc = _encode(tokenizer, eval_pairs, max_length)
    dev = next(model.parameters()).device

    initial = evaluate(model, eval_enc, pad_id, dev)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay,
                                  fused=dev.type in ("cpu", "cuda"))  # one kernel per step
    warmup = spec.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)) if warmup else 1.0
    )
    n = len(train_enc)
    micro_per_epoch = math.ceil(n / spec.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / spec.grad_accum_steps)
    total_steps = steps_per_epoch * spec.epochs
    rng = random.Random(spec.seed)
    step = 0
    last_loss = last_acc = float("nan")
    grad_norm = None
    t0 = time.perf_counter()
    for _epoch in range(spec.epochs):
        order = list(range(n))
        rng.shuffle(order)
        batches = [order[i:i + spec.batch_size] for i in range(0, n, spec.batch_size)]
        for g in range(0, len(batches), spec.grad_accum_steps):
            group = [[train_enc[i] for i in b] for b in batches[g:g + spec.grad_accum_steps]]
            last_loss, last_acc = accumulate_gradients(model, group, pad_id, dev)
            if spec.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if on_step is not None:
                on_step(step, total_steps, {"train_loss": last_loss, "train_accuracy": last_acc,
                                            **({"grad_norm": grad_norm} if grad_norm is not None else {})})
            if check is not None:
                check()
    seconds = time.perf_counter() - t0
    final = evaluate(model, eval_enc, pad_id, dev)
    model.eval()
    out = Path(out_dir)
    with quiet_progress_bars():
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    metrics: dict[str, Any] = {
        "train_pairs": n,
        "eval_pairs": len(eval_enc),
        "epochs": spec.epochs,
        "steps": step,
        "train_loss": last_loss,
        "train_accuracy": last_acc,
        "train_seconds": round(seconds, 3),
        "pairs_per_s": round(n * spec.epochs / seconds, 2) if seconds > 0 else None,
    }
    if eval_enc:
        metrics.update(eval_accuracy=final["accuracy"], eval_loss=final["loss"],
                       eval_accuracy_initial=initial["accuracy"], eval_loss_initial=initial["loss"])
    return metrics


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def run_reward_model_job(spec: RewardModelJob, ctx: JobContext) -> JobResult:
    """Read → split → train → publish → commit → (activate). Safe to run again after a crash."""
    settings = ctx.settings
    store = ModelStore(settings.store_dir)
    registry = Registry(ctx.redis_text)
    consumer = None
    if spec.source.type == "stream":
        consumer = StreamConsumer(
            ctx.redis_bytes, spec.source.stream, spec.source.group, f"job-{spec.job_id}",
            max_deliveries=settings.queue_max_deliveries,
            claim_idle_ms=settings.queue_claim_idle_ms,
            validate=check_preference_payload,
        )
    manifest = find_job_version(store, spec.model_name, spec.job_id)
    if manifest is not None:  # an earlier attempt published and died before finishing
        log.info("job %s: version %s already published; finishing it", spec.job_id, manifest.version)
        return _finish(spec, ctx, registry, manifest, consumer)

    base = resolve_base(store, registry, spec.model_name, base_dir=spec.base_dir,
                        base_version=spec.base_version)
    entries = []
    if consumer is not None:
        entries = consumer.read(spec.source.max_entries, block_ms=spec.source.block_ms or None)
        ctx.on_heartbeat(lambda: consumer.touch(entries))
        consumer.update_metrics()
        pairs = [p for e in entries for p in pairs_from_payload(e.payload)]
        where = f"stream {spec.source.stream!r} (group {spec.source.group!r})"
    else:
        pairs = read_jsonl(spec.source.path)
        where = spec.source.path
    if len(pairs) < spec.min_pairs:
        raise DataError(f"{where} gave {len(pairs)} usable pairs; the job needs at least "
                        f"{spec.min_pairs}")
    train, evals = split_by_source(pairs, spec.eval_fraction, seed=spec.seed)
    ctx.progress(0.0, {"pairs": len(pairs), "train_pairs": len(train), "eval_pairs": len(evals)},
                 force=True)

    def on_step(step: int, total: int, m: dict[str, float]) -> None:
        ctx.progress(step / total, {"step": step, "steps": total, **m})
        for k, v in m.items():
            TRAIN_METRIC.labels(JOB_TYPE, k).set(v)

    with tempfile.TemporaryDirectory(prefix="rlhf-rm-") as tmp:
        metrics = train_reward_model(base.model_dir, train, evals, spec, out_dir=tmp,
                                     device=settings.device, on_step=on_step, check=ctx.check,
                                     threads=settings.torch_threads)
        ctx.confirm_lease()
        if consumer is not None and not consumer.owns(entries):
            raise TransientError("some stream entries were reclaimed by another consumer while "
                                 "training (heartbeat missed); retrying on fresh reads")
        extra = {
            "job_type": JOB_TYPE,
            "source": spec.source.model_dump(),
            "base": {"dir": str(base.model_dir), "version": base.version},
            "applied_ids": unique_source_ids(train),
            "eval_ids": unique_source_ids(evals),
            "stream_entries": [e.entry_id for e in entries],
            "spec": spec.model_dump(mode="json"),
        }
        probes = compute_probes("reward", tmp)  # what a service checks before swapping to it
        manifest = publish_version(store, registry, spec.model_name, tmp, parent=base.version,
                                   job_id=spec.job_id, kind="reward", metrics=metrics, extra=extra,
                                   probes=probes)
    return _finish(spec, ctx, registry, manifest, consumer)


def _finish(spec: RewardModelJob, ctx: JobContext, registry: Registry, manifest: Manifest,
            consumer: StreamConsumer | None) -> JobResult:
    """After the version is committed: register, ack its entries, activate if asked."""
    register(registry, manifest)
    if consumer is not None:
        consumer.commit(payload_ids=manifest.extra.get("applied_ids", []) +
                        manifest.extra.get("eval_ids", []),
                        entry_ids=manifest.extra.get("stream_entries", []))
        consumer.update_metrics()
        consumer.close()
    activated, why = maybe_activate(registry, manifest, activate=spec.activate,
                                    min_eval_accuracy=spec.min_eval_accuracy)
    for k in ("eval_accuracy", "eval_loss"):
        if k in manifest.metrics:
            TRAIN_METRIC.labels(JOB_TYPE, k).set(manifest.metrics[k])
    metrics = {**manifest.metrics, "activated": activated, "activation": why}
    ctx.progress(1.0, metrics, force=True)
    return JobResult(manifest.version, metrics)

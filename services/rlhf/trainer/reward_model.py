"""Bradley–Terry reward-model training: the plain function and the job around it.

    p(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l))        loss = −log σ(r_w − r_l)

`train_reward_model` is plain (directories and pairs in, a directory and metrics out) and is
what the tests and the benchmark call. `run_reward_model_job` is the job: read pairs (stream or
JSONL), split, train, publish a version with its metrics and the ids it used, commit the stream
entries, activate if asked. The Celery task only calls it.

Text is tokenized exactly as the reward service scores it (rlhf.reward.scorer): prompt and
response encoded separately without special tokens and concatenated; the reward is the
classifier's output at the last token, whatever it is (`rlhf.models.reward_head`: a trailing eos
that is also the pad id counts). A sequence longer than `max_length` keeps its last
`max_length` tokens (the reward is read at the end). A NaN or infinite loss, gradient norm or
weight fails the job naming the step, before anything is published (`rlhf.trainer.finite`).
The job's `dtype` and `gradient_checkpointing` apply as in every job (`rlhf.trainer.precision`);
the loss is computed from the rewards in fp32 at least. With `spec.distributed` the job trains
on torchrun ranks (`distributed.train_reward_model_distributed`, docs/distributed.md): each rank
runs `train_reward_model` on its shard of every micro-batch, the loss still the pair mean over
the global step, and rank 0 saves the model with its head.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any


from rlhf.trainer.data import (
    DataError,
    Pair,
    unique_source_ids,
)
from rlhf.trainer.jobs import JobContext, JobResult, RewardModelJob
from rlhf.trainer.pipeline import (PREFERENCES, publish_and_finish, read_inputs, step_reporter,
                                   version_extra)
from rlhf.trainer.precision import Precision

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

JOB_TYPE = "reward_model"
METRIC_KEYS = ("eval_accuracy", "eval_loss")


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

    from rlhf.models.reward_head import sequence_rewards

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    scores = sequence_rewards(model, ids.to(device), mask.to(device))  # (N,)
    return scores.to(torch.promote_types(scores.dtype, torch.float32))  # loss in ≥ fp32


def accumulate_gradients(model, micro_batches: Sequence[Sequence[tuple[list[int], list[int]]]],
                         pad_id: int, device, precision: Precision | None = None
                         ) -> tuple[float, float]:
    """Backpropagate the mean loss over every pair of `micro_batches`, one micro-batch per pass
    (forward under `precision.autocast()`, backward outside it).

    Each micro-batch's mean loss is weighted by its share of the pairs, so the gradients equal
    those of one pass over all of them. Returns that (loss, accuracy).

    On a data-parallel rank (`distributed.current()`) the micro-batches are the global step's:
    the rank trains on its shard of each, weighted by the shard's share of the step's pairs
    (every rank holds the whole step), and the ranks' gradients and sums are summed: the same
    pair mean, loss, accuracy and gradient as one process.
    """
    from rlhf.trainer.distributed import current

    group = current()
    total = sum(len(b) for b in micro_batches)
    loss_sum = acc_sum = 0.0
    for batch in micro_batches:
        if group is not None:
            batch = group.shard(batch)
            if not batch:  # a short last micro-batch: nothing for this rank
                continue
        with precision.autocast() if precision is not None else nullcontext():
            r = _rewards(model, [c for c, _ in batch] + [rj for _, rj in batch], pad_id,
                         device)  # (2B,) ≥ fp32
        loss, acc = bradley_terry_loss(r[: len(batch)], r[len(batch):])
        (loss * (len(batch) / total)).backward()
        loss_sum += float(loss.detach()) * len(batch)
        acc_sum += float(acc) * len(batch)
    if group is not None:  # the global step's sums and gradient (the ranks' sums)
        sums = group.sum_metrics({"loss": loss_sum, "accuracy": acc_sum}, ["loss", "accuracy"])
        loss_sum, acc_sum = sums["loss"], sums["accuracy"]
        group.sync_grads(model)
    return loss_sum / total, acc_sum / total


def evaluate(model, encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, device,
             batch_size: int = 32, precision: Precision | None = None) -> dict[str, float]:
    """Pairwise accuracy and mean Bradley–Terry loss over encoded pairs."""
    import torch

    if not encoded:
        return {}
    was_training = model.training
    model.eval()
    loss_sum = acc_sum = 0.0
    with torch.inference_mode(), precision.autocast() if precision is not None else nullcontext():
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
    out_dir: str | Path | None,
    device: str = "cpu",
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    check: Callable[[], None] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train the reward model in `base_dir` on `train_pairs`; save it to `out_dir` (unless None:
    a data-parallel rank other than 0); metrics.

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

    from rlhf.models.loading import load_tokenizer, max_context
    from rlhf.models.tiny import quiet_progress_bars
    from rlhf.trainer.finite import check_finite, check_finite_weights, grad_norm

    if not train_pairs:
        raise DataError("no training pairs")
    torch.manual_seed(spec.seed)
    precision = Precision.of(spec, device)
    model = precision.load_reward_model(base_dir)  # the job's dtype, gradient checkpointing
    tokenizer = load_tokenizer(base_dir, padding_side="right")
    pad_id = int(model.config.pad_token_id)
    max_length = min(spec.max_length, max_context(model.config))
    train_enc = _encode(tokenizer, train_pairs, max_length)
    eval_enc = _encode(tokenizer, eval_pairs, max_length)
    dev = next(model.parameters()).device

    initial = evaluate(model, eval_enc, pad_id, dev, precision=precision)
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
    t0 = time.perf_counter()
    for _epoch in range(spec.epochs):
        order = list(range(n))
        rng.shuffle(order)
        batches = [order[i:i + spec.batch_size] for i in range(0, n, spec.batch_size)]
        for g in range(0, len(batches), spec.grad_accum_steps):
            group = [[train_enc[i] for i in b] for b in batches[g:g + spec.grad_accum_steps]]
            last_loss, last_acc = accumulate_gradients(model, group, pad_id, dev, precision)
            step += 1
            norm = grad_norm(params, spec.max_grad_norm)  # clips when max_grad_norm is set
            check_finite(step, total_steps, loss=last_loss, grad_norm=norm)  # before the update
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if on_step is not None:
                clipped = {"grad_norm": norm} if spec.max_grad_norm is not None else {}
                on_step(step, total_steps, {"train_loss": last_loss, "train_accuracy": last_acc,
                                            **clipped})
            if check is not None:
                check()
    seconds = time.perf_counter() - t0
    check_finite_weights(model, step, total_steps)  # before anything is saved
    final = evaluate(model, eval_enc, pad_id, dev, precision=precision)
    model.eval()
    if out_dir is not None:
        with quiet_progress_bars():
            model.save_pretrained(Path(out_dir))
            tokenizer.save_pretrained(Path(out_dir))
    metrics: dict[str, Any] = {
        "train_pairs": n,
        "eval_pairs": len(eval_enc),
        "epochs": spec.epochs,
        "steps": step,
        "train_loss": last_loss,
        "train_accuracy": last_acc,
        **precision.record(),
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
    got = read_inputs(spec, ctx, reader=PREFERENCES, job_type=JOB_TYPE, metric_keys=METRIC_KEYS)
    if isinstance(got, JobResult):
        return got
    settings = ctx.settings
    on_step = step_reporter(ctx, JOB_TYPE)
    with tempfile.TemporaryDirectory(prefix="rlhf-rm-") as tmp:
        if spec.distributed is not None:  # torchrun ranks, this task their controller
            from rlhf.trainer.distributed import train_reward_model_distributed

            metrics = train_reward_model_distributed(
                got.base.model_dir, got.train, got.evals, spec, out_dir=tmp,
                device=settings.device, on_step=on_step, ctx=ctx, threads=settings.torch_threads)
        else:
            metrics = train_reward_model(got.base.model_dir, got.train, got.evals, spec,
                                         out_dir=tmp, device=settings.device, on_step=on_step,
                                         check=ctx.check, threads=settings.torch_threads)
        extra = version_extra(spec, got, job_type=JOB_TYPE,
                              applied_ids=unique_source_ids(got.train),
                              eval_ids=unique_source_ids(got.evals),
                              stream_entries=[e.entry_id for e in got.entries])
        return publish_and_finish(spec, ctx, got, tmp, kind="reward", metrics=metrics, extra=extra,
                                  job_type=JOB_TYPE, metric_keys=METRIC_KEYS)

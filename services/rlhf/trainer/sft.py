"""Supervised fine-tuning: (prompt, completion) records in, a new policy version out.

    loss = −(1/N) Σ_rows Σ_i log π_θ(completion[i] | prompt, prefix, completion[:i])

a token-mean negative log-likelihood over the completion tokens of a step (N of them); prompt
tokens, and a record's `prefix`, are conditioned on but never trained.

`train_sft(spec, records, base_dir=..., out_dir=...)` is the training as a plain function (tests,
the backtracking recipe and the demo call it); `run_sft_job(spec, ctx)` is the job around it,
through the frame every training job shares (`rlhf.trainer.pipeline`): read the records
(stream or JSONL), split, train, publish a version (parent = the base) with its metrics and the
ids it applied, commit the stream entries, activate if asked. The Celery task `rlhf.train_sft`
only calls `jobs.execute(spec, run_sft_job)`. The spec is `jobs.SFTJob`.

Records (`SFTExample`):
- JSONL rows `{"id", "prompt", "completion"}` with an optional `"prefix"`: text that follows
  the prompt and precedes the completion, conditioned on but not trained (backtracking SFT's
  unsafe prefix: the loss falls on the reset token and what follows it). A preference-pair row
  (`"chosen"`/`"rejected"`) trains on its chosen response, a ranking row on its best-ranked
  response(s) ("SFT on the preferred responses").
- Stream payloads: `rlhfpb.v1.SFTExample` (the wire form of a JSONL row: prompt, completion,
  prefix; pushed with `QueueProducer.push_sft_example`, to `SFT_STREAM` by default, which is
  the job's default stream) — and, as in JSONL, PreferencePair / Ranking payloads train on
  their preferred response(s). Any other payload, or one without a usable completion, is
  dead-lettered by the job's consumer (`check_sft_payload` raises `ValueError`).
- `spec.reset_token`: a completion that contains it (and has no explicit prefix) is trained
  from its last occurrence on: what precedes it becomes the prefix. A backtracking example
  "unsafe prefix<|reset|> safe" therefore needs no prefix field, and the chosen response of a
  positive backtracking pair is a backtracking SFT example as it stands.

Tokenization follows `dpo.encode_pair`: with a chat template the prompt is one user turn with
the generation prompt and prefix + completion the assistant turn; without one the texts are
concatenated and eos is appended to a completion that does not end with it. The context is the
longest common prefix of the tokens of (rendered prompt + prefix) and of the full row — a token
that merges across the boundary belongs to the completion — and a row is cut to `max_length`
keeping its start; a record whose context fills `max_length` is skipped.

The optimizer (AdamW, decay on matrices only), the learning-rate schedule and the finite checks
are DPO's (`precision.make_optimizer`, `dpo._lr_factor`, `rlhf.trainer.finite`), and so are the
model's precision and gradient checkpointing (`rlhf.trainer.precision`); log-probs come from
`logprobs.completion_logprobs` (packed, prompt computed once per group of completions).

With `spec.distributed` the job trains on torchrun ranks (`distributed.train_sft_distributed`,
docs/distributed.md): each rank runs `train_sft` on its shard of every micro-batch, the loss
still the token mean over the global step, and rank 0 saves.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from rlhf_client.datafiles import SFTExample, examples_from_payload, read_sft_jsonl

from rlhf.trainer.data import split_by_source
from rlhf.trainer.jobs import SFTJob
from rlhf.trainer.pipeline import Reader

if TYPE_CHECKING:
    from rlhf.trainer.jobs import JobContext, JobResult
    from rlhf.trainer.precision import Precision

log = logging.getLogger(__name__)

JOB_TYPE = "sft"
METRIC_KEYS = ("eval_loss", "train_loss")

__all__ = [
    "SFTJob",
    "SFTError",
    "SFTExample",
    "examples_from_payload",
    "check_sft_payload",
    "read_sft_jsonl",
    "SFT_EXAMPLES",
    "TokenizedExample",
    "encode_example",
    "encode_examples",
    "batch_nll",
    "evaluate_nll",
    "SFTTrainResult",
    "train_sft",
    "run_sft_job",
]


class SFTError(ValueError):
    """The job cannot run as specified (no usable example ...)."""


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------


def check_sft_payload(payload) -> None:
    """The `validate` hook of an SFT consumer: raises for payloads an SFT job can't use."""
    examples_from_payload(payload)


#: What an SFT job reads: examples (JSONL rows; a stream's SFTExample payloads, and its pairs'
#: and rankings' preferred responses), split by payload id like preference pairs.
SFT_EXAMPLES = Reader(
    noun="examples",
    validate=check_sft_payload,
    items=examples_from_payload,
    read_jsonl=read_sft_jsonl,
    min_count=lambda spec: spec.min_examples,
    split=lambda examples, spec: split_by_source(examples, spec.eval_fraction, seed=spec.seed),
)


# ------------------------------------------------------------------------------------------------
# Tokenization
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedExample:
    """An example as token ids: the context (prompt + prefix) and the trained completion."""

    id: str
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]


def split_at_reset(example: SFTExample, reset_token: str | None) -> SFTExample:
    """With `reset_token` in the completion (and no explicit prefix), the completion from its
    last occurrence on, and what precedes it as the prefix."""
    if not reset_token or example.prefix or reset_token not in example.completion:
        return example
    k = example.completion.rindex(reset_token)
    return SFTExample(example.source_id, example.prompt, example.completion[k:],
                      example.completion[:k])


def encode_example(tokenizer, example: Any, *, max_length: int, append_eos: bool = True,
                   reset_token: str | None = None) -> TokenizedExample | None:
    """Token ids of one example; None when its context fills `max_length` or nothing is left
    to train on (see the module docstring)."""
    from rlhf.trainer.dpo import _common_prefix

    ex = split_at_reset(SFTExample.of(example), reset_token)
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": ex.prompt}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": ex.prefix + ex.completion}], tokenize=False,
            add_generation_prompt=False)
        context = enc(prompt_text + ex.prefix)
        full = enc(full_text)
    else:
        eos_text, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
        context = enc(ex.prompt + ex.prefix)
        full = enc(ex.prompt + ex.prefix + ex.completion)
        if append_eos and eos_id is not None and not (eos_text and ex.completion.endswith(eos_text)):
            full.append(eos_id)
    n = _common_prefix(context, full)
    if n < 1 or n >= max_length:
        return None
    completion = full[n:max_length]
    if not completion:
        return None
    return TokenizedExample(ex.source_id, tuple(full[:n]), tuple(completion))


def encode_examples(tokenizer, examples: Iterable[Any], *, max_length: int, append_eos: bool = True,
                    reset_token: str | None = None) -> tuple[list[TokenizedExample], int]:
    """Tokenize `examples` in order, dropping unusable ones; returns (examples, number skipped).
    An example without an id gets `#<position>`."""
    out: list[TokenizedExample] = []
    skipped = 0
    for i, raw in enumerate(examples):
        te = encode_example(tokenizer, raw, max_length=max_length, append_eos=append_eos,
                            reset_token=reset_token)
        if te is None:
            skipped += 1
            continue
        out.append(te if te.id else TokenizedExample(f"#{i}", te.prompt_ids, te.completion_ids))
    return out, skipped


# ------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------


def batch_nll(model, batch: Sequence[TokenizedExample], *, pad_id: int):
    """(Σ −log π over every completion token of the batch `()` fp64 with graph, token count)."""
    from rlhf.trainer.logprobs import completion_logprobs

    out = completion_logprobs(model, [(e.prompt_ids, e.completion_ids) for e in batch], pad_id=pad_id)
    return -out.sums.sum(), int(out.counts.sum())


def evaluate_nll(model, examples: Sequence[TokenizedExample], *, pad_id: int,
                 batch_size: int = 16, precision: "Precision | None" = None) -> dict[str, float]:
    """Token-mean NLL (`loss`), its perplexity and the token count over `examples`."""
    import torch

    total, tokens = 0.0, 0
    with torch.inference_mode(), precision.autocast() if precision is not None else nullcontext():
        for s in range(0, len(examples), batch_size):
            nll, n = batch_nll(model, examples[s : s + batch_size], pad_id=pad_id)
            total += float(nll)
            tokens += n
    loss = total / max(1, tokens)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(tokens)}


def train_step(model, optimizer, micro_batches: Sequence[Sequence[TokenizedExample]], *,
               pad_id: int, max_grad_norm: float | None = 1.0, step: int = 1,
               total: int = 1, precision: "Precision | None" = None) -> dict[str, float]:
    """One optimizer step: the token-mean NLL over every completion token of the micro-batches
    (each micro-batch's sum divided by the step's token count, so accumulation changes nothing),
    clipping, AdamW; forward passes under `precision.autocast()`. Raises
    `finite.TrainingDiverged` before the update on a non-finite loss or gradient norm.

    On a data-parallel rank (`distributed.current()`) each micro-batch is the global one: the
    rank trains on its shard, still dividing by the global step's token count (every rank holds
    the whole step), and the ranks' gradients and loss sums are summed before the update."""
    from rlhf.trainer.distributed import current
    from rlhf.trainer.finite import check_finite, grad_norm

    group = current()
    n_tokens = sum(len(e.completion_ids) for b in micro_batches for e in b)
    loss_sum = 0.0
    for batch in micro_batches:
        if group is not None:
            batch = group.shard(batch)
            if not batch:
                continue
        with precision.autocast() if precision is not None else nullcontext():
            nll, _ = batch_nll(model, batch, pad_id=pad_id)
        (nll / n_tokens).float().backward()
        loss_sum += float(nll.detach())
    if group is not None:  # the global step's loss and gradient (the ranks' sums)
        loss_sum = group.sum_metrics({"loss": loss_sum}, ["loss"])["loss"]
        group.sync_grads(model)
    out = {"loss": loss_sum / n_tokens, "tokens": float(n_tokens)}
    norm = grad_norm(model.parameters(), max_grad_norm)
    if max_grad_norm is not None:
        out["grad_norm"] = norm
    check_finite(step, total, loss=out["loss"], grad_norm=norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


# ------------------------------------------------------------------------------------------------
# The plain training function
# ------------------------------------------------------------------------------------------------


@dataclass
class SFTTrainResult:
    metrics: dict[str, Any]
    applied_ids: list[str]  # payload ids with an example in at least one optimizer step, sorted
    eval_ids: list[str]  # payload ids of the held-out examples, sorted
    unapplied_ids: list[str]  # training payload ids no step reached (max_steps < one pass)


StepFn = Callable[[int, int, dict[str, float]], None]


def train_sft(
    spec: "SFTJob",
    records: Sequence[Any],
    *,
    base_dir: str | Path,
    out_dir: str | Path | None = None,
    eval_records: Sequence[Any] = (),
    progress: StepFn | None = None,
    check: Callable[[], None] | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> SFTTrainResult:
    """Fine-tune the policy in `base_dir` on `records`; save it to `out_dir` (when given).

    `records` / `eval_records`: `SFTExample`s or mappings with prompt / completion (/ prefix,
    id). `progress(step, total, metrics)` after every optimizer step; `check()` too (it may raise
    to stop). `threads` sets torch's intra-op threads for the call. Raises `SFTError` when no
    record is usable. Deterministic for a seed and thread count.
    """
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(spec, records, base_dir=Path(base_dir), out_dir=out_dir,
                      eval_records=eval_records, progress=progress, check=check, device=device)
    finally:
        torch.set_num_threads(previous)


def _train(spec, records, *, base_dir, out_dir, eval_records, progress, check, device):
    import torch

    from rlhf.models.loading import load_tokenizer
    from rlhf.models.tiny import quiet_progress_bars
    from rlhf.trainer.dpo import _lr_factor, run_optimizer_steps
    from rlhf.trainer.precision import Precision, make_optimizer
    from rlhf.trainer.finite import check_finite_weights

    t_start = time.perf_counter()
    tokenizer = load_tokenizer(base_dir, padding_side="right")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if spec.reset_token:
        ids = tokenizer.encode(spec.reset_token, add_special_tokens=False)
        if len(ids) != 1:
            raise SFTError(f"reset_token {spec.reset_token!r} is {len(ids)} tokens of this model's "
                           "tokenizer, not one (add it first: rlhf models add-token)")
    enc = dict(max_length=spec.max_length, append_eos=spec.append_eos, reset_token=spec.reset_token)
    train, skipped = encode_examples(tokenizer, records, **enc)
    held, skipped_eval = encode_examples(tokenizer, eval_records, **enc)
    if not train:
        raise SFTError(f"no usable SFT examples ({skipped} of {len(records)} skipped: a context "
                       f"that fills max_length={spec.max_length}, or an empty completion)")

    torch.manual_seed(spec.seed)
    precision = Precision.of(spec, device)
    # eval mode: no dropout (the tiny and most modern decoders have none anyway)
    model = precision.load_causal_lm(base_dir)
    policy_dtype = precision.compute_dtype
    initial = evaluate_nll(model, held, pad_id=pad_id, batch_size=spec.batch_size,
                           precision=precision) if held else {}
    opt = make_optimizer(model, lr=spec.learning_rate, betas=spec.adam_betas, eps=spec.adam_eps,
                         weight_decay=spec.weight_decay)
    per_step = spec.batch_size * spec.grad_accum_steps
    total = spec.max_steps or spec.epochs * math.ceil(len(train) / per_step)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, spec))

    tokens = 0

    def step(micro, n: int) -> dict[str, float]:
        nonlocal tokens
        out = train_step(model, opt, micro, pad_id=pad_id, max_grad_norm=spec.max_grad_norm,
                         step=n, total=total, precision=precision)
        tokens += int(out["tokens"])
        return out

    run = run_optimizer_steps(train, spec=spec, total=total, optimizer=opt, scheduler=sched,
                              step=step, progress=progress, check=check)
    first, last, seen, train_s = run.first, run.last, run.seen, run.seconds
    check_finite_weights(model, total, total)

    metrics: dict[str, Any] = {
        "train_examples": len(train),
        "eval_examples": len(held),
        "skipped_examples": skipped + skipped_eval,
        "steps": total,
        "train_loss": last.get("loss"),
        "train_loss_first_step": first.get("loss"),
        "train_tokens": tokens,
        "policy_dtype": policy_dtype,
        **precision.record(),
        "train_seconds": round(train_s, 3),
        "examples_per_s": round(total * per_step / train_s, 2) if train_s > 0 else None,
        "tokens_per_s": round(tokens / train_s, 1) if train_s > 0 else None,
    }
    if "grad_norm" in last:
        metrics["train_grad_norm"] = last["grad_norm"]
    if held:
        final = evaluate_nll(model, held, pad_id=pad_id, batch_size=spec.batch_size,
                             precision=precision)
        metrics.update({"eval_loss": final["loss"], "eval_perplexity": final["perplexity"],
                        "eval_tokens": int(final["tokens"]),
                        "eval_loss_initial": initial["loss"],
                        "eval_perplexity_initial": initial["perplexity"]})
    metrics["seconds"] = round(time.perf_counter() - t_start, 3)
    if out_dir is not None:
        with quiet_progress_bars():
            model.save_pretrained(out_dir)
            tokenizer.save_pretrained(out_dir)
        _copy_generation_config(base_dir, Path(out_dir))
    return SFTTrainResult(metrics, sorted(seen), sorted({e.id for e in held}),
                          sorted({e.id for e in train} - seen))


def _copy_generation_config(base_dir: Path, out_dir: Path) -> None:
    """save_pretrained writes the model's generation config; keep the base's when it had one
    and nothing was written (some models keep none in memory)."""
    src, dst = base_dir / "generation_config.json", out_dir / "generation_config.json"
    if src.is_file() and not dst.exists():
        dst.write_bytes(src.read_bytes())


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------


def run_sft_job(spec: SFTJob, ctx: "JobContext") -> "JobResult":
    """Read → split → train → publish → commit → (activate), through `pipeline`'s frame.

    Safe to run again after a crash: a version this job already published is finished off, not
    trained again; stream entries are acked only after the version is committed (entries whose
    examples no step reached stay pending for a later job, as DPO's do)."""
    from rlhf.trainer.jobs import JobResult
    from rlhf.trainer.pipeline import publish_and_finish, read_inputs, step_reporter, version_extra

    got = read_inputs(spec, ctx, reader=SFT_EXAMPLES, job_type=JOB_TYPE, metric_keys=METRIC_KEYS,
                      stage={"stage": "reading"})
    if isinstance(got, JobResult):
        return got
    settings = ctx.settings
    on_step = step_reporter(ctx, JOB_TYPE)
    with tempfile.TemporaryDirectory(prefix="rlhf-sft-") as tmp:
        if spec.distributed is not None:  # torchrun ranks, this task their controller
            from rlhf.trainer.distributed import train_sft_distributed

            result = train_sft_distributed(spec, got.train, base_dir=got.base.model_dir,
                                           out_dir=tmp, eval_records=got.evals, progress=on_step,
                                           ctx=ctx, device=settings.device,
                                           threads=settings.torch_threads)
        else:
            result = train_sft(spec, got.train, base_dir=got.base.model_dir, out_dir=tmp,
                               eval_records=got.evals, progress=on_step, check=ctx.check,
                               device=settings.device, threads=settings.torch_threads)
        ctx.check()
        unapplied = set(result.unapplied_ids)
        extra = version_extra(
            spec, got, job_type=JOB_TYPE, applied_ids=result.applied_ids,
            eval_ids=result.eval_ids, unapplied_ids=result.unapplied_ids,
            stream_entries=[e.entry_id for e in got.entries if e.id not in unapplied])
        return publish_and_finish(spec, ctx, got, tmp, kind="policy", metrics=result.metrics,
                                  extra=extra, job_type=JOB_TYPE, metric_keys=METRIC_KEYS)

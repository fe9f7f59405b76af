"""DPO training: preference pairs in, a new policy version out.

    loss (sigmoid) = −log σ(β·[(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))])

`train_dpo(spec, pairs, base_dir=..., out_dir=...)` is the training as a plain function (tests
and the benchmark call it); `run_dpo_job(spec, ctx)` is the job around it — read the pairs
(stream or JSONL), split, train, publish a version (parent = the base) with its metrics and
the ids it applied, commit the stream entries, activate if asked. The Celery task
`rlhf.train_dpo` only calls `jobs.execute(spec, run_dpo_job)`. The spec is `jobs.DPOJob`.

- Tokenization: the policy's tokenizer; with a chat template the prompt is one user turn
  rendered with the generation prompt and each response the assistant turn after it; without
  one prompt and response texts are concatenated and eos is appended to a response that does
  not already end with it. The completion is what follows the prompt's tokens (their longest
  common prefix with the row's tokens), each row is cut to `max_length` keeping its start, and
  a pair whose prompt alone fills `max_length` is skipped. This is what TRL's DPOTrainer (1.16)
  does with the same pair — as a plain-text pair without a chat template, as a one-user-turn /
  one-assistant-turn conversation with one — token for token, with one difference: text is
  encoded without special tokens (as the policy and reward services encode it), where TRL's
  plain-text path lets the tokenizer add its own (a BOS for Llama-style tokenizers; none for
  Qwen2-style ones such as the tiny models'). A plain-text pair is never wrapped in the chat
  template by TRL; here it is whenever the tokenizer has one.
- Sequence log-probs are summed over completion tokens only (`rlhf.trainer.logprobs`): the
  chosen and rejected rows of a batch share one packed forward pass in which their common
  prompt is computed once, and the LM head runs only on completion positions.
- Reference log-probs come from the ReferenceService (batched calls, a pair's two items always
  in one request, where the service computes their prompt once) or a local checkpoint (default:
  the base itself; the prompt's forward run once and its KV cache reused for both completions,
  `rlhf.serving.shared_prefix`), computed once per pair before training and cached on it; the
  reference model is freed before the policy trains. Reference-free losses skip them.
- AdamW (weight decay on matrices only), linear warm-up then constant or linear decay,
  gradient accumulation and clipping, `epochs` passes or `max_steps` optimizer steps.
- Metrics: loss, implicit-reward accuracy (ties count half), margin, chosen / rejected rewards,
  for the last training step (`train_*`) and the held-out pairs before and after
  (`eval_*_initial`, `eval_*`); the first step's loss and margin (`train_loss_first_step`,
  `train_margin_first_step`: log 2 and 0 when the reference is the base, computed like the
  policy); the policy's and the reference's dtypes (`policy_dtype`, `reference_dtype`).
- Dtypes: the policy trains in the job's `dtype` (float32, bf16-mixed or bfloat16, with
  `gradient_checkpointing` or not: `rlhf.trainer.precision`); `policy_dtype` is the dtype it
  computes in (bfloat16 for both bf16 modes). A local reference is computed in the job's own
  precision (same weights dtype, same autocast, fp32 log-softmax), so the first step is log 2
  from the reference itself. Reference log-probs computed in another dtype (a ReferenceService
  run with RLHF_DTYPE=bfloat16 for a float32 job) differ from the policy's own at step 0, so the
  job starts off log 2; it trains on, logs a warning and records both dtypes (and
  `dtype_matches_policy: false` in the manifest's `reference`).
- A NaN or infinite loss, gradient norm or weight fails the job naming the step, before the
  optimizer applies it and before anything is published (`rlhf.trainer.finite`).
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol, Sequence

from rlhf.trainer.jobs import REFERENCE_FREE_LOSSES, DPOJob
from rlhf.trainer.precision import Precision, make_optimizer  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from rlhf.trainer.jobs import JobContext, JobResult

log = logging.getLogger(__name__)

JOB_TYPE = "dpo"
METRIC_KEYS = ("eval_accuracy", "eval_loss", "eval_margin")

__all__ = [
    "DPOJob",
    "DPOError",
    "PreferenceText",
    "TokenizedPair",
    "encode_pair",
    "encode_pairs",
    "ReferenceSource",
    "LocalReference",
    "ServiceReference",
    "make_reference",
    "attach_reference_logps",
    "prompt_batches",
    "DPOLossConfig",
    "pair_logps",
    "batch_loss",
    "train_step",
    "make_optimizer",
    "run_optimizer_steps",
    "evaluate",
    "DPOTrainResult",
    "train_dpo",
    "run_dpo_job",
]


class DPOError(ValueError):
    """The job cannot run as specified (no usable pairs, a reference that cannot be found ...)."""


# ------------------------------------------------------------------------------------------------
# Pairs and tokenization
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceText:
    """One pair as text (the queue's PreferencePair, a JSONL row)."""

    id: str
    prompt: str
    chosen: str
    rejected: str

    @classmethod
    def of(cls, obj: Any) -> "PreferenceText":
        """From a PreferenceText, a `data.Pair` (id = its `source_id`), a PreferencePair
        message, or a mapping with those keys."""
        if isinstance(obj, cls):
            return obj
        get = obj.get if isinstance(obj, Mapping) else (lambda k, d=None: getattr(obj, k, d))
        pid = get("id", None) or get("source_id", None) or ""
        return cls(str(pid), str(get("prompt", "") or ""), str(get("chosen", "") or ""),
                   str(get("rejected", "") or ""))


@dataclass
class TokenizedPair:
    """A pair as token ids, with its cached reference log-probs (summed over completion tokens)."""

    id: str
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    ref_chosen: float | None = None
    ref_rejected: float | None = None

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen is not None and self.ref_rejected is not None


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_pair(tokenizer, pair: Any, *, max_length: int,
                append_eos: bool = True) -> TokenizedPair | None:
    """Token ids of one pair; None when the prompt alone fills `max_length` or a side is empty.

    With a chat template the prompt is one user turn rendered with the generation prompt and each
    response is the assistant turn that follows it; without one the texts are concatenated
    (prompt + response) and eos is appended unless the response text already ends with the eos
    token (as TRL's DPOTrainer does). Either way the completion is what follows the
    longest common prefix of the prompt's and the full row's tokens (they differ only when
    tokens merge across the boundary), and each row is cut to `max_length` keeping its start.
    """
    p = PreferenceText.of(pair)
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": p.prompt}]

        def render(messages, gen):
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=gen)
            return tokenizer.encode(text, add_special_tokens=False)

        prompt_ids = render(user, True)
        full_c = render(user + [{"role": "assistant", "content": p.chosen}], False)
        full_r = render(user + [{"role": "assistant", "content": p.rejected}], False)
    else:
        enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        eos_text, eos_id = tokenizer.eos_token, tokenizer.eos_token_id

        def eos(response: str) -> list[int]:
            if not append_eos or eos_id is None or (eos_text and response.endswith(eos_text)):
                return []
            return [eos_id]

        prompt_ids = enc(p.prompt)
        full_c = enc(p.prompt + p.chosen) + eos(p.chosen)
        full_r = enc(p.prompt + p.rejected) + eos(p.rejected)
    n = min(_common_prefix(prompt_ids, full_c), _common_prefix(prompt_ids, full_r))
    if n < 1 or n >= max_length:
        return None
    chosen, rejected = full_c[n:max_length], full_r[n:max_length]
    if not chosen or not rejected:
        return None
    return TokenizedPair(p.id, tuple(prompt_ids[:n]), tuple(chosen), tuple(rejected))


def encode_pairs(tokenizer, pairs: Iterable[Any], *, max_length: int,
                 append_eos: bool = True) -> tuple[list[TokenizedPair], int]:
    """Tokenize `pairs` (in order), dropping unusable ones; returns (pairs, number skipped).

    Ids need not be unique (a ranking's pairs share their payload's id); a pair without one
    gets `#<position>`. Applying each payload once is the queue consumer's job."""
    out: list[TokenizedPair] = []
    skipped = 0
    cache: dict[tuple[str, str, str], TokenizedPair | None] = {}
    for i, raw in enumerate(pairs):
        text = PreferenceText.of(raw)
        key = (text.prompt, text.chosen, text.rejected)
        if key not in cache:
            cache[key] = encode_pair(tokenizer, text, max_length=max_length, append_eos=append_eos)
        tp = cache[key]
        if tp is None:
            skipped += 1
            continue
        out.append(TokenizedPair(text.id or f"#{i}", tp.prompt_ids, tp.chosen_ids, tp.rejected_ids))
    return out, skipped


# ------------------------------------------------------------------------------------------------
# Reference log-probs
# ------------------------------------------------------------------------------------------------

Item = tuple[Sequence[int], Sequence[int]]  # (prompt_ids, completion_ids)


def prompt_batches(items: Sequence[Item], size: int) -> list[list[int]]:
    """Indices of `items` in batches of at most `size` that keep the items with the same prompt
    together (a pair's chosen and rejected in one forward / one request, where the prompt is
    computed once), the prompts in order of length; a group larger than `size` is split."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt, _) in enumerate(items):
        groups.setdefault(tuple(prompt), []).append(i)
    batches: list[list[int]] = []
    for prompt in sorted(groups, key=len):
        members = sorted(groups[prompt], key=lambda i: len(items[i][1]))
        if batches and len(batches[-1]) + len(members) <= size:
            batches[-1].extend(members)
            continue
        batches += [members[s : s + size] for s in range(0, len(members), size)]
    return batches


class ReferenceSource(Protocol):
    """Sequence log-probs log π_ref(completion | prompt), summed over completion tokens."""

    def sequence_logps(self, items: Sequence[Item]) -> list[float]: ...

    def describe(self) -> dict[str, Any]: ...  # "source", and the "dtype" that computed them


class LocalReference:
    """A reference checkpoint loaded here (frozen, inference mode).

    `dtype`: a weights dtype ("float32", "bfloat16", "float16", "auto": the services' setting)
    or "bf16-mixed" (fp32 weights, forward under bf16 autocast: a bf16-mixed job's policy
    computed the same way). Log-softmax in fp32 whatever the dtype."""

    #: whether rows sharing a prompt may reuse its KV cache (off for `AdapterOffReference`)
    prefix_reuse = True

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", batch_items: int = 64,
                 model=None, dtype: str = "float32"):
        from rlhf.models.loading import load_causal_lm

        self.model_dir = Path(model_dir)
        self.mixed = Precision(dtype, device=device) if dtype == "bf16-mixed" else None
        self.model = model if model is not None else load_causal_lm(
            self.model_dir, device=device, dtype="float32" if self.mixed else dtype)
        self.model.requires_grad_(False)
        self.dtype = ("bfloat16" if self.mixed else
                      str(next(self.model.parameters()).dtype).removeprefix("torch."))
        cfg = self.model.config
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or 0)
        self.pad_id = int(pad[0] if isinstance(pad, (list, tuple)) else pad)
        self.batch_items = batch_items

    def sequence_logps(self, items: Sequence[Item]) -> list[float]:
        import torch

        from rlhf.serving.shared_prefix import has_shared_prompts, logprobs_usable, shared_prefix_logprobs
        from rlhf.trainer.logprobs import completion_logprobs

        out: list[float] = [0.0] * len(items)
        with torch.inference_mode(), (self.mixed.autocast() if self.mixed else nullcontext()):
            # rows with the same prompt in one batch, where its forward runs once: prefix KV
            # reuse (no gradients needed here; faster than the packed layout's block mask on
            # CPU), else the packed forward; under a bf16-mixed job's autocast always the packed
            # forward, the policy's own (fp32 head), whose numbers these must equal
            for idx in prompt_batches(items, self.batch_items):
                batch = [items[i] for i in idx]
                longest = max(len(p) + len(c) for p, c in batch)
                if self.mixed is None and self.prefix_reuse \
                        and has_shared_prompts([p for p, _ in batch]) \
                        and logprobs_usable(self.model, longest):
                    sums = shared_prefix_logprobs(self.model, batch, pad_id=self.pad_id)[1]
                else:
                    sums = completion_logprobs(self.model, batch, pad_id=self.pad_id).sums
                for i, v in zip(idx, sums.tolist()):
                    out[i] = v
        return out

    def describe(self) -> dict[str, Any]:
        out = {"source": "local", "model_dir": str(self.model_dir), "dtype": self.dtype}
        if self.mixed:
            out["precision"] = "bf16-mixed"
        return out

    def close(self) -> None:
        self.model = None


class AdapterOffReference(LocalReference):
    """The reference of a LoRA job: the policy itself with its adapter off (peft
    `disable_adapter()`), which is the base; no second copy of the model. Made without a model
    (`make_reference` for a LoRA job whose reference is its base); `bind(policy)` once the job's
    peft policy is loaded (`_train` loads it before the reference log-probs then). Always the
    policy's own packed forward (no KV-cache prefix reuse: a checkpointed policy has no cache)."""

    prefix_reuse = False

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", batch_items: int = 64,
                 dtype: str = "float32"):
        self.model_dir = Path(model_dir)
        self.device, self.batch_items, self.wanted = device, batch_items, dtype
        self.peft = self.model = None
        self.dtype = "bfloat16" if dtype != "float32" else "float32"

    def bind(self, peft_model) -> None:
        from rlhf.trainer.logprobs import unwrap_adapter

        self.peft = peft_model
        self.model = unwrap_adapter(peft_model)  # the layers, with the adapter in them
        self.mixed = Precision(self.wanted, device=self.device) if self.wanted == "bf16-mixed" \
            else None
        self.dtype = ("bfloat16" if self.mixed else
                      str(next(self.model.parameters()).dtype).removeprefix("torch."))
        cfg = self.model.config
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or 0)
        self.pad_id = int(pad[0] if isinstance(pad, (list, tuple)) else pad)

    def sequence_logps(self, items: Sequence[Item]) -> list[float]:
        if self.peft is None:
            raise DPOError("the adapter-off reference is not bound to the job's policy")
        with self.peft.disable_adapter():
            return super().sequence_logps(items)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "adapter": "off"}

    def close(self) -> None:  # the policy is the job's: nothing of its own to free
        self.peft = self.model = None


class ServiceReference:
    """The ReferenceService, called with `batch_items` sequences per request; the items with the
    same prompt (a pair) go in one request, where the service computes the prompt once."""

    def __init__(self, client, *, batch_items: int = 64, timeout: float | None = None,
                 own_client: bool = False):
        self.client = client  # rlhf_client.ReferenceClient (sync)
        self.batch_items = batch_items
        self.timeout = timeout
        self.own_client = own_client  # close() closes the client
        self.model: dict[str, str] | None = None  # name/version the service reported
        self.dtype: str | None = None  # the dtype it computed in ("unknown": it did not say)

    def sequence_logps(self, items: Sequence[Item]) -> list[float]:
        out: list[float] = [0.0] * len(items)
        for idx in prompt_batches(items, self.batch_items):
            res = self.client.logprobs([(list(items[i][0]), list(items[i][1])) for i in idx],
                                       timeout=self.timeout)
            ref = {"name": res.model.name, "version": res.model.version}
            dtype = getattr(res, "dtype", "") or "unknown"
            if self.model is None:
                self.model, self.dtype = ref, dtype
            elif ref != self.model:
                raise DPOError("the reference service changed version during the job: "
                               f"{self.model} -> {ref}")
            elif dtype != self.dtype:
                raise DPOError("the reference service changed dtype during the job: "
                               f"{self.dtype} -> {dtype}")
            for i, r in zip(idx, res.results):
                out[i] = float(r.sum)
        return out

    def describe(self) -> dict[str, Any]:
        return {"source": "service", "model": self.model, "dtype": self.dtype}

    def close(self) -> None:
        if self.own_client:
            self.client.close()


def attach_reference_logps(pairs: Sequence[TokenizedPair], source: ReferenceSource, *,
                           batch_pairs: int = 256) -> int:
    """Fill `ref_chosen` / `ref_rejected` of every pair that lacks them (computed once, cached on
    the pair); returns how many pairs were computed."""
    todo = [p for p in pairs if not p.has_reference]
    for s in range(0, len(todo), batch_pairs):
        chunk = todo[s : s + batch_pairs]
        items: list[Item] = [(p.prompt_ids, p.chosen_ids) for p in chunk]
        items += [(p.prompt_ids, p.rejected_ids) for p in chunk]
        values = source.sequence_logps(items)
        for k, p in enumerate(chunk):
            p.ref_chosen, p.ref_rejected = float(values[k]), float(values[len(chunk) + k])
    return len(todo)


# ------------------------------------------------------------------------------------------------
# The DPO step
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DPOLossConfig:
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    rpo_alpha: float = 0.0

    @classmethod
    def from_spec(cls, spec: DPOJob) -> "DPOLossConfig":
        return cls(spec.loss_type, spec.beta, spec.label_smoothing, spec.simpo_gamma,
                   spec.rpo_alpha)


def pair_logps(model, pairs: Sequence[TokenizedPair], *, pad_id: int):
    """Policy sequence log-probs of a batch: (chosen (B,), rejected (B,), chosen_len (B,),
    rejected_len (B,)); chosen and rejected rows share the forward passes."""
    from rlhf.trainer.logprobs import completion_logprobs

    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs]
    rows += [(p.prompt_ids, p.rejected_ids) for p in pairs]
    out = completion_logprobs(model, rows, pad_id=pad_id)
    b = len(pairs)
    return out.sums[:b], out.sums[b:], out.counts[:b], out.counts[b:]


def batch_loss(model, pairs: Sequence[TokenizedPair], cfg: DPOLossConfig, *, pad_id: int):
    """Mean loss of a batch (graph attached) and its metrics (plain floats): loss, accuracy
    (implicit-reward accuracy, ties count half), margin, chosen_reward, rejected_reward."""
    import torch

    from rlhf.trainer.losses import dpo_loss, preference_metrics

    pi_c, pi_r, n_c, n_r = pair_logps(model, pairs, pad_id=pad_id)
    ref_c = ref_r = None
    if cfg.loss_type not in REFERENCE_FREE_LOSSES:
        if not all(p.has_reference for p in pairs):
            raise DPOError("reference log-probs missing: call attach_reference_logps first")
        ref_c = torch.tensor([p.ref_chosen for p in pairs], dtype=pi_c.dtype, device=pi_c.device)
        ref_r = torch.tensor([p.ref_rejected for p in pairs], dtype=pi_r.dtype, device=pi_r.device)
    losses, rc, rr = dpo_loss(
        pi_c, pi_r, ref_c, ref_r, beta=cfg.beta, loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma, rpo_alpha=cfg.rpo_alpha,
        chosen_len=n_c.to(pi_c.device), rejected_len=n_r.to(pi_r.device),
    )
    loss = losses.mean()
    metrics = {"loss": float(loss.detach()), **preference_metrics(rc, rr)}
    return loss, metrics


def train_step(model, optimizer, micro_batches: Sequence[Sequence[TokenizedPair]],
               cfg: DPOLossConfig, *, pad_id: int,
               max_grad_norm: float | None = 1.0, step: int = 1,
               total: int = 1, precision: "Precision | None" = None) -> dict[str, float]:
    """One optimizer step over `micro_batches` (gradient accumulation: each micro-batch's mean
    loss weighted 1/len(micro_batches)), clipping, AdamW; returns pair-weighted mean metrics
    (and `grad_norm`, the norm before clipping, when clipping). Forward passes run under
    `precision.autocast()` (backward outside it).

    Raises `finite.TrainingDiverged` naming `step` (of `total`), before the optimizer applies
    anything, when the loss or the gradient norm is NaN or infinite."""
    from rlhf.trainer.finite import check_finite, grad_norm

    from rlhf.trainer.distributed import current

    group = current()  # a data-parallel rank: its shard, weighed by its share of the global count
    sums: dict[str, float] = {}
    n = 0
    for batch in micro_batches:
        share = None
        if group is not None:
            batch = group.shard(batch)
            share = len(batch) / group.global_count(len(batch))
        with precision.autocast() if precision is not None else nullcontext():
            loss, m = batch_loss(model, batch, cfg, pad_id=pad_id)
        ((loss if share is None else loss * share) / len(micro_batches)).backward()
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v * len(batch)
        n += len(batch)
    if group is not None:  # the global batch's metrics and gradient (the ranks' sum)
        keys = sorted(sums)
        sums = group.sum_metrics({**sums, "#pairs": n}, [*keys, "#pairs"])
        n = sums.pop("#pairs")
        group.sync_grads(model)
    out = {k: v / n for k, v in sums.items()}
    norm = grad_norm(model.parameters(), max_grad_norm)
    if max_grad_norm is not None:
        out["grad_norm"] = norm
    check_finite(step, total, loss=out.get("loss"), grad_norm=norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def evaluate(model, pairs: Sequence[TokenizedPair], cfg: DPOLossConfig, *, pad_id: int,
             batch_size: int = 16, precision: "Precision | None" = None) -> dict[str, float]:
    """Loss and reward metrics over `pairs` (no gradients), pair-weighted means."""
    import torch

    totals: dict[str, float] = {}
    with torch.inference_mode(), precision.autocast() if precision is not None else nullcontext():
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s : s + batch_size]
            _, m = batch_loss(model, chunk, cfg, pad_id=pad_id)
            for k, v in m.items():
                totals[k] = totals.get(k, 0.0) + v * len(chunk)
    return {k: v / max(1, len(pairs)) for k, v in totals.items()}


# ------------------------------------------------------------------------------------------------
# The plain training function
# ------------------------------------------------------------------------------------------------


@dataclass
class DPOTrainResult:
    metrics: dict[str, Any]
    applied_ids: list[str]  # payload ids with a pair in at least one optimizer step, sorted
    eval_ids: list[str]  # payload ids of the held-out pairs, sorted
    unapplied_ids: list[str]  # training payload ids no step reached (max_steps < one pass)
    reference: dict[str, Any] = field(default_factory=dict)


def make_reference(spec: DPOJob, *, base_dir: str | Path, store=None, device: str = "cpu",
                   token: str | None = None, dtype: str | None = None) -> "ReferenceSource":
    """The reference source the spec names (`store` resolves `reference.version`); a local one
    is computed in `dtype` (default: the job's own `spec.dtype`, the precision the policy
    computes in; a weights dtype such as "bfloat16" loads it so, see `LocalReference`)."""
    ref = spec.reference
    if ref.source == "service":
        from rlhf_client import ReferenceClient

        return ServiceReference(ReferenceClient(ref.target, token=token, timeout=ref.timeout_s),
                                batch_items=ref.batch_items, timeout=ref.timeout_s, own_client=True)
    if ref.model_dir is not None:
        ref_dir = Path(ref.model_dir)
    elif ref.version is not None:
        if store is None:
            raise DPOError("reference.version needs the model store")
        store.verify(spec.model_name, ref.version)
        ref_dir = store.path(spec.model_name, ref.version)
    else:
        ref_dir = Path(base_dir)
        if getattr(spec, "lora", None) is not None:  # the base = the policy with its adapter off
            return AdapterOffReference(ref_dir, device=device, batch_items=ref.batch_items,
                                       dtype=spec.dtype if dtype is None else dtype)
    return LocalReference(ref_dir, device=device, batch_items=ref.batch_items,
                          dtype=spec.dtype if dtype is None else dtype)


def _lr_factor(step: int, total: int, spec: DPOJob) -> float:
    if spec.warmup_steps and step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    if spec.lr_schedule == "linear":
        span = max(1, total - spec.warmup_steps)
        return max(0.0, 1.0 - (step - spec.warmup_steps) / span)
    return 1.0


StepFn = Callable[[int, int, dict[str, float]], None]


@dataclass
class StepsRun:
    """What `run_optimizer_steps` did: the first and last steps' metrics, the ids of every item
    that was in a step, the optimizer steps' wall time."""

    first: dict[str, float]
    last: dict[str, float]
    seen: set[str]
    seconds: float


def run_optimizer_steps(items: Sequence[Any], *, spec, total: int, optimizer, scheduler,
                        step: Callable[[list[list[Any]], int], dict[str, float]],
                        progress: StepFn | None = None,
                        check: Callable[[], None] | None = None) -> StepsRun:
    """`total` optimizer steps over `items` (each with an `id`), the loop DPO and SFT share:
    every step takes `spec.grad_accum_steps` micro-batches of `spec.batch_size` items from a
    seeded shuffle (`spec.seed`; a fresh shuffle appended when fewer are left, so passes run into
    each other), calls `step(micro_batches, step_number)` → metrics, advances the schedule, then
    `progress(step, total, {"train_<k>": v, "lr": lr})` and `check()` (which may raise to stop)."""
    rng = random.Random(spec.seed)
    order: list[int] = []
    seen: set[str] = set()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    t0 = time.perf_counter()
    for n in range(1, total + 1):
        micro = []
        for _ in range(spec.grad_accum_steps):
            if len(order) < spec.batch_size:  # next pass: a fresh shuffle after what is left
                fresh = list(range(len(items)))
                rng.shuffle(fresh)
                order += fresh
            micro.append([items[i] for i in order[: spec.batch_size]])
            del order[: spec.batch_size]
            seen.update(x.id for x in micro[-1])
        lr = optimizer.param_groups[0]["lr"]
        last = step(micro, n)
        first = first or dict(last)
        scheduler.step()
        if progress is not None:
            progress(n, total, {**{f"train_{k}": v for k, v in last.items()}, "lr": lr})
        if check is not None:
            check()
    return StepsRun(first, last, seen, time.perf_counter() - t0)


def train_dpo(
    spec: DPOJob,
    pairs: Sequence[Any],
    *,
    base_dir: str | Path,
    out_dir: str | Path | None = None,
    eval_pairs: Sequence[Any] = (),
    reference: "ReferenceSource | None" = None,
    progress: StepFn | None = None,
    check: Callable[[], None] | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> DPOTrainResult:
    """Train the policy in `base_dir` on `pairs` with DPO; save it to `out_dir` (when given).

    `pairs` / `eval_pairs`: `data.Pair`s, PreferencePair messages or mappings with prompt /
    chosen / rejected (and an id). `reference` overrides the spec's reference source (its
    default: `make_reference`). `progress(step, total, metrics)` after every optimizer step;
    `check()` too (it may raise to stop). `threads` sets torch's intra-op threads for the call.
    Raises `DPOError` when no pair is usable. Deterministic for a seed and thread count.
    """
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(spec, pairs, base_dir=Path(base_dir), out_dir=out_dir, eval_pairs=eval_pairs,
                      reference=reference, progress=progress, check=check, device=device)
    finally:
        torch.set_num_threads(previous)


def _train(spec, pairs, *, base_dir, out_dir, eval_pairs, reference, progress, check, device):
    import torch

    from rlhf.models.loading import load_tokenizer
    from rlhf.models.tiny import quiet_progress_bars
    from rlhf.trainer.finite import check_finite_weights

    t_start = time.perf_counter()
    tokenizer = load_tokenizer(base_dir, padding_side="right")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    train, skipped = encode_pairs(tokenizer, pairs, max_length=spec.max_length,
                                  append_eos=spec.append_eos)
    held, skipped_eval = encode_pairs(tokenizer, eval_pairs, max_length=spec.max_length,
                                      append_eos=spec.append_eos)
    if not train:
        raise DPOError(f"no usable preference pairs ({skipped} of {len(pairs)} skipped: a prompt "
                       f"that fills max_length={spec.max_length}, or an empty response)")

    cfg = DPOLossConfig.from_spec(spec)
    precision = Precision.of(spec, device)
    ref_info: dict[str, Any] = {"source": "none"}
    model = None
    if spec.needs_reference:
        own = reference is None
        source = make_reference(spec, base_dir=base_dir, device=device) if own else reference
        if isinstance(source, AdapterOffReference):  # LoRA: the policy is its own reference
            torch.manual_seed(spec.seed)
            model = precision.load_causal_lm(base_dir)
            source.bind(model)
        t0 = time.perf_counter()
        try:
            computed = attach_reference_logps(train + held, source)
        finally:
            if own:
                source.close()  # free a local reference model before the policy trains
        ref_info = {**source.describe(), "computed_pairs": computed,
                    "seconds": round(time.perf_counter() - t0, 3)}

    if model is None:
        torch.manual_seed(spec.seed)
        # eval mode (no dropout: policy and reference log-probs are compared like for like),
        # the job's weights dtype and gradient checkpointing (and LoRA adapter)
        model = precision.load_causal_lm(base_dir)
    policy_dtype = precision.compute_dtype
    if spec.needs_reference:
        ref_info["dtype"] = ref_info.get("dtype") or "unknown"
        ref_info["dtype_matches_policy"] = ref_info["dtype"] == policy_dtype
        if not ref_info["dtype_matches_policy"]:
            log.warning("DPO reference log-probs were computed in %s but the policy trains in %s: "
                        "the reference terms are not the policy's own at step 0 (the loss does not "
                        "start at log 2 even from the reference checkpoint); serve the reference "
                        "in %s to compare like for like", ref_info["dtype"], policy_dtype,
                        policy_dtype)
    initial = evaluate(model, held, cfg, pad_id=pad_id, batch_size=spec.batch_size,
                       precision=precision) if held else {}
    opt = make_optimizer(model, lr=spec.learning_rate, betas=spec.adam_betas, eps=spec.adam_eps,
                         weight_decay=spec.weight_decay)
    per_step = spec.batch_size * spec.grad_accum_steps
    total = spec.max_steps or spec.epochs * math.ceil(len(train) / per_step)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, spec))

    run = run_optimizer_steps(
        train, spec=spec, total=total, optimizer=opt, scheduler=sched, progress=progress,
        check=check, step=lambda micro, n: train_step(
            model, opt, micro, cfg, pad_id=pad_id, max_grad_norm=spec.max_grad_norm, step=n,
            total=total, precision=precision))
    first, last, seen, train_s = run.first, run.last, run.seen, run.seconds
    check_finite_weights(model, total, total)

    metrics: dict[str, Any] = {
        "train_pairs": len(train),
        "eval_pairs": len(held),
        "skipped_pairs": skipped + skipped_eval,
        "steps": total,
        "loss_type": spec.loss_type,
        "beta": spec.beta,
        **{f"train_{k}": v for k, v in last.items()},
        "train_loss_first_step": first.get("loss"),
        "train_margin_first_step": first.get("margin"),
        "policy_dtype": policy_dtype,
        **precision.record(),
        "train_seconds": round(train_s, 3),
        "pairs_per_s": round(total * per_step / train_s, 2) if train_s > 0 else None,
    }
    if held:
        final = evaluate(model, held, cfg, pad_id=pad_id, batch_size=spec.batch_size,
                         precision=precision)
        metrics.update({f"eval_{k}": v for k, v in final.items()})
        metrics.update({f"eval_{k}_initial": v for k, v in initial.items()})
    if spec.needs_reference:
        metrics["reference_seconds"] = ref_info["seconds"]
        metrics["reference_dtype"] = ref_info["dtype"]
    metrics["seconds"] = round(time.perf_counter() - t_start, 3)
    if out_dir is not None:
        with quiet_progress_bars():
            model.save_pretrained(out_dir)
            tokenizer.save_pretrained(out_dir)
    return DPOTrainResult(metrics, sorted(seen), sorted({p.id for p in held}),
                          sorted({p.id for p in train} - seen), ref_info)


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------


def run_dpo_job(spec: DPOJob, ctx: "JobContext") -> "JobResult":
    """Read → split → reference log-probs → train → publish → commit → (activate).

    Safe to run again after a crash: a version this job already published is finished off, not
    trained again; stream entries are acked only after the version is committed.
    """
    from rlhf.trainer.jobs import JobResult
    from rlhf.trainer.pipeline import (PREFERENCES, publish_and_finish, read_inputs, step_reporter,
                                       version_extra)

    got = read_inputs(spec, ctx, reader=PREFERENCES, job_type=JOB_TYPE, metric_keys=METRIC_KEYS,
                      stage={"stage": "reference"})
    if isinstance(got, JobResult):
        return got
    settings = ctx.settings
    on_step = step_reporter(ctx, JOB_TYPE)
    token = settings.auth_token.get_secret_value() if settings.auth_token is not None else None
    reference = None
    if spec.needs_reference:
        reference = make_reference(spec, base_dir=got.base.model_dir, store=got.store,
                                   device=settings.device, token=token)  # in the job's dtype
    with tempfile.TemporaryDirectory(prefix="rlhf-dpo-") as tmp:
        try:
            if spec.distributed is not None:  # torchrun ranks, this task their controller
                from rlhf.trainer.distributed import train_dpo_distributed

                result = train_dpo_distributed(
                    spec, got.train, base_dir=got.base.model_dir, out_dir=tmp,
                    eval_pairs=got.evals, reference=reference, progress=on_step, ctx=ctx,
                    device=settings.device, threads=settings.torch_threads)
            else:
                result = train_dpo(spec, got.train, base_dir=got.base.model_dir, out_dir=tmp,
                                   eval_pairs=got.evals, reference=reference, progress=on_step,
                                   check=ctx.check, device=settings.device,
                                   threads=settings.torch_threads)
        finally:
            if reference is not None:
                reference.close()
        ctx.check()
        # Entries whose pairs no step reached stay pending for a later job (see StreamConsumer).
        unapplied = set(result.unapplied_ids)
        extra = version_extra(
            spec, got, job_type=JOB_TYPE, applied_ids=result.applied_ids,
            eval_ids=result.eval_ids, unapplied_ids=result.unapplied_ids,
            stream_entries=[e.entry_id for e in got.entries if e.id not in unapplied],
            reference=result.reference)
        return publish_and_finish(spec, ctx, got, tmp, kind="policy", metrics=result.metrics,
                                  extra=extra, job_type=JOB_TYPE, metric_keys=METRIC_KEYS)

"""PPO and the critic-free family (GRPO, Dr. GRPO, RLOO, REINFORCE++) on scored samples.

    r_t = −β·KL_t  (+ the sample's score at its last token)      KL_t by `kl_estimator`
    advantages      by `advantage_estimator` (GAE on a critic, or a baseline over each group)
    loss            max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high))  ρ = π_θ / π_behaviour
                    + vf_coef·½·max((V − R)², (clip(V, V_old ± ε_v) − R)²) − entropy_coef·H
                    (+ β·KL with `kl_in` "loss")

The math lives in `rlhf.trainer.advantages` and `rlhf.trainer.ppo_losses` (pure functions picked
from registries); this module only feeds them. `train_ppo(spec, samples, base_dir=..., out_dir=...)`
is one PPO iteration as a plain function (tests, the benchmark and the in-process loop call it);
`run_ppo_job(spec, ctx)` is the job around it: read ScoredSamples (stream or JSONL) through the
shared frame (`pipeline.read_inputs` with the `SAMPLES` reader), drop stale ones, train, publish
the policy with its critic inside, commit the stream entries, activate if asked. The Celery task
`rlhf.train_ppo` only calls `jobs.execute(spec, run_ppo_job)`. The spec is `jobs.PPOJob`.

- Samples (`SampleRecord`): the whole trajectory the policy sampled (`completion_ids`) with its
  behaviour log-probs (raw model, temperature 1) and the reference's log-probs of the same
  tokens, the score, whether it ended (EOS / stop), the group (the n samples of one prompt) and
  the policy version that made it. Old log-probs are the behaviour log-probs: on fresh samples
  the first minibatch's ratio is 1 (the trainer's recomputation equals what the policy service
  reported, within the dtype's tolerance), so its clip fraction is 0.
- Policy log-probs and entropy come from `rlhf.trainer.logprobs.completion_logprobs` (packed;
  the samples of one prompt share one copy of it; the entropy is fused with the log-probs, no
  `(rows, width, vocab)` tensor exists). KL in the reward uses the behaviour log-probs (fixed for
  the iteration); KL as a loss term uses the current policy's.
- Critic (`gae` only): a `*ForSequenceClassification` with one label, V_t = its score head on
  the backbone's hidden state at the position that predicts completion token t
  (`logprobs.completion_values`). It comes from `<base>/value/` when the base carries one, else
  from `spec.critic` (a reward model: it must share the policy's vocabulary), else from the
  policy's own backbone with a zero-initialised head; it is saved to `<out>/value/`, so it is
  published atomically with the policy and the next job starting from that version goes on
  with it. A critic-free job copies the base's `value/` unchanged.
- β: fixed, or adaptive towards `kl_target` (Ziegler et al.), updated once per iteration from
  the batch's KL to the reference (mean per-sequence Σ_t k1) over the batch's samples; the next
  β is kept in the version (`ppo_state.json`) and the next job starting from it goes on from it.
- Optimisation: `ppo_epochs` passes over shuffled minibatches of `minibatch_size` samples (each
  computed in `grad_accum_steps` micro-batches, same gradient), the job's `dtype` and
  `gradient_checkpointing` for both models (`rlhf.trainer.precision`), AdamW per model (policy at
  `learning_rate`, critic at `value_learning_rate`), gradients clipped per model, dropout off
  (eval mode), early stop before a step whose approx-KL to the behaviour policy passes
  `max_approx_kl`. A NaN or infinite loss, gradient norm or weight fails the job naming the step
  before anything is applied or published (`rlhf.trainer.finite`).
- Staleness (the job): a sample whose policy version is more than `max_staleness` versions
  before the base version (the store's manifest parent chain, walked from the base) — or not on
  that chain at all — is acked and counted (`dropped_stale`), never trained on.
- Metrics per optimizer step (job record progress, the job's history stream, TRAIN_METRIC,
  `training_curves.json` in the version): score_mean, kl_ref, beta, clip_fraction, approx_kl,
  entropy, policy_loss, value_loss, explained_variance (and ratio_mean, value_clip_fraction,
  grad norms);
  `plot_ppo_curves` draws them (PNG, matplotlib's Agg backend).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_client.datafiles import DataError, SampleRecord, read_samples_jsonl

from rlhf.trainer.jobs import PPOJob
from rlhf.trainer.pipeline import Reader

if TYPE_CHECKING:
    import torch

    from rlhf.models.store import ModelStore
    from rlhf.trainer.jobs import JobContext, JobResult
    from rlhf.trainer.precision import Precision
    from rlhf.trainer.publish import Base

log = logging.getLogger(__name__)

JOB_TYPE = "ppo"
METRIC_KEYS = ("score_mean", "kl_ref", "beta", "clip_fraction", "approx_kl", "entropy",
               "policy_loss", "value_loss", "explained_variance")
#: The per-step curves `plot_ppo_curves` draws by default.
CURVE_KEYS = ("score_mean", "kl_ref", "beta", "clip_fraction", "approx_kl", "entropy",
              "value_loss", "explained_variance")
VALUE_DIR = "value"  # the critic, inside a policy version
STATE_FILE = "ppo_state.json"  # what the next iteration goes on from (β)
CURVES_FILE = "training_curves.json"  # the per-step metrics of the job that made the version

__all__ = [
    "PPOJob",
    "PPOError",
    "SampleRecord",
    "read_samples_jsonl",
    "SAMPLES",
    "version_lineage",
    "split_stale",
    "shape_scores",
    "PPOTrainResult",
    "train_ppo",
    "run_ppo_job",
    "load_curves",
    "plot_ppo_curves",
]


class PPOError(ValueError):
    """The job cannot run as specified (no usable sample, a critic that does not fit ...)."""


# ------------------------------------------------------------------------------------------------
# Samples
# ------------------------------------------------------------------------------------------------

def _check_sample_payload(payload) -> None:
    SampleRecord.from_payload(payload)


#: The PPO job's reader for the shared frame: ScoredSamples (anything else, or a sample without
#: per-token log-probs, is dead-lettered), one item per payload, no held-out split.
SAMPLES = Reader(
    noun="samples",
    validate=_check_sample_payload,
    items=lambda payload: [SampleRecord.from_payload(payload)],
    read_jsonl=read_samples_jsonl,
    min_count=lambda spec: spec.min_samples,
    split=lambda samples, spec: (list(samples), []),
)


def version_lineage(store: "ModelStore", name: str, base: "Base", depth: int) -> dict[str, int]:
    """{version: how many versions before the base it is} for the base and its ancestors up to
    `depth` back (the store's manifest parent chain). A base that is a bare directory (no store
    version) is known by the version a service pinned to it reports (`pinned-<hash>`)."""
    if base.version is None:
        from rlhf.serving.swap import pinned_ref

        return {pinned_ref(Path(base.model_dir)).version: 0}
    out: dict[str, int] = {}
    version: str | None = base.version
    for back in range(depth + 1):
        if version is None or version in out:
            break
        out[version] = back
        try:
            version = store.manifest(name, version).parent
        except (OSError, ValueError, TypeError):
            break
    return out


def split_stale(samples: Iterable[SampleRecord],
                lineage: Mapping[str, int]) -> tuple[list[SampleRecord], list[SampleRecord]]:
    """(fresh, stale): fresh samples were made by a version in `lineage` (the base or one of
    its last ancestors); every other one — older, another lineage, or no version — is stale."""
    fresh, stale = [], []
    for s in samples:
        (fresh if s.policy_version in lineage else stale).append(s)
    return fresh, stale


# ------------------------------------------------------------------------------------------------
# The critic
# ------------------------------------------------------------------------------------------------


def _backbone_state(policy) -> dict:
    """The policy's transformer weights as a plain model names them. A LoRA job's policy is a
    peft model: its layers hold `base_layer` plus the adapter's `lora_*` tensors; the critic
    starts from the base weights (the adapter is zero at the start, and the critic trains in
    full), so the adapter's tensors are dropped and `.base_layer.` names are unwrapped."""
    from peft import PeftModel

    if not isinstance(policy, PeftModel):
        return policy.base_model.state_dict()
    inner = policy.get_base_model().base_model
    return {k.replace(".base_layer.", "."): v for k, v in inner.state_dict().items()
            if "lora_" not in k}


def _critic_from_policy(policy, pad_id: int):
    """A value model with the policy's backbone (a copy) and a zero-initialised one-output head."""
    import torch
    from transformers import AutoModelForSequenceClassification

    cfg = policy.config.__class__.from_dict(policy.config.to_dict())
    cfg.num_labels = 1
    cfg.pad_token_id = pad_id
    cfg.architectures = None
    value = AutoModelForSequenceClassification.from_config(cfg)
    value.base_model.load_state_dict(_backbone_state(policy))
    with torch.no_grad():
        value.score.weight.zero_()
        if getattr(value.score, "bias", None) is not None:
            value.score.bias.zero_()
    device = next(policy.parameters()).device
    return value.to(device=device, dtype=next(policy.parameters()).dtype).eval()


def _load_critic(spec: PPOJob, base_dir: Path, policy, *, pad_id: int, critic_dir, store,
                 device: str):
    """(value model, description): `<base>/value/`, else `critic_dir`, else `spec.critic`, else
    the policy's backbone with a zero head."""
    from rlhf.models.loading import load_reward_model

    source, where = None, None
    if (base_dir / VALUE_DIR / "config.json").is_file():
        source, where = "base", base_dir / VALUE_DIR
    elif critic_dir is not None:
        source, where = "critic", Path(critic_dir)
    elif spec.critic.init_dir is not None:
        source, where = "critic.init_dir", Path(spec.critic.init_dir)
    elif spec.critic.init_model is not None:
        if store is None or spec.critic.init_version is None:
            raise PPOError("critic.init_model: resolving a reward model's version needs the model "
                           "store and a version (run_ppo_job resolves the active one)")
        store.verify(spec.critic.init_model, spec.critic.init_version)
        source = "critic.init_model"
        where = store.path(spec.critic.init_model, spec.critic.init_version)
    if where is None:
        return _critic_from_policy(policy, pad_id), {"source": "policy", "init": "zero head"}
    value = load_reward_model(where, device=device)
    if value.config.vocab_size != policy.config.vocab_size:
        raise PPOError(f"{source}: the value model at {where} has vocab_size "
                       f"{value.config.vocab_size}, the policy {policy.config.vocab_size}: a "
                       "critic must share the policy's vocabulary")
    value.config.pad_token_id = pad_id
    return value.eval(), {"source": source, "dir": str(where)}


def resolve_critic_dir(spec: PPOJob, store: "ModelStore", registry, base: "Base") -> Path | None:
    """The directory `spec.critic` names when the base carries no critic (None: none named, or
    the base's own `value/` is used)."""
    if (Path(base.model_dir) / VALUE_DIR / "config.json").is_file() or not spec.uses_critic:
        return None
    if spec.critic.init_dir is not None:
        return Path(spec.critic.init_dir)
    if spec.critic.init_model is None:
        return None
    name = spec.critic.init_model
    version = spec.critic.init_version or registry.active(name)
    if version is None:
        raise PPOError(f"critic.init_model: model {name!r} has no active version")
    store.verify(name, version)
    return store.path(name, version)


# ------------------------------------------------------------------------------------------------
# One iteration
# ------------------------------------------------------------------------------------------------


@dataclass
class PPOTrainResult:
    metrics: dict[str, Any]
    applied_ids: list[str]  # sample ids the iteration trained on, sorted
    skipped_ids: list[str]  # samples it could not use (too long for the model ...), sorted
    curves: list[dict[str, float]] = field(default_factory=list)  # per optimizer step
    critic: dict[str, Any] = field(default_factory=dict)  # where the value model came from
    state: dict[str, Any] = field(default_factory=dict)  # what the next iteration goes on from


StepFn = Callable[[int, int, dict[str, float]], None]


def train_ppo(
    spec: PPOJob,
    samples: Sequence[Any],
    *,
    base_dir: str | Path,
    out_dir: str | Path | None = None,
    progress: StepFn | None = None,
    check: Callable[[], None] | None = None,
    device: str = "cpu",
    threads: int | None = None,
    critic_dir: str | Path | None = None,
    store: "ModelStore | None" = None,
) -> PPOTrainResult:
    """One PPO iteration: train the policy in `base_dir` on `samples` and save it (with its
    critic in `value/`, `ppo_state.json` and `training_curves.json`) to `out_dir` when given.

    `samples`: `SampleRecord`s, ScoredSample messages or mappings (duplicate ids count once).
    The critic (`gae`) comes from `<base_dir>/value/`, else `critic_dir`, else `spec.critic`
    (`store` resolves `critic.init_model` + `init_version`), else the policy's backbone with a
    zero head. `progress(step, total, metrics)` after every optimizer step; `check()` too (it
    may raise to stop). `threads` sets torch's intra-op threads for the call. Raises `PPOError`
    when no sample is usable. Deterministic for a seed and thread count.
    """
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(spec, samples, base_dir=Path(base_dir), out_dir=out_dir, progress=progress,
                      check=check, device=device, critic_dir=critic_dir, store=store)
    finally:
        torch.set_num_threads(previous)


@dataclass
class _Batch:
    """The iteration's samples as `(B, T)` tensors (T = longest completion), fixed for it."""

    records: list[SampleRecord]
    mask: "torch.Tensor"  # (B, T) bool
    old_logp: "torch.Tensor"  # (B, T) behaviour log-probs
    ref_logp: "torch.Tensor"  # (B, T)
    raw_scores: "torch.Tensor"  # (B,) as scored
    advantages: "torch.Tensor"  # (B, T)
    returns: "torch.Tensor | None"  # (B, T) gae only
    old_values: "torch.Tensor | None"  # (B, T) gae only

    def rows(self, idx: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        return [(self.records[i].prompt_ids, self.records[i].completion_ids) for i in idx]


def _padded(rows: Sequence[Sequence[float]], width: int, device) -> "torch.Tensor":
    import torch

    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out.to(device)


def _scatter(values: "torch.Tensor", mask: "torch.Tensor") -> "torch.Tensor":
    """Per-token values `(N,)` in row order → `(B, T)` on `mask` (0 elsewhere), graph kept."""
    import torch

    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(
        mask, values)


def _read_state(base_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((base_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _finite_or_none(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in metrics.items()}


def _train(spec: PPOJob, samples, *, base_dir: Path, out_dir, progress, check, device, critic_dir,
           store) -> PPOTrainResult:
    import torch

    from rlhf.models.loading import load_tokenizer, max_context
    from rlhf.models.tiny import quiet_progress_bars
    from rlhf.trainer.advantages import (
        AdvantageInputs,
        compute_advantages,
        kl_controller,
        kl_penalty,
    )
    from rlhf.trainer.finite import check_finite_weights
    from rlhf.trainer.logprobs import completion_values
    from rlhf.trainer.precision import Precision, make_optimizer

    t_start = time.perf_counter()
    records: list[SampleRecord] = []
    seen: set[str] = set()
    duplicates = 0
    for s in samples:
        rec = SampleRecord.of(s)
        if rec.id in seen:
            duplicates += 1
            continue
        seen.add(rec.id)
        records.append(rec)

    tokenizer = load_tokenizer(base_dir, padding_side="right")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    torch.manual_seed(spec.seed)
    precision = Precision.of(spec, device)
    policy = precision.load_causal_lm(base_dir)  # eval mode: the ratio compares like with like
    vocab, context = policy.config.vocab_size, max_context(policy.config)
    usable = [r for r in records if len(r.prompt_ids) + len(r.completion_ids) <= context
              and 0 <= min(r.prompt_ids + r.completion_ids)
              and max(r.prompt_ids + r.completion_ids) < vocab]
    skipped = sorted({r.id for r in records} - {r.id for r in usable})
    if not usable:
        raise PPOError(f"no usable samples ({len(skipped)} of {len(records)} longer than the "
                       f"model's context {context} or holding token ids outside its vocabulary)")
    dev = next(policy.parameters()).device

    value_model, critic = None, {"source": "none"}
    if spec.uses_critic:
        value_model, critic = _load_critic(spec, base_dir, policy, pad_id=pad_id,
                                           critic_dir=critic_dir, store=store, device=device)
        value_model = precision.prepare(value_model, adapter=False)  # a LoRA job's critic:
        # full weights (saved beside the adapter; see rlhf.models.adapters)

    # --- the batch: fixed tensors, rewards, advantages ----------------------------------------
    B, T = len(usable), max(len(r.completion_ids) for r in usable)
    mask = _padded([[1.0] * len(r.completion_ids) for r in usable], T, dev).bool()  # (B, T)
    old_logp = _padded([r.behaviour_logprobs for r in usable], T, dev)  # (B, T)
    ref_logp = _padded([r.reference_logprobs for r in usable], T, dev)  # (B, T)
    raw_scores = torch.tensor([r.score for r in usable], dtype=torch.float32, device=dev)  # (B,)
    ended = torch.tensor([r.ended for r in usable], dtype=torch.bool, device=dev)  # (B,)
    scores = shape_scores(raw_scores, ended, spec)
    group_names = {g: k for k, g in enumerate(dict.fromkeys(r.group_id for r in usable))}
    group = torch.tensor([group_names[r.group_id] for r in usable], dtype=torch.long, device=dev)
    group_sizes = torch.bincount(group).tolist()

    state = _read_state(base_dir)
    beta = spec.kl_coef
    if spec.kl_target is not None and state.get("kl_target") == spec.kl_target \
            and isinstance(state.get("beta"), (int, float)):
        beta = float(state["beta"])  # the adaptive β goes on from the previous iteration
    controller = kl_controller(beta, spec.kl_target, spec.kl_horizon)
    beta = controller.value
    # the samples' KL to the reference: mean over samples of Σ_t k1 (behaviour policy)
    kl_k1_rollout = float((kl_penalty(old_logp, ref_logp, "k1") * mask).sum(-1).mean())
    if spec.kl_in == "reward":
        kl_rewards = -beta * kl_penalty(old_logp, ref_logp, spec.kl_estimator) * mask  # (B, T)
    else:
        kl_rewards = torch.zeros_like(old_logp)

    old_values = None
    if value_model is not None:
        with torch.inference_mode(), precision.autocast():  # V_old as V is computed
            parts = [completion_values(value_model, [(r.prompt_ids, r.completion_ids)
                                                     for r in usable[s : s + 64]], pad_id=pad_id)
                     for s in range(0, B, 64)]
        old_values = _scatter(torch.cat(parts).float(), mask).clone()  # (B, T)
    advantages, returns = compute_advantages(spec.advantage_estimator, AdvantageInputs(
        scores=scores, kl_rewards=kl_rewards, mask=mask, group=group, values=old_values,
        gamma=spec.gamma, lam=spec.lam, whiten=spec.whiten_advantages))
    batch = _Batch(usable, mask, old_logp, ref_logp, raw_scores, advantages.detach(),
                   None if returns is None else returns.detach(), old_values)
    norm = float(spec.max_new_tokens_norm or T)  # seq-mean-token-sum-norm's constant

    # --- epochs over minibatches --------------------------------------------------------------
    opt = make_optimizer(policy, lr=spec.learning_rate, betas=spec.adam_betas, eps=spec.adam_eps,
                         weight_decay=spec.weight_decay)
    vopt = None
    if value_model is not None:
        vopt = make_optimizer(value_model, lr=spec.value_learning_rate, betas=spec.adam_betas,
                              eps=spec.adam_eps, weight_decay=spec.weight_decay)
    per_epoch = math.ceil(B / spec.minibatch_size)
    total = spec.ppo_epochs * per_epoch
    rng = random.Random(spec.seed)
    curves: list[dict[str, float]] = []
    step, stopped_at, epochs_run = 0, None, 0
    t_train = time.perf_counter()
    for epoch in range(spec.ppo_epochs):
        order = list(range(B))
        rng.shuffle(order)
        epochs_run = epoch + 1
        for s in range(0, B, spec.minibatch_size):
            step += 1
            m = _minibatch_step(spec, policy, value_model, opt, vopt, batch,
                                order[s : s + spec.minibatch_size], beta=beta, norm=norm,
                                pad_id=pad_id, step=step, total=total, precision=precision)
            if m is None:  # approx-KL past max_approx_kl: nothing applied, the iteration ends
                stopped_at = step
                step -= 1
                break
            m = {"epoch": float(epoch + 1), "step": float(step), **m}
            curves.append(m)
            if progress is not None:
                progress(step, total, m)
            if check is not None:
                check()
        if stopped_at is not None:
            break
    train_s = time.perf_counter() - t_train
    check_finite_weights(policy, step, total)
    if value_model is not None:
        check_finite_weights(value_model, step, total)
    controller.update(kl_k1_rollout, B)  # β for the next iteration

    last = curves[-1] if curves else {}
    lengths = [len(r.completion_ids) for r in usable]
    metrics: dict[str, Any] = {
        "samples": B,
        "skipped_samples": len(skipped),
        "duplicate_samples": duplicates,
        "groups": len(group_sizes),
        "incomplete_groups": sum(1 for n in group_sizes if n < spec.group_size),
        "advantage_estimator": spec.advantage_estimator,
        "kl_estimator": spec.kl_estimator,
        "kl_in": spec.kl_in,
        "loss_aggregation": spec.aggregation,
        "steps": step,
        "planned_steps": total,
        "epochs_run": epochs_run,
        "early_stopped": stopped_at is not None,
        "early_stop_step": stopped_at,
        "score_mean": float(raw_scores.mean()),
        "score_std": float(raw_scores.std()) if B > 1 else 0.0,
        "ended_fraction": float(ended.float().mean()),
        "completion_tokens_mean": sum(lengths) / B,
        "kl_ref": kl_k1_rollout,  # the samples' KL to the reference (behaviour policy)
        "beta": beta,
        "beta_next": controller.value,
        **{f"{k}_last": last[k] for k in ("kl_ref", "clip_fraction", "approx_kl", "entropy",
                                          "policy_loss", "value_loss", "explained_variance",
                                          "ratio_mean") if k in last},
        "clip_fraction_first_step": curves[0]["clip_fraction"] if curves else None,
        "ratio_mean_first_step": curves[0]["ratio_mean"] if curves else None,
        "clip_fraction": last.get("clip_fraction"),
        "approx_kl": last.get("approx_kl"),
        "entropy": last.get("entropy"),
        "policy_loss": last.get("policy_loss"),
        "value_loss": last.get("value_loss"),
        "explained_variance": last.get("explained_variance"),
        "policy_dtype": precision.compute_dtype,
        **precision.record(),
        "critic": critic["source"],
        "train_seconds": round(train_s, 3),
        "samples_per_s": round(B * epochs_run / train_s, 2) if train_s > 0 else None,
    }
    metrics["seconds"] = round(time.perf_counter() - t_start, 3)
    # what was not measured (no critic, no step) or is undefined (NaN) is left out
    metrics = {k: v for k, v in _finite_or_none(metrics).items() if v is not None}
    next_state = {"beta": controller.value, "kl_target": spec.kl_target, "kl_coef": spec.kl_coef,
                  "iterations": int(state.get("iterations", 0)) + 1}
    if out_dir is not None:
        out = Path(out_dir)
        with quiet_progress_bars():
            policy.save_pretrained(out)
            tokenizer.save_pretrained(out)
            if value_model is not None:
                value_model.save_pretrained(out / VALUE_DIR)
                tokenizer.save_pretrained(out / VALUE_DIR)
            elif (base_dir / VALUE_DIR).is_dir():  # critic-free: the critic goes on unchanged
                shutil.copytree(base_dir / VALUE_DIR, out / VALUE_DIR, dirs_exist_ok=True)
        (out / STATE_FILE).write_text(json.dumps(next_state, indent=2, sort_keys=True))
        (out / CURVES_FILE).write_text(json.dumps(
            {"keys": list(CURVE_KEYS), "steps": [_finite_or_none(c) for c in curves]},
            indent=1, sort_keys=True))
    return PPOTrainResult(metrics, sorted(r.id for r in usable), skipped,
                          [_finite_or_none(c) for c in curves], critic, next_state)


def shape_scores(scores: "torch.Tensor", ended: "torch.Tensor", spec: PPOJob) -> "torch.Tensor":
    """The scores `(B,)` the rewards are made of: a sample that did not end (`ended` `(B,)`
    False: no EOS / stop) gets `missing_eos_penalty` added or `missing_eos_score` instead; then
    clipped to ±`reward_clip`; then, with `whiten_rewards`, scaled to unit variance over the
    batch (mean kept)."""
    import torch

    if spec.missing_eos_penalty is not None:
        scores = torch.where(ended, scores, scores + spec.missing_eos_penalty)
    if spec.missing_eos_score is not None:
        scores = torch.where(ended, scores, torch.full_like(scores, spec.missing_eos_score))
    if spec.reward_clip is not None:
        scores = scores.clamp(-spec.reward_clip, spec.reward_clip)
    if spec.whiten_rewards and scores.shape[0] > 1:
        from rlhf.trainer.advantages import masked_whiten

        scores = masked_whiten(scores[:, None], torch.ones_like(scores[:, None]),
                               shift_mean=False)[:, 0]
    return scores


def _micro_batches(idx: Sequence[int], n: int) -> list[list[int]]:
    size = math.ceil(len(idx) / max(1, n))
    return [list(idx[s : s + size]) for s in range(0, len(idx), size)]


def _minibatch_step(spec: PPOJob, policy, value_model, opt, vopt, batch: _Batch, idx: list[int], *,
                    beta: float, norm: float, pad_id: int, step: int,
                    total: int, precision: "Precision | None" = None) -> dict[str, float] | None:
    """One optimizer step on the samples `idx` (in `grad_accum_steps` micro-batches); its
    metrics, or None when its approx-KL passed `max_approx_kl` (nothing applied). The models'
    forward passes run under `precision.autocast()`, the losses in fp32, backward outside."""
    import torch

    from rlhf.trainer.advantages import kl_penalty
    from rlhf.trainer.finite import check_finite, grad_norm
    from rlhf.trainer.logprobs import completion_logprobs, completion_values
    from rlhf.trainer.ppo_losses import aggregate, explained_variance, policy_loss, value_loss

    from rlhf.trainer.distributed import current

    # a data-parallel rank takes its shard of each micro-batch; the weights below divide by the
    # minibatch's global counts (every rank holds the whole batch), so the ranks' summed
    # gradients and metrics are the one-process ones
    group = current()
    agg = spec.aggregation
    token_weighted = agg == "token-mean"
    tokens_all = float(batch.mask[idx].sum())
    sums: dict[str, float] = {}
    v_seen, r_seen = [], []
    for micro in _micro_batches(idx, spec.grad_accum_steps):
        if group is not None:
            micro = group.shard(micro)
            if not micro:
                continue
        width = int(batch.mask[micro].sum(-1).max())
        mask = batch.mask[micro, :width]  # (b, t)
        n_tok = float(mask.sum())
        weight = n_tok / tokens_all if token_weighted else len(micro) / len(idx)
        rows = batch.rows(micro)
        with precision.autocast() if precision is not None else nullcontext():
            out = completion_logprobs(policy, rows, pad_id=pad_id, entropy=True)
        logp = _scatter(out.tokens.float(), mask)  # (b, t)
        entropy = _scatter(out.entropy.float(), mask)  # (b, t)
        pl, st = policy_loss(logp, batch.old_logp[micro, :width], batch.advantages[micro, :width],
                             mask, clip_low=spec.clip_eps, clip_high=spec.clip_high,
                             dual_clip=spec.dual_clip, aggregation=agg, norm=norm)
        loss = pl
        if spec.entropy_coef:  # else the entropy is a metric only (no gradient through it)
            loss = loss - spec.entropy_coef * aggregate(entropy, mask, agg, norm)
        ref = batch.ref_logp[micro, :width]
        if spec.kl_in == "loss":
            kl = kl_penalty(logp, ref, spec.kl_estimator)  # (b, t) of the current policy
            loss = loss + beta * aggregate(kl, mask, agg, norm)
        vl = None
        if value_model is not None:
            with precision.autocast() if precision is not None else nullcontext():
                values = completion_values(value_model, rows, pad_id=pad_id)
            values = _scatter(values.float(), mask)
            vl, vst = value_loss(values, batch.old_values[micro, :width],
                                 batch.returns[micro, :width], mask, clip_eps=spec.value_clip_eps,
                                 aggregation=agg, norm=norm)
            loss = loss + spec.vf_coef * vl
            v_seen.append(values.detach()[mask])
            r_seen.append(batch.returns[micro, :width][mask])
        (loss * weight).backward()
        with torch.no_grad():
            kl_seq = (kl_penalty(logp.detach(), ref, "k1") * mask).sum(-1)  # (b,) Σ_t k1
            n_seq = len(micro)
            add = {
                "loss": (float(loss), weight),
                "policy_loss": (float(pl), weight),
                "clip_fraction": (st["clip_fraction"], n_tok / tokens_all),
                "approx_kl": (st["approx_kl"], n_tok / tokens_all),
                "ratio_mean": (st["ratio_mean"], n_tok / tokens_all),
                "entropy": (float(entropy[mask].mean()), n_tok / tokens_all),
                "kl_ref": (float(kl_seq.mean()), n_seq / len(idx)),
                "score_mean": (float(batch.raw_scores[micro].mean()), n_seq / len(idx)),
            }
            if vl is not None:
                add["value_loss"] = (float(vl), weight)
                add["value_clip_fraction"] = (vst["value_clip_fraction"], n_tok / tokens_all)
        for k, (v, w) in add.items():
            sums[k] = sums.get(k, 0.0) + v * w
    if group is not None:
        keys = ["loss", "policy_loss", "clip_fraction", "approx_kl", "ratio_mean", "entropy",
                "kl_ref", "score_mean"]
        sums = group.sum_metrics(sums, keys + (["value_loss", "value_clip_fraction"]
                                               if value_model is not None else []))
        group.sync_grads(policy)
        if value_model is not None:
            group.sync_grads(value_model)
    out_m = dict(sums)
    if spec.max_approx_kl is not None and out_m["approx_kl"] > spec.max_approx_kl:
        opt.zero_grad(set_to_none=True)
        if vopt is not None:
            vopt.zero_grad(set_to_none=True)
        log.info("PPO step %d: approx_kl %.4g > max_approx_kl %g: the iteration stops here",
                 step, out_m["approx_kl"], spec.max_approx_kl)
        return None
    out_m["beta"] = beta
    norm_p = grad_norm(policy.parameters(), spec.max_grad_norm)
    out_m["grad_norm"] = norm_p
    norm_v = None
    if value_model is not None:
        norm_v = grad_norm(value_model.parameters(), spec.max_grad_norm)
        out_m["value_grad_norm"] = norm_v
        if group is not None:
            out_m["explained_variance"] = group.explained_variance(v_seen, r_seen)
        else:
            v, r = torch.cat(v_seen), torch.cat(r_seen)
            out_m["explained_variance"] = explained_variance(v, r, torch.ones_like(v,
                                                                                 dtype=torch.bool))
    check_finite(step, total, loss=out_m["loss"], grad_norm=norm_p, value_grad_norm=norm_v)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if vopt is not None:
        vopt.step()
        vopt.zero_grad(set_to_none=True)
    return out_m


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------


def run_ppo_job(spec: PPOJob, ctx: "JobContext") -> "JobResult":
    """Read → drop stale → train → publish (policy + critic) → commit → (activate).

    Safe to run again after a crash: a version this job already published is finished off, not
    trained again; stream entries (stale ones included) are acked only after the version is
    committed, and the ids trained on join the group's applied set in the same transaction.
    """
    from rlhf.trainer.jobs import JobResult
    from rlhf.trainer.pipeline import publish_and_finish, read_inputs, step_reporter, version_extra

    got = read_inputs(spec, ctx, reader=SAMPLES, job_type=JOB_TYPE, metric_keys=METRIC_KEYS,
                      stage={"stage": "reading"})
    if isinstance(got, JobResult):
        return got
    settings = ctx.settings
    lineage = version_lineage(got.store, spec.model_name, got.base, spec.max_staleness)
    fresh, stale = split_stale(got.train, lineage)
    stale_ids = sorted(s.id for s in stale)
    if stale:
        log.info("job %s: %d of %d samples are stale (made more than %d versions before %s); "
                 "dropped", spec.job_id, len(stale), len(got.train), spec.max_staleness,
                 got.base.version or got.base.model_dir)
    if len(fresh) < spec.min_samples:
        consumer = got.consumer
        if consumer is not None and stale:  # never usable: acked now, never trained on
            stale_set = set(stale_ids)
            entry_ids = [e.entry_id for e in got.entries if e.id in stale_set]
            ctx.redis(lambda: consumer.commit(entry_ids=entry_ids), "ack the stale samples")
            consumer.close()
        raise DataError(f"{len(got.train)} samples read, {len(stale)} of them stale (made more "
                        f"than max_staleness={spec.max_staleness} versions before the base "
                        f"{got.base.version or got.base.model_dir}; acked and dropped): "
                        f"{len(fresh)} fresh, the job needs at least {spec.min_samples}")
    critic_dir = resolve_critic_dir(spec, got.store, got.registry, got.base)

    on_step = step_reporter(ctx, JOB_TYPE, samples=len(fresh), dropped_stale=len(stale))
    with tempfile.TemporaryDirectory(prefix="rlhf-ppo-") as tmp:
        if spec.distributed is not None:  # torchrun ranks, this task their controller
            from rlhf.trainer.distributed import train_ppo_distributed

            result = train_ppo_distributed(
                spec, fresh, base_dir=got.base.model_dir, out_dir=tmp, progress=on_step, ctx=ctx,
                device=settings.device, threads=settings.torch_threads, critic_dir=critic_dir,
                store_dir=got.store.root)
        else:
            result = train_ppo(spec, fresh, base_dir=got.base.model_dir, out_dir=tmp,
                               progress=on_step, check=ctx.check, device=settings.device,
                               threads=settings.torch_threads, critic_dir=critic_dir,
                               store=got.store)
        ctx.check()
        metrics = {**result.metrics, "dropped_stale": len(stale)}
        extra = version_extra(
            spec, got, job_type=JOB_TYPE, applied_ids=result.applied_ids, eval_ids=[],
            # every entry read is done with: trained on, stale, or unusable
            stream_entries=[e.entry_id for e in got.entries],
            dropped_stale_ids=stale_ids, skipped_ids=result.skipped_ids, critic=result.critic,
            ppo_state=result.state, curves_file=CURVES_FILE)
        return publish_and_finish(spec, ctx, got, tmp, kind="policy", metrics=metrics, extra=extra,
                                  job_type=JOB_TYPE, metric_keys=METRIC_KEYS)


# ------------------------------------------------------------------------------------------------
# Curves
# ------------------------------------------------------------------------------------------------


def load_curves(source: Any, *, store_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Per-step metrics from: a version (or `train_ppo` output) directory, its
    `training_curves.json`, the parsed JSON, a list of step dicts (several iterations'
    `PPOTrainResult.curves` concatenated), or a manifest (`Manifest` or its dict) with
    `store_dir` to find the version in."""
    if isinstance(source, list):
        return [dict(s) for s in source]
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            path = path / CURVES_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no training curves (a PPO job's version holds "
                                    f"{CURVES_FILE})")
        return load_curves(json.loads(path.read_text()))
    data = source if isinstance(source, Mapping) else getattr(source, "__dict__", {})
    if "steps" in data:
        return [dict(s) for s in data["steps"]]
    if "name" in data and "version" in data:
        if store_dir is None:
            raise ValueError("a manifest's curves are in its version directory: pass store_dir")
        return load_curves(Path(store_dir) / data["name"] / data["version"])
    raise ValueError("not training curves: expected a directory, a JSON file, a list of steps "
                     "or a manifest")


def plot_ppo_curves(source: Any, path: str | Path, *, keys: Sequence[str] = CURVE_KEYS,
                    store_dir: str | Path | None = None, title: str | None = None) -> Path:
    """Draw the per-step curves of `source` (see `load_curves`) into a PNG at `path`, one panel
    per metric in `keys` (those no step has are left out), x = optimizer step in order."""
    from rlhf.plots import pyplot, save_figure

    steps = load_curves(source, store_dir=store_dir)
    shown = [k for k in keys if any(s.get(k) is not None for s in steps)]
    if not shown:
        raise ValueError(f"no step has any of {list(keys)}")
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, shown):
        xs = [i + 1 for i, s in enumerate(steps) if s.get(key) is not None]
        ys = [s[key] for s in steps if s.get(key) is not None]
        ax.plot(xs, ys, marker="." if len(xs) < 60 else None, linewidth=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    return save_figure(fig, path, title=title, title_size=10)

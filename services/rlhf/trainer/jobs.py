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
"take the lease, then re-read the status" means two deliveries can never both run a job. A
terminal status (or `queued` before a retry) is written only by the lease's holder, or while
nobody holds it: an attempt that lost its lease never overwrites the attempt that took it.

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
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rlhf_client.queues import PREFERENCES_STREAM, SAMPLES_STREAM, SFT_STREAM
from rlhf_client.redis_conn import connect
from rlhf_client.registry import Registry
from rlhf_client.training import JOBS_INDEX, TERMINAL_STATUSES, JobRecord, job_key, read_job

if TYPE_CHECKING:
    from rlhf.config import Settings

log = logging.getLogger(__name__)

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


class JobRejected(ValueError):
    """A job spec that cannot run; the message names every offending field."""


class SpecProblems(ValueError):
    """Raised by a spec's cross-field check: one (field, message) per problem, so that
    `parse_spec` names each field as it names a field-level error."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{f}: {m}" for f, m in problems))
        self.problems = problems


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
    block_ms: int = Field(0, ge=0, le=600_000, description="Wait up to this long for the job's "
                          "minimum number of items (0: take what is there).")


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


class _PolicyJob(_Spec):
    """What every job that trains a policy is told first: its id, the model it publishes to and
    where it starts (a directory, a version, or the active version)."""

    job_id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=_NAME)
    model_name: str = Field(pattern=_NAME, description="Policy model (store + registry) to "
                            "publish to.")
    base_dir: str | None = Field(None, description="Start from this HF directory (a first "
                                 "version); unset: from base_version of model_name.")
    base_version: str | None = Field(None, pattern=_NAME, description="Start from this version "
                                     "of model_name; unset (and no base_dir): its active version.")


class _PolicyTrainingJob(_PolicyJob):
    """What every job that trains a policy on a fixed batch of items (DPO's pairs, SFT's
    examples) is told beyond that: how it optimises."""

    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Held-out share of payloads.")
    # optimisation
    epochs: int = Field(1, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps (overrides epochs).")
    batch_size: int = Field(8, ge=1, le=4096, description="Items (pairs, examples) per "
                            "micro-batch.")
    grad_accum_steps: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(1e-5, gt=0, le=1)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    lr_schedule: Literal["constant", "linear"] = Field("constant", description="After warm-up.")
    append_eos: bool = Field(True, description="End plain-text responses with the eos token.")
    seed: int = 0
    activate: bool = Field(False, description="Make the new version the active one.")

    @model_validator(mode="after")
    def _check_start_and_optimiser(self) -> "_PolicyTrainingJob":
        if self.base_dir is not None and self.base_version is not None:
            raise ValueError("set base_dir or base_version, not both")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError("adam_betas must both lie in [0, 1)")
        return self


class DPOJob(_PolicyTrainingJob):
    """Direct preference optimisation of a policy on preference pairs (no reward model, no RL
    loop). With h = (log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l)) the loss is
    −log σ(βh) for `sigmoid` (see rlhf.trainer.losses for the others)."""

    type: Literal["dpo"] = "dpo"
    source: Annotated[Union[DPOStreamSource, JsonlSource], Field(discriminator="type")]
    min_pairs: int = Field(1, ge=1, description="Fewer usable pairs than this: the job fails.")
    # loss
    loss_type: DPOLossType = "sigmoid"
    beta: float = Field(0.1, gt=0, description="β: strength of the implicit KL constraint.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε: conservative DPO.")
    simpo_gamma: float = Field(0.5, ge=0, description="γ: SimPO's target reward margin.")
    rpo_alpha: float = Field(0.0, ge=0, description="Weight of RPO's NLL term on y_w.")
    reference: ReferenceSpec = Field(default_factory=ReferenceSpec)
    learning_rate: float = Field(1e-6, gt=0, le=1)
    max_length: int = Field(512, ge=2, description="Tokens per row (prompt + response; longer "
                            "rows keep their first max_length tokens; a prompt that fills it "
                            "drops the pair).")
    min_eval_accuracy: float | None = Field(None, ge=0, le=1, description="Activate only when "
                                            "held-out implicit-reward accuracy reaches this.")

    @model_validator(mode="after")
    def _check(self) -> "DPOJob":
        if self.min_eval_accuracy is not None and self.eval_fraction == 0:
            raise ValueError("min_eval_accuracy needs a held-out split (eval_fraction > 0)")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "reference_free"):
            raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' or "
                             f"'reference_free', not {self.loss_type!r}")
        return self

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE_LOSSES


def _rejected(field: str, message: str) -> JobRejected:
    return JobRejected(f"job spec rejected:\n  {field}: {message}")


def _check_safe_dir(field: str, path: str | None) -> None:
    if path is None:
        return
    from rlhf.models.loading import check_safe_dir

    try:
        check_safe_dir(path)
    except ValueError as exc:
        raise _rejected(field, str(exc)) from None


def _check_data_source(spec, client: redis.Redis, *, count_jsonl: Callable[[str], int],
                       noun: str, minimum: int) -> None:
    """A JSONL file must exist and hold at least `minimum` usable items (counted by
    `count_jsonl`, which raises `DataError`); a stream must not be empty unless the job waits
    for entries (`block_ms` > 0)."""
    if spec.source.type == "jsonl":
        from rlhf.trainer.data import DataError

        try:
            n = count_jsonl(spec.source.path)
        except DataError as exc:
            raise _rejected("source.path", str(exc)) from None
        if n < minimum:
            raise _rejected("source.path", f"{spec.source.path} holds {n} {noun}; the job needs "
                            f"at least {minimum}")
    elif not spec.source.block_ms and not client.xlen(spec.source.stream):
        short = noun.split()[-1]
        raise _rejected("source.stream", f"{spec.source.stream!r} is empty (push {short} first, "
                        "or set source.block_ms to wait for them)")


def check_dpo_submit(spec: "DPOJob", client: redis.Redis) -> None:
    """Submit-time checks beyond the spec and the registry (submit where the worker's files are
    visible: a shared volume): a `base_dir` must be a safe checkpoint directory; a JSONL file
    must exist and hold at least `min_pairs` usable pairs; a stream must not be empty unless the
    job waits for entries (`block_ms` > 0)."""
    from rlhf.trainer.data import read_jsonl

    _check_safe_dir("base_dir", spec.base_dir)
    _check_data_source(spec, client, count_jsonl=lambda p: len(read_jsonl(p)),
                       noun="preference pairs", minimum=spec.min_pairs)


# --- SFT (the job function is rlhf.trainer.sft.run_sft_job) ------------------------------------

class SFTStreamSource(StreamSource):
    """SFTExample payloads from a Redis stream (`SFT_STREAM` by default; PreferencePair and
    Ranking payloads train on their preferred responses), in SFT's own consumer group by
    default."""

    stream: str = Field(SFT_STREAM, min_length=1, description="Stream to read (SFTExample "
                        "payloads; pairs and rankings: their preferred responses).")
    group: str = Field("sft", pattern=_NAME, description="Consumer group (its own read position "
                       "and applied-id set: one per model lineage).")


class SFTJob(_PolicyTrainingJob):
    """Supervised fine-tuning of a policy: token-mean NLL of each record's completion after its
    prompt (and prefix), the prompt never trained."""

    type: Literal["sft"] = "sft"
    source: Annotated[Union[SFTStreamSource, JsonlSource], Field(discriminator="type")]
    min_examples: int = Field(1, ge=1, description="Fewer usable examples than this: the job "
                              "fails.")
    reset_token: str | None = Field(None, min_length=1, description="Backtracking SFT: a "
                                    "completion containing this token is trained from its last "
                                    "occurrence on; the text before it is context (a record's "
                                    "own prefix wins). Must be one token of the model.")
    max_length: int = Field(512, ge=2, description="Tokens per row (prompt + prefix + "
                            "completion; longer rows keep their first max_length tokens; a "
                            "context that fills it drops the example).")


def check_sft_submit(spec: "SFTJob", client: redis.Redis) -> None:
    """Submit-time checks like `check_dpo_submit`: a safe `base_dir`; a JSONL file that exists
    and holds at least `min_examples` examples; a stream that is not empty unless the job waits
    for entries (`block_ms` > 0)."""
    from rlhf.trainer.sft import read_sft_jsonl

    _check_safe_dir("base_dir", spec.base_dir)
    _check_data_source(spec, client, count_jsonl=lambda p: len(read_sft_jsonl(p)),
                       noun="SFT examples", minimum=spec.min_examples)


# --- PPO and the critic-free family (the job function is rlhf.trainer.ppo.run_ppo_job) ---------

#: Advantage estimators: the keys of rlhf.trainer.advantages.ESTIMATORS (a unit test keeps them
#: equal; written out here so that validating a spec never imports torch).
AdvantageEstimator = Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp",
                             "reinforce_pp_baseline"]
#: Estimators that compare the n samples of one prompt: they need group_size ≥ 2.
GROUP_ESTIMATORS: frozenset[str] = frozenset({"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"})
#: Per-token KL estimators: the keys of rlhf.trainer.advantages.KL_ESTIMATORS.
KLEstimator = Literal["k1", "k2", "k3"]
#: Loss aggregations: the keys of rlhf.trainer.ppo_losses.LOSS_AGGREGATIONS.
LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


class SamplesStreamSource(StreamSource):
    """ScoredSamples from a Redis stream (what rollout workers push), in PPO's consumer group."""

    stream: str = Field(SAMPLES_STREAM, min_length=1, description="Stream to read.")
    group: str = Field("ppo", pattern=_NAME, description="Consumer group (its own read position "
                       "and applied-id set: one per policy lineage).")
    max_entries: int = Field(1024, gt=0, description="Most samples one job reads: one PPO "
                             "iteration's batch.")


class CriticSpec(_Spec):
    """Where the value model (critic) starts when the base version carries none (`<base>/value/`
    always wins: the critic goes on from version to version).

    `init_dir`: a reward-model directory; `init_model` (+ `init_version`, default its active
    version): a reward model in the store and registry. Neither: the policy's own backbone with
    a zero-initialised value head. A reward model must share the policy's vocabulary."""

    init_dir: str | None = Field(None, description="A reward model (sequence classifier) "
                                 "directory.")
    init_model: str | None = Field(None, pattern=_NAME, description="A reward model's name.")
    init_version: str | None = Field(None, pattern=_NAME, description="Its version (unset: the "
                                     "active one).")

    @model_validator(mode="after")
    def _check(self) -> "CriticSpec":
        if self.init_dir is not None and self.init_model is not None:
            raise ValueError("set init_dir or init_model, not both")
        if self.init_version is not None and self.init_model is None:
            raise ValueError("init_version needs init_model (the reward model it is a version of)")
        return self

    @property
    def is_set(self) -> bool:
        return self.init_dir is not None or self.init_model is not None


class PPOJob(_PolicyJob):
    """Policy optimisation on scored samples: PPO with a critic (`gae`) or a critic-free
    estimator over the n samples of each prompt (GRPO, Dr. GRPO, RLOO, REINFORCE++).

    Per token r_t = −β·KL_t (`kl_in` "reward"), plus the sample's score at its last token;
    advantages by `advantage_estimator`; loss = PPO-clip(ρ = π_θ / π_behaviour) + vf_coef·value
    loss − entropy_coef·entropy (+ β·KL with `kl_in` "loss"), several epochs over shuffled
    minibatches. The math is in rlhf.trainer.advantages and rlhf.trainer.ppo_losses."""

    type: Literal["ppo"] = "ppo"
    source: Annotated[Union[SamplesStreamSource, JsonlSource], Field(discriminator="type")]
    min_samples: int = Field(1, ge=1, description="Fewer usable (fresh) samples than this: the "
                             "job fails.")
    # advantages and rewards
    advantage_estimator: AdvantageEstimator = "gae"
    group_size: int = Field(1, ge=1, description="Samples per prompt the rollout makes (n); ≥ 2 "
                            "for grpo, dr_grpo, rloo and reinforce_pp_baseline.")
    kl_estimator: KLEstimator = Field("k1", description="k1 = d, k2 = ½d², k3 = e^{−d} − 1 + d "
                                      "with d = log π − log π_ref.")
    kl_in: Literal["reward", "loss"] = Field("reward", description="KL as a per-token reward "
                                             "penalty (PPO) or as a loss term (GRPO).")
    kl_coef: float = Field(0.05, ge=0, description="β (the starting β when kl_target is set).")
    kl_target: float | None = Field(None, gt=0, description="Adaptive β towards this KL per "
                                    "sequence (None: β fixed).")
    kl_horizon: int = Field(10_000, gt=0, description="Adaptive β's horizon, in samples.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount γ.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ.")
    whiten_advantages: bool = True
    whiten_rewards: bool = Field(False, description="Scale the batch's scores to unit variance "
                                 "(mean kept) before they become rewards.")
    reward_clip: float | None = Field(None, gt=0, description="Clip scores to ±this.")
    missing_eos_penalty: float | None = Field(None, description="Added to the score of a sample "
                                              "that did not end (no EOS / stop).")
    missing_eos_score: float | None = Field(None, description="Replaces the score of a sample "
                                            "that did not end (no EOS / stop).")
    # losses
    clip_eps: float = Field(0.2, gt=0, description="ε (ε_low): ρ clipped to [1 − ε, 1 + ε_high].")
    clip_eps_high: float | None = Field(None, gt=0, description="ε_high (None: clip_eps).")
    dual_clip: float | None = Field(None, gt=1, description="Dual clip c (e.g. 3): for A < 0 the "
                                    "loss is at most −c·A.")
    value_clip_eps: float | None = Field(0.2, gt=0, description="ε_v: V clipped to V_old ± ε_v "
                                         "in the value loss (None: no clip).")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    entropy_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus.")
    loss_aggregation: LossAggregation | None = Field(None, description="None: token-mean, but "
                                                     "seq-mean-token-sum-norm for dr_grpo.")
    max_new_tokens_norm: int | None = Field(None, ge=1, description="seq-mean-token-sum-norm's "
                                            "constant (None: the batch's longest completion).")
    # optimisation
    ppo_epochs: int = Field(4, ge=1, le=1000, description="Passes over the batch.")
    minibatch_size: int = Field(8, ge=1, le=65536, description="Samples per optimizer step.")
    grad_accum_steps: int = Field(1, ge=1, le=1024, description="Micro-batches a minibatch is "
                                  "computed in (memory only: the gradient is the same).")
    learning_rate: float = Field(1e-6, gt=0, le=1)
    value_learning_rate: float = Field(1e-5, gt=0, le=1)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip each model's gradients to "
                                        "this norm.")
    max_approx_kl: float | None = Field(None, gt=0, description="Stop the epochs when a "
                                        "minibatch's approx-KL to the behaviour policy passes "
                                        "this (None: never).")
    max_staleness: int = Field(1, ge=0, description="Train on samples of the base version or at "
                               "most this many versions before it; older ones are dropped.")
    critic: CriticSpec = Field(default_factory=CriticSpec)
    seed: int = 0
    activate: bool = Field(False, description="Make the new version the active one.")

    @model_validator(mode="after")
    def _check(self) -> "PPOJob":
        problems: list[tuple[str, str]] = []
        if self.base_dir is not None and self.base_version is not None:
            problems.append(("base_version", "set base_dir or base_version, not both"))
        if self.advantage_estimator in GROUP_ESTIMATORS and self.group_size < 2:
            problems.append(("group_size", f"advantage_estimator {self.advantage_estimator!r} "
                             f"compares the samples of one prompt: it needs group_size ≥ 2, "
                             f"got {self.group_size}"))
        if self.kl_target is not None and self.kl_coef == 0:
            problems.append(("kl_coef", "an adaptive β (kl_target set) starts from kl_coef > 0 "
                             "(β = 0 never moves)"))
        if self.critic.is_set and self.advantage_estimator != "gae":
            problems.append(("critic", f"only advantage_estimator 'gae' uses a critic, not "
                             f"{self.advantage_estimator!r}"))
        if self.max_new_tokens_norm is not None and self.aggregation != "seq-mean-token-sum-norm":
            problems.append(("max_new_tokens_norm", "applies to loss_aggregation "
                             f"'seq-mean-token-sum-norm' only, not {self.aggregation!r}"))
        if self.missing_eos_penalty is not None and self.missing_eos_score is not None:
            problems.append(("missing_eos_score", "set missing_eos_penalty (added to the score) "
                             "or missing_eos_score (replaces it), not both"))
        if not all(0 <= b < 1 for b in self.adam_betas):
            problems.append(("adam_betas", "must both lie in [0, 1)"))
        if problems:
            raise SpecProblems(problems)
        return self

    @property
    def aggregation(self) -> str:
        """The loss aggregation in force: `loss_aggregation`, else Dr. GRPO's constant
        normaliser for dr_grpo and token-mean for the others."""
        if self.loss_aggregation is not None:
            return self.loss_aggregation
        return "seq-mean-token-sum-norm" if self.advantage_estimator == "dr_grpo" else "token-mean"

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator == "gae"

    @property
    def clip_high(self) -> float:
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high


def check_ppo_submit(spec: "PPOJob", client: redis.Redis) -> None:
    """Submit-time checks like `check_dpo_submit` (a safe `base_dir`, a JSONL file with at least
    `min_samples` samples, a non-empty stream unless the job waits), plus the critic: a safe
    `critic.init_dir`, a registered `critic.init_model` version."""
    from rlhf.trainer.ppo import read_samples_jsonl

    _check_safe_dir("base_dir", spec.base_dir)
    _check_safe_dir("critic.init_dir", spec.critic.init_dir)
    if spec.critic.init_model is not None:
        registry = Registry(client)
        name, version = spec.critic.init_model, spec.critic.init_version
        versions = registry.versions(name)
        if version is not None and version not in versions:
            raise _rejected("critic.init_version", f"model {name!r} has no version {version!r} "
                            f"(it has {versions or 'none'})")
        if version is None and registry.active(name) is None:
            raise _rejected("critic.init_model", f"model {name!r} has no active version; pass "
                            "critic.init_version or critic.init_dir")
    _check_data_source(spec, client, count_jsonl=lambda p: len(read_samples_jsonl(p)),
                       noun="scored samples", minimum=spec.min_samples)


# --- The online / iterative loop (the job function is rlhf.trainer.loop.run_loop_job) ---------

#: What trains each round: DPO on the round's pairs, or PPO (critic) / GRPO on its scored samples.
LoopTrainer = Literal["dpo", "ppo", "grpo"]
#: Fields of a round's child job that the loop sets itself (a spec's `train` may not).
LOOP_OWNED_FIELDS: frozenset[str] = frozenset({"type", "job_id", "model_name", "base_dir",
                                               "base_version", "source", "activate"})
#: ... and per trainer (DPO's reference follows `dpo_reference`; GRPO's estimator is GRPO and
#: every group is the round's n samples of one prompt).
LOOP_OWNED_BY_TRAINER: dict[str, frozenset[str]] = {
    "dpo": frozenset({"reference"}),
    "ppo": frozenset({"group_size"}),
    "grpo": frozenset({"group_size", "advantage_estimator"}),
}
#: A loop's id is short enough for its children's ids (`<loop id>-r<round>-<trainer>`).
MAX_LOOP_ID_CHARS = 100


def loop_stream(loop_id: str, round_: int, kind: str) -> str:
    """The stream a loop's round `round_` fills for its child job: `pairs` (DPO) or `samples`
    (PPO / GRPO)."""
    return f"rlhf:loop:{loop_id}:r{round_}:{kind}"


def loop_child_id(loop_id: str, round_: int, trainer: str) -> str:
    """The id of round `round_`'s training job: fixed, so a resumed loop finds it (and never
    trains a finished one again)."""
    return f"{loop_id}-r{round_}-{trainer}"


class PromptsSpec(_Spec):
    """Prompts: a JSONL file of {"id", "prompt"} rows on the worker's file system, or texts
    given inline (ids "p0", "p1", ...)."""

    path: str | None = Field(None, min_length=1, description="JSONL file of {\"id\", \"prompt\"} "
                             "rows.")
    texts: list[str] | None = Field(None, min_length=1, description="Prompts given inline.")

    @model_validator(mode="after")
    def _check(self) -> "PromptsSpec":
        if (self.path is None) == (self.texts is None):
            raise SpecProblems([("path", "set path (a JSONL file) or texts, exactly one")])
        if self.texts is not None:
            empty = [i for i, t in enumerate(self.texts) if not t]
            if empty:
                raise SpecProblems([("texts", f"prompt {empty[0]} is empty")])
        return self


class LabellerSpec(_Spec):
    """Who labels the samples: a reward model served by the RewardService (`reward`), or a
    language model served by a PolicyService acting as a pairwise judge (`judge`, RLAIF)."""

    type: Literal["reward", "judge"] = "reward"
    target: str = Field(min_length=1, description="The service's host:port or dns:/// target.")
    template: str | None = Field(None, min_length=1, description="judge: the prompt template "
                                 "file (unset: the shipped default).")
    timeout_s: float = Field(60.0, gt=0, description="Deadline of one call.")

    @model_validator(mode="after")
    def _check(self) -> "LabellerSpec":
        if self.template is not None and self.type != "judge":
            raise SpecProblems([("template", "a template is for a judge labeller (type 'judge')")])
        return self


class LoopSampling(_Spec):
    """How each round samples: n responses per prompt from the active version, seeded."""

    n: int = Field(4, ge=2, le=64, description="Responses per prompt (the pair builder picks "
                   "from them; GRPO's group).")
    temperature: float = Field(1.0, gt=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(32, ge=1, le=4096)
    seed: int = Field(0, ge=0, description="Base seed: round k's requests are seeded from it, "
                      "k and the prompt ids.")
    batch_prompts: int = Field(8, ge=1, le=64, description="Prompts per Generate call (fewer "
                               "when prompts × n would pass the services' per-call limits).")


class LoopPairs(_Spec):
    """How a group of scored responses becomes a pair (rlhf.trainer.pairs)."""

    builder: Literal["best_vs_random", "best_vs_worst"] = "best_vs_random"
    min_margin: float = Field(0.0, ge=0, description="Skip pairs whose scores differ by less.")


class LoopHeldOut(_Spec):
    """The held-out evaluation after every round: n samples per prompt at temperature 1 (the
    raw policy: the KL estimate needs it), the same seed every round."""

    prompts: PromptsSpec
    n: int = Field(2, ge=1, le=64, description="Samples per held-out prompt.")
    max_new_tokens: int | None = Field(None, ge=1, le=4096, description="Unset: sampling's.")
    seed: int = Field(1234, ge=0)


class LoopStop(_Spec):
    """When the loop stops before `rounds`: a plateau of the held-out score (no round in
    `patience` improved on the best by `min_improvement`), or KL to the original reference past
    `max_kl` (nats per sample, k1)."""

    patience: int | None = Field(None, ge=1)
    min_improvement: float = Field(0.0, ge=0)
    max_kl: float | None = Field(None, gt=0)


class LoopHuman(_Spec):
    """Human pairs: before training, a round waits (up to `wait_s`) for at least `min_pairs`
    pairs or rankings on `stream` (read through the loop's own consumer group) and trains on
    them with its own."""

    stream: str = Field(PREFERENCES_STREAM, min_length=1)
    group: str | None = Field(None, pattern=_NAME, description="Consumer group (unset: "
                              "loop-<loop id>).")
    min_pairs: int = Field(1, ge=1)
    max_pairs: int = Field(10_000, ge=1, description="Most payloads one round takes.")
    wait_s: float = Field(600.0, ge=0, description="Past this the round trains on what came.")


class LoopJob(_PolicyJob):
    """Online / iterative alignment: rounds of [sample n responses per prompt from the active
    version → label (reward model or AI judge) → build pairs → train a child job (DPO; or PPO /
    GRPO on scored samples) from the round's starting version → activate → wait until the
    policy service serves it → evaluate on held-out prompts]. See rlhf.trainer.loop."""

    type: Literal["iterate"] = "iterate"
    trainer: LoopTrainer = "dpo"
    train: dict[str, Any] = Field(default_factory=dict, description="The round job's options "
                                  "(DPOJob / PPOJob fields, less those the loop sets).")
    rounds: int = Field(3, ge=1, le=1000)
    policy: str = Field(min_length=1, description="PolicyService following model_name.")
    reference: str | None = Field(None, min_length=1, description="ReferenceService serving the "
                                  "original model: KL to it (and PPO / GRPO's reference).")
    labeller: LabellerSpec
    prompts: PromptsSpec
    prompts_per_round: int | None = Field(None, ge=1, description="A seeded draw of this many "
                                          "prompts per round (unset: all).")
    sampling: LoopSampling = Field(default_factory=LoopSampling)
    pairs: LoopPairs = Field(default_factory=LoopPairs)
    dpo_reference: Literal["round_start", "original"] = Field(
        "round_start", description="DPO's reference: the round's starting version or the loop's.")
    held_out: LoopHeldOut
    stop: LoopStop = Field(default_factory=LoopStop)
    human: LoopHuman | None = None
    overlap: bool = Field(False, description="Sample round k+1 while round k trains (one round "
                          "off-policy).")
    swap_timeout_s: float = Field(600.0, gt=0, description="Longest wait for the policy service "
                                  "to serve a new version.")
    rpc_timeout_s: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "LoopJob":
        problems: list[tuple[str, str]] = []
        if len(self.job_id) > MAX_LOOP_ID_CHARS:
            problems.append(("job_id", f"at most {MAX_LOOP_ID_CHARS} characters (a round's job "
                             "id appends -r<round>-<trainer>)"))
        if self.base_dir is not None:
            problems.append(("base_dir", "a loop starts from a version of model_name (the "
                             "policy service serves it): publish the directory first"))
        if self.trainer != "dpo" and self.reference is None:
            problems.append(("reference", f"trainer {self.trainer!r} needs the ReferenceService "
                             "(reference log-probs of every sample)"))
        if self.stop.max_kl is not None and self.reference is None:
            problems.append(("stop.max_kl", "measuring KL to the original model needs reference "
                             "(a ReferenceService serving it)"))
        if self.human is not None and self.trainer != "dpo":
            problems.append(("human", "human pairs train DPO rounds (trainer 'dpo') only"))
        if self.dpo_reference != "round_start" and self.trainer != "dpo":
            problems.append(("dpo_reference", f"applies to trainer 'dpo', not {self.trainer!r}"))
        texts = self.prompts.texts
        if texts is not None and self.prompts_per_round is not None \
                and self.prompts_per_round > len(texts):
            problems.append(("prompts_per_round", f"{self.prompts_per_round} > the "
                             f"{len(texts)} prompts given"))
        owned = LOOP_OWNED_FIELDS | LOOP_OWNED_BY_TRAINER[self.trainer]
        problems += [(f"train.{k}", "set by the loop, not in train") for k in self.train
                     if k in owned]
        if not any(f.startswith("train.") for f, _ in problems):
            try:
                child = self.child_spec(1, "v0000", "v0000")
            except ValidationError as exc:
                problems += [(f"train.{where}" if where else "train", msg)
                             for where, msg in validation_problems(exc)]
            else:
                if self.overlap and isinstance(child, PPOJob) and child.max_staleness < 1:
                    problems.append(("train.max_staleness", "overlap trains on samples one "
                                     "version old: it needs max_staleness ≥ 1"))
        if problems:
            raise SpecProblems(problems)
        return self

    def child_spec(self, round_: int, base_version: str,
                   original_version: str) -> "DPOJob | PPOJob":
        """Round `round_`'s training job, starting from `base_version` (`original_version`:
        the loop's starting version, DPO's reference with dpo_reference 'original')."""
        common = dict(self.train, job_id=loop_child_id(self.job_id, round_, self.trainer),
                      model_name=self.model_name, base_version=base_version, activate=False)
        if self.trainer == "dpo":
            reference = {"source": "local"}
            if self.dpo_reference == "original":
                reference["version"] = original_version
            return DPOJob.model_validate({
                **common, "type": "dpo", "reference": reference,
                "source": {"type": "stream", "stream": loop_stream(self.job_id, round_, "pairs"),
                           "group": "dpo", "max_entries": 100_000}})
        extra = {"advantage_estimator": "grpo"} if self.trainer == "grpo" else {}
        return PPOJob.model_validate({
            **common, **extra, "type": "ppo", "group_size": self.sampling.n,
            "source": {"type": "stream", "stream": loop_stream(self.job_id, round_, "samples"),
                       "group": "ppo", "max_entries": 100_000}})


def check_loop_submit(spec: "LoopJob", client: redis.Redis) -> None:
    """Submit-time checks of files the loop reads (submit where the worker's files are
    visible): prompt files that parse and hold prompts (enough for prompts_per_round), a judge
    template that exists."""
    from rlhf.trainer.rollout import load_prompts_file

    for field, prompts in (("prompts.path", spec.prompts), ("held_out.prompts.path",
                                                           spec.held_out.prompts)):
        if prompts.path is None:
            continue
        try:
            n = len(load_prompts_file(Path(prompts.path)))
        except (OSError, ValueError) as exc:
            raise _rejected(field, str(exc)) from None
        if n == 0:
            raise _rejected(field, f"{prompts.path} holds no prompts")
        if field == "prompts.path" and spec.prompts_per_round is not None \
                and spec.prompts_per_round > n:
            raise _rejected("prompts_per_round", f"{spec.prompts_per_round} > the {n} prompts "
                            f"in {prompts.path}")
    if spec.labeller.template is not None and not Path(spec.labeller.template).is_file():
        raise _rejected("labeller.template", f"{spec.labeller.template}: no such file")


# -------------------------------------------------------------------------------------------------

JOB_TYPES: dict[str, type[_Spec]] = {"reward_model": RewardModelJob, "dpo": DPOJob, "ppo": PPOJob,
                                     "sft": SFTJob, "iterate": LoopJob}
JobSpec = Union[RewardModelJob, DPOJob, PPOJob, SFTJob, LoopJob]  # the union of JOB_TYPES' values


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
        lines = [f"  {where or 'spec'}: {msg}" for where, msg in validation_problems(exc)]
        raise JobRejected(f"{kind} job spec rejected:\n" + "\n".join(lines)) from None


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """(dotted field, message) for every error of a spec's validation; a cross-field check's
    `SpecProblems` names each of its fields ("" for the spec as a whole)."""
    out: list[tuple[str, str]] = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        problem = (err.get("ctx") or {}).get("error")
        if isinstance(problem, SpecProblems):  # a cross-field check: it names its fields
            out.extend(('.'.join(filter(None, (where, f))), m) for f, m in problem.problems)
            continue
        out.append((where, err["msg"]))
    return out


def check_against_registry(spec: JobSpec, registry: Registry) -> None:
    """Checks that need Redis: the base version a job starts from exists."""
    if spec.base_dir is not None:
        return
    versions = registry.versions(spec.model_name)
    if spec.base_version is not None:
        if spec.base_version not in versions:
            raise JobRejected(f"job spec rejected:\n  base_version: model {spec.model_name!r} has "
                              f"no version {spec.base_version!r} (it has {versions or 'none'})")
    elif registry.active(spec.model_name) is None and isinstance(spec, LoopJob):
        raise JobRejected(f"job spec rejected:\n  model_name: model {spec.model_name!r} has no "
                          "active version to start from (publish and activate a first version: "
                          "the policy service serves it) or pass base_version")
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
# ARGV: token ('' = none), record TTL in s ('' = keep), release (1/0), then field/value pairs.
_SETTLE = """
local holder = redis.call('get', KEYS[2])
if holder and holder ~= ARGV[1] then
  return 0
end
redis.call('hset', KEYS[1], unpack(ARGV, 4))
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
        """Extend the lease (or retake it if it lapsed untaken); False when another holds it."""
        return bool(self._renew(keys=[self.lease_key(job_id)], args=[token, self.lease_ms]))

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
        args = [token or "", "" if ttl_s is None else str(ttl_s), "1"]
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
        """Record failure; False (nothing written) when another attempt holds the lease."""
        return self._finish(job_id, token, {"status": "failed", "error": error[:4000]})

    def requeue(self, job_id: str, token: str | None, note: str) -> bool:
        """Back to `queued` before a retry (the lease is released for the next attempt);
        False (nothing written) when another attempt holds the lease."""
        return self._write(job_id, token, {"status": "queued", "error": note[:4000],
                                           "updated": f"{time.time():.6f}"}, ttl_s=None)


# ---------------------------------------------------------------------------------------------
# Submit
# ---------------------------------------------------------------------------------------------


def submit_job(data: dict[str, Any] | JobSpec, *, redis_url: str, client: redis.Redis | None = None) -> str:
    """Validate a spec, record the job and queue its Celery task; returns the job id.

    Raises `JobRejected` (nothing is queued) when the spec is invalid, names a base version
    that does not exist, or reuses a job id (a DPO, PPO or SFT job also when its data source
    is empty; a loop when a file it names is missing or unusable).
    """
    from rlhf.trainer.celery_app import send_job

    spec = parse_spec(data)
    r = client or connect(redis_url, decode_responses=True)
    check_against_registry(spec, Registry(r))
    if isinstance(spec, DPOJob):  # an empty dataset is rejected here, not in the worker
        check_dpo_submit(spec, r)
    elif isinstance(spec, PPOJob):
        check_ppo_submit(spec, r)
    elif isinstance(spec, SFTJob):
        check_sft_submit(spec, r)
    elif isinstance(spec, LoopJob):
        check_loop_submit(spec, r)
    jobs = JobStore(r)
    jobs.create(spec)
    try:
        send_job(redis_url, spec.type, spec.model_dump(mode="json"), spec.job_id)
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
    `interrupted`: Redis stayed away past `job_redis_wait_s`; the task gives its message back."""

    status: Literal["succeeded", "failed", "skipped", "busy", "retry", "abandoned", "interrupted"]
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
        """Raise `LeaseLost` when the heartbeat found the lease gone (call between steps)."""
        if self.lost.is_set():
            raise LeaseLost(f"job {self.job_id}: lease lost; another attempt owns the job")

    def confirm_lease(self) -> None:
        """Renew the lease now and raise `LeaseLost` if another attempt holds it: call right
        before a commit (publishing a version), not trusting the last heartbeat. Waits for
        Redis through an outage."""
        if not self.redis(lambda: self.jobs.renew(self.job_id, self.token),
                          "confirm the lease before publishing"):
            self.lost.set()
        self.check()

    def progress(self, fraction: float, metrics: dict[str, Any] | None = None, *,
                 force: bool = False) -> None:
        """Record progress (at most every 0.5 s unless `force`). Best effort: with Redis away
        the write is skipped and training goes on."""
        now = time.monotonic()
        if not (force or now - self._last_progress >= 0.5) or now < self._progress_paused_until:
            return
        self._last_progress = now
        try:
            self.jobs.progress(self.job_id, fraction, metrics)
        except REDIS_ERRORS as exc:
            self._progress_paused_until = time.monotonic() + _PROGRESS_PAUSE_S
            log.warning("job %s: progress not recorded (Redis unreachable: %s); training goes on",
                        self.job_id, exc)

    def beat(self) -> None:
        if not self.jobs.renew(self.job_id, self.token):
            self.lost.set()
            return
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

        thread = threading.Thread(target=loop, name=f"heartbeat-{self.job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
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
            ctx = JobContext(settings, jobs, spec.job_id, token)
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

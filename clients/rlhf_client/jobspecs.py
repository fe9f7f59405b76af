"""Job specs: what a training job is told, typed and validated at submit (and again in the task).

The base install validates and submits jobs with these (pydantic, no torch, no Celery); the
trainer (`rlhf.trainer.jobs`) re-exports them. Every job type is a frozen pydantic model with
`extra="forbid"`; `parse_spec` turns a dict into one (or `JobRejected` naming every bad field),
`job_schema` and `example_spec` describe a type. The submit-time checks (`check_submit`) read
what a job will read: a checkpoint directory is safe, a data file exists and holds enough items,
a stream is not empty, a version exists in the registry (submit where the worker's files are
visible: a shared volume).

Every job type also takes TRL's tracking options: `report_to` ("tensorboard", "mlflow") and
`logging_dir` (TensorBoard's directory; unset: the trainer's default).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf_client.datafiles import (
    DataError,
    check_safe_dir,
    read_jsonl,
    read_prompt_rows,
    read_samples_jsonl,
    read_sft_jsonl,
)
from rlhf_client.queues import PREFERENCES_STREAM, SAMPLES_STREAM, SFT_STREAM
from rlhf_client.registry import Registry

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


#: Where a job's per-step metrics also go (TRL's `report_to`): TensorBoard event files in
#: `logging_dir`, an MLflow run (tracking URI from MLFLOW_TRACKING_URI, run name = the job id).
ReportTo = Literal["tensorboard", "mlflow"]


class _Job(_Spec):
    """What every job type takes: where its metrics are reported beyond its record."""

    report_to: list[ReportTo] = Field([], description="Also report the "
                                      "per-step metrics to these: \"tensorboard\", \"mlflow\" "
                                      "(TRL's report_to; needs the extra of that name).")
    logging_dir: str | None = Field(None, min_length=1, description="TensorBoard's log directory "
                                    "on the worker (unset: the trainer's default, per job id).")


#: A training job's `dtype` (rlhf.trainer.precision): fp32; bf16 autocast over fp32 master
#: weights and optimizer state; or pure bf16 weights, gradients and optimizer state.
TrainingDType = Literal["float32", "bf16-mixed", "bfloat16"]
TRAINING_DTYPES: tuple[str, ...] = ("float32", "bf16-mixed", "bfloat16")


class _Precision(_Spec):
    """What every job that trains weights takes: the precision it trains in and whether it
    recomputes activations (rlhf.trainer.precision)."""

    dtype: TrainingDType = Field("float32", description="float32; bf16-mixed (fp32 master "
                                 "weights and AdamW state, forward/backward under bf16 autocast); "
                                 "bfloat16 (pure bf16 weights, gradients and AdamW state: half "
                                 "the memory, but updates under ~0.4% of a weight round away).")
    gradient_checkpointing: bool = Field(False, description="Recompute each decoder layer's "
                                         "activations in backward instead of keeping them "
                                         "(less memory, ~1 more forward pass of compute).")
    lora: "LoraSpec | None" = Field(None, description="Train a LoRA adapter (peft) instead of "
                                    "the full weights and publish it as an adapter version "
                                    "naming its base (rlhf.models.adapters); unset: full weights.")


# --- LoRA adapters (issue 20; rlhf.trainer.precision, rlhf.models.adapters) -------------------


class LoraSpec(_Spec):
    """A LoRA adapter to train (peft `LoraConfig`): only the adapter's weights (and a reward
    model's score head) train; the base stays frozen and is the reference (adapter off)."""

    r: int = Field(8, gt=0, le=4096, description="The adapter's rank.")
    alpha: float = Field(16.0, gt=0, description="lora_alpha: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input, in "
                           "training steps only.")
    target_modules: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | \
        Literal["all-linear"] = Field("all-linear", description="Module names (suffixes) to adapt, "
                                      "or \"all-linear\": every linear layer but the output head.")


_Precision.model_rebuild()


# --- data-parallel training (issue 20; rlhf.trainer.distributed) ------------------------------


class DistributedSpec(_Spec):
    """Run the job's training on `nproc_per_node` torch.distributed ranks (torchrun) started and
    watched by the Celery task; rank 0 alone saves, the task publishes. Absent: one process."""

    nproc_per_node: int = Field(ge=1, le=1024, description="Ranks (processes) on this node: "
                                "one per GPU, or a few CPU processes (gloo).")
    nnodes: Literal[1] = Field(1, description="Nodes in the group the worker starts (1: the "
                               "worker's node; multi-node groups run as a Kubernetes job, see "
                               "docs/distributed.md).")
    backend: Literal["gloo", "nccl"] | None = Field(None, description="Process-group backend "
                                                    "(unset: nccl on CUDA, gloo on CPU).")
    strategy: Literal["ddp"] = Field("ddp", description="Data parallel with replicated weights "
                                     "(gradients all-reduced once per optimizer step).")


class _Distributed(_Spec):
    distributed: DistributedSpec | None = Field(None, description="Data-parallel training on "
                                                "several processes (unset: one process).")

    def _distributed_problems(self, per_step: int, field: str) -> list[tuple[str, str]]:
        d = self.distributed
        if d is not None and d.nproc_per_node * d.nnodes > per_step:
            return [("distributed.nproc_per_node", f"{d.nproc_per_node * d.nnodes} ranks need at "
                     f"least as many items per micro-batch ({field} = {per_step}): every rank "
                     "trains on a non-empty shard")]
        return []


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


class RewardModelJob(_Job, _Precision, _Distributed):
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
        if problems := self._distributed_problems(self.batch_size, "batch_size"):
            raise SpecProblems(problems)
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


class _PolicyJob(_Job):
    """What every job that trains a policy is told first: its id, the model it publishes to and
    where it starts (a directory, a version, or the active version)."""

    job_id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=_NAME)
    model_name: str = Field(pattern=_NAME, description="Policy model (store + registry) to "
                            "publish to.")
    base_dir: str | None = Field(None, description="Start from this HF directory (a first "
                                 "version); unset: from base_version of model_name.")
    base_version: str | None = Field(None, pattern=_NAME, description="Start from this version "
                                     "of model_name; unset (and no base_dir): its active version.")


class _PolicyTrainingJob(_PolicyJob, _Precision):
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


class DPOJob(_PolicyTrainingJob, _Distributed):
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
        if problems := self._distributed_problems(self.batch_size, "batch_size"):
            raise SpecProblems(problems)
        return self

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE_LOSSES


def _rejected(field: str, message: str) -> JobRejected:
    return JobRejected(f"job spec rejected:\n  {field}: {message}")


def _check_safe_dir(field: str, path: str | None) -> None:
    if path is None:
        return
    try:
        check_safe_dir(path)
    except ValueError as exc:
        raise _rejected(field, str(exc)) from None


def _check_data_source(spec, client: redis.Redis, *, count_jsonl: Callable[[str], int],
                       noun: str, minimum: int, empty_stream: bool = False) -> None:
    """A JSONL file must exist and hold at least `minimum` usable items (counted by
    `count_jsonl`, which raises `DataError`); a stream must not be empty unless the job waits
    for entries (`block_ms` > 0) or `empty_stream` allows it."""
    if spec.source.type == "jsonl":
        try:
            n = count_jsonl(spec.source.path)
        except DataError as exc:
            raise _rejected("source.path", str(exc)) from None
        if n < minimum:
            raise _rejected("source.path", f"{spec.source.path} holds {n} {noun}; the job needs "
                            f"at least {minimum}")
    elif not (empty_stream or spec.source.block_ms) and not client.xlen(spec.source.stream):
        short = noun.split()[-1]
        raise _rejected("source.stream", f"{spec.source.stream!r} is empty (push {short} first, "
                        "or set source.block_ms to wait for them)")


def check_reward_model_submit(spec: "RewardModelJob", client: redis.Redis) -> None:
    """Submit-time checks of a reward-model job: a safe `base_dir`; a JSONL file that exists and
    holds at least `min_pairs` pairs. Its stream may be empty (the job then fails plainly in
    the worker, as it always has: a reward model may be queued ahead of its labels)."""
    _check_safe_dir("base_dir", spec.base_dir)
    _check_data_source(spec, client, count_jsonl=lambda p: len(read_jsonl(p)),
                       noun="preference pairs", minimum=spec.min_pairs, empty_stream=True)


def check_dpo_submit(spec: "DPOJob", client: redis.Redis) -> None:
    """Submit-time checks beyond the spec and the registry (submit where the worker's files are
    visible: a shared volume): a `base_dir` must be a safe checkpoint directory; a JSONL file
    must exist and hold at least `min_pairs` usable pairs; a stream must not be empty unless the
    job waits for entries (`block_ms` > 0)."""
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


class SFTJob(_PolicyTrainingJob, _Distributed):
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

    @model_validator(mode="after")
    def _check(self) -> "SFTJob":
        if problems := self._distributed_problems(self.batch_size, "batch_size"):
            raise SpecProblems(problems)
        return self


def check_sft_submit(spec: "SFTJob", client: redis.Redis) -> None:
    """Submit-time checks like `check_dpo_submit`: a safe `base_dir`; a JSONL file that exists
    and holds at least `min_examples` examples; a stream that is not empty unless the job waits
    for entries (`block_ms` > 0)."""
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


class PPOJob(_PolicyJob, _Precision, _Distributed):
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
                                               "base_version", "source", "activate",
                                               "report_to", "logging_dir"})
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
    policy service serves it → evaluate on held-out prompts]. See rlhf.trainer.loop.

    `report_to` and `logging_dir` are the loop's: every round's job reports to them (TensorBoard
    in `<logging_dir>/<round job id>`); `train` may not set them."""

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
        if self.train.get("lora") is not None:  # round k+1 would start from round k's adapter
            problems.append(("train.lora", "a loop's rounds start from the previous round's "
                             "version, and no job starts from an adapter version: LoRA rounds "
                             "are not supported (run LoRA jobs one by one)"))
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
        child_id = loop_child_id(self.job_id, round_, self.trainer)
        common = dict(self.train, job_id=child_id, model_name=self.model_name,
                      base_version=base_version, activate=False, report_to=list(self.report_to),
                      logging_dir=(None if self.logging_dir is None
                                   else str(Path(self.logging_dir) / child_id)))
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
    for field, prompts in (("prompts.path", spec.prompts), ("held_out.prompts.path",
                                                           spec.held_out.prompts)):
        if prompts.path is None:
            continue
        try:
            n = len(read_prompt_rows(Path(prompts.path)))
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

JOB_TYPES: dict[str, type[_Job]] = {"reward_model": RewardModelJob, "dpo": DPOJob, "ppo": PPOJob,
                                    "sft": SFTJob, "iterate": LoopJob}
JobSpec = Union[RewardModelJob, DPOJob, PPOJob, SFTJob, LoopJob]  # the union of JOB_TYPES' values

#: The Celery task that runs each job type (task id = job id) ...
TASK_FOR_JOB: dict[str, str] = {"reward_model": "rlhf.train_reward_model",
                                "dpo": "rlhf.train_dpo", "ppo": "rlhf.train_ppo",
                                "sft": "rlhf.train_sft", "iterate": "rlhf.iterate"}
#: ... the queue (a Redis list) that task is routed to ...
QUEUE_FOR_TASK: dict[str, str] = {"rlhf.train_reward_model": "train.reward_model",
                                  "rlhf.train_dpo": "train.dpo", "rlhf.train_ppo": "train.ppo",
                                  "rlhf.train_sft": "train.sft", "rlhf.iterate": "train.loop"}
#: ... through the trainer's direct exchange (each queue bound by its own name).
TRAIN_EXCHANGE = "rlhf.train"

#: A minimal valid spec of each job type (`example_spec`); the paths are placeholders.
_EXAMPLES: dict[str, dict[str, Any]] = {
    "reward_model": {"type": "reward_model", "model_name": "reward",
                     "base_dir": "/models/base-reward",
                     "source": {"type": "jsonl", "path": "/data/preferences.jsonl"},
                     "epochs": 1, "activate": True},
    "dpo": {"type": "dpo", "model_name": "policy",
            "source": {"type": "stream", "stream": PREFERENCES_STREAM},
            "loss_type": "sigmoid", "beta": 0.1, "activate": True},
    "ppo": {"type": "ppo", "model_name": "policy",
            "source": {"type": "stream", "stream": SAMPLES_STREAM},
            "advantage_estimator": "grpo", "group_size": 4, "activate": True},
    "sft": {"type": "sft", "model_name": "policy",
            "source": {"type": "jsonl", "path": "/data/sft.jsonl"}, "activate": True},
    "iterate": {"type": "iterate", "model_name": "policy", "trainer": "dpo", "rounds": 3,
                "policy": "policy:50051",
                "labeller": {"type": "reward", "target": "reward:50051"},
                "prompts": {"path": "/data/prompts.jsonl"},
                "held_out": {"prompts": {"path": "/data/held-out-prompts.jsonl"}}},
}


def _job_class(job_type: str) -> type[_Job]:
    cls = JOB_TYPES.get(job_type) if isinstance(job_type, str) else None
    if cls is None:
        raise JobRejected(f"unknown job type {job_type!r}: one of {sorted(JOB_TYPES)}")
    return cls


def job_schema(job_type: str) -> dict[str, Any]:
    """The JSON schema of a job type's spec (fields, types, defaults, descriptions);
    `JobRejected` for an unknown type. The fields every training job shares for precision
    (`dtype`, `gradient_checkpointing`) and for tracking (`report_to`, `logging_dir`) come last,
    after the job's own."""
    schema = _job_class(job_type).model_json_schema()
    props = schema["properties"]
    schema["properties"] = dict(sorted(props.items(), key=lambda kv: (
        kv[0] in _TRACKING_FIELDS, kv[0] in _PRECISION_FIELDS)))
    return schema


_TRACKING_FIELDS = ("report_to", "logging_dir")
_PRECISION_FIELDS = ("dtype", "gradient_checkpointing")


def example_spec(job_type: str) -> dict[str, Any]:
    """A minimal valid spec of a job type (a fresh copy: change it freely); `JobRejected` for an
    unknown type. Its paths and service targets are placeholders."""
    _job_class(job_type)
    return copy.deepcopy(_EXAMPLES[job_type])


def parse_spec(data: dict[str, Any] | _Spec) -> JobSpec:
    """A validated spec, or `JobRejected` with one line per problem."""
    if isinstance(data, _Spec):
        return data
    if not isinstance(data, dict):
        raise JobRejected(f"a job spec is a JSON object, got {type(data).__name__}")
    kind = data.get("type")
    cls = JOB_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise JobRejected(f"job spec rejected: type: must be one of {sorted(JOB_TYPES)}, "
                          f"got {kind!r}")
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


def check_submit(spec: JobSpec, client: redis.Redis) -> None:
    """Every submit-time check beyond the spec: the registry (`check_against_registry`), then
    the job type's files and stream (`check_reward_model_submit`, `check_dpo_submit`,
    `check_ppo_submit`, `check_sft_submit`, `check_loop_submit`). Raises `JobRejected` naming
    the field. `client` decodes responses."""
    check_against_registry(spec, Registry(client))
    check = _SUBMIT_CHECKS.get(spec.type)
    if check is not None:  # an empty dataset is rejected here, not in the worker
        check(spec, client)


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
        raise JobRejected(f"job spec rejected:\n  base_dir: model {spec.model_name!r} has no "
                          "active version to start from; pass base_dir (a first version) or "
                          "base_version")


_SUBMIT_CHECKS: dict[str, Callable[[Any, redis.Redis], None]] = {
    "reward_model": check_reward_model_submit, "dpo": check_dpo_submit,
    "ppo": check_ppo_submit, "sft": check_sft_submit, "iterate": check_loop_submit}

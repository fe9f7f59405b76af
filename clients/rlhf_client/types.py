"""Typed values in and out of the clients: protobuf never leaks to the caller."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.IntEnum):
    UNSPECIFIED = 0
    STOP = 1
    LENGTH = 2
    EOS = 3
    ABORT = 4


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str


@dataclass(frozen=True)
class ModelInfo:
    model: ModelRef
    backend: str
    kind: str
    max_context: int
    vocab_size: int
    follows_registry: bool
    base: ModelRef | None = None  # an adapter version (LoRA): the base version it runs on


@dataclass(frozen=True)
class SamplingParams:
    """None leaves a parameter to the server's default (temperature 1, no top-k/top-p)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    return_logprobs: bool = False
    reset_token: str = ""
    # log-probs of the prompt tokens (Completion.prompt_logprobs); `generate` only, not streams
    return_prompt_logprobs: bool = False


@dataclass(frozen=True)
class Completion:
    """One sample. `token_ids` / `text` are the kept part (after the last reset token) and
    `logprobs` their log-probs in the kept context (prompt + kept tokens before each). The
    trajectory is everything generated (reset tokens and discarded text included) with each
    token's log-prob as sampled: what RL trains on. Without a reset both views are the same.

    `prompt_logprobs` (asked with `SamplingParams.return_prompt_logprobs`): log π(prompt[i + 1] |
    prompt[:i + 1]) for each prompt token after the first, len(prompt_token_ids) − 1 values, the
    same for every sample of a prompt; empty unless asked."""

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    prompt_token_ids: list[int]
    trajectory_token_ids: list[int] = field(default_factory=list)
    trajectory_logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)

    @property
    def reset(self) -> bool:
        """Whether a reset token discarded part of the trajectory."""
        return len(self.trajectory_token_ids) != len(self.token_ids)


@dataclass(frozen=True)
class GenerateResult:
    completions: list[Completion]
    model: ModelRef


@dataclass(frozen=True)
class StreamChunk:
    """The next piece of one completion (see GenerateStreamResponse in policy.proto):
    `assemble_stream` turns a stream's chunks into the completions the unary call returns."""

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    reset: bool
    prompt_token_ids: list[int]
    model: ModelRef
    dropped_token_ids: list[int] = field(default_factory=list)
    dropped_logprobs: list[float] = field(default_factory=list)
    kept_logprobs: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class SwapResult:
    previous: ModelRef
    model: ModelRef
    load_seconds: float


@dataclass
class _Acc:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    prompt_token_ids: list[int] = field(default_factory=list)
    trajectory_token_ids: list[int] = field(default_factory=list)
    trajectory_logprobs: list[float] = field(default_factory=list)


def assemble_stream(chunks) -> list[Completion]:
    """Concatenate a stream's chunks into completions (honours `reset`), ordered like unary:
    the kept part from token_ids / text (a reset drops what came before), the trajectory from
    dropped_token_ids + token_ids, and a last chunk's kept_logprobs replacing the kept part's
    log-probs as sampled."""
    acc: dict[tuple[int, int], _Acc] = {}
    for c in chunks:
        a = acc.setdefault((c.prompt_index, c.sample_index), _Acc())
        a.trajectory_token_ids += list(c.dropped_token_ids) + list(c.token_ids)
        a.trajectory_logprobs += list(c.dropped_logprobs) + list(c.logprobs)
        if c.reset:
            a.text, a.token_ids, a.logprobs = "", [], []
        a.text += c.text
        a.token_ids += c.token_ids
        a.logprobs += c.logprobs
        if c.kept_logprobs:
            a.logprobs = list(c.kept_logprobs)
        if c.prompt_token_ids:
            a.prompt_token_ids = list(c.prompt_token_ids)
        if c.finish_reason:
            a.finish_reason = c.finish_reason
    return [
        Completion(i, j, a.text, a.token_ids, a.logprobs, a.finish_reason, a.prompt_token_ids,
                   a.trajectory_token_ids, a.trajectory_logprobs)
        for (i, j), a in sorted(acc.items())
    ]


# --- reward and reference services ------------------------------------------------------------


@dataclass(frozen=True)
class ScoreResult:
    """One reward r(x, y) per scored item, in request order, and the version that produced them."""

    rewards: list[float]
    model: ModelRef


@dataclass(frozen=True)
class CompareResult:
    """Bradley–Terry preference P(a ≻ b) = σ(r_a − r_b) and both rewards."""

    probability_a: float
    reward_a: float
    reward_b: float
    model: ModelRef


@dataclass(frozen=True)
class SequenceLogProbs:
    """log π_ref(completion[i] | prompt, completion[:i]) for each i, and their float64 sum."""

    logprobs: list[float]
    sum: float


@dataclass(frozen=True)
class LogProbsResult:
    """One SequenceLogProbs per item, in request order, the version that produced them, and the
    dtype its weights computed them in ("" from a service that does not say)."""

    results: list[SequenceLogProbs]
    model: ModelRef
    dtype: str = ""

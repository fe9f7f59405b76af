"""Plain data passed between the policy servicer, the generator and the engines (no protobuf)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from rlhf.models.info import ModelRef


class Finish(enum.IntEnum):
    """Why a sample stopped; values equal rlhfpb.v1.FinishReason."""

    UNSPECIFIED = 0
    STOP = 1
    LENGTH = 2
    EOS = 3
    ABORT = 4


# Temperatures below this are greedy decoding on every backend: dividing logits by a tiny
# temperature overflows (T ≤ ~1e-38 gives inf / NaN probabilities in float32), and vLLM itself
# treats T < 1e-5 as greedy (its `_SAMPLING_EPS`).
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingConfig:
    """Validated sampling parameters, shared by every sample of a request."""

    max_new_tokens: int
    temperature: float = 1.0  # below GREEDY_BELOW_TEMPERATURE (0 included) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    return_logprobs: bool = False
    reset_token_id: int | None = None
    return_prompt_logprobs: bool = False  # teacher-forced log-probs of the prompt tokens
    # False: the caller reads each sample only when it finished (a unary call), so an engine may
    # deliver it in one delta (vLLM: no per-token outputs through its front end); True: stream
    deltas: bool = True

    @property
    def greedy(self) -> bool:
        """Greedy decoding (argmax): the one place every engine asks; T < 1e-5 counts as 0."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(frozen=True)
class SampleSpec:
    """One sample to generate: a prompt (token ids) and its own seed."""

    prompt_index: int
    sample_index: int
    prompt_ids: tuple[int, ...]
    seed: int | None  # derived per sample from the request seed (see sample_seed)


@dataclass
class SampleDelta:
    """New tokens of one sample since its previous delta; finish is set on its last delta.

    Engines emit these; token_ids are raw (before stop-string truncation of text or reset_token
    backtracking, which the generator applies the same way for every engine), and logprobs are
    those of the tokens as sampled (context: the prompt and every token generated before).

    `prompt_logprobs` (asked with `SamplingConfig.return_prompt_logprobs`): log π(prompt[i + 1] |
    prompt[:i + 1]) for every prompt token after the first, on the model that serves the sample.
    An engine sets it on the first delta of at least one sample of each prompt (the transformers
    backend on every sample's, from one pass per prompt; vLLM on the first sample's only), and
    the generator gives it to every completion of that prompt.

    `kept_logprobs` is set on the last delta of a sample when the request asked for log-probs and
    the sample contains the reset token: log π(token | prompt + kept tokens before it) for each
    token after the last reset token, from a teacher-forced pass of prompt + kept tokens on the
    model that generated the sample (empty when the reset token is the last token).
    """

    prompt_index: int
    sample_index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: Finish | None = None
    ref: ModelRef | None = None  # the model version that produced these tokens
    kept_logprobs: list[float] | None = None
    prompt_logprobs: list[float] | None = None


@dataclass
class Completion:
    """A finished sample as the API returns it.

    `trajectory_*` is everything the model generated, in order, reset tokens and the text they
    discard included, with each token's log-prob as sampled (context: prompt + trajectory
    before it). `token_ids` / `text` are the kept part (what follows the last reset token), and
    `logprobs` their log-probs in the kept context (prompt + kept tokens before it): the
    trajectory's suffix when no reset occurred, a teacher-forced recomputation when one did.
    """

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish: Finish
    prompt_token_ids: list[int]
    trajectory_token_ids: list[int] = field(default_factory=list)
    trajectory_logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)  # empty unless asked

    @property
    def reset(self) -> bool:
        """Whether a reset token discarded part of the trajectory."""
        return len(self.trajectory_token_ids) != len(self.token_ids)


@dataclass
class StreamChunk:
    """The next piece of one completion in a stream.

    token_ids / logprobs / text: the kept part's new pieces (`reset`: drop what earlier chunks
    carried first); logprobs as sampled. dropped_token_ids / dropped_logprobs: on a reset chunk,
    the tokens generated since the previous chunk up to and including the last reset token, so
    the trajectory is the concatenation of dropped_token_ids + token_ids over the chunks.
    kept_logprobs: on the last chunk of a completion that had a reset (with log-probs asked),
    the kept part's log-probs in the kept context; they replace the ones the chunks carried.
    """

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish: Finish | None = None
    reset: bool = False
    prompt_token_ids: list[int] = field(default_factory=list)
    dropped_token_ids: list[int] = field(default_factory=list)
    dropped_logprobs: list[float] = field(default_factory=list)
    kept_logprobs: list[float] = field(default_factory=list)


def sample_seed(seed: int | None, prompt_index: int, sample_index: int) -> int | None:
    """Seed of one sample, derived from the request's seed so each sample draws its own stream.

    Depends only on (seed, prompt_index, sample_index): the same request with the same seed gives
    the same samples on a backend whatever else is batched with it.
    """
    if seed is None:
        return None
    mixed = (seed * 0x9E3779B97F4A7C15 + prompt_index * 0xBF58476D1CE4E5B9 + sample_index * 0x94D049BB133111EB)
    return mixed % (2**63 - 1)

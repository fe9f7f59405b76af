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


@dataclass(frozen=True)
class SamplingConfig:
    """Validated sampling parameters, shared by every sample of a request."""

    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    return_logprobs: bool = False
    reset_token_id: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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
    backtracking, which the generator applies the same way for every engine).
    """

    prompt_index: int
    sample_index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: Finish | None = None
    ref: ModelRef | None = None  # the model version that produced these tokens


@dataclass
class Completion:
    """A finished sample as the API returns it."""

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish: Finish
    prompt_token_ids: list[int]


@dataclass
class StreamChunk:
    """The next piece of one completion in a stream."""

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish: Finish | None = None
    reset: bool = False
    prompt_token_ids: list[int] = field(default_factory=list)


def sample_seed(seed: int | None, prompt_index: int, sample_index: int) -> int | None:
    """Seed of one sample, derived from the request's seed so each sample draws its own stream.

    Depends only on (seed, prompt_index, sample_index): the same request with the same seed gives
    the same samples on a backend whatever else is batched with it.
    """
    if seed is None:
        return None
    mixed = (seed * 0x9E3779B97F4A7C15 + prompt_index * 0xBF58476D1CE4E5B9 + sample_index * 0x94D049BB133111EB)
    return mixed % (2**63 - 1)

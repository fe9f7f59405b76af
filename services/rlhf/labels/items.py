"""What annotators label: items (a prompt and k responses), where prompts come from, and how the
responses are generated live by the PolicyService.

An item's responses are in canonical order: the order they were generated in (one policy:
sample index; two policies, A/B between versions: `--policy`'s first, then `--policy-b`'s).
The page shows them in a random order (`shown`), and the vote is recorded against the canonical
order, so the same item shown twice (double labelling) is compared like for like.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from rlhf_client import AsyncPolicyClient, SamplingParams
from rlhf_client.queues import PayloadError, decode_entry
from rlhfpb.v1 import common_pb2, samples_pb2

from rlhf.labels.votes import Response, item_id

log = logging.getLogger(__name__)

MAX_TYPED_PROMPT_CHARS = 4000


@dataclass(frozen=True)
class Prompt:
    text: str
    id: str = ""  # "" for a typed prompt


@dataclass(frozen=True)
class Item:
    """A prompt with its responses (canonical order) and the sampling parameters used."""

    prompt: Prompt
    responses: tuple[Response, ...]
    sampling: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return item_id(self.prompt.text, self.responses)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt.text, "prompt_id": self.prompt.id,
                "responses": [{"text": r.text, "model": r.model} for r in self.responses],
                "sampling": self.sampling}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Item":
        return cls(Prompt(d["prompt"], d.get("prompt_id", "")),
                   tuple(Response(r["text"], r["model"]) for r in d["responses"]),
                   d.get("sampling") or {})


def model_name(ref) -> str:
    """"name@version" of a ModelRef (client or protobuf)."""
    return f"{ref.name}@{ref.version}"


def model_ref(name: str) -> common_pb2.ModelRef:
    """The protobuf ModelRef of "name@version" (unset fields when unknown)."""
    name_, sep, version = name.rpartition("@")
    return common_pb2.ModelRef(name=name_, version=version) if sep else common_pb2.ModelRef()


# ------------------------------------------------------------------------------------------------
# Prompt sources
# ------------------------------------------------------------------------------------------------


class PromptSource(Protocol):
    async def pick(self, rng: random.Random) -> Prompt | None: ...


class ListPrompts:
    """Prompts given up front (`--prompts-file`, `--prompt`), drawn uniformly at random."""

    def __init__(self, prompts: list[Prompt]):
        self.prompts = prompts

    async def pick(self, rng: random.Random) -> Prompt | None:
        return rng.choice(self.prompts) if self.prompts else None


class StreamPrompts:
    """RolloutPrompts from a stream (`--prompts-stream`): the newest `window` entries, re-read
    every `refresh_s` seconds, drawn uniformly at random. The stream is only read (no consumer
    group): labelling takes nothing away from the rollout workers."""

    def __init__(self, r, stream: str, *, window: int = 1000, refresh_s: float = 60.0):
        self.r, self.stream, self.window, self.refresh_s = r, stream, window, refresh_s
        self._prompts: list[Prompt] = []
        self._read_at = float("-inf")

    async def pick(self, rng: random.Random) -> Prompt | None:
        if time.monotonic() - self._read_at > self.refresh_s:
            entries = await self.r.xrevrange(self.stream, count=self.window)
            prompts = []
            for _, fields in entries:
                try:
                    msg = decode_entry(fields)
                except PayloadError:
                    continue
                if isinstance(msg, samples_pb2.RolloutPrompt):
                    prompts.append(Prompt(msg.prompt, msg.id))
            self._prompts, self._read_at = prompts, time.monotonic()
        return rng.choice(self._prompts) if self._prompts else None


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------


class Sampler:
    """Generates an item's k responses: k samples of one policy, or A/B between two policies
    (`--policy-b`): ⌈k/2⌉ from the first and ⌊k/2⌋ from the second, with the same seed."""

    def __init__(self, targets: list[str], *, k: int = 2, params: SamplingParams | None = None,
                 token: str | None = None, timeout: float = 60.0):
        if not 1 <= len(targets) <= 2:
            raise ValueError("one or two policy targets")
        self.k = k
        self.params = params or SamplingParams()
        self.timeout = timeout
        self.clients = [AsyncPolicyClient(t, token=token, timeout=timeout) for t in targets]

    def counts(self) -> list[int]:
        if len(self.clients) == 1:
            return [self.k]
        return [(self.k + 1) // 2, self.k // 2]

    def sampling(self, seed: int) -> dict[str, Any]:
        p = self.params
        out = {"temperature": 1.0 if p.temperature is None else p.temperature, "seed": seed,
               "top_p": p.top_p, "top_k": p.top_k, "max_new_tokens": p.max_new_tokens}
        return {k: v for k, v in out.items() if v is not None}

    async def sample(self, prompt: Prompt, rng: random.Random) -> Item:
        seed = rng.randrange(2**31)
        params = SamplingParams(temperature=self.params.temperature, top_p=self.params.top_p,
                                top_k=self.params.top_k, max_new_tokens=self.params.max_new_tokens,
                                seed=seed)
        results = await asyncio.gather(*(
            client.generate(prompt.text, params, n=n, timeout=self.timeout)
            for client, n in zip(self.clients, self.counts())
        ))
        responses = tuple(
            Response(c.text, model_name(res.model))
            for res in results
            for c in sorted(res.completions, key=lambda c: c.sample_index)
        )
        if len(responses) != self.k:
            raise RuntimeError(f"the policy returned {len(responses)} responses, {self.k} asked")
        return Item(prompt, responses, self.sampling(seed))

    async def close(self) -> None:
        for c in self.clients:
            await c.close()

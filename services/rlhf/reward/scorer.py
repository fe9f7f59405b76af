"""Reward scoring: validate, tokenize, micro-batch, run the sequence classifier.

A reward item is a (prompt, response) pair, as text or as token ids. Text is tokenized with the
model's tokenizer, prompt and response separately and without special tokens, and concatenated
(`encode(prompt) + encode(response)`), the same way the policy tokenizes text prompts; callers
who need other tokens (a chat template, an appended eos) send token ids.

The reward of an item is the model's output for that token sequence alone: the classifier's
score at its last token, whatever that token is (`rlhf.models.reward_head`: an eos that is also
the pad id counts, so a response that ends with eos is not scored as if it were cut before it).
Batches are right-padded with the pad id, so every real token sits where it would without
padding, never attends to a pad, and the pooled position is each row's last real token: padding
does not change a result.

Shared prompts (`Settings.share_prompts`, on by default): when items of a batch — of one request
or of several the batcher coalesced — have the same prompt tokens (a `compare`'s two responses,
PPO's n samples of a prompt), each distinct prompt runs once and its key/value cache is expanded
over its responses (`rlhf.serving.shared_prefix`); the score head reads each item's last token.
Rewards equal the per-item path's within float rounding (1e-5 in fp32, tested). A batch with no
prompt twice, a model without a plain linear `score` head, or one the shared-prefix forward is
not exact for (`shared_prefix.usable`) takes the right-padded path.

LoRA: an adapter version of the store (a reward-model LoRA job's, peft task_type SEQ_CLS) is
served merged onto its verified base (`rlhf.models.adapters.load_for_serving`): one plain
model; GetModel names the base. The base is read again on each swap.

Versions: each request is pinned when it is admitted to the model serving then; a batch holds
one model only (the batcher's key), so both rewards of a `compare` always come from one version.
`load_version` loads beside the serving model in another thread, warms it up, lets the swapper
replay the version's golden probes on it, and swaps by one assignment on the loop; batches
already queued finish on the model they were pinned to.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rlhf.config import Settings
from rlhf.errors import InvalidArgument, ResourceExhausted, ServiceError
from rlhf.models.info import ModelInfo, ModelRef
from rlhf.models.reward_head import _linear_score_head
from rlhf.serving.batched_model import BatchedModel, run_candidate
from rlhf.serving.batcher import calibrate_forward_cost, length_groups
from rlhf.serving.shared_prefix import canonical_order, has_shared_prompts, shared_prefix_hidden, usable

log = logging.getLogger(__name__)

SERVICE_LABEL = "reward"


# ------------------------------------------------------------------------------------------------
# Plain data in and out (the servicer translates protobuf to and from these)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreItemInput:
    """One item: a text pair (`prompt`, `response`) or a token pair (`prompt_ids`, `response_ids`).

    Exactly one form is set; `None` marks the unset one.
    """

    prompt: str | None = None
    response: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    response_ids: tuple[int, ...] | None = None

    @classmethod
    def text(cls, prompt: str, response: str) -> "ScoreItemInput":
        return cls(prompt=prompt, response=response)

    @classmethod
    def tokens(cls, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> "ScoreItemInput":
        return cls(prompt_ids=tuple(prompt_ids), response_ids=tuple(response_ids))


@dataclass(frozen=True)
class CompareInput:
    """One prompt and two responses: as text, or (when any id field is set) as token ids."""

    prompt: str = ""
    response_a: str = ""
    response_b: str = ""
    prompt_ids: tuple[int, ...] | None = None
    response_a_ids: tuple[int, ...] | None = None
    response_b_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class CompareResult:
    """P(a ≻ b) = σ(r_a − r_b) and both rewards, from one model version."""

    probability_a: float
    reward_a: float
    reward_b: float
    ref: ModelRef


def sigmoid(x: float) -> float:
    """σ(x) in float64 without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


# ------------------------------------------------------------------------------------------------
# Loaded model and batch items
# ------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Loaded:
    """One loaded reward checkpoint (never changed once it serves; hashed by identity)."""

    ref: ModelRef
    model: object  # a transformers *ForSequenceClassification with num_labels == 1
    tokenizer: object
    info: ModelInfo
    pad_id: int
    device: object
    forward_cost_tokens: int = 128  # fixed cost of one forward pass, in tokens (see length_groups)
    share_prompts: bool = True  # a prompt shared by items of a batch runs once


@dataclass(frozen=True, eq=False)
class _Item:
    """One token sequence to score on one pinned model (what the batcher carries)."""

    loaded: _Loaded
    ids: tuple[int, ...]  # prompt + response
    prompt_len: int = 0  # the leading tokens items may share


def _load(model_dir: Path, ref: ModelRef, settings: Settings) -> _Loaded:
    """A full version, or an adapter version (LoRA, SEQ_CLS) merged onto its verified base
    (`load_for_serving`); the tokenizer is the version's own (an adapter version holds copies of
    its base's tokenizer files, checksummed with it)."""
    from rlhf.models.adapters import load_for_serving
    from rlhf.models.loading import load_tokenizer, max_context

    model, base = load_for_serving(model_dir, "reward", dtype=settings.dtype,
                                   device=settings.device)
    tokenizer = load_tokenizer(model_dir)
    pad = model.config.pad_token_id  # load_reward_model guarantees one
    info = ModelInfo(
        ref=ref,
        backend="hf",
        kind="reward",
        max_context=int(max_context(model.config)),
        vocab_size=int(model.config.vocab_size),
        base=base,
    )
    device = next(model.parameters()).device
    return _Loaded(ref, model, tokenizer, info, int(pad), device,
                   share_prompts=bool(settings.share_prompts))


def score_batch(items: list[_Item]) -> list[float | BaseException]:
    """Rewards of `items` (one model); runs in the worker thread.

    With shared prompts on and a prompt that occurs twice: each distinct prompt once
    (`_forward_shared`). Otherwise the batch is split into a few right-padded forward passes of
    similar lengths (`length_groups`). A non-finite reward is that item's own error (INTERNAL:
    the model, not the caller, is at fault).
    """
    loaded = items[0].loaded
    rewards: list[float] = [0.0] * len(items)
    if loaded.share_prompts and _shareable(items, loaded):
        rewards = _forward_shared(items, loaded)
    else:
        groups = length_groups([len(it.ids) for it in items], forward_cost_tokens=loaded.forward_cost_tokens)
        for group in groups:
            for i, s in zip(group, _forward([items[i].ids for i in group], loaded)):
                rewards[i] = s
    return [s if math.isfinite(s) else ServiceError(f"the reward model produced a non-finite reward ({s})")
            for s in rewards]


def _split(it: _Item) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prompt, response); an item without a prompt is split after its first token."""
    p = it.prompt_len if 0 < it.prompt_len < len(it.ids) else 1
    return it.ids[:p], it.ids[p:]


def _shareable(items: list[_Item], loaded: _Loaded) -> bool:
    """A prompt occurs twice, and the shared-prefix forward is exact for this model."""
    return (has_shared_prompts([_split(it)[0] for it in items])
            and _linear_score_head(loaded.model) is not None
            and usable(loaded.model, max(len(it.ids) for it in items)))


def _forward_shared(items: list[_Item], loaded: _Loaded) -> list[float]:
    """The batch with each distinct prompt computed once (its KV cache expanded over its items);
    the score head on each item's last token, `(B,)` as floats."""
    import torch

    pairs = [_split(it) for it in items]
    order = canonical_order(pairs)  # computed in this order, whatever the request's
    with torch.inference_mode():
        hidden = shared_prefix_hidden(loaded.model, [pairs[i] for i in order], pad_id=loaded.pad_id,
                                      forward_cost_tokens=loaded.forward_cost_tokens)
        pooled = torch.stack([h[-1] for h in hidden])  # (B, H): each item's last token
        scores = loaded.model.score(pooled)[:, 0].float().cpu().tolist()
    out = [0.0] * len(items)
    for j, i in enumerate(order):
        out[i] = scores[j]
    return out


def _forward(seqs: list[tuple[int, ...]], loaded: _Loaded) -> list[float]:
    """One right-padded forward pass; the pooled score of each sequence `(B,)` as floats."""
    import torch

    from rlhf.models.reward_head import sequence_rewards

    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), loaded.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    with torch.inference_mode():
        rewards = sequence_rewards(loaded.model, ids.to(loaded.device), mask.to(loaded.device))
        return rewards.float().cpu().tolist()  # fp32 values


# ------------------------------------------------------------------------------------------------
# The scorer
# ------------------------------------------------------------------------------------------------


class RewardScorer(BatchedModel):
    """The reward model behind RewardService: `score`, `compare`, hot swap.

    Public API: `info`, `tokenizer`, `start()`, `score(items)`, `compare(input)`,
    `load_version(dir, ref, check)`, `health()`, `close()`, and `batcher` (for metrics and
    tests). The probe runner `check` gets is `await score([[prompt_ids, response_ids], ...]) ->
    [reward]` on the new weights.
    """

    label = SERVICE_LABEL

    def __init__(self, settings: Settings, model_dir, ref: ModelRef):
        super().__init__(settings, model_dir, ref, score_batch)

    @property
    def tokenizer(self):
        return self._loaded().tokenizer

    def _candidate(self, loaded: _Loaded):
        async def run(items) -> list[float]:
            return await run_candidate(score_batch, [_Item(loaded, tuple(p) + tuple(r), len(p)) for p, r in items])

        return run

    # -------------------------------------------------------------- requests
    async def score(self, items: Sequence[ScoreItemInput]) -> tuple[list[float], ModelRef]:
        """One reward per item, in order, and the version that produced them."""
        loaded = self._loaded()  # pinned: the whole request runs on this model
        if not items:
            raise InvalidArgument("items", "at least one item is required")
        limit = self._settings.max_prompts_per_request
        if len(items) > limit:
            raise ResourceExhausted(f"items: {len(items)} items, the limit is {limit}")
        batch = [self._item(loaded, f"items[{i}]", it) for i, it in enumerate(items)]
        rewards = await self.batcher.submit(batch)
        return rewards, loaded.ref

    async def compare(self, req: CompareInput) -> CompareResult:
        """P(a ≻ b) = σ(r_a − r_b) (float64, from the returned float32 rewards) and both rewards."""
        loaded = self._loaded()
        by_ids = any(x is not None for x in (req.prompt_ids, req.response_a_ids, req.response_b_ids))
        if by_ids:
            for name in ("prompt", "response_a", "response_b"):
                if getattr(req, name):
                    raise InvalidArgument(name, "set the text fields or the token-id fields, not both")
            prompt = req.prompt_ids or ()
            batch = [
                self._token_ids(loaded, "", prompt, response or (), "prompt_ids.ids", f"{name}.ids")
                for name, response in (("response_a_ids", req.response_a_ids),
                                       ("response_b_ids", req.response_b_ids))
            ]
        else:
            batch = [
                self._text_ids(loaded, "", req.prompt, req.response_a, "prompt", "response_a"),
                self._text_ids(loaded, "", req.prompt, req.response_b, "prompt", "response_b"),
            ]
        ra, rb = await self.batcher.submit(batch)
        return CompareResult(sigmoid(ra - rb), ra, rb, loaded.ref)

    # -------------------------------------------------------------- validation
    def _item(self, loaded: _Loaded, path: str, item: ScoreItemInput) -> _Item:
        if item.response_ids is not None or item.prompt_ids is not None:
            return self._token_ids(loaded, f"{path}.tokens", item.prompt_ids or (), item.response_ids or (),
                                   "prompt_ids", "response_ids")
        if item.response is not None or item.prompt is not None:
            return self._text_ids(loaded, f"{path}.text", item.prompt or "", item.response or "",
                                  "prompt", "response")
        raise InvalidArgument(path, "set text or tokens")

    @staticmethod
    def _join(path: str, name: str) -> str:
        return f"{path}.{name}" if path else name

    def _text_ids(self, loaded, path, prompt: str, response: str, p_name: str, r_name: str):
        if not response:
            raise InvalidArgument(self._join(path, r_name), "empty response")
        tok = loaded.tokenizer
        p_ids = tuple(tok.encode(prompt, add_special_tokens=False, verbose=False)) if prompt else ()
        r_ids = tuple(tok.encode(response, add_special_tokens=False, verbose=False))
        if not r_ids:
            raise InvalidArgument(self._join(path, r_name), "the response encodes to no tokens")
        return self._fits(loaded, path or r_name, p_ids, r_ids)

    def _token_ids(self, loaded, path, prompt_ids, response_ids, p_name: str, r_name: str):
        if not response_ids:
            raise InvalidArgument(self._join(path, r_name), "empty response")
        vocab = loaded.info.vocab_size
        for name, ids in ((p_name, prompt_ids), (r_name, response_ids)):
            for j, t in enumerate(ids):
                if not 0 <= t < vocab:
                    raise InvalidArgument(
                        f"{self._join(path, name)}[{j}]", f"token id {t} outside the vocabulary [0, {vocab})"
                    )
        return self._fits(loaded, path or r_name, tuple(prompt_ids), tuple(response_ids))

    @staticmethod
    def _fits(loaded: _Loaded, path: str, prompt: tuple[int, ...], response: tuple[int, ...]) -> _Item:
        ids = prompt + response
        ctx = loaded.info.max_context
        if len(ids) > ctx:
            raise InvalidArgument(
                path, f"prompt + response is {len(ids)} tokens; the model's context is {ctx}"
            )
        return _Item(loaded, ids, len(prompt))

    # -------------------------------------------------------------- loading (worker thread)
    def _load_and_warm(self, model_dir: Path, ref: ModelRef) -> _Loaded:
        loaded = _load(model_dir, ref, self._settings)
        probe = tuple(min(t, loaded.info.vocab_size - 1) for t in (5, 6, 7, 8))
        (reward,) = score_batch([_Item(loaded, probe, 2)])
        if isinstance(reward, BaseException):
            raise reward
        vocab = loaded.info.vocab_size

        def forward(rows: int, width: int) -> None:
            _forward([tuple((5 + k) % vocab for k in range(width))] * rows, loaded)

        loaded.forward_cost_tokens = calibrate_forward_cost(forward)
        log.info("reward %s/%s: one forward pass costs about %d tokens", ref.name, ref.version,
                 loaded.forward_cost_tokens)
        return loaded

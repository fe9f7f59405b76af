"""The request layer between the policy servicer and an engine, the same for every backend.

It validates a request (raising `InvalidArgument` naming the field), tokenizes text prompts,
expands `n` into per-sample specs with their own seeds, and turns the engine's raw token deltas
into completions: text decoded from the tokens, cut before the first stop string, and
`reset_token` backtracking (keep only what follows the last reset token).

Backtracking keeps two views of a sample (see `Completion`): the trajectory (every generated
token with its log-prob as sampled) and the kept part (after the last reset token). The kept
part's log-probs must be those of its own context (prompt + kept tokens), which differ from the
sampled ones once text was discarded: engines recompute them on the generating model and hand
them over on the sample's last delta (`SampleDelta.kept_logprobs`). Stop strings are matched on
the kept text, by the engines (which stop there) and here (which cut there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from rlhf.config import Settings
from rlhf.errors import InvalidArgument, ResourceExhausted
from rlhf.models.info import ModelRef
from rlhf.policy.engines.base import PolicyEngine
from rlhf.policy.types import (
    Completion,
    Finish,
    SampleDelta,
    SampleSpec,
    SamplingConfig,
    StreamChunk,
    sample_seed,
)
from rlhf.serving.metrics import GENERATED_TOKENS

#: The highest temperature a request may ask for (both backends).
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class ChatTurn:
    """One message of a conversation."""

    role: str
    content: str


@dataclass(frozen=True)
class PromptInput:
    """One prompt: text, token ids or a conversation (exactly one of them is not None)."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    chat: tuple[ChatTurn, ...] | None = None


def render_chat(tokenizer, messages: tuple[ChatTurn, ...], field: str) -> str:
    """A conversation as the model's chat template renders it, generation prompt added.

    The one rendering of chat prompts (gRPC `Prompt.chat` and the HTTP chat route both come
    here); `InvalidArgument(field)` when the model has no template or the template refuses."""
    if not messages:
        raise InvalidArgument(field, "at least one message is required")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument(field, "the served model has no chat template; send a text prompt instead")
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
    except TemplateError as exc:  # e.g. the template's raise_exception("roles must alternate")
        raise InvalidArgument(field, f"the chat template refused the messages: {exc}") from exc


@dataclass(frozen=True)
class GenerateInput:
    """A generate request as plain data; None means "not set, use the default"."""

    prompts: tuple[PromptInput, ...]
    n: int | None = None
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
    return_prompt_logprobs: bool = False


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@dataclass
class _SampleState:
    """Everything received so far for one sample, and what was already streamed."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # the trajectory
    logprobs: list[float] = field(default_factory=list)  # the trajectory's, as sampled
    base: int = 0  # index just after the last reset token
    sent: int = 0  # tokens already streamed
    emitted: str = ""  # text already streamed
    finish: Finish | None = None
    started: bool = False
    kept_logprobs: list[float] | None = None  # recomputed by the engine after a reset

    def kept_part_logprobs(self, config: SamplingConfig) -> list[float]:
        """Log-probs of the kept tokens in the kept context (empty unless asked)."""
        if not config.return_logprobs:
            return []
        if self.base == 0:  # no reset: the context is the same as when they were sampled
            return self.logprobs
        if self.kept_logprobs is None or len(self.kept_logprobs) != len(self.ids) - self.base:
            raise RuntimeError("the engine did not recompute the log-probs of a reset sample")
        return self.kept_logprobs


class Generator:
    """Validates, tokenizes, runs the engine and assembles completions."""

    def __init__(self, engine: PolicyEngine, settings: Settings):
        self.engine = engine
        self.settings = settings

    # ---------------------------------------------------------------- validation
    def prepare(self, req: GenerateInput) -> tuple[list[SampleSpec], SamplingConfig]:
        s = self.settings
        tok = self.engine.tokenizer
        info = self.engine.info
        vocab = info.vocab_size
        if not req.prompts:
            raise InvalidArgument("prompts", "at least one prompt is required")
        if len(req.prompts) > s.max_prompts_per_request:
            raise ResourceExhausted(
                f"prompts: {len(req.prompts)} prompts, the limit is {s.max_prompts_per_request}"
            )
        n = 1 if req.n is None else req.n
        if n <= 0:
            raise InvalidArgument("n", f"must be ≥ 1, got {n}")
        if len(req.prompts) * n > s.max_samples_per_request:
            raise ResourceExhausted(
                f"n: {len(req.prompts)} prompts × n={n} exceeds {s.max_samples_per_request} samples"
            )
        config = self._sampling(req, vocab)
        specs: list[SampleSpec] = []
        for i, prompt in enumerate(req.prompts):
            ids = self._prompt_ids(i, prompt, tok, vocab, info.max_context)
            for j in range(n):
                specs.append(SampleSpec(i, j, ids, sample_seed(config.seed, i, j)))
        return specs, config

    def _prompt_ids(self, i, prompt: PromptInput, tok, vocab: int, max_context: int) -> tuple[int, ...]:
        if prompt.token_ids is not None:
            ids = tuple(prompt.token_ids)
            for j, t in enumerate(ids):
                if not 0 <= t < vocab:
                    raise InvalidArgument(
                        f"prompts[{i}].token_ids.ids[{j}]", f"token id {t} outside the vocabulary [0, {vocab})"
                    )
            field_name = f"prompts[{i}].token_ids"
        elif prompt.text is not None:
            ids = tuple(tok.encode(prompt.text, add_special_tokens=False)) if prompt.text else ()
            field_name = f"prompts[{i}].text"
        elif prompt.chat is not None:
            field_name = f"prompts[{i}].chat"
            text = render_chat(tok, prompt.chat, field_name)
            ids = tuple(tok.encode(text, add_special_tokens=False)) if text else ()
        else:
            raise InvalidArgument(f"prompts[{i}]", "set text, token_ids or chat")
        if not ids:
            raise InvalidArgument(field_name, "empty prompt")
        if len(ids) >= max_context:
            raise InvalidArgument(
                field_name, f"prompt has {len(ids)} tokens; the model's context is {max_context}"
            )
        return ids

    def _sampling(self, req: GenerateInput, vocab: int) -> SamplingConfig:
        s = self.settings
        temperature = 1.0 if req.temperature is None else req.temperature
        # [0, 2] on every backend: vLLM refuses more, and so does the OpenAI API people port from
        if not (math.isfinite(temperature) and 0 <= temperature <= MAX_TEMPERATURE):
            raise InvalidArgument("params.temperature",
                                  f"must be a number in [0, {MAX_TEMPERATURE:g}], got {temperature}")
        top_p = 1.0 if req.top_p is None else req.top_p
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise InvalidArgument("params.top_p", f"must be in (0, 1], got {top_p}")
        top_k = 0 if req.top_k is None else req.top_k
        if top_k < 0:
            raise InvalidArgument("params.top_k", f"must be ≥ 0 (0 = off), got {top_k}")
        max_new = s.default_max_new_tokens if req.max_new_tokens is None else req.max_new_tokens
        if not 0 < max_new <= s.max_new_tokens_limit:
            raise InvalidArgument(
                "params.max_new_tokens", f"must be in [1, {s.max_new_tokens_limit}], got {max_new}"
            )
        min_new = 0 if req.min_new_tokens is None else req.min_new_tokens
        if not 0 <= min_new <= max_new:
            raise InvalidArgument("params.min_new_tokens", f"must be in [0, max_new_tokens], got {min_new}")
        for k, stop in enumerate(req.stop):
            if not stop:
                raise InvalidArgument(f"params.stop[{k}]", "empty stop string")
        for k, t in enumerate(req.stop_token_ids):
            if not 0 <= t < vocab:
                raise InvalidArgument(f"params.stop_token_ids[{k}]", f"token id {t} outside [0, {vocab})")
        reset_id = None
        if req.reset_token:
            ids = self.engine.tokenizer.encode(req.reset_token, add_special_tokens=False)
            if len(ids) != 1:
                raise InvalidArgument(
                    "params.reset_token", f"must be one token of the vocabulary, {req.reset_token!r} is {len(ids)}"
                )
            reset_id = ids[0]
        return SamplingConfig(
            max_new_tokens=max_new,
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=top_k,
            min_new_tokens=min_new,
            stop=tuple(req.stop),
            stop_token_ids=tuple(req.stop_token_ids),
            seed=req.seed,
            return_logprobs=req.return_logprobs,
            reset_token_id=reset_id,
            return_prompt_logprobs=req.return_prompt_logprobs,
        )

    # ---------------------------------------------------------------- running
    async def generate(self, req: GenerateInput) -> tuple[list[Completion], ModelRef]:
        """Every completion, ordered by (prompt_index, sample_index), and the producing version."""
        specs, config = self.prepare(req)
        config = replace(config, deltas=False)  # unary: nothing is read before a sample ends
        states = {(sp.prompt_index, sp.sample_index): _SampleState(list(sp.prompt_ids)) for sp in specs}
        prompt_lps: dict[int, list[float]] = {}  # per prompt: every sample of it shares them
        ref = self.engine.info.ref
        async for delta in self.engine.generate(specs, config):
            ref = delta.ref or ref
            GENERATED_TOKENS.labels("policy").inc(len(delta.token_ids))
            self._absorb(states[(delta.prompt_index, delta.sample_index)], delta, config)
            if delta.prompt_logprobs is not None:
                prompt_lps.setdefault(delta.prompt_index, list(delta.prompt_logprobs))
        if config.return_prompt_logprobs:
            missing = sorted({sp.prompt_index for sp in specs} - prompt_lps.keys())
            if missing:
                raise RuntimeError(f"the engine returned no prompt log-probs for prompts {missing}")
        out = []
        for (i, j), st in sorted(states.items()):
            text, _ = _cut_at_stop(_decode(self.engine.tokenizer, st.ids[st.base:]), config.stop)
            out.append(
                Completion(
                    prompt_index=i,
                    sample_index=j,
                    text=text,
                    token_ids=st.ids[st.base:],
                    logprobs=list(st.kept_part_logprobs(config)),
                    finish=st.finish or Finish.ABORT,
                    prompt_token_ids=st.prompt_ids,
                    trajectory_token_ids=list(st.ids),
                    trajectory_logprobs=list(st.logprobs) if config.return_logprobs else [],
                    prompt_logprobs=list(prompt_lps.get(i, ())),
                )
            )
        return out, ref

    async def stream(self, req: GenerateInput) -> AsyncIterator[tuple[StreamChunk, ModelRef]]:
        """Chunks as tokens arrive; the chunks of a sample concatenate to its unary completion.

        Prompt log-probs are not streamed (no chunk field carries them): the engine is not asked
        for them, whatever the request says."""
        specs, config = self.prepare(req)
        config = replace(config, return_prompt_logprobs=False)
        states = {(sp.prompt_index, sp.sample_index): _SampleState(list(sp.prompt_ids)) for sp in specs}
        ref = self.engine.info.ref
        hold = max((len(s) for s in config.stop), default=1) - 1
        async for delta in self.engine.generate(specs, config):
            ref = delta.ref or ref
            GENERATED_TOKENS.labels("policy").inc(len(delta.token_ids))
            st = states[(delta.prompt_index, delta.sample_index)]
            reset = self._absorb(st, delta, config)
            chunk = self._chunk(st, delta, reset, hold, config)
            if chunk is not None:
                yield chunk, ref

    @staticmethod
    def _absorb(st: _SampleState, delta: SampleDelta, config: SamplingConfig) -> bool:
        """Append a delta; returns True when it carried a reset token."""
        start = len(st.ids)
        st.ids.extend(delta.token_ids)
        st.logprobs.extend(delta.logprobs)
        if delta.finish is not None:
            st.finish = delta.finish
        if delta.kept_logprobs is not None:
            st.kept_logprobs = list(delta.kept_logprobs)
        if config.reset_token_id is not None and config.reset_token_id in delta.token_ids:
            last = max(k for k in range(start, len(st.ids)) if st.ids[k] == config.reset_token_id)
            st.base = last + 1
            return True
        return False

    def _chunk(self, st, delta, reset: bool, hold: int, config) -> StreamChunk | None:
        dropped_ids: list[int] = []
        dropped_lps: list[float] = []
        if reset:  # what arrived before (and with) the last reset token leaves the kept part
            dropped_ids = st.ids[st.sent:st.base]
            dropped_lps = st.logprobs[st.sent:st.base] if config.return_logprobs else []
            st.sent, st.emitted = st.base, ""
        new_ids = st.ids[st.sent:]
        new_lps = st.logprobs[st.sent:] if config.return_logprobs else []
        st.sent = len(st.ids)
        kept_lps: list[float] = []
        if st.finish is not None and st.base > 0:
            kept_lps = list(st.kept_part_logprobs(config))
        full = _decode(self.engine.tokenizer, st.ids[st.base:])
        if st.finish is not None:
            visible, _ = _cut_at_stop(full, config.stop)
        else:
            visible, hit = _cut_at_stop(full, config.stop)
            if not hit:
                visible = visible.rstrip("\ufffd")  # an unfinished multi-byte character
                visible = visible[: max(len(st.emitted), len(visible) - hold)]
        text = visible[len(st.emitted):] if visible.startswith(st.emitted) else ""
        st.emitted += text
        first = not st.started
        st.started = True
        if not (new_ids or text or reset or first or st.finish is not None):
            return None
        return StreamChunk(
            prompt_index=delta.prompt_index,
            sample_index=delta.sample_index,
            text=text,
            token_ids=new_ids,
            logprobs=new_lps,
            finish=st.finish,
            reset=reset,
            prompt_token_ids=st.prompt_ids if first else [],
            dropped_token_ids=dropped_ids,
            dropped_logprobs=dropped_lps,
            kept_logprobs=kept_lps,
        )

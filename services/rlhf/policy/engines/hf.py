"""The transformers backend: micro-batched, incremental generation with a KV cache.

Shape of the engine:

- `generate()` (event loop) admits its samples to a waiting queue and yields their deltas from
  an `asyncio.Queue` of its own.
- A background task (event loop) collects waiting samples into a batch: until `batch_max_size`
  sequences, `batch_max_tokens` padded tokens, or `batch_max_wait_ms` after the oldest arrived.
- One worker thread runs each batch with torch: a left-padded prefill, then one token per step
  for every row, with a `DynamicCache` whose layers append in place (`kv_cache.GrowingLayer`:
  no per-step copy of the whole cache). Finished and cancelled rows are dropped from the batch
  at the step they end (rows of the cache and the mask), so short samples stop costing compute,
  and columns that became padding in every row (the longest prompt left) are cut. Samples that
  arrive meanwhile join the running batch: prefilled beside it, at most `batch_prefill_chunk`
  prompt tokens between two decode steps (a long prompt never stalls decoding for long), then
  merged. Deltas are handed back to the loop with `call_soon_threadsafe`, one hop per step.

Versions: each request is pinned at admission to the model serving then (`info.ref`); a batch
holds requests of one model only, so a batch (and a request, even one split over several
batches) always runs entirely on one model. `load_version` loads the new model beside the old
in another thread and swaps by one assignment on the loop; requests already admitted finish on
the old model, which is freed when the last of them is done. Every delta names the version
that produced it in `delta.ref`.

Prompt log-probs (`return_prompt_logprobs`): when a batch starts (or samples join it), one
teacher-forced forward per prompt of a request that asked and has none yet — the n samples of a
prompt share it — with the prompts of the batch stacked right-padded (causal attention never
lets a real token see the padding after it), on the model the request is pinned to. Each
sample's first delta carries its prompt's values.

Backtracking: a row tracks where its kept part starts (after its last `reset_token_id`) and
matches stop strings on that text only. When it finishes with a reset in it and log-probs were
asked, one teacher-forced forward of prompt + kept tokens (same model, in the worker thread)
gives the kept part's log-probs in its own context (`SampleDelta.kept_logprobs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from rlhf.config import Settings
from rlhf.errors import FailedPrecondition, InvalidArgument, Unavailable
from rlhf.models.info import ModelInfo, ModelRef
from rlhf.models.loading import UnsafeCheckpoint
from rlhf.models.probes import PolicyProbeRunner
from rlhf.policy.engines.kv_cache import new_cache, plain_layers
from rlhf.policy.types import Finish, SampleDelta, SampleSpec, SamplingConfig
from rlhf.serving.swap import swap_phase

log = logging.getLogger(__name__)

_WARMUP_PROMPT = (0, 0, 0, 0)  # token ids; any valid ids do
# Most logits (rows × width × vocabulary) one prompt log-prob forward may hold: 512 MiB in fp32.
# A prompt longer than this alone still runs by itself.
_PROMPT_PASS_LOGITS = 1 << 27


# ------------------------------------------------------------------------------------------------
# Loaded model
# ------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Loaded:
    """One loaded checkpoint: everything a batch needs, immutable once built."""

    ref: ModelRef
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo
    eos_ids: frozenset[int]
    pad_id: int
    device: torch.device


def _eos_ids(model, tokenizer) -> frozenset[int]:
    """The generation config's eos id(s) together with the tokenizer's."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos is not None:
        ids.update(int(i) for i in gen_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _load(model_dir: Path, ref: ModelRef, settings: Settings) -> _Loaded:
    """Load model and tokenizer (safetensors, no remote code) into eval, no-grad mode."""
    from rlhf.models.loading import load_causal_lm, load_tokenizer, max_context, resolve_dtype

    # "auto": bf16 on CUDA and on CPUs with bf16 matrix instructions, else fp32; logits are
    # upcast to fp32 before log-softmax / sampling (`_Batch._forward`), whatever the weights
    dtype = resolve_dtype(settings.dtype, settings.device)
    model = load_causal_lm(model_dir, dtype=dtype, device=settings.device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = load_tokenizer(model_dir)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = min(eos) if eos else 0
    info = ModelInfo(
        ref=ref,
        backend="hf",
        kind="policy",
        max_context=int(max_context(model.config)),
        vocab_size=int(model.config.vocab_size),
    )
    device = next(model.parameters()).device
    return _Loaded(ref, model, tokenizer, info, eos, int(pad), device)


def _host_of(loaded: _Loaded):
    """The AdapterHost a loaded adapter version runs on (None for a full version)."""
    from rlhf.policy.engines.lora import AdapterView

    return loaded.model.host if isinstance(loaded.model, AdapterView) else None


def _load_like(current: _Loaded, current_dir: Path, model_dir: Path, ref: ModelRef) -> _Loaded | None:
    """A swap's fast path: when every file but the weights is byte-identical to the serving
    version's (config, generation config, tokenizer), the new safetensors go into a copy of the
    serving model and its tokenizer is shared: no config parsing, model construction or tokenizer
    load. None when anything else differs, or the weights' names or shapes are not the model's
    (the caller loads from scratch). Reads the safetensors once; the swapper checks them against
    the manifest meanwhile (`check_safe_dir` here: only safe formats are ever read)."""
    import copy
    import dataclasses

    from safetensors.torch import load_file

    from rlhf.models.loading import check_safe_dir
    from rlhf.models.store import same_but_weights
    from rlhf.policy.engines.lora import AdapterView

    if isinstance(current.model, AdapterView):  # base + adapter serving: load the full version anew
        return None
    try:
        check_safe_dir(model_dir)
        if not same_but_weights(model_dir, current_dir):
            return None
        state: dict[str, torch.Tensor] = {}
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            state.update(load_file(path))
    except (OSError, ValueError):
        return None
    model = copy.deepcopy(current.model)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    try:
        with torch.no_grad():
            missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError:  # a shape differs
        return None
    if unexpected or set(missing) - tied:
        return None
    model.eval()
    model.requires_grad_(False)
    return _Loaded(ref, model, current.tokenizer, dataclasses.replace(current.info, ref=ref),
                   current.eos_ids, current.pad_id, current.device)


# ------------------------------------------------------------------------------------------------
# Requests and sequences (event-loop side)
# ------------------------------------------------------------------------------------------------


class _Request:
    """One `generate()` call: its sampling params, pinned model, and the queue its deltas go to.

    `cancelled` is written on the loop and read by the worker thread between steps.
    """

    def __init__(self, params: SamplingConfig, loaded: _Loaded, queue: asyncio.Queue | None):
        self.params = params
        self.loaded = loaded
        self.queue = queue  # None: deltas are dropped (warm-up)
        self.cancelled = False
        # prompt index -> its prompt log-probs (worker thread only), when params ask for them
        self.prompt_logprobs: dict[int, list[float]] = {}

    def put(self, item: SampleDelta | BaseException) -> None:
        """Deliver on the loop thread."""
        if self.queue is not None:
            self.queue.put_nowait(item)


@dataclass(eq=False)
class _Seq:
    """One sample waiting for (or running in) a batch."""

    spec: SampleSpec
    request: _Request
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def prompt_len(self) -> int:
        return len(self.spec.prompt_ids)


def _delta(
    seq: _Seq, tokens: list[int], logprobs: list[float], finish: Finish | None,
    kept_logprobs: list[float] | None = None, prompt_logprobs: list[float] | None = None,
) -> SampleDelta:
    spec, ref = seq.spec, seq.request.loaded.ref  # the version that produced the tokens
    return SampleDelta(spec.prompt_index, spec.sample_index, tokens, logprobs, finish, ref=ref,
                       kept_logprobs=kept_logprobs, prompt_logprobs=prompt_logprobs)


# ------------------------------------------------------------------------------------------------
# Per-row state and token choice (worker side)
# ------------------------------------------------------------------------------------------------


class _Row:
    """A sequence while it runs: its generated tokens, its RNG, and when it must stop."""

    def __init__(self, seq: _Seq, loaded: _Loaded):
        self.seq = seq
        self.params = seq.request.params
        self.tokens: list[int] = []
        self.kept_from = 0  # index just after the last reset token: the kept part starts there
        self.stop_ids = frozenset(self.params.stop_token_ids)
        # ids that may not be chosen before min_new_tokens exist (in the vocabulary only)
        vocab = loaded.info.vocab_size
        self.early_stop_ids = sorted(t for t in loaded.eos_ids | self.stop_ids if 0 <= t < vocab)
        self.generator: torch.Generator | None = None
        if not self.params.greedy:
            self.generator = torch.Generator(device=loaded.device)
            if seq.spec.seed is None:
                self.generator.seed()  # nondeterministic
            else:
                self.generator.manual_seed(seq.spec.seed)

    @property
    def cancelled(self) -> bool:
        return self.seq.request.cancelled

    def finish_after(self, token: int, loaded: _Loaded) -> Finish | None:
        """Append `token`; the reason to stop now, or None to go on."""
        self.tokens.append(token)
        p = self.params
        if token == p.reset_token_id:
            self.kept_from = len(self.tokens)
        if token in loaded.eos_ids:
            return Finish.EOS
        if token in self.stop_ids:
            return Finish.STOP
        if p.stop and self._stop_string_hit(loaded.tokenizer):
            return Finish.STOP
        if len(self.tokens) >= p.max_new_tokens:
            return Finish.LENGTH
        if self.seq.prompt_len + len(self.tokens) >= loaded.info.max_context:
            return Finish.LENGTH
        return None

    def _stop_string_hit(self, tokenizer) -> bool:
        # The kept part (after the last reset token) decoded in full each step: text a reset
        # discarded never stops a sample, and a byte-level token may complete a character that
        # an earlier token began, so a suffix decode could miss a stop string.
        text = tokenizer.decode(
            self.tokens[self.kept_from:], skip_special_tokens=True,
            clean_up_tokenization_spaces=False,
        )
        return any(s in text for s in self.params.stop)

    def prompt_logprobs(self) -> list[float] | None:
        """On the first delta, when asked: the prompt's log-probs (`_fill_prompt_logprobs`)."""
        if not (self.params.return_prompt_logprobs and len(self.tokens) == 1):
            return None
        return self.seq.request.prompt_logprobs[self.seq.spec.prompt_index]

    def kept_logprobs(self, loaded: _Loaded) -> list[float] | None:
        """After a reset (log-probs asked): the kept tokens' log-probs in their own context."""
        if not (self.params.return_logprobs and self.kept_from):
            return None
        return _teacher_forced(loaded, self.seq.spec.prompt_ids, self.tokens[self.kept_from:])


def _teacher_forced(
    loaded: _Loaded, prompt: Sequence[int], completion: Sequence[int]
) -> list[float]:
    """log π(completion[k] | prompt + completion[:k]): one forward pass of prompt + completion."""
    if not completion:
        return []
    ids = torch.tensor([list(prompt) + list(completion)], dtype=torch.long, device=loaded.device)
    # the logits at the last len(completion) + 1 positions; the final one predicts nothing asked
    out = loaded.model(input_ids=ids, use_cache=False, logits_to_keep=len(completion) + 1)
    logprobs = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
    target = torch.tensor(list(completion), dtype=torch.long, device=loaded.device)
    return logprobs.gather(1, target[:, None]).squeeze(1).tolist()


def _fill_prompt_logprobs(loaded: _Loaded, rows: list["_Row"]) -> int:
    """Compute the prompt log-probs the requests of `rows` asked for and lack; returns how many
    prompts ran.

    Once per (request, prompt index), however many samples of the prompt there are, and
    whichever batch they run in. Prompts are stacked right-padded, as many per forward as
    `_PROMPT_PASS_LOGITS` allows: with the padding after every real token, causal attention and
    default positions give each row exactly its own teacher-forced pass, so no mask is needed.
    """
    todo: dict[tuple[int, int], tuple[_Request, int, tuple[int, ...]]] = {}
    for r in rows:
        request, spec = r.seq.request, r.seq.spec
        if r.params.return_prompt_logprobs and spec.prompt_index not in request.prompt_logprobs:
            todo.setdefault((id(request), spec.prompt_index), (request, spec.prompt_index, spec.prompt_ids))
    jobs = sorted(todo.values(), key=lambda j: len(j[2]))  # similar lengths pad least
    vocab = loaded.info.vocab_size
    start = 0
    while start < len(jobs):
        end = start + 1
        while end < len(jobs) and (end + 1 - start) * len(jobs[end][2]) * vocab <= _PROMPT_PASS_LOGITS:
            end += 1
        chunk = jobs[start:end]
        for (request, index, _), lps in zip(chunk, _prompt_pass(loaded, [j[2] for j in chunk])):
            request.prompt_logprobs[index] = lps
        start = end
    return len(jobs)


def _prompt_pass(loaded: _Loaded, prompts: list[tuple[int, ...]]) -> list[list[float]]:
    """log π(p[i + 1] | p[:i + 1]) of each prompt p: one forward, rows right-padded."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), loaded.pad_id, dtype=torch.long, device=loaded.device)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=loaded.device)
    logits = loaded.model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
    picked = torch.log_softmax(logits, dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)  # (B, T-1)
    return [picked[i, : len(p) - 1].tolist() for i, p in enumerate(prompts)]


def _choice_logits(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """`logits` with eos and stop ids at −inf for rows that have fewer than min_new_tokens."""
    early = [
        i
        for i, r in enumerate(rows)
        if len(r.tokens) < r.params.min_new_tokens and r.early_stop_ids
    ]
    if not early:
        return logits
    out = logits.clone()
    for i in early:
        out[i, rows[i].early_stop_ids] = float("-inf")
    return out


def _sample(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """One token per row drawn from temperature / top-k / top-p filtered logits `(S, V)`.

    Vectorised over rows; each row draws one uniform number from its own generator and picks
    its token by inverse CDF, so a row's draw never depends on what else is in the batch.
    """
    S, V = logits.shape
    dev = logits.device
    temperature = torch.tensor([r.params.temperature for r in rows], device=dev, dtype=logits.dtype)
    scaled = logits / temperature[:, None]
    top_k = torch.tensor(  # 0 (off) keeps all V tokens
        [r.params.top_k if 0 < r.params.top_k < V else V for r in rows], device=dev
    )
    # top_p == 1 means off; +inf keeps every token even where a cumsum rounds up to 1
    top_p = torch.tensor(
        [r.params.top_p if r.params.top_p < 1.0 else float("inf") for r in rows],
        device=dev,
        dtype=logits.dtype,
    )
    K = int(top_k.max())
    if K == V and bool(torch.isinf(top_p).all()):
        candidates = scaled  # no filtering: sample over the vocabulary as it is
        index = None
    else:
        # candidates sorted by descending logit: rank r is the (r+1)-th most likely token
        candidates, index = torch.topk(scaled, K, dim=-1)
        rank = torch.arange(K, device=dev)
        candidates = candidates.masked_fill(rank[None, :] >= top_k[:, None], float("-inf"))
        probs = torch.softmax(candidates, dim=-1)
        # top-p: keep token r while the mass of the tokens ranked above it is < top_p, i.e. the
        # smallest prefix whose mass reaches top_p (the first token is always kept)
        mass_above = probs.cumsum(dim=-1) - probs
        candidates = candidates.masked_fill(mass_above >= top_p[:, None], float("-inf"))
    probs = torch.softmax(candidates, dim=-1)
    cdf = probs.cumsum(dim=-1)
    u = torch.stack([torch.rand((), generator=r.generator, device=dev) for r in rows]).to(cdf.dtype)
    # first position whose cdf exceeds u·total; zero-probability tokens never qualify
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    pick = pick.clamp_(max=cdf.shape[-1] - 1)  # u·total rounding up to the last cdf value
    return pick.squeeze(1) if index is None else index.gather(1, pick).squeeze(1)


def _next_tokens(logits: torch.Tensor, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen token `(B,)` and its log-prob `(B,)` for each row, from fp32 logits `(B, V)`.

    The log-prob is taken from the raw distribution (temperature 1, no top-k/top-p, no
    min-tokens mask): it equals a teacher-forced forward pass.
    """
    logprobs = torch.log_softmax(logits, dim=-1)
    choice = _choice_logits(logits, rows)
    tokens = choice.argmax(dim=-1)  # right for greedy rows; sampled rows are overwritten
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        idx = torch.tensor(sampled, device=logits.device)
        tokens[idx] = _sample(choice[idx], [rows[i] for i in sampled])
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


# ------------------------------------------------------------------------------------------------
# One running batch (worker side)
# ------------------------------------------------------------------------------------------------


class _Batch:
    """Tensors of a running batch: the KV cache and the attention mask, one row per sequence.

    Prompts are left-padded, so every row's next token sits in the last column. Position ids
    come from the mask (count of real tokens before a position), so padding shifts nothing.
    """

    def __init__(self, loaded: _Loaded, rows: list[_Row]):
        self.loaded = loaded
        self.rows = rows
        self.cache = new_cache(loaded.model.config)  # appends in place (kv_cache.GrowingLayer)
        self.attn: torch.Tensor | None = None  # (B, T) 1 = real token, 0 = left padding
        self._prompt: tuple[torch.Tensor, ...] | None = None  # ids, mask, positions while prefilling
        self._done = 0  # prompt columns prefilled so far

    def prefill(self, chunk: int | None = None) -> torch.Tensor | None:
        """Run the prompts, all at once (`chunk` None) or the next `chunk` prompt tokens (rows ×
        columns, at least one column); returns fp32 logits `(B, V)` of each row's first new
        token once the last column has run, else None (call again)."""
        if self._prompt is None:
            dev, pad = self.loaded.device, self.loaded.pad_id
            width = max(r.seq.prompt_len for r in self.rows)
            ids = torch.full((len(self.rows), width), pad, dtype=torch.long, device=dev)
            attn = torch.zeros((len(self.rows), width), dtype=torch.long, device=dev)
            for i, r in enumerate(self.rows):
                n = r.seq.prompt_len
                ids[i, width - n:] = torch.tensor(r.seq.spec.prompt_ids, dtype=torch.long, device=dev)
                attn[i, width - n:] = 1
            # position of a token = number of real tokens before it; pads get 0 (they are masked)
            positions = (attn.cumsum(dim=-1) - 1).clamp_(min=0)
            self._prompt = (ids, attn, positions)
            self._done = 0
        ids, attn, positions = self._prompt
        width = ids.shape[1]
        end = width if chunk is None else min(width, self._done + max(1, chunk // len(self.rows)))
        self.attn = attn[:, :end]  # the mask covers the cached columns and the new ones
        logits = self._forward(ids[:, self._done:end], positions[:, self._done:end])
        self._done = end
        if end < width:
            return None
        self._prompt = None
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row `(B,)`; returns fp32 logits `(B, V)` of the next one."""
        ones = torch.ones((self.attn.shape[0], 1), dtype=self.attn.dtype, device=self.attn.device)
        self.attn = torch.cat([self.attn, ones], dim=-1)
        positions = self.attn.sum(dim=-1, keepdim=True) - 1
        return self._forward(tokens[:, None], positions)

    def keep(self, indices: list[int]) -> None:
        """Drop every row not in `indices` (order kept) from the rows, the mask and the cache."""
        if len(indices) == len(self.rows):
            return
        idx = torch.tensor(indices, dtype=torch.long, device=self.attn.device)
        self.cache.batch_select_indices(idx)
        self.attn = self.attn[idx]
        self.rows = [self.rows[i] for i in indices]
        self._trim_left_padding()

    def merge(self, other: "_Batch") -> None:
        """Append `other`'s rows (freshly prefilled) to this running batch.

        Both are left-padded to the longer of the two cache lengths: padding columns are masked
        and positions come from the mask, so no row's numbers change. Needs plain DynamicLayers.
        """
        t1, t2 = self.attn.shape[1], other.attn.shape[1]
        width = max(t1, t2)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width - t1), _pad_left(theirs.keys, width - t2)])
            mine.values = torch.cat(
                [_pad_left(mine.values, width - t1), _pad_left(theirs.values, width - t2)]
            )
        self.attn = torch.cat(
            [F.pad(self.attn, (width - t1, 0)), F.pad(other.attn, (width - t2, 0))]
        )
        self.rows = self.rows + other.rows

    def mergeable(self) -> bool:
        return plain_layers(self.cache)

    def _trim_left_padding(self) -> None:
        """Cut the columns that are padding in every remaining row (e.g. after the longest prompt
        finished). Safe because positions come from the mask, not from the cache length."""
        lead = int(self.attn.any(dim=0).to(torch.int8).argmax())  # first column with a real token
        if lead == 0 or not plain_layers(self.cache):
            return  # sliding-window / other layer kinds: keep their own bookkeeping intact
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keys = layer.keys[..., lead:, :]  # (B, heads, T, head_dim)
                layer.values = layer.values[..., lead:, :]
        self.attn = self.attn[:, lead:]

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.loaded.model(
            input_ids=ids,
            attention_mask=self.attn,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------


class HFEngine:
    """`PolicyEngine` on transformers: micro-batching, KV cache, per-row sampling, hot swap.

    Public API: `info`, `tokenizer`, `start()`, `generate(samples, params)`, `load_version(dir,
    ref)`, `health()`, `close()`; `active_sequences()` (rows running + samples waiting) and
    `stats()` (batches, sequences, tokens computed) for tests and metrics.
    """

    def __init__(self, settings: Settings, model_dir, ref: ModelRef):
        self._settings = settings
        self._model_dir = Path(model_dir)
        self._initial_ref = ref
        self._current: _Loaded | None = None
        self._host = None  # AdapterHost of the serving adapter version (None: a full version)
        self._waiting: deque[_Seq] = deque()  # guarded by _wait_lock (the worker takes joiners)
        self._wait_lock = threading.Lock()
        self._requests: set[_Request] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._swap_lock: asyncio.Lock | None = None
        self._running_rows = 0  # written by the worker thread
        self._in_batch = False  # a batch is running (loop thread: set before, cleared after)
        self._batches = 0  # batches run, sequences in them, tokens computed (stats)
        self._sequences = 0
        self._tokens = 0  # written by the worker thread
        self._prompt_passes = 0  # prompts whose log-probs were computed (worker thread)
        self._stopping = threading.Event()  # tells the worker to abandon its batch
        self._serving = False

    # -------------------------------------------------------------- protocol
    @property
    def info(self) -> ModelInfo:
        if self._current is None:
            raise Unavailable("the policy model is not loaded")
        return self._current.info

    @property
    def tokenizer(self):
        if self._current is None:
            raise Unavailable("the policy model is not loaded")
        return self._current.tokenizer

    def health(self) -> bool:
        return self._serving and self._task is not None and not self._task.done()

    def active_sequences(self) -> int:
        """Samples the engine still spends work on: rows in the running batch + samples waiting."""
        return self._running_rows + len(self._waiting)

    def idle(self) -> bool:
        """No batch is running (its worker may still take joiners after its last row ended: a
        request sent then joins it rather than start a batch) and no sample waits."""
        return not self._in_batch and not self._waiting

    def stats(self) -> dict[str, int]:
        """Counters since start: batches run, sequences they held, tokens computed (one per
        row per step; a cancelled row counts until the step that drops it), and prompts whose
        log-probs were computed (`prompt_passes`: one per prompt of a request, not per sample)."""
        return {"batches": self._batches, "sequences": self._sequences, "tokens": self._tokens,
                "prompt_passes": self._prompt_passes}

    def _count_prompt_passes(self, k: int) -> None:
        self._prompt_passes += k

    async def start(self) -> None:
        if self._serving:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._swap_lock = asyncio.Lock()
        self._stopping.clear()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")
        loaded = await self._loop.run_in_executor(
            self._executor, self._load_and_warm, self._model_dir, self._initial_ref
        )
        self._current = loaded
        self._task = self._loop.create_task(self._batch_loop(), name="hf-engine-batches")
        self._serving = True
        log.info("hf engine serving %s/%s", loaded.ref.name, loaded.ref.version)

    async def generate(
        self, samples: Sequence[SampleSpec], params: SamplingConfig
    ) -> AsyncIterator[SampleDelta]:
        """Deltas of every sample as tokens are produced; see `base.py` for the contract.

        Closing the iterator early (or cancelling the consuming task) cancels the samples not
        finished yet: they leave the waiting queue at once and the running batch at its next step.
        """
        request = self._admit(samples, params)
        remaining = len(samples)
        try:
            while remaining:
                item = await request.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish is not None:
                    remaining -= 1
                yield item
        finally:
            self._release(request, cancelled=remaining > 0)

    async def load_version(self, model_dir, ref: ModelRef, check=None) -> None:
        """Load `model_dir` beside the serving model (in another thread: batches keep running),
        warm it up, let `check(greedy)` verify it (golden probes; raising refuses the version),
        then make it the model of every request admitted from now on. On any failure the old
        model keeps serving, unchanged."""
        if not self._serving:
            raise Unavailable("the policy engine is not serving")
        async with self._swap_lock:
            try:
                with swap_phase("load"):
                    loaded = await asyncio.to_thread(self._load_version, Path(model_dir), ref)
            except UnsafeCheckpoint:  # an adapter's base missing / not its own: the swapper refuses
                raise
            except Exception as exc:
                log.warning("loading %s/%s failed: %s", ref.name, ref.version, exc)
                raise FailedPrecondition(
                    f"loading {ref.name} version {ref.version} failed: {exc}"
                ) from exc
            probed = False  # the golden probes run the real path: they are the warm-up

            async def greedy(prompts, max_new_tokens: int):
                nonlocal probed
                probed = True
                return await self._candidate_greedy(loaded, prompts, max_new_tokens)

            async def forced(prompts, completions):  # one forward per probe (probes.py)
                nonlocal probed
                probed = True
                return await asyncio.to_thread(_forced, loaded, prompts, completions)

            if check is not None:
                await check(PolicyProbeRunner(greedy, forced))
            if not probed:
                with swap_phase("warm-up"):
                    await asyncio.to_thread(self._warm, loaded)
            if not self._serving:
                raise Unavailable("the policy engine closed while loading")
            old, self._current = self._current, loaded  # the swap: one assignment on the loop
            self._model_dir = Path(model_dir)
            self._host = _host_of(loaded)  # the old host lives on until its last request ends
            log.info(
                "hf engine swapped %s/%s -> %s/%s",
                old.ref.name, old.ref.version, ref.name, ref.version,
            )

    def _load_version(self, model_dir: Path, ref: ModelRef) -> _Loaded:
        """The version in `model_dir`: into a copy of the serving model when only the weights
        differ (`_load_like`), else loaded from scratch; an adapter version on its base
        (`_load_adapter`)."""
        from rlhf.policy.engines.lora import adapter_version

        adapter = adapter_version(model_dir)  # UnsafeCheckpoint: its base missing / not its own
        if adapter is not None:
            return self._load_adapter(adapter, ref)
        current = self._current
        if current is not None:
            loaded = _load_like(current, self._model_dir, model_dir, ref)
            if loaded is not None:
                return loaded
        return _load(model_dir, ref, self._settings)

    async def _candidate_greedy(self, loaded: _Loaded, prompts, max_new_tokens: int):
        """Greedy (token ids, log-probs) of each prompt on weights that are not serving yet."""
        return await asyncio.to_thread(_greedy, loaded, prompts, max_new_tokens)

    async def close(self) -> None:
        if self._loop is None:
            return
        self._serving = False
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._executor is not None:  # waits for the worker to leave its batch (next step)
            await asyncio.to_thread(self._executor.shutdown, True)
            self._executor = None
        for request in list(self._requests):
            request.put(Unavailable("the policy engine is shutting down"))
        self._requests.clear()
        with self._wait_lock:
            self._waiting.clear()
        self._current = None

    # -------------------------------------------------------------- admission (loop thread)
    def _admit(self, samples: Sequence[SampleSpec], params: SamplingConfig) -> _Request:
        if not self._serving:
            raise Unavailable("the policy engine is not serving")
        for spec in samples:
            if not spec.prompt_ids:
                raise InvalidArgument(f"prompts[{spec.prompt_index}]", "empty prompt")
        loaded = self._current  # pinned: all of this request runs on this model
        request = _Request(params, loaded, asyncio.Queue())
        self._requests.add(request)
        for spec in samples:
            seq = _Seq(spec, request)
            if params.max_new_tokens <= 0 or seq.prompt_len >= loaded.info.max_context:
                request.put(_delta(seq, [], [], Finish.LENGTH))  # nothing may be generated
            else:
                with self._wait_lock:
                    self._waiting.append(seq)
        self._wake.set()
        return request

    def _release(self, request: _Request, *, cancelled: bool) -> None:
        self._requests.discard(request)
        if cancelled:
            request.cancelled = True  # the worker drops its rows at the next step
            with self._wait_lock:
                self._waiting = deque(s for s in self._waiting if s.request is not request)

    # -------------------------------------------------------------- batching (loop thread)
    async def _batch_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            loaded = batch[0].request.loaded
            self._running_rows = len(batch)  # counted from now, not from when the worker starts
            self._batches += 1
            self._sequences += len(batch)
            self._in_batch = True
            try:
                await self._loop.run_in_executor(self._executor, self._run_batch, loaded, batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug or out of memory: fail this batch, keep serving
                log.exception("hf batch failed")
                for request in {s.request for s in batch}:
                    request.put(exc)
            finally:
                self._in_batch = False

    async def _next_batch(self) -> list[_Seq]:
        """Wait for work, then for company (until full or the oldest waited max_wait); take it."""
        max_wait = self._settings.batch_max_wait_ms / 1000.0
        while True:
            while not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            deadline = self._waiting[0].enqueued + max_wait
            while self._waiting and not self._plan()[1]:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), left)
            with self._wait_lock:
                batch, _ = self._plan()
                if batch:
                    taken = set(map(id, batch))
                    self._waiting = deque(s for s in self._waiting if id(s) not in taken)
                    return batch

    def _plan(self) -> tuple[list[_Seq], bool]:
        """The next batch in arrival order (same model as the oldest), and whether it is full.

        Budget: rows × (longest prompt + longest max_new_tokens), the padded size the KV cache
        can reach; a lone sample over the budget still runs by itself.
        """
        s = self._settings
        batch: list[_Seq] = []
        width = 0
        for seq in self._waiting:
            if batch and seq.request.loaded is not batch[0].request.loaded:
                continue
            ctx = seq.request.loaded.info.max_context
            w = min(ctx, max(width, seq.prompt_len + seq.request.params.max_new_tokens))
            if batch and (len(batch) + 1) * w > s.batch_max_tokens:
                return batch, True
            batch.append(seq)
            width = w
            if len(batch) >= s.batch_max_size:
                return batch, True
        return batch, False

    # -------------------------------------------------------------- generation (worker thread)
    def _run_batch(self, loaded: _Loaded, seqs: list[_Seq]) -> None:
        """Generate a batch to the end, handing each step's deltas to the loop in one hop."""
        loop = self._loop
        try:
            with torch.inference_mode():
                join = functools.partial(self._take_joiners, loaded)
                steps = _generate_steps(loaded, seqs, join, self._settings.batch_max_size,
                                        self._count_prompt_passes, self._settings.batch_prefill_chunk)
                for out, computed, running in steps:
                    self._running_rows = running  # counters first: a caller that saw the
                    self._tokens += computed  # deltas sees the stats that include them
                    loop.call_soon_threadsafe(_deliver, out)
                    if self._stopping.is_set():
                        return
        finally:
            self._running_rows = 0

    def _take_joiners(self, loaded: _Loaded, room: int) -> list[_Seq]:
        """(worker thread) Take up to `room` waiting samples pinned to `loaded`, oldest first."""
        if not self._waiting:  # racy read is fine: a sample missed now joins at the next step
            return []
        with self._wait_lock:
            taken = [s for s in self._waiting if s.request.loaded is loaded and not s.request.cancelled][:room]
            if taken:
                ids = set(map(id, taken))
                self._waiting = deque(s for s in self._waiting if id(s) not in ids)
        self._sequences += len(taken)
        self._running_rows += len(taken)
        return taken

    def _load_and_warm(self, model_dir: Path, ref: ModelRef) -> _Loaded:
        """Load a checkpoint (an adapter version on its base) and run a short greedy
        generation through the real path."""
        loaded = self._load_version(model_dir, ref)
        self._warm(loaded)
        self._host = _host_of(loaded)
        return loaded

    def _load_adapter(self, adapter, ref: ModelRef) -> _Loaded:
        """An adapter version on its base: only the adapter is loaded when the serving adapter
        has the same base (`AdapterHost.add`); else a host is built on the serving model's copy
        (the base is serving) or on the base loaded from the store."""
        import copy
        import dataclasses

        from rlhf.policy.engines.lora import AdapterHost, AdapterView, same_dir

        host, current = self._host, self._current
        if host is not None and same_dir(host.base_dir, adapter.base_dir):
            name = host.add(adapter.adapter_dir)  # the base stays as it is
        else:
            if (current is not None and not isinstance(current.model, AdapterView)
                    and same_dir(self._model_dir, adapter.base_dir)):
                # the serving base, copied: peft edits the model it wraps
                base = dataclasses.replace(current, model=copy.deepcopy(current.model))
            else:
                base = _load(adapter.base_dir, adapter.base, self._settings)
            host = AdapterHost(adapter.base_dir, base.model, adapter.adapter_dir)
            host.base_loaded = dataclasses.replace(base, model=None)
            name = host.first
        b = host.base_loaded
        info = dataclasses.replace(b.info, ref=ref, base=adapter.base)
        return _Loaded(ref, host.view(name), b.tokenizer, info, b.eos_ids, b.pad_id, b.device)

    @staticmethod
    def _warm(loaded: _Loaded) -> None:
        warm = _Request(SamplingConfig(max_new_tokens=2, temperature=0.0), loaded, None)
        prompt = tuple(min(t, loaded.info.vocab_size - 1) for t in _WARMUP_PROMPT)
        with torch.inference_mode():
            for _ in _generate_steps(loaded, [_Seq(SampleSpec(0, 0, prompt, None), warm)]):
                pass


def _generate_steps(
    loaded: _Loaded, seqs: list[_Seq], join: Callable[[int], list[_Seq]] | None = None,
    max_rows: int = 0, on_prompt_pass: Callable[[int], None] | None = None,
    prefill_chunk: int | None = None,
) -> Iterator[tuple[list, int, int]]:
    """Run `seqs` as one batch; after each step yield ([(request, delta)], rows computed in the
    step, rows still running or prefilling). `on_prompt_pass(k)`: k prompts had their log-probs
    computed.

    Continuous batching: after each step `join(room)` may hand over samples that arrived since
    (same model); they are prefilled on their own — at most `prefill_chunk` prompt tokens
    (rows × columns) between two decode steps, so a long prompt does not stall the running
    rows — and merged into the running batch when their prefill is done, so a request never
    waits for a whole batch to end. A row leaves the batch at the step it finishes. Rows whose
    request was cancelled are dropped at the next step without a delta. Call it under
    `torch.inference_mode()`.
    """
    rows = [_Row(seq, loaded) for seq in seqs if not seq.request.cancelled]
    if not rows:
        return
    passes = _fill_prompt_logprobs(loaded, rows)
    if passes and on_prompt_pass is not None:
        on_prompt_pass(passes)
    batch: _Batch | None = _Batch(loaded, rows)
    logits = batch.prefill()
    pending: _Batch | None = None  # joiners whose prefill is under way
    while True:
        tokens, logprobs = _next_tokens(logits, batch.rows)
        out, keep = [], []
        for i, (row, t, lp) in enumerate(zip(batch.rows, tokens.tolist(), logprobs.tolist())):
            if row.cancelled:
                continue
            finish = row.finish_after(t, loaded)
            kept = row.kept_logprobs(loaded) if finish is not None else None
            delta = _delta(row.seq, [t], [lp], finish, kept, row.prompt_logprobs())
            out.append((row.seq.request, delta))
            if finish is None:
                keep.append(i)
        yield out, len(batch.rows), len(keep) + (len(pending.rows) if pending else 0)
        if keep:
            batch.keep(keep)
            logits = batch.step(tokens[keep])
        else:
            batch = None
        if join is not None and pending is None and (batch is None or batch.mergeable()):
            room = max_rows - (len(batch.rows) if batch else 0)
            fresh = [_Row(s, loaded) for s in join(room) if not s.request.cancelled] if room > 0 else []
            if fresh:
                passes = _fill_prompt_logprobs(loaded, fresh)
                if passes and on_prompt_pass is not None:
                    on_prompt_pass(passes)
                pending = _Batch(loaded, fresh)
        if pending is not None:
            # nothing left to decode: no one to stall, so the whole prompt at once
            first = pending.prefill(prefill_chunk if batch is not None else None)
            if first is not None:
                if batch is None:
                    batch, logits = pending, first
                else:
                    batch.merge(pending)
                    logits = torch.cat([logits, first])
                pending = None
        if batch is None:
            return


def _greedy(loaded: _Loaded, prompts, max_new_tokens: int) -> list[tuple[list[int], list[float]]]:
    """Greedy generation through the engine's own batched path (used for golden probes)."""
    request = _Request(SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0), loaded, None)
    seqs = [_Seq(SampleSpec(i, 0, tuple(p), None), request) for i, p in enumerate(prompts)]
    out: list[tuple[list[int], list[float]]] = [([], []) for _ in prompts]
    with torch.inference_mode():
        for deltas, _, _ in _generate_steps(loaded, seqs):
            for _, d in deltas:
                out[d.prompt_index][0].extend(d.token_ids)
                out[d.prompt_index][1].extend(d.logprobs)
    return out


def _forced(loaded: _Loaded, prompts, completions) -> list[list[tuple[float, float]]]:
    """The golden probes' one-pass proof on `loaded` (`rlhf.models.probes.forced_top`)."""
    from rlhf.models.probes import forced_top

    return forced_top(loaded.model, loaded.device, prompts, completions)


def _pad_left(kv: torch.Tensor, n: int) -> torch.Tensor:
    """Left-pad a cache tensor `(B, heads, T, head_dim)` with n zero columns along T."""
    if n == 0:
        return kv
    return torch.cat([kv.new_zeros(kv.shape[:-2] + (n, kv.shape[-1])), kv], dim=-2)


def _deliver(items: list[tuple[_Request, SampleDelta]]) -> None:
    """On the loop: put each delta on its request's queue (a cancelled request drops them)."""
    for request, delta in items:
        if not request.cancelled:
            request.put(delta)

"""Reference log-probs: validate, micro-batch, teacher-force the frozen causal LM.

For an item (prompt_ids, completion_ids) with P and C tokens the result is, for each i < C,

    log π_ref(completion[i] | prompt, completion[:i])

from the logits at position P − 1 + i of one forward pass over prompt + completion, log-softmaxed
in fp32 over the whole vocabulary (temperature 1, nothing filtered), and their sum accumulated in
float64. That is a teacher-forced forward pass of the checkpoint, which is what PPO's KL penalty
and DPO's reference terms need.

Shared prompts (`Settings.share_prompts`, on by default): when items of a batch — of one request
or of several that the batcher coalesced — have the same prompt (DPO's chosen and rejected, PPO's
n samples of a prompt), each distinct prompt runs once and its key/value cache is expanded over
its completions (`rlhf.serving.shared_prefix`); the LM head runs on the completion positions only
(row tiles, log-softmax in fp32). The numbers equal the per-item
path's within float rounding (1e-5 in fp32, tested). A batch with no prompt twice, a head that is
more than a linear layer, or a model the shared-prefix forward is not exact for
(`shared_prefix.usable`) takes the per-item path.

Per-item path (`share_prompts` off): batches are right-padded: every real token sits at the
position it has alone, attends only to real tokens before it, and pads sit after it — padding
never changes a result. Only the logits from the earliest position any row needs onwards are
computed (`logits_to_keep`), and a batch whose logits would exceed `_LOGITS_BUDGET_BYTES` is run
as row chunks.

Versions: a request is pinned at admission to the model serving then; a batch holds one model
only; `load_version` loads beside, warms up, lets the swapper replay the version's golden probes
(a reference version's log-probs, or a policy version's greedy ids checked in one teacher-forced
pass), and swaps by one assignment on the loop.

LoRA: an adapter version of the store (a policy adapter, peft task_type CAUSAL_LM) is served
merged onto its verified base (`rlhf.models.adapters.load_for_serving`): one plain model, so a
reference service follows an adapter policy; GetModel names the base. The base is read again on
each swap.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rlhf.config import Settings
from rlhf.errors import InvalidArgument, ResourceExhausted, ServiceError
from rlhf.models.info import ModelInfo, ModelRef
from rlhf.serving.batched_model import BatchedModel, run_candidate
from rlhf.serving.batcher import calibrate_forward_cost, length_groups
from rlhf.serving.shared_prefix import has_shared_prompts, logprobs_usable, shared_prefix_logprobs

log = logging.getLogger(__name__)

SERVICE_LABEL = "reference"
_LOGITS_BUDGET_BYTES = 512 * 1024 * 1024  # fp32 logits of one forward pass, at most


# ------------------------------------------------------------------------------------------------
# Plain data in and out
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogProbsItemInput:
    """One prompt and the completion to score under it (token ids)."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]


@dataclass(frozen=True)
class LogProbsResult:
    """Per-token log-probs of one completion (fp32 values) and their float64 sum."""

    logprobs: list[float]
    sum: float


# ------------------------------------------------------------------------------------------------
# Loaded model and batch items
# ------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Loaded:
    """One loaded reference checkpoint (never changed once it serves; hashed by identity)."""

    ref: ModelRef
    model: object  # a transformers causal LM
    info: ModelInfo
    pad_id: int
    device: object
    keeps_logits: bool  # forward() takes `logits_to_keep`
    dtype: str = "float32"  # of the weights: what the log-probs were computed in
    forward_cost_tokens: int = 128  # fixed cost of one forward pass, in tokens (see length_groups)
    share_prompts: bool = True  # a prompt shared by items of a batch runs once


@dataclass(frozen=True, eq=False)
class _Item:
    loaded: _Loaded
    prompt_len: int
    ids: tuple[int, ...]  # prompt + completion


def _load(model_dir: Path, ref: ModelRef, settings: Settings) -> _Loaded:
    """A full version, or an adapter version (LoRA, CAUSAL_LM) merged onto its verified base
    (`load_for_serving`)."""
    from rlhf.models.adapters import load_for_serving
    from rlhf.models.loading import max_context

    model, base = load_for_serving(model_dir, "causal", dtype=settings.dtype,
                                   device=settings.device)
    cfg = model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or 0)
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    info = ModelInfo(
        ref=ref,
        backend="hf",
        kind="reference",
        max_context=int(max_context(cfg)),
        vocab_size=int(cfg.vocab_size),
        base=base,
    )
    device = next(model.parameters()).device
    keeps = "logits_to_keep" in inspect.signature(model.forward).parameters
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return _Loaded(ref, model, info, int(pad), device, keeps, dtype,
                   share_prompts=bool(settings.share_prompts))


def logprobs_batch(items: list[_Item]) -> list[LogProbsResult | BaseException]:
    """Teacher-forced log-probs of `items` (one model); runs in the worker thread.

    With shared prompts on and a prompt that occurs twice: each distinct prompt once
    (`_forward_shared`). Otherwise the batch is split into a few right-padded forward passes of
    similar lengths (`length_groups`), each small enough that its logits stay under
    `_LOGITS_BUDGET_BYTES`.
    """
    loaded = items[0].loaded
    if loaded.share_prompts and _shareable(loaded, items):
        return _forward_shared(loaded, items)
    out: list[LogProbsResult | BaseException] = [None] * len(items)  # type: ignore[list-item]
    groups = length_groups([len(it.ids) for it in items], forward_cost_tokens=loaded.forward_cost_tokens)
    for group in groups:
        width = len(items[group[-1]].ids)  # groups are sorted by length
        rows = max(1, _LOGITS_BUDGET_BYTES // max(1, width * loaded.info.vocab_size * 4))
        for start in range(0, len(group), rows):
            chunk = group[start : start + rows]
            for i, result in zip(chunk, _forward(loaded, [items[i] for i in chunk])):
                out[i] = result
    return out


def _forward(loaded: _Loaded, items: list[_Item]) -> list[LogProbsResult | BaseException]:
    """One right-padded forward pass over `items`; each item's completion log-probs."""
    import torch

    width = max(len(it.ids) for it in items)
    ids = torch.full((len(items), width), loaded.pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, : len(it.ids)] = torch.tensor(it.ids, dtype=torch.long)
        mask[i, : len(it.ids)] = 1
    # Logits at position t predict token t + 1: row i needs positions [P_i − 1, len_i − 2].
    first = min(it.prompt_len for it in items) - 1
    kwargs = {"logits_to_keep": width - first} if loaded.keeps_logits else {}
    rows = torch.tensor([i for i, it in enumerate(items) for _ in range(len(it.ids) - it.prompt_len)])
    pos = torch.tensor([t for it in items for t in range(it.prompt_len - 1, len(it.ids) - 1)])  # (N,)
    with torch.inference_mode():
        logits = loaded.model(
            input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device), **kwargs
        ).logits  # (B, K, V), column 0 = position width − K
        offset = width - logits.shape[1]
        dev = logits.device
        picked = logits[rows.to(dev), (pos - offset).to(dev)].float()  # (N, V) fp32
        targets = ids[rows, pos + 1].to(dev)  # (N,)
        lp = torch.log_softmax(picked, dim=-1).gather(-1, targets[:, None])[:, 0]  # (N,)
        sums = torch.zeros(len(items), dtype=torch.float64, device=dev).index_add_(
            0, rows.to(dev), lp.double()
        )  # (B,) float64
        values, totals = lp.cpu().tolist(), sums.cpu().tolist()
    return _results(items, values, totals)


def _shareable(loaded: _Loaded, items: list[_Item]) -> bool:
    """A prompt occurs twice, and the shared-prefix forward is exact for this model."""
    return (has_shared_prompts([it.ids[: it.prompt_len] for it in items])
            and logprobs_usable(loaded.model, max(len(it.ids) for it in items)))


def _forward_shared(loaded: _Loaded, items: list[_Item]) -> list[LogProbsResult | BaseException]:
    """The batch with each distinct prompt computed once (its KV cache expanded over its items)."""
    import torch

    with torch.inference_mode():
        lp, sums = shared_prefix_logprobs(
            loaded.model, [(it.ids[: it.prompt_len], it.ids[it.prompt_len :]) for it in items],
            pad_id=loaded.pad_id, forward_cost_tokens=loaded.forward_cost_tokens)
        values, totals = lp.cpu().tolist(), sums.cpu().tolist()
    return _results(items, values, totals)


def _results(items: list[_Item], values: list[float], totals: list[float]) -> list[LogProbsResult | BaseException]:
    """Split the flat per-token values by item; a non-finite sum is that item's own error."""
    results: list[LogProbsResult | BaseException] = []
    k = 0
    for it, total in zip(items, totals):
        n = len(it.ids) - it.prompt_len
        if math.isfinite(total):
            results.append(LogProbsResult(values[k : k + n], total))
        else:
            results.append(ServiceError(f"the reference model produced a non-finite log-prob ({total})"))
        k += n
    return results


class _ProbeRunner:
    """The golden probes' runner on a candidate (loaded, not serving yet).

    `await run(items)` -> the log-probs of each (prompt, completion): a reference version's
    probes. A policy version's probes (a reference service following a policy model: its full
    and adapter versions carry policy probes) are checked with `forced` (see
    `rlhf.models.probes.PolicyProbeRunner`): each golden greedy token is the argmax of a
    teacher-forced pass, within the fp32 tie, and its log-prob the recorded one — a causal LM
    without a generation loop proves the same weights that way."""

    def __init__(self, loaded: _Loaded):
        self.loaded = loaded

    async def __call__(self, items) -> list[list[float]]:
        batch = [_Item(self.loaded, len(p), tuple(p) + tuple(c)) for p, c in items]
        return [x.logprobs for x in await run_candidate(logprobs_batch, batch)]

    async def forced(self, prompts, completions) -> list[list[tuple[float, float]]]:
        from rlhf.models.probes import forced_top

        return await asyncio.to_thread(forced_top, self.loaded.model, self.loaded.device,
                                       prompts, completions)


# ------------------------------------------------------------------------------------------------
# The service object
# ------------------------------------------------------------------------------------------------


class ReferenceModel(BatchedModel):
    """The frozen reference model behind ReferenceService: `logprobs`, hot swap.

    Public API: `info`, `start()`, `logprobs(items)`, `load_version(dir, ref, check)`, `health()`,
    `close()`, and `batcher` (for metrics and tests). The probe runner `check` gets is
    `await logprobs([[prompt_ids, completion_ids], ...]) -> [[logprob]]` on the new weights (with
    `forced` for a policy version's probes: `_ProbeRunner`).
    """

    label = SERVICE_LABEL

    def __init__(self, settings: Settings, model_dir, ref: ModelRef):
        super().__init__(settings, model_dir, ref, logprobs_batch)

    def _candidate(self, loaded: _Loaded) -> "_ProbeRunner":
        return _ProbeRunner(loaded)

    async def logprobs(
        self, items: Sequence[LogProbsItemInput]
    ) -> tuple[list[LogProbsResult], ModelRef, str]:
        """One result per item, in order, the version that produced them and the dtype of its
        weights (a trainer compares it with its policy's)."""
        loaded = self._loaded()  # pinned: the whole request runs on this model
        if not items:
            raise InvalidArgument("items", "at least one item is required")
        limit = self._settings.max_prompts_per_request
        if len(items) > limit:
            raise ResourceExhausted(f"items: {len(items)} items, the limit is {limit}")
        batch = [self._item(loaded, i, it) for i, it in enumerate(items)]
        results = await self.batcher.submit(batch)
        return results, loaded.ref, loaded.dtype

    @staticmethod
    def _item(loaded: _Loaded, i: int, item: LogProbsItemInput) -> _Item:
        path = f"items[{i}]"
        if not item.prompt_ids:
            raise InvalidArgument(f"{path}.prompt_ids", "at least one prompt token is required")
        if not item.completion_ids:
            raise InvalidArgument(f"{path}.completion_ids", "at least one completion token is required")
        vocab = loaded.info.vocab_size
        for name, ids in (("prompt_ids", item.prompt_ids), ("completion_ids", item.completion_ids)):
            for j, t in enumerate(ids):
                if not 0 <= t < vocab:
                    raise InvalidArgument(
                        f"{path}.{name}[{j}]", f"token id {t} outside the vocabulary [0, {vocab})"
                    )
        ids = tuple(item.prompt_ids) + tuple(item.completion_ids)
        ctx = loaded.info.max_context
        if len(ids) > ctx:
            raise InvalidArgument(
                path, f"prompt + completion is {len(ids)} tokens; the model's context is {ctx}"
            )
        return _Item(loaded, len(item.prompt_ids), ids)

    def _load_and_warm(self, model_dir: Path, ref: ModelRef) -> _Loaded:
        loaded = _load(model_dir, ref, self._settings)
        probe = _Item(loaded, 2, tuple(min(t, loaded.info.vocab_size - 1) for t in (5, 6, 7, 8)))
        (result,) = logprobs_batch([probe])
        if isinstance(result, BaseException):
            raise result
        vocab = loaded.info.vocab_size

        def forward(rows: int, width: int) -> None:
            item = _Item(loaded, max(1, width // 2), tuple((5 + k) % vocab for k in range(width)))
            _forward(loaded, [item] * rows)

        loaded.forward_cost_tokens = calibrate_forward_cost(forward)
        log.info("reference %s/%s: one forward pass costs about %d tokens", ref.name, ref.version,
                 loaded.forward_cost_tokens)
        return loaded

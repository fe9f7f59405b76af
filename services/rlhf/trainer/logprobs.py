"""Sequence log-probs of completions under a causal LM, with gradients: DPO's and PPO's core.

For a row (prompt_ids, completion_ids) with P and C tokens the per-token values are

    log π(completion[i] | prompt, completion[:i]),   i < C

taken from the hidden state at position P − 1 + i of one teacher-forced forward pass over
prompt + completion (temperature 1, the whole vocabulary), and the row's sequence log-prob is
their sum: prompt tokens never count. The numbers equal a plain `model(ids).logits` forward
(what the reference service computes); this module just does less work to get them:

- packing: sequences are laid end to end in rows of a few hundred tokens with a block-diagonal
  causal mask and per-sequence positions, so almost nothing is spent on padding; sequences
  with the same prompt (DPO's chosen and rejected, PPO's samples of one prompt) share one copy
  of it — each completion attends to the prompt and to itself, not to its siblings — so the
  prompt is computed once;
- the LM head runs only on the completion positions: the backbone's hidden states are gathered
  at those positions first, so no `(rows, width, vocab)` logits tensor ever exists;
- log-softmax is fused: logit[target] − logsumexp(logits), computed in tiles of rows by an
  autograd function that recomputes each tile in backward instead of storing the `(N, vocab)`
  logits (the memory a large vocabulary would otherwise take); logits and log-softmax are fp32
  whatever the weights' dtype, with autocast off for the head (a `bf16-mixed` job's backbone
  runs under bf16 autocast, its head does not: `rlhf.trainer.precision`).

A sliding window (Mistral's `sliding_window`, Qwen2's with `use_sliding_window`) is part of the
packed mask: a token sees only keys whose position is less than the window before its own, as
the model's own mask has it (a custom 4D mask is used as given, so the window must be in it).
Models that cannot take a custom 4D mask (attention other than sdpa / eager), and models whose
layers mix full and sliding attention when a sequence reaches past the window, are run
right-padded instead (a real token attends only to real tokens before it and keeps the
position it has alone; the model builds each layer's mask from the 2D one), split into a few
forward passes of similar lengths (`length_groups`);
models whose head does more than a linear projection (logit soft-capping, logit scaling) go
through the model's own forward with `logits_to_keep`. All paths give the same values.

PPO needs two more numbers per completion token, computed the same way:
- the policy's entropy at the position that predicts the token (`completion_logprobs(...,
  entropy=True)`): fused with the log-prob in the same tiles, so it costs no second pass and no
  `(N, vocab)` tensor is kept for backward either;
- the critic's value V(prompt + completion[:i]) (`completion_values`): a
  `*ForSequenceClassification` model's score head (one label) on the backbone's hidden state at
  the same positions, packed exactly like the log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rlhf.serving.batcher import length_groups

__all__ = [
    "SequenceBatch",
    "SequenceLogprobs",
    "make_batch",
    "PackedBatch",
    "pack_sequences",
    "completion_logprobs",
    "completion_values",
    "fused_token_logprobs",
    "fused_token_logprobs_entropy",
]

#: Rows of hidden states projected through the LM head at a time (logits of one tile: rows × V).
_HEAD_TILE_ROWS = 2048
#: Default fixed cost of one forward pass, in tokens, for splitting a batch by length.
DEFAULT_FORWARD_COST_TOKENS = 128
#: Default packed row width in tokens (widened for longer sequences; see `completion_logprobs`).
DEFAULT_PACK_WIDTH = 256


@dataclass(frozen=True)
class SequenceBatch:
    """Right-padded rows and the index of every completion token, ready for one forward pass."""

    input_ids: torch.Tensor  # (R, T) long, pad after the real tokens
    attention_mask: torch.Tensor  # (R, T) long, 1 on real tokens
    rows: torch.Tensor  # (N,) long: the row of each completion token
    pos: torch.Tensor  # (N,) long: position whose hidden state predicts it (its position − 1)
    targets: torch.Tensor  # (N,) long: the completion token itself
    completion_len: torch.Tensor  # (R,) long: completion tokens of each row

    @property
    def n_rows(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class SequenceLogprobs:
    """Per-row sums `(R,)` (float64, graph attached when grad is on), token counts `(R,)`, and the
    per-token values `(N,)` in row order (row 0's tokens first); with `entropy=True` also the
    entropy of the distribution each token was predicted from, `(N,)` in the same order."""

    sums: torch.Tensor  # (R,) float64
    counts: torch.Tensor  # (R,) long
    tokens: torch.Tensor  # (N,)
    entropy: torch.Tensor | None = None  # (N,) fp32, graph attached when grad is on

    def per_row(self) -> list[list[float]]:
        """The per-token values split by row (plain floats)."""
        values = self.tokens.detach().cpu().tolist()
        out, k = [], 0
        for n in self.counts.tolist():
            out.append(values[k : k + n])
            k += n
        return out


def make_batch(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
) -> SequenceBatch:
    """Right-pad `(prompt_ids, completion_ids)` rows into one batch.

    Every prompt needs at least one token (the first completion token is predicted from the
    last prompt token) and every completion at least one; raises `ValueError` otherwise.
    """
    if not sequences:
        raise ValueError("no sequences")
    lengths = []
    for i, (prompt, completion) in enumerate(sequences):
        if len(prompt) < 1 or len(completion) < 1:
            raise ValueError(f"sequence {i}: prompt and completion need at least one token each")
        lengths.append(len(prompt) + len(completion))
    width = max(lengths)
    ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    rows, pos, comp_len = [], [], []
    for r, (prompt, completion) in enumerate(sequences):
        p, n = len(prompt), len(prompt) + len(completion)
        ids[r, :n] = torch.tensor(list(prompt) + list(completion), dtype=torch.long)
        mask[r, :n] = 1
        rows.extend([r] * (n - p))
        pos.extend(range(p - 1, n - 1))
        comp_len.append(n - p)
    rows_t = torch.tensor(rows, dtype=torch.long)
    pos_t = torch.tensor(pos, dtype=torch.long)
    return SequenceBatch(
        input_ids=ids,
        attention_mask=mask,
        rows=rows_t,
        pos=pos_t,
        targets=ids[rows_t, pos_t + 1],
        completion_len=torch.tensor(comp_len, dtype=torch.long),
    )


# ------------------------------------------------------------------------------------------------
# Fused LM head + log-softmax + gather
# ------------------------------------------------------------------------------------------------


class _FusedTokenLogprobs(torch.autograd.Function):
    """log softmax(h·Wᵀ + b)[target] per row, tile by tile; backward recomputes each tile.

    Saves only the inputs: memory is O(N·H + tile·V) instead of O(N·V).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tile):  # hidden (N, H), weight (V, H)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], tile):
            logits = _tile_logits(hidden[s : s + tile], weight, bias)  # (n, V) fp32
            picked = logits.gather(-1, targets[s : s + tile, None])[:, 0]
            out[s : s + tile] = picked - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.tile = tile
        return out  # (N,)

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (N,)
        targets = ctx.saved_tensors[3]

        def dlogits(s: int, logits: torch.Tensor) -> torch.Tensor:
            # d/dlogits of (logit[t] − logsumexp) = onehot(t) − softmax
            d = torch.softmax(logits, dim=-1).neg_()
            d.scatter_add_(-1, targets[s : s + ctx.tile, None], torch.ones_like(d[:, :1]))
            return d.mul_(grad_out[s : s + ctx.tile, None].float())  # (n, V)

        return _tiled_backward(ctx, dlogits)


class _FusedTokenLogprobsEntropy(torch.autograd.Function):
    """(log softmax(z)[target], H(softmax(z))) per row with z = h·Wᵀ + b, tile by tile; backward
    recomputes each tile. Saves only the inputs, like `_FusedTokenLogprobs`.

    With p = softmax(z): ∂ log p_t/∂z = onehot(t) − p and ∂H/∂z = −p ⊙ (log p + H).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tile):  # hidden (N, H), weight (V, H)
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, tile):
            logits = _tile_logits(hidden[s : s + tile], weight, bias)  # (n, V) fp32
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            logp[s : s + tile] = logits.gather(-1, targets[s : s + tile, None])[:, 0] - lse
            p = torch.softmax(logits, dim=-1)  # (n, V)
            ent[s : s + tile] = lse - (p * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.tile = tile
        ctx.set_materialize_grads(False)
        return logp, ent  # (N,), (N,)

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):  # (N,) or None each
        if grad_logp is None and grad_ent is None:
            return None, None, None, None, None
        targets = ctx.saved_tensors[3]

        def dlogits(s: int, logits: torch.Tensor) -> torch.Tensor:
            logp_all = torch.log_softmax(logits, dim=-1)  # (n, V)
            p = logp_all.exp()  # (n, V)
            d = torch.zeros_like(logits)  # (n, V) ∂loss/∂z
            if grad_logp is not None:
                g = grad_logp[s : s + ctx.tile, None].float()  # (n, 1)
                d -= p * g
                d.scatter_add_(-1, targets[s : s + ctx.tile, None], g)
            if grad_ent is not None:
                g = grad_ent[s : s + ctx.tile, None].float()  # (n, 1)
                entropy = -(p * logp_all).sum(-1, keepdim=True)  # (n, 1)
                d -= p * (logp_all + entropy) * g
            return d

        return _tiled_backward(ctx, dlogits)


def _tiled_backward(ctx, dlogits):
    """The backward both fused heads share: for each tile of rows recompute its logits, take
    `dlogits(start, logits)` (∂loss/∂z, (n, V) fp32) and push it through z = h·Wᵀ + b into the
    gradients of hidden, weight and bias (those that need one); `(grad_h, grad_w, grad_b, None,
    None)`."""
    hidden, weight, bias, _ = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
              if need_w else None)
    grad_b = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
              if need_b and bias is not None else None)
    for s in range(0, hidden.shape[0], ctx.tile):
        h = hidden[s : s + ctx.tile]
        d = dlogits(s, _tile_logits(h, weight, bias))  # (n, V)
        with torch.autocast(device_type=h.device.type, enabled=False):  # fp32, as forward
            if need_h:
                grad_h[s : s + ctx.tile] = (d @ weight.float()).to(hidden.dtype)  # (n, H)
            if need_w:
                grad_w.addmm_(d.t(), h.float())  # (V, H)
        if grad_b is not None:
            grad_b += d.sum(0)
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b, None, None


def _tile_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # fp32 logits whatever the weights, autocast (a bf16-mixed job) included
    with torch.autocast(device_type=h.device.type, enabled=False):
        logits = h.float() @ weight.float().t()  # (n, V) fp32
        if bias is not None:
            logits = logits + bias.float()
    return logits


def fused_token_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    targets: torch.Tensor,
    *,
    tile: int = _HEAD_TILE_ROWS,
) -> torch.Tensor:
    """log softmax(head(hidden))[targets] per row, `(N,)` fp32, never holding `(N, V)` logits."""
    return _FusedTokenLogprobs.apply(hidden, head.weight, head.bias, targets, tile)


def fused_token_logprobs_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    targets: torch.Tensor,
    *,
    tile: int = _HEAD_TILE_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(head(hidden))[targets], entropy of softmax(head(hidden))), each `(N,)` fp32,
    in one pass over the tiles, never holding `(N, V)` logits."""
    return _FusedTokenLogprobsEntropy.apply(hidden, head.weight, head.bias, targets, tile)


# ------------------------------------------------------------------------------------------------
# Forward passes
# ------------------------------------------------------------------------------------------------


def unwrap_adapter(model):
    """The transformers model inside a peft (LoRA) model, whose layers carry the adapter (so
    `disable_adapter()` on the peft model applies to it too); any other model as it is."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _simple_head(model) -> torch.nn.Linear | None:
    """The LM head when logits are exactly `head(hidden)` (no soft-capping / scaling)."""
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier",
                 "lm_head_multiplier", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return None
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or getattr(model, "base_model", model) is model:
        return None
    return head


def _pack_window(model, longest: int) -> tuple[bool, int | None]:
    """Whether the packed path gives what a plain forward gives for sequences of at most
    `longest` tokens, and the sliding window its mask must carry (None: plain causal).

    The model must take a custom 4D mask with per-token positions (sdpa / eager attention); a
    4D mask is used as given, so a sliding window the model would apply must be built into it.
    A window no sequence reaches past (`longest` ≤ window: query and key are at most
    `longest` − 1 apart) changes nothing. Past it, a model whose every layer slides (Mistral:
    `sliding_window` and no `layer_types`; `layer_types` all "sliding_attention") packs with the
    window in the mask; one that mixes full and sliding layers (Qwen2 with `max_window_layers`,
    Gemma) or has other layer types is not packed.
    """
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        return False, None
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None  # Qwen2-style configs keep the number while the window is off
    types = set(getattr(cfg, "layer_types", None) or ())
    if types - {"full_attention", "sliding_attention"}:
        return False, None  # chunked / linear / other attention: not ours to mask
    if types and "sliding_attention" not in types:
        window = None  # every layer attends fully (Qwen2 with max_window_layers = layers)
    if "sliding_attention" in types and not isinstance(window, int):
        return False, None  # sliding layers with no window we can read
    if window is None or longest <= window:
        return True, None
    if "full_attention" in types:
        return False, None  # mixed layers: one 4D mask cannot be both; the padded path can
    return True, int(window)


@dataclass(frozen=True)
class PackedBatch:
    """One forward pass over packed rows."""

    input_ids: torch.Tensor  # (R, W) long
    position_ids: torch.Tensor  # (R, W) long: each segment's own positions
    mask: torch.Tensor  # (R, 1, W, W) bool: True where query i may attend key j
    src: torch.Tensor  # (N,) long: flat index (r·W + t) of the hidden state predicting each token
    targets: torch.Tensor  # (N,) long


def pack_sequences(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    width: int,
    pad_id: int,
    share_prompts: bool = True,
    sliding_window: int | None = None,
) -> tuple[PackedBatch, torch.Tensor]:
    """Pack rows into `(R, width)` with a block mask; returns the pack and per-row counts `(S,)`.

    Sequences with the same prompt (token for token) become one unit, [prompt, completion₁,
    completion₂, …], in which each completion attends to the prompt and to itself only and
    takes the positions it would have right after the prompt: the prompt is computed once for
    all of them (DPO's chosen and rejected; PPO's n samples per prompt). Units go into rows
    first-fit by decreasing length (a unit longer than `width` is split into several, each with
    its own copy of the prompt); pads attend only to themselves. The `src`/`targets` order is
    the sequences' order, each completion's tokens in order. With `sliding_window` w a query
    also sees only keys less than w positions before its own (position ids, as in the
    sequence alone: the model's window rule `key > query − w`).
    """
    units: list[tuple[tuple[int, ...], list[int]]] = []  # (prompt, [sequence index ...])
    by_prompt: dict[tuple[int, ...], int] = {}
    for i, (prompt, completion) in enumerate(sequences):
        if len(prompt) < 1 or len(completion) < 1:
            raise ValueError(f"sequence {i}: prompt and completion need at least one token each")
        if len(prompt) + len(completion) > width:
            n = len(prompt) + len(completion)
            raise ValueError(f"sequence {i} is longer ({n}) than the pack width {width}")
        key = tuple(prompt)
        u = by_prompt.get(key) if share_prompts else None
        if u is not None and _unit_len(units[u], sequences) + len(completion) <= width:
            units[u][1].append(i)
            continue
        by_prompt[key] = len(units)
        units.append((key, [i]))
    lengths = [_unit_len(u, sequences) for u in units]
    rows = _first_fit_decreasing(lengths, width)
    # The rows are padded to the longest: with several rows, pack again as narrow as still fits
    # in as many rows, so they come out about even and the padding at their ends is small.
    target = -(-sum(lengths) // len(rows))  # ceil
    narrow = max(max(lengths), target)
    while len(rows) > 1 and narrow < max(sum(lengths[u] for u in row) for row in rows):
        again = _first_fit_decreasing(lengths, narrow)
        if len(again) <= len(rows):
            rows = again
            break
        narrow += max(1, target // 16)
    w = max(sum(lengths[u] for u in row) for row in rows)  # the longest row
    R = len(rows)
    ids = torch.full((R, w), int(pad_id), dtype=torch.long)
    pos = torch.zeros((R, w), dtype=torch.long)
    seg = torch.full((R, w), -1, dtype=torch.long)  # unit number within the row, -1 for pads
    part = torch.zeros((R, w), dtype=torch.long)  # 0 = prompt, k = k-th completion of the unit
    src_of: list[list[int]] = [[] for _ in sequences]
    for r, row in enumerate(rows):
        t = 0
        for k, u in enumerate(row):
            prompt, members = units[u]
            p = len(prompt)
            ids[r, t : t + p] = torch.tensor(prompt, dtype=torch.long)
            pos[r, t : t + p] = torch.arange(p)
            seg[r, t : t + p] = k
            last_prompt = r * w + t + p - 1
            t += p
            for j, i in enumerate(members, start=1):
                completion = sequences[i][1]
                c = len(completion)
                ids[r, t : t + c] = torch.tensor(list(completion), dtype=torch.long)
                pos[r, t : t + c] = torch.arange(p, p + c)
                seg[r, t : t + c] = k
                part[r, t : t + c] = j
                # token 0 is predicted from the prompt's last token, token k from completion[k-1]
                src_of[i] = [last_prompt] + list(range(r * w + t, r * w + t + c - 1))
                t += c
    idx = torch.arange(w)
    causal = idx[None, :] <= idx[:, None]  # (W, W): key j at or before query i
    same_unit = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)  # (R, W, W)
    # the key is a prompt token, or a token of the query's own completion
    visible_part = (part[:, None, :] == 0) | (part[:, None, :] == part[:, :, None])
    mask = causal[None] & same_unit & visible_part
    if sliding_window is not None:
        mask &= (pos[:, :, None] - pos[:, None, :]) < sliding_window  # (R, W, W)
    mask |= torch.eye(w, dtype=torch.bool)[None] & (seg[:, :, None] < 0)  # pads see themselves
    src = torch.tensor([x for lst in src_of for x in lst], dtype=torch.long)
    targets = torch.tensor([t for _, c in sequences for t in c], dtype=torch.long)
    packed = PackedBatch(ids, pos, mask[:, None], src, targets)
    counts = torch.tensor([len(c) for _, c in sequences], dtype=torch.long)
    return packed, counts


def _first_fit_decreasing(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Bins of total length ≤ `width` holding every item (longest first, each in the first bin
    with room)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for u in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[u] <= room:
                rows[r].append(u)
                free[r] -= lengths[u]
                break
        else:
            rows.append([u])
            free.append(width - lengths[u])
    return rows


def _unit_len(unit, sequences) -> int:
    return len(unit[0]) + sum(len(sequences[i][1]) for i in unit[1])


def _forward_packed(model, packed: PackedBatch) -> torch.Tensor:
    """The backbone's hidden states `(N, H)` at the positions that predict each target."""
    device = next(model.parameters()).device
    mask = packed.mask.to(device)
    if (getattr(model.config, "_attn_implementation", None) or "eager") == "eager":
        dtype = next(model.parameters()).dtype
        additive = torch.zeros(mask.shape, dtype=dtype, device=device)
        mask = additive.masked_fill_(~mask, torch.finfo(dtype).min)
    hidden = model.base_model(
        input_ids=packed.input_ids.to(device), attention_mask=mask,
        position_ids=packed.position_ids.to(device), use_cache=False,
    ).last_hidden_state  # (R, W, H)
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat[packed.src.to(device)]  # (N, H)


def _hidden_group(model, batch: SequenceBatch) -> torch.Tensor:
    """The backbone's hidden states `(N, H)` at the positions that predict each completion
    token of one right-padded batch."""
    device = next(model.parameters()).device
    out = model.base_model(input_ids=batch.input_ids.to(device),
                           attention_mask=batch.attention_mask.to(device), use_cache=False)
    return out.last_hidden_state[batch.rows.to(device), batch.pos.to(device)]  # (N, H)


def _logits_group(model, batch: SequenceBatch) -> torch.Tensor:
    """Generic path (a head that is more than a linear layer): the model's own logits `(N, V)`
    fp32 at the positions that predict each completion token, computed only from the first
    position any row needs."""
    device = next(model.parameters()).device
    ids = batch.input_ids.to(device)
    width = ids.shape[1]
    first = int(batch.pos.min())
    logits = model(input_ids=ids, attention_mask=batch.attention_mask.to(device), use_cache=False,
                   logits_to_keep=width - first).logits
    rows, pos = batch.rows.to(device), batch.pos.to(device)
    return logits[rows, pos - (width - logits.shape[1])].float()  # (N, V)


def _completion_hidden(
    model,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int,
    pack: bool,
    pack_width: int | None,
    share_prompts: bool,
    forward_cost_tokens: int | None,
) -> torch.Tensor:
    """The backbone's hidden states `(N, H)` at the position predicting every completion token,
    in the sequences' order: packed where the model allows it, else right-padded in groups of
    similar lengths (see `completion_logprobs`)."""
    longest = max(len(p) + len(c) for p, c in sequences)
    packable, window = _pack_window(model, longest) if pack else (False, None)
    if packable:
        unit: dict[tuple[int, ...], int] = {}  # prompt → prompt + all its completions
        for p, c in sequences:
            unit[tuple(p)] = unit.get(tuple(p), len(p)) + len(c)
        # wide enough for the longest row and for a prompt with two completions (a DPO pair)
        width = max(pack_width or DEFAULT_PACK_WIDTH, longest,
                    min(max(unit.values()), 2 * longest) if share_prompts else longest)
        packed, _ = pack_sequences(sequences, width=width, pad_id=pad_id,
                                   share_prompts=share_prompts, sliding_window=window)
        return _forward_packed(model, packed)  # (N, H) in row order
    parts: list[torch.Tensor | None] = [None] * len(sequences)  # per-row hidden states
    for group in _groups(sequences, forward_cost_tokens):
        batch = make_batch([sequences[i] for i in group], pad_id)
        hidden = _hidden_group(model, batch)  # (n, H)
        for r, values in zip(group, torch.split(hidden, batch.completion_len.tolist())):
            parts[r] = values
    return torch.cat(parts)  # (N, H) in row order


def _groups(sequences, forward_cost_tokens: int | None) -> list[list[int]]:
    if forward_cost_tokens is None:
        return [list(range(len(sequences)))]
    lengths = [len(p) + len(c) for p, c in sequences]
    return length_groups(lengths, forward_cost_tokens=forward_cost_tokens)


def _check_rows(sequences) -> None:
    if not sequences:
        raise ValueError("no sequences")
    for i, (prompt, completion) in enumerate(sequences):
        if len(prompt) < 1 or len(completion) < 1:
            raise ValueError(f"sequence {i}: prompt and completion need at least one token each")


def completion_logprobs(
    model,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int,
    pack: bool = True,
    pack_width: int | None = None,
    share_prompts: bool = True,
    forward_cost_tokens: int | None = DEFAULT_FORWARD_COST_TOKENS,
    entropy: bool = False,
) -> SequenceLogprobs:
    """log π of every completion token of every `(prompt_ids, completion_ids)` row.

    Gradients flow when grad mode is on (the trainer's policy); wrap the call in
    `torch.inference_mode()` for a frozen reference. Results come back in the order given.

    Packed (the default, where the model allows it: a plain linear head, sdpa or eager
    attention, and no sliding window or one every layer uses; see `_pack_window`): sequences
    go into rows of `pack_width` tokens (default
    `DEFAULT_PACK_WIDTH`, widened to the longest sequence and to a prompt with two of its
    completions) with a block mask, and sequences with the same prompt share one copy of it
    (`share_prompts`); only each packed row's tail is padding. Otherwise (or `pack=False`) rows
    are right-padded and grouped by length into a few forward passes (`forward_cost_tokens`:
    fixed cost of one pass in tokens; None: one pass).

    `entropy=True` also returns the entropy of each predicting distribution (`.entropy`, `(N,)`,
    with gradients), fused with the log-probs (no `(N, vocab)` tensor is kept).
    """
    _check_rows(sequences)
    model = unwrap_adapter(model)
    head = _simple_head(model)
    counts = torch.tensor([len(c) for _, c in sequences], dtype=torch.long)
    ent: torch.Tensor | None = None
    if head is not None:
        hidden = _completion_hidden(model, sequences, pad_id=pad_id, pack=pack,
                                    pack_width=pack_width, share_prompts=share_prompts,
                                    forward_cost_tokens=forward_cost_tokens)  # (N, H)
        targets = torch.tensor([t for _, c in sequences for t in c], dtype=torch.long,
                               device=hidden.device)
        if entropy:
            tokens, ent = fused_token_logprobs_entropy(hidden, head, targets)  # (N,), (N,)
        else:
            tokens = fused_token_logprobs(hidden, head, targets)  # (N,)
    else:  # the model's own head (soft-capping, scaling ...): right-padded, its own logits
        parts: list[torch.Tensor | None] = [None] * len(sequences)  # per-row token values
        ent_parts: list[torch.Tensor | None] = [None] * len(sequences)
        for group in _groups(sequences, forward_cost_tokens):
            batch = make_batch([sequences[i] for i in group], pad_id)
            picked = _logits_group(model, batch)  # (n, V)
            targets = batch.targets.to(picked.device)
            lse = torch.logsumexp(picked, dim=-1)  # (n,)
            lp = picked.gather(-1, targets[:, None])[:, 0] - lse  # (n,)
            split = batch.completion_len.tolist()
            for r, values in zip(group, torch.split(lp, split)):
                parts[r] = values
            if entropy:
                h = lse - (torch.softmax(picked, dim=-1) * picked).sum(-1)  # (n,)
                for r, values in zip(group, torch.split(h, split)):
                    ent_parts[r] = values
        tokens = torch.cat(parts)  # (N,) in row order
        ent = torch.cat(ent_parts) if entropy else None
    row_of = torch.repeat_interleave(torch.arange(len(sequences)), counts).to(tokens.device)
    sums = torch.zeros(len(sequences), dtype=torch.float64, device=tokens.device).index_add(
        0, row_of, tokens.double()
    )  # (R,) accumulated in float64
    return SequenceLogprobs(sums=sums, counts=counts, tokens=tokens, entropy=ent)


def completion_values(
    model,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int,
    pack: bool = True,
    pack_width: int | None = None,
    share_prompts: bool = True,
    forward_cost_tokens: int | None = DEFAULT_FORWARD_COST_TOKENS,
) -> torch.Tensor:
    """A critic's values `(N,)` (the model's dtype; graph attached when grad is on) at every
    completion token of every `(prompt_ids, completion_ids)` row, in the order given: V_i =
    score(hidden state at the position that predicts completion[i]), the value of the state
    prompt + completion[:i] before the token is chosen.

    `model` is a `*ForSequenceClassification` with one label and a linear `score` head (every
    decoder classifier in transformers); packed like `completion_logprobs`."""
    model = unwrap_adapter(model)
    from rlhf.models.reward_head import _linear_score_head

    _check_rows(sequences)
    head = _linear_score_head(model)
    if head is None or head.out_features != 1:
        raise ValueError(f"{type(model).__name__} has no one-output linear score head: not a "
                         "value model")
    hidden = _completion_hidden(model, sequences, pad_id=pad_id, pack=pack, pack_width=pack_width,
                                share_prompts=share_prompts,
                                forward_cost_tokens=forward_cost_tokens)  # (N, H)
    return head(hidden)[:, 0]  # (N,)

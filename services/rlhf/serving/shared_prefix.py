"""A prompt shared by several items of a batch, computed once: prefix KV reuse.

The scoring services (reward, reference) get batches in which many items have the same prompt:
DPO's chosen and rejected, PPO's n samples of one prompt, a `compare`'s two responses. Here each
distinct prompt runs through the model once; its key/value cache is then expanded over the items
that share it (`Cache.reorder_cache` with repeated rows) and only the continuations run, every
continuation token at the position it has alone and attending to its own prompt's real tokens
and to its own continuation. The hidden states equal those of one plain forward over
prompt + continuation within float rounding.

Each prompt is split before its last token: the prefix (all but the last token) is what runs
once, and the last prompt token leads the continuation (its state is row 0 of the result). One
group of prefixes of similar lengths (`length_groups`) is one prefix pass and one or more
continuation passes:
1. the prefixes, right-padded, `use_cache=True`; only the cache is read, so the last decoder
   layer skips its MLP, and (Llama / Qwen2 / Mistral attention) its queries, attention and output
   projection: it computes and caches its keys and values only (`_kv_only`; the cache is the
   same as a full pass's, bit for bit);
2. the continuations (last prompt token + completion) of the items whose prefix is in the group,
   split by length (`length_groups` again; each pass but the last on a copy of the cache),
   right-padded, with the cache rows picked per item, a 2D mask [prefix mask | continuation
   mask] (the prefix's pads stay masked) and explicit position ids (prefix length + offset).
The causal part of the mask comes from the cache position (the continuation's queries sit after
the whole padded prefix block), so no key a token should not see is visible. Items whose prompt
is a single token have no prefix and run as plain right-padded sequences.

`usable(model, longest)` says when this gives what a plain forward gives: sdpa or eager attention
(a 2D mask with holes in the middle is exact there) and no sliding window that the sequences
reach past (a sliding cache layer drops keys the mask still counts).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
import weakref
from typing import Sequence

from rlhf.serving.batcher import length_groups

__all__ = ["usable", "logprobs_usable", "canonical_order", "has_shared_prompts", "shared_prefix_hidden",
           "shared_prefix_logprobs"]

Item = tuple[Sequence[int], Sequence[int]]  # (prompt ids, continuation ids), both non-empty
_LOGITS_TILE_BYTES = 64 * 1024 * 1024  # fp32 logits of one head tile, at most


def usable(model, longest: int) -> bool:
    """Whether `shared_prefix_hidden` is exact for `model` on sequences of ≤ `longest` tokens."""
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        return False
    if set(getattr(cfg, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}:
        return False
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    types = set(getattr(cfg, "layer_types", None) or ())
    if types and "sliding_attention" not in types:
        window = None
    return window is None or (isinstance(window, int) and longest <= window)


def canonical_order(items: Sequence[Item]) -> list[int]:
    """Indices of `items` sorted by (prompt, continuation). A row's numbers can depend in the last
    bits on where it sits in a matrix product; computing a batch in this order makes each item's
    result independent of the order the items came in (compare(p, a, b) mirrors compare(p, b, a)
    exactly)."""
    return sorted(range(len(items)), key=lambda i: (tuple(items[i][0]), tuple(items[i][1])))


def has_shared_prompts(prompts: Sequence[Sequence[int]]) -> bool:
    """Whether two items have the same prompt (else the plain path is as good)."""
    return len({tuple(p) for p in prompts}) < len(prompts)


def shared_prefix_hidden(model, items: Sequence[Item], *, pad_id: int,
                         forward_cost_tokens: int = 128) -> list:
    """For each item, the backbone's last hidden states `(C + 1, H)` at the prompt's last token and
    at each of the C continuation tokens, in the items' order; each distinct prompt computed once.

    Row 0 predicts continuation token 0, row j predicts token j (j < C), row C is the state at the
    last token (a sequence classifier's pooled position). Call under `torch.inference_mode()`.

    Each prompt is split before its last token: the prefix (every token but the last) runs once
    per distinct prefix and only its keys and values are used, so its pass skips the last layer's
    MLP and queries (`_kv_only`); the last prompt token leads the continuation, whose first row is then row 0.
    Items whose prompt is one token (no prefix) run as plain right-padded sequences.
    """
    for i, (p, c) in enumerate(items):
        if len(p) < 1 or len(c) < 1:
            raise ValueError(f"item {i}: prompt and continuation need at least one token each")
    members: dict[tuple[int, ...], list[int]] = {}
    single: list[int] = []  # one-token prompts: nothing to share
    for i, (p, _) in enumerate(items):
        if len(p) > 1:
            members.setdefault(tuple(p[:-1]), []).append(i)
        else:
            single.append(i)
    tails = {i: (items[i][0][-1], *items[i][1]) for idx in members.values() for i in idx}  # last + cont
    prefixes = list(members)
    base = model.base_model
    device = next(model.parameters()).device
    out: list = [None] * len(items)
    for group in length_groups([len(p) for p in prefixes], forward_cost_tokens=forward_cost_tokens):
        plen = [len(prefixes[u]) for u in group]
        ids, mask = _right_padded([prefixes[u] for u in group], pad_id)
        with _kv_only(base):  # only the cache of this pass is used
            cache = base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True).past_key_values
        rows = [(k, i) for k, u in enumerate(group) for i in members[prefixes[u]]]  # (prefix row, item)
        subs = length_groups([len(tails[i]) for _, i in rows], forward_cost_tokens=forward_cost_tokens)
        for n, sub in enumerate(subs):
            # the cache is consumed by each pass (rows picked, continuations appended): a copy for
            # every pass but the last
            part = [rows[j] for j in sub]
            h = _continuations(base, cache if n == len(subs) - 1 else copy.deepcopy(cache), part, tails, mask,
                               plen, pad_id, device)  # (b, 1 + C, H)
            for r, (_, i) in enumerate(part):
                out[i] = h[r, : len(tails[i])]  # (C + 1, H)
    for sub in length_groups([len(items[i][0]) + len(items[i][1]) for i in single],
                             forward_cost_tokens=forward_cost_tokens):
        seqs = [(*items[single[j]][0], *items[single[j]][1]) for j in sub]
        ids, mask = _right_padded(seqs, pad_id)
        h = base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        for r, j in enumerate(sub):
            out[single[j]] = h[r, : len(seqs[r])]  # from the one prompt token on: (C + 1, H)
    return out


def _continuations(base, cache, rows, tails, mask, plen, pad_id, device):
    """One pass over the continuations `tails[i]` of `rows` ((prefix row, item) pairs) on `cache`
    (the prefixes' cache, its rows picked here); their last hidden states `(b, longest, H)`."""
    import torch

    cids, cmask = _right_padded([tails[i] for _, i in rows], pad_id)
    clen = torch.tensor([len(tails[i]) for _, i in rows])[:, None]  # (b, 1)
    offset = torch.minimum(torch.arange(cids.shape[1])[None, :], clen - 1)  # pads: the last real one's
    pos = torch.tensor([plen[k] for k, _ in rows])[:, None] + offset  # (b, C): as alone
    pick = torch.tensor([k for k, _ in rows], dtype=torch.long)
    cache.reorder_cache(pick.to(device))  # (b, heads, P, d): each item's prefix rows
    return base(input_ids=cids.to(device), attention_mask=torch.cat([mask[pick], cmask], dim=1).to(device),
                position_ids=pos.to(device), past_key_values=cache, use_cache=True).last_hidden_state


_kv_locks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_kv_locks_guard = threading.Lock()


@contextlib.contextmanager
def _kv_only(base):
    """A pass whose outputs are not read, only its cache: the last decoder layer's MLP (two
    thirds of a layer's weights; nothing the cache holds depends on it) is skipped, and for the
    attention classes in `_KV_ONLY_ATTENTION` its queries, attention and output projection too —
    that layer only computes and caches its keys and values, with the module's own projections
    and rotary function (the same numbers). Any other backbone runs whole. The model is patched
    for the pass, under a lock of its own: a caller must not run the same model from another
    thread meanwhile except through this module (the services run one batch at a time per
    loaded model; a swap's candidate is another model object)."""
    import torch

    layers = getattr(base, "layers", None)
    last = layers[-1] if isinstance(layers, torch.nn.ModuleList) and len(layers) else None
    mlp, attn = getattr(last, "mlp", None), getattr(last, "self_attn", None)
    if last is None or not type(mlp).__name__.endswith("MLP"):
        yield
        return
    passthrough, kv_only = _stand_ins()
    patch = {"mlp": passthrough()}
    if type(attn).__name__ in _KV_ONLY_ATTENTION:
        patch["self_attn"] = kv_only(attn)
    with _kv_locks_guard:
        lock = _kv_locks.setdefault(last, threading.Lock())
    with lock:
        for name, module in patch.items():
            setattr(last, name, module)
        try:
            yield
        finally:
            last.mlp, last.self_attn = mlp, attn


#: Attention modules whose forward is q/k/v projections, `apply_rotary_pos_emb` of their modeling
#: module, `past_key_values.update(k, v, layer_idx)`, attention, o_proj (no q/k norms).
_KV_ONLY_ATTENTION = frozenset({"LlamaAttention", "Qwen2Attention", "MistralAttention"})


@functools.lru_cache(maxsize=None)
def _stand_ins():
    """(Passthrough, KeysValuesOnly): module classes made on first use (torch imported lazily)."""
    import sys

    import torch

    class Passthrough(torch.nn.Module):
        """Stands in for a skipped MLP: its values are never read."""

        def forward(self, hidden, *args, **kwargs):
            return hidden

    class KeysValuesOnly(torch.nn.Module):
        """Stands in for a last layer's attention in a cache-only pass: keys and values, cached."""

        def __init__(self, attn):
            super().__init__()
            object.__setattr__(self, "attn", attn)  # not registered as a submodule

        def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None,
                    **kwargs):
            attn = self.attn
            shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
            k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
            v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
            cos, sin = position_embeddings
            _, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(k[:, :1], k, cos, sin)
            if past_key_values is not None:
                past_key_values.update(k, v, attn.layer_idx)
            return hidden_states, None

    return Passthrough, KeysValuesOnly


def _right_padded(seqs, pad_id: int):
    """`(n, longest)` ids right-padded with `pad_id` and their 0/1 attention mask (one tensor
    built from Python lists each, not one per row)."""
    import torch

    width = max(len(x) for x in seqs)
    ids = torch.tensor([list(x) + [int(pad_id)] * (width - len(x)) for x in seqs], dtype=torch.long)
    lens = torch.tensor([len(x) for x in seqs])
    return ids, (torch.arange(width)[None, :] < lens[:, None]).long()


def logprobs_usable(model, longest: int) -> bool:
    """`shared_prefix_logprobs` is exact for `model` (a linear LM head, and `usable`)."""
    from rlhf.trainer.logprobs import _simple_head

    return _simple_head(model) is not None and usable(model, longest)


def shared_prefix_logprobs(model, items: Sequence[Item], *, pad_id: int, forward_cost_tokens: int = 128):
    """Teacher-forced log π of every continuation token of every (prompt, continuation) item,
    each distinct prompt computed once: the per-token values `(N,)` fp32 in the items' order
    (item 0's tokens first) and each item's sum `(B,)` float64. The LM head runs on the
    continuation positions only, in row tiles of at most `_LOGITS_TILE_BYTES` of fp32 logits,
    log-softmaxed in fp32. Needs `logprobs_usable(model, longest)`; call under
    `torch.inference_mode()`."""
    import torch

    from rlhf.trainer.logprobs import _simple_head

    order = canonical_order(items)  # computed in this order, whatever the caller's
    ordered = [items[i] for i in order]
    hidden = shared_prefix_hidden(model, ordered, pad_id=pad_id, forward_cost_tokens=forward_cost_tokens)
    flat = torch.cat([h[:-1] for h in hidden])  # (N, H): the states predicting each token
    targets = torch.tensor([t for _, c in ordered for t in c], dtype=torch.long, device=flat.device)
    head = _simple_head(model)
    weight = head.weight.float()  # (V, H); the same tensor when the weights are fp32
    bias = head.bias.float() if head.bias is not None else None
    lp = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)  # canonical order
    tile = max(1, _LOGITS_TILE_BYTES // (4 * weight.shape[0]))
    for s in range(0, flat.shape[0], tile):
        logits = flat[s : s + tile].float() @ weight.t()  # (n, V) fp32
        if bias is not None:
            logits += bias
        lp[s : s + tile] = torch.log_softmax(logits, dim=-1).gather(-1, targets[s : s + tile, None])[:, 0]
    counts = torch.tensor([len(c) for _, c in ordered], device=flat.device)
    rows = torch.repeat_interleave(torch.arange(len(items), device=flat.device), counts)
    sums = torch.zeros(len(items), dtype=torch.float64, device=flat.device).index_add_(0, rows, lp.double())
    back = [0] * len(items)  # item i sits at back[i] in canonical order
    for j, i in enumerate(order):
        back[i] = j
    starts = [0]
    for _, c in ordered:
        starts.append(starts[-1] + len(c))  # canonical offsets
    pick = [t for i, j in enumerate(back) for t in range(starts[j], starts[j] + len(items[i][1]))]
    return (lp[torch.tensor(pick, device=lp.device)],
            sums[torch.tensor(back, device=sums.device)])

"""The hf engine's KV cache: transformers' `DynamicCache` whose full-attention layers grow in place.

transformers' `DynamicLayer.update` concatenates the whole cache with the new column on every
decode step (`torch.cat`): each step copies every cached key and value of every layer, a cost
that grows with the context. On the `small` policy at 64 rows that copy was 56 % of an fp32
decode step (bench/dtype.py --profile, Intel Xeon with AVX-512/AMX).

`GrowingLayer` keeps its keys and values as views of a buffer with spare columns: a step writes
its new column into the buffer and returns a longer view of it; only when the spare columns run
out is a bigger buffer made (one copy, then `max(64, length // 4)` columns of room). The views are
what `DynamicLayer` would hold — same shape, same values — so attention, masks and everything
reading `layer.keys` / `layer.values` see no difference.

Anything that replaces `keys` / `values` from outside (the engine's row selection
`batch_select_indices`, its left-padding trim, a merge of two batches; transformers' `crop`,
`batch_repeat_interleave`) leaves a tensor that is not the view this layer last handed out; the
next update notices (`keys is not self._view_k`) and copies it into a new buffer first. So every
operation a `DynamicLayer` supports stays correct, and only the per-step append gets cheaper.
Sliding-window and other layer kinds are left as transformers makes them.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["GrowingLayer", "new_cache", "plain_layers"]

#: Spare columns a new buffer gets at least (and a quarter of its length when that is more).
MIN_ROOM = 64


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` appending in place into a buffer with room to grow (see the module)."""

    _buf_k: torch.Tensor | None = None
    _buf_v: torch.Tensor | None = None
    _view_k: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        keys, values = self.keys, self.values
        length = keys.shape[-2] if keys.numel() else 0
        ours = self._buf_k is not None and keys is self._view_k
        if not ours or length + new > self._buf_k.shape[-2]:
            self._rebuffer(keys, values, length, new, key_states, value_states)
        end = length + new
        self._buf_k[..., length:end, :].copy_(key_states)
        self._buf_v[..., length:end, :].copy_(value_states)
        self.keys = self._view_k = self._buf_k[..., :end, :]
        self.values = self._buf_v[..., :end, :]
        return self.keys, self.values

    def _rebuffer(self, keys, values, length: int, new: int, key_states, value_states) -> None:
        capacity = length + new + max(MIN_ROOM, (length + new) // 4)
        k_shape = key_states.shape[:-2] + (capacity, key_states.shape[-1])
        v_shape = value_states.shape[:-2] + (capacity, value_states.shape[-1])
        buf_k, buf_v = key_states.new_empty(k_shape), value_states.new_empty(v_shape)
        if length:
            buf_k[..., :length, :].copy_(keys)
            buf_v[..., :length, :].copy_(values)
        self._buf_k, self._buf_v = buf_k, buf_v

    def reset(self) -> None:
        self._buf_k = self._buf_v = self._view_k = None
        super().reset()


def new_cache(config) -> DynamicCache:
    """A `DynamicCache` for `config` whose full-attention layers are `GrowingLayer`s."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache


def plain_layers(cache: DynamicCache) -> bool:
    """Whether every layer keeps plain full-attention keys and values (`DynamicLayer` or
    `GrowingLayer`): what the engine's batch merge and left-padding trim need."""
    return all(type(layer) in (DynamicLayer, GrowingLayer) for layer in cache.layers)

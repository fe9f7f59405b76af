"""The hf engine's in-place KV cache (`rlhf.policy.engines.kv_cache`): the same keys and values as
transformers' `DynamicLayer` after every operation the engine and transformers apply to a layer,
with a decode step writing into the buffer instead of copying the cache; and a model decoding
with it gives the same logits as with `DynamicCache`."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from transformers.cache_utils import DynamicCache, DynamicLayer  # noqa: E402

from rlhf.policy.engines.kv_cache import MIN_ROOM, GrowingLayer, new_cache, plain_layers  # noqa: E402


def _kv(gen, batch: int, cols: int):
    shape = (batch, 2, cols, 8)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _same(a: DynamicLayer, b: GrowingLayer) -> None:
    assert a.keys.shape == b.keys.shape and a.values.shape == b.values.shape
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert a.get_seq_length() == b.get_seq_length()


def test_every_operation_leaves_the_same_keys_and_values_as_a_dynamic_layer():
    gen = torch.Generator().manual_seed(0)
    plain, grow = DynamicLayer(), GrowingLayer()

    def update(batch, cols):
        k, v = _kv(gen, batch, cols)
        got = grow.update(k, v)
        want = plain.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        _same(plain, grow)

    update(4, 7)  # prefill
    for _ in range(MIN_ROOM + 10):  # decode steps, past the first buffer's room
        update(4, 1)
    update(4, 3)  # a prefill chunk of joiners' columns
    idx = torch.tensor([0, 2, 3])  # rows finish: the engine's keep()
    plain.batch_select_indices(idx)
    grow.batch_select_indices(idx)
    _same(plain, grow)
    update(3, 1)
    for layer in (plain, grow):  # the engine's left-padding trim
        layer.keys, layer.values = layer.keys[..., 5:, :], layer.values[..., 5:, :]
    update(3, 1)
    # a merge: another batch's rows, both left-padded to one width (the engine's merge())
    ok, ov = _kv(gen, 2, grow.get_seq_length())
    for layer in (plain, grow):
        layer.keys = torch.cat([layer.keys, ok])
        layer.values = torch.cat([layer.values, ov])
    update(5, 1)
    plain.crop(-2)
    grow.crop(-2)
    update(5, 1)
    plain.batch_repeat_interleave(2)
    grow.batch_repeat_interleave(2)
    update(10, 2)
    grow.reset()
    plain.reset()
    update(3, 4)


def test_a_decode_step_writes_in_place_until_the_room_runs_out():
    gen = torch.Generator().manual_seed(1)
    layer = GrowingLayer()
    layer.update(*_kv(gen, 2, 10))
    buf = layer._buf_k
    room = buf.shape[-2] - 10
    assert room == MIN_ROOM
    for _ in range(room):
        keys, _ = layer.update(*_kv(gen, 2, 1))
        assert layer._buf_k is buf and keys.data_ptr() == buf.data_ptr()  # a view, no copy
    layer.update(*_kv(gen, 2, 1))  # one past the room: a bigger buffer, the old values kept
    assert layer._buf_k is not buf and layer._buf_k.shape[-2] > buf.shape[-2]
    assert torch.equal(layer.keys[..., : 10 + room, :], buf[..., : 10 + room, :])


def test_a_model_decodes_the_same_with_the_in_place_cache(tiny_policy_dir):
    from rlhf.models.loading import load_causal_lm

    model = load_causal_lm(tiny_policy_dir)
    cache = new_cache(model.config)
    assert plain_layers(cache) and all(isinstance(x, GrowingLayer) for x in cache.layers)
    ids = torch.tensor([[5, 9, 14, 3, 22, 7], [0, 0, 11, 4, 8, 30]])
    attn = (ids != 0).long()
    runs = []
    for c in (DynamicCache(config=model.config), cache):
        mask, tok, out = attn.clone(), ids, []
        with torch.inference_mode():
            for _ in range(MIN_ROOM + 12):  # across a re-buffer
                pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -tok.shape[1]:]
                logits = model(input_ids=tok, attention_mask=mask, position_ids=pos,
                               past_key_values=c, use_cache=True).logits[:, -1].float()
                out.append(logits)
                tok = logits.argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(tok)], -1)
        runs.append(torch.stack(out))
    assert torch.allclose(runs[0], runs[1], atol=1e-5, rtol=0)
    assert torch.equal(runs[0].argmax(-1), runs[1].argmax(-1))

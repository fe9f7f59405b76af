"""Shared prompts scored once (issue 19): prefix KV reuse in the reward and reference services.

Every number from the shared-prefix path is checked against the per-item path — one plain
forward pass of the sequence alone (no padding, no batching) of an independently loaded copy of
the checkpoint, and right- and left-padded batches of the plain path — within 1e-5 in fp32.
Batches mix groups of one, pairs and larger groups, prompts of different lengths (padded in the
prompt pass) and continuations of different lengths (padded in the continuation pass). A spy on
`shared_prefix_hidden` proves the shared path actually ran where it should, and did not where
it should not.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from types import SimpleNamespace

import pytest
from helpers import make_settings, running, teacher_forced_logprobs

from rlhf_client import AsyncReferenceClient, AsyncRewardClient

torch = pytest.importorskip("torch")

TOL = 1e-5
BATCHING = dict(batch_max_wait_ms=20, batch_max_size=64)


def mixed_items(seed: int = 0, vocab: int = 1000) -> list[tuple[list[int], list[int]]]:
    """(prompt, continuation) items: groups of 1, 2 and 4 sharing a prompt, prompts of 1–40
    tokens, continuations of 1–30; the group members spread through the list."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(1, vocab) for _ in range(n)]  # noqa: E731
    items = []
    for plen, group in ((1, 2), (3, 1), (17, 4), (40, 2), (8, 1), (25, 3), (5, 2)):
        prompt = tok(plen)
        items += [(prompt, tok(rng.choice([1, 2, 7, 15, 30]))) for _ in range(group)]
    rng.shuffle(items)
    return items


class Spy:
    """Counts calls of `shared_prefix_hidden` (and still runs it), wherever it is called from."""

    def __init__(self, monkeypatch):
        import rlhf.reward.scorer
        import rlhf.serving.shared_prefix as module

        self.calls = 0
        real = module.shared_prefix_hidden

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "shared_prefix_hidden", counting)
        monkeypatch.setattr(rlhf.reward.scorer, "shared_prefix_hidden", counting)


# ------------------------------------------------------------------------------------------------
# the hidden states themselves
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy(tiny_policy_dir):
    from rlhf.models.loading import load_causal_lm

    return load_causal_lm(tiny_policy_dir).eval()


@pytest.fixture(scope="module")
def reward_model(tiny_reward_dir):
    from rlhf.models.loading import load_reward_model

    return load_reward_model(tiny_reward_dir).eval()


@pytest.mark.parametrize("forward_cost_tokens", [1, 8192])  # many small passes / one padded pass
def test_hidden_states_equal_a_plain_forward_of_each_sequence(policy, forward_cost_tokens):
    from rlhf.serving.shared_prefix import shared_prefix_hidden

    items = mixed_items()
    with torch.inference_mode():
        hidden = shared_prefix_hidden(policy, items, pad_id=0, forward_cost_tokens=forward_cost_tokens)
        for (p, c), h in zip(items, hidden):
            alone = policy.base_model(input_ids=torch.tensor([p + c])).last_hidden_state[0]
            assert h.shape == (len(c) + 1, alone.shape[-1])
            torch.testing.assert_close(h, alone[len(p) - 1 :], rtol=0, atol=TOL)


def test_usable_only_where_exact():
    from rlhf.serving.shared_prefix import has_shared_prompts, usable

    def model(impl="sdpa", **cfg):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=impl, **cfg))

    assert usable(model(), 10_000)
    assert not usable(model("flash_attention_2"), 10)
    assert usable(model(sliding_window=64, use_sliding_window=True), 64)
    assert not usable(model(sliding_window=64, use_sliding_window=True), 65)
    assert usable(model(sliding_window=64, use_sliding_window=False), 65)
    assert usable(model(sliding_window=64, layer_types=["full_attention"] * 2), 65)
    assert not usable(model(sliding_window=64, layer_types=["sliding_attention", "full_attention"]), 65)
    assert not usable(model(layer_types=["linear_attention"]), 10)
    assert has_shared_prompts([[1, 2], [3], [1, 2]]) and not has_shared_prompts([[1, 2], [1], [2, 1]])


# ------------------------------------------------------------------------------------------------
# ReferenceService
# ------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(service: str, model_dir, **settings):
    """A real `service` server on a free loopback port and an async client of it."""
    from rlhf.reference.app import make_reference_app
    from rlhf.reward.app import make_reward_app

    make, client_cls = ((make_reward_app, AsyncRewardClient) if service == "reward"
                        else (make_reference_app, AsyncReferenceClient))
    app = make(make_settings(model_dir=model_dir, **BATCHING, **settings))
    async with running(app):
        async with client_cls(f"127.0.0.1:{app.port}", timeout=60) as client:
            yield client


@pytest.fixture(scope="module")
async def reference(tiny_policy_dir):
    async with serving("reference", tiny_policy_dir) as client:
        yield client


async def test_reference_groups_in_one_request_equal_each_item_alone(reference, policy, monkeypatch):
    spy = Spy(monkeypatch)
    items = mixed_items(1)
    res = await reference.logprobs(items)
    assert spy.calls == 1
    for (p, c), r in zip(items, res.results):
        want = teacher_forced_logprobs(policy, p, c)
        assert len(r.logprobs) == len(c)
        assert max(abs(a - b) for a, b in zip(r.logprobs, want)) < TOL
        assert abs(r.sum - sum(want)) < TOL * len(c)


async def test_reference_pairs_from_concurrent_requests_share_a_batch(reference, policy, monkeypatch):
    """DPO traffic: each request one pair, many at once (the batcher may put several pairs in one
    batch); each prompt is computed once for its two completions."""
    spy = Spy(monkeypatch)
    pairs = [items for items in zip(*[iter(mixed_items(2))] * 2)]
    pairs = [[(p, a), (p, b)] for (p, a), (_, b) in pairs]
    results = await asyncio.gather(*(reference.logprobs(pair) for pair in pairs))
    assert spy.calls >= 1
    for pair, res in zip(pairs, results):
        for (p, c), r in zip(pair, res.results):
            want = teacher_forced_logprobs(policy, p, c)
            assert max(abs(a - b) for a, b in zip(r.logprobs, want)) < TOL


async def test_reference_without_a_shared_prompt_takes_the_plain_path(reference, policy, monkeypatch):
    spy = Spy(monkeypatch)
    items = [([5, 6, 7], [8, 9]), ([5, 6], [7, 8, 9])]  # common tokens, not a common prompt
    res = await reference.logprobs(items)
    assert spy.calls == 0
    for (p, c), r in zip(items, res.results):
        assert max(abs(a - b) for a, b in zip(r.logprobs, teacher_forced_logprobs(policy, p, c))) < TOL


async def test_reference_share_prompts_off_never_shares(tiny_policy_dir, policy, monkeypatch):
    spy = Spy(monkeypatch)
    items = mixed_items(3)
    async with serving("reference", tiny_policy_dir, share_prompts=False) as client:
        res = await client.logprobs(items)
    assert spy.calls == 0
    for (p, c), r in zip(items, res.results):
        assert max(abs(a - b) for a, b in zip(r.logprobs, teacher_forced_logprobs(policy, p, c))) < TOL


# ------------------------------------------------------------------------------------------------
# RewardService
# ------------------------------------------------------------------------------------------------


def plain_rewards(model, seqs: list[list[int]], side: str) -> list[float]:
    """The per-item path's rewards of one batch padded on `side` with the pad id (0)."""
    from rlhf.models.reward_head import sequence_rewards

    width = max(map(len, seqs))
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols], mask[i, cols] = torch.tensor(s), 1
    with torch.inference_mode():
        return sequence_rewards(model, ids, mask).tolist()


@pytest.fixture(scope="module")
async def reward(tiny_reward_dir):
    async with serving("reward", tiny_reward_dir) as client:
        yield client


async def test_reward_groups_equal_each_item_alone_and_padded_either_side(reward, reward_model, monkeypatch):
    spy = Spy(monkeypatch)
    items = mixed_items(4)
    # the score head reads the last token whatever it is: responses that end with the pad id (eos)
    items[0] = (items[0][0], items[0][1] + [0])
    items.append((items[0][0], [0]))  # a response that is only the pad id, sharing that prompt
    res = await reward.score(items)
    assert spy.calls == 1
    seqs = [p + c for p, c in items]
    alone = [plain_rewards(reward_model, [s], "right")[0] for s in seqs]
    for side in ("right", "left"):
        padded = plain_rewards(reward_model, seqs, side)
        assert max(abs(a - b) for a, b in zip(padded, alone)) < TOL
    assert max(abs(a - b) for a, b in zip(res.rewards, alone)) < TOL
    assert res.rewards[0] != pytest.approx(plain_rewards(reward_model, [seqs[0][:-1]], "right")[0], abs=1e-4)


async def test_reward_compare_and_text_pairs_share_the_prompt(reward, reward_model, tiny_reward_dir,
                                                              monkeypatch):
    """A compare is one prompt and two responses in one request; text items without a prompt
    (split after their first token) share a batch with those that have one."""
    from rlhf.models.loading import load_tokenizer

    spy = Spy(monkeypatch)
    prompt, a, b = [3, 14, 15, 92, 65, 35], [89, 79, 32], [38, 46, 26, 43, 38, 32, 79]
    cmp = await reward.compare(prompt, a, b)
    assert spy.calls == 1
    want_a, want_b = (plain_rewards(reward_model, [prompt + r], "right")[0] for r in (a, b))
    assert abs(cmp.reward_a - want_a) < TOL and abs(cmp.reward_b - want_b) < TOL

    tok = load_tokenizer(tiny_reward_dir)
    texts = [("the cat sat on the", " mat."), ("the cat sat on the", " hat, again."), ("", "hello"),
             ("", "hello there")]
    res = await reward.score(texts)
    assert spy.calls == 2
    enc = lambda s: tok.encode(s, add_special_tokens=False) if s else []  # noqa: E731
    for (p, r), got in zip(texts, res.rewards):
        assert abs(got - plain_rewards(reward_model, [enc(p) + enc(r)], "right")[0]) < TOL


# ------------------------------------------------------------------------------------------------
# DPO's reference callers keep a pair in one request / one forward
# ------------------------------------------------------------------------------------------------


def test_prompt_batches_keep_a_prompt_s_items_together():
    from rlhf.trainer.dpo import prompt_batches

    items = [(list(range(n % 7 + 1)), [1] * (n % 3 + 1)) for n in range(40)]  # 7 prompts
    batches = prompt_batches(items, 8)
    assert sorted(i for b in batches for i in b) == list(range(40))
    assert all(len(b) <= 8 for b in batches)
    for i, j in ((i, j) for i in range(40) for j in range(40) if items[i][0] == items[j][0]):
        # a prompt with ≤ 8 items sits in one batch (these have 5 or 6)
        assert next(k for k, b in enumerate(batches) if i in b) == next(k for k, b in enumerate(batches) if j in b)
    big = prompt_batches([([1], [2])] * 20, 8)
    assert [len(b) for b in big] == [8, 8, 4]


def test_service_reference_sends_each_pair_in_one_request():
    from rlhf.trainer.dpo import ServiceReference, TokenizedPair, attach_reference_logps

    class FakeClient:
        def __init__(self):
            self.requests = []

        def logprobs(self, items, timeout=None):
            self.requests.append(items)
            results = [SimpleNamespace(sum=float(sum(c)) / 100) for _, c in items]
            return SimpleNamespace(results=results, model=SimpleNamespace(name="r", version="1"),
                                   dtype="float32")

    rng = random.Random(5)
    ids = lambda lo, hi: tuple(rng.randrange(1, 99) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    pairs = [TokenizedPair(str(k), ids(3, 40), ids(1, 12), ids(1, 12)) for k in range(30)]
    client = FakeClient()
    attach_reference_logps(pairs, ServiceReference(client, batch_items=8))
    assert len(client.requests) == 8  # 60 items, 4 pairs a request
    for p in pairs:
        chosen, rejected = (list(p.prompt_ids), list(p.chosen_ids)), (list(p.prompt_ids), list(p.rejected_ids))
        assert any(chosen in r and rejected in r for r in client.requests)
        assert p.ref_chosen == sum(p.chosen_ids) / 100 and p.ref_rejected == sum(p.rejected_ids) / 100


def test_local_reference_computes_a_pair_s_prompt_once(tiny_policy_dir, policy, monkeypatch):
    import rlhf.serving.shared_prefix as module
    from rlhf.trainer.dpo import LocalReference

    spy = Spy(monkeypatch)
    monkeypatch.setattr(module, "_LOGITS_TILE_BYTES", 4 * policy.config.vocab_size * 7)  # 7-row tiles
    items = mixed_items(6)
    got = LocalReference(tiny_policy_dir, batch_items=8).sequence_logps(items)
    assert spy.calls >= 1
    for (p, c), v in zip(items, got):
        assert abs(v - sum(teacher_forced_logprobs(policy, p, c))) < TOL * len(c)


def test_a_cache_only_pass_caches_what_a_full_pass_caches_and_restores_the_model(policy):
    """The prefix pass skips the last layer's MLP and queries (`_kv_only`): its cache equals a full
    pass's exactly, the stand-ins really ran, and the model is whole again afterwards."""
    from rlhf.serving.shared_prefix import _kv_only

    base = policy.base_model
    last = base.layers[-1]
    mlp, attn = last.mlp, last.self_attn
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 0, 0]])
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    with torch.inference_mode():
        full = base(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        with _kv_only(base):
            stand_ins = (type(last.mlp).__name__, type(last.self_attn).__name__)
            part = base(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    assert stand_ins == ("Passthrough", "KeysValuesOnly")
    assert last.mlp is mlp and last.self_attn is attn
    assert len(part.layers) == len(full.layers) == len(base.layers)
    for a, b in zip(full.layers, part.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)

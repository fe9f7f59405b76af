"""RewardService: a real gRPC server on 127.0.0.1 with the tiny reward model made on the spot.

Every reward is checked against a direct forward pass of an independently loaded copy of the
checkpoint on the same tokens, alone (no padding, no batching), read at the last token whatever
it is (the tiny models' pad id is their eos: a trailing eos must count). The server runs on the test
session's event loop, so every test is async; the blocking client runs in a thread.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import shutil
import urllib.request

import grpc
import pytest
from bad_inputs import bad_compare_inputs, bad_score_inputs
from helpers import ADMIN_TOKEN, make_settings, running

from rlhf_client import AsyncRewardClient, RewardClient, RpcError

torch = pytest.importorskip("torch")

TOL = 1e-5
# Every server this module starts batches alike (metrics are per process, labelled by service).
BATCHING = dict(batch_max_wait_ms=10, batch_max_size=64)
PAIRS = [
    ("the cat sat on the", " mat."),
    ("", "hello"),
    ("Alice has 3 apples and Bob has 4 pears. The answer is", " 7, and that is a good answer. yes."),
    ("my favourite colour is", " red"),
]


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_reward_dir):
    """A model store with versions of the served model's name (each with its manifest):
    `v2` (another seed, with its golden probes), `v1` (the served weights, to swap back to),
    `wrong` (v2's weights recorded with v1's probes: refused) and `nan` (score head poisoned)."""
    from safetensors.torch import load_file, save_file

    from rlhf.models.probes import compute_probes
    from rlhf.models.store import ModelStore
    from rlhf.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("reward-store")
    work = tmp_path_factory.mktemp("reward-versions")
    ms = ModelStore(root)
    name = tiny_reward_dir.resolve().name
    v2_dir = make_tiny_model("reward", work / "v2", seed=1)
    nan_dir = work / "nan"
    shutil.copytree(tiny_reward_dir, nan_dir)
    weights = load_file(nan_dir / "model.safetensors")
    key = next(k for k in weights if k.startswith("score"))
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, nan_dir / "model.safetensors", metadata={"format": "pt"})
    v1_probes = compute_probes("reward", tiny_reward_dir)
    versions = {
        "v2": ms.publish(name, v2_dir, kind="reward", probes=compute_probes("reward", v2_dir)).version,
        "v1": ms.publish(name, tiny_reward_dir, kind="reward", probes=v1_probes).version,
        "wrong": ms.publish(name, v2_dir, kind="reward", probes=v1_probes).version,
        "nan": ms.publish(name, nan_dir, kind="reward").version,
    }
    return root, versions, v2_dir


@pytest.fixture(scope="module")
async def server(tiny_reward_dir, store):
    from rlhf.reward.app import make_reward_app

    settings = make_settings(model_dir=tiny_reward_dir, store_dir=store[0], metrics_port=0, **BATCHING)
    app = make_reward_app(settings)
    async with running(app):
        yield app


@pytest.fixture(scope="module")
def target(server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
async def client(target):
    async with AsyncRewardClient(target, admin_token=ADMIN_TOKEN, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def direct(tiny_reward_dir):
    """(model, tokenizer) loaded independently of the service."""
    from rlhf.models.loading import load_reward_model, load_tokenizer

    return load_reward_model(tiny_reward_dir), load_tokenizer(tiny_reward_dir)


def forward_reward(model, ids) -> float:
    """The model's score of one sequence, alone, at its last token: the score head on the
    backbone's last hidden state (not transformers' pooling, which skips a trailing pad id)."""
    with torch.no_grad():
        hidden = model.base_model(input_ids=torch.tensor([list(ids)])).last_hidden_state
        return float(model.score(hidden[0, -1])[0])


def encode(tok, prompt: str, response: str) -> list[int]:
    return tok.encode(prompt, add_special_tokens=False) + tok.encode(response, add_special_tokens=False)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ------------------------------------------------------------------------------------------------
# numbers
# ------------------------------------------------------------------------------------------------


async def test_text_pairs_equal_a_direct_forward_pass(client, direct):
    model, tok = direct
    res = await client.score(PAIRS)  # one request, four lengths: padded in one batch
    assert len(res.rewards) == len(PAIRS)
    for (p, r), got in zip(PAIRS, res.rewards):
        assert abs(got - forward_reward(model, encode(tok, p, r))) < TOL
    assert len(set(res.rewards)) == len(PAIRS)  # not a constant


async def test_token_pairs_equal_text_pairs_and_a_trailing_eos_counts(client, direct):
    model, tok = direct
    by_text = await client.score(PAIRS)
    splits = [(tok.encode(p, add_special_tokens=False), tok.encode(r, add_special_tokens=False)) for p, r in PAIRS]
    by_ids = await client.score(splits)
    assert by_ids.rewards == by_text.rewards
    # eos == pad in this model: a response that ends with it is scored at the eos, not as if the
    # response had been cut before it
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    items = [(p, r + [eos]) for p, r in splits] + [(splits[0][0], [eos])]
    res = await client.score(items)
    for (p, r), got in zip(items, res.rewards):
        assert abs(got - forward_reward(model, p + r)) < TOL
    for without, with_eos in zip(by_ids.rewards, res.rewards):
        assert abs(without - with_eos) > 1e-4, (without, with_eos)


async def test_a_sequence_scores_the_same_alone_and_beside_longer_ones(client, direct):
    """Padding never changes a reward, trailing eos (= pad) or not."""
    model, tok = direct
    eos = tok.eos_token_id
    short = [([5, 6], [7, eos]), ([5, 6], [7]), ([9], [eos, eos])]
    longer = [(list(range(20, 60)), [61, 62, eos]), ([8] * 30, list(range(100, 130)))]
    alone = [(await client.score([s])).rewards[0] for s in short]
    together = (await client.score([longer[0], *short, longer[1]])).rewards[1:-1]
    for s, a, t in zip(short, alone, together):
        assert abs(a - t) < TOL and abs(a - forward_reward(model, s[0] + s[1])) < TOL


async def test_compare_is_bradley_terry_of_the_two_rewards(client, direct):
    _, tok = direct
    prompt, a, b = "the answer is", " 7. yes.", " awful banana"
    cmp = await client.compare(prompt, a, b)
    ra, rb = (await client.score([(prompt, a), (prompt, b)])).rewards
    assert (cmp.reward_a, cmp.reward_b) == (ra, rb)
    assert cmp.probability_a == pytest.approx(sigmoid(ra - rb), abs=1e-12)
    swapped = await client.compare(prompt, b, a)
    assert swapped.probability_a == pytest.approx(1 - cmp.probability_a, abs=1e-12)
    ids = [tok.encode(x, add_special_tokens=False) for x in (prompt, a, b)]
    by_ids = await client.compare(*ids)
    assert (by_ids.reward_a, by_ids.reward_b, by_ids.probability_a) == (ra, rb, cmp.probability_a)
    assert cmp.model == by_ids.model == (await client.get_model()).model


async def test_32_concurrent_callers_get_what_one_at_a_time_gets(client, server):
    rng = random.Random(7)
    info = await client.get_model()
    requests = [
        [([rng.randrange(4, info.vocab_size) for _ in range(rng.randint(0, 40))],
          [rng.randrange(4, info.vocab_size) for _ in range(rng.randint(1, 60))])
         for _ in range(rng.randint(1, 3))]
        for _ in range(32)
    ]
    alone = [(await client.score(req)).rewards for req in requests]
    batches_before = server.model.batcher.batches_run
    together = await asyncio.gather(*(client.score(req) for req in requests))
    assert server.model.batcher.batches_run - batches_before < 16  # they did share batches
    assert server.model.batcher.batches_split == 0  # no batch failed and fell back to one by one
    worst = max(abs(a - b) for x, y in zip(alone, together) for a, b in zip(x, y.rewards))
    assert worst < TOL


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------


async def expect_status(coro, code, field=None):
    with pytest.raises(RpcError) as err:
        await coro
    assert err.value.code == code, err.value
    if field is not None:
        assert err.value.details.startswith(field + ":"), err.value.details
    return err.value


async def test_bad_inputs_are_invalid_argument_naming_the_field(client, target):
    info = await client.get_model()
    for name, items, field in bad_score_inputs(info.max_context, info.vocab_size):
        await expect_status(client.score(items), grpc.StatusCode.INVALID_ARGUMENT, field)
    for args, field in bad_compare_inputs(info.max_context, info.vocab_size):
        await expect_status(client.compare(*args), grpc.StatusCode.INVALID_ARGUMENT, field)
    # raw messages the typed client never builds: an item with neither form, text mixed with ids
    from rlhfpb.v1 import common_pb2, reward_pb2, reward_pb2_grpc

    async with grpc.aio.insecure_channel(target) as ch:
        stub = reward_pb2_grpc.RewardServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem()]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("items[0]")
        mixed = reward_pb2.CompareRequest(prompt="hi", response_a_ids=common_pb2.TokenIds(ids=[5]),
                                          response_b_ids=common_pb2.TokenIds(ids=[6]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Compare(mixed, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("prompt")
    await expect_status(client.score([("hi", "x")] * 65), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert len((await client.score(PAIRS)).rewards) == len(PAIRS)  # still serving


async def test_a_bad_request_among_good_concurrent_ones_fails_alone(client):
    good = [client.score([p]) for p in PAIRS * 4]
    bad = client.score([("hi", "fine"), ([1], [10**6])])
    results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert all(not isinstance(r, BaseException) for r in results[:-1])
    assert isinstance(results[-1], RpcError) and results[-1].code == grpc.StatusCode.INVALID_ARGUMENT


async def test_no_float_enters_and_a_nan_model_is_refused(client, store):
    """No request field is a float, so NaN cannot come in through a request; the one other way
    is the weights: a version whose rewards are NaN fails its swap and the old one keeps serving."""
    from google.protobuf.descriptor import FieldDescriptor

    from rlhfpb.v1 import reward_pb2

    floats = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)
    for msg in (reward_pb2.ScoreRequest, reward_pb2.ScoreItem, reward_pb2.TextPair, reward_pb2.TokenPair,
                reward_pb2.CompareRequest):
        assert not [f.name for f in msg.DESCRIPTOR.fields if f.type in floats], msg
    before = await client.get_model()
    err = await expect_status(client.load_version(store[1]["nan"]), grpc.StatusCode.FAILED_PRECONDITION)
    assert "non-finite" in err.details
    assert (await client.get_model()).model == before.model
    assert all(math.isfinite(r) for r in (await client.score(PAIRS)).rewards)


# ------------------------------------------------------------------------------------------------
# cancellation, versions, auth, health, metrics
# ------------------------------------------------------------------------------------------------


async def test_cancelled_and_timed_out_callers_do_not_poison_the_batch(client, direct):
    model, tok = direct
    want = [forward_reward(model, encode(tok, p, r)) for p, r in PAIRS]
    calls = [asyncio.ensure_future(client.score([pair])) for pair in PAIRS * 4]
    doomed = [asyncio.ensure_future(client.score(PAIRS)) for _ in range(4)]
    timed_out = client.score(PAIRS * 8, timeout=0.001)
    await asyncio.sleep(0)
    for d in doomed:
        d.cancel()
    with pytest.raises(RpcError) as err:
        await timed_out
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    for i, res in enumerate(await asyncio.gather(*calls)):
        assert abs(res.rewards[0] - want[i % len(PAIRS)]) < TOL
    assert len((await client.score(PAIRS)).rewards) == len(PAIRS)


async def test_load_version_swaps_checks_probes_and_needs_the_admin_token(client, target, store):
    from rlhf.models.loading import load_reward_model, load_tokenizer

    _, versions, v2_dir = store
    async with AsyncRewardClient(target) as anon:
        await expect_status(anon.load_version(versions["v2"]), grpc.StatusCode.UNAUTHENTICATED)
    await expect_status(client.load_version("no-such-version"), grpc.StatusCode.NOT_FOUND)
    before = await client.get_model()
    err = await expect_status(client.load_version(versions["wrong"]), grpc.StatusCode.FAILED_PRECONDITION)
    assert "probe" in err.details and (await client.get_model()).model == before.model
    try:
        swap = await client.load_version(versions["v2"])
        assert swap.previous == before.model and swap.model.version == versions["v2"]
        res = await client.score(PAIRS)
        assert res.model == swap.model
        m2, tok = load_reward_model(v2_dir), load_tokenizer(v2_dir)
        for (p, r), got in zip(PAIRS, res.rewards):
            assert abs(got - forward_reward(m2, encode(tok, p, r))) < TOL
    finally:  # the served weights again (as a store version) for the other tests
        await client.load_version(versions["v1"])
    assert (await client.get_model()).model.version == versions["v1"]


async def test_auth_token_health_and_get_model(tiny_reward_dir):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from rlhf.reward.app import make_reward_app
    from rlhf.reward.servicer import SERVICE_NAME

    app = make_reward_app(make_settings(model_dir=tiny_reward_dir, auth_token="s3cret", **BATCHING))
    async with running(app):
        target = f"127.0.0.1:{app.port}"
        async with AsyncRewardClient(target) as none:
            await expect_status(none.score(PAIRS), grpc.StatusCode.UNAUTHENTICATED)
        async with AsyncRewardClient(target, token="nope") as wrong:
            await expect_status(wrong.get_model(), grpc.StatusCode.UNAUTHENTICATED)
        async with AsyncRewardClient(target, token="s3cret") as right:
            info = await right.get_model()
            assert (info.kind, info.backend, info.max_context) == ("reward", "hf", 512)
            assert info.model.name == tiny_reward_dir.name and info.model.version.startswith("pinned-")
            assert (await right.score(PAIRS)).model == info.model
        async with grpc.aio.insecure_channel(target) as ch:  # probes carry no token
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", SERVICE_NAME):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_blocking_client(target, direct):
    model, tok = direct

    def call():
        with RewardClient(target, timeout=30) as c:
            return c.score(PAIRS[:1]).rewards[0], c.compare(*PAIRS[0], " hat.").reward_a

    score, reward_a = await asyncio.to_thread(call)
    want = forward_reward(model, encode(tok, *PAIRS[0]))
    assert abs(score - want) < TOL and abs(reward_a - want) < TOL


async def test_batch_metrics_and_settings_are_exported(client, server):
    await asyncio.gather(*(client.score([p]) for p in PAIRS * 8))
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())

    def value(pattern: str) -> float:
        m = re.search(pattern + r" ([0-9.e+-]+)", text)
        assert m, pattern
        return float(m.group(1))

    assert value(r'rlhf_batch_setting\{service="reward",setting="max_size"\}') == 64
    assert value(r'rlhf_batch_setting\{service="reward",setting="max_tokens"\}') == 65536
    assert value(r'rlhf_batch_setting\{service="reward",setting="max_wait_seconds"\}') == pytest.approx(0.01)
    batches = value(r'rlhf_batch_size_count\{service="reward"\}')
    items = value(r'rlhf_batch_size_sum\{service="reward"\}')
    assert batches >= 1 and items >= 32 and items / batches > 1  # batches held several items
    assert value(r'rlhf_batch_queue_wait_seconds_count\{service="reward"\}') == items

"""ReferenceService: a real gRPC server on 127.0.0.1 with the tiny causal LM made on the spot.

Every log-prob is checked against a teacher-forced forward pass (float64 log-softmax) of an
independently loaded copy of the checkpoint, one sequence alone, whatever else was batched with
it. The server runs on the test session's event loop, so every test is async.
"""

from __future__ import annotations

import asyncio
import math
import random
import shutil

import grpc
import pytest
from bad_inputs import bad_logprobs_inputs
from helpers import ADMIN_TOKEN, make_settings, running, teacher_forced_logprobs

from rlhf_client import AsyncReferenceClient, ReferenceClient, RpcError

torch = pytest.importorskip("torch")

TOL = 1e-5
BATCHING = dict(batch_max_wait_ms=10, batch_max_size=64)
ITEMS = [
    ([5, 6, 7], [8, 9, 10, 11]),
    ([42], [17]),
    (list(range(20, 80)), [3, 0, 12, 99, 100, 101, 5]),
    ([9, 9, 9, 9, 9], list(range(200, 240))),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_policy_dir, tiny_policy_dir_b):
    """A model store with versions of the served model's name (each with its manifest): `b`
    (another checkpoint, with its golden probes), `wrong` (b's weights recorded with the served
    model's probes: refused) and `nan` (a norm poisoned with NaN)."""
    from safetensors.torch import load_file, save_file

    from rlhf.models.probes import compute_probes
    from rlhf.models.store import ModelStore

    root = tmp_path_factory.mktemp("reference-store")
    nan_dir = tmp_path_factory.mktemp("reference-versions") / "nan"
    shutil.copytree(tiny_policy_dir, nan_dir)
    weights = load_file(nan_dir / "model.safetensors")
    key = next(k for k in weights if k.endswith("norm.weight"))
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, nan_dir / "model.safetensors", metadata={"format": "pt"})
    ms = ModelStore(root)
    name = tiny_policy_dir.resolve().name
    versions = {
        "b": ms.publish(name, tiny_policy_dir_b, kind="reference",
                        probes=compute_probes("reference", tiny_policy_dir_b)).version,
        "wrong": ms.publish(name, tiny_policy_dir_b, kind="reference",
                            probes=compute_probes("reference", tiny_policy_dir)).version,
        "nan": ms.publish(name, nan_dir, kind="reference").version,
    }
    return root, versions


@pytest.fixture(scope="module")
async def server(tiny_policy_dir, store):
    from rlhf.reference.app import make_reference_app

    app = make_reference_app(make_settings(model_dir=tiny_policy_dir, store_dir=store[0], **BATCHING))
    async with running(app):
        yield app


@pytest.fixture(scope="module")
def target(server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
async def client(target):
    async with AsyncReferenceClient(target, admin_token=ADMIN_TOKEN, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def model(tiny_policy_dir):
    from rlhf.models.loading import load_causal_lm

    return load_causal_lm(tiny_policy_dir)


def check(model, item, got) -> None:
    want = teacher_forced_logprobs(model, *item)
    assert len(got.logprobs) == len(item[1])
    assert max(abs(a - b) for a, b in zip(got.logprobs, want)) < TOL
    assert got.sum == pytest.approx(math.fsum(got.logprobs), abs=1e-9)  # float64 sum of the values
    assert abs(got.sum - math.fsum(want)) < TOL * len(want)


async def test_logprobs_equal_a_teacher_forced_forward_pass(client, model):
    res = await client.logprobs(ITEMS)  # one request, very different lengths: one padded batch
    assert len(res.results) == len(ITEMS)
    for item, got in zip(ITEMS, res.results):
        check(model, item, got)
        assert all(x <= 0 for x in got.logprobs)


async def test_padding_never_changes_a_result(client, model):
    short = ITEMS[1]
    alone = (await client.logprobs([short])).results[0]
    beside_long = (await client.logprobs([ITEMS[3], short, ITEMS[2]])).results[1]
    assert max(abs(a - b) for a, b in zip(alone.logprobs, beside_long.logprobs)) < TOL
    check(model, short, beside_long)


async def test_32_concurrent_callers_get_what_one_at_a_time_gets(client, server, model):
    rng = random.Random(11)
    info = await client.get_model()
    requests = [
        [([rng.randrange(info.vocab_size) for _ in range(rng.randint(1, 50))],
          [rng.randrange(info.vocab_size) for _ in range(rng.randint(1, 50))])
         for _ in range(rng.randint(1, 3))]
        for _ in range(32)
    ]
    alone = [(await client.logprobs(req)).results for req in requests]
    before = server.model.batcher.batches_run
    together = await asyncio.gather(*(client.logprobs(req) for req in requests))
    assert server.model.batcher.batches_run - before < 16  # they did share batches
    assert server.model.batcher.batches_split == 0  # no batch failed and fell back to one by one
    for req, a, t in zip(requests, alone, together):
        for item, x, y in zip(req, a, t.results):
            assert len(x.logprobs) == len(y.logprobs) == len(item[1])
            assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < TOL
    for item, got in zip(requests[0], together[0].results):  # and both equal the model
        check(model, item, got)


async def expect_status(coro, code, field=None):
    with pytest.raises(RpcError) as err:
        await coro
    assert err.value.code == code, err.value
    if field is not None:
        assert err.value.details.startswith(field + ":"), err.value.details
    return err.value


async def test_bad_inputs_are_invalid_argument_naming_the_field(client):
    info = await client.get_model()
    vocab = info.vocab_size
    for items, field in bad_logprobs_inputs(info.max_context, vocab):
        await expect_status(client.logprobs(items), grpc.StatusCode.INVALID_ARGUMENT, field)
    await expect_status(client.logprobs([([5], [6])] * 65), grpc.StatusCode.RESOURCE_EXHAUSTED)
    # a bad request among concurrent good ones fails alone
    results = await asyncio.gather(*(client.logprobs([it]) for it in ITEMS),
                                   client.logprobs([([5], [vocab + 1])]), return_exceptions=True)
    assert all(not isinstance(r, BaseException) for r in results[:-1])
    assert isinstance(results[-1], RpcError) and results[-1].code == grpc.StatusCode.INVALID_ARGUMENT
    assert len((await client.logprobs(ITEMS)).results) == len(ITEMS)  # still serving


async def test_no_float_enters_and_a_nan_model_is_refused(client, store):
    from google.protobuf.descriptor import FieldDescriptor

    from rlhfpb.v1 import reference_pb2

    floats = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)
    for msg in (reference_pb2.LogProbsRequest, reference_pb2.LogProbsItem):
        assert not [f.name for f in msg.DESCRIPTOR.fields if f.type in floats], msg
    before = await client.get_model()
    err = await expect_status(client.load_version(store[1]["nan"]), grpc.StatusCode.FAILED_PRECONDITION)
    assert "non-finite" in err.details
    assert (await client.get_model()).model == before.model
    res = await client.logprobs(ITEMS)
    assert all(math.isfinite(x) for r in res.results for x in r.logprobs)


async def test_cancelled_callers_do_not_poison_the_batch(client, model):
    calls = [asyncio.ensure_future(client.logprobs([it])) for it in ITEMS * 3]
    doomed = [asyncio.ensure_future(client.logprobs(ITEMS)) for _ in range(4)]
    timed_out = client.logprobs(ITEMS * 10, timeout=0.001)
    await asyncio.sleep(0)
    for d in doomed:
        d.cancel()
    with pytest.raises(RpcError) as err:
        await timed_out
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    for i, res in enumerate(await asyncio.gather(*calls)):
        check(model, ITEMS[i % len(ITEMS)], res.results[0])


async def test_auth_token_health_get_model_and_blocking_client(tiny_policy_dir, model):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from rlhf.reference.app import make_reference_app
    from rlhf.reference.servicer import SERVICE_NAME

    app = make_reference_app(make_settings(model_dir=tiny_policy_dir, auth_token="s3cret", **BATCHING))
    async with running(app):
        target = f"127.0.0.1:{app.port}"
        async with AsyncReferenceClient(target) as none:
            await expect_status(none.logprobs(ITEMS), grpc.StatusCode.UNAUTHENTICATED)
            await expect_status(none.load_version("v2"), grpc.StatusCode.UNAUTHENTICATED)
        async with AsyncReferenceClient(target, token="nope") as wrong:
            await expect_status(wrong.get_model(), grpc.StatusCode.UNAUTHENTICATED)
        async with AsyncReferenceClient(target, token="s3cret") as right:
            info = await right.get_model()
            assert (info.kind, info.backend, info.max_context) == ("reference", "hf", 512)
            assert info.model.name == tiny_policy_dir.name and info.model.version.startswith("pinned-")
            assert (await right.logprobs(ITEMS[:1])).model == info.model

        def blocking():
            with ReferenceClient(target, token="s3cret", timeout=30) as c:
                return c.logprobs(ITEMS[:2])

        res = await asyncio.to_thread(blocking)
        for item, got in zip(ITEMS, res.results):
            check(model, item, got)
        async with grpc.aio.insecure_channel(target) as ch:  # probes carry no token
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", SERVICE_NAME):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_load_version_checks_probes_then_swaps(client, store, tiny_policy_dir_b):
    """Runs last of the shared server's tests: it leaves version `b` serving."""
    from rlhf.models.loading import load_causal_lm

    versions = store[1]
    before = await client.get_model()
    err = await expect_status(client.load_version(versions["wrong"]), grpc.StatusCode.FAILED_PRECONDITION)
    assert "probe" in err.details and (await client.get_model()).model == before.model
    swap = await client.load_version(versions["b"])
    assert swap.previous == before.model and swap.model.version == versions["b"]
    res = await client.logprobs(ITEMS)
    assert res.model == swap.model
    model_b = load_causal_lm(tiny_policy_dir_b)
    for item, got in zip(ITEMS, res.results):
        check(model_b, item, got)


async def test_the_log_probs_name_the_dtype_that_computed_them(client, tiny_policy_dir):
    """Every response says which dtype the weights computed in (a DPO trainer compares it with
    its policy's); a service run in bfloat16 says so."""
    from rlhf.reference.app import make_reference_app

    assert (await client.logprobs(ITEMS[:1])).dtype == "float32"
    app = make_reference_app(make_settings(model_dir=tiny_policy_dir, dtype="bfloat16", **BATCHING))
    async with running(app):
        async with AsyncReferenceClient(f"127.0.0.1:{app.port}", timeout=30) as bf16:
            assert (await bf16.logprobs(ITEMS[:1])).dtype == "bfloat16"


@pytest.mark.parametrize("arch", ["mistral", "qwen2-mixed"])
async def test_sliding_window_models_give_the_values_of_each_sequence_alone(arch, tmp_path):
    """A tiny Mistral (every layer slides, window 4) and a Qwen2 mixing full and sliding layers:
    items far longer than the window, batched together, equal each sequence's own forward."""
    from window_models import make_window_model

    from rlhf.models.loading import load_causal_lm
    from rlhf.reference.app import make_reference_app

    model_dir = make_window_model(arch, tmp_path / arch, window=4)
    direct = load_causal_lm(model_dir)
    rng = random.Random(5)
    items = [([rng.randrange(4, 1000) for _ in range(rng.randint(1, 12))],
              [rng.randrange(4, 1000) for _ in range(rng.randint(2, 25))]) for _ in range(6)]
    app = make_reference_app(make_settings(model_dir=model_dir, **BATCHING))
    async with running(app):
        async with AsyncReferenceClient(f"127.0.0.1:{app.port}", timeout=30) as c:
            res = await c.logprobs(items)
    for item, got in zip(items, res.results):
        check(direct, item, got)

"""PolicyService on the transformers backend: a real gRPC server on 127.0.0.1, the tiny model."""

from __future__ import annotations

import math
import re
import urllib.request

import grpc
import pytest
from bad_inputs import bad_generate_inputs
from helpers import ADMIN_TOKEN, check_backtracking, make_settings, running, status_of, teacher_forced_logprobs

from rlhf_client import AsyncPolicyClient, FinishReason, PolicyClient, RpcError, SamplingParams, assemble_stream

PROMPTS = ["the cat sat on the", "a good dog", "yes please, one red apple and", "numbers: 1 2 3"]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16, return_logprobs=True)


@pytest.fixture(scope="module")
def client(policy_target):
    with PolicyClient(policy_target, admin_token=ADMIN_TOKEN) as c:
        yield c


@pytest.fixture(scope="module")
def reference_model(tiny_policy_dir):
    from rlhf.models.loading import load_causal_lm

    return load_causal_lm(tiny_policy_dir)


def test_text_and_token_prompts_agree(client):
    by_text = client.generate(PROMPTS, GREEDY)
    by_ids = client.generate([c.prompt_token_ids for c in by_text.completions], GREEDY)
    assert [c.token_ids for c in by_text.completions] == [c.token_ids for c in by_ids.completions]
    assert all(len(c.token_ids) > 0 for c in by_text.completions)
    assert [c.prompt_index for c in by_text.completions] == [0, 1, 2, 3]


def test_every_response_names_the_model(client, tiny_policy_dir):
    info = client.get_model()
    assert info.kind == "policy" and info.backend == "hf" and not info.follows_registry
    assert info.model.name == tiny_policy_dir.name and info.model.version.startswith("pinned-")
    assert client.generate(PROMPTS[:1], GREEDY).model == info.model


def test_n_samples_per_prompt(client):
    res = client.generate(PROMPTS[:2], SamplingParams(max_new_tokens=8, seed=3), n=3)
    assert [(c.prompt_index, c.sample_index) for c in res.completions] == [
        (i, j) for i in range(2) for j in range(3)
    ]
    assert len({tuple(c.token_ids) for c in res.completions[:3]}) > 1  # samples differ


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_new_tokens=20, return_logprobs=True),
        SamplingParams(temperature=0.7, top_k=5, max_new_tokens=20, seed=11, return_logprobs=True),
        SamplingParams(temperature=1.3, top_p=0.9, max_new_tokens=20, seed=12, return_logprobs=True),
    ],
    ids=["greedy", "t0.7-topk5", "t1.3-topp0.9"],
)
def test_logprobs_equal_teacher_forced_forward(client, reference_model, params):
    res = client.generate(PROMPTS, params)
    for c in res.completions:
        assert len(c.logprobs) == len(c.token_ids) > 0
        want = teacher_forced_logprobs(reference_model, c.prompt_token_ids, c.token_ids)
        assert max(abs(a - b) for a, b in zip(c.logprobs, want)) < 1e-4


def test_prompt_logprobs_equal_teacher_forced_forward_once_per_prompt(client, policy_server, reference_model):
    """return_prompt_logprobs: log π(prompt[i+1] | prompt[:i+1]) of every prompt token after the
    first, shared by the n samples of a prompt and computed once for them; the samples drawn are
    the same as without it, and a streamed request ignores it."""
    engine = policy_server.app.model
    plain = SamplingParams(temperature=1.0, max_new_tokens=6, seed=21)
    asked = SamplingParams(temperature=1.0, max_new_tokens=6, seed=21, return_prompt_logprobs=True)
    before = engine.stats()["prompt_passes"]
    res = client.generate(PROMPTS + ["Hello"], asked, n=3)
    assert engine.stats()["prompt_passes"] - before == len(PROMPTS) + 1  # not once per sample
    for c in res.completions:
        ids = c.prompt_token_ids
        assert len(c.prompt_logprobs) == len(ids) - 1
        if len(ids) > 1:
            want = teacher_forced_logprobs(reference_model, ids[:1], ids[1:])
            assert max(abs(a - b) for a, b in zip(c.prompt_logprobs, want)) < 1e-4
    assert res.completions[-1].prompt_token_ids == [res.completions[-1].prompt_token_ids[0]]  # one token
    by_prompt = {}
    for c in res.completions:
        assert by_prompt.setdefault(c.prompt_index, c.prompt_logprobs) == c.prompt_logprobs
    without = client.generate(PROMPTS + ["Hello"], plain, n=3).completions
    assert [c.token_ids for c in without] == [c.token_ids for c in res.completions]
    assert all(c.prompt_logprobs == [] for c in without)
    streamed = assemble_stream(client.generate_stream(PROMPTS, asked, n=3))
    assert [c.token_ids for c in streamed] == [c.token_ids for c in res.completions[: len(streamed)]]
    assert all(c.prompt_logprobs == [] for c in streamed)


def test_greedy_is_deterministic(client):
    a = client.generate(PROMPTS, GREEDY)
    b = client.generate(list(reversed(PROMPTS)), GREEDY)
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in reversed(b.completions)]


def test_seeds(client):
    p = SamplingParams(temperature=1.0, max_new_tokens=24, seed=1234)
    first = client.generate(PROMPTS, p, n=2)
    again = client.generate(PROMPTS, p, n=2)
    other = client.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=24, seed=4321), n=2)
    assert [c.token_ids for c in first.completions] == [c.token_ids for c in again.completions]
    assert [c.token_ids for c in first.completions] != [c.token_ids for c in other.completions]


def test_stop_token_ids(client):
    base = client.generate(PROMPTS[:1], GREEDY).completions[0]
    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    res = client.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=16, stop_token_ids=(stop_id,)))
    c = res.completions[0]
    assert c.finish_reason == FinishReason.STOP
    assert c.token_ids == base.token_ids[: first + 1]


def test_stop_strings(client):
    base = client.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=32)).completions[0]
    assert len(base.text) > 6
    stop = base.text[3:6]
    res = client.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=32, stop=(stop,)))
    c = res.completions[0]
    assert c.finish_reason == FinishReason.STOP
    assert c.text == base.text[: base.text.find(stop)]
    assert stop not in c.text
    assert c.token_ids == base.token_ids[: len(c.token_ids)] and len(c.token_ids) < len(base.token_ids)


def test_max_new_tokens_gives_length(client):
    c = client.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=3)).completions[0]
    assert len(c.token_ids) <= 3
    if len(c.token_ids) == 3:
        assert c.finish_reason in (FinishReason.LENGTH, FinishReason.EOS, FinishReason.STOP)



def test_reset_token_keeps_what_follows_the_last_one(client, tiny_policy_dir):
    from rlhf.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_policy_dir)
    base = client.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=24, return_logprobs=True))
    ids = base.completions[0].token_ids
    # any single-token string works as the reset token: pick one the greedy output contains
    candidates = [t for t in ids[:-2] if tok.encode(tok.decode([t]), add_special_tokens=False) == [t]]
    assert candidates, "the greedy output has no round-trippable token"
    reset_id = candidates[0]
    reset = tok.decode([reset_id])
    last = len(ids) - 1 - ids[::-1].index(reset_id)
    params = SamplingParams(temperature=0.0, max_new_tokens=24, return_logprobs=True, reset_token=reset)
    c = client.generate(PROMPTS[:1], params).completions[0]
    assert c.token_ids == ids[last + 1 :]
    assert c.trajectory_token_ids == ids and c.trajectory_logprobs == base.completions[0].logprobs
    assert c.text == tok.decode(ids[last + 1 :], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    streamed = assemble_stream(client.generate_stream(PROMPTS[:1], params))
    assert streamed == [c]
    assert status_of(client.generate, PROMPTS[:1], SamplingParams(reset_token="two words here"))[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_backtracking_logprobs_and_stop_strings(client, tiny_policy_dir, reference_model):
    """Trajectory and kept log-probs each equal a teacher-forced forward of their own context;
    stop strings are matched on the kept text (see helpers.check_backtracking)."""
    from rlhf.models.loading import load_tokenizer

    worst = check_backtracking(client, load_tokenizer(tiny_policy_dir), reference_model, PROMPTS)
    assert worst["trajectory"] < 1e-4 and worst["kept"] < 1e-4


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-38, 1e-45])
def test_tiny_temperatures_are_greedy(client, temperature):
    """Below 1e-5 the temperature is greedy (1e-45 arrives as float32's smallest subnormal)."""
    greedy = client.generate(PROMPTS, GREEDY).completions
    tiny = client.generate(PROMPTS, SamplingParams(temperature=temperature, max_new_tokens=16, seed=5,
                                                   return_logprobs=True)).completions
    assert tiny == greedy


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.9, max_new_tokens=24, seed=99, return_logprobs=True),
        SamplingParams(temperature=0.0, max_new_tokens=24, stop=("e",)),
    ],
    ids=["sampled", "stop-string"],
)
def test_stream_concatenates_to_unary(client, params):
    unary = client.generate(PROMPTS, params, n=2).completions
    chunks = list(client.generate_stream(PROMPTS, params, n=2))
    assert len(chunks) > len(unary)  # it really streamed
    streamed = assemble_stream(chunks)
    assert [(c.prompt_index, c.sample_index, c.text, c.token_ids, c.logprobs, c.finish_reason, c.prompt_token_ids)
            for c in streamed] == [
        (c.prompt_index, c.sample_index, c.text, c.token_ids, c.logprobs, c.finish_reason, c.prompt_token_ids)
        for c in unary
    ]


async def test_async_client_and_concurrency(policy_target):
    import asyncio

    async with AsyncPolicyClient(policy_target) as c:
        many = await asyncio.gather(*(c.generate([p], GREEDY) for p in PROMPTS * 4))
        alone = await c.generate(PROMPTS, GREEDY)
        by_prompt = {tuple(r.completions[0].prompt_token_ids): r.completions[0].token_ids for r in many}
        for comp in alone.completions:
            assert by_prompt[tuple(comp.prompt_token_ids)] == comp.token_ids
        chunks = [ch async for ch in c.generate_stream(PROMPTS[:1], GREEDY)]
        assert assemble_stream(chunks)[0].token_ids == alone.completions[0].token_ids


def test_bad_inputs_are_invalid_argument_and_server_keeps_serving(client):
    info = client.get_model()
    from rlhf.config import Settings

    limit = Settings().max_new_tokens_limit
    for name, kwargs, field in bad_generate_inputs(info.max_context, info.vocab_size, limit):
        code, details = status_of(client.generate, **kwargs)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
        assert field in details, (name, details)
        streamed_code, _ = status_of(lambda: list(client.generate_stream(**kwargs)))
        assert streamed_code == grpc.StatusCode.INVALID_ARGUMENT, name
    assert client.generate(PROMPTS[:1], GREEDY).completions[0].token_ids


def test_too_many_prompts_is_resource_exhausted(client):
    code, details = status_of(client.generate, ["hi"] * 65)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "prompts" in details


def test_metrics_counters_move(client, policy_server):
    url = f"http://127.0.0.1:{policy_server.metrics_port}/metrics"

    def count(code: str) -> float:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        pat = rf'rlhf_rpc_total{{code="{code}",method="Generate",service="policy"}} ([0-9.e+]+)'
        m = re.search(pat, text)
        return float(m.group(1)) if m else 0.0

    def tokens() -> float:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        m = re.search(r'rlhf_generated_tokens_total{service="policy"} ([0-9.e+]+)', text)
        return float(m.group(1)) if m else 0.0

    ok0, bad0, tok0 = count("OK"), count("INVALID_ARGUMENT"), tokens()
    res = client.generate(PROMPTS[:1], GREEDY)
    status_of(client.generate, [])
    assert count("OK") == ok0 + 1 and count("INVALID_ARGUMENT") == bad0 + 1
    assert tokens() == tok0 + len(res.completions[0].token_ids)
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert "rlhf_rpc_latency_seconds_bucket" in text and "rlhf_active_model{" in text


def test_load_version_needs_admin_token_and_unknown_version_is_not_found(policy_target):
    with PolicyClient(policy_target) as anon:
        assert status_of(anon.load_version, "v1")[0] == grpc.StatusCode.UNAUTHENTICATED
    with PolicyClient(policy_target, admin_token="wrong") as bad:
        assert status_of(bad.load_version, "v1")[0] == grpc.StatusCode.UNAUTHENTICATED
    with PolicyClient(policy_target, admin_token=ADMIN_TOKEN) as admin:
        assert status_of(admin.load_version, "no-such-version")[0] == grpc.StatusCode.NOT_FOUND


async def test_auth_token_required_when_set(tiny_policy_dir):
    from rlhf.policy.app import make_policy_app

    app = make_policy_app(make_settings(model_dir=tiny_policy_dir, auth_token="s3cret"))
    async with running(app):
        target = f"127.0.0.1:{app.port}"
        async with AsyncPolicyClient(target) as none:
            with pytest.raises(RpcError) as err:
                await none.generate(["hi"], GREEDY)
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        async with AsyncPolicyClient(target, token="nope") as wrong:
            with pytest.raises(RpcError) as err:
                await wrong.get_model()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        async with AsyncPolicyClient(target, token="s3cret") as right:
            assert (await right.generate(["hi"], GREEDY)).completions[0].token_ids
        # health stays open for probes without a token
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        async with grpc.aio.insecure_channel(target) as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_dns_target_round_robin(policy_server):
    with PolicyClient(f"dns:///localhost:{policy_server.port}") as c:
        assert c.generate(["hi"], GREEDY).completions[0].token_ids


def test_nan_never_appears_in_logprobs(client):
    res = client.generate(PROMPTS, SamplingParams(temperature=2.0, top_p=0.5, max_new_tokens=16, seed=5,
                                                  return_logprobs=True))
    assert all(math.isfinite(x) and x <= 0 for c in res.completions for x in c.logprobs)


def test_request_id_echoed_in_trailing_metadata(policy_target):
    from rlhfpb.v1 import common_pb2, policy_pb2_grpc

    with grpc.insecure_channel(policy_target) as ch:
        stub = policy_pb2_grpc.PolicyServiceStub(ch)
        _, call = stub.GetModel.with_call(common_pb2.GetModelRequest(), metadata=(("x-request-id", "abc123"),),
                                          timeout=10)
        assert dict(call.trailing_metadata())["x-request-id"] == "abc123"
        _, call = stub.GetModel.with_call(common_pb2.GetModelRequest(), timeout=10)
        assert len(dict(call.trailing_metadata())["x-request-id"]) == 32  # generated when absent

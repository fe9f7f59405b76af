"""PolicyService on the vLLM backend (vLLM's CPU build here), held to the transformers backend.

One vLLM-backed policy server serves the module (starting vLLM takes most of a minute on 2
cores); a transformers-backed server on the same checkpoint answers the same requests, and a
teacher-forced forward pass of the checkpoint is the reference for log-probs. Both servers are
real gRPC servers on 127.0.0.1, called through `rlhf_client`.

The checkpoint has untied embeddings: a random tied model's greedy output mostly repeats the
last prompt token, which would make the parity checks weak.
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import time
from dataclasses import dataclass

import grpc
import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

from bad_inputs import bad_generate_inputs  # noqa: E402
from helpers import (  # noqa: E402
    ADMIN_TOKEN,
    P_VALUE_MIN,
    SAMPLING_SETTINGS,
    VLLM_SETTINGS,
    ThreadedApp,
    check_backtracking,
    chi_square_p_value,
    make_settings,
    next_token_logits,
    sampling_distribution,
    status_of,
    teacher_forced_logprobs,
)

from rlhf_client import (  # noqa: E402
    AsyncPolicyClient,
    FinishReason,
    PolicyClient,
    SamplingParams,
    assemble_stream,
)

pytestmark = pytest.mark.vllm

POLL_S = 0.05
QUIET_WINDOW_S = 0.5
PROMPTS = [
    "the cat sat on the",
    "a good dog",
    "yes please, one red apple and",
    "numbers: 1 2 3",
    "Alice has 3 apples and Bob has",
    "my favourite colour is",
    "Hello",
    "The quick brown fox jumps over the lazy",
]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=32, return_logprobs=True)
TOL = 1e-3


def _comparable(completions):
    return [(c.prompt_index, c.sample_index, c.text, c.token_ids, c.finish_reason, c.prompt_token_ids)
            for c in completions]


def _max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-backend")


@pytest.fixture(scope="module")
def model_dir(root):
    from rlhf.models.tiny import make_tiny_model

    # with a chat template (tokenizer_config only; the weights are those without): the HTTP chat test
    return make_tiny_model("policy", root / "tiny-untied", size="tiny", seed=0, tie_embeddings=False,
                           chat_template=True)


@dataclass
class Store:
    root: object
    eos: str  # version: the served weights with eos boosted, its own probes
    wrong: str  # version: the served weights, but the probes of `eos` (a swap must refuse it)


@pytest.fixture(scope="module")
def store(root, model_dir):
    """The model store of the served name, with two versions (manifests, golden probes).

    The eos version's lm_head row of the eos token is twice the row of the token the served
    greedy decode picks first for PROMPTS[0], so it answers that prompt with eos at once.
    """
    from safetensors.torch import load_file, save_file

    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.models.probes import compute_probes
    from rlhf.models.store import ModelStore

    eos_dir = root / "eos-src"
    shutil.copytree(model_dir, eos_dir)
    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
    ids = torch.tensor([tok.encode(PROMPTS[0], add_special_tokens=False)])
    with torch.no_grad():
        first = int(model(input_ids=ids).logits[0, -1].argmax())
    weights = load_file(eos_dir / "model.safetensors")
    head = weights["lm_head.weight"].clone()
    head[tok.eos_token_id] = 2.0 * head[first]
    weights["lm_head.weight"] = head
    save_file(weights, eos_dir / "model.safetensors", metadata={"format": "pt"})
    ms = ModelStore(root / "store")
    eos_probes = compute_probes("policy", eos_dir)
    eos = ms.publish(model_dir.name, eos_dir, kind="policy", probes=eos_probes).version
    wrong = ms.publish(model_dir.name, model_dir, kind="policy", probes=eos_probes).version
    return Store(ms.root, eos, wrong)


@pytest.fixture(scope="module")
def vllm_server(model_dir, store):
    from rlhf.policy.app import make_policy_app

    app = make_policy_app(make_settings(model_dir=model_dir, store_dir=store.root, http_port=0, **VLLM_SETTINGS))
    with ThreadedApp(app) as served:
        yield served


@pytest.fixture(scope="module")
def hf_server(model_dir, store):
    from rlhf.policy.app import make_policy_app

    app = make_policy_app(make_settings(model_dir=model_dir, store_dir=store.root))
    with ThreadedApp(app) as served:
        yield served


@pytest.fixture(scope="module")
def vllm(vllm_server):
    with PolicyClient(vllm_server.target, admin_token=ADMIN_TOKEN, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def hf(hf_server):
    with PolicyClient(hf_server.target, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def engine(vllm_server):
    return vllm_server.app.model


@pytest.fixture(scope="module")
def reference_model(model_dir):
    from rlhf.models.loading import load_causal_lm

    return load_causal_lm(model_dir)


@pytest.fixture(scope="module")
def tiny_tokenizer(model_dir):
    from rlhf.models.loading import load_tokenizer

    return load_tokenizer(model_dir)


def _wait_idle(engine, timeout: float = 10.0) -> None:
    """Until vLLM's front end tracks no request and the engine core runs / queues none."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.num_unfinished() == 0 and engine.engine_request_counts() == (0, 0):
            return
        time.sleep(POLL_S)
    raise AssertionError(f"still busy: {engine.num_unfinished()} unfinished, {engine.engine_request_counts()}")


# ------------------------------------------------------------------------------------------------
# serving
# ------------------------------------------------------------------------------------------------


def test_serving_after_warm_up_and_get_model(vllm_server, vllm, model_dir):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(vllm_server.target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    engine = vllm_server.app.model
    assert engine.generated_tokens() > 0  # start() generated before health said SERVING
    info = vllm.get_model()
    assert info.backend == "vllm" and info.kind == "policy"
    assert info.max_context == 512 and info.vocab_size == len(engine.tokenizer)
    assert info.model.name == model_dir.name
    assert vllm.generate(PROMPTS[:1], GREEDY).model == info.model


# ------------------------------------------------------------------------------------------------
# the same answers as the transformers backend
# ------------------------------------------------------------------------------------------------


def test_greedy_token_ids_equal_the_transformers_backend(vllm, hf, reference_model):
    got, want = vllm.generate(PROMPTS, GREEDY), hf.generate(PROMPTS, GREEDY)
    assert len(got.completions) == 8
    assert _comparable(got.completions) == _comparable(want.completions)
    assert len({tuple(c.token_ids) for c in got.completions}) == 8  # a real decode, not a constant
    for g, w in zip(got.completions, want.completions):
        assert _max_diff(g.logprobs, w.logprobs) < TOL
        ref = teacher_forced_logprobs(reference_model, g.prompt_token_ids, g.token_ids)
        assert _max_diff(g.logprobs, ref) < TOL


def test_token_id_prompts_equal_text_prompts(vllm):
    by_text = vllm.generate(PROMPTS[:4], GREEDY)
    by_ids = vllm.generate([c.prompt_token_ids for c in by_text.completions], GREEDY)
    assert _comparable(by_ids.completions) == _comparable(by_text.completions)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, max_new_tokens=24, seed=5, return_logprobs=True),
        SamplingParams(temperature=0.7, top_k=5, max_new_tokens=24, seed=11, return_logprobs=True),
        SamplingParams(temperature=1.3, top_p=0.9, max_new_tokens=24, seed=12, return_logprobs=True),
        SamplingParams(temperature=0.8, top_k=40, top_p=0.8, min_new_tokens=24, max_new_tokens=24, seed=13,
                       return_logprobs=True),
    ],
    ids=["t1", "t0.7-topk5", "t1.3-topp0.9", "topk-topp-min"],
)
def test_sampled_logprobs_equal_teacher_forced_forward(vllm, reference_model, params):
    res = vllm.generate(PROMPTS, params, n=2)
    assert len(res.completions) == 16
    for c in res.completions:
        assert len(c.logprobs) == len(c.token_ids) > 0
        ref = teacher_forced_logprobs(reference_model, c.prompt_token_ids, c.token_ids)
        assert _max_diff(c.logprobs, ref) < TOL, c


def test_prompt_logprobs_equal_teacher_forced_forward_and_the_transformers_backend(vllm, hf, reference_model):
    """return_prompt_logprobs on vLLM (prompt_logprobs=0, asked of one sample per prompt):
    every sample of a prompt carries the teacher-forced values, as the transformers backend
    does; the samples drawn are those drawn without it; not asked, none."""
    prompts = PROMPTS + ["Hello"]  # one token: no values
    asked = SamplingParams(temperature=1.0, max_new_tokens=6, seed=21, return_prompt_logprobs=True)
    got = vllm.generate(prompts, asked, n=2).completions
    want = hf.generate(prompts, asked, n=2).completions
    assert len(got) == 2 * len(prompts)
    for g, w in zip(got, want):
        ids = g.prompt_token_ids
        assert len(g.prompt_logprobs) == len(ids) - 1 and ids == w.prompt_token_ids
        if len(ids) > 1:
            assert _max_diff(g.prompt_logprobs, teacher_forced_logprobs(reference_model, ids[:1], ids[1:])) < TOL
        assert _max_diff(g.prompt_logprobs, w.prompt_logprobs) < TOL
    assert got[-1].prompt_logprobs == [] and len(got[-1].prompt_token_ids) == 1
    plain = vllm.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=6, seed=21), n=2).completions
    assert [c.token_ids for c in plain] == [c.token_ids for c in got]
    assert all(c.prompt_logprobs == [] for c in plain)


def test_the_ai_judge_reads_the_same_preferences_from_either_backend(vllm, hf):
    """The judge needs nothing but prompt log-probs, so a vLLM-served judge equals a
    transformers-served one on the same checkpoint (random weights: the numbers, not a verdict)."""
    from rlhf.trainer.judge import AIJudge, JudgeTemplate

    template = JudgeTemplate("Q: {prompt}\nA: {response_a}\nB: {response_b}\nBetter:", max_response_chars=80)
    triples = [(p, PROMPTS[(k + 1) % 8], PROMPTS[(k + 3) % 8]) for k, p in enumerate(PROMPTS[:4])]
    got = AIJudge(vllm, template).order_probabilities(triples)
    want = AIJudge(hf, template).order_probabilities(triples)
    for (g_ab, g_ba), (w_ab, w_ba) in zip(got, want):
        assert abs(g_ab - w_ab) < TOL and abs(g_ba - w_ba) < TOL


def test_top_k_one_is_greedy(vllm):
    greedy = vllm.generate(PROMPTS, GREEDY)
    top1 = vllm.generate(PROMPTS, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=32, seed=3,
                                                 return_logprobs=True))
    assert _comparable(top1.completions) == _comparable(greedy.completions)


def test_stop_strings_ids_and_length_match_the_transformers_backend(vllm, hf):
    base = vllm.generate(PROMPTS[:4], SamplingParams(temperature=0.0, max_new_tokens=32)).completions
    cases = []
    for c in base:
        assert len(c.text) > 8
        cases.append(SamplingParams(temperature=0.0, max_new_tokens=32, stop=(c.text[4:7],)))
        cases.append(SamplingParams(temperature=0.0, max_new_tokens=32, stop=(c.text[1:3], "zzz"),
                                    min_new_tokens=6))  # stop string inside the min_new_tokens
        cases.append(SamplingParams(temperature=0.0, max_new_tokens=32, stop_token_ids=(c.token_ids[5],)))
        cases.append(SamplingParams(temperature=0.0, max_new_tokens=32, stop_token_ids=(c.token_ids[2],),
                                    min_new_tokens=4))
    cases.append(SamplingParams(temperature=0.9, max_new_tokens=40, stop=("e", "a"), seed=1))
    for i, params in enumerate(cases):
        prompt = PROMPTS[min(i // 4, 3)] if i < 16 else PROMPTS[0]
        got = vllm.generate([prompt], params).completions[0]
        if params.temperature == 0.0:
            want = hf.generate([prompt], params).completions[0]
            assert _comparable([got]) == _comparable([want]), params
        if params.stop_token_ids and got.finish_reason == FinishReason.STOP:
            assert got.token_ids[-1] in params.stop_token_ids  # the stop id is included
            assert len(got.token_ids) >= (params.min_new_tokens or 0)
        if params.stop:
            assert got.finish_reason == FinishReason.STOP and not any(s in got.text for s in params.stop)


def test_stop_string_keeps_the_token_that_completed_it(vllm, tiny_tokenizer):
    base = vllm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=32)).completions[0]
    stop = base.text[4:7]
    c = vllm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=32, stop=(stop,))).completions[0]
    decode = lambda ids: tiny_tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # noqa: E731
    assert stop in decode(c.token_ids) and stop not in decode(c.token_ids[:-1])
    assert c.token_ids == base.token_ids[: len(c.token_ids)]


def test_context_edge_matches_the_transformers_backend(vllm, hf):
    prompt = [7] * 510  # 2 tokens left in the 512-token context
    params = SamplingParams(temperature=0.0, max_new_tokens=16, return_logprobs=True)
    got, want = vllm.generate([prompt], params).completions[0], hf.generate([prompt], params).completions[0]
    assert _comparable([got]) == _comparable([want])
    assert len(got.token_ids) == 2 and got.finish_reason == FinishReason.LENGTH


def test_reset_token_matches_the_transformers_backend(vllm, hf, tiny_tokenizer):
    tok = tiny_tokenizer
    base = vllm.generate(PROMPTS[:1], GREEDY).completions[0]
    ids = base.token_ids
    candidates = [t for t in ids[:-2] if tok.encode(tok.decode([t]), add_special_tokens=False) == [t]]
    assert candidates
    reset_id = candidates[0]
    params = SamplingParams(temperature=0.0, max_new_tokens=32, return_logprobs=True, reset_token=tok.decode([reset_id]))
    got, want = vllm.generate(PROMPTS[:1], params).completions[0], hf.generate(PROMPTS[:1], params).completions[0]
    assert _comparable([got]) == _comparable([want])
    last = len(ids) - 1 - ids[::-1].index(reset_id)
    assert got.token_ids == ids[last + 1:]


# ------------------------------------------------------------------------------------------------
# what is sampled: the distribution, greedy at tiny temperatures, backtracking
# ------------------------------------------------------------------------------------------------

FREQUENCY_REQUESTS, FREQUENCY_N = 8, 256  # 2048 one-token samples per setting


@pytest.mark.parametrize("setting", SAMPLING_SETTINGS, ids=[f"T{t}-k{k}-p{p}" for t, k, p in SAMPLING_SETTINGS])
def test_token_frequencies_follow_the_filtered_softmax(vllm_server, reference_model, setting):
    """Many seeded one-token samples of one context: their frequencies fit softmax(logits / T)
    restricted to top-k, then top-p (float64, the naive way), and no token outside that set is
    ever drawn (the transformers backend is held to the same test in test_hf_engine.py)."""
    temperature, top_k, top_p = setting

    async def draw():
        async with AsyncPolicyClient(vllm_server.target, timeout=120) as c:
            calls = [
                c.generate(PROMPTS[:1], SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                                       max_new_tokens=1, seed=1000 + r), n=FREQUENCY_N)
                for r in range(FREQUENCY_REQUESTS)
            ]
            return [comp for res in await asyncio.gather(*calls) for comp in res.completions]

    completions = asyncio.run(draw())
    probs = sampling_distribution(next_token_logits(reference_model, completions[0].prompt_token_ids),
                                  temperature, top_k, top_p)
    drawn = torch.tensor([c.token_ids[0] for c in completions])
    assert len(drawn) == FREQUENCY_REQUESTS * FREQUENCY_N
    outside = sorted(set(drawn[probs[drawn] == 0].tolist()))
    assert not outside, f"drew tokens outside the kept set: {outside}"
    p_value, chi2, dof = chi_square_p_value(torch.bincount(drawn, minlength=probs.numel()), probs)
    assert p_value > P_VALUE_MIN, (p_value, chi2, dof)


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-38, 1e-45])
def test_tiny_temperatures_are_greedy(vllm, temperature):
    """Below 1e-5 the temperature is greedy (vLLM would raise it to 1e-2 and sample); 1e-45
    arrives as float32's smallest subnormal."""
    greedy = vllm.generate(PROMPTS, GREEDY)
    tiny = vllm.generate(PROMPTS, SamplingParams(temperature=temperature, max_new_tokens=GREEDY.max_new_tokens,
                                                 seed=5, return_logprobs=True))
    assert _comparable(tiny.completions) == _comparable(greedy.completions)
    for t, g in zip(tiny.completions, greedy.completions):
        assert _max_diff(t.logprobs, g.logprobs) < 1e-4


def test_backtracking_logprobs_and_stop_strings(vllm, tiny_tokenizer, reference_model):
    """Trajectory and kept log-probs each equal a teacher-forced forward of their own context
    (the kept ones from vLLM's prompt log-probs); stop strings are matched on the kept text, so
    vLLM's own stop check (whole output text) is not used with a reset token."""
    worst = check_backtracking(vllm, tiny_tokenizer, reference_model, PROMPTS)
    assert worst["trajectory"] < 1e-4 and worst["kept"] < 1e-4, worst


# ------------------------------------------------------------------------------------------------
# seeds and streaming
# ------------------------------------------------------------------------------------------------


def test_seeds_are_reproducible_and_independent_of_batching(vllm_server, vllm):
    p = SamplingParams(temperature=1.0, max_new_tokens=24, seed=1234, return_logprobs=True)
    first = vllm.generate(PROMPTS[:4], p, n=3)
    again = vllm.generate(PROMPTS[:4], p, n=3)
    other = vllm.generate(PROMPTS[:4], SamplingParams(temperature=1.0, max_new_tokens=24, seed=4321), n=3)
    assert _comparable(first.completions) == _comparable(again.completions)
    assert [c.logprobs for c in first.completions] == [c.logprobs for c in again.completions]
    assert [c.token_ids for c in first.completions] != [c.token_ids for c in other.completions]
    assert len({tuple(c.token_ids) for c in first.completions[:3]}) == 3  # each sample its own draw

    async def crowded():  # the same request while 12 others run beside it
        async with AsyncPolicyClient(vllm_server.target) as c:
            noise = [c.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=40)) for _ in range(12)]
            results = await asyncio.gather(c.generate(PROMPTS[:4], p, n=3), *noise)
            return results[0]

    assert _comparable(asyncio.run(crowded()).completions) == _comparable(first.completions)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.9, max_new_tokens=24, seed=99, return_logprobs=True),
        SamplingParams(temperature=0.0, max_new_tokens=24, stop=("e",)),
        SamplingParams(temperature=1.0, max_new_tokens=24, min_new_tokens=3, stop=("e",), seed=7),
    ],
    ids=["sampled", "stop-string", "stop-string-min"],
)
def test_stream_concatenates_to_unary(vllm, params):
    unary = vllm.generate(PROMPTS, params, n=2).completions
    chunks = list(vllm.generate_stream(PROMPTS, params, n=2))
    assert len(chunks) > len(unary)  # it really streamed
    streamed = assemble_stream(chunks)
    assert _comparable(streamed) == _comparable(unary)
    assert [c.logprobs for c in streamed] == [c.logprobs for c in unary]


def test_http_front_equals_grpc_on_vllm(vllm_server, vllm, model_dir, tiny_tokenizer):
    """The OpenAI-compatible front on the vLLM engine: completions (unary and streamed) and chat
    give the gRPC API's tokens and log-probs for the same seeded request."""
    import openai

    with openai.OpenAI(base_url=f"http://127.0.0.1:{vllm_server.http_port}/v1", api_key="none",
                       max_retries=0, timeout=120) as oai:
        name = model_dir.name
        params = SamplingParams(temperature=0.9, max_new_tokens=16, seed=5, return_logprobs=True)
        want = vllm.generate(PROMPTS[:2], params).completions
        res = oai.completions.create(model=name, prompt=PROMPTS[:2], max_tokens=16, temperature=0.9, seed=5,
                                     logprobs=1)
        for choice, c in zip(res.choices, want):
            assert choice.text == c.text
            assert choice.logprobs.tokens == [tiny_tokenizer.decode([t]) for t in c.token_ids]
            assert _max_diff(choice.logprobs.token_logprobs, c.logprobs) < 1e-6
        streamed: dict[int, str] = {}
        for chunk in oai.completions.create(model=name, prompt=PROMPTS[:2], max_tokens=16, temperature=0.9,
                                            seed=5, stream=True):
            for ch in chunk.choices:
                streamed[ch.index] = streamed.get(ch.index, "") + ch.text
        assert streamed == {k: c.text for k, c in enumerate(want)}
        chat = [{"role": "user", "content": PROMPTS[0]}]
        want = vllm.generate([chat], params).completions[0]
        res = oai.chat.completions.create(model=name, messages=chat, max_tokens=16, temperature=0.9, seed=5,
                                          logprobs=True)
        assert res.choices[0].message.content == want.text
        assert _max_diff([x.logprob for x in res.choices[0].logprobs.content], want.logprobs) < 1e-6
        assert res.system_fingerprint == vllm.get_model().model.version


# ------------------------------------------------------------------------------------------------
# cancellation
# ------------------------------------------------------------------------------------------------

LONG = SamplingParams(temperature=1.0, min_new_tokens=480, max_new_tokens=480)


def test_deadline_aborts_the_request_in_the_engine(vllm, engine):
    """How much is made before the deadline depends on the machine (about 300 of the 480 steps
    on 2 cores); what the abort decides is what is made after it. The engine must stop within a
    small fraction of the deadline: the tokens made after the client saw DEADLINE_EXCEEDED are
    fewer than a quarter of those made in the 0.5 s before it, whatever the machine's speed."""
    _wait_idle(engine)
    start = engine.generated_tokens()
    code, _ = status_of(vllm.generate, PROMPTS, LONG, n=2, timeout=0.5)
    at_deadline = engine.generated_tokens()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_idle(engine)
    made = engine.generated_tokens()
    assert at_deadline > start  # it was generating when the deadline passed
    assert made - at_deadline <= (at_deadline - start) / 4, (at_deadline - start, made - at_deadline)
    assert made - start < 16 * 480  # aborted: not every sample ran to its 480 tokens
    time.sleep(QUIET_WINDOW_S)  # an observation window: nothing may be generated during it
    assert engine.generated_tokens() == made  # nothing runs for the abandoned request
    assert vllm.generate(PROMPTS[:1], GREEDY).completions[0].token_ids  # and it still serves


async def test_cancelled_stream_aborts_the_request_in_the_engine(vllm_server, engine):
    await asyncio.to_thread(_wait_idle, engine)
    start = engine.generated_tokens()
    async with AsyncPolicyClient(vllm_server.target) as c:
        got = 0
        async for _ in c.generate_stream(PROMPTS[:2], LONG, n=2):
            got += 1
            if got == 3:
                assert engine.num_unfinished() == 4
                at_cancel = engine.generated_tokens()
                break  # the client cancels the call
        await asyncio.to_thread(_wait_idle, engine)
        made = engine.generated_tokens()
        # the abort, not the machine's speed: far fewer tokens after the cancel than the 4 × 480
        # the samples still had to make
        assert made - at_cancel < (4 * 480 - (at_cancel - start)) / 4, (at_cancel - start, made - at_cancel)
        await asyncio.sleep(0.5)
        assert engine.generated_tokens() == made
        assert (await c.generate(PROMPTS[:1], GREEDY)).completions[0].token_ids


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_give_the_transformers_backend_codes(vllm, hf):
    from rlhf.config import Settings

    info = vllm.get_model()
    limit = Settings().max_new_tokens_limit
    for name, kwargs, field in bad_generate_inputs(info.max_context, info.vocab_size, limit):
        code, details = status_of(vllm.generate, **kwargs)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
        assert field in details, (name, details)
        assert status_of(hf.generate, **kwargs)[0] == code, name
        assert status_of(lambda: list(vllm.generate_stream(**kwargs)))[0] == code, name
    assert vllm.generate(PROMPTS[:1], GREEDY).completions[0].token_ids


# ------------------------------------------------------------------------------------------------
# load_version (in place: untied checkpoint) and eos; last, it changes the served version
# ------------------------------------------------------------------------------------------------


def test_load_version_refuses_weights_that_fail_their_probes(vllm, engine, store):
    before = vllm.get_model()
    greedy = vllm.generate(PROMPTS, GREEDY)
    code, details = status_of(vllm.load_version, store.wrong)
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert vllm.get_model().model == before.model and engine.health()
    after = vllm.generate(PROMPTS, GREEDY)  # the old weights are back, whole
    assert after.model == before.model
    assert _comparable(after.completions) == _comparable(greedy.completions)
    assert [c.logprobs for c in after.completions] == [c.logprobs for c in greedy.completions]


def test_load_version_in_place_then_eos(vllm_server, vllm, engine, store, model_dir):
    from rlhf.models.loading import load_causal_lm

    from rlhf.policy.types import SampleSpec, SamplingConfig

    before = vllm.get_model()
    assert engine.inplace_reload is None  # auto: in place for an untied checkpoint
    in_flight = SamplingParams(temperature=1.0, min_new_tokens=300, max_new_tokens=300, seed=2)
    on_v1 = vllm.generate(PROMPTS[:2], in_flight)
    held_v1 = vllm.generate(PROMPTS[1:2], GREEDY).completions[0].token_ids

    # a caller that reads one delta of its call and then stops reading (a stalled stream):
    # its sample finishes in the engine, and the swap must not wait for the reader
    async def open_held():
        spec = SampleSpec(0, 0, tuple(engine.tokenizer.encode(PROMPTS[1], add_special_tokens=False)), None)
        gen = engine.generate([spec], SamplingConfig(max_new_tokens=GREEDY.max_new_tokens, temperature=0.0))
        return gen, await gen.__anext__()

    async def read_rest(gen):
        return [d async for d in gen]

    def on_server(coro):
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, vllm_server.loop))

    async def swap_under_load():
        async with AsyncPolicyClient(vllm_server.target, admin_token=ADMIN_TOKEN) as c:
            held, first = await on_server(open_held())
            running = asyncio.ensure_future(c.generate(PROMPTS[:2], in_flight))
            while engine.num_unfinished() < 2:  # both samples running
                await asyncio.sleep(0.01)
            swap = await asyncio.wait_for(c.load_version(store.eos), 120)
            assert running.done()  # the swap waited for it ...
            rest = await on_server(read_rest(held))  # ... and not for the stalled reader
            return await running, swap, [first, *rest]

    running, swap, held = asyncio.run(swap_under_load())
    assert {d.ref.version for d in held} == {before.model.version}  # computed on v1, whole
    assert [t for d in held for t in d.token_ids] == list(held_v1)
    assert swap.previous == before.model and swap.model.version == store.eos
    assert vllm.get_model().model == swap.model
    assert len(engine._engines) == 1 and engine.llm is not None  # in place: the same engine
    # the request in flight during the swap finished on v1, whole
    assert running.model == before.model
    assert _comparable(running.completions) == _comparable(on_v1.completions)

    v2 = load_causal_lm(store.root / model_dir.name / store.eos)
    res = vllm.generate(PROMPTS[:1], GREEDY)
    assert res.model == swap.model
    c = res.completions[0]
    assert c.token_ids == [engine.tokenizer.eos_token_id] and c.finish_reason == FinishReason.EOS
    # min_new_tokens holds eos back; every token is v2's argmax under that mask
    c = vllm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, min_new_tokens=3, max_new_tokens=20,
                                                   return_logprobs=True)).completions[0]
    assert len(c.token_ids) >= 4 and engine.tokenizer.eos_token_id not in c.token_ids[:3]
    ids = torch.tensor([c.prompt_token_ids + c.token_ids])
    with torch.no_grad():
        logits = v2(input_ids=ids).logits[0, len(c.prompt_token_ids) - 1:-1]
    logits[:3, engine.tokenizer.eos_token_id] = float("-inf")
    assert logits.argmax(-1).tolist() == c.token_ids
    assert _max_diff(c.logprobs, teacher_forced_logprobs(v2, c.prompt_token_ids, c.token_ids)) < TOL
    if c.token_ids[-1] == engine.tokenizer.eos_token_id:
        assert c.finish_reason == FinishReason.EOS
    # sampled log-probs follow v2
    s = vllm.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=16, seed=3, min_new_tokens=16,
                                              return_logprobs=True)).completions
    for comp in s:
        assert _max_diff(comp.logprobs, teacher_forced_logprobs(v2, comp.prompt_token_ids, comp.token_ids)) < TOL



# ------------------------------------------------------------------------------------------------
# load_version on a tied checkpoint: in place (the CPU build's packed lm_head re-packed), with the
# second engine as the fallback when the in-place weights fail their probes
# ------------------------------------------------------------------------------------------------


async def _greedy_on(engine, prompts, n: int = 16):
    from rlhf.policy.types import SampleSpec, SamplingConfig

    specs = [SampleSpec(i, 0, tuple(engine.tokenizer.encode(p)), None) for i, p in enumerate(prompts)]
    config = SamplingConfig(max_new_tokens=n, temperature=0.0, return_logprobs=True)
    out = [([], []) for _ in prompts]
    async for d in engine.generate(specs, config):
        assert d.ref == engine.info.ref
        out[d.prompt_index][0].extend(d.token_ids)
        out[d.prompt_index][1].extend(d.logprobs)
    return out


@pytest.mark.slow
async def test_tied_checkpoint_reloads_in_place_and_equals_a_fresh_engine(tiny_policy_dir, tiny_policy_dir_b):
    from rlhf.config import Settings
    from rlhf.models.info import ModelRef
    from rlhf.models.loading import load_causal_lm
    from rlhf.models.probes import check_probes, compute_probes
    from rlhf.policy.engines.vllm import VLLMEngine

    settings = Settings(metrics_port=None, **VLLM_SETTINGS)
    engine = VLLMEngine(settings, tiny_policy_dir, ModelRef("tiny", "a"))
    fresh = VLLMEngine(settings, tiny_policy_dir_b, ModelRef("tiny", "b"))
    await engine.start()
    try:
        on_a = await _greedy_on(engine, PROMPTS)
        llm = engine.llm
        probes = compute_probes("policy", tiny_policy_dir_b)
        await engine.load_version(tiny_policy_dir_b, ModelRef("tiny", "b"), functools.partial(check_probes, probes))
        assert engine.llm is llm and len(engine._engines) == 1  # in place: no second engine
        assert engine.info.ref == ModelRef("tiny", "b")
        on_b = await _greedy_on(engine, PROMPTS)
        assert [ids for ids, _ in on_b] != [ids for ids, _ in on_a]
        await fresh.start()
        want = await _greedy_on(fresh, PROMPTS)
        assert [ids for ids, _ in on_b] == [ids for ids, _ in want]
        for (_, lps), (_, want_lps) in zip(on_b, want):
            assert _max_diff(lps, want_lps) < 1e-5
        v2 = load_causal_lm(tiny_policy_dir_b)
        for p, (ids, lps) in zip(PROMPTS, on_b):
            assert _max_diff(lps, teacher_forced_logprobs(v2, engine.tokenizer.encode(p), ids)) < TOL
    finally:
        await engine.close()
        await fresh.close()


@pytest.mark.slow
async def test_a_tied_reload_that_fails_its_probes_falls_back_to_a_new_engine(
    tiny_policy_dir, tiny_policy_dir_b, monkeypatch
):
    """vLLM's own `reload_weights` without the re-pack (the old behaviour) leaves the tied head
    stale: the probes catch it, the old weights come back, and a new engine takes the version."""
    from rlhf.config import Settings
    from rlhf.models.info import ModelRef
    from rlhf.models.loading import load_causal_lm
    from rlhf.models.probes import check_probes, compute_probes
    from rlhf.policy.engines import vllm as vllm_engine
    from rlhf.policy.types import Finish, SampleSpec, SamplingConfig

    monkeypatch.setattr(vllm_engine, "RELOAD_METHOD", "reload_weights")
    engine = vllm_engine.VLLMEngine(Settings(metrics_port=None, **VLLM_SETTINGS), tiny_policy_dir,
                                    ModelRef("tiny", "a"))
    await engine.start()
    try:
        spec = SampleSpec(0, 0, tuple(engine.tokenizer.encode(PROMPTS[0])), 17)
        config = SamplingConfig(max_new_tokens=16, temperature=0.8, top_k=20, return_logprobs=True)

        async def sample(params=config):
            deltas = [d async for d in engine.generate([spec], params)]
            ids = [t for d in deltas for t in d.token_ids]
            return ids, [x for d in deltas for x in d.logprobs], deltas[-1]

        old_llm = engine.llm
        running = asyncio.ensure_future(sample(SamplingConfig(max_new_tokens=200, min_new_tokens=200)))
        while engine.num_unfinished() < 1:
            await asyncio.sleep(0.01)
        probes = compute_probes("policy", tiny_policy_dir_b)
        await engine.load_version(tiny_policy_dir_b, ModelRef("tiny", "b"), functools.partial(check_probes, probes))
        assert engine.llm is not old_llm and engine.info.ref == ModelRef("tiny", "b")
        ids, _, last = await running  # started on "a" before the swap: finished there
        assert len(ids) == 200 and last.ref == ModelRef("tiny", "a") and last.finish == Finish.LENGTH
        deadline = time.monotonic() + 30
        while len(engine._engines) > 1 and time.monotonic() < deadline:  # the old one stops when idle
            await asyncio.sleep(0.05)
        assert len(engine._engines) == 1
        ids, lps, last = await sample()
        assert last.ref == ModelRef("tiny", "b")
        want = teacher_forced_logprobs(load_causal_lm(tiny_policy_dir_b), spec.prompt_ids, ids)
        assert _max_diff(lps, want) < TOL
    finally:
        await engine.close()

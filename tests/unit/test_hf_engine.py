"""The transformers policy engine, on a real tiny checkpoint made on the spot.

One tiny model and one engine serve the whole module (2-core CI); every result is checked
against the naive computation: a full forward pass per step (no cache, no batching) for greedy
ids, and a teacher-forced forward pass for log-probs.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import pytest
from helpers import (
    P_VALUE_MIN,
    SAMPLING_SETTINGS,
    chi_square_p_value,
    next_token_logits,
    sampling_distribution,
)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from rlhf.config import Settings  # noqa: E402
from rlhf.errors import FailedPrecondition, Unavailable  # noqa: E402
from rlhf.models.info import ModelRef  # noqa: E402
from rlhf.models.loading import load_causal_lm  # noqa: E402
from rlhf.models.tiny import make_tiny_model  # noqa: E402
from rlhf.policy.engines.base import PolicyEngine  # noqa: E402
from rlhf.policy.engines.hf import HFEngine  # noqa: E402
from rlhf.policy.types import Finish, SampleSpec, SamplingConfig  # noqa: E402

V1 = ModelRef("tiny", "v1")
V2 = ModelRef("tiny", "v2")
PROMPTS = [
    "The cat sat on",
    "Hello",
    "Alice has 3 apples and Bob has 4 pears. The answer is",
    "my favourite colour is",
]
GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0)


# ------------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    # untied embeddings: a random tied model's greedy output mostly repeats the last prompt token
    root = tmp_path_factory.mktemp("hf-engine")
    return tuple(
        make_tiny_model("policy", root / name, seed=seed, tie_embeddings=False)
        for name, seed in (("a", 0), ("b", 1))
    )


@pytest.fixture(scope="module")
def reference_models(model_dirs):
    """Independent fp32 loads of both checkpoints, for the naive computations."""
    return {V1: load_causal_lm(model_dirs[0]), V2: load_causal_lm(model_dirs[1])}


@pytest.fixture(scope="module")
async def engine(model_dirs):
    settings = Settings(batch_max_wait_ms=30, batch_max_size=16)
    eng = HFEngine(settings, model_dirs[0], V1)
    assert not eng.health()
    await eng.start()
    assert eng.health()
    yield eng
    await eng.close()
    assert not eng.health()


@pytest.fixture(scope="module")
def prompt_ids(engine):
    return [tuple(engine.tokenizer.encode(p, add_special_tokens=False)) for p in PROMPTS]


def specs_for(prompts, seed=None):
    return [SampleSpec(i, 0, tuple(p), seed) for i, p in enumerate(prompts)]


async def collect(engine, specs, params):
    """{(prompt, sample): (token ids, log-probs, finish, refs seen)} and checks delta order."""
    out: dict = {}
    async for d in engine.generate(specs, params):
        key = (d.prompt_index, d.sample_index)
        ids, lps, finish, refs = out.setdefault(key, ([], [], [None], set()))
        assert finish[0] is None, "no delta after a sample's finish"
        assert len(d.token_ids) == len(d.logprobs)
        ids.extend(d.token_ids)
        lps.extend(d.logprobs)
        finish[0] = d.finish
        refs.add(d.ref)
    assert set(out) == {(s.prompt_index, s.sample_index) for s in specs}
    return {k: (ids, lps, f[0], refs) for k, (ids, lps, f, refs) in out.items()}


@torch.inference_mode()
def naive_greedy(model, prompt, max_new_tokens, eos_ids=(0,), min_new_tokens=0):
    """Full forward pass over the whole sequence each step, argmax of the last logits."""
    ids = list(prompt)
    for step in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1]
        if step < min_new_tokens:
            logits[list(eos_ids)] = float("-inf")
        t = int(logits.argmax())
        ids.append(t)
        if t in eos_ids:
            break
    return ids[len(prompt):]


@torch.inference_mode()
def teacher_forced(model, prompt, completion):
    """log π(completion[k] | prompt + completion[:k]) and the raw logits at those positions."""
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = model(ids).logits[0].double()
    pos = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
    logprobs = torch.log_softmax(logits[pos], dim=-1)
    target = torch.tensor(completion)
    return logprobs.gather(1, target[:, None]).squeeze(1), logits[pos]


async def wait_until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


async def test_protocol_and_info(engine):
    assert isinstance(engine, PolicyEngine)
    info = engine.info
    assert (info.ref, info.backend, info.kind) == (V1, "hf", "policy")
    assert info.max_context == 512 and info.vocab_size == len(engine.tokenizer)


async def test_greedy_batched_equals_naive_loop(engine, reference_models, prompt_ids):
    model = reference_models[V1]
    await wait_until(engine.idle)
    before = engine.stats()
    got = await collect(engine, specs_for(prompt_ids), GREEDY)
    assert engine.stats()["batches"] == before["batches"] + 1  # one batch, mixed prompt lengths
    for i, prompt in enumerate(prompt_ids):
        ids, _, finish, refs = got[(i, 0)]
        assert ids == naive_greedy(model, prompt, GREEDY.max_new_tokens)
        assert finish == (Finish.EOS if ids[-1] == 0 else Finish.LENGTH)
        assert refs == {V1}
    again = await collect(engine, specs_for(prompt_ids), GREEDY)
    assert {k: v[0] for k, v in again.items()} == {k: v[0] for k, v in got.items()}


async def test_concurrent_calls_equal_one_at_a_time(engine, prompt_ids):
    alone = [await collect(engine, specs_for([p]), GREEDY) for p in prompt_ids]
    before = engine.stats()
    together = await asyncio.gather(*(collect(engine, specs_for([p]), GREEDY) for p in prompt_ids))
    after = engine.stats()
    # the calls were micro-batched into fewer forward batches than calls
    assert after["sequences"] - before["sequences"] == len(prompt_ids)
    assert after["batches"] - before["batches"] < len(prompt_ids)
    for a, b in zip(alone, together):
        assert a[(0, 0)][0] == b[(0, 0)][0]
        assert a[(0, 0)][1] == pytest.approx(b[(0, 0)][1], abs=1e-5)


async def test_finished_rows_leave_the_batch_and_the_rest_stay_exact(
    engine, reference_models, prompt_ids
):
    """The longest prompt finishes first (its padding columns are then cut from the cache);
    greedy rows share the batch with a sampled row of another config."""
    model = reference_models[V1]
    await wait_until(engine.idle)  # else the last test's batch may take these rows as joiners
    before = engine.stats()
    lengths = [3, 14, 14, 20]  # prompt_ids[2], the longest prompt, ends before prompt_ids[3]
    calls = [
        collect(engine, specs_for([p]), SamplingConfig(max_new_tokens=n, temperature=0.0))
        for p, n in zip(prompt_ids, lengths)
    ]
    sampled = SamplingConfig(max_new_tokens=8, top_k=20)
    calls.append(collect(engine, specs_for([prompt_ids[0]], seed=9), sampled))
    results = await asyncio.gather(*calls)
    assert engine.stats()["batches"] == before["batches"] + 1
    for p, n, got in zip(prompt_ids, lengths, results):
        assert got[(0, 0)][0] == naive_greedy(model, p, n)


@pytest.mark.parametrize(
    "params",
    [
        SamplingConfig(max_new_tokens=16, temperature=0.0),
        SamplingConfig(max_new_tokens=16, temperature=0.7, top_k=5),
        SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.9),
    ],
    ids=["greedy", "t0.7-topk5", "topp0.9"],
)
async def test_logprobs_equal_teacher_forcing(engine, reference_models, prompt_ids, params):
    model = reference_models[V1]
    got = await collect(engine, specs_for(prompt_ids, seed=7), params)
    for i, prompt in enumerate(prompt_ids):
        ids, lps, _, _ = got[(i, 0)]
        expected, logits = teacher_forced(model, prompt, ids)
        assert torch.allclose(torch.tensor(lps, dtype=torch.float64), expected, atol=1e-4)
        # each chosen token lies inside the filtered set it was drawn from
        for step, t in enumerate(ids):
            scaled = logits[step] / (params.temperature or 1.0)
            order = scaled.argsort(descending=True)
            rank = int((order == t).nonzero())
            if params.top_k:
                assert rank < params.top_k
            if params.top_p < 1:
                mass_above = torch.softmax(scaled, -1)[order[:rank]].sum()
                assert mass_above < params.top_p + 1e-6


async def test_seeds(engine, prompt_ids):
    params = SamplingConfig(max_new_tokens=20, temperature=1.0)
    prompt = prompt_ids[0]

    async def draw(seed, others=()):
        specs = [SampleSpec(0, 0, prompt, seed)]
        specs += [SampleSpec(k + 1, 0, p, None) for k, p in enumerate(others)]
        return (await collect(engine, specs, params))[(0, 0)][0]

    a = await draw(1234)
    assert await draw(1234) == a
    assert await draw(1234, others=prompt_ids[1:]) == a  # whatever else shares the batch
    assert await draw(1235) != a
    unseeded = [await draw(None) for _ in range(2)]
    assert unseeded[0] != unseeded[1]


async def test_stop_token_id_stops_and_is_included(engine, reference_models, prompt_ids):
    prompt = prompt_ids[2]
    greedy = naive_greedy(reference_models[V1], prompt, 12)
    stop_id = greedy[4]
    first = greedy.index(stop_id)
    params = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_token_ids=(stop_id,))
    ids, _, finish, _ = (await collect(engine, specs_for([prompt]), params))[(0, 0)]
    assert finish == Finish.STOP and ids == greedy[: first + 1]


async def test_min_new_tokens_masks_stop_ids(engine, prompt_ids):
    prompt = prompt_ids[1]
    first = (await collect(engine, specs_for([prompt]), GREEDY))[(0, 0)][0][0]
    # the greedy first token as a stop id ends a sample at once...
    plain = SamplingConfig(max_new_tokens=10, temperature=0.0, stop_token_ids=(first,))
    ids, _, finish, _ = (await collect(engine, specs_for([prompt]), plain))[(0, 0)]
    assert (ids, finish) == ([first], Finish.STOP)
    # ...but not before min_new_tokens tokens exist
    held = SamplingConfig(
        max_new_tokens=10, temperature=0.0, stop_token_ids=(first,), min_new_tokens=4
    )
    ids, _, finish, _ = (await collect(engine, specs_for([prompt]), held))[(0, 0)]
    assert first not in ids[:4] and len(ids) >= 4
    assert finish == (Finish.STOP if ids[-1] == first else Finish.LENGTH)


async def test_max_new_tokens_and_max_context_give_length(engine, prompt_ids):
    params = SamplingConfig(max_new_tokens=5, temperature=1.0, seed=3)
    got = await collect(engine, specs_for([prompt_ids[0]], seed=3), params)
    ids, lps, finish, _ = got[(0, 0)]
    assert (len(ids), len(lps), finish) == (5, 5, Finish.LENGTH)
    # a prompt 3 tokens short of the context: 3 tokens, then LENGTH
    ctx = engine.info.max_context
    long_prompt = (prompt_ids[2] * ctx)[: ctx - 3]
    params = SamplingConfig(max_new_tokens=50, min_new_tokens=3, temperature=0.0)  # no early eos
    ids, _, finish, _ = (await collect(engine, specs_for([long_prompt]), params))[(0, 0)]
    assert (len(ids), finish) == (3, Finish.LENGTH)


async def test_stop_string_stops(engine, prompt_ids):
    tok = engine.tokenizer

    def text(ids):
        return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    sampling = SamplingConfig(max_new_tokens=30, temperature=1.0)
    ids = (await collect(engine, specs_for([prompt_ids[0]], seed=11), sampling))[(0, 0)][0]
    def tail(k):  # the last 2 characters of the text of k tokens
        return text(ids[:k])[-2:]

    # a stop string that first shows up once k tokens exist
    k, stop = next(
        (k, tail(k))
        for k in range(3, len(ids))
        if len(tail(k).strip("\ufffd")) == 2 and tail(k) not in text(ids[: k - 1])
    )
    params = SamplingConfig(max_new_tokens=30, temperature=1.0, stop=(stop,))
    got, _, finish, _ = (await collect(engine, specs_for([prompt_ids[0]], seed=11), params))[(0, 0)]
    assert finish == Finish.STOP and got == ids[:k] and stop in text(got)


async def test_cancelled_consumer_stops_its_rows(engine, reference_models, prompt_ids):
    long = SamplingConfig(max_new_tokens=400, min_new_tokens=400, temperature=1.0)  # no early eos
    short = SamplingConfig(max_new_tokens=40, temperature=0.0)
    received = {"closed": 0, "cancelled": 0}

    async def consume_then_close():
        stream = engine.generate([SampleSpec(0, s, prompt_ids[1], s) for s in range(3)], long)
        async for _ in stream:
            received["closed"] += 1
            if received["closed"] == 6:
                break
        await stream.aclose()

    async def consume_forever():
        async for _ in engine.generate([SampleSpec(0, 0, prompt_ids[3], 5)], long):
            received["cancelled"] += 1

    before = engine.stats()["tokens"]
    forever = asyncio.create_task(consume_forever())
    closing = asyncio.create_task(consume_then_close())
    other = asyncio.create_task(collect(engine, specs_for([prompt_ids[2]]), short))
    await closing
    await wait_until(lambda: received["cancelled"] >= 2)
    forever.cancel()
    with pytest.raises(asyncio.CancelledError):
        await forever
    # the 4 cancelled rows leave the batch within a step; at most the other request runs on
    await wait_until(lambda: engine.active_sequences() <= 1)
    result = await other
    ids, _, finish, _ = result[(0, 0)]
    assert ids == naive_greedy(reference_models[V1], prompt_ids[2], 40)
    assert finish in (Finish.LENGTH, Finish.EOS)
    await wait_until(lambda: engine.active_sequences() == 0)
    # tokens computed but never consumed: a few steps of the 4 cancelled rows, not 4 × 400
    generated = engine.stats()["tokens"] - before
    consumed = received["closed"] + received["cancelled"] + len(ids)
    assert generated - consumed <= 4 * 8, (generated, consumed)


async def test_load_version_swaps_model_and_ref(engine, model_dirs, reference_models, prompt_ids):
    prompt = prompt_ids[0]
    before = (await collect(engine, specs_for([prompt]), GREEDY))[(0, 0)]
    await engine.load_version(model_dirs[1], V2)
    assert engine.info.ref == V2
    after = (await collect(engine, specs_for([prompt]), GREEDY))[(0, 0)]
    assert after[3] == {V2}
    assert after[0] == naive_greedy(reference_models[V2], prompt, GREEDY.max_new_tokens)
    expected, _ = teacher_forced(reference_models[V2], prompt, after[0])
    assert torch.allclose(torch.tensor(after[1], dtype=torch.float64), expected, atol=1e-4)
    assert after[:2] != before[:2]
    # a failed load keeps the serving version
    with pytest.raises(FailedPrecondition):
        await engine.load_version(model_dirs[1] / "missing", ModelRef("tiny", "v3"))
    assert engine.info.ref == V2
    await engine.load_version(model_dirs[0], V1)
    again = (await collect(engine, specs_for([prompt]), GREEDY))[(0, 0)]
    assert again[0] == before[0] and again[3] == {V1}


async def test_request_admitted_before_swap_finishes_on_its_version(
    engine, model_dirs, reference_models, prompt_ids
):
    prompt = prompt_ids[2]
    params = SamplingConfig(max_new_tokens=120, min_new_tokens=120, temperature=0.0)
    stream = engine.generate(specs_for([prompt]), params)
    first = await anext(stream)  # admitted on V1
    await engine.load_version(model_dirs[1], V2)
    assert engine.info.ref == V2 and engine.active_sequences() == 1  # swapped mid-request
    ids, refs = list(first.token_ids), {first.ref}
    async for d in stream:
        ids += d.token_ids
        refs.add(d.ref)
    assert refs == {V1}
    assert ids == naive_greedy(reference_models[V1], prompt, 120, min_new_tokens=120)
    await engine.load_version(model_dirs[0], V1)


async def test_eos_from_generation_config_and_min_new_tokens(
    engine, model_dirs, prompt_ids, tmp_path
):
    """eos ids come from generation_config.json: make a likely token an eos id in a copy."""
    prompt = prompt_ids[1]
    first = (await collect(engine, specs_for([prompt]), GREEDY))[(0, 0)][0][0]
    eos_dir = tmp_path / "eos"
    shutil.copytree(model_dirs[0], eos_dir)
    gen_path = eos_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen["eos_token_id"] = [0, first]
    gen_path.write_text(json.dumps(gen))
    await engine.load_version(eos_dir, ModelRef("tiny", "eos"))
    try:
        ids, _, finish, _ = (await collect(engine, specs_for([prompt]), GREEDY))[(0, 0)]
        assert (ids, finish) == ([first], Finish.EOS)  # eos included
        held = SamplingConfig(max_new_tokens=12, temperature=0.0, min_new_tokens=3)
        ids, _, finish, _ = (await collect(engine, specs_for([prompt]), held))[(0, 0)]
        assert first not in ids[:3] and len(ids) >= 3
    finally:
        await engine.load_version(model_dirs[0], V1)


async def test_close_fails_waiting_calls(model_dirs, prompt_ids):
    eng = HFEngine(Settings(batch_max_wait_ms=0), model_dirs[0], V1)
    with pytest.raises(Unavailable):
        await anext(eng.generate(specs_for(prompt_ids), GREEDY))
    await eng.start()
    params = SamplingConfig(max_new_tokens=400, min_new_tokens=400, temperature=0.0)
    stream = eng.generate(specs_for(prompt_ids), params)
    await anext(stream)
    await eng.close()
    with pytest.raises(Unavailable):
        async for _ in stream:
            pass
    assert not eng.health() and eng.active_sequences() == 0


async def test_late_requests_join_the_running_batch(engine, reference_models, prompt_ids):
    """Continuous batching: a request arriving mid-batch joins it (no wait for the batch to
    end), and its greedy output is still exactly the naive one, as is the long request's."""
    long_params = SamplingConfig(max_new_tokens=150, min_new_tokens=150, temperature=0.0)
    tokens_before = engine.stats()["tokens"]
    long_task = asyncio.ensure_future(collect(engine, specs_for(prompt_ids[2:3]), long_params))
    await wait_until(lambda: engine.stats()["tokens"] > tokens_before)  # the long batch is running
    batches_before = engine.stats()["batches"]
    late = await collect(engine, specs_for(prompt_ids[:2]), GREEDY)
    assert not long_task.done(), "the late request had to wait for the long batch to end"
    assert engine.stats()["batches"] == batches_before  # it joined; no new batch was started
    for i, p in enumerate(prompt_ids[:2]):
        want = naive_greedy(reference_models[V1], p, GREEDY.max_new_tokens)
        assert late[(i, 0)][0] == want
    long = await long_task
    want_long = naive_greedy(reference_models[V1], prompt_ids[2], 150, min_new_tokens=150)
    assert long[(0, 0)][0] == want_long


# ------------------------------------------------------------------------------------------------
# what is sampled: the distribution, and greedy at tiny temperatures
# ------------------------------------------------------------------------------------------------

FREQUENCY_SAMPLES = 4000  # single-token samples per setting (about 0.3 s each, batched)


@pytest.fixture(scope="module")
async def wide_engine(model_dirs):
    """An engine whose batches hold hundreds of single-token samples (the frequency tests)."""
    eng = HFEngine(Settings(batch_max_wait_ms=30, batch_max_size=1024), model_dirs[0], V1)
    await eng.start()
    yield eng
    await eng.close()


@pytest.mark.parametrize("setting", SAMPLING_SETTINGS, ids=[f"T{t}-k{k}-p{p}" for t, k, p in SAMPLING_SETTINGS])
async def test_token_frequencies_follow_the_filtered_softmax(wide_engine, reference_models, prompt_ids, setting):
    """Many seeded one-token samples of one context: their frequencies fit softmax(logits / T)
    restricted to top-k, then top-p (float64, computed the naive way), and no token outside
    that set is ever drawn."""
    temperature, top_k, top_p = setting
    prompt = prompt_ids[0]
    probs = sampling_distribution(next_token_logits(reference_models[V1], prompt), temperature, top_k, top_p)
    params = SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    specs = [SampleSpec(0, j, prompt, 10_000 + j) for j in range(FREQUENCY_SAMPLES)]
    got = await collect(wide_engine, specs, params)
    drawn = torch.tensor([ids[0] for ids, _, _, _ in got.values()])
    outside = sorted(set(drawn[probs[drawn] == 0].tolist()))
    assert not outside, f"drew tokens outside the kept set: {outside}"
    p_value, chi2, dof = chi_square_p_value(torch.bincount(drawn, minlength=probs.numel()), probs)
    assert p_value > P_VALUE_MIN, (p_value, chi2, dof)


FLOAT32_SUBNORMAL = float(torch.tensor(1e-45, dtype=torch.float32))  # 1.4e-45, the smallest


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-38, FLOAT32_SUBNORMAL])
async def test_tiny_temperatures_are_greedy(engine, prompt_ids, temperature):
    """T below 1e-5 is greedy (decided by SamplingConfig.greedy): no NaN from logits / T."""
    params = SamplingConfig(max_new_tokens=12, temperature=temperature, return_logprobs=True)
    got = await collect(engine, specs_for(prompt_ids, seed=3), params)
    want = await collect(engine, specs_for(prompt_ids), SamplingConfig(max_new_tokens=12, temperature=0.0,
                                                                        return_logprobs=True))
    assert {k: v[:3] for k, v in got.items()} == {k: v[:3] for k, v in want.items()}
    assert params.greedy and not SamplingConfig(max_new_tokens=1, temperature=1e-5).greedy


# ------------------------------------------------------------------------------------------------
# continuous batching on mixed lengths (issue 19)
# ------------------------------------------------------------------------------------------------


async def test_finished_rows_are_evicted_at_their_last_step(engine, prompt_ids):
    """Rows of one batch with different lengths: each costs exactly its own steps (a finished row
    is dropped from the batch at once, never carried to the longest member's end), and the
    engine counts one running row once the short ones are done."""
    lengths = [2, 5, 9, 300]
    await wait_until(engine.idle)  # else the last test's batch may take these rows as joiners
    before = engine.stats()
    calls = [
        asyncio.ensure_future(collect(engine, specs_for([p]), SamplingConfig(
            max_new_tokens=n, min_new_tokens=n, temperature=0.0)))
        for p, n in zip(prompt_ids, lengths)
    ]
    await asyncio.gather(*calls[:3])
    await wait_until(lambda: calls[3].done() or engine.active_sequences() == 1)
    results = await asyncio.gather(*calls)
    after = engine.stats()
    assert [len(r[(0, 0)][0]) for r in results] == lengths
    assert after["batches"] - before["batches"] == 1
    assert after["tokens"] - before["tokens"] == sum(lengths)


async def test_seeded_rows_joining_mid_batch_equal_running_alone(engine, prompt_ids):
    """Sampled requests that join a running batch at different steps give, seed for seed, the
    tokens (and log-probs) they give when each runs alone; so does the long row they joined."""
    params = SamplingConfig(max_new_tokens=24, temperature=1.0)
    long_params = SamplingConfig(max_new_tokens=120, min_new_tokens=120, temperature=1.0)
    joiners = [SampleSpec(0, 0, p, 50 + i) for i, p in enumerate(prompt_ids[:3])]
    long_spec = SampleSpec(0, 0, prompt_ids[3], 7)
    alone = [(await collect(engine, [s], params))[(0, 0)] for s in joiners]
    long_alone = (await collect(engine, [long_spec], long_params))[(0, 0)]

    tokens_before = engine.stats()["tokens"]
    long_task = asyncio.ensure_future(collect(engine, [long_spec], long_params))
    await wait_until(lambda: engine.stats()["tokens"] > tokens_before)  # the long batch runs
    batches_before = engine.stats()["batches"]
    joined = []
    for k, spec in enumerate(joiners):  # one after another: each joins at a later step
        if k:
            mark = engine.stats()["tokens"]
            await wait_until(lambda: engine.stats()["tokens"] > mark + 3)
        joined.append(asyncio.ensure_future(collect(engine, [spec], params)))
    joined = await asyncio.gather(*joined)
    assert not long_task.done(), "a joiner had to wait for the long batch to end"
    assert engine.stats()["batches"] == batches_before  # every one joined the running batch
    for a, b in zip(alone, joined):
        assert b[(0, 0)][0] == a[0]
        assert b[(0, 0)][1] == pytest.approx(a[1], abs=1e-5)
    long = (await long_task)[(0, 0)]
    assert long[0] == long_alone[0]
    assert long[1] == pytest.approx(long_alone[1], abs=1e-5)


async def test_long_prompt_joins_in_chunks_without_stalling_decode(model_dirs, reference_models, prompt_ids):
    """A long prompt joining a running batch is prefilled a chunk per decode step (4 prompt
    tokens here): the running row keeps producing tokens meanwhile, and every output — the
    long prompt's, a short prompt left-padded beside it, the running row's — is the naive one."""
    eng = HFEngine(Settings(batch_max_wait_ms=30, batch_max_size=16, batch_prefill_chunk=4), model_dirs[0], V1)
    await eng.start()
    try:
        long_prompt = tuple(eng.tokenizer.encode(" ".join([PROMPTS[2]] * 5), add_special_tokens=False))
        assert len(long_prompt) >= 60
        running_params = SamplingConfig(max_new_tokens=300, min_new_tokens=300, temperature=0.0)
        seen = {"running": 0}

        async def running():
            ids = []
            async for d in eng.generate(specs_for(prompt_ids[:1]), running_params):
                ids.extend(d.token_ids)
                seen["running"] = len(ids)
            return ids

        run_task = asyncio.ensure_future(running())
        await wait_until(lambda: seen["running"] > 0)
        batches = eng.stats()["batches"]
        at_submit = seen["running"]
        first_at = None
        joined: dict = {}
        async for d in eng.generate(specs_for([long_prompt, prompt_ids[1]]), GREEDY):
            if first_at is None:
                first_at = seen["running"]
            joined.setdefault(d.prompt_index, []).extend(d.token_ids)
        assert eng.stats()["batches"] == batches  # it joined the running batch
        # 2 rows × ≥ 60 columns at 4 tokens a step: ≥ 30 prefill chunks, a decode step after each
        assert first_at - at_submit >= len(long_prompt) // 2 - 2, (at_submit, first_at)
        model = reference_models[V1]
        assert joined[0] == naive_greedy(model, long_prompt, GREEDY.max_new_tokens)
        assert joined[1] == naive_greedy(model, prompt_ids[1], GREEDY.max_new_tokens)
        assert await run_task == naive_greedy(model, prompt_ids[0], 300, min_new_tokens=300)
    finally:
        await eng.close()

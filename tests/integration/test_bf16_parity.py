"""`RLHF_DTYPE=bfloat16` on CPU: the policy (hf backend), reward and reference services and the
trainer's reference forward load their weights in bf16, and what they return stays within a
stated tolerance of fp32.

The bf16 numbers are compared with an fp32 forward pass of the same checkpoint (float64
log-softmax, one sequence alone). Tolerances, per dtype (`TOL`): the largest |Δ| of a per-token
log-prob (nats) and of a reward; bf16 keeps 8 bits of mantissa, so the tiny and `small` models
land at 0.004 / 0.016 per token and 0.0006 / 0.004 per reward (measured, random weights); the
bounds leave ~3× room. Each check also asserts that the served numbers are *not* fp32's (the
weights really are bf16): a service that ignored the setting fails it.
"""

from __future__ import annotations

import math

import pytest
from helpers import ADMIN_TOKEN, make_settings, running, teacher_forced_logprobs

from rlhf_client import AsyncPolicyClient, AsyncReferenceClient, AsyncRewardClient, SamplingParams

torch = pytest.importorskip("torch")

#: Largest |Δ| against fp32 accepted per dtype: (per-token log-prob, reward score).
TOL = {"float32": (1e-5, 1e-5), "bfloat16": (5e-2, 2e-2), "float16": (1e-2, 5e-3)}
#: Smallest largest-|Δ| that shows the weights were not fp32 (fp32 paths agree to ~1e-6).
NOT_FP32 = 1e-4

ITEMS = [
    ([5, 6, 7], [8, 9, 10, 11]),
    ([42], [17]),
    (list(range(20, 80)), [3, 0, 12, 99, 100, 101, 5]),
    ([9, 9, 9, 9, 9], list(range(200, 240))),
]
PROMPTS = ["the cat sat on the", "a good dog", "yes please, one red apple and", "numbers: 1 2 3"]


@pytest.fixture(scope="module")
def fp32_policy(tiny_policy_dir):
    from rlhf.models.loading import load_causal_lm

    return load_causal_lm(tiny_policy_dir)


def _largest_gap(model, items, got: list[list[float]]) -> float:
    gaps = []
    for (prompt, completion), lps in zip(items, got):
        want = teacher_forced_logprobs(model, prompt, completion)
        assert len(lps) == len(want) == len(completion)
        gaps += [abs(a - b) for a, b in zip(lps, want)]
    return max(gaps)


def _assert_within(gap: float, dtype: str, which: int = 0) -> None:
    assert math.isfinite(gap) and gap <= TOL[dtype][which], f"{dtype}: |Δ| {gap} > {TOL[dtype][which]}"
    if dtype != "float32":
        assert gap > NOT_FP32, f"{dtype}: |Δ| {gap} — the numbers are fp32's, the dtype was ignored"


# ------------------------------------------------------------------------------------------------
# the real loading path, in process
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_causal_lm_loaded_in_a_dtype_stays_within_its_tolerance(tiny_policy_dir, fp32_policy, dtype):
    from rlhf.models.loading import load_causal_lm

    model = load_causal_lm(tiny_policy_dir, dtype=dtype)
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    got = [teacher_forced_logprobs(model, p, c) for p, c in ITEMS]
    _assert_within(_largest_gap(fp32_policy, ITEMS, got), dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_trainer_reference_logprobs_in_a_dtype(tiny_policy_dir, fp32_policy, dtype):
    """DPO's local reference in the worker's dtype: the packed, fused-head path
    (`completion_logprobs`) on bf16 weights, log-softmax in fp32."""
    from rlhf.trainer.dpo import LocalReference
    from rlhf.trainer.logprobs import completion_logprobs

    ref = LocalReference(tiny_policy_dir, dtype=dtype)
    assert ref.describe()["dtype"] == dtype
    with torch.inference_mode():
        per_row = completion_logprobs(ref.model, ITEMS, pad_id=ref.pad_id).per_row()
    _assert_within(_largest_gap(fp32_policy, ITEMS, per_row), dtype)
    sums = ref.sequence_logps(ITEMS)
    for s, row in zip(sums, per_row):
        assert s == pytest.approx(math.fsum(row), abs=1e-4)


def test_auto_means_bf16_only_where_the_cpu_multiplies_it_natively():
    from rlhf.models.loading import cpu_has_fast_bf16, resolve_dtype

    assert resolve_dtype("auto", "cpu") == ("bfloat16" if cpu_has_fast_bf16() else "float32")
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"  # asked for: honoured, even if slow
    with pytest.raises(ValueError):
        resolve_dtype("int8", "cpu")


# ------------------------------------------------------------------------------------------------
# live services started with dtype=bfloat16 (RLHF_DTYPE)
# ------------------------------------------------------------------------------------------------


async def test_reference_service_in_bf16(tiny_policy_dir, fp32_policy, tmp_path):
    from rlhf.reference.app import make_reference_app

    app = make_reference_app(make_settings(model_dir=tiny_policy_dir, store_dir=tmp_path,
                                           dtype="bfloat16"))
    async with running(app):
        async with AsyncReferenceClient(f"127.0.0.1:{app.port}", admin_token=ADMIN_TOKEN,
                                        timeout=60) as client:
            res = await client.logprobs(ITEMS)
    assert res.dtype == "bfloat16"
    _assert_within(_largest_gap(fp32_policy, ITEMS, [r.logprobs for r in res.results]), "bfloat16")


async def test_reward_service_in_bf16(tiny_reward_dir, tmp_path):
    from rlhf.models.loading import load_reward_model
    from rlhf.reward.app import make_reward_app

    fp32 = load_reward_model(tiny_reward_dir)
    seqs = [p + c for p, c in ITEMS]
    with torch.no_grad():
        want = [float(fp32.score(fp32.base_model(input_ids=torch.tensor([s])).last_hidden_state[0, -1])[0])
                for s in seqs]
    app = make_reward_app(make_settings(model_dir=tiny_reward_dir, store_dir=tmp_path, dtype="bfloat16"))
    async with running(app):
        assert next(app.model._loaded().model.parameters()).dtype == torch.bfloat16
        async with AsyncRewardClient(f"127.0.0.1:{app.port}", admin_token=ADMIN_TOKEN,
                                     timeout=60) as client:
            got = (await client.score(ITEMS)).rewards
    _assert_within(max(abs(a - b) for a, b in zip(got, want)), "bfloat16", which=1)


async def test_policy_service_in_bf16_returns_logprobs_of_its_tokens(tiny_policy_dir, fp32_policy, tmp_path):
    """Greedy and sampled tokens from the hf engine on bf16 weights: each returned log-prob is
    the fp32 teacher-forced one of the same token within the bf16 tolerance (the tokens
    themselves may differ from an fp32 run's where two candidates are near-tied)."""
    from rlhf.policy.app import make_policy_app

    app = make_policy_app(make_settings(model_dir=tiny_policy_dir, store_dir=tmp_path, dtype="bfloat16"))
    async with running(app):
        assert next(app.model._current.model.parameters()).dtype == torch.bfloat16
        async with AsyncPolicyClient(f"127.0.0.1:{app.port}", admin_token=ADMIN_TOKEN,
                                     timeout=60) as client:
            greedy = await client.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=16,
                                                                   return_logprobs=True))
            sampled = await client.generate(PROMPTS, SamplingParams(max_new_tokens=16, seed=7,
                                                                    return_logprobs=True), n=2)
    done = greedy.completions + sampled.completions
    assert all(len(c.token_ids) > 0 for c in done)
    items = [(c.prompt_token_ids, c.token_ids) for c in done]
    _assert_within(_largest_gap(fp32_policy, items, [c.logprobs for c in done]), "bfloat16")

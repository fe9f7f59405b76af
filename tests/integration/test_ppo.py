"""PPO / GRPO on real parts: tiny policies made on the spot, the policy engines and services,
real Redis, a real Celery worker.

- the trainer's numbers: packed per-token entropy (and its gradient) and critic values equal a
  naive forward of each sequence; micro-batches change memory, not the update;
- on fresh samples the trainer's recomputed log-probs equal the behaviour log-probs a policy
  service reported (transformers backend; vLLM backend where vLLM is installed), so the first
  minibatch's ratio is 1 and its clip fraction 0;
- learning: a few iterations (generate with the engine → score by a rule → `train_ppo` → generate
  from the new checkpoint) raise the mean score of fresh samples clearly (its expectation from
  ~0.5 by at least 0.1) while their KL to the reference stays under a stated bound (20 nats per
  8-token completion), with GAE and with GRPO;
- the critic is saved inside the version and carried on; a reward model can seed it;
- the job on a worker (Celery, prefork): samples from a stream, a version with `value/` inside,
  entries acked, a pushed-again id never applied twice, stale samples dropped and counted; a
  worker SIGKILLed mid-job loses nothing, applies nothing twice, and one version is published.

Rollouts here call the transformers engine in-process (`HFEngine`, the PolicyService's engine)
on the checkpoint being trained; reference log-probs come from the base checkpoint (what the
ReferenceService serves), scores from a rule: the share of completion tokens with an even id.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal

import pytest
from rlhf_client.redis_conn import connect
from trainer_helpers import (  # noqa: F401 - r, settings: fixtures
    REDIS_URL,
    WORKER_REDIS_URL,
    celery_keys,
    delete_matching,
    forget_job,
    forget_model,
    names_fixture,
    publish_active,
    push_at_once,
    r,
    settings,
    unique,
    wait_for,
    worker_starter,
)

torch = pytest.importorskip("torch")

from rlhf_client import PolicyClient, Registry, SamplingParams, TrainingClient  # noqa: E402
from rlhfpb.v1 import common_pb2, samples_pb2  # noqa: E402

from rlhf.models.loading import load_causal_lm  # noqa: E402
from rlhf.models.store import ModelStore  # noqa: E402
from rlhf.trainer.jobs import PPOJob  # noqa: E402
from rlhf.trainer.logprobs import completion_logprobs, completion_values  # noqa: E402
from rlhf.trainer.ppo import (  # noqa: E402
    CURVES_FILE,
    STATE_FILE,
    VALUE_DIR,
    PPOError,
    SampleRecord,
    load_curves,
    train_ppo,
)
from rlhf.trainer.queues import applied_ids  # noqa: E402

PROMPTS = ["the cat sat on the", "a good dog", "one two three four", "please pass the red"]
N = 8  # samples per prompt
NEW_TOKENS = 8
FRESH_TOL = 1e-4  # fp32 on both sides: the service's log-probs vs the trainer's recomputation
VLLM_TOL = 1e-3  # vLLM's kernels against a teacher-forced forward (as in test_vllm_backend)


def even_share(ids) -> float:
    """The rule scorer: the share of completion tokens whose id is even (about ½ at random)."""
    return sum(1 for t in ids if t % 2 == 0) / len(ids)


def spec(**fields) -> PPOJob:
    return PPOJob(model_name="x", source={"type": "jsonl", "path": "unused"}, **fields)


# ------------------------------------------------------------------------------------------------
# rollouts through the policy engine
# ------------------------------------------------------------------------------------------------


async def _generate(model_dir, version: str, prompts, n: int, seed: int):
    from rlhf.config import Settings
    from rlhf.models.info import ModelRef
    from rlhf.policy.engines.hf import HFEngine
    from rlhf.policy.types import SampleSpec, SamplingConfig

    engine = HFEngine(Settings(batch_max_wait_ms=5, batch_max_size=64), model_dir,
                      ModelRef("policy", version))
    await engine.start()
    try:
        tok = engine.tokenizer
        specs = [SampleSpec(i, j, tuple(tok.encode(p, add_special_tokens=False)),
                            seed * 100_003 + i * 101 + j)
                 for i, p in enumerate(prompts) for j in range(n)]
        out: dict = {}
        params = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, return_logprobs=True)
        async for d in engine.generate(specs, params):
            o = out.setdefault((d.prompt_index, d.sample_index), {"ids": [], "lps": []})
            o["ids"] += d.token_ids
            o["lps"] += d.logprobs
            if d.finish is not None:
                o["finish"] = d.finish
        return specs, out
    finally:
        await engine.close()


def rollout(model_dir, version: str, reference, *, seed: int, tag: str, prompts=PROMPTS,
            n: int = N) -> list[SampleRecord]:
    """n samples per prompt from the engine on `model_dir` (raw log-probs), reference log-probs
    from `reference` (a loaded model), scored by `even_share`."""
    specs, out = asyncio.run(_generate(model_dir, version, prompts, n, seed))
    rows = [(s.prompt_ids, tuple(out[(s.prompt_index, s.sample_index)]["ids"])) for s in specs]
    with torch.inference_mode():
        ref = completion_logprobs(reference, rows, pad_id=0).per_row()
    records = []
    for s, (prompt, completion), ref_lps in zip(specs, rows, ref):
        o = out[(s.prompt_index, s.sample_index)]
        group = f"{tag}:p{s.prompt_index}"
        records.append(SampleRecord(
            id=f"{group}:{version}:{s.sample_index}", group_id=group, prompt_ids=prompt,
            completion_ids=completion, behaviour_logprobs=tuple(o["lps"]),
            reference_logprobs=tuple(ref_lps), score=even_share(completion),
            ended=int(o["finish"]) in (1, 3), policy_version=version))
    return records


def mean_score(records) -> float:
    return sum(r.score for r in records) / len(records)


def expected_score(model_dir, records) -> float:
    """The policy's expected score on the contexts of `records`: the mean over completion
    positions of π(even id | prompt + completion before it). The same mean as `mean_score` in
    expectation, without the noise of drawing the tokens (32 samples of 8 tokens are few)."""
    model = load_causal_lm(model_dir)
    rows = []
    with torch.inference_mode():
        for r in records:
            ids = torch.tensor([list(r.prompt_ids) + list(r.completion_ids)])
            logits = model(input_ids=ids).logits[0, len(r.prompt_ids) - 1 : -1].double()
            rows.append(float(torch.softmax(logits, -1)[:, 0::2].sum(-1).mean()))
    return sum(rows) / len(rows)


def mean_kl(records) -> float:
    """Mean over samples of Σ_t (log π − log π_ref) at the sampled tokens: a k1 estimate of
    KL(π ‖ π_ref) per completion."""
    return sum(sum(b - r for b, r in zip(x.behaviour_logprobs, x.reference_logprobs))
               for x in records) / len(records)


@pytest.fixture(scope="module")
def reference(tiny_policy_dir):
    return load_causal_lm(tiny_policy_dir)


# ------------------------------------------------------------------------------------------------
# the trainer's numbers
# ------------------------------------------------------------------------------------------------


def _naive(model, prompt, completion):
    """Per-token log-probs and entropies (float64) of one sequence from a plain forward pass."""
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()  # (C, V)
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, torch.tensor(completion)[:, None])[:, 0]
    return picked, -(logp.exp() * logp).sum(-1)


SEQS = [((5, 6, 7), (8, 9, 10, 11)), ((5, 6, 7), (12, 13)), ((40, 41), (42,)),
        ((5, 6, 7), (14, 15, 16)), ((300, 301, 302, 303), (304, 305, 306, 307, 308))]


@pytest.mark.parametrize("kw", [dict(), dict(pack=False), dict(share_prompts=False)])
def test_entropy_and_its_gradient_equal_a_naive_forward(tiny_policy_dir, kw):
    model = load_causal_lm(tiny_policy_dir)
    a = torch.linspace(-1, 1, sum(len(c) for _, c in SEQS))  # any weights for the two terms
    b = torch.linspace(2, -0.5, a.numel())
    out = completion_logprobs(model, SEQS, pad_id=0, entropy=True, **kw)
    (out.tokens * a + out.entropy * b).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    lp, ent = zip(*(_naive(model, p, c) for p, c in SEQS))
    want_lp, want_ent = torch.cat(lp), torch.cat(ent)
    assert (out.tokens.double() - want_lp).abs().max() < 1e-4
    assert (out.entropy.double() - want_ent).abs().max() < 1e-4
    (want_lp * a.double() + want_ent * b.double()).sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=2e-5, rtol=1e-3), name


def test_critic_values_are_the_score_head_at_the_positions_that_predict_each_token(
        tiny_reward_dir):
    from rlhf.models.loading import load_reward_model

    model = load_reward_model(tiny_reward_dir)
    want = []
    for p, c in SEQS:
        ids = torch.tensor([list(p) + list(c)])
        hidden = model.base_model(input_ids=ids).last_hidden_state[0]  # (P + C, H)
        want.append(model.score(hidden[len(p) - 1 : -1])[:, 0])  # V(prompt + completion[:i])
    want = torch.cat(want)
    for kw in (dict(), dict(pack=False)):
        with torch.no_grad():
            got = completion_values(model, SEQS, pad_id=0, **kw)
        assert got.shape == want.shape and (got - want).abs().max() < 1e-5, kw


def test_micro_batches_change_memory_not_the_update(tiny_policy_dir, reference, tmp_path):
    samples = rollout(tiny_policy_dir, "v1", reference, seed=1, tag="mb", prompts=PROMPTS[:2], n=4)
    results = {}
    for accum in (1, 3):
        s = spec(minibatch_size=8, grad_accum_steps=accum, ppo_epochs=1, learning_rate=1e-3,
                 value_learning_rate=1e-3, seed=3)
        results[accum] = train_ppo(s, samples, base_dir=tiny_policy_dir,
                                   out_dir=tmp_path / str(accum), threads=1)
    a, b = results[1].curves[0], results[3].curves[0]
    for k in ("policy_loss", "value_loss", "entropy", "kl_ref", "approx_kl"):
        assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (k, a[k], b[k])
    wa = load_causal_lm(tmp_path / "1").state_dict()
    wb = load_causal_lm(tmp_path / "3").state_dict()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


# ------------------------------------------------------------------------------------------------
# fresh samples: ratio 1 at the first step, on both backends
# ------------------------------------------------------------------------------------------------


def _check_fresh(completions, model_dir, version: str, *, tol: float) -> None:
    """Completions (with raw log-probs) of `model_dir` → SampleRecords; the trainer recomputes
    their log-probs to the behaviour ones, and its first minibatch has ratio 1, clip 0."""
    records = [SampleRecord.from_completion(
        c, score=even_share(c.trajectory_token_ids), policy_version=version,
        group_id=f"fresh:p{c.prompt_index}", reference_logprobs=c.trajectory_logprobs)
        for c in completions]
    assert all(len(r.completion_ids) > 0 for r in records)
    model = load_causal_lm(model_dir)
    with torch.inference_mode():
        recomputed = completion_logprobs(
            model, [(r.prompt_ids, r.completion_ids) for r in records], pad_id=0).per_row()
    worst = max(abs(a - b) for r, row in zip(records, recomputed)
                for a, b in zip(r.behaviour_logprobs, row))
    assert worst < tol, worst
    # one minibatch per step, the first on the samples exactly as they came
    s = spec(advantage_estimator="grpo", group_size=4, minibatch_size=len(records), ppo_epochs=2,
             learning_rate=1e-3)
    result = train_ppo(s, records, base_dir=model_dir, threads=1)
    m, first = result.metrics, result.curves[0]
    assert first["clip_fraction"] == 0.0 and m["clip_fraction_first_step"] == 0.0
    assert abs(first["ratio_mean"] - 1.0) < tol and first["approx_kl"] < tol**2, first
    assert abs(first["kl_ref"]) < 1e-5  # reference = behaviour here
    assert result.curves[1]["approx_kl"] > first["approx_kl"]  # the policy moved after step 1


def test_fresh_samples_from_the_transformers_service_start_at_ratio_one(policy_target,
                                                                          tiny_policy_dir):
    params = SamplingParams(max_new_tokens=NEW_TOKENS, seed=7, return_logprobs=True)
    with PolicyClient(policy_target, timeout=120) as client:
        res = client.generate(PROMPTS, params, n=4)
    assert len(res.completions) == 16
    _check_fresh(res.completions, tiny_policy_dir, res.model.version, tol=FRESH_TOL)


@pytest.mark.vllm
def test_fresh_samples_from_the_vllm_service_start_at_ratio_one(tiny_policy_dir):
    pytest.importorskip("vllm")
    from helpers import VLLM_SETTINGS, ThreadedApp, make_settings

    from rlhf.policy.app import make_policy_app

    app = make_policy_app(make_settings(model_dir=tiny_policy_dir, **VLLM_SETTINGS))
    params = SamplingParams(max_new_tokens=NEW_TOKENS, seed=7, return_logprobs=True)
    with ThreadedApp(app) as served, PolicyClient(served.target, timeout=300) as client:
        res = client.generate(PROMPTS, params, n=4)
    assert len(res.completions) == 16
    # vLLM's own kernels (fp32 on CPU): test_vllm_backend's tolerance against a plain forward
    _check_fresh(res.completions, tiny_policy_dir, res.model.version, tol=VLLM_TOL)


# ------------------------------------------------------------------------------------------------
# learning
# ------------------------------------------------------------------------------------------------

KL_BOUND = 20.0  # nats per 8-token completion (2.5 per token); unregularised runs pass 40
LEARN = {
    "gae": dict(advantage_estimator="gae", kl_coef=0.05, lam=1.0, learning_rate=5e-3,
                value_learning_rate=1e-2, ppo_epochs=4, minibatch_size=8),
    "grpo": dict(advantage_estimator="grpo", group_size=N, kl_in="loss", kl_estimator="k3",
                 kl_coef=0.1, learning_rate=5e-3, ppo_epochs=4, minibatch_size=8),
}


@pytest.mark.parametrize("algo", sorted(LEARN))
def test_iterations_raise_the_score_while_kl_stays_bounded(algo, tiny_policy_dir, reference,
                                                            tmp_path):
    """generate (32 samples) → score → train_ppo → generate from the new checkpoint, 6 times."""
    s = spec(**LEARN[algo])
    before = rollout(tiny_policy_dir, "v0", reference, seed=999, tag="eval")
    current, curves = tiny_policy_dir, []
    for it in range(6):
        samples = rollout(current, f"v{it}", reference, seed=it, tag=f"it{it}")
        out = tmp_path / f"v{it + 1}"
        result = train_ppo(s, samples, base_dir=current, out_dir=out, threads=1)
        m = result.metrics
        assert m["clip_fraction_first_step"] == 0.0, (it, m)  # fresh samples: ratio 1 first
        assert abs(m["ratio_mean_first_step"] - 1.0) < 1e-5
        assert (out / VALUE_DIR).is_dir() == (algo == "gae")
        assert m["critic"] == ("none" if algo != "gae" else "policy" if it == 0 else "base")
        curves += result.curves
        current = out
    after = rollout(current, "v6", reference, seed=999, tag="eval")
    scores = (expected_score(tiny_policy_dir, before), expected_score(current, after),
              mean_score(before), mean_score(after))
    assert scores[1] >= scores[0] + 0.1 and scores[3] > scores[2], scores  # from ~0.5
    assert 0 < mean_kl(after) < KL_BOUND, mean_kl(after)
    assert len(curves) == 6 * 4 * 4  # iterations × epochs × minibatches
    assert {"score_mean", "kl_ref", "beta", "clip_fraction", "approx_kl", "entropy",
            "policy_loss"} <= set(curves[0])
    assert ("value_loss" in curves[0] and "explained_variance" in curves[0]) == (algo == "gae")
    saved = load_curves(current)
    assert [c["step"] for c in saved] == list(range(1, 17))  # the last iteration's steps


names = names_fixture("ppo", "test:ppo-samples")


def test_the_curves_of_a_job_are_plotted_from_its_version(r, names, tiny_policy_dir, reference,
                                                            tmp_path, capsys):
    """`plot_ppo_curves` on a version directory, and `rlhf jobs show ID --plot PNG`, which finds
    the version the job published in the store."""
    pytest.importorskip("matplotlib", reason="matplotlib (the train extra, in the lock) is not "
                        "installed in this environment")
    from rlhf.cli import main as rlhf_main
    from rlhf.trainer.jobs import JobStore
    from rlhf.trainer.ppo import plot_ppo_curves

    samples = rollout(tiny_policy_dir, "v0", reference, seed=5, tag="plot", prompts=PROMPTS[:2])
    train_ppo(spec(ppo_epochs=2), samples, base_dir=tiny_policy_dir, out_dir=tmp_path / "out",
              threads=1)
    png = plot_ppo_curves(tmp_path / "out", tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    store = ModelStore(tmp_path / "store")
    version = store.publish(names["model"], tmp_path / "out", kind="policy").version
    job = PPOJob(model_name=names["model"], source={"type": "jsonl", "path": "unused"})
    names["jobs"].append(job.job_id)
    jobs = JobStore(r)
    jobs.create(job)
    assert jobs.succeed(job.job_id, None, version=version, metrics={})
    shown = tmp_path / "shown.png"
    assert rlhf_main(["jobs", "show", job.job_id, "--redis-url", REDIS_URL, "--store",
                      str(store.root), "--plot", str(shown)]) == 0
    assert f'"version": "{version}"' in capsys.readouterr().out
    assert shown.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("fields", [
    dict(advantage_estimator="dr_grpo", group_size=4),  # seq-mean-token-sum-norm by default
    dict(advantage_estimator="rloo", group_size=4, kl_in="loss", kl_estimator="k3"),
    dict(advantage_estimator="reinforce_pp", kl_estimator="k2", gamma=0.9),
    dict(advantage_estimator="reinforce_pp_baseline", group_size=4, entropy_coef=0.01),
    dict(dual_clip=3.0, clip_eps_high=0.28, value_clip_eps=None, whiten_rewards=True,
         reward_clip=0.5, missing_eos_penalty=-1.0, loss_aggregation="seq-mean-token-mean"),
], ids=["dr_grpo", "rloo-kl-loss", "reinforce_pp", "reinforce_pp_baseline-entropy", "gae-options"])
def test_every_estimator_and_option_trains(fields, tiny_policy_dir, reference):
    samples = rollout(tiny_policy_dir, "v0", reference, seed=8, tag="opt", prompts=PROMPTS[:4],
                      n=4)
    s = spec(ppo_epochs=2, minibatch_size=8, learning_rate=1e-3, **fields)
    result = train_ppo(s, samples, base_dir=tiny_policy_dir, threads=1)
    m = result.metrics
    assert (m["steps"], m["samples"], m["groups"], m["incomplete_groups"]) == (4, 16, 4, 0)
    assert m["loss_aggregation"] == s.aggregation and m["clip_fraction_first_step"] == 0.0
    assert all(math.isfinite(c["policy_loss"]) and math.isfinite(c["entropy"])
               for c in result.curves)
    assert ("value_loss" in m) == (s.advantage_estimator == "gae")


def test_an_adaptive_beta_moves_by_its_formula_and_goes_on_in_the_next_iteration(
        tiny_policy_dir, reference, tmp_path):
    samples = rollout(tiny_policy_dir, "v0", reference, seed=9, tag="beta", prompts=PROMPTS[:2],
                      n=4)
    s = spec(kl_coef=0.1, kl_target=2.0, kl_horizon=100, ppo_epochs=1, learning_rate=1e-3)
    first = train_ppo(s, samples, base_dir=tiny_policy_dir, out_dir=tmp_path / "v1", threads=1)
    kl = first.metrics["kl_ref"]  # the samples' KL to the reference (0: the reference made them)
    error = min(max(kl / 2.0 - 1, -0.2), 0.2)
    assert first.metrics["beta"] == 0.1
    assert math.isclose(first.metrics["beta_next"], 0.1 * (1 + error * 8 / 100), rel_tol=1e-9)
    assert json.loads((tmp_path / "v1" / STATE_FILE).read_text())["beta"] == \
        first.metrics["beta_next"]
    again = rollout(tmp_path / "v1", "v1", reference, seed=10, tag="beta2", prompts=PROMPTS[:2],
                    n=4)
    second = train_ppo(s, again, base_dir=tmp_path / "v1", threads=1)
    assert second.metrics["beta"] == first.metrics["beta_next"]  # carried on in the version
    fixed = train_ppo(spec(kl_coef=0.1, ppo_epochs=1), again, base_dir=tmp_path / "v1", threads=1)
    assert fixed.metrics["beta"] == fixed.metrics["beta_next"] == 0.1


# ------------------------------------------------------------------------------------------------
# the critic
# ------------------------------------------------------------------------------------------------


def test_the_critic_is_carried_on_and_can_start_from_a_reward_model(tiny_policy_dir,
                                                                    tiny_reward_dir, reference,
                                                                    tmp_path):
    from safetensors.torch import load_file

    samples = rollout(tiny_policy_dir, "v0", reference, seed=3, tag="critic", prompts=PROMPTS[:2],
                      n=4)
    s = spec(ppo_epochs=1, learning_rate=1e-3, value_learning_rate=1e-3,
             critic={"init_dir": str(tiny_reward_dir)})
    first = train_ppo(s, samples, base_dir=tiny_policy_dir, out_dir=tmp_path / "v1", threads=1)
    assert first.critic == {"source": "critic.init_dir", "dir": str(tiny_reward_dir)}
    rm = load_file(tiny_reward_dir / "model.safetensors")
    v1 = load_file(tmp_path / "v1" / VALUE_DIR / "model.safetensors")
    assert set(v1) == set(rm) and any(not torch.equal(v1[k], rm[k]) for k in rm)  # trained on
    # the next iteration goes on with the version's own critic (the spec's is not read again)
    second = train_ppo(s, samples, base_dir=tmp_path / "v1", out_dir=tmp_path / "v2", threads=1)
    assert second.critic == {"source": "base", "dir": str(tmp_path / "v1" / VALUE_DIR)}
    state = json.loads((tmp_path / "v2" / STATE_FILE).read_text())
    assert state["iterations"] == 2 and (tmp_path / "v2" / CURVES_FILE).is_file()
    # zero-initialised head on the policy's backbone: the first values are all 0
    zero = train_ppo(spec(ppo_epochs=1), samples, base_dir=tiny_policy_dir, threads=1)
    assert zero.critic["source"] == "policy" and zero.curves[0]["value_loss"] > 0


def test_a_reward_model_with_another_vocabulary_is_refused_as_critic(tiny_policy_dir, reference,
                                                                     tmp_path):
    from transformers import Qwen2ForSequenceClassification

    from rlhf.models.tiny import make_tokenizer, model_config

    other = tmp_path / "rm-other-vocab"
    Qwen2ForSequenceClassification(model_config("reward", vocab_size=2048)).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    samples = rollout(tiny_policy_dir, "v0", reference, seed=4, tag="vocab", prompts=PROMPTS[:1],
                      n=2)
    with pytest.raises(PPOError, match="critic.init_dir: .* vocab_size 2048, the policy"):
        train_ppo(spec(critic={"init_dir": str(other)}), samples, base_dir=tiny_policy_dir,
                  threads=1)


def test_early_stop_before_a_step_whose_approx_kl_passes_the_bound(tiny_policy_dir, reference):
    samples = rollout(tiny_policy_dir, "v0", reference, seed=6, tag="stop", prompts=PROMPTS[:2],
                      n=4)
    s = spec(ppo_epochs=4, minibatch_size=4, learning_rate=1e-2, max_approx_kl=1e-6)
    result = train_ppo(s, samples, base_dir=tiny_policy_dir, threads=1)
    m = result.metrics
    # step 1 is on fresh samples (approx-KL ≈ 0); the update moves the policy past 1e-6
    assert (m["steps"], m["early_stopped"], m["early_stop_step"], m["planned_steps"]) == \
        (1, True, 2, 8)
    assert len(result.curves) == 1 and result.applied_ids == sorted(r.id for r in samples)


# ------------------------------------------------------------------------------------------------
# the job in-process: JSONL, a critic-free estimator, staleness
# ------------------------------------------------------------------------------------------------


def test_a_grpo_job_from_jsonl_drops_stale_samples_and_fails_on_stale_only_data(
        r, names, settings, tiny_policy_dir, reference, tmp_path):
    from rlhf.trainer.jobs import execute, parse_spec
    from rlhf.trainer.ppo import run_ppo_job

    store = ModelStore(settings.store_dir)
    m = publish_active(r, settings.store_dir, names["model"], tiny_policy_dir)
    fresh = rollout(store.path(names["model"], m.version), m.version, reference, seed=31,
                    tag="jl", prompts=PROMPTS[:2])
    stale = [SampleRecord(**{**x.__dict__, "id": x.id + ":old", "policy_version": "v0000"})
             for x in fresh[:3]]
    data = tmp_path / "samples.jsonl"
    rows = [x.to_json() for x in fresh + stale] + [fresh[0].to_json()]  # one id twice
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def run(path, **fields):
        job = parse_spec({"type": "ppo", "model_name": names["model"], "group_size": N,
                          "advantage_estimator": "grpo",
                          "source": {"type": "jsonl", "path": str(path)}, **JOB, **fields})
        names["jobs"].append(job.job_id)
        return execute(job, run_ppo_job, settings=settings, worker="test")

    out = run(data)
    assert out.status == "succeeded" and out.version == "v0002", out
    manifest = store.verify(names["model"], "v0002")
    mm = manifest.metrics
    counts = (mm["samples"], mm["dropped_stale"], mm["duplicate_samples"], mm["groups"])
    assert counts == (16, 3, 1, 2)
    assert mm["advantage_estimator"] == "grpo" and mm["critic"] == "none"
    assert "value_loss" not in mm and not any(f.startswith(VALUE_DIR + "/") for f in manifest.files)
    assert manifest.extra["dropped_stale_ids"] == sorted(x.id for x in stale)
    assert manifest.extra["applied_ids"] == sorted(x.id for x in fresh)

    only_stale = tmp_path / "stale.jsonl"
    only_stale.write_text("".join(json.dumps(x.to_json()) + "\n" for x in stale))
    failed = run(only_stale)
    assert failed.status == "failed" and "3 samples read, 3 of them stale" in failed.error
    assert store.versions(names["model"]) == ["v0001", "v0002"]


def test_a_ppo_spec_is_checked_against_its_data_and_critic_at_submit(r, names, tmp_path):
    from rlhf.trainer.jobs import JobRejected

    tc = TrainingClient(REDIS_URL, client=r)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "prompt_ids": [1], "completion_ids": [2, 3],
                               "behaviour_logprobs": [-1.0], "reference_logprobs": [-1.0, -1.0],
                               "score": 1.0}) + "\n")
    base = str(tmp_path / "nowhere")
    cases = [
        (dict(base_dir=base, source={"type": "jsonl", "path": str(empty)}),
         "base_dir: checkpoint directory not found"),
        (dict(model_name=unique("nobody"), source={"type": "stream"}),
         "has no active version to start from"),
    ]
    before = r.zcard("rlhf:jobs")
    for fields, message in cases:
        with pytest.raises(JobRejected, match=message):
            tc.submit_ppo(**{"model_name": names["model"], **fields})
    from rlhf.trainer.jobs import check_ppo_submit, parse_spec

    def check(**fields):
        spec = parse_spec({"type": "ppo", "model_name": names["model"], **fields})
        with pytest.raises(JobRejected) as err:
            check_ppo_submit(spec, r)
        return str(err.value)

    assert "source.path: " in check(source={"type": "jsonl", "path": str(empty)}) and \
        "holds 0 scored samples; the job needs at least 1" in check(
            source={"type": "jsonl", "path": str(empty)})
    assert "behaviour_logprobs has 1 values for 2 completion tokens" in check(
        source={"type": "jsonl", "path": str(bad)})
    assert f"source.stream: '{names['stream']}' is empty (push samples first" in check(
        source={"type": "stream", "stream": names["stream"]})
    assert "critic.init_dir: checkpoint directory not found" in check(
        source={"type": "stream", "stream": names["stream"], "block_ms": 1000},
        critic={"init_dir": base})
    assert "critic.init_model: model 'no-rm' has no active version" in check(
        source={"type": "stream", "stream": names["stream"], "block_ms": 1000},
        critic={"init_model": "no-rm"})
    assert r.zcard("rlhf:jobs") == before and r.llen("train.ppo") == 0  # nothing queued


# ------------------------------------------------------------------------------------------------
# the job on a worker
# ------------------------------------------------------------------------------------------------

JOB = dict(ppo_epochs=1, minibatch_size=8, learning_rate=1e-3, value_learning_rate=1e-3)


@pytest.fixture
def wenv(tmp_path, tiny_policy_dir):
    """A store with the tiny policy as the model's first, active version; unique names;
    afterwards every worker is stopped and every key deleted."""
    r = connect(WORKER_REDIS_URL)
    celery_keys(r)
    store = ModelStore(tmp_path / "store")
    model = unique("ppo")
    m = store.publish(model, tiny_policy_dir, kind="policy")
    tc = TrainingClient(WORKER_REDIS_URL)
    Registry(tc.r).register(model, m.version, m.created)
    Registry(tc.r).activate(model, m.version)
    ctx = {"r": r, "store": store, "model": model, "base": m.version, "tc": tc, "workers": [],
           "stream": unique("test:samples"), "tmp": tmp_path}

    ctx["start"] = worker_starter(ctx["workers"], tmp_path, store=store.root)
    yield ctx
    for w in ctx["workers"]:
        w.stop()
    for job in tc.jobs(limit=1000):
        if job.spec.get("model_name") == model:
            forget_job(r, job.id)
    forget_model(r, model)
    delete_matching(r, f"{ctx['stream']}*")
    celery_keys(r)
    tc.close()
    r.close()


def message(rec: SampleRecord, model: str) -> samples_pb2.ScoredSample:
    """A SampleRecord as the rollout worker pushes it."""
    return samples_pb2.ScoredSample(
        id=rec.id, prompt_ids=rec.prompt_ids, completion_ids=rec.completion_ids,
        behaviour_logprobs=rec.behaviour_logprobs, reference_logprobs=rec.reference_logprobs,
        reward=rec.score, policy=common_pb2.ModelRef(name=model, version=rec.policy_version),
        group_id=rec.group_id,
        finish_reason=(common_pb2.FINISH_REASON_EOS if rec.ended
                       else common_pb2.FINISH_REASON_LENGTH))


def base_samples(wenv, reference, *, seed: int, tag: str, prompts=PROMPTS[:2]) -> list:
    base_dir = wenv["store"].path(wenv["model"], wenv["base"])
    return rollout(base_dir, wenv["base"], reference, seed=seed, tag=tag, prompts=prompts)


def test_a_ppo_job_on_the_worker_trains_once_on_fresh_samples_and_drops_stale_ones(
        wenv, reference):
    r, stream, model = wenv["r"], wenv["stream"], wenv["model"]
    fresh = base_samples(wenv, reference, seed=11, tag=unique("w"))  # 16 by the active version
    stale = [SampleRecord(**{**rec.__dict__, "id": rec.id + ":old", "policy_version": "v0000"})
             for rec in base_samples(wenv, reference, seed=12, tag=unique("s"),
                                     prompts=PROMPTS[2:3])[:4]]  # not the base, nor its parent
    pushed = push_at_once(r, [message(x, model) for x in fresh + stale], stream=stream)
    push_at_once(r, [message(fresh[0], model)], stream=stream)  # a producer retries: same id
    wenv["start"]("w1")
    job_id = wenv["tc"].submit_ppo(model_name=model, source={"type": "stream", "stream": stream},
                                   activate=True, **JOB)
    rec = wenv["tc"].wait(job_id, timeout=240, poll_s=0.2)
    assert (rec.status, rec.version, rec.attempts) == ("succeeded", "v0002", 1)
    assert rec.metrics["dropped_stale"] == 4 and rec.metrics["samples"] == 16
    assert rec.metrics["activated"] is True and rec.spec["type"] == "ppo"

    store = wenv["store"]
    manifest = store.verify(model, "v0002")  # value/ is inside, under the manifest's checksums
    assert manifest.parent == "v0001" and manifest.kind == "policy"
    assert {f"{VALUE_DIR}/config.json", f"{VALUE_DIR}/model.safetensors", CURVES_FILE,
            STATE_FILE} <= set(manifest.files)
    assert sorted(manifest.extra["applied_ids"]) == sorted(x.id for x in fresh)
    assert manifest.extra["dropped_stale_ids"] == sorted(x.id for x in stale)
    assert manifest.metrics["clip_fraction_first_step"] == 0.0
    assert manifest.metrics["critic"] == "policy" and manifest.probes["kind"] == "policy"
    assert len(load_curves(store.path(model, "v0002"))) == 2  # 16 samples, minibatches of 8
    assert r.xpending(stream, "ppo")["pending"] == 0  # everything acked: trained, stale, duplicate
    assert applied_ids(r, stream, "ppo") == {x.id for x in fresh}
    assert Registry(wenv["tc"].r).active(model) == "v0002"
    assert set(pushed) - {x.id for x in fresh} == {x.id for x in stale}

    # The same ids pushed again: acked as applied, never trained on; the job has nothing to do.
    push_at_once(r, [message(x, model) for x in fresh[:3]], stream=stream)
    job2 = wenv["tc"].submit_ppo(model_name=model, source={"type": "stream", "stream": stream},
                                 **JOB)
    rec2 = wenv["tc"].wait(job2, timeout=240, poll_s=0.2, raise_on_failure=False)
    assert rec2.status == "failed" and "gave 0 usable samples" in rec2.error
    assert store.versions(model) == ["v0001", "v0002"] and r.xpending(stream, "ppo")["pending"] == 0

    # The next job starts from v0002 and goes on with its critic; v0001's samples are one
    # version behind: fresh under max_staleness=1.
    more = base_samples(wenv, reference, seed=13, tag=unique("m"))
    push_at_once(r, [message(x, model) for x in more], stream=stream)
    job3 = wenv["tc"].submit_ppo(model_name=model, source={"type": "stream", "stream": stream},
                                 **JOB)
    rec3 = wenv["tc"].wait(job3, timeout=240, poll_s=0.2)
    assert rec3.version == "v0003" and rec3.metrics["dropped_stale"] == 0
    m3 = store.verify(model, "v0003")
    assert m3.parent == "v0002" and m3.metrics["critic"] == "base"


def test_a_worker_sigkilled_mid_ppo_job_loses_nothing_and_applies_nothing_twice(wenv, reference):
    """The job waits in its read of an empty stream; once it does, its pool child is paused
    (SIGSTOP) and the samples pushed: Redis hands them to the blocked read, the job can do
    nothing with them, and the whole worker is SIGKILLed. The next worker runs the job again
    from its pending entries."""
    from test_worker import wait_until_reading

    r, stream, model = wenv["r"], wenv["stream"], wenv["model"]
    samples = base_samples(wenv, reference, seed=21, tag=unique("k"))
    a = wenv["start"]("a")
    job_id = wenv["tc"].submit_ppo(model_name=model, activate=True, min_samples=16,
                                   source={"type": "stream", "stream": stream,
                                           "block_ms": 180_000}, **JOB)
    wait_until_reading({"r": r, "stream": stream}, job_id, group="ppo")
    (child,) = a.pool_children()
    os.kill(child, signal.SIGSTOP)
    pushed = push_at_once(r, [message(x, model) for x in samples], stream=stream)
    wait_for(lambda: r.xpending(stream, "ppo")["pending"] == 16, timeout=30,
             what="the samples to be delivered to the job's read")
    a.kill()
    assert wenv["tc"].status(job_id).status == "running"
    assert wenv["store"].versions(model) == ["v0001"]  # nothing published

    b = wenv["start"]("b")  # picks the job up once the visibility timeout has passed
    rec = wenv["tc"].wait(job_id, timeout=240, poll_s=0.2)
    assert (rec.status, rec.attempts, rec.worker) == ("succeeded", 2, "b@test")
    assert wenv["store"].versions(model) == ["v0001", "v0002"]  # exactly one version by the job
    manifest = wenv["store"].verify(model, "v0002")
    applied = manifest.extra["applied_ids"]
    assert len(applied) == len(set(applied)) == 16 and set(applied) == set(pushed)
    assert r.xpending(stream, "ppo")["pending"] == 0
    assert applied_ids(r, stream, "ppo") == set(pushed)
    assert f"job {job_id} (ppo): attempt 2 on b@test" in b.log()
    wait_for(lambda: r.llen("train.ppo") == 0, timeout=30, what="the queue to drain")
    assert wenv["store"].versions(model) == ["v0001", "v0002"]

"""Golden policy probes verified in one teacher-forced pass: the golden ids must be the argmax at
every position (exact ties accepted) and their log-probs the recorded ones — what the greedy
check proved, in one forward; the real model's answers agree with greedy decoding."""

from __future__ import annotations

import pytest
import torch

from rlhf.models.probes import PolicyProbeRunner, ProbeMismatch, check_probes

PROBES = {"kind": "policy", "prompts": [[1, 2], [3]], "greedy": [[5, 6, 7], [8]],
          "logprobs": [[-0.5, -0.25, -1.0], [-2.0]], "max_new_tokens": 3}


def _runner(rows, greedy=None):
    async def forced(prompts, completions):
        assert prompts == PROBES["prompts"] and completions == PROBES["greedy"]
        return rows

    async def no_greedy(prompts, max_new_tokens):
        raise AssertionError("the one-pass proof needs no greedy steps")

    return PolicyProbeRunner(greedy or no_greedy, forced)


def _rows(best_offsets=((0, 0, 0), (0,)), lp_offsets=((0, 0, 0), (0,))):
    return [[(lp + d, lp + d + b) for lp, d, b in zip(lps, ds, bs)]
            for lps, ds, bs in zip(PROBES["logprobs"], lp_offsets, best_offsets)]


async def test_the_golden_ids_as_argmax_with_their_log_probs_pass():
    await check_probes(PROBES, _runner(_rows()))
    await check_probes(PROBES, _runner(_rows(best_offsets=((0, 1e-7, 0), (0,)))))  # an exact tie


async def test_a_golden_token_that_is_not_the_argmax_is_refused_though_its_log_prob_matches():
    with pytest.raises(ProbeMismatch, match="probe 0: greedy token 2 .*not the argmax"):
        await check_probes(PROBES, _runner(_rows(best_offsets=((0, 0, 1e-3), (0,)))))


async def test_log_probs_off_the_recorded_ones_are_refused():
    with pytest.raises(ProbeMismatch, match=r"probe 1 log-probs\[0\]"):
        await check_probes(PROBES, _runner(_rows(lp_offsets=((0, 0, 0), (2e-4,)))))
    with pytest.raises(ProbeMismatch, match="positions"):
        await check_probes(PROBES, _runner([_rows()[0], []]))


async def test_low_precision_checks_the_first_id_and_every_log_prob():
    later = _rows(best_offsets=((0, 0.2, 0), (0,)))  # a later position flips: allowed, as greedy
    await check_probes(PROBES, _runner(later), dtype="bfloat16")
    with pytest.raises(ProbeMismatch, match="greedy token 0"):
        await check_probes(PROBES, _runner(_rows(best_offsets=((0.2, 0, 0), (0,)))), dtype="bfloat16")


async def test_a_plain_runner_still_runs_greedy():
    async def greedy(prompts, max_new_tokens):
        return [(ids, lps) for ids, lps in zip(PROBES["greedy"], PROBES["logprobs"])]

    await check_probes(PROBES, greedy)
    await check_probes(PROBES, PolicyProbeRunner(greedy))


async def test_on_a_real_model_the_one_pass_proof_agrees_with_greedy(tiny_policy_dir, tiny_policy_dir_b):
    from rlhf.models.loading import load_causal_lm
    from rlhf.models.probes import compute_probes
    from rlhf.policy.engines.hf import _forced

    probes = compute_probes("policy", tiny_policy_dir)
    for model_dir, ok in ((tiny_policy_dir, True), (tiny_policy_dir_b, False)):
        loaded = type("L", (), {"model": load_causal_lm(model_dir), "device": torch.device("cpu")})

        async def forced(prompts, completions, loaded=loaded):
            return _forced(loaded, prompts, completions)

        run = PolicyProbeRunner(None, forced)
        if ok:
            await check_probes(probes, run)
        else:  # other weights: refused, as the greedy check refuses them
            with pytest.raises(ProbeMismatch):
                await check_probes(probes, run)

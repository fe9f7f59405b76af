"""The PPO job spec: typed, validated once, every rejection naming its field (as DPO's do).

No Redis (torch only for the score shaping the spec's fields select): `parse_spec` is what
`submit_job` runs first, so a spec rejected here never
reaches the queue. The Literals the spec is typed with are the keys of the math registries
(rlhf.trainer.advantages / ppo_losses); a test keeps them equal.
"""

from __future__ import annotations

from typing import get_args

import pytest

from rlhf.trainer.jobs import (
    GROUP_ESTIMATORS,
    JOB_TYPES,
    AdvantageEstimator,
    JobRejected,
    KLEstimator,
    LossAggregation,
    PPOJob,
    parse_spec,
)

GOOD = {"type": "ppo", "model_name": "policy", "source": {"type": "stream"}}


def reject(**changes) -> str:
    with pytest.raises(JobRejected) as err:
        parse_spec({**GOOD, **changes})
    return str(err.value)


def test_good_defaults():
    spec = parse_spec(GOOD)
    assert isinstance(spec, PPOJob) and JOB_TYPES["ppo"] is PPOJob
    assert (spec.advantage_estimator, spec.kl_estimator, spec.kl_in) == ("gae", "k1", "reward")
    assert (spec.kl_coef, spec.kl_target, spec.kl_horizon) == (0.05, None, 10_000)
    assert (spec.gamma, spec.lam, spec.whiten_advantages, spec.whiten_rewards) == (1.0, 0.95, True,
                                                                                   False)
    assert (spec.clip_eps, spec.clip_high, spec.dual_clip, spec.value_clip_eps) == (0.2, 0.2, None,
                                                                                    0.2)
    assert (spec.vf_coef, spec.entropy_coef, spec.ppo_epochs, spec.max_staleness) == \
        (0.1, 0.0, 4, 1)
    assert spec.aggregation == "token-mean" and spec.uses_critic
    source = spec.source
    assert (source.type, source.stream, source.group) == ("stream", "rlhf:queue:samples", "ppo")
    assert not spec.critic.is_set
    # the snapshot a job record keeps parses back to the same spec
    assert parse_spec(spec.model_dump(mode="json")) == spec


def test_dr_grpo_defaults_to_the_constant_normaliser_and_others_to_token_mean():
    assert parse_spec({**GOOD, "advantage_estimator": "dr_grpo", "group_size": 4}).aggregation == \
        "seq-mean-token-sum-norm"
    for est in ("gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"):
        assert parse_spec({**GOOD, "advantage_estimator": est, "group_size": 4}).aggregation == \
            "token-mean"
    chosen = parse_spec({**GOOD, "advantage_estimator": "dr_grpo", "group_size": 4,
                         "loss_aggregation": "token-mean"})
    assert chosen.aggregation == "token-mean"  # an explicit choice wins
    normed = parse_spec({**GOOD, "advantage_estimator": "dr_grpo", "group_size": 4,
                         "max_new_tokens_norm": 256})
    assert normed.max_new_tokens_norm == 256


def test_asymmetric_clipping_and_an_adaptive_beta_are_accepted():
    spec = parse_spec({**GOOD, "clip_eps": 0.2, "clip_eps_high": 0.28, "dual_clip": 3,
                       "kl_target": 6.0, "kl_coef": 0.1, "critic": {"init_model": "rm"}})
    assert (spec.clip_eps, spec.clip_high, spec.dual_clip, spec.kl_target) == (0.2, 0.28, 3.0, 6.0)
    assert spec.critic.is_set and spec.critic.init_version is None


@pytest.mark.parametrize("changes,message", [
    (dict(advantage_estimator="a2c"), "advantage_estimator: Input should be 'gae', 'grpo', "
     "'dr_grpo', 'rloo', 'reinforce_pp' or 'reinforce_pp_baseline'"),
    (dict(kl_estimator="k4"), "kl_estimator: Input should be 'k1', 'k2' or 'k3'"),
    (dict(kl_in="advantage"), "kl_in: Input should be 'reward' or 'loss'"),
    (dict(gamma=1.5), "gamma: Input should be less than or equal to 1"),
    (dict(gamma=-0.1), "gamma: Input should be greater than or equal to 0"),
    (dict(lam=2), "lam: Input should be less than or equal to 1"),
    (dict(clip_eps=0), "clip_eps: Input should be greater than 0"),
    (dict(clip_eps=-0.2), "clip_eps: Input should be greater than 0"),
    (dict(clip_eps_high=0), "clip_eps_high: Input should be greater than 0"),
    (dict(dual_clip=1.0), "dual_clip: Input should be greater than 1"),
    (dict(value_clip_eps=0), "value_clip_eps: Input should be greater than 0"),
    (dict(kl_coef=-0.01), "kl_coef: Input should be greater than or equal to 0"),
    (dict(kl_target=0), "kl_target: Input should be greater than 0"),
    (dict(ppo_epochs=0), "ppo_epochs: Input should be greater than or equal to 1"),
    (dict(minibatch_size=0), "minibatch_size: Input should be greater than or equal to 1"),
    (dict(learning_rate=0), "learning_rate: Input should be greater than 0"),
    (dict(max_staleness=-1), "max_staleness: Input should be greater than or equal to 0"),
    (dict(reward_clip=0), "reward_clip: Input should be greater than 0"),
    (dict(loss_aggregation="sum"), "loss_aggregation: Input should be 'token-mean', "
     "'seq-mean-token-mean' or 'seq-mean-token-sum-norm'"),
    (dict(source={"type": "stream", "group": "bad group"}), "source.stream.group: String should "
     "match pattern"),
    (dict(critic={"init_dir": "/x", "init_model": "rm"}), "critic: Value error, set init_dir or "
     "init_model, not both"),
    (dict(critic={"init_version": "v0001"}), "critic: Value error, init_version needs init_model"),
    (dict(model_name=None), "model_name"),
    (dict(surprise=1), "surprise: Extra inputs are not permitted"),
])
def test_a_bad_field_is_rejected_naming_it(changes, message):
    text = reject(**changes)
    assert text.startswith("ppo job spec rejected:\n") and message in text, text


@pytest.mark.parametrize("estimator", sorted(GROUP_ESTIMATORS))
def test_a_group_estimator_with_groups_of_one_is_rejected_naming_group_size(estimator):
    text = reject(advantage_estimator=estimator)  # group_size defaults to 1
    assert f"  group_size: advantage_estimator {estimator!r} compares the samples of one prompt: " \
           "it needs group_size ≥ 2, got 1" in text
    assert parse_spec({**GOOD, "advantage_estimator": estimator, "group_size": 2}).group_size == 2


def test_groups_of_one_are_fine_for_the_estimators_that_do_not_compare():
    for est in ("gae", "reinforce_pp"):
        assert parse_spec({**GOOD, "advantage_estimator": est}).group_size == 1


@pytest.mark.parametrize("changes,line", [
    (dict(base_dir="/m", base_version="v0001"), "  base_version: set base_dir or base_version, "
     "not both"),
    (dict(kl_target=6.0, kl_coef=0), "  kl_coef: an adaptive β (kl_target set) starts from "
     "kl_coef > 0"),
    (dict(advantage_estimator="reinforce_pp", critic={"init_dir": "/rm"}), "  critic: only "
     "advantage_estimator 'gae' uses a critic, not 'reinforce_pp'"),
    (dict(max_new_tokens_norm=64), "  max_new_tokens_norm: applies to loss_aggregation "
     "'seq-mean-token-sum-norm' only, not 'token-mean'"),
    (dict(adam_betas=(0.9, 1.0)), "  adam_betas: must both lie in [0, 1)"),
    (dict(missing_eos_penalty=-1.0, missing_eos_score=-2.0), "  missing_eos_score: set "
     "missing_eos_penalty (added to the score) or missing_eos_score (replaces it), not both"),
])
def test_cross_field_rules_name_their_field(changes, line):
    assert line in reject(**changes)


def test_every_cross_field_problem_is_reported_at_once():
    text = reject(advantage_estimator="rloo", kl_target=1.0, kl_coef=0, base_dir="/m",
                  base_version="v1")
    assert "  group_size:" in text and "  kl_coef:" in text and "  base_version:" in text


def test_the_literals_are_the_registries_keys():
    pytest.importorskip("torch")
    from rlhf.trainer import advantages, ppo_losses

    assert set(get_args(AdvantageEstimator)) == set(advantages.ESTIMATORS)
    assert set(get_args(KLEstimator)) == set(advantages.KL_ESTIMATORS)
    assert set(get_args(LossAggregation)) == set(ppo_losses.LOSS_AGGREGATIONS)
    assert GROUP_ESTIMATORS == advantages.GROUP_ESTIMATORS


def test_the_job_routes_to_its_own_task_and_queue():
    pytest.importorskip("celery")
    from rlhf.trainer.celery_app import QUEUE_FOR_TASK, QUEUES, TASK_FOR_JOB

    assert TASK_FOR_JOB["ppo"] == "rlhf.train_ppo"
    assert QUEUE_FOR_TASK["rlhf.train_ppo"] == "train.ppo" and "train.ppo" in QUEUES


@pytest.mark.parametrize("changes,expected", [
    (dict(), [2.0, -1.0, 0.5, 3.0]),
    (dict(missing_eos_penalty=-1.0), [2.0, -2.0, 0.5, 2.0]),  # the two that did not end
    (dict(missing_eos_score=-5.0), [2.0, -5.0, 0.5, -5.0]),
    (dict(missing_eos_penalty=-1.0, reward_clip=1.5), [1.5, -1.5, 0.5, 1.5]),
])
def test_scores_are_shaped_by_the_eos_rule_then_clipped(changes, expected):
    import torch

    from rlhf.trainer.ppo import shape_scores

    scores = torch.tensor([2.0, -1.0, 0.5, 3.0])
    ended = torch.tensor([True, False, True, False])
    spec = parse_spec({**GOOD, **changes})
    assert shape_scores(scores, ended, spec).tolist() == expected
    assert scores.tolist() == [2.0, -1.0, 0.5, 3.0]  # the input is left as it was


def test_whitened_rewards_keep_the_mean_and_have_unit_variance():
    import torch

    from rlhf.trainer.ppo import shape_scores

    scores = torch.tensor([2.0, -1.0, 0.5, 3.0], dtype=torch.float64)
    out = shape_scores(scores, torch.ones(4, dtype=torch.bool),
                       parse_spec({**GOOD, "whiten_rewards": True}))
    assert float(out.mean()) == pytest.approx(float(scores.mean()))
    assert float(out.var()) == pytest.approx(1.0, rel=1e-6)

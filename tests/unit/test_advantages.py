"""KL estimators, token rewards, returns, GAE, group baselines and every advantage estimator
against float64 references written the naive way (python loops over rows and tokens), on random
right-padded masks with rows of length 1 and groups of one."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from rlhf.trainer.advantages import (  # noqa: E402
    CRITIC_ESTIMATORS,
    ESTIMATOR_NAMES,
    ESTIMATORS,
    GROUP_ESTIMATORS,
    GROUP_KINDS,
    KL_ESTIMATOR_NAMES,
    KL_ESTIMATORS,
    AdaptiveKLController,
    AdvantageInputs,
    FixedKLController,
    compute_advantages,
    discounted_returns,
    gae,
    group_scores,
    kl_controller,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
    masked_mean,
    masked_whiten,
    token_rewards,
)

from padded import F64, lengths, mask_of, rand, with_garbage  # noqa: E402

B, T = 13, 9


# --- random inputs ---------------------------------------------------------------------------


def groups(rng: random.Random, b: int = B) -> list[int]:
    """Non-contiguous group ids in shuffled order: groups of one, two and more."""
    ids = [7, 7, 7, 7, 3, 3, 42, 100, 100, 100, 5, 5, 5][:b]
    ids += [1000 + i for i in range(b - len(ids))]
    rng.shuffle(ids)
    return ids


# --- naive references (floats, loops) --------------------------------------------------------


def naive_token_rewards(scores, kl, ls, beta):
    out = [[0.0] * T for _ in ls]
    for i, n in enumerate(ls):
        for t in range(n):
            out[i][t] = -beta * kl[i][t]
        if n:
            out[i][n - 1] += scores[i]
    return out


def naive_discounted(rewards, ls, gamma):
    out = [[0.0] * T for _ in ls]
    for i, n in enumerate(ls):
        g = 0.0
        for t in reversed(range(n)):
            g = rewards[i][t] + gamma * g
            out[i][t] = g
    return out


def naive_gae(rewards, values, ls, gamma, lam):
    adv = [[0.0] * T for _ in ls]
    ret = [[0.0] * T for _ in ls]
    for i, n in enumerate(ls):
        a = 0.0
        for t in reversed(range(n)):
            v_next = values[i][t + 1] if t + 1 < n else 0.0
            delta = rewards[i][t] + gamma * v_next - values[i][t]
            a = delta + gamma * lam * a
            adv[i][t] = a
            ret[i][t] = a + values[i][t]
    return adv, ret


def naive_whiten(x, ls, shift_mean=True, eps=1e-8):
    real = [x[i][t] for i, n in enumerate(ls) for t in range(n)]
    mean = sum(real) / len(real)
    var = sum((v - mean) ** 2 for v in real) / (len(real) - 1) if len(real) > 1 else 0.0
    out = [[0.0] * T for _ in ls]
    for i, n in enumerate(ls):
        for t in range(n):
            out[i][t] = (x[i][t] - mean) / math.sqrt(var + eps) + (0.0 if shift_mean else mean)
    return out


def naive_group_scores(scores, gids, kind):
    out = []
    for i, r in enumerate(scores):
        members = [scores[j] for j in range(len(scores)) if gids[j] == gids[i]]
        others = [scores[j] for j in range(len(scores)) if gids[j] == gids[i] and j != i]
        n, mean = len(members), sum(members) / len(members)
        if kind == "grpo":
            if n == 1:
                out.append(0.0)
                continue
            std = math.sqrt(sum((m - mean) ** 2 for m in members) / (n - 1))
            out.append((r - mean) / (std + 1e-6))
        elif kind in ("dr_grpo", "reinforce_pp_baseline"):
            out.append(r - mean)
        elif kind == "rloo":
            out.append(r - sum(others) / len(others) if others else 0.0)
        elif kind == "reinforce_pp":
            out.append(r)
    return out


def naive_estimator(kind, scores, kl_rewards, ls, gids, values, gamma, lam, whiten):
    """(advantages, returns | None) as lists, straight from the contract."""
    if kind == "gae":
        rewards = naive_token_rewards(scores, [[-x for x in row] for row in kl_rewards], ls, 1.0)
        adv, ret = naive_gae(rewards, values, ls, gamma, lam)
        return (naive_whiten(adv, ls) if whiten else adv), ret
    shaped = naive_group_scores(scores, gids, kind)
    rewards = naive_token_rewards(shaped, [[-x for x in row] for row in kl_rewards], ls, 1.0)
    adv = naive_discounted(rewards, ls, gamma)
    if whiten or kind.startswith("reinforce_pp"):
        adv = naive_whiten(adv, ls)
    return adv, None


def assert_close(got: torch.Tensor, want, tol=1e-10):
    want = torch.tensor(want, dtype=F64)
    assert got.shape == want.shape
    err = (got.double() - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), err


# --- KL estimators ---------------------------------------------------------------------------


def test_each_kl_estimator_matches_its_formula_including_the_k3_clamp():
    rng = random.Random(1)
    logp = rand(rng, B, T, scale=3.0)
    ref = rand(rng, B, T, scale=3.0)
    logp[0, 0], ref[0, 0] = -30.0, 0.0  # d = −30: k3 clamps d to −10 (e^{30} would dominate)
    logp[1, 1], ref[1, 1] = 0.0, -25.0  # d = +25: clamped to +10
    got = {k: kl_penalty(logp, ref, k) for k in KL_ESTIMATOR_NAMES}
    for i in range(B):
        for t in range(T):
            d = float(logp[i, t]) - float(ref[i, t])
            dc = min(max(d, -10.0), 10.0)
            want = {"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-dc) - 1 + dc}
            for k, w in want.items():
                assert abs(float(got[k][i, t]) - w) <= 1e-12 * max(1.0, abs(w)), (k, i, t)
    assert float(got["k3"][0, 0]) == pytest.approx(math.exp(10) - 11)
    assert float(got["k3"][1, 1]) == pytest.approx(math.exp(-10) + 9)
    assert (got["k2"] >= 0).all() and (got["k3"] >= 0).all()
    unclamped = kl_k3(logp, ref, clamp=None)
    assert float(unclamped[0, 0]) == pytest.approx(math.exp(30) - 31)
    assert torch.equal(kl_k1(logp, ref), got["k1"]) and torch.equal(kl_k2(logp, ref), got["k2"])
    with pytest.raises(ValueError, match="unknown kl_estimator 'k4'"):
        kl_penalty(logp, ref, "k4")


def test_kl_estimators_keep_the_float_dtype():
    x = torch.randn(3, 4, dtype=torch.float32)
    for fn in KL_ESTIMATORS.values():
        assert fn(x, x * 0.5).dtype == torch.float32


# --- token rewards, returns, GAE -------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.05, 0.7])
def test_token_rewards_put_minus_beta_kl_on_tokens_and_the_score_on_the_last_one(beta):
    rng = random.Random(2)
    ls = lengths(rng, B, T)
    ls[3] = 0  # a row with no completion token gets nothing
    mask = mask_of(ls, T)
    scores, kl = rand(rng, B, scale=2.0), rand(rng, B, T)
    got = token_rewards(scores, with_garbage(kl, mask, rng), mask, beta)
    assert_close(got, naive_token_rewards(scores.tolist(), kl.tolist(), ls, beta), 1e-12)
    assert not got[3].any()
    assert torch.equal(token_rewards(scores, kl, mask.bool(), beta), got)


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_discounted_returns_match_the_naive_sum_and_ignore_padding(gamma):
    rng = random.Random(3)
    ls = lengths(rng, B, T)
    mask = mask_of(ls, T)
    rewards = rand(rng, B, T)
    got = discounted_returns(with_garbage(rewards, mask, rng), mask, gamma)
    assert_close(got, naive_discounted(rewards.tolist(), ls, gamma))


def test_a_padded_position_inside_a_row_is_not_a_time_step():
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=F64)
    rewards = torch.tensor([[1.0, math.nan, 2.0, 5.0]], dtype=F64)
    values = torch.tensor([[0.5, math.nan, 0.25, 9.0]], dtype=F64)
    assert discounted_returns(rewards, mask, 0.5).tolist() == [[1.0 + 0.5 * 2.0, 0.0, 2.0, 0.0]]
    adv, ret = gae(rewards, values, mask, 0.5, 1.0)
    a2 = 2.0 - 0.25
    assert adv.tolist() == [[1.0 + 0.5 * 0.25 - 0.5 + 0.5 * a2, 0.0, a2, 0.0]]
    assert ret.tolist() == [[adv[0, 0].item() + 0.5, 0.0, 2.0, 0.0]]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (1.0, 1.0)])
def test_gae_matches_the_naive_recursion(gamma, lam):
    rng = random.Random(4)
    ls = lengths(rng, B, T)
    mask = mask_of(ls, T)
    rewards, values = rand(rng, B, T), rand(rng, B, T)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    want_adv, want_ret = naive_gae(rewards.tolist(), values.tolist(), ls, gamma, lam)
    assert_close(adv, want_adv)
    assert_close(ret, want_ret)
    if gamma == lam == 1.0:  # λ = γ = 1: A_t = Σ_{k≥t} r_k − V_t (Monte-Carlo)
        mc = discounted_returns(rewards, mask, 1.0)
        assert torch.allclose(adv, mc - values * mask)


def test_gae_values_and_rewards_at_padded_positions_change_nothing():
    rng = random.Random(5)
    ls = lengths(rng, B, T)
    mask = mask_of(ls, T)
    rewards, values = rand(rng, B, T), rand(rng, B, T)
    clean = gae(rewards, values, mask, 0.99, 0.95)
    for _ in range(3):
        dirty = gae(with_garbage(rewards, mask, rng), with_garbage(values, mask, rng),
                    mask.bool(), 0.99, 0.95)
        for c, d in zip(clean, dirty):
            assert torch.equal(c, d)
            assert not d[~mask.bool()].any()


def test_gae_in_float32_matches_float64():
    rng = random.Random(6)
    ls = lengths(rng, B, T)
    mask = mask_of(ls, T)
    rewards, values = rand(rng, B, T), rand(rng, B, T)
    a64, r64 = gae(rewards, values, mask, 0.99, 0.95)
    a32, r32 = gae(rewards.float(), values.float(), mask.float(), 0.99, 0.95)
    assert a32.dtype == r32.dtype == torch.float32
    assert torch.allclose(a32.double(), a64, atol=1e-5) and torch.allclose(r32.double(), r64,
                                                                           atol=1e-5)


# --- masked statistics -----------------------------------------------------------------------


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_mean_and_whiten_use_real_tokens_only_with_the_unbiased_variance(shift_mean):
    rng = random.Random(7)
    ls = lengths(rng, B, T)
    mask = mask_of(ls, T)
    x = rand(rng, B, T, scale=3.0) + 1.5
    dirty = with_garbage(x, mask, rng)
    real = [float(x[i, t]) for i, n in enumerate(ls) for t in range(n)]
    assert float(masked_mean(dirty, mask)) == pytest.approx(sum(real) / len(real), rel=1e-12)
    rows = masked_mean(dirty, mask, dim=1)
    assert_close(rows, [sum(float(x[i, t]) for t in range(n)) / n for i, n in enumerate(ls)])
    got = masked_whiten(dirty, mask, shift_mean=shift_mean)
    assert_close(got, naive_whiten(x.tolist(), ls, shift_mean), 1e-9)
    if shift_mean:
        assert abs(float(masked_mean(got, mask))) < 1e-12
        real_w = got[mask.bool()]
        assert float(real_w.var(unbiased=True)) == pytest.approx(1.0, rel=1e-6)


def test_whitening_one_real_token_gives_zero_not_nan():
    mask = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)
    out = masked_whiten(torch.tensor([[5.0, math.nan, 1.0]], dtype=F64), mask)
    assert torch.equal(out, torch.zeros(1, 3, dtype=F64))
    assert float(masked_mean(torch.ones(2, 2), torch.zeros(2, 2))) == 0.0


# --- group baselines -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", GROUP_KINDS)
def test_group_scores_match_the_naive_baselines(kind):
    rng = random.Random(8)
    scores = rand(rng, B, scale=2.0)
    gids = groups(rng)
    got = group_scores(scores, torch.tensor(gids), kind)
    assert_close(got, naive_group_scores(scores.tolist(), gids, kind), 1e-9)
    singles = [i for i, g in enumerate(gids) if gids.count(g) == 1]
    assert singles
    if kind in ("grpo", "rloo", "dr_grpo", "reinforce_pp_baseline"):
        assert all(float(got[i]) == 0.0 for i in singles)


def test_grpo_group_with_equal_scores_and_rloo_closed_form():
    scores = torch.tensor([2.0, 2.0, 2.0, 1.0, 3.0], dtype=F64)
    gids = torch.tensor([0, 0, 0, 1, 1])
    assert torch.equal(group_scores(scores, gids, "grpo")[:3], torch.zeros(3, dtype=F64))
    # pair (1, 3): mean 2, unbiased std √2; RLOO: 1 − 3 and 3 − 1
    g = group_scores(scores, gids, "grpo")[3:]
    assert g.tolist() == pytest.approx([-1 / (math.sqrt(2) + 1e-6), 1 / (math.sqrt(2) + 1e-6)])
    assert group_scores(scores, gids, "rloo")[3:].tolist() == pytest.approx([-2.0, 2.0])
    with pytest.raises(ValueError, match="unknown group kind 'ppo'"):
        group_scores(scores, gids, "ppo")


# --- advantage estimators --------------------------------------------------------------------


def estimator_inputs(seed: int, gamma: float, lam: float, whiten: bool):
    rng = random.Random(seed)
    ls = lengths(rng, B, T)
    mask = mask_of(ls, T)
    scores = rand(rng, B, scale=2.0)
    kl_rewards = rand(rng, B, T, scale=0.05) * mask
    values = rand(rng, B, T)
    gids = groups(rng)
    inputs = AdvantageInputs(
        scores=scores, kl_rewards=with_garbage(kl_rewards, mask, rng), mask=mask,
        group=torch.tensor(gids), values=with_garbage(values, mask, rng), gamma=gamma, lam=lam,
        whiten=whiten,
    )
    return inputs, (scores.tolist(), kl_rewards.tolist(), ls, gids, values.tolist())


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
@pytest.mark.parametrize("kind", ESTIMATOR_NAMES)
def test_each_estimator_matches_its_naive_reference(kind, gamma, lam, whiten):
    inputs, (scores, klr, ls, gids, values) = estimator_inputs(9, gamma, lam, whiten)
    adv, ret = ESTIMATORS[kind](inputs)
    want_adv, want_ret = naive_estimator(kind, scores, klr, ls, gids, values, gamma, lam, whiten)
    assert_close(adv, want_adv, 1e-8)
    if kind in CRITIC_ESTIMATORS:
        assert_close(ret, want_ret, 1e-10)
    else:
        assert ret is None
    assert torch.equal(compute_advantages(kind, inputs)[0], adv)
    assert not adv[~inputs.mask.bool()].any()


def test_gae_returns_are_advantages_plus_values_before_whitening():
    inputs, _ = estimator_inputs(10, 0.99, 0.95, whiten=True)
    adv_w, ret = ESTIMATORS["gae"](inputs)
    raw = replace(inputs, whiten=False)
    adv, ret2 = ESTIMATORS["gae"](raw)
    m = inputs.mask.bool()
    assert torch.equal(ret, ret2)
    assert torch.allclose(ret[m], (adv + inputs.values)[m])
    assert torch.allclose(adv_w, masked_whiten(adv, m))


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_a_group_of_one_has_zero_advantage_under_grpo_and_rloo(kind):
    rng = random.Random(11)
    ls = lengths(rng, 4, T)
    mask = mask_of(ls, T)
    inputs = AdvantageInputs(scores=torch.tensor([5.0, 1.0, 2.0, -3.0], dtype=F64),
                             kl_rewards=torch.zeros(4, T, dtype=F64), mask=mask,
                             group=torch.tensor([0, 1, 1, 2]), whiten=False)
    adv, _ = ESTIMATORS[kind](inputs)
    assert not adv[0].any() and not adv[3].any()
    assert adv[1, ls[1] - 1] < 0 < adv[2, ls[2] - 1]


@pytest.mark.parametrize("kind", ["reinforce_pp", "reinforce_pp_baseline"])
def test_reinforce_pp_is_always_batch_whitened(kind):
    inputs, _ = estimator_inputs(12, 1.0, 1.0, whiten=False)
    adv, _ = ESTIMATORS[kind](inputs)
    real = adv[inputs.mask.bool()]
    assert abs(float(real.mean())) < 1e-12
    assert float(real.var(unbiased=True)) == pytest.approx(1.0, rel=1e-6)


def test_reinforce_pp_baseline_subtracts_the_group_mean_before_whitening():
    # Two groups whose scores differ by a constant offset: with the baseline the offset is gone.
    mask = torch.ones(4, 1, dtype=F64)
    zeros = torch.zeros(4, 1, dtype=F64)
    group = torch.tensor([0, 0, 1, 1])
    scores = torch.tensor([1.0, 3.0, 11.0, 13.0], dtype=F64)
    base, _ = ESTIMATORS["reinforce_pp_baseline"](AdvantageInputs(scores, zeros, mask, group))
    plain, _ = ESTIMATORS["reinforce_pp"](AdvantageInputs(scores, zeros, mask, group))
    assert base[:, 0].tolist() == pytest.approx([-math.sqrt(0.75), math.sqrt(0.75)] * 2)
    assert plain[0, 0] < plain[1, 0] < plain[2, 0] < plain[3, 0]


def test_estimators_refuse_missing_inputs_and_unknown_names():
    inputs, _ = estimator_inputs(13, 1.0, 0.95, True)
    no_values = replace(inputs, values=None)
    with pytest.raises(ValueError, match="'gae' estimator needs values"):
        ESTIMATORS["gae"](no_values)
    no_group = replace(inputs, group=None)
    for kind in GROUP_ESTIMATORS:
        with pytest.raises(ValueError, match="needs group ids"):
            ESTIMATORS[kind](no_group)
    ungrouped, _ = ESTIMATORS["reinforce_pp"](no_group)  # REINFORCE++ has no baseline
    assert torch.equal(ungrouped, ESTIMATORS["reinforce_pp"](inputs)[0])
    with pytest.raises(ValueError, match="unknown advantage_estimator 'ppo'"):
        compute_advantages("ppo", inputs)


def test_functions_do_not_modify_their_inputs():
    inputs, _ = estimator_inputs(14, 0.99, 0.95, True)
    before = {k: v.clone() for k, v in vars(inputs).items() if isinstance(v, torch.Tensor)}
    for kind in ESTIMATOR_NAMES:
        ESTIMATORS[kind](inputs)
    token_rewards(inputs.scores, inputs.kl_rewards, inputs.mask, 0.1)
    masked_whiten(inputs.values, inputs.mask)
    for k, v in before.items():
        torch.testing.assert_close(getattr(inputs, k), v, rtol=0, atol=0, equal_nan=True)


# --- registries ------------------------------------------------------------------------------


def test_the_registries_name_the_contracts_estimators():
    assert set(KL_ESTIMATORS) == set(KL_ESTIMATOR_NAMES) == {"k1", "k2", "k3"}
    assert set(ESTIMATORS) == set(ESTIMATOR_NAMES) == {
        "gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"}
    assert CRITIC_ESTIMATORS == {"gae"}
    assert GROUP_ESTIMATORS == {"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"}
    assert set(GROUP_KINDS) == set(ESTIMATOR_NAMES) - CRITIC_ESTIMATORS


# --- KL controllers --------------------------------------------------------------------------


@pytest.mark.parametrize("kl,n", [(0.1, 256), (0.06, 64), (0.01, 512), (5.0, 128), (0.0, 32)])
def test_adaptive_kl_controller_follows_its_formula_with_the_clip(kl, n):
    ctl = AdaptiveKLController(0.05, target=0.05, horizon=10000)
    beta = 0.05
    for _ in range(3):
        ctl.update(kl, n)
        beta *= 1 + min(max(kl / 0.05 - 1, -0.2), 0.2) * n / 10000
        assert ctl.value == pytest.approx(beta, rel=1e-12)
    if kl > 0.06:  # error clipped to +0.2
        assert ctl.value == pytest.approx(0.05 * (1 + 0.2 * n / 10000) ** 3)
    if kl < 0.04:  # error clipped to −0.2
        assert ctl.value == pytest.approx(0.05 * (1 - 0.2 * n / 10000) ** 3)


def test_fixed_kl_controller_and_the_factory():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 10**6)
    assert fixed.value == 0.1
    assert isinstance(kl_controller(0.1), FixedKLController)
    adaptive = kl_controller(0.1, target=6.0, horizon=100)
    assert isinstance(adaptive, AdaptiveKLController) and adaptive.value == 0.1
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=100)

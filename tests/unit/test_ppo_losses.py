"""PPO losses, aggregations and diagnostics against float64 references written the naive way
(python loops over rows and tokens), on random right-padded masks with rows of length 1."""

from __future__ import annotations

import math
import random

import pytest

torch = pytest.importorskip("torch")

from rlhf.trainer.ppo_losses import (  # noqa: E402
    LOSS_AGGREGATION_NAMES,
    LOSS_AGGREGATIONS,
    aggregate,
    entropy_from_logits,
    explained_variance,
    policy_loss,
    value_loss,
)

from padded import F64, lengths, mask_of, rand, with_garbage  # noqa: E402

B, T = 11, 8


# --- naive references ------------------------------------------------------------------------


def naive_aggregate(loss, ls, mode, norm=None):
    if mode == "token-mean":
        return sum(loss[i][t] for i, n in enumerate(ls) for t in range(n)) / sum(ls)
    if mode == "seq-mean-token-mean":
        return sum(sum(loss[i][t] for t in range(n)) / n for i, n in enumerate(ls)) / len(ls)
    norm = T if norm is None else norm
    return sum(sum(loss[i][t] for t in range(n)) / norm for i, n in enumerate(ls)) / len(ls)


def naive_policy_token(lp, old, a, lo, hi, dual):
    """(loss, clipped term strictly larger, ratio, k3) of one token."""
    rho = math.exp(lp - old)
    unclipped = -a * rho
    clipped = -a * min(max(rho, 1 - lo), 1 + hi)
    loss = max(unclipped, clipped)
    if dual is not None and a < 0:
        loss = min(loss, -dual * a)
    return loss, clipped > unclipped, rho, (rho - 1) - math.log(rho)


def naive_policy(logp, old, adv, ls, lo, hi, dual):
    losses = [[0.0] * T for _ in ls]
    clipped = ratios = kls = 0.0
    for i, n in enumerate(ls):
        for t in range(n):
            loss, c, rho, k = naive_policy_token(logp[i][t], old[i][t], adv[i][t], lo, hi, dual)
            losses[i][t] = loss
            clipped, ratios, kls = clipped + c, ratios + rho, kls + k
    n = sum(ls)
    return losses, {"clip_fraction": clipped / n, "approx_kl": kls / n, "ratio_mean": ratios / n}


def one_token(rho: float, a: float, **kw) -> tuple[float, dict[str, float]]:
    """policy_loss of a single token with ratio ρ and advantage A."""
    logp = torch.tensor([[math.log(rho)]], dtype=F64)
    loss, stats = policy_loss(logp, torch.zeros(1, 1, dtype=F64), torch.tensor([[a]], dtype=F64),
                              torch.ones(1, 1, dtype=F64), **kw)
    return float(loss), stats


# --- aggregation -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode,norm", [("token-mean", None), ("seq-mean-token-mean", None),
                                       ("seq-mean-token-sum-norm", None),
                                       ("seq-mean-token-sum-norm", 50.0)])
def test_each_aggregation_matches_its_naive_reduction(mode, norm):
    rng = random.Random(1)
    ls = lengths(rng, B, T)
    mask = mask_of(ls, T)
    loss = rand(rng, B, T)
    got = aggregate(with_garbage(loss, mask, rng), mask, mode, norm)
    assert got.shape == ()
    want = naive_aggregate(loss.tolist(), ls, mode, norm)
    assert float(got) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert torch.equal(LOSS_AGGREGATIONS[mode](loss, mask.bool(), norm), aggregate(loss, mask,
                                                                                    mode, norm))


def test_aggregations_weigh_tokens_and_sequences_differently():
    # row 0: one token of loss 1; row 1: three tokens of loss 0
    loss = torch.tensor([[1.0, 9.0, 9.0], [0.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    assert float(aggregate(loss, mask, "token-mean")) == pytest.approx(1 / 4)
    assert float(aggregate(loss, mask, "seq-mean-token-mean")) == pytest.approx(1 / 2)
    assert float(aggregate(loss, mask, "seq-mean-token-sum-norm")) == pytest.approx(1 / 6)
    assert float(aggregate(loss, mask, "seq-mean-token-sum-norm", norm=10)) == pytest.approx(1 / 20)
    # a row with no real token counts as a sequence of loss 0 (mean over all B rows)
    empty = torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert float(aggregate(loss, empty, "seq-mean-token-mean")) == pytest.approx(1 / 2)
    assert float(aggregate(loss, torch.zeros(2, 3), "token-mean")) == 0.0
    with pytest.raises(ValueError, match="unknown loss_aggregation 'sum'"):
        aggregate(loss, mask, "sum")


def test_the_registry_names_the_contracts_aggregations():
    assert set(LOSS_AGGREGATIONS) == set(LOSS_AGGREGATION_NAMES) == {
        "token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"}


# --- policy loss -----------------------------------------------------------------------------


def test_policy_loss_branches_token_by_token():
    eps = dict(clip_low=0.2, clip_high=0.2)
    # A > 0, ρ above 1 + ε_high: clipped at 1.2 (no gain from pushing ρ further)
    loss, st = one_token(1.5, 2.0, **eps)
    assert loss == pytest.approx(-2.0 * 1.2) and st["clip_fraction"] == 1.0
    # A < 0, ρ below 1 − ε_low: clipped at 0.8
    loss, st = one_token(0.5, -2.0, **eps)
    assert loss == pytest.approx(2.0 * 0.8) and st["clip_fraction"] == 1.0
    # inside the trust region: unclipped
    loss, st = one_token(1.1, 2.0, **eps)
    assert loss == pytest.approx(-2.0 * 1.1) and st["clip_fraction"] == 0.0
    # pessimistic side: A > 0 with ρ below 1 − ε, A < 0 with ρ above 1 + ε stay unclipped
    assert one_token(0.5, 2.0, **eps) == (pytest.approx(-1.0), pytest.approx(
        {"clip_fraction": 0.0, "approx_kl": -0.5 - math.log(0.5), "ratio_mean": 0.5}))
    loss, st = one_token(1.5, -2.0, **eps)
    assert loss == pytest.approx(3.0) and st["clip_fraction"] == 0.0


def test_asymmetric_clip_uses_eps_low_below_and_eps_high_above():
    kw = dict(clip_low=0.1, clip_high=0.28)
    assert one_token(1.5, 1.0, **kw)[0] == pytest.approx(-1.28)
    assert one_token(1.25, 1.0, **kw)[0] == pytest.approx(-1.25)  # inside 1 + 0.28
    assert one_token(0.5, -1.0, **kw)[0] == pytest.approx(0.9)
    assert one_token(0.85, -1.0, **kw)[0] == pytest.approx(0.9)  # below 1 − 0.1: clipped
    assert one_token(0.95, -1.0, **kw)[0] == pytest.approx(0.95)


def test_dual_clip_bounds_negative_advantages_only():
    # A < 0 and a huge ratio: max(10·|A|, 1.2·|A|) = 10|A|, the dual clip caps it at 3|A|
    assert one_token(10.0, -2.0)[0] == pytest.approx(20.0)
    assert one_token(10.0, -2.0, dual_clip=3.0)[0] == pytest.approx(6.0)
    # below the cap nothing changes
    assert one_token(2.0, -2.0, dual_clip=3.0)[0] == pytest.approx(4.0)
    # A > 0 with a huge ratio: the usual clip, the dual clip never engages
    assert one_token(10.0, 2.0, dual_clip=3.0)[0] == pytest.approx(-2.4)
    assert one_token(0.1, 2.0, dual_clip=3.0)[0] == pytest.approx(-0.2)
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match="dual_clip must be > 1"):
            one_token(1.0, 1.0, dual_clip=bad)


CASES = [
    dict(lo=0.2, hi=0.2, dual=None, mode="token-mean"),
    dict(lo=0.2, hi=0.28, dual=None, mode="seq-mean-token-mean"),
    dict(lo=0.1, hi=0.3, dual=3.0, mode="token-mean"),
    dict(lo=0.2, hi=0.2, dual=2.0, mode="seq-mean-token-sum-norm"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c['mode']}-{c['dual']}" for c in CASES])
def test_policy_loss_and_stats_match_the_naive_reference(case):
    rng = random.Random(2)
    ls = lengths(rng, B, T)
    mask = mask_of(ls, T)
    old = rand(rng, B, T) - 2.0
    logp = old + rand(rng, B, T, scale=0.6)  # ratios from ~0.2 to ~5: every branch occurs
    adv = rand(rng, B, T)
    lp = with_garbage(logp, mask, rng).requires_grad_()
    loss, stats = policy_loss(lp, with_garbage(old, mask, rng), with_garbage(adv, mask, rng), mask,
                              clip_low=case["lo"], clip_high=case["hi"], dual_clip=case["dual"],
                              aggregation=case["mode"])
    losses, want = naive_policy(logp.tolist(), old.tolist(), adv.tolist(), ls, case["lo"],
                                case["hi"], case["dual"])
    want_loss = naive_aggregate(losses, ls, case["mode"])
    assert float(loss.detach()) == pytest.approx(want_loss, rel=1e-12)
    assert stats == pytest.approx(want, rel=1e-12)
    assert 0 < stats["clip_fraction"] < 1
    # gradient: −A·ρ where the unclipped term is the active one, 0 where clipped (or dual-capped)
    loss.backward()
    assert torch.isfinite(lp.grad).all() and not lp.grad[~mask.bool()].any()
    n = sum(ls)
    for i, k in enumerate(ls):
        for t in range(k):
            rho, a = math.exp(float(logp[i, t] - old[i, t])), float(adv[i, t])
            _, cut, _, _ = naive_policy_token(float(logp[i, t]), float(old[i, t]), a, case["lo"],
                                              case["hi"], None)
            capped = case["dual"] is not None and a < 0 and -a * rho > -case["dual"] * a
            d = 0.0 if cut or capped else -a * rho
            w = {"token-mean": 1 / n, "seq-mean-token-mean": 1 / (k * B),
                 "seq-mean-token-sum-norm": 1 / (T * B)}[case["mode"]]
            assert float(lp.grad[i, t]) == pytest.approx(d * w, rel=1e-9, abs=1e-15), (i, t)


def test_policy_loss_at_the_behaviour_policy_is_minus_the_mean_advantage():
    rng = random.Random(3)
    ls = lengths(rng, B, T)
    mask = mask_of(ls, T)
    logp, adv = rand(rng, B, T), rand(rng, B, T)
    loss, stats = policy_loss(logp, logp.clone(), adv, mask)
    real = adv[mask.bool()]
    assert float(loss) == pytest.approx(-float(real.mean()), rel=1e-12)
    assert stats == {"clip_fraction": 0.0, "approx_kl": 0.0, "ratio_mean": 1.0}


def test_policy_loss_keeps_float32_and_leaves_inputs_alone():
    rng = random.Random(4)
    mask = mask_of(lengths(rng, B, T), T)
    logp, old, adv = (rand(rng, B, T).float() for _ in range(3))
    copies = [x.clone() for x in (logp, old, adv, mask)]
    loss, _ = policy_loss(logp, old, adv, mask, dual_clip=3.0)
    assert loss.dtype == torch.float32
    for x, c in zip((logp, old, adv, mask), copies):
        assert torch.equal(x, c)


# --- value loss ------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_eps", [None, 0.2, 1.0])
@pytest.mark.parametrize("mode", LOSS_AGGREGATION_NAMES)
def test_value_loss_matches_the_naive_reference(clip_eps, mode):
    rng = random.Random(5)
    ls = lengths(rng, B, T)
    mask = mask_of(ls, T)
    old, returns = rand(rng, B, T), rand(rng, B, T)
    values = old + rand(rng, B, T, scale=0.5)
    v = with_garbage(values, mask, rng).requires_grad_()
    loss, stats = value_loss(v, with_garbage(old, mask, rng), with_garbage(returns, mask, rng),
                             mask, clip_eps=clip_eps, aggregation=mode)
    losses = [[0.0] * T for _ in ls]
    clipped = 0
    for i, n in enumerate(ls):
        for t in range(n):
            vv, o, r = float(values[i, t]), float(old[i, t]), float(returns[i, t])
            plain = (vv - r) ** 2
            if clip_eps is None:
                losses[i][t] = 0.5 * plain
                continue
            c = (o + min(max(vv - o, -clip_eps), clip_eps) - r) ** 2
            losses[i][t] = 0.5 * max(plain, c)
            clipped += c > plain
    assert float(loss.detach()) == pytest.approx(naive_aggregate(losses, ls, mode), rel=1e-12)
    assert stats == pytest.approx({"value_clip_fraction": clipped / sum(ls)})
    if clip_eps == 0.2:
        assert 0 < stats["value_clip_fraction"] < 1
    loss.backward()
    assert torch.isfinite(v.grad).all() and not v.grad[~mask.bool()].any()


# --- diagnostics -----------------------------------------------------------------------------


def test_entropy_from_logits_matches_a_naive_softmax_sum():
    rng = random.Random(6)
    logits = rand(rng, 7, 13, scale=3.0)
    logits[2, 5] = 40.0  # nearly one-hot
    logits[3, :6] = -math.inf  # part of the vocabulary masked out
    got = entropy_from_logits(logits)
    assert got.shape == (7,)
    for i in range(7):
        row = [float(z) for z in logits[i]]
        mx = max(row)
        ex = [math.exp(z - mx) for z in row]
        p = [e / sum(ex) for e in ex]
        want = -sum(q * math.log(q) for q in p if q > 0)
        assert float(got[i]) == pytest.approx(want, rel=1e-10, abs=1e-12)
    uniform = entropy_from_logits(torch.zeros(2, 3, 50, dtype=F64))
    assert uniform.shape == (2, 3) and torch.allclose(uniform, torch.full((2, 3), math.log(50),
                                                                          dtype=F64))
    x = logits.clone().requires_grad_()
    entropy_from_logits(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_explained_variance_matches_its_formula():
    rng = random.Random(7)
    ls = lengths(rng, B, T)
    mask = mask_of(ls, T)
    returns = rand(rng, B, T)
    values = returns + rand(rng, B, T, scale=0.5)
    got = explained_variance(with_garbage(values, mask, rng), with_garbage(returns, mask, rng),
                             mask)
    r = [float(returns[i, t]) for i, n in enumerate(ls) for t in range(n)]
    d = [float(returns[i, t] - values[i, t]) for i, n in enumerate(ls) for t in range(n)]

    def var(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    assert got == pytest.approx(1 - var(d) / var(r), rel=1e-12)
    assert explained_variance(returns, returns, mask) == 1.0
    assert explained_variance(torch.zeros(B, T, dtype=F64) + 3.0, returns, mask) == pytest.approx(
        0.0, abs=1e-12)  # a constant critic explains nothing
    assert math.isnan(explained_variance(values, torch.ones(B, T, dtype=F64), mask))

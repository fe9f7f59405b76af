"""rlhf.labels.leaderboard: Bradley–Terry against a float64 reference fit written the naive way,
recovery of known strengths within the bootstrap intervals, ties half, Elo, agreement / Cohen's
κ on hand-worked cases, the rows and the plot."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from rlhf.labels.leaderboard import (
    Battle,
    agreement,
    battles_from_votes,
    bootstrap,
    bradley_terry,
    elo,
    leaderboard,
    leaderboard_from_battles,
    plot_leaderboard,
)
from rlhf.labels.votes import Response, Vote

SCALE = 400 / math.log(10)  # rating points per nat


def make_vote(annotator: str, models, *, outcome=None, ranks=None, item: str = "item",
              at: float = 1.0) -> Vote:
    responses = tuple(Response(f"response {k}", m) for k, m in enumerate(models))
    return Vote(id=f"{annotator}-{item}-{at}", item_id=item, annotator=annotator,
                mode="pair" if ranks is None else "ranking", prompt="p", responses=responses,
                shown=tuple(range(len(models))), shown_at=at - 0.5, voted_at=at,
                outcome=outcome, ranks=None if ranks is None else tuple(ranks))


def synthetic_battles(strengths: np.ndarray, n: int, rng: np.random.Generator, *,
                      tie_share: float = 0.6) -> list[Battle]:
    """Random pairs; a tie with probability 2c·p(1−p) (c = tie_share), else a win for a with
    probability p − tie/2, where p = σ(θ_a − θ_b): the expected score of a is exactly p, so
    Bradley–Terry with ties counted half is the right model for these battles."""
    k = len(strengths)
    a = rng.integers(0, k, n)
    b = (a + rng.integers(1, k, n)) % k
    p = 1.0 / (1.0 + np.exp(-(strengths[a] - strengths[b])))
    tie = 2 * tie_share * p * (1 - p)
    u = rng.random(n)
    outcome = np.where(u < tie, "tie", np.where(u < tie + p - tie / 2, "a", "b"))
    return [Battle(f"m{x}", f"m{y}", o) for x, y, o in zip(a, b, outcome)]


def reference_fit(battles: list[Battle]) -> dict[str, float]:
    """Unpenalised maximum likelihood, one term per battle (s = 1, 0, ½), torch float64 L-BFGS
    on free strengths; ratings centred on 1000."""
    import torch

    models = sorted({m for b in battles for m in (b.model_a, b.model_b)})
    idx = {m: k for k, m in enumerate(models)}
    ia = torch.tensor([idx[b.model_a] for b in battles])
    ib = torch.tensor([idx[b.model_b] for b in battles])
    s = torch.tensor([{"a": 1.0, "b": 0.0, "tie": 0.5}[b.outcome] for b in battles],
                     dtype=torch.float64)
    theta = torch.zeros(len(models), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-13,
                            tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        d = theta[ia] - theta[ib]
        loss = -(s * torch.nn.functional.logsigmoid(d)
                 + (1 - s) * torch.nn.functional.logsigmoid(-d)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    centred = (theta - theta.mean()).detach().numpy()
    return {m: 1000 + SCALE * float(t) for m, t in zip(models, centred)}


# ------------------------------------------------------------------------------------------------
# Bradley–Terry
# ------------------------------------------------------------------------------------------------


def test_fit_equals_float64_reference_fit():
    rng = np.random.default_rng(1)
    battles = synthetic_battles(np.array([0.0, 0.4, 1.1, -0.8, 1.5, 0.2]), 3000, rng)
    ours = bradley_terry(battles)
    ref = reference_fit(battles)
    assert set(ours) == set(ref)
    for m in ref:
        assert ours[m] == pytest.approx(ref[m], abs=1e-3), m
    assert list(ours) == sorted(ours, key=ours.get, reverse=True)  # best first
    assert sum(ours.values()) / len(ours) == pytest.approx(1000, abs=1e-6)


def test_known_strengths_recovered_within_bootstrap_interval():
    true = np.array([0.0, 0.5, 1.0, -0.7, 1.6])
    true_ratings = {f"m{k}": 1000 + SCALE * t for k, t in enumerate(true - true.mean())}
    battles = synthetic_battles(true, 4000, np.random.default_rng(7))
    fitted = bradley_terry(battles)
    ci = bootstrap(battles, rounds=1000, seed=3)
    for m, r in true_ratings.items():
        assert ci[m].low <= fitted[m] <= ci[m].high, m
        assert ci[m].low <= r <= ci[m].high, (m, r, ci[m])
    assert list(fitted) == sorted(true_ratings, key=true_ratings.get, reverse=True)


def test_bootstrap_intervals_cover_at_about_their_level_and_are_not_too_wide():
    """Over independent data sets: the 95 % intervals hold the true rating about 95 % of the
    time, and their half-width matches the spread of the fitted ratings across data sets."""
    true = np.array([0.0, 0.6, -0.5, 1.2])
    true_ratings = 1000 + SCALE * (true - true.mean())
    models = [f"m{k}" for k in range(len(true))]
    rng = np.random.default_rng(11)
    covered, fits, widths = [], [], []
    for rep in range(40):
        battles = synthetic_battles(true, 1500, rng)
        fitted = bradley_terry(battles)
        ci = bootstrap(battles, rounds=400, seed=rep)
        fits.append([fitted[m] for m in models])
        widths.append([(ci[m].high - ci[m].low) / 2 for m in models])
        covered += [ci[m].low <= r <= ci[m].high for m, r in zip(models, true_ratings)]
    coverage = np.mean(covered)
    assert 0.88 <= coverage <= 1.0, coverage
    spread = 1.96 * np.std(np.array(fits), axis=0, ddof=1)
    ratio = np.mean(widths, axis=0) / spread
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio


def test_ties_count_half():
    # 3 wins, 1 loss, 2 ties: score 4 of 6, so P(x ≻ y) = 2/3 and the gap is 400·log10(2).
    battles = ([Battle("x", "y", "a")] * 3 + [Battle("x", "y", "b")]
               + [Battle("y", "x", "tie")] * 2)
    r = bradley_terry(battles, l2=0.0)
    assert r["x"] - r["y"] == pytest.approx(400 * math.log10(2), abs=1e-6)
    # Chatbot Arena's way: every decisive battle twice, every tie as one win for each side.
    rng = np.random.default_rng(5)
    battles = synthetic_battles(np.array([0.3, -0.2, 0.9]), 600, rng, tie_share=0.9)
    doubled = []
    for b in battles:
        doubled += ([b, b] if b.outcome != "tie" else
                    [Battle(b.model_a, b.model_b, "a"), Battle(b.model_a, b.model_b, "b")])
    ours, arena = bradley_terry(battles, l2=0.0), bradley_terry(doubled, l2=0.0)
    for m in ours:
        assert ours[m] == pytest.approx(arena[m], abs=1e-6)
    # All ties: everyone equal.
    assert bradley_terry([Battle("x", "y", "tie"), Battle("y", "z", "tie")]) == pytest.approx(
        {"x": 1000.0, "y": 1000.0, "z": 1000.0})


def test_scale_base_anchor_and_edge_cases():
    battles = [Battle("x", "y", "a")] * 3 + [Battle("x", "y", "b")]  # P = 3/4
    r = bradley_terry(battles, l2=0.0, scale=1.0, base=math.e, init_rating=0.0)
    assert r["x"] - r["y"] == pytest.approx(math.log(3), abs=1e-9)
    anchored = bradley_terry(battles, anchor=("y", 1114.0))
    assert anchored["y"] == pytest.approx(1114.0)
    assert anchored["x"] - anchored["y"] == pytest.approx(400 * math.log10(3), abs=1e-3)
    with pytest.raises(ValueError, match="anchor"):
        bradley_terry(battles, anchor=("nobody", 1000.0))
    assert bradley_terry([]) == {} and bootstrap([], rounds=10) == {}
    # A perfect record stays finite (the small L2 penalty) and ranks first.
    perfect = bradley_terry([Battle("x", "y", "a")] * 5 + [Battle("y", "z", "tie")])
    assert all(math.isfinite(v) for v in perfect.values()) and list(perfect)[0] == "x"
    # Models that never met, even indirectly: each group averages init_rating.
    split = bradley_terry([Battle("a", "b", "a"), Battle("a", "b", "b"), Battle("a", "b", "a"),
                           Battle("c", "d", "b")] * 3)
    assert split["a"] + split["b"] == pytest.approx(2000)
    assert split["c"] + split["d"] == pytest.approx(2000)
    with pytest.raises(ValueError, match="l2 = 0"):
        bradley_terry([Battle("a", "b", "a"), Battle("a", "b", "b"), Battle("c", "d", "tie")],
                      l2=0.0)
    with pytest.raises(ValueError, match="different"):
        Battle("x", "x", "a")
    with pytest.raises(ValueError, match="outcome"):
        Battle("x", "y", "both_bad")  # both-bad becomes a tie in battles_from_votes


# ------------------------------------------------------------------------------------------------
# Elo
# ------------------------------------------------------------------------------------------------


def test_elo_hand_worked_updates():
    r = elo([Battle("x", "y", "a")])
    assert r == pytest.approx({"x": 1002.0, "y": 998.0})
    # Second battle: y beats x. E_y = 1 / (1 + 10^((1002 − 998)/400)).
    e_y = 1 / (1 + 10 ** (4 / 400))
    r = elo([Battle("x", "y", "a"), Battle("x", "y", "b")])
    assert r["y"] == pytest.approx(998 + 4 * (1 - e_y))
    assert r["x"] == pytest.approx(1002 - 4 * (1 - e_y))
    assert elo([Battle("x", "y", "tie")]) == pytest.approx({"x": 1000.0, "y": 1000.0})
    assert elo([Battle("x", "y", "a")], k=32, init_rating=1500)["x"] == pytest.approx(1516.0)


def test_elo_orders_models_like_their_true_strengths():
    true = np.array([0.0, 1.0, -1.0, 2.0, 0.5])
    battles = synthetic_battles(true, 6000, np.random.default_rng(2))
    ratings = elo(battles)
    assert list(ratings) == [f"m{k}" for k in np.argsort(-true)]
    assert sum(ratings.values()) == pytest.approx(1000 * len(true))  # zero-sum updates


# ------------------------------------------------------------------------------------------------
# Votes → battles, agreement
# ------------------------------------------------------------------------------------------------


def test_battles_from_votes():
    votes = [
        make_vote("ann", ["p@1", "p@2"], outcome="a"),
        make_vote("ann", ["p@1", "p@2"], outcome="both_bad"),  # counts as a tie
        make_vote("ann", ["p@1", "p@1"], outcome="b"),  # same model: no battle
        make_vote("ann", ["p@1", ""], outcome="b"),  # unknown model: no battle
        make_vote("ann", ["p@3", "p@2", "p@1", "p@3"], ranks=[2, 1, 2, 3]),
    ]
    assert battles_from_votes(votes) == [
        Battle("p@1", "p@2", "a"),
        Battle("p@1", "p@2", "tie"),
        Battle("p@3", "p@2", "b"), Battle("p@3", "p@1", "tie"),  # (0, 3): same model, skipped
        Battle("p@2", "p@1", "a"), Battle("p@2", "p@3", "a"),
        Battle("p@1", "p@3", "a"),
    ]


def test_cohens_kappa_hand_worked():
    # The textbook table: 50 items, first label × second label:
    #            a    b
    #     a     20    5      p_o = 35/50 = 0.7; first: a 25/50, second: a 30/50
    #     b     10   15      p_e = 0.5·0.6 + 0.5·0.4 = 0.5; κ = (0.7 − 0.5)/(1 − 0.5) = 0.4
    cells = [("a", "a")] * 20 + [("a", "b")] * 5 + [("b", "a")] * 10 + [("b", "b")] * 15
    votes = []
    for k, (first, second) in enumerate(cells):
        # "zoe" always labels first: the overall κ orders labels by time, the per-pair κ by name.
        votes.append(make_vote("zoe", ["m@1", "m@2"], outcome=first, item=f"i{k}", at=10.0 + k))
        votes.append(make_vote("bob", ["m@1", "m@2"], outcome=second, item=f"i{k}", at=100.0 + k))
    votes.append(make_vote("bob", ["m@1", "m@2"], outcome="a", item="single"))  # labelled once
    got = agreement(votes)
    assert (got.items, got.label_pairs) == (50, 50)
    assert got.agreement == pytest.approx(0.7)
    assert got.kappa == pytest.approx(0.4)
    (pair,) = got.by_annotators
    assert pair.annotators == ("bob", "zoe") and pair.items == 50
    assert pair.agreement == pytest.approx(0.7) and pair.kappa == pytest.approx(0.4)


def test_agreement_latest_vote_three_annotators_rankings_and_undefined_kappa():
    votes = [
        make_vote("ann", ["m@1", "m@2"], outcome="a", item="x", at=1),
        make_vote("ann", ["m@1", "m@2"], outcome="tie", item="x", at=2),  # ann's latest counts
        make_vote("bob", ["m@1", "m@2"], outcome="tie", item="x", at=3),
        make_vote("cat", ["m@1", "m@2"], outcome="both_bad", item="x", at=4),
    ]
    got = agreement(votes)
    # Label pairs (by time): ann–bob tie/tie agree, ann–cat and bob–cat disagree.
    assert (got.items, got.label_pairs) == (1, 3)
    assert got.agreement == pytest.approx(1 / 3)
    # first labels: tie, tie, tie; second: tie, both_bad, both_bad → p_e = 1/3, p_o = 1/3: κ 0
    assert got.kappa == pytest.approx(0.0)
    assert [p.annotators for p in got.by_annotators] == [("ann", "bob"), ("ann", "cat"),
                                                         ("bob", "cat")]
    # Ranking votes: one sub-item per pair of responses.
    ranked = [make_vote("ann", ["m@1", "m@2", "m@3"], ranks=[1, 2, 2], item="r", at=1),
              make_vote("bob", ["m@1", "m@2", "m@3"], ranks=[1, 2, 3], item="r", at=2)]
    got = agreement(ranked)
    assert (got.items, got.label_pairs) == (3, 3) and got.agreement == pytest.approx(2 / 3)
    # Everyone always says "a": agreement 1, κ undefined.
    same = [make_vote(a, ["m@1", "m@2"], outcome="a", item=f"i{k}", at=k)
            for k in range(3) for a in ("ann", "bob")]
    got = agreement(same)
    assert got.agreement == 1.0 and got.kappa is None
    assert agreement([]).as_dict() == {"items": 0, "label_pairs": 0, "agreement": None,
                                       "kappa": None, "by_annotators": ()}


# ------------------------------------------------------------------------------------------------
# Rows and the plot
# ------------------------------------------------------------------------------------------------


def test_leaderboard_rows(tmp_path):
    rng = np.random.default_rng(4)
    battles = synthetic_battles(np.array([0.0, 0.05, 2.0]), 2000, rng)
    rows = leaderboard_from_battles(battles, bootstrap_rounds=300, seed=1)
    assert rows[0].model == "m2" and {r.model for r in rows[1:]} == {"m0", "m1"}
    top, *rest = rows
    # m2 is far above the other two, which overlap: Chatbot Arena's rank 1, 2, 2.
    assert top.rank == 1 and [r.rank for r in rest] == [2, 2]
    for r in rows:
        assert r.ci_low <= r.rating <= r.ci_high
        assert r.battles == r.wins + r.losses + r.ties
        assert r.battles == sum(b.model_a == r.model or b.model_b == r.model for b in battles)
        assert r.ties == sum(b.outcome == "tie" and r.model in (b.model_a, b.model_b)
                             for b in battles)
    assert sum(r.wins for r in rows) == sum(r.losses for r in rows)
    no_ci = leaderboard_from_battles(battles, bootstrap_rounds=0)
    assert [r.rank for r in no_ci] == [1, 2, 3] and no_ci[0].ci_low is None
    assert no_ci[0].as_dict()["model"] == "m2"

    votes = [make_vote("ann", ["p@1", "p@2"], outcome="a", at=k) for k in range(3)]
    rows = leaderboard(votes, bootstrap_rounds=50)
    assert [(r.model, r.wins, r.losses) for r in rows] == [("p@1", 3, 0), ("p@2", 0, 3)]
    assert leaderboard([]) == []

    png = plot_leaderboard(rows, tmp_path / "out" / "board.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = plot_leaderboard([], tmp_path / "empty.png")
    assert empty.read_bytes()[:4] == b"\x89PNG"
    buf = io.BytesIO()  # what a web page serves
    assert plot_leaderboard(rows, buf) is buf and buf.getvalue()[:4] == b"\x89PNG"

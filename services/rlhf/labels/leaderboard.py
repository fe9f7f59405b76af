"""Ratings of model versions from the annotators' votes, and how far the annotators agree.

Battles. `battles_from_votes` turns votes (`rlhf.labels.votes.Vote`) into `Battle`s between two
different models: a pair vote is one battle (both-bad counts as a tie, as in Chatbot Arena); a
ranking vote is one battle per pair of responses from different models (equal ranks: a tie).
Responses whose model is unknown ("") and two responses of the same model make no battle.

Bradley–Terry (`bradley_terry`). Each model i has a strength θ_i (natural-log units) and

    P(i ≻ j) = σ(θ_i − θ_j),   rating R_i = init_rating + scale·θ_i / ln(base)

so P(i ≻ j) = 1 / (1 + base^((R_j − R_i)/scale)), Elo's curve. The fit maximises, in float64,

    Σ_battles [ s·log σ(θ_a − θ_b) + (1 − s)·log σ(θ_b − θ_a) ] − ½·l2·‖θ‖²

with s = 1 when a won, 0 when b won and ½ for a tie: a tie counts half a win to each side
(exactly as fitting it as one win for each side at half weight, Chatbot Arena's way). The
method is Newton's with a backtracking line search on the battles tallied per pair of models.
The penalty (default l2 = 1e-6, about as weak as Chatbot Arena's logistic regression with
C = 1e6) keeps the fit finite when a model won or lost every battle, and fixes the free
offset: at the optimum Σθ = 0, so ratings average `init_rating` (per connected group of models:
models that never met, directly or through others, are not comparable). `anchor=(model, R)`
then shifts every rating so that `model` is at R (Chatbot Arena pins one model this way).

Bootstrap (`bootstrap`): the battles are resampled with replacement (a multinomial draw of the
tallies, `rounds` times, seeded), the model refitted on each resample, and the 2.5 / 97.5 %
percentiles of each model's rating are its 95 % interval (a model absent from a resample is left
out of that round). All rounds are fitted together (batched Newton), so 1000 rounds take well
under a second for a handful of models.

Elo (`elo`): the online update of Chatbot Arena's first leaderboard, over the battles in order:
E_a = 1 / (1 + base^((R_b − R_a)/scale)), R_a += k·(S_a − E_a), R_b += k·(E_a − S_a) with
S_a = 1 / 0 / ½, k = 4, every model starting at init_rating. It depends on the order; the
Bradley–Terry fit does not.

Agreement (`agreement`): items labelled by two or more annotators (the app re-serves a share of
items, `--double-label`). Each pair vote is one item with outcome a / b / tie / both_bad; a
ranking vote is one sub-item per pair of responses (a / b / tie). On every item, every two
labels by different annotators (an annotator's latest vote on the item counts) form a label
pair, ordered by vote time: `agreement` is the share of label pairs that agree and `kappa`
Cohen's κ = (p_o − p_e) / (1 − p_e) with p_e from the marginals of first and second labels;
`by_annotators` gives each two annotators' own share and κ over the items both labelled.
κ is None when it is undefined (p_e = 1: every label the same category).

`leaderboard(votes)` gives one `LeaderboardRow` per model, best first (Bradley–Terry rating,
its interval, Elo, battles won / lost / tied, Chatbot Arena's rank: 1 + the number of models
whose interval lies wholly above this one's); `plot_leaderboard(rows, path_or_file)` draws them
(PNG, matplotlib's Agg backend; matplotlib comes with the `serve` extra).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Literal, NamedTuple, Sequence

import numpy as np

if TYPE_CHECKING:
    from rlhf.labels.votes import Vote

__all__ = [
    "BattleOutcome",
    "Battle",
    "Ratings",
    "Interval",
    "battles_from_votes",
    "bradley_terry",
    "bootstrap",
    "elo",
    "PairAgreement",
    "Agreement",
    "agreement",
    "LeaderboardRow",
    "leaderboard",
    "leaderboard_from_battles",
    "plot_leaderboard",
]

BattleOutcome = Literal["a", "b", "tie"]
_SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5}

#: model → rating, best first.
Ratings = dict[str, float]


@dataclass(frozen=True)
class Battle:
    """One comparison of two different models: "a" (model_a won), "b" or "tie"."""

    model_a: str
    model_b: str
    outcome: BattleOutcome

    def __post_init__(self) -> None:
        if self.outcome not in _SCORE:
            raise ValueError(f"outcome: must be 'a', 'b' or 'tie', got {self.outcome!r}")
        if not self.model_a or not self.model_b or self.model_a == self.model_b:
            raise ValueError(f"a battle needs two different named models, got "
                             f"{self.model_a!r} and {self.model_b!r}")


class Interval(NamedTuple):
    """A confidence interval of a rating."""

    low: float
    high: float


def battles_from_votes(votes: Iterable["Vote"]) -> list[Battle]:
    """The battles the votes hold, in the votes' order (see the module docstring)."""
    battles: list[Battle] = []
    for vote in votes:
        models = vote.models
        if vote.mode == "pair":
            a, b = models
            if a and b and a != b:
                outcome = "tie" if vote.outcome in ("tie", "both_bad") else vote.outcome
                battles.append(Battle(a, b, outcome))
            continue
        ranks = vote.ranks or ()
        for i, j in combinations(range(len(models)), 2):
            if models[i] and models[j] and models[i] != models[j]:
                outcome = "a" if ranks[i] < ranks[j] else "b" if ranks[i] > ranks[j] else "tie"
                battles.append(Battle(models[i], models[j], outcome))
    return battles


# ------------------------------------------------------------------------------------------------
# Bradley–Terry: the tally and the batched Newton fit
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tally:
    """Battles counted per unordered pair of models (i < j in `models`, sorted by name)."""

    models: tuple[str, ...]
    i: np.ndarray  # (P,) int
    j: np.ndarray  # (P,) int
    counts: np.ndarray  # (P, 3) float64: i won, tie, j won

    @classmethod
    def of(cls, battles: Iterable[Battle]) -> "_Tally":
        cells: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        for b in battles:
            if b.model_a < b.model_b:
                cells[b.model_a, b.model_b][{"a": 0, "tie": 1, "b": 2}[b.outcome]] += 1
            else:
                cells[b.model_b, b.model_a][{"a": 2, "tie": 1, "b": 0}[b.outcome]] += 1
        models = tuple(sorted({m for pair in cells for m in pair}))
        index = {m: k for k, m in enumerate(models)}
        keys = sorted(cells)
        return cls(models,
                   np.array([index[a] for a, _ in keys], dtype=np.int64),
                   np.array([index[b] for _, b in keys], dtype=np.int64),
                   np.array([cells[k] for k in keys], dtype=np.float64).reshape(len(keys), 3))

    def fit(self, counts: np.ndarray, l2: float) -> np.ndarray:
        """θ (R, K) for counts (R, P, 3): one fit per row."""
        n = counts.sum(-1)  # (R, P) battles per pair
        s = counts[..., 0] + 0.5 * counts[..., 1]  # (R, P) i's score: wins + half the ties
        return _newton(self.i, self.j, n, s, len(self.models), l2)


def _nll(theta: np.ndarray, i: np.ndarray, j: np.ndarray, n: np.ndarray, s: np.ndarray,
         l2: float) -> np.ndarray:
    """Penalised negative log-likelihood per row: theta (R, K), n and s (R, P) → (R,)."""
    d = theta[:, i] - theta[:, j]  # (R, P)
    nll = s * np.logaddexp(0.0, -d) + (n - s) * np.logaddexp(0.0, d)
    return nll.sum(1) + 0.5 * l2 * (theta * theta).sum(1)


def _incidence(i: np.ndarray, j: np.ndarray, k: int) -> np.ndarray:
    """(P, K): row p is +1 at model i[p] and −1 at model j[p]."""
    out = np.zeros((len(i), k))
    rows = np.arange(len(i))
    out[rows, i] = 1.0
    out[rows, j] = -1.0
    return out


def _newton(i: np.ndarray, j: np.ndarray, n: np.ndarray, s: np.ndarray, k: int, l2: float, *,
            max_iter: int = 200, step_tol: float = 1e-10) -> np.ndarray:
    """Minimise `_nll` for every row at once (float64). Returns θ (R, K) with Σθ = 0 per row.

    The Hessian is the weighted graph Laplacian of the pairs plus l2·I. Its flat direction
    when l2 = 0 (adding a constant to θ) is lifted by adding 11ᵀ/K: every gradient sums to zero
    (for the penalty too, since Σθ stays 0 from θ = 0), so the step is the same and sums to 0.
    With l2 = 0 the models must be connected (else ValueError) and a perfect record runs to
    `max_iter`."""
    rows = n.shape[0]
    theta = np.zeros((rows, k))
    f = _nll(theta, i, j, n, s, l2)
    gauge = np.full((k, k), 1.0 / k)
    diag = np.arange(k)
    incidence = _incidence(i, j, k)  # (P, K): +1 at i, −1 at j
    touches = np.abs(incidence)
    active = np.arange(rows)
    for _ in range(max_iter):
        if active.size == 0:
            break
        th, na, sa = theta[active], n[active], s[active]
        d = th[:, i] - th[:, j]  # (A, P)
        half = np.tanh(0.5 * d)
        p = 0.5 * (1.0 + half)  # σ(d), stable for any d
        r = na * p - sa  # (A, P) ∂nll/∂d
        w = na * 0.25 * (1.0 - half * half)  # (A, P) ∂²nll/∂d² = n·σ(d)·σ(−d)
        grad = r @ incidence + l2 * th  # (A, K)
        hess = np.zeros((th.shape[0], k, k))  # pairs are distinct with i < j: no index repeats
        hess[:, diag, diag] = w @ touches + l2
        hess[:, i, j] = -w
        hess[:, j, i] = -w
        try:
            step = np.linalg.solve(hess + gauge, grad[..., None])[..., 0]  # (A, K)
        except np.linalg.LinAlgError:
            raise ValueError("l2 = 0 needs every model linked to every other by battles; "
                             "use a small l2 > 0") from None
        small = np.abs(step).max(1) <= step_tol  # converged: take the last (tiny) step and stop
        theta[active[small]] = th[small] - step[small]
        keep = ~small
        active, th, na, sa, step, grad = (x[keep] for x in (active, th, na, sa, step, grad))
        if active.size == 0:
            break
        decrement = (grad * step).sum(1)  # gᵀH⁻¹g ≥ 0
        t = np.ones(active.size)
        new = th - step
        fn = _nll(new, i, j, na, sa, l2)
        for _ in range(60):  # backtracking (Armijo): halve the step where f did not fall enough
            bad = fn > f[active] - 1e-4 * t * decrement
            if not bad.any():
                break
            t[bad] *= 0.5
            new[bad] = th[bad] - t[bad, None] * step[bad]
            fn[bad] = _nll(new[bad], i, j, na[bad], sa[bad], l2)
        improved = fn < f[active]  # no progress at all (rounding at the optimum): stop there
        theta[active[improved]] = new[improved]
        f[active[improved]] = fn[improved]
        active = active[improved]
    return theta - theta.mean(1, keepdims=True)


def _check_scale(scale: float, base: float, l2: float) -> None:
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: must be a positive number, got {scale!r}")
    if not (math.isfinite(base) and base > 1):
        raise ValueError(f"base: must be a number above 1, got {base!r}")
    if not (math.isfinite(l2) and l2 >= 0):
        raise ValueError(f"l2: must be ≥ 0, got {l2!r}")


def _to_ratings(theta: np.ndarray, models: Sequence[str], *, scale: float, base: float,
                init_rating: float, anchor: tuple[str, float] | None) -> np.ndarray:
    """Strengths (…, K) → ratings (…, K), shifted so the anchor model has its rating."""
    ratings = init_rating + theta * (scale / math.log(base))
    if anchor is not None:
        model, value = anchor
        if model not in models:
            raise ValueError(f"anchor: no battle names the model {model!r}")
        k = list(models).index(model)
        ratings = ratings + (value - ratings[..., k : k + 1])
    return ratings


def bradley_terry(battles: Iterable[Battle], *, anchor: tuple[str, float] | None = None,
                  scale: float = 400.0, base: float = 10.0, init_rating: float = 1000.0,
                  l2: float = 1e-6) -> Ratings:
    """Maximum-likelihood Bradley–Terry ratings (ties half; see the module docstring), best
    first. No battles: {}."""
    _check_scale(scale, base, l2)
    tally = _Tally.of(battles)
    if not tally.models:
        return {}
    theta = tally.fit(tally.counts[None], l2)[0]
    ratings = _to_ratings(theta, tally.models, scale=scale, base=base,
                          init_rating=init_rating, anchor=anchor)
    return _best_first(dict(zip(tally.models, ratings.tolist())))


def _best_first(ratings: dict[str, float]) -> Ratings:
    return dict(sorted(ratings.items(), key=lambda kv: (-kv[1], kv[0])))


def bootstrap(battles: Iterable[Battle], rounds: int = 1000, seed: int = 0, *,
              level: float = 0.95, anchor: tuple[str, float] | None = None,
              scale: float = 400.0, base: float = 10.0, init_rating: float = 1000.0,
              l2: float = 1e-6) -> dict[str, Interval]:
    """Percentile bootstrap intervals of the Bradley–Terry ratings (default 2.5 / 97.5 %):
    `rounds` resamples of the battles with replacement, seeded by `seed`."""
    _check_scale(scale, base, l2)
    if rounds < 1:
        raise ValueError(f"rounds: must be ≥ 1, got {rounds}")
    if not 0 < level < 1:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    tally = _Tally.of(battles)
    if not tally.models:
        return {}
    flat = tally.counts.ravel()
    total = int(flat.sum())
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(total, flat / total, size=rounds).astype(np.float64)
    counts = draws.reshape(rounds, *tally.counts.shape)  # (R, P, 3)
    ratings = _to_ratings(tally.fit(counts, l2), tally.models, scale=scale, base=base,
                          init_rating=init_rating, anchor=anchor)
    played = counts.sum(-1) @ np.abs(_incidence(tally.i, tally.j, len(tally.models)))  # (R, K)
    ratings[played == 0] = np.nan  # a model no resampled battle names has no rating that round
    tail = (1.0 - level) / 2.0
    out = {}
    for k, model in enumerate(tally.models):
        seen = ratings[:, k][~np.isnan(ratings[:, k])]
        if seen.size:  # else: in no resample (possible only with very few rounds): no interval
            low, high = np.quantile(seen, [tail, 1.0 - tail])
            out[model] = Interval(float(low), float(high))
    return out


# ------------------------------------------------------------------------------------------------
# Elo, online (Chatbot Arena's first leaderboard)
# ------------------------------------------------------------------------------------------------


def elo(battles: Iterable[Battle], *, k: float = 4.0, scale: float = 400.0, base: float = 10.0,
        init_rating: float = 1000.0) -> Ratings:
    """Online Elo over the battles in order (see the module docstring), best first."""
    _check_scale(scale, base, 0.0)
    rating: dict[str, float] = defaultdict(lambda: init_rating)
    for b in battles:
        ra, rb = rating[b.model_a], rating[b.model_b]
        expected_a = 1.0 / (1.0 + base ** ((rb - ra) / scale))
        delta = k * (_SCORE[b.outcome] - expected_a)
        rating[b.model_a] = ra + delta
        rating[b.model_b] = rb - delta
    return _best_first(dict(rating))


# ------------------------------------------------------------------------------------------------
# Agreement between annotators
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairAgreement:
    """Two annotators on the items both labelled."""

    annotators: tuple[str, str]
    items: int
    agreement: float
    kappa: float | None


@dataclass(frozen=True)
class Agreement:
    """Agreement over every item labelled by two or more annotators (module docstring)."""

    items: int  # (sub-)items with labels by two or more annotators
    label_pairs: int  # pairs of labels compared
    agreement: float | None  # share of label pairs that agree (None: no pair)
    kappa: float | None  # Cohen's κ, first label vs second label
    by_annotators: tuple[PairAgreement, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cohen(pairs: Sequence[tuple[str, str]]) -> tuple[float, float | None]:
    """(share agreeing, Cohen's κ) of (rater 1, rater 2) label pairs."""
    n = len(pairs)
    p_o = sum(a == b for a, b in pairs) / n
    first: dict[str, int] = defaultdict(int)
    second: dict[str, int] = defaultdict(int)
    for a, b in pairs:
        first[a] += 1
        second[b] += 1
    p_e = sum(first[c] * second[c] for c in first) / (n * n)
    kappa = None if p_e >= 1.0 - 1e-12 else (p_o - p_e) / (1.0 - p_e)
    return p_o, kappa


def _labels(vote: "Vote") -> list[tuple[tuple[str, int, int], str]]:
    """((item id, i, j), outcome) for each comparison the vote makes."""
    if vote.mode == "pair":
        return [((vote.item_id, 0, 1), vote.outcome or "")]
    ranks = vote.ranks or ()
    return [((vote.item_id, i, j), "a" if ranks[i] < ranks[j] else "b" if ranks[i] > ranks[j]
             else "tie") for i, j in combinations(range(len(ranks)), 2)]


def agreement(votes: Iterable["Vote"]) -> Agreement:
    """How often annotators agree on items labelled more than once (module docstring)."""
    latest: dict[tuple[tuple[str, int, int], str], tuple[float, int, str]] = {}
    for order, vote in enumerate(votes):
        for item, outcome in _labels(vote):
            key = (item, vote.annotator)
            if key not in latest or (vote.voted_at, order) >= latest[key][:2]:
                latest[key] = (vote.voted_at, order, outcome)
    per_item: dict[tuple[str, int, int], list[tuple[float, int, str, str]]] = defaultdict(list)
    for (item, annotator), (at, order, outcome) in latest.items():
        per_item[item].append((at, order, annotator, outcome))
    pairs: list[tuple[str, str]] = []
    by_two: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    items = 0
    for labels in per_item.values():
        if len(labels) < 2:
            continue
        items += 1
        labels.sort()
        for (_, _, ann1, out1), (_, _, ann2, out2) in combinations(labels, 2):
            pairs.append((out1, out2))
            if ann1 < ann2:
                by_two[ann1, ann2].append((out1, out2))
            else:
                by_two[ann2, ann1].append((out2, out1))
    if not pairs:
        return Agreement(0, 0, None, None, ())
    share, kappa = _cohen(pairs)
    per_pair = tuple(PairAgreement(two, len(ps), *_cohen(ps)) for two, ps in sorted(by_two.items()))
    return Agreement(items, len(pairs), share, kappa, per_pair)


# ------------------------------------------------------------------------------------------------
# Leaderboard rows and their plot
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaderboardRow:
    """One model on the leaderboard."""

    rank: int  # 1 + models whose interval lies wholly above this one's (by rating without one)
    model: str
    rating: float  # Bradley–Terry
    ci_low: float | None  # bootstrap interval (None: no bootstrap)
    ci_high: float | None
    elo: float  # online Elo, k = 4
    battles: int
    wins: int
    losses: int
    ties: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def leaderboard(votes: Iterable["Vote"], *, bootstrap_rounds: int = 1000, seed: int = 0,
                anchor: tuple[str, float] | None = None, scale: float = 400.0,
                base: float = 10.0, init_rating: float = 1000.0, l2: float = 1e-6,
                k: float = 4.0) -> list[LeaderboardRow]:
    """The leaderboard of the models the votes compare, best first (module docstring)."""
    return leaderboard_from_battles(
        battles_from_votes(votes), bootstrap_rounds=bootstrap_rounds, seed=seed, anchor=anchor,
        scale=scale, base=base, init_rating=init_rating, l2=l2, k=k)


def leaderboard_from_battles(battles: Iterable[Battle], *, bootstrap_rounds: int = 1000,
                             seed: int = 0, anchor: tuple[str, float] | None = None,
                             scale: float = 400.0, base: float = 10.0,
                             init_rating: float = 1000.0, l2: float = 1e-6,
                             k: float = 4.0) -> list[LeaderboardRow]:
    """`leaderboard` on battles (in the order Elo sees them)."""
    battles = list(battles)
    fit = dict(anchor=anchor, scale=scale, base=base, init_rating=init_rating, l2=l2)
    ratings = bradley_terry(battles, **fit)
    if not ratings:
        return []
    intervals = bootstrap(battles, bootstrap_rounds, seed, **fit) if bootstrap_rounds > 0 else {}
    elos = elo(battles, k=k, scale=scale, base=base, init_rating=init_rating)
    record: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # won, lost, tied
    for b in battles:
        slot_a, slot_b = {"a": (0, 1), "b": (1, 0), "tie": (2, 2)}[b.outcome]
        record[b.model_a][slot_a] += 1
        record[b.model_b][slot_b] += 1
    rows = []
    for model, rating in ratings.items():
        ci = intervals.get(model)
        if ci is not None:
            above = sum(1 for m, o in intervals.items() if m != model and o.low > ci.high)
        else:
            above = sum(1 for r in ratings.values() if r > rating)
        won, lost, tied = record[model]
        rows.append(LeaderboardRow(
            rank=1 + above, model=model, rating=rating,
            ci_low=None if ci is None else ci.low, ci_high=None if ci is None else ci.high,
            elo=elos[model], battles=won + lost + tied, wins=won, losses=lost, ties=tied))
    return rows


def plot_leaderboard(rows: Sequence[LeaderboardRow], path: str | Path | BinaryIO, *,
                     title: str | None = None) -> Path | BinaryIO:
    """Draw the rows as a PNG into `path` (a file path, or a binary file object such as
    `io.BytesIO` for a web page): each model's Bradley–Terry rating with its interval as an
    error bar, and its Elo, best first left to right. No rows: a figure that says so.
    """
    from rlhf.plots import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(max(4.0, 0.9 * len(rows) + 2.0), 3.6))
    if rows:
        xs = np.arange(len(rows))
        ratings = np.array([r.rating for r in rows])
        lows = np.array([r.rating if r.ci_low is None else r.ci_low for r in rows])
        highs = np.array([r.rating if r.ci_high is None else r.ci_high for r in rows])
        ax.errorbar(xs, ratings, yerr=[ratings - lows, highs - ratings], fmt="o", capsize=4,
                    color="tab:blue", label="Bradley–Terry (95 % bootstrap interval)")
        ax.plot(xs, [r.elo for r in rows], "x", color="tab:orange", label="Elo (online, k = 4)")
        ax.set_xticks(xs, [r.model for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("rating")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        battles = sum(r.battles for r in rows) // 2
        ax.set_title(title or f"{len(rows)} models, {battles} battles", fontsize=10)
    else:
        ax.text(0.5, 0.5, "no battles between two different models yet", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_axis_off()
        if title:
            ax.set_title(title, fontsize=10)
    return save_figure(fig, path)

"""PPO's per-token signal: KL estimators, token rewards, returns, GAE and the critic-free
advantage estimators, as small pure functions picked from registries.

Tensors are `(B, T)` over the completion positions of B sequences, right-padded, with `mask`
`(B, T)` (bool or float, 1 on real tokens); per-sequence values are `(B,)`. Nothing here reads
a padded position: values, rewards or log-probs there may be garbage (even NaN) and the results
are the same; outputs are 0 on padding. A masked position is not a time step: γ and λ count
real tokens only (for right padding this is the plain sum over t). Callers pass detached
tensors (advantages and returns are targets, not part of the graph).

KL per token, with d = log π_θ − log π_ref (`KL_ESTIMATORS`):

    k1   d                      unbiased, can be negative
    k2   ½·d²                   biased, low variance
    k3   e^{−d} − 1 + d         unbiased, ≥ 0 (d clamped to ±10 first so e^{−d} stays finite)

Token rewards (the "N implementation details" recipe): r_t = −β·KL_t on every real token, plus
the sequence's score at its last real token. Then

    discounted returns   G_t = r_t + γ·G_{t+1}
    GAE                  δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1},  R_t = A_t + V_t
                         (V after the last real token is 0)

Advantage estimators (`ESTIMATORS`, one function of `AdvantageInputs` each):

    gae                    GAE on a critic's values; returns R = A + V (before whitening);
                           A whitened when `whiten`
    grpo                   s̃ = (r − mean_g)/(std_g + 1e-6), std unbiased     } then A = the
    dr_grpo                s̃ = r − mean_g                                     } discounted
    rloo                   s̃ = r − mean of the other members of the group     } returns of
    reinforce_pp           s̃ = r; A batch-whitened (always)                   } kl_rewards +
    reinforce_pp_baseline  s̃ = r − mean_g; A batch-whitened (always)          } s̃ at the end

over the groups `group` `(B,)` of samples of one prompt (a group of one has advantage 0 under
grpo and rloo: there is nothing to compare with); grpo / dr_grpo / rloo are whitened only when
`whiten`. Critic-free estimators return no returns (None).

β itself comes from a KL controller: `FixedKLController` or `AdaptiveKLController`,
β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon).

Adding an estimator is adding one function and one registry line (and its name to the Literal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, get_args

import torch

__all__ = [
    "KLEstimator",
    "KL_ESTIMATOR_NAMES",
    "KL_ESTIMATORS",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "token_rewards",
    "discounted_returns",
    "gae",
    "masked_mean",
    "masked_whiten",
    "GroupKind",
    "GROUP_KINDS",
    "GROUP_SCORES",
    "group_scores",
    "AdvantageEstimator",
    "ESTIMATOR_NAMES",
    "ESTIMATORS",
    "CRITIC_ESTIMATORS",
    "GROUP_ESTIMATORS",
    "AdvantageInputs",
    "compute_advantages",
    "FixedKLController",
    "AdaptiveKLController",
    "kl_controller",
]

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATOR_NAMES: tuple[str, ...] = get_args(KLEstimator)

AdvantageEstimator = Literal[
    "gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"
]
ESTIMATOR_NAMES: tuple[str, ...] = get_args(AdvantageEstimator)

GroupKind = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
GROUP_KINDS: tuple[str, ...] = get_args(GroupKind)

#: Estimators that need a critic (`AdvantageInputs.values`) and produce returns for it.
CRITIC_ESTIMATORS: frozenset[str] = frozenset({"gae"})
#: Estimators that compare the samples of one prompt: a job needs groups of ≥ 2 for them.
GROUP_ESTIMATORS: frozenset[str] = frozenset({"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"})

GRPO_EPS = 1e-6  # added to the group std


# --- KL estimators ---------------------------------------------------------------------------


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = d = log π_θ − log π_ref, (B, T)."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ½·d², (B, T)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float | None = 10.0) -> torch.Tensor:
    """k3 = e^{−d} − 1 + d, (B, T), with d clamped to [−clamp, clamp] first (None: no clamp)."""
    d = logp - ref_logp  # (B, T)
    if clamp is not None:
        d = d.clamp(-clamp, clamp)
    return torch.exp(-d) - 1.0 + d


KLFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: KL estimator name → per-token function. The job spec's `kl_estimator` must be one of these.
KL_ESTIMATORS: dict[str, KLFn] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
assert set(KL_ESTIMATORS) == set(KL_ESTIMATOR_NAMES)


def _pick(registry: dict, name: str, what: str):
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; expected one of {sorted(registry)}") from None


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate `(B, T)` by the named estimator (`ValueError` for an unknown one)."""
    return _pick(KL_ESTIMATORS, estimator, "kl_estimator")(logp, ref_logp)


# --- masked statistics -----------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the real positions: a scalar, or `(B,)` along `dim`. No real position: 0."""
    m = mask.bool()
    total = torch.where(m, x, torch.zeros_like(x))
    count = m.to(x.dtype)
    if dim is None:
        return total.sum() / count.sum().clamp(min=1)
    return total.sum(dim) / count.sum(dim).clamp(min=1)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x − mean)/sqrt(var + eps) over the real positions, (B, T); 0 on padding.

    The variance is unbiased (n − 1, as TRL and OpenRLHF whiten); with fewer than two real
    positions it is taken as 0. `shift_mean=False` adds the mean back (scale only).
    """
    m = mask.bool()
    n = m.to(x.dtype).sum()
    mean = masked_mean(x, m)  # ()
    centered = torch.where(m, x - mean, torch.zeros_like(x))  # (B, T)
    var = (centered**2).sum() / (n - 1).clamp(min=1)  # () unbiased
    whitened = centered * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros_like(whitened))


# --- rewards, returns, GAE -------------------------------------------------------------------


def _last_token(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True at each row's last real position (nowhere in a row with none)."""
    m = mask.bool()
    pos = torch.arange(m.shape[-1], device=m.device).expand_as(m)  # (B, T)
    last = torch.where(m, pos, torch.full_like(pos, -1)).max(dim=-1, keepdim=True).values  # (B, 1)
    return pos == last


def _with_scores(rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards (B, T) with each row's score (B,) added at its last real token; 0 on
    padding."""
    m = mask.bool()
    base = torch.where(m, rewards, torch.zeros_like(rewards))  # (B, T)
    score = scores.to(base.dtype).unsqueeze(-1)  # (B, 1)
    at_end = torch.where(_last_token(m), score, torch.zeros_like(base))  # (B, T)
    return base + at_end


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """(B, T): −β·kl_t on real tokens, + the row's score (B,) at its last real token, 0 on
    padding."""
    m = mask.bool()
    penalty = torch.where(m, -beta * kl, torch.zeros_like(kl))  # (B, T)
    return _with_scores(penalty, scores, m)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + γ·G_{t+1} over the real tokens of each row, (B, T); 0 on padding."""
    m = mask.bool()
    running = torch.zeros_like(rewards[:, 0])  # (B,) G after the current position
    out = []
    for t in reversed(range(rewards.shape[1])):
        mt = m[:, t]
        g = torch.where(mt, rewards[:, t], torch.zeros_like(running)) + gamma * running  # (B,)
        running = torch.where(mt, g, running)
        out.append(torch.where(mt, g, torch.zeros_like(g)))
    return torch.stack(out[::-1], dim=1)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: (advantages (B, T), returns = A + V (B, T)).

    δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1} over the real tokens of each row;
    V after the last real token is 0. Both outputs are 0 on padding, and rewards / values at
    padded positions are never read.
    """
    m = mask.bool()
    zero = torch.zeros_like(rewards[:, 0])  # (B,)
    next_value, next_adv = zero, zero  # (B,), (B,) at the next real token
    advs = []
    for t in reversed(range(rewards.shape[1])):
        mt = m[:, t]
        r = torch.where(mt, rewards[:, t], zero)
        v = torch.where(mt, values[:, t], zero)
        delta = r + gamma * next_value - v  # (B,)
        a = delta + gamma * lam * next_adv  # (B,)
        advs.append(torch.where(mt, a, zero))
        next_adv = torch.where(mt, a, next_adv)
        next_value = torch.where(mt, v, next_value)
    advantages = torch.stack(advs[::-1], dim=1)  # (B, T)
    returns = advantages + torch.where(m, values, torch.zeros_like(values))  # (B, T)
    return advantages, returns


# --- group baselines (critic-free) -----------------------------------------------------------


def _group_sum(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Per sample (B,): the sum of `x` (B,) over the sample's group."""
    _, inv = torch.unique(group, return_inverse=True)  # (B,) group index in 0..G−1
    sums = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device).index_add(0, inv, x)  # (≥G,)
    return sums[inv]


def _group_stats(
    scores: torch.Tensor, group: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample (B,): its group's size n_g, the sum and the mean of the group's scores."""
    n = _group_sum(torch.ones_like(scores), group)  # (B,)
    s = _group_sum(scores, group)  # (B,)
    return n, s, s / n


def _grpo(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    n, _, mean = _group_stats(scores, group)
    var = _group_sum((scores - mean) ** 2, group) / (n - 1).clamp(min=1)  # (B,) unbiased
    shaped = (scores - mean) / (torch.sqrt(var) + GRPO_EPS)
    return torch.where(n > 1, shaped, torch.zeros_like(shaped))


def _dr_grpo(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    _, _, mean = _group_stats(scores, group)
    return scores - mean


def _rloo(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    n, s, _ = _group_stats(scores, group)
    others = (s - scores) / (n - 1).clamp(min=1)  # (B,) mean of the other members
    return torch.where(n > 1, scores - others, torch.zeros_like(scores))


def _reinforce_pp(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    return scores.clone()


GroupFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: How each critic-free estimator shapes the scores of one group before they become rewards.
GROUP_SCORES: dict[str, GroupFn] = {
    "grpo": _grpo,
    "dr_grpo": _dr_grpo,
    "rloo": _rloo,
    "reinforce_pp": _reinforce_pp,
    "reinforce_pp_baseline": _dr_grpo,
}
assert set(GROUP_SCORES) == set(GROUP_KINDS)


def group_scores(scores: torch.Tensor, group: torch.Tensor, kind: str) -> torch.Tensor:
    """Shaped scores s̃ (B,) of `scores` (B,) within the groups `group` (B,) (any integer ids):

    grpo (r − mean_g)/(std_g + 1e-6) with the unbiased std; dr_grpo and reinforce_pp_baseline
    r − mean_g; rloo r − mean of the other members; reinforce_pp r. A group of one gets 0 under
    grpo and rloo (and r − r = 0 under the mean baselines).
    """
    return _pick(GROUP_SCORES, kind, "group kind")(scores, group)


# --- advantage estimators --------------------------------------------------------------------


@dataclass(frozen=True)
class AdvantageInputs:
    """What every advantage estimator reads (all detached).

    `kl_rewards` is −β·KL per token when the KL penalty is part of the reward, zeros when it is
    a loss term; the estimators add each row's (shaped) score at its last real token.
    """

    scores: torch.Tensor  # (B,) sequence scores (reward model, after any clipping / penalties)
    kl_rewards: torch.Tensor  # (B, T) −β·KL_t, or zeros
    mask: torch.Tensor  # (B, T) 1 on real completion tokens, right-padded
    group: torch.Tensor | None = None  # (B,) long: samples of one prompt share an id
    values: torch.Tensor | None = None  # (B, T) the critic's V_t (gae only)
    gamma: float = 1.0  # discount γ in [0, 1]
    lam: float = 0.95  # GAE λ in [0, 1]
    whiten: bool = True  # whiten advantages (gae, grpo, dr_grpo, rloo)


EstimatorOutput = tuple[torch.Tensor, torch.Tensor | None]  # advantages (B, T), returns (B, T)


def gae_advantages(x: AdvantageInputs) -> EstimatorOutput:
    """GAE on the critic's values; returns R = A + V before whitening; A whitened if asked."""
    if x.values is None:
        raise ValueError("the 'gae' estimator needs values (a critic)")
    rewards = _with_scores(x.kl_rewards, x.scores, x.mask)  # (B, T)
    advantages, returns = gae(rewards, x.values, x.mask, x.gamma, x.lam)
    if x.whiten:
        advantages = masked_whiten(advantages, x.mask)
    return advantages, returns


def _critic_free(kind: str, always_whiten: bool) -> Callable[[AdvantageInputs], EstimatorOutput]:
    def estimate(x: AdvantageInputs) -> EstimatorOutput:
        if x.group is None:
            if kind in GROUP_ESTIMATORS:
                raise ValueError(f"the {kind!r} estimator needs group ids")
            group = torch.arange(x.scores.shape[0], device=x.scores.device)
        else:
            group = x.group
        shaped = group_scores(x.scores, group, kind)  # (B,)
        rewards = _with_scores(x.kl_rewards, shaped, x.mask)  # (B, T)
        advantages = discounted_returns(rewards, x.mask, x.gamma)  # (B, T)
        if always_whiten or x.whiten:
            advantages = masked_whiten(advantages, x.mask)
        return advantages, None

    estimate.__name__ = f"{kind}_advantages"
    estimate.__qualname__ = estimate.__name__
    estimate.__doc__ = (f"{kind}: the scores shaped by `group_scores(kind={kind!r})`, added at the "
                        "last token to kl_rewards; advantages = their discounted returns; "
                        + ("always batch-whitened" if always_whiten else "whitened if asked")
                        + "; no returns.")
    return estimate


grpo_advantages = _critic_free("grpo", always_whiten=False)
dr_grpo_advantages = _critic_free("dr_grpo", always_whiten=False)
rloo_advantages = _critic_free("rloo", always_whiten=False)
reinforce_pp_advantages = _critic_free("reinforce_pp", always_whiten=True)
reinforce_pp_baseline_advantages = _critic_free("reinforce_pp_baseline", always_whiten=True)

EstimatorFn = Callable[[AdvantageInputs], EstimatorOutput]

#: Estimator name → function. The job spec's `advantage_estimator` must be one of these keys.
ESTIMATORS: dict[str, EstimatorFn] = {
    "gae": gae_advantages,
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
}
assert set(ESTIMATORS) == set(ESTIMATOR_NAMES)


def compute_advantages(estimator: str, inputs: AdvantageInputs) -> EstimatorOutput:
    """(advantages (B, T), returns (B, T) or None) by the named estimator (`ValueError` for an
    unknown one or a missing input)."""
    return _pick(ESTIMATORS, estimator, "advantage_estimator")(inputs)


# --- KL coefficient --------------------------------------------------------------------------


class FixedKLController:
    """β stays what it was set to."""

    def __init__(self, beta: float) -> None:
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op."""


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller towards a target KL:
    β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon) after n more samples."""

    def __init__(self, init_beta: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be > 0")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def kl_controller(
    beta: float, target: float | None = None, horizon: float = 10000
) -> FixedKLController | AdaptiveKLController:
    """The adaptive controller when a target KL is given, else the fixed one."""
    if target is None:
        return FixedKLController(beta)
    return AdaptiveKLController(beta, target, horizon)

"""PPO's losses: small pure functions on per-token tensors, reduced by a named aggregation.

Tensors are `(B, T)` over the completion positions of B sequences, right-padded, with `mask`
`(B, T)` (bool or float, 1 on real tokens). Padded positions are never read (garbage there,
even NaN, changes nothing). With ρ_t = exp(log π_θ − log π_old) per token and A_t the (detached)
advantages:

    policy   l_t = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high))        PPO-clip, asymmetric ε
             dual clip c > 1: where A < 0, l_t = min(l_t, −c·A)          (bounds a huge ρ)
    value    l_t = ½·max((V − R)², (clip(V, V_old ± ε_v) − R)²)          (no ε_v: ½·(V − R)²)

and the per-token losses become one scalar by an aggregation (`LOSS_AGGREGATIONS`):

    token-mean                 Σ l·m / Σ m                  every real token weighs the same
    seq-mean-token-mean        mean_b (Σ_t l·m / Σ_t m)     every sequence weighs the same
    seq-mean-token-sum-norm    mean_b (Σ_t l·m / norm)      Dr. GRPO: a constant norm (default T)

Statistics come back as plain floats: `clip_fraction` (share of real tokens where the clipped
term is strictly the larger, i.e. the gradient is cut), `approx_kl` (masked mean of
(ρ − 1) − log ρ, the k3 estimate of KL(π_old ‖ π_θ)), `ratio_mean`, `value_clip_fraction`.
`entropy_from_logits` and `explained_variance` are the usual diagnostics.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, get_args

import torch

__all__ = [
    "LossAggregation",
    "LOSS_AGGREGATION_NAMES",
    "LOSS_AGGREGATIONS",
    "aggregate",
    "policy_loss",
    "value_loss",
    "entropy_from_logits",
    "explained_variance",
]

LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LOSS_AGGREGATION_NAMES: tuple[str, ...] = get_args(LossAggregation)


def _zeroed(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x on real positions, 0 on padding (whatever x holds there), (B, T)."""
    return torch.where(m, x, torch.zeros_like(x))


def token_mean(loss: torch.Tensor, mask: torch.Tensor, norm: float | None = None) -> torch.Tensor:
    """Σ l·m / Σ m over the whole batch, () (0 with no real token)."""
    m = mask.bool()
    return _zeroed(loss, m).sum() / m.to(loss.dtype).sum().clamp(min=1)


def seq_mean_token_mean(
    loss: torch.Tensor, mask: torch.Tensor, norm: float | None = None
) -> torch.Tensor:
    """mean_b (Σ_t l·m / Σ_t m), () (a row with no real token contributes 0)."""
    m = mask.bool()
    per_seq = _zeroed(loss, m).sum(-1) / m.to(loss.dtype).sum(-1).clamp(min=1)  # (B,)
    return per_seq.mean()


def seq_mean_token_sum_norm(
    loss: torch.Tensor, mask: torch.Tensor, norm: float | None = None
) -> torch.Tensor:
    """mean_b (Σ_t l·m / norm), (); norm defaults to T (the padded width)."""
    m = mask.bool()
    n = float(loss.shape[-1] if norm is None else norm)
    if n <= 0:
        raise ValueError(f"norm must be > 0, got {norm}")
    return (_zeroed(loss, m).sum(-1) / n).mean()


AggregationFn = Callable[[torch.Tensor, torch.Tensor, "float | None"], torch.Tensor]

#: aggregation name → function. The job spec's `loss_aggregation` must be one of these keys.
LOSS_AGGREGATIONS: dict[str, AggregationFn] = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm,
}
assert set(LOSS_AGGREGATIONS) == set(LOSS_AGGREGATION_NAMES)


def aggregate(
    loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", norm: float | None = None
) -> torch.Tensor:
    """Per-token losses (B, T) → a scalar by the named aggregation (`ValueError` if unknown)."""
    try:
        fn = LOSS_AGGREGATIONS[mode]
    except KeyError:
        raise ValueError(
            f"unknown loss_aggregation {mode!r}; expected one of {sorted(LOSS_AGGREGATIONS)}"
        ) from None
    return fn(loss, mask, norm)


def _stat(x: torch.Tensor, m: torch.Tensor) -> float:
    """Masked mean of a detached (B, T) tensor as a float (0.0 with no real token)."""
    x = _zeroed(x.detach().double(), m)
    return float(x.sum() / m.double().sum().clamp(min=1))


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    aggregation: str = "token-mean",
    norm: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip loss, a scalar with grad through `logp` (B, T), and its statistics
    {"clip_fraction", "approx_kl", "ratio_mean"}.

    `old_logp` (B, T) are the behaviour log-probs, `advantages` (B, T) detached. Per token
    l = max(−A·ρ, −A·clip(ρ, 1 − clip_low, 1 + clip_high)); with `dual_clip` c > 1, where A < 0
    also l = min(l, −c·A).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    m = mask.bool()
    log_ratio = _zeroed(logp - old_logp, m)  # (B, T) 0 on padding, so ρ = 1 there
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = _zeroed(advantages, m)  # (B, T)
    unclipped = -adv * ratio  # (B, T)
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    losses = torch.maximum(unclipped, clipped)  # (B, T)
    if dual_clip is not None:
        losses = torch.where(adv < 0, torch.minimum(losses, -dual_clip * adv), losses)
    loss = aggregate(losses, m, aggregation, norm)
    with torch.no_grad():
        stats = {
            "clip_fraction": _stat((clipped > unclipped).to(logp.dtype), m),
            "approx_kl": _stat((ratio - 1.0) - log_ratio, m),
            "ratio_mean": _stat(ratio, m),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float | None = None,
    aggregation: str = "token-mean",
    norm: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Critic loss, a scalar with grad through `values` (B, T), and {"value_clip_fraction"}.

    ½·max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²) per token with `clip_eps` ε, else
    ½·(V − R)²; `old_values` (B, T) are the critic's values at rollout time, `returns` (B, T).
    """
    m = mask.bool()
    v = _zeroed(values, m)  # (B, T)
    r = _zeroed(returns, m)  # (B, T)
    plain = (v - r) ** 2  # (B, T)
    if clip_eps is None:
        losses = 0.5 * plain
        fraction = 0.0
    else:
        old = _zeroed(old_values, m)  # (B, T)
        v_clipped = old + (v - old).clamp(-clip_eps, clip_eps)  # (B, T)
        clipped = (v_clipped - r) ** 2  # (B, T)
        losses = 0.5 * torch.maximum(plain, clipped)
        with torch.no_grad():
            fraction = _stat((clipped > plain).to(values.dtype), m)
    return aggregate(losses, m, aggregation, norm), {"value_clip_fraction": fraction}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: (N, V) → (N,) (any leading dims).

    H = logsumexp(z) − Σ softmax(z)·z; −inf logits (masked vocabulary) contribute 0.
    """
    p = torch.softmax(logits, dim=-1)  # (N, V)
    z = torch.where(torch.isneginf(logits), torch.zeros_like(logits), logits)  # (N, V)
    return torch.logsumexp(logits, dim=-1) - (p * z).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var[R − V]/Var[R] over the real tokens (1: perfect critic, ≤ 0: no better than the
    mean). NaN when Var[R] is 0 (undefined)."""
    m = mask.bool()
    r = returns.detach().double()[m]  # (N,)
    v = values.detach().double()[m]  # (N,)
    if r.numel() == 0:
        return math.nan
    var_r = float(((r - r.mean()) ** 2).mean())
    if var_r == 0.0:
        return math.nan
    d = r - v
    return 1.0 - float(((d - d.mean()) ** 2).mean()) / var_r

"""Preference losses: small pure functions on sequence log-probs, picked from a registry.

Every input is a `(B,)` tensor of per-sequence log-probs summed over the completion tokens only
(prompt tokens never count): the policy's `pi_chosen` = log π_θ(y_w|x), `pi_rejected` =
log π_θ(y_l|x), and the reference model's `ref_chosen`, `ref_rejected`. With

    h = (log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))

the losses are (per pair; the trainer takes the batch mean):

    sigmoid          −(1−ε)·log σ(βh) − ε·log σ(−βh)       DPO; ε = label_smoothing > 0 is
                                                            conservative DPO (cDPO)
    hinge            relu(1 − βh)                           SLiC-style
    ipo              (h̄ − 1/(2β))²                          h̄: both log-ratios averaged per token
    reference_free   sigmoid with the reference terms 0     (h = log π_θ(y_w) − log π_θ(y_l))
    simpo            −log σ(β·(avg log π_θ(y_w) − avg log π_θ(y_l)) − γ)   no reference at all

and any of them can add RPO's NLL term on the chosen response, `rpo_alpha · (−log π_θ(y_w)/|y_w|)`.

Each loss also returns the implicit rewards of chosen and rejected, detached, `(B,)`:
β·(log π_θ − log π_ref) (reference terms 0 for `reference_free`; for `simpo` its own
length-normalised reward β·avg log π_θ). Reward accuracy is the fraction of pairs whose chosen
reward is the larger; the margin is their difference.

`dpo_loss(...)` is the entry point; `LOSSES` maps a loss type to its function, and adding a
variant is adding one function and one registry line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, get_args

import torch
import torch.nn.functional as F

__all__ = [
    "LossType",
    "LOSS_TYPES",
    "LOSSES",
    "LossParams",
    "PairLogps",
    "LossOutput",
    "dpo_loss",
    "preference_metrics",
]

LossType = Literal["sigmoid", "hinge", "ipo", "reference_free", "simpo"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)


@dataclass(frozen=True)
class PairLogps:
    """Sequence log-probs of a batch of pairs, all `(B,)`.

    `chosen_len` / `rejected_len` (completion token counts) are needed by the length-normalised
    losses (`ipo`, `simpo`) and by the RPO term; the reference terms are ignored by the
    reference-free ones (`reference_free`, `simpo`) and may be None there.
    """

    pi_chosen: torch.Tensor  # (B,) log π_θ(y_w|x), with grad
    pi_rejected: torch.Tensor  # (B,) log π_θ(y_l|x), with grad
    ref_chosen: torch.Tensor | None = None  # (B,) log π_ref(y_w|x)
    ref_rejected: torch.Tensor | None = None  # (B,) log π_ref(y_l|x)
    chosen_len: torch.Tensor | None = None  # (B,) completion tokens of y_w
    rejected_len: torch.Tensor | None = None  # (B,) completion tokens of y_l


@dataclass(frozen=True)
class LossParams:
    """Loss hyper-parameters (validated by the job spec, `rlhf.trainer.jobs.DPOJob`)."""

    beta: float = 0.1  # > 0: strength of the implicit KL constraint
    label_smoothing: float = 0.0  # ε in [0, 0.5): sigmoid (cDPO) and reference_free only
    simpo_gamma: float = 0.5  # γ: SimPO's target reward margin


@dataclass(frozen=True)
class LossOutput:
    losses: torch.Tensor  # (B,) per-pair loss, with grad
    chosen_rewards: torch.Tensor  # (B,) implicit reward of y_w, detached
    rejected_rewards: torch.Tensor  # (B,) implicit reward of y_l, detached


def _need(t: torch.Tensor | None, name: str, loss: str) -> torch.Tensor:
    if t is None:
        raise ValueError(f"the {loss!r} loss needs {name}")
    return t


def _logratios(lp: PairLogps, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π_θ(y_w) − log π_ref(y_w), log π_θ(y_l) − log π_ref(y_l)), both (B,)."""
    ref_c = _need(lp.ref_chosen, "ref_chosen", loss)
    ref_r = _need(lp.ref_rejected, "ref_rejected", loss)
    return lp.pi_chosen - ref_c, lp.pi_rejected - ref_r


def _smoothed_sigmoid(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z), (B,)."""
    losses = -F.logsigmoid(logits)
    if eps:
        losses = (1.0 - eps) * losses - eps * F.logsigmoid(-logits)
    return losses


def sigmoid(lp: PairLogps, p: LossParams) -> LossOutput:
    """DPO: −log σ(βh); conservative DPO with label smoothing ε."""
    chosen, rejected = _logratios(lp, "sigmoid")  # (B,), (B,)
    losses = _smoothed_sigmoid(p.beta * (chosen - rejected), p.label_smoothing)  # (B,)
    return LossOutput(losses, p.beta * chosen.detach(), p.beta * rejected.detach())


def hinge(lp: PairLogps, p: LossParams) -> LossOutput:
    """relu(1 − βh)."""
    chosen, rejected = _logratios(lp, "hinge")
    losses = torch.relu(1.0 - p.beta * (chosen - rejected))  # (B,)
    return LossOutput(losses, p.beta * chosen.detach(), p.beta * rejected.detach())


def ipo(lp: PairLogps, p: LossParams) -> LossOutput:
    """IPO: (h̄ − 1/(2β))², the log-ratios averaged per completion token."""
    chosen, rejected = _logratios(lp, "ipo")
    n_c = _need(lp.chosen_len, "chosen_len", "ipo").to(chosen.dtype).clamp(min=1)  # (B,)
    n_r = _need(lp.rejected_len, "rejected_len", "ipo").to(chosen.dtype).clamp(min=1)  # (B,)
    h = chosen / n_c - rejected / n_r  # (B,)
    losses = (h - 1.0 / (2.0 * p.beta)) ** 2
    return LossOutput(losses, p.beta * chosen.detach(), p.beta * rejected.detach())


def reference_free(lp: PairLogps, p: LossParams) -> LossOutput:
    """DPO with π_ref ≡ 1: −log σ(β·(log π_θ(y_w) − log π_θ(y_l))) (label smoothing applies)."""
    losses = _smoothed_sigmoid(p.beta * (lp.pi_chosen - lp.pi_rejected), p.label_smoothing)
    return LossOutput(losses, p.beta * lp.pi_chosen.detach(), p.beta * lp.pi_rejected.detach())


def simpo(lp: PairLogps, p: LossParams) -> LossOutput:
    """SimPO: −log σ(β·(avg log π_θ(y_w) − avg log π_θ(y_l)) − γ); no reference model."""
    n_c = _need(lp.chosen_len, "chosen_len", "simpo").to(lp.pi_chosen.dtype).clamp(min=1)
    n_r = _need(lp.rejected_len, "rejected_len", "simpo").to(lp.pi_chosen.dtype).clamp(min=1)
    chosen = p.beta * lp.pi_chosen / n_c  # (B,) length-normalised reward
    rejected = p.beta * lp.pi_rejected / n_r  # (B,)
    losses = -F.logsigmoid(chosen - rejected - p.simpo_gamma)  # (B,)
    return LossOutput(losses, chosen.detach(), rejected.detach())


LossFn = Callable[[PairLogps, LossParams], LossOutput]

#: loss type → function. The job spec's `loss_type` must be one of these keys.
LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid,
    "hinge": hinge,
    "ipo": ipo,
    "reference_free": reference_free,
    "simpo": simpo,
}
assert set(LOSSES) == set(LOSS_TYPES)

#: Loss types that never read the reference log-probs (a job needs no reference model).
REFERENCE_FREE: frozenset[str] = frozenset({"reference_free", "simpo"})


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    rpo_alpha: float = 0.0,
    chosen_len: torch.Tensor | None = None,
    rejected_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss `(B,)`, chosen rewards `(B,)`, rejected rewards `(B,)`.

    `rpo_alpha > 0` adds RPO's NLL term on the chosen response, α·(−log π_θ(y_w)/|y_w|), per
    pair (needs `chosen_len`). Raises `ValueError` for an unknown `loss_type` or a missing input.
    """
    try:
        fn = LOSSES[loss_type]
    except KeyError:
        raise ValueError(
            f"unknown loss_type {loss_type!r}; expected one of {sorted(LOSSES)}"
        ) from None
    lp = PairLogps(pi_chosen, pi_rejected, ref_chosen, ref_rejected, chosen_len, rejected_len)
    out = fn(lp, LossParams(beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma))
    losses = out.losses
    if rpo_alpha:
        n_c = _need(chosen_len, "chosen_len", "rpo").to(pi_chosen.dtype).clamp(min=1)
        losses = losses + rpo_alpha * (-pi_chosen / n_c)  # (B,)
    return losses, out.chosen_rewards, out.rejected_rewards


def preference_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> dict[str, float]:
    """Batch means: implicit-reward `accuracy` (share of pairs whose chosen reward is larger;
    ties count half), `margin` (chosen − rejected), `chosen_reward`, `rejected_reward`."""
    c, r = chosen_rewards.detach().double(), rejected_rewards.detach().double()
    acc = (c > r).double() + 0.5 * (c == r).double()
    return {
        "accuracy": float(acc.mean()),
        "margin": float((c - r).mean()),
        "chosen_reward": float(c.mean()),
        "rejected_reward": float(r.mean()),
    }

"""Non-finite training fails the job: every training job checks its numbers with these.

A NaN or infinite loss or gradient norm stops the job at that step, before the optimizer applies
it; weights that stopped being finite stop it before they are saved. The error names the step,
and because it is raised inside the training function nothing is published (the pipeline
publishes only what the training function returns). It is a `ValueError`, so the job fails
for good: a retry would diverge the same way.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import torch

__all__ = ["TrainingDiverged", "check_finite", "check_finite_weights", "grad_norm"]

_HINT = ("nothing was published; lower the learning rate, check the data, or check the base "
         "checkpoint for non-finite weights")


class TrainingDiverged(ValueError):
    """The loss, the gradient norm or the weights of a training job stopped being finite."""


def check_finite(step: int, total: int, **values: float | None) -> None:
    """Raise `TrainingDiverged` naming `step` when any given value is NaN or infinite (None:
    not measured)."""
    bad = {k: v for k, v in values.items() if v is not None and not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise TrainingDiverged(f"training diverged at step {step} of {total}: {what}; {_HINT}")


def check_finite_weights(model, step: int, total: int) -> None:
    """Raise `TrainingDiverged` when a parameter of `model` holds a NaN or an infinity (checked
    after `step`, before the weights are saved)."""
    import torch

    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            raise TrainingDiverged(f"training diverged at step {step} of {total}: weight {name} "
                                   f"is not finite after the update; {_HINT}")


def grad_norm(params: Iterable["torch.nn.Parameter"], max_norm: float | None) -> float:
    """The total L2 norm of the gradients (before clipping); clips them to `max_norm` when set."""
    import torch

    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    limit = float("inf") if max_norm is None else max_norm
    return float(torch.nn.utils.clip_grad_norm_(params, limit))

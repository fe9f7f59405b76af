"""Random right-padded `(B, T)` batches for the numeric unit tests (advantages, PPO losses):
float64 values, row lengths that always include a row of length 1 and a full row, and garbage
(huge, infinite, NaN) at the padded positions that the functions under test must never read."""

from __future__ import annotations

import math
import random

import torch

F64 = torch.float64


def lengths(rng: random.Random, b: int, t: int) -> list[int]:
    """Row lengths: always one row of length 1 and one full row, the rest random in 1..t."""
    ls = [1, t] + [rng.randint(1, t) for _ in range(b - 2)]
    rng.shuffle(ls)
    return ls


def mask_of(ls: list[int], t: int, dtype=F64) -> torch.Tensor:
    """(len(ls), t): 1.0 on each row's first ls[i] positions."""
    return torch.tensor([[1.0 if j < n else 0.0 for j in range(t)] for n in ls], dtype=dtype)


def rand(rng: random.Random, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """Gaussian float64 values of `shape` from `rng` (reproducible for a seed)."""
    n = math.prod(shape)
    return torch.tensor([rng.gauss(0, scale) for _ in range(n)], dtype=F64).reshape(shape)


def with_garbage(x: torch.Tensor, mask: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """A copy of x with every padded position replaced by garbage (huge, infinite or NaN)."""
    junk = [1e30, -1e30, math.inf, -math.inf, math.nan, 123.0]
    g = x.clone()
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            if not mask[i, j]:
                g[i, j] = rng.choice(junk)
    return g

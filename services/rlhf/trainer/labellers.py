"""Labellers: who scores the loop's samples — a reward model (RewardService) or an AI judge.

A `Labeller` (sync) scores each prompt's group of responses (`score_groups`) and compares two
responses (`compare` → P(a ≻ b)). Its `name` is the provenance written on every pair:
"reward:<name>@<version>" or "judge:<name>@<version>".

- `RewardLabeller(target)`: the RewardService's Bradley–Terry scores, absolute (comparable across
  prompts and rounds: `absolute = True`); compare = σ(r_a − r_b) (its Compare RPC).
- `rlhf.trainer.judge.JudgeLabeller(target, template)`: a served language model comparing
  responses pairwise, both orders averaged; its scores are relative to the group (each group's
  scores sum to about 0), so a loop measures a judge's progress with `compare`.

`make_labeller(spec)` builds one from a loop spec's `labeller` (`jobs.LabellerSpec`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from rlhf.trainer.jobs import LabellerSpec


@runtime_checkable
class Labeller(Protocol):
    """Scores responses. Implementations are synchronous and safe to call from one thread."""

    name: str

    def score_groups(self, prompts: Sequence[str],
                     groups: Sequence[Sequence[str]]) -> list[list[float]]:
        """One score per response of each prompt's group (higher is better)."""
        ...

    def compare(self, prompt: str, a: str, b: str) -> float:
        """P(a ≻ b) for `prompt`."""
        ...

    def close(self) -> None: ...

    # Optional: `compare_many(triples) -> list[float]`, P(a ≻ b) for many (prompt, a, b) at
    # once; the loop uses it when a labeller has it (see `compare_all`), else `compare`.


def compare_all(labeller: Labeller, triples: Sequence[tuple[str, str, str]]) -> list[float]:
    """P(a ≻ b) for every (prompt, a, b): the labeller's `compare_many` when it has one (batched
    calls), else one `compare` each."""
    many = getattr(labeller, "compare_many", None)
    if many is not None:
        return list(many(triples))
    return [labeller.compare(p, a, b) for p, a, b in triples]


def is_absolute(labeller: Labeller) -> bool:
    """Whether the labeller's scores compare across prompts and rounds (a reward model's do; a
    judge's are relative to the group they were scored in)."""
    return bool(getattr(labeller, "absolute", False))


class RewardLabeller:
    """The RewardService at `target` as a labeller. The reward service refuses an empty
    response, so an empty one is scored as a single space."""

    absolute = True

    def __init__(self, target: str, token: str | None = None, timeout: float = 60.0, *,
                 batch_items: int = 64):
        from rlhf_client import RewardClient

        self.timeout = timeout
        self.batch_items = batch_items
        self.client = RewardClient(target, token=token, timeout=timeout)
        try:
            info = self.client.get_model(timeout=timeout).model
        except Exception:
            self.client.close()
            raise
        self.name = f"reward:{info.name}@{info.version}"

    def _saw(self, model) -> None:
        self.name = f"reward:{model.name}@{model.version}"  # the version that answered last

    def score_groups(self, prompts: Sequence[str],
                     groups: Sequence[Sequence[str]]) -> list[list[float]]:
        if len(prompts) != len(groups):
            raise ValueError(f"{len(groups)} groups for {len(prompts)} prompts")
        items = [(p, text or " ") for p, g in zip(prompts, groups) for text in g]
        flat: list[float] = []
        for s in range(0, len(items), self.batch_items):
            res = self.client.score(items[s : s + self.batch_items], timeout=self.timeout)
            self._saw(res.model)
            flat.extend(float(x) for x in res.rewards)
        out, k = [], 0
        for g in groups:
            out.append(flat[k : k + len(g)])
            k += len(g)
        return out

    def compare(self, prompt: str, a: str, b: str) -> float:
        res = self.client.compare(prompt, a or " ", b or " ", timeout=self.timeout)
        self._saw(res.model)
        p = float(res.probability_a)
        return p if math.isfinite(p) else 0.5

    def compare_many(self, triples: Sequence[tuple[str, str, str]]) -> list[float]:
        """σ(r_a − r_b) for every (prompt, a, b), scored in batched Score calls (what Compare
        computes, one call per `batch_items` responses instead of one per pair)."""
        scores = self.score_groups([p for p, _, _ in triples], [[a, b] for _, a, b in triples])
        return [_sigmoid(sa - sb) for sa, sb in scores]

    def close(self) -> None:
        self.client.close()


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def make_labeller(spec: "LabellerSpec", *, token: str | None = None) -> Labeller:
    """The labeller a loop spec names (`type` "reward" or "judge")."""
    if spec.type == "reward":
        return RewardLabeller(spec.target, token=token, timeout=spec.timeout_s)
    if spec.type == "judge":
        from rlhf.trainer.judge import JudgeLabeller  # the judge's module: loaded only when used

        return JudgeLabeller(spec.target, spec.template, token=token, timeout=spec.timeout_s)
    raise ValueError(f"labeller.type: unknown labeller {spec.type!r}")


__all__ = ["Labeller", "RewardLabeller", "compare_all", "is_absolute", "make_labeller"]
